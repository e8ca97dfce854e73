//! Behind an NLB (issue 22): the connection lifecycle (max_connections, max_connection_age,
//! keepalive), the PROXY protocol and x-forwarded-for. Real echo backends, the real gateway, tonic
//! clients and raw sockets.

mod common;
#[path = "common/raw_h2.rs"]
mod raw_h2;

use std::net::SocketAddr;
use std::time::Duration;

use common::hostile::*;
use common::*;
use grpcgate::pb::echo::EchoRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A gateway over one echo backend with `keys` added to the "edge" listener.
async fn gateway_with(keys: &str) -> (Vec<grpcgate::echo::EchoBackend>, grpcgate::Gateway) {
    let backends = backends(1).await;
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let text = with_listener_keys(&config_text(&addrs, "round_robin", "", ""), keys);
    let gw = start(&text).await;
    (backends, gw)
}

/// Reads until EOF or an error (whatever the server sent is discarded); Err if that takes longer than
/// `within`.
async fn closed_within(conn: &mut TcpStream, within: Duration) -> Result<(), String> {
    tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .map_err(|_| format!("not closed within {within:?}"))
}

// ---------------------------------------------------------------------------------------------------
// max_connections
// ---------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_refuses_the_next_connection_and_counts_it() {
    let (_backends, gw) = gateway_with("max_connections = 2").await;
    let addr = gw.listener_addr("edge").unwrap();
    let active = [("listener", "edge")];

    let mut a = client(addr).await;
    let mut b = client(addr).await;
    bounded(a.unary(EchoRequest::default())).await.unwrap();
    bounded(b.unary(EchoRequest::default())).await.unwrap();
    wait_sample(&gw, "grpcgate_downstream_connections_active", &active, 2.0).await;

    // The third is closed at once: EOF before it sent a byte, and no call gets through on it.
    let mut third = bounded(TcpStream::connect(addr)).await.unwrap();
    closed_within(&mut third, WAIT).await.unwrap();
    let mut raw = raw_h2::RawConn::connect(addr).await;
    raw.send(raw_h2::unary_call(1, b"x", 0));
    let (_, seen) = raw
        .until(|e| matches!(e, raw_h2::Event::Closed).then_some(()))
        .await;
    assert!(
        !seen
            .iter()
            .any(|e| matches!(e, raw_h2::Event::Headers { .. })),
        "a call got through over the limit: {seen:?}"
    );
    let s = scrape(&gw).await;
    assert_eq!(
        sample(
            &s,
            "grpcgate_downstream_connections_rejected_total",
            &active
        ),
        2.0
    );
    assert_eq!(
        sample(&s, "grpcgate_downstream_connections_total", &active),
        2.0
    );
    // The two served go on working.
    bounded(a.unary(EchoRequest::default())).await.unwrap();

    // One closes: a new connection is taken again.
    drop(b);
    wait_sample(&gw, "grpcgate_downstream_connections_active", &active, 1.0).await;
    let mut c = client(addr).await;
    bounded(c.unary(EchoRequest::default())).await.unwrap();
    let s = scrape(&gw).await;
    assert_eq!(
        sample(
            &s,
            "grpcgate_downstream_connections_rejected_total",
            &active
        ),
        2.0
    );
}

// ---------------------------------------------------------------------------------------------------
// max_connection_age
// ---------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_age_sends_two_step_goaway_and_the_call_in_flight_completes() {
    let (_backends, gw) =
        gateway_with("max_connection_age = \"300ms\"\nmax_connection_age_grace = \"5s\"").await;
    let addr = gw.listener_addr("edge").unwrap();
    let mut raw = raw_h2::RawConn::connect(addr).await;
    // A call that runs 800 ms, past the age (270-330 ms).
    let started = tokio::time::Instant::now();
    raw.send(raw_h2::unary_call(1, b"slow", 800));
    let (first, _) = raw
        .until(|e| match e {
            raw_h2::Event::GoAway {
                last_stream, code, ..
            } => Some((*last_stream, *code)),
            _ => None,
        })
        .await;
    let at = started.elapsed();
    assert_eq!(first, (0x7fff_ffff, 0), "first GOAWAY: 2^31-1, NO_ERROR");
    assert!(
        at >= Duration::from_millis(250) && at < Duration::from_millis(800),
        "GOAWAY at {at:?}"
    );
    // The reader answered the PING: the real last stream id follows.
    let (second, _) = raw
        .until(|e| match e {
            raw_h2::Event::GoAway {
                last_stream, code, ..
            } => Some((*last_stream, *code)),
            _ => None,
        })
        .await;
    assert_eq!(second, (1, 0), "second GOAWAY: the last stream processed");
    // The call in flight completes, then the connection closes.
    let (status, seen) = raw
        .until(|e| match e {
            raw_h2::Event::Headers {
                stream: 1,
                end_stream: true,
            } => Some("trailers"),
            raw_h2::Event::Reset { stream: 1, .. } => Some("reset"),
            raw_h2::Event::Closed => Some("closed"),
            _ => None,
        })
        .await;
    assert_eq!(status, "trailers", "{seen:?}");
    assert!(
        seen.iter()
            .any(|e| matches!(e, raw_h2::Event::Data { stream: 1, .. })),
        "{seen:?}"
    );
    raw.until(|e| matches!(e, raw_h2::Event::Closed).then_some(()))
        .await;
    let labels = [("listener", "edge"), ("reason", "age")];
    wait_sample(
        &gw,
        "grpcgate_downstream_connections_closed_total",
        &labels,
        1.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_age_grace_closes_a_connection_whose_call_runs_too_long() {
    let (_backends, gw) =
        gateway_with("max_connection_age = \"200ms\"\nmax_connection_age_grace = \"300ms\"").await;
    let addr = gw.listener_addr("edge").unwrap();
    let mut raw = raw_h2::RawConn::connect(addr).await;
    let started = tokio::time::Instant::now();
    raw.send(raw_h2::unary_call(1, b"too slow", 5000));
    let (_, seen) = raw
        .until(|e| matches!(e, raw_h2::Event::Closed).then_some(()))
        .await;
    let at = started.elapsed();
    // Age (180-220 ms) plus grace (300 ms); well before the call's 5 s.
    assert!(
        at >= Duration::from_millis(450) && at < Duration::from_millis(3000),
        "closed at {at:?}: {seen:?}"
    );
    assert!(
        !seen
            .iter()
            .any(|e| matches!(e, raw_h2::Event::Headers { stream: 1, .. })),
        "{seen:?}"
    );
}

/// A client connection that behaves as gRPC clients do on a graceful GOAWAY: a call is sent on the
/// current connection while it takes new streams, else on a new one (a call h2 refused to send never
/// left the client and goes on the next connection). A call that was sent and failed is a failure.
struct Rotating {
    addr: SocketAddr,
    send: h2::client::SendRequest<bytes::Bytes>,
    connections: u32,
}

impl Rotating {
    async fn connect(addr: SocketAddr) -> Rotating {
        Rotating {
            addr,
            send: h2_after(addr, b"").await,
            connections: 1,
        }
    }

    async fn unary(&mut self, msg: &EchoRequest) -> Result<(), String> {
        let addr = self.addr;
        for _ in 0..3 {
            let sent = match self.send.clone().ready().await {
                Ok(mut ready) => ready.send_request(request(addr, "/echo.Echo/Unary", &[]), false),
                Err(e) => Err(e),
            };
            let (resp, mut body) = match sent {
                Ok(x) => x,
                Err(e) => {
                    // The connection is going away (or gone): nothing was sent.
                    assert!(e.is_go_away() || e.is_io() || e.is_library(), "{e:?}");
                    self.send = h2_after(addr, b"").await;
                    self.connections += 1;
                    continue;
                }
            };
            let _ = body.send_data(grpc_frame(msg), true);
            let resp = resp.await.map_err(|e| format!("response: {e:?}"))?;
            let (head, mut body) = resp.into_parts();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.map_err(|e| format!("body: {e:?}"))?;
                let _ = body.flow_control().release_capacity(chunk.len());
            }
            let trailers = body
                .trailers()
                .await
                .map_err(|e| format!("trailers: {e:?}"))?;
            let status = trailers
                .as_ref()
                .and_then(|t| t.get("grpc-status"))
                .or_else(|| head.headers.get("grpc-status"))
                .map(|v| v.to_str().unwrap().to_string());
            return match status.as_deref() {
                Some("0") => Ok(()),
                other => Err(format!("grpc-status {other:?}")),
            };
        }
        Err("three connections refused the call".into())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_load_across_connection_age_rotations_has_no_failed_call() {
    let (backends, gw) = gateway_with("max_connection_age = \"300ms\"").await;
    let addr = gw.listener_addr("edge").unwrap();
    let total = [("listener", "edge")];
    // Four callers, each on its own rotating connection, call back to back for 2.5 s: about eight
    // rotations each, with calls in flight at every GOAWAY.
    let stop_at = tokio::time::Instant::now() + Duration::from_millis(2500);
    let mut tasks = Vec::new();
    for i in 0..4u8 {
        tasks.push(tokio::spawn(async move {
            let mut c = Rotating::connect(addr).await;
            let (mut ok, mut failed) = (0u32, Vec::new());
            let msg = EchoRequest {
                payload: vec![i; 100],
                delay_ms: 10 * u32::from(i),
                ..Default::default()
            };
            while tokio::time::Instant::now() < stop_at {
                match tokio::time::timeout(WAIT, c.unary(&msg)).await {
                    Ok(Ok(())) => ok += 1,
                    Ok(Err(e)) => failed.push(e),
                    Err(_) => failed.push("timed out".into()),
                }
            }
            (ok, failed, c.connections)
        }));
    }
    let (mut ok, mut failed, mut opened) = (0, Vec::new(), 0);
    for t in tasks {
        let (o, f, c) = bounded(t).await.unwrap();
        ok += o;
        failed.extend(f);
        opened += c;
    }
    let s = scrape(&gw).await;
    let connections = sample(&s, "grpcgate_downstream_connections_total", &total);
    let goaways = sample(&s, "grpcgate_downstream_goaways_total", &total);
    println!("{ok} calls over {opened} connections ({connections} accepted), {goaways} GOAWAYs; failed: {failed:?}");
    assert!(failed.is_empty(), "failed calls: {failed:?}");
    assert!(ok > 100, "only {ok} calls");
    assert!(
        opened >= 4 * 4,
        "the connections rotated only {opened} times"
    );
    assert!(goaways >= 12.0, "{goaways} GOAWAYs");
    // Every call reached the backend exactly once.
    let started: u64 = backends
        .iter()
        .map(|b| b.stats.started.load(std::sync::atomic::Ordering::SeqCst))
        .sum();
    assert_eq!(started, u64::from(ok));
}

/// The same with a tonic channel. tonic 0.12 on hyper 1.x loses a call sent on a connection that
/// has just received GOAWAY: hyper's dispatch task, woken by the new request, first sees the
/// connection refusing new streams and shuts down, dropping the request it has not taken
/// (`CANCELLED: operation was canceled`, hyper's `Canceled("connection closed")`), or, when the
/// GOAWAY lands between hyper's readiness check and its send, gets h2's refusal to open a stream
/// (`INTERNAL`), whatever the server does; grpc-go and grpc-java send such a call again. So this test sends again a call that
/// failed so, and checks that no such call had reached a backend (nothing was lost or duplicated
/// behind the client) and that nothing else failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tonic_channel_across_connection_age_rotations_loses_no_call_the_proxy_saw() {
    let (backends, gw) = gateway_with("max_connection_age = \"300ms\"").await;
    let addr = gw.listener_addr("edge").unwrap();
    let total = [("listener", "edge")];
    let client = client(addr).await;
    let stop_at = tokio::time::Instant::now() + Duration::from_millis(2500);
    let mut tasks = Vec::new();
    for i in 0..4u8 {
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut unsent, mut failed) = (0u32, 0u32, Vec::new());
            let msg = EchoRequest {
                payload: vec![i; 100],
                delay_ms: 10 * u32::from(i),
                ..Default::default()
            };
            while tokio::time::Instant::now() < stop_at {
                let mut attempts = 0;
                loop {
                    attempts += 1;
                    match tokio::time::timeout(WAIT, c.unary(msg.clone())).await {
                        Ok(Ok(_)) => ok += 1,
                        Ok(Err(s)) if unsent_in_client(&s) && attempts < 3 => {
                            unsent += 1;
                            if s.code() != tonic::Code::Cancelled {
                                eprintln!("sent again after {s:?}");
                            }
                            continue;
                        }
                        Ok(Err(s)) => failed.push(format!("{s:?}")),
                        Err(_) => failed.push("timed out".into()),
                    }
                    break;
                }
            }
            (ok, unsent, failed)
        }));
    }
    let (mut ok, mut unsent, mut failed) = (0, 0, Vec::new());
    for t in tasks {
        let (o, u, f) = bounded(t).await.unwrap();
        ok += o;
        unsent += u;
        failed.extend(f);
    }
    let s = scrape(&gw).await;
    let connections = sample(&s, "grpcgate_downstream_connections_total", &total);
    let goaways = sample(&s, "grpcgate_downstream_goaways_total", &total);
    println!(
        "{ok} calls over {connections} connections, {goaways} GOAWAYs; {unsent} lost in the client and sent again"
    );
    assert!(failed.is_empty(), "failed calls: {failed:?}");
    assert!(ok > 100, "only {ok} calls");
    assert!(
        connections >= 4.0,
        "the connection rotated only {connections} times"
    );
    // At most one per caller per rotation.
    assert!(
        f64::from(unsent) <= 4.0 * goaways,
        "{unsent} lost in {goaways} rotations"
    );
    let started: u64 = backends
        .iter()
        .map(|b| b.stats.started.load(std::sync::atomic::Ordering::SeqCst))
        .sum();
    assert_eq!(
        started,
        u64::from(ok),
        "a call lost in the client had reached a backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_gets_goaway_no_error_and_is_counted() {
    let (_backends, gw) = gateway_with("idle_timeout = \"200ms\"").await;
    let addr = gw.listener_addr("edge").unwrap();
    let mut raw = raw_h2::RawConn::connect(addr).await;
    let started = tokio::time::Instant::now();
    let (goaway, _) = raw
        .until(|e| match e {
            raw_h2::Event::GoAway {
                last_stream, code, ..
            } => Some((*last_stream, *code)),
            _ => None,
        })
        .await;
    assert_eq!(goaway, (0x7fff_ffff, 0));
    assert!(started.elapsed() >= Duration::from_millis(180));
    raw.until(|e| matches!(e, raw_h2::Event::Closed).then_some(()))
        .await;
    let labels = [("listener", "edge"), ("reason", "idle")];
    let s = wait_sample(
        &gw,
        "grpcgate_downstream_connections_closed_total",
        &labels,
        1.0,
    )
    .await;
    assert_eq!(
        sample(
            &s,
            "grpcgate_downstream_goaways_total",
            &[("listener", "edge")]
        ),
        1.0
    );
}

// ---------------------------------------------------------------------------------------------------
// Keepalive
// ---------------------------------------------------------------------------------------------------

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_answering_pings_is_closed() {
    let (_backends, gw) =
        gateway_with("keepalive_interval = \"200ms\"\nkeepalive_timeout = \"200ms\"").await;
    let addr = gw.listener_addr("edge").unwrap();

    // A client that sent its preface, SETTINGS and the ACK of ours, then went silent: it never reads
    // and so never answers a PING (its kernel still acknowledges the bytes).
    let mut dead = bounded(TcpStream::connect(addr)).await.unwrap();
    dead.write_all(PREFACE).await.unwrap();
    dead.write_all(&raw_h2::frame(raw_h2::SETTINGS, 0, 0, &[]))
        .await
        .unwrap();
    dead.write_all(&raw_h2::frame(raw_h2::SETTINGS, raw_h2::ACK, 0, &[]))
        .await
        .unwrap();
    let started = tokio::time::Instant::now();

    // Beside it, a tonic client (h2 answers PINGs) with calls now and then stays on one connection.
    let mut live = client(addr).await;
    for _ in 0..6 {
        bounded(live.unary(EchoRequest::default())).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }

    // Closed by keepalive: interval + timeout = 400 ms after the handshake (idle_timeout is 300 s).
    let labels = [("listener", "edge"), ("reason", "keepalive")];
    wait_sample(
        &gw,
        "grpcgate_downstream_connections_closed_total",
        &labels,
        1.0,
    )
    .await;
    let at = started.elapsed();
    assert!(at >= Duration::from_millis(350), "closed at {at:?}");
    closed_within(&mut dead, WAIT).await.unwrap();
    // The live client's connection is the same one throughout.
    let s = scrape(&gw).await;
    assert_eq!(
        sample(
            &s,
            "grpcgate_downstream_connections_total",
            &[("listener", "edge")]
        ),
        2.0
    );
    bounded(live.unary(EchoRequest::default())).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_closes_the_silent_peer_in_interval_plus_timeout() {
    let (_backends, gw) =
        gateway_with("keepalive_interval = \"300ms\"\nkeepalive_timeout = \"200ms\"").await;
    let addr = gw.listener_addr("edge").unwrap();
    let mut dead = bounded(TcpStream::connect(addr)).await.unwrap();
    let mut hello = PREFACE.to_vec();
    hello.extend(raw_h2::frame(raw_h2::SETTINGS, 0, 0, &[]));
    hello.extend(raw_h2::frame(raw_h2::SETTINGS, raw_h2::ACK, 0, &[]));
    dead.write_all(&hello).await.unwrap();
    let started = tokio::time::Instant::now();
    // Reads what comes (SETTINGS, the PING) but answers nothing.
    let mut pings = 0;
    let closed = tokio::time::timeout(WAIT, async {
        let mut head = [0u8; 9];
        loop {
            if dead.read_exact(&mut head).await.is_err() {
                return;
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            if head[3] == raw_h2::PING && head[4] & raw_h2::ACK == 0 {
                pings += 1;
            }
            let mut payload = vec![0u8; len];
            if dead.read_exact(&mut payload).await.is_err() {
                return;
            }
        }
    })
    .await;
    let at = started.elapsed();
    assert!(closed.is_ok(), "not closed");
    assert_eq!(pings, 1);
    assert!(
        at >= Duration::from_millis(450) && at < Duration::from_millis(3000),
        "closed at {at:?}"
    );
}

// ---------------------------------------------------------------------------------------------------
// PROXY protocol and x-forwarded-for
// ---------------------------------------------------------------------------------------------------

fn proxy_v2(cmd: u8, family: u8, block: &[u8]) -> Vec<u8> {
    let mut v = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    v.push(0x20 | cmd);
    v.push(family);
    v.extend_from_slice(&(block.len() as u16).to_be_bytes());
    v.extend_from_slice(block);
    v
}

fn proxy_v2_tcp4(src: [u8; 4], port: u16) -> Vec<u8> {
    let mut block = src.to_vec();
    block.extend_from_slice(&[10, 0, 0, 1]);
    block.extend_from_slice(&port.to_be_bytes());
    block.extend_from_slice(&443u16.to_be_bytes());
    proxy_v2(1, 0x11, &block)
}

fn proxy_v2_tcp6(src: &str, port: u16) -> Vec<u8> {
    let mut block = src.parse::<std::net::Ipv6Addr>().unwrap().octets().to_vec();
    block.extend_from_slice(
        &"2001:db8::1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    block.extend_from_slice(&port.to_be_bytes());
    block.extend_from_slice(&443u16.to_be_bytes());
    proxy_v2(1, 0x21, &block)
}

/// An h2 client over a connection that first sends `header`.
async fn h2_after(addr: SocketAddr, header: &[u8]) -> h2::client::SendRequest<bytes::Bytes> {
    let mut tcp = bounded(TcpStream::connect(addr)).await.unwrap();
    tcp.write_all(header).await.unwrap();
    let (client, conn) = bounded(h2::client::handshake(tcp))
        .await
        .expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// One unary call; the x-forwarded-for the backend saw (it echoes `x-*` metadata back in the response
/// headers).
async fn forwarded_for(
    client: &mut h2::client::SendRequest<bytes::Bytes>,
    addr: SocketAddr,
    sent: Option<&str>,
) -> Option<String> {
    let headers: Vec<(&str, &[u8])> = match sent {
        Some(v) => vec![("x-forwarded-for", v.as_bytes())],
        None => vec![],
    };
    let req = request(addr, "/echo.Echo/Unary", &headers);
    let ready = bounded(client.clone().ready()).await.expect("ready");
    let mut ready = ready;
    let (resp, mut send) = ready.send_request(req, false).expect("send");
    send.send_data(grpc_frame(&EchoRequest::default()), true)
        .unwrap();
    let resp = bounded(resp).await.expect("response");
    assert_eq!(resp.status(), 200);
    let values: Vec<String> = resp
        .headers()
        .get_all("x-forwarded-for")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    assert!(values.len() <= 1, "{values:?}");
    values.into_iter().next()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_v1_and_v2_addresses_reach_the_backend_in_x_forwarded_for() {
    let (_backends, gw) = gateway_with("proxy_protocol = true").await;
    let addr = gw.listener_addr("edge").unwrap();

    let mut v1 = h2_after(addr, b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 443\r\n").await;
    assert_eq!(
        forwarded_for(&mut v1, addr, None).await.as_deref(),
        Some("192.0.2.7")
    );
    // Appended to what the client sent, and again on the next call of the same connection.
    assert_eq!(
        forwarded_for(&mut v1, addr, Some("203.0.113.9"))
            .await
            .as_deref(),
        Some("203.0.113.9, 192.0.2.7")
    );
    assert_eq!(
        forwarded_for(&mut v1, addr, None).await.as_deref(),
        Some("192.0.2.7")
    );
    let mut v1_6 = h2_after(addr, b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 443\r\n").await;
    assert_eq!(
        forwarded_for(&mut v1_6, addr, None).await.as_deref(),
        Some("2001:db8::7")
    );
    let mut v2 = h2_after(addr, &proxy_v2_tcp4([198, 51, 100, 23], 50000)).await;
    assert_eq!(
        forwarded_for(&mut v2, addr, None).await.as_deref(),
        Some("198.51.100.23")
    );
    let mut v2_6 = h2_after(addr, &proxy_v2_tcp6("2001:db8::42", 50000)).await;
    assert_eq!(
        forwarded_for(&mut v2_6, addr, None).await.as_deref(),
        Some("2001:db8::42")
    );
    // LOCAL (an NLB health check): accepted, the socket's peer is the client.
    let mut local = h2_after(addr, &proxy_v2(0, 0, &[])).await;
    assert_eq!(
        forwarded_for(&mut local, addr, None).await.as_deref(),
        Some("127.0.0.1")
    );

    // An NLB TCP health check: LOCAL, then closed. Routine: counted as the client's close, not as
    // a failed handshake.
    let mut check = bounded(TcpStream::connect(addr)).await.unwrap();
    check.write_all(&proxy_v2(0, 0, &[])).await.unwrap();
    drop(check);
    let labels = [("listener", "edge"), ("reason", "client")];
    wait_sample(
        &gw,
        "grpcgate_downstream_connections_closed_total",
        &labels,
        1.0,
    )
    .await;

    // Without a header: closed before any HTTP/2 is read, no call through.
    let mut raw = raw_h2::RawConn::connect(addr).await;
    raw.send(raw_h2::unary_call(1, b"x", 0));
    let (_, seen) = raw
        .until(|e| matches!(e, raw_h2::Event::Closed).then_some(()))
        .await;
    assert!(
        seen.iter().all(|e| matches!(e, raw_h2::Event::Closed)),
        "the server answered HTTP/2: {seen:?}"
    );
    // A garbled header too.
    let mut bad = bounded(TcpStream::connect(addr)).await.unwrap();
    bad.write_all(b"PROXY TCP4 192.0.2.7 nonsense 1 2\r\n")
        .await
        .unwrap();
    closed_within(&mut bad, WAIT).await.unwrap();
    let labels = [("listener", "edge")];
    wait_sample(&gw, "grpcgate_proxy_protocol_rejected_total", &labels, 2.0).await;
    let s = scrape(&gw).await;
    assert_eq!(
        sample(
            &s,
            "grpcgate_downstream_connections_closed_total",
            &[("listener", "edge"), ("reason", "proxy_protocol")]
        ),
        2.0
    );
    assert_eq!(
        sample(
            &s,
            "grpcgate_downstream_connections_closed_total",
            &[("listener", "edge"), ("reason", "handshake")]
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_for_is_the_socket_peer_without_proxy_protocol_and_can_be_turned_off() {
    let (_backends, gw) = gateway_with("").await;
    let addr = gw.listener_addr("edge").unwrap();
    let mut c = h2_after(addr, b"").await;
    assert_eq!(
        forwarded_for(&mut c, addr, None).await.as_deref(),
        Some("127.0.0.1")
    );
    assert_eq!(
        forwarded_for(&mut c, addr, Some("10.1.2.3, 10.4.5.6"))
            .await
            .as_deref(),
        Some("10.1.2.3, 10.4.5.6, 127.0.0.1")
    );

    let (_backends, gw) = gateway_with("x_forwarded_for = false").await;
    let addr = gw.listener_addr("edge").unwrap();
    let mut c = h2_after(addr, b"").await;
    assert_eq!(forwarded_for(&mut c, addr, None).await, None);
    assert_eq!(
        forwarded_for(&mut c, addr, Some("10.1.2.3"))
            .await
            .as_deref(),
        Some("10.1.2.3")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_proxy_header_is_closed_after_the_handshake_timeout_while_others_are_served() {
    let (_backends, gw) =
        gateway_with("proxy_protocol = true\nhandshake_timeout = \"300ms\"").await;
    let addr = gw.listener_addr("edge").unwrap();
    let started = tokio::time::Instant::now();
    // Half a v2 header, then nothing; and nothing at all.
    let mut half = bounded(TcpStream::connect(addr)).await.unwrap();
    half.write_all(&proxy_v2_tcp4([192, 0, 2, 1], 1)[..14])
        .await
        .unwrap();
    let mut silent = bounded(TcpStream::connect(addr)).await.unwrap();
    // Meanwhile a client with a header is served.
    let mut good = h2_after(addr, &proxy_v2_tcp4([192, 0, 2, 2], 2)).await;
    assert_eq!(
        forwarded_for(&mut good, addr, None).await.as_deref(),
        Some("192.0.2.2")
    );
    for conn in [&mut half, &mut silent] {
        closed_within(conn, WAIT).await.unwrap();
    }
    let at = started.elapsed();
    assert!(at >= Duration::from_millis(280), "closed at {at:?}");
    let labels = [("listener", "edge"), ("reason", "handshake")];
    wait_sample(
        &gw,
        "grpcgate_downstream_connections_closed_total",
        &labels,
        2.0,
    )
    .await;
}

// ---------------------------------------------------------------------------------------------------
// Upstream keepalive
// ---------------------------------------------------------------------------------------------------

/// A TCP relay in front of a backend that can make every connection it carries go silent at once,
/// sockets left open: to the proxy, a backend that vanished without a FIN. Connections opened after
/// a freeze are relayed normally.
struct Relay {
    addr: SocketAddr,
    freeze: tokio::sync::watch::Sender<u64>,
}

impl Relay {
    async fn start(to: SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (freeze, rx) = tokio::sync::watch::channel(0u64);
        tokio::spawn(async move {
            while let Ok((mut a, _)) = listener.accept().await {
                let mut frozen = rx.clone();
                let generation = *frozen.borrow();
                tokio::spawn(async move {
                    let Ok(mut b) = TcpStream::connect(to).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                        _ = async { frozen.wait_for(|g| *g > generation).await.is_ok() } => {
                            // Hold both sockets open and relay nothing, for as long as the test runs.
                            std::future::pending::<()>().await;
                        }
                    }
                });
            }
        });
        Relay { addr, freeze }
    }

    fn freeze(&self) {
        self.freeze.send_modify(|g| *g += 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_keepalive_drops_a_connection_to_a_backend_that_went_silent() {
    let backends = backends(1).await;
    let relay = Relay::start(backends[0].addr).await;
    let text = config_text(
        &[relay.addr],
        "round_robin",
        "",
        "keepalive_interval = \"200ms\"\nkeepalive_timeout = \"200ms\"",
    );
    let gw = start(&text).await;
    let mut client = edge_client(&gw).await;
    let connections = |gw: &grpcgate::Gateway| gw.clusters()[0].endpoints[0].pool.connections();

    bounded(client.unary(EchoRequest::default())).await.unwrap();
    assert_eq!(connections(&gw), 1);
    // Several keepalive rounds pass on a live connection: it stays.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(connections(&gw), 1, "a live connection was dropped");
    bounded(client.unary(EchoRequest::default())).await.unwrap();

    // A call in flight when the backend goes silent fails within interval + timeout (400 ms), not
    // at its own 5 s; the connection leaves the pool.
    let mut c = client.clone();
    let slow = tokio::spawn(async move {
        c.unary(EchoRequest {
            delay_ms: 5000,
            ..Default::default()
        })
        .await
    });
    bounded(async {
        while backends[0]
            .stats
            .started
            .load(std::sync::atomic::Ordering::SeqCst)
            < 3
        {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let frozen_at = tokio::time::Instant::now();
    relay.freeze();
    let r = bounded(slow).await.unwrap();
    let failed_after = frozen_at.elapsed();
    let status = r.expect_err("the call on the silent connection must fail");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        failed_after < Duration::from_millis(2500),
        "failed after {failed_after:?}"
    );
    assert_eq!(connections(&gw), 0);
    // The next call opens a new connection (the relay carries new connections) and succeeds.
    bounded(client.unary(EchoRequest::default())).await.unwrap();
    assert_eq!(connections(&gw), 1);
    println!("the call on the silent connection failed after {failed_after:?}");
}
