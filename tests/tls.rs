//! TLS and mTLS at the listener with certificates made in the test (rcgen), plus the listener's
//! handling of clients that do not speak HTTP/2 or fail the TLS handshake.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use grpcgate::echo::EchoBackend;
use grpcgate::pb::echo::echo_client::EchoClient;
use grpcgate::pb::echo::EchoRequest;
use grpcgate::Gateway;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A CA, a server certificate for localhost/127.0.0.1 and a client certificate, both signed by the
/// CA, written as PEM files into a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
    ca_pem: String,
    client_cert_pem: String,
    client_key_pem: String,
}

impl Pki {
    fn new() -> Pki {
        let (ca, ca_key) = ca("grpcgate test CA");
        let server_key = KeyPair::generate().unwrap();
        let mut sp =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        sp.distinguished_name.push(DnType::CommonName, "localhost");
        sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server = sp.signed_by(&server_key, &ca, &ca_key).unwrap();
        let (client, client_key) = client_cert("test client", &ca, &ca_key);

        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("ca.crt"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("server.crt"), server.pem()).unwrap();
        std::fs::write(dir.path().join("server.key"), server_key.serialize_pem()).unwrap();
        Pki {
            dir,
            ca_pem: ca.pem(),
            client_cert_pem: client.pem(),
            client_key_pem: client_key.serialize_pem(),
        }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }
}

fn ca(name: &str) -> (rcgen::Certificate, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    (p.self_signed(&key).unwrap(), key)
}

fn client_cert(
    name: &str,
    issuer: &rcgen::Certificate,
    issuer_key: &KeyPair,
) -> (rcgen::Certificate, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    (p.signed_by(&key, issuer, issuer_key).unwrap(), key)
}

/// A gateway whose "edge" listener terminates TLS (mTLS when `mtls`) in front of `backends`.
async fn tls_gateway(pki: &Pki, backends: &[EchoBackend], mtls: bool) -> Gateway {
    start(&tls_gateway_text(pki, backends, mtls)).await
}

/// The config of [`tls_gateway`].
fn tls_gateway_text(pki: &Pki, backends: &[EchoBackend], mtls: bool) -> String {
    let eps: Vec<String> = backends.iter().map(|b| format!("\"{}\"", b.addr)).collect();
    let client_ca = if mtls {
        format!("client_ca = {:?}", pki.path("ca.crt").display().to_string())
    } else {
        String::new()
    };
    format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[[listeners]]
name = "edge"
listen = "127.0.0.1:0"

[listeners.tls]
cert = {cert:?}
key = {key:?}
{client_ca}

[[listeners.routes]]
cluster = "echo"

[[clusters]]
name = "echo"
endpoints = [{eps}]
"#,
        cert = pki.path("server.crt").display().to_string(),
        key = pki.path("server.key").display().to_string(),
        eps = eps.join(", "),
    )
}

/// The client's TLS settings: trusts `ca_pem`, expects the name "localhost", presents `identity`.
fn tls_config(ca_pem: &str, identity: Option<(&str, &str)>) -> ClientTlsConfig {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    match identity {
        Some((cert, key)) => tls.identity(Identity::from_pem(cert, key)),
        None => tls,
    }
}

/// Connects over TLS to `addr` (one connection).
async fn tls_connect(
    addr: SocketAddr,
    tls: ClientTlsConfig,
) -> Result<EchoClient<Channel>, tonic::transport::Error> {
    let ch = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(WAIT)
        .connect()
        .await?;
    Ok(EchoClient::new(ch))
}

/// Connects and makes one unary call; any failure (handshake or call) is an `Err` with the reason.
/// Bounded: a hang is a panic.
async fn try_call(addr: SocketAddr, tls: ClientTlsConfig) -> Result<String, String> {
    bounded(async {
        let mut c = tls_connect(addr, tls).await.map_err(|e| format!("{e:?}"))?;
        let r = c
            .unary(EchoRequest {
                payload: b"ping".to_vec(),
                ..Default::default()
            })
            .await
            .map_err(|s| format!("{s:?}"))?;
        assert_eq!(r.get_ref().payload, b"ping");
        Ok(r.into_inner().backend)
    })
    .await
}

fn req(payload: &[u8]) -> EchoRequest {
    EchoRequest {
        payload: payload.to_vec(),
        ..Default::default()
    }
}

#[tokio::test]
async fn tls_listener_serves_unary_and_streaming_calls() {
    let pki = Pki::new();
    let b = backends(1).await;
    let gw = tls_gateway(&pki, &b, false).await;
    let addr = gw.listener_addr("edge").unwrap();
    let mut c = bounded(tls_connect(addr, tls_config(&pki.ca_pem, None)))
        .await
        .expect("TLS connect");

    let r = bounded(c.unary(req(b"hello tls"))).await.expect("unary");
    assert_eq!(r.get_ref().payload, b"hello tls");
    assert_eq!(r.get_ref().backend, "b0");

    // Server streaming.
    let mut s = bounded(c.server_stream(EchoRequest {
        payload: b"s".to_vec(),
        count: 5,
        ..Default::default()
    }))
    .await
    .expect("server_stream")
    .into_inner();
    let mut seqs = Vec::new();
    while let Some(m) = bounded(s.message()).await.expect("stream message") {
        seqs.push(m.seq);
    }
    assert_eq!(seqs, vec![0, 1, 2, 3, 4]);

    // Client streaming.
    let msgs = tokio_stream::iter((0..10).map(|_| req(&[7u8; 100])));
    let r = bounded(c.client_stream(msgs)).await.expect("client_stream");
    assert_eq!(r.get_ref().seq, 10);
    assert_eq!(r.get_ref().total_bytes, 1000);

    // Bidi, message by message.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut replies = bounded(c.bidi(ReceiverStream::new(rx)))
        .await
        .expect("bidi")
        .into_inner();
    for i in 0..3u8 {
        tx.send(req(&[i])).await.unwrap();
        let m = bounded(replies.message())
            .await
            .expect("bidi reply")
            .expect("bidi ended early");
        assert_eq!(m.payload, vec![i]);
        assert_eq!(m.seq, u32::from(i));
    }
    drop(tx);
    assert!(bounded(replies.message())
        .await
        .expect("bidi end")
        .is_none());

    let s = scrape(&gw).await;
    assert_eq!(
        sample(
            &s,
            "grpcgate_requests_total",
            &[("listener", "edge"), ("grpc_status", "OK")]
        ),
        4.0
    );
}

#[tokio::test]
async fn tls_client_that_does_not_trust_the_server_fails() {
    let pki = Pki::new();
    let b = backends(1).await;
    let gw = tls_gateway(&pki, &b, false).await;
    let addr = gw.listener_addr("edge").unwrap();
    let (other_ca, _) = ca("some other CA");
    let r = try_call(addr, tls_config(&other_ca.pem(), None)).await;
    assert!(r.is_err(), "a client with the wrong CA got through: {r:?}");
    assert_eq!(
        b[0].stats.started.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    // The right CA still works.
    assert_eq!(
        try_call(addr, tls_config(&pki.ca_pem, None)).await,
        Ok("b0".to_string())
    );
}

/// The config is only text: a reload reads the certificate files again (how a renewed certificate
/// takes effect), and one that cannot be read (here `/dev/zero`, stopped at the 1 MiB limit) is refused
/// naming the line and key, with the running certificate kept.
#[tokio::test]
async fn reload_reads_the_certificate_again_and_refuses_an_unreadable_one() {
    let pki = Pki::new();
    let b = backends(1).await;
    let text = tls_gateway_text(&pki, &b, false);
    let gw = start(&text).await;
    let addr = gw.listener_addr("edge").unwrap();

    // Renew: a certificate from another CA, in the same files.
    let (new_ca, new_ca_key) = ca("renewed CA");
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = p.signed_by(&key, &new_ca, &new_ca_key).unwrap();
    std::fs::write(pki.path("server.crt"), cert.pem()).unwrap();
    std::fs::write(pki.path("server.key"), key.serialize_pem()).unwrap();
    // Not read until the reload.
    assert_eq!(
        try_call(addr, tls_config(&pki.ca_pem, None)).await,
        Ok("b0".to_string())
    );
    gw.reload(parse(&text)).expect("reload");
    assert_eq!(
        try_call(addr, tls_config(&new_ca.pem(), None)).await,
        Ok("b0".to_string())
    );
    assert!(try_call(addr, tls_config(&pki.ca_pem, None)).await.is_err());

    let cert_line = text.lines().position(|l| l.starts_with("cert = ")).unwrap() + 1;
    let e = gw
        .reload(parse(&text.replace(
            &format!("{:?}", pki.path("server.crt").display().to_string()),
            "\"/dev/zero\"",
        )))
        .unwrap_err();
    assert_eq!(
        e,
        format!("test.toml:{cert_line}:8: listeners[0].tls.cert: cannot read /dev/zero: larger than 1 MiB, the limit for a PEM file")
    );
    assert_eq!(
        try_call(addr, tls_config(&new_ca.pem(), None)).await,
        Ok("b0".to_string())
    );
}

#[tokio::test]
async fn mtls_accepts_a_client_certificate_signed_by_the_ca() {
    let pki = Pki::new();
    let b = backends(1).await;
    let gw = tls_gateway(&pki, &b, true).await;
    let addr = gw.listener_addr("edge").unwrap();
    let tls = tls_config(
        &pki.ca_pem,
        Some((&pki.client_cert_pem, &pki.client_key_pem)),
    );
    assert_eq!(try_call(addr, tls).await, Ok("b0".to_string()));
}

#[tokio::test]
async fn mtls_rejects_clients_without_a_valid_certificate_and_keeps_serving() {
    let pki = Pki::new();
    let b = backends(1).await;
    let gw = tls_gateway(&pki, &b, true).await;
    let addr = gw.listener_addr("edge").unwrap();
    let good = || {
        tls_config(
            &pki.ca_pem,
            Some((&pki.client_cert_pem, &pki.client_key_pem)),
        )
    };

    // A good client connected before the bad ones.
    let mut kept = bounded(tls_connect(addr, good())).await.expect("connect");
    bounded(kept.unary(req(b"before"))).await.expect("before");

    // No client certificate.
    let r = try_call(addr, tls_config(&pki.ca_pem, None)).await;
    assert!(
        r.is_err(),
        "a client without a certificate got through: {r:?}"
    );

    // A certificate from a CA the listener does not trust.
    let (rogue_ca, rogue_key) = ca("rogue CA");
    let (rogue, rogue_client_key) = client_cert("rogue client", &rogue_ca, &rogue_key);
    let r = try_call(
        addr,
        tls_config(
            &pki.ca_pem,
            Some((&rogue.pem(), &rogue_client_key.serialize_pem())),
        ),
    )
    .await;
    assert!(
        r.is_err(),
        "a client with an untrusted certificate got through: {r:?}"
    );
    assert_eq!(
        b[0].stats.started.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "a rejected client reached the backend"
    );

    // The connection that was already open, and new good ones, still work.
    let r = bounded(kept.unary(req(b"after"))).await.expect("after");
    assert_eq!(r.get_ref().payload, b"after");
    assert_eq!(try_call(addr, good()).await, Ok("b0".to_string()));
}

/// Sends `request` on a fresh TCP connection and reads until the proxy closes it (bounded). Returns
/// what was read, even if the connection then ended with an error (e.g. a reset).
async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut s = bounded(TcpStream::connect(addr)).await.expect("connect");
    s.write_all(request).await.expect("write");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    bounded(async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    buf
}

#[tokio::test]
async fn http1_client_on_plaintext_listener_gets_505() {
    let b = backends(1).await;
    let gw = gateway_for(&b).await;
    let addr = gw.listener_addr("edge").unwrap();
    // What curl sends.
    let request = format!(
        "GET /echo.Echo/Unary HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n"
    );
    let answer = raw_exchange(addr, request.as_bytes()).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 505 HTTP Version Not Supported\r\n"),
        "answer: {answer:?}"
    );
    let (head, body) = answer.split_once("\r\n\r\n").expect("complete response");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .expect("content-length")
        .parse()
        .unwrap();
    assert_eq!(body.len(), len, "body: {body:?}");
    assert!(body.contains("HTTP/2"), "body: {body:?}");

    // A short request that fits in one read, and the listener still serves gRPC afterwards.
    let answer = raw_exchange(addr, b"GET / HTTP/1.1\r\n\r\n").await;
    assert!(
        answer.starts_with(b"HTTP/1.1 505 "),
        "answer: {:?}",
        String::from_utf8_lossy(&answer)
    );
    let mut c = edge_client(&gw).await;
    bounded(c.unary(req(b"h2 still works")))
        .await
        .expect("h2c call after HTTP/1.1 clients");
}

#[tokio::test]
async fn failed_tls_handshakes_do_not_disturb_a_concurrent_connection() {
    let pki = Pki::new();
    let b = backends(1).await;
    let gw = tls_gateway(&pki, &b, false).await;
    let addr = gw.listener_addr("edge").unwrap();

    // A good TLS connection with a bidi stream open across the bad handshakes.
    let mut c = bounded(tls_connect(addr, tls_config(&pki.ca_pem, None)))
        .await
        .expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut replies = bounded(c.bidi(ReceiverStream::new(rx)))
        .await
        .expect("bidi")
        .into_inner();
    tx.send(req(b"one")).await.unwrap();
    let m = bounded(replies.message()).await.unwrap().unwrap();
    assert_eq!(m.payload, b"one");

    // Garbage instead of a ClientHello, and plaintext HTTP/1.1 and h2c on the TLS port: each gets a
    // fatal TLS alert and the connection is closed (no hang).
    let garbage: Vec<u8> = (0..=255u8).cycle().take(2048).collect();
    for bad in [
        &garbage[..],
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ] {
        let answer = raw_exchange(addr, bad).await;
        assert!(
            answer.len() >= 7 && answer[0] == 0x15 && answer[5] == 2,
            "expected a fatal TLS alert record, got {answer:?}"
        );
    }
    // A TLS client that rejects the server's certificate aborts the handshake.
    let (other_ca, _) = ca("some other CA");
    let r = try_call(addr, tls_config(&other_ca.pem(), None)).await;
    assert!(r.is_err(), "{r:?}");
    // Several bad handshakes at once.
    let mut bad = Vec::new();
    for _ in 0..5 {
        let garbage = garbage.clone();
        bad.push(tokio::spawn(async move {
            raw_exchange(addr, &garbage).await;
        }));
    }
    for t in bad {
        bounded(t).await.unwrap();
    }

    // The open stream carries on.
    tx.send(req(b"two")).await.unwrap();
    let m = bounded(replies.message()).await.unwrap().unwrap();
    assert_eq!(m.payload, b"two");
    assert_eq!(m.seq, 1);
    drop(tx);
    assert!(bounded(replies.message()).await.unwrap().is_none());
    // New good connections still work.
    assert_eq!(
        try_call(addr, tls_config(&pki.ca_pem, None)).await,
        Ok("b0".to_string())
    );
}

#[tokio::test]
async fn a_tls_handshake_that_never_finishes_does_not_block_others() {
    let pki = Pki::new();
    let b = backends(1).await;
    let gw = tls_gateway(&pki, &b, false).await;
    let addr = gw.listener_addr("edge").unwrap();
    // A connection that sends half a ClientHello and then nothing.
    let mut stalled = bounded(TcpStream::connect(addr)).await.expect("connect");
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    // Meanwhile good clients are served.
    for _ in 0..3 {
        assert_eq!(
            try_call(addr, tls_config(&pki.ca_pem, None)).await,
            Ok("b0".to_string())
        );
    }
    drop(stalled);
}

#[tokio::test]
async fn downstream_connections_gauge_counts_open_tls_connections() {
    let pki = Pki::new();
    let b = backends(1).await;
    let gw = tls_gateway(&pki, &b, false).await;
    let addr = gw.listener_addr("edge").unwrap();
    let active = |s: &prometheus_parse::Scrape| {
        sample(
            s,
            "grpcgate_downstream_connections_active",
            &[("listener", "edge")],
        )
    };
    assert_eq!(active(&scrape(&gw).await), 0.0);

    // Two separate TLS connections, each proven established by a call.
    let mut c1 = bounded(tls_connect(addr, tls_config(&pki.ca_pem, None)))
        .await
        .expect("connect");
    bounded(c1.unary(req(b"1"))).await.expect("call 1");
    let s = scrape(&gw).await;
    assert_eq!(active(&s), 1.0);
    // The series exists with exactly this label.
    assert!(s.samples.iter().any(|x| {
        x.metric == "grpcgate_downstream_connections_active"
            && x.labels.get("listener") == Some("edge")
    }));
    let mut c2 = bounded(tls_connect(addr, tls_config(&pki.ca_pem, None)))
        .await
        .expect("connect");
    bounded(c2.unary(req(b"2"))).await.expect("call 2");
    assert_eq!(active(&scrape(&gw).await), 2.0);

    // Closing the clients brings it back down (the proxy notices the close asynchronously: poll,
    // bounded).
    drop(c1);
    drop(c2);
    let down = tokio::time::timeout(WAIT, async {
        loop {
            if active(&scrape(&gw).await) == 0.0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        down.is_ok(),
        "grpcgate_downstream_connections_active stayed at {} after the clients closed",
        active(&scrape(&gw).await)
    );
}

/// PROXY protocol on a TLS listener: the header comes before the ClientHello, and the address it
/// carries reaches the backend in x-forwarded-for. A TLS client without the header is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_header_before_the_client_hello() {
    let pki = Pki::new();
    let b = [EchoBackend::start("b0", Duration::ZERO).await.unwrap()];
    let eps = format!("\"{}\"", b[0].addr);
    let text = format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[[listeners]]
name = "edge"
listen = "127.0.0.1:0"
proxy_protocol = true

[listeners.tls]
cert = {cert:?}
key = {key:?}

[[listeners.routes]]
cluster = "echo"

[[clusters]]
name = "echo"
endpoints = [{eps}]
"#,
        cert = pki.path("server.crt").display().to_string(),
        key = pki.path("server.key").display().to_string(),
    );
    let gw = start(&text).await;
    let addr = gw.listener_addr("edge").unwrap();

    let connector = rustls_connector(&pki, true);
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();

    // v2 TCP4 from 203.0.113.5:40000, then the TLS handshake and HTTP/2 on the same socket.
    let mut header = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    header.extend_from_slice(&[203, 0, 113, 5, 127, 0, 0, 1]);
    header.extend_from_slice(&40000u16.to_be_bytes());
    header.extend_from_slice(&addr.port().to_be_bytes());
    let mut tcp = bounded(TcpStream::connect(addr)).await.unwrap();
    tcp.write_all(&header).await.unwrap();
    let tls = bounded(connector.connect(name.clone(), tcp))
        .await
        .expect("TLS handshake after the PROXY header");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut h2, conn) = bounded(h2::client::handshake(tls)).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("https://localhost:{}/echo.Echo/Unary", addr.port()))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    h2 = bounded(h2.ready()).await.unwrap();
    let (resp, mut send) = h2.send_request(req, false).unwrap();
    send.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .unwrap();
    let resp = bounded(resp).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers().get("x-forwarded-for").unwrap(),
        "203.0.113.5"
    );

    // Without the header, the ClientHello is taken for a bad header: no handshake.
    let tcp = bounded(TcpStream::connect(addr)).await.unwrap();
    let r = bounded(connector.connect(name, tcp)).await;
    assert!(
        r.is_err(),
        "a TLS client without a PROXY header got through"
    );
    let s = scrape(&gw).await;
    assert_eq!(
        sample(
            &s,
            "grpcgate_proxy_protocol_rejected_total",
            &[("listener", "edge")]
        ),
        1.0
    );
}

/// A rustls client (ring) trusting the test CA, ALPN h2; `resume`: it keeps and offers session
/// tickets (rustls' in-memory store), else every handshake is a full one.
fn rustls_connector(pki: &Pki, resume: bool) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pki.ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    if !resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// One connection with one unary call through `addr`; the kind of TLS handshake it took. The call
/// also makes the client read the tickets the server sends after the handshake.
async fn one_call(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
) -> rustls::HandshakeKind {
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tcp = bounded(TcpStream::connect(addr)).await.unwrap();
    let tls = bounded(connector.connect(name, tcp)).await.unwrap();
    let kind = tls.get_ref().1.handshake_kind().unwrap();
    let (h2, conn) = bounded(h2::client::handshake(tls)).await.unwrap();
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("https://localhost:{}/echo.Echo/Unary", addr.port()))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let mut h2 = bounded(h2.ready()).await.unwrap();
    let (resp, mut send) = h2.send_request(req, false).unwrap();
    send.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .unwrap();
    let resp = bounded(resp).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    while let Some(d) = bounded(body.data()).await {
        d.unwrap();
    }
    drop(h2);
    conn.abort();
    kind
}

/// TLS 1.3 session tickets are stateless: a client comes back after 200 other clients' full
/// handshakes (400 tickets issued, more than rustls' default 256-entry session cache holds) and
/// still resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resumes_its_tls_session_after_many_others_connected() {
    let pki = Pki::new();
    let b = backends(1).await;
    let gw = tls_gateway(&pki, &b, false).await;
    let addr = gw.listener_addr("edge").unwrap();
    let returning = rustls_connector(&pki, true);
    let others = rustls_connector(&pki, false);
    assert_eq!(
        one_call(&returning, addr).await,
        rustls::HandshakeKind::Full
    );
    for _ in 0..200 {
        assert_eq!(one_call(&others, addr).await, rustls::HandshakeKind::Full);
    }
    assert_eq!(
        one_call(&returning, addr).await,
        rustls::HandshakeKind::Resumed
    );
}
