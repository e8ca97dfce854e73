//! The access log (issue 22): one JSON line per call, the client's address PROXY-aware, status,
//! bytes, cluster and endpoint right for forwarded and proxy-answered calls, SIGHUP-style reloads
//! (a new path, a reopened file), and a slow reader that never stalls calls. Real echo backends, the
//! real gateway, tonic and h2 clients, a real named pipe.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::hostile::*;
use common::*;
use grpcgate::echo::EchoBackend;
use grpcgate::pb::echo::EchoRequest;
use prost::Message;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// A config with an "edge" listener (`listener_keys` added) whose routes send `echo.Echo` to cluster
/// "echo" over `backend` and `dead.Dead` to cluster "dead" (a port nothing listens on); any other
/// service has no route. `access_log` is the `[access_log]` table's body, or None for no table.
fn config(
    backend: SocketAddr,
    dead: SocketAddr,
    listener_keys: &str,
    cluster_keys: &str,
    access_log: Option<&str>,
) -> String {
    let log = access_log.map_or(String::new(), |a| format!("[access_log]\n{a}\n"));
    format!(
        r#"
workers = 2

[admin]
listen = "127.0.0.1:0"

{log}
[[listeners]]
name = "edge"
listen = "127.0.0.1:0"
{listener_keys}

[[listeners.routes]]
service = "echo.Echo"
cluster = "echo"

[[listeners.routes]]
service = "dead.Dead"
cluster = "dead"

[[clusters]]
name = "echo"
balancer = "round_robin"
endpoints = ["{backend}"]
{cluster_keys}

[[clusters]]
name = "dead"
endpoints = ["{dead}"]
"#
    )
}

/// The `[access_log]` body for a file.
fn to_file(path: &Path) -> String {
    format!("path = {:?}", path.to_str().unwrap())
}

/// Reads the log file until it has at least `n` lines (each must parse as JSON); bounded by [`WAIT`].
async fn lines_in(path: &Path, n: usize) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        // Only whole lines: the writer may be mid-write.
        let complete = text.rfind('\n').map_or("", |i| &text[..=i]);
        let lines: Vec<Value> = complete
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
            .collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} has {} lines, want {n}: {text}",
            path.display(),
            lines.len()
        );
        // The writer drains its queue every 50 ms; there is no event to wait on in a file.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The only line with this path and grpc_status.
fn line<'a>(lines: &'a [Value], path: &str, status: u64) -> &'a Value {
    let found: Vec<_> = lines
        .iter()
        .filter(|l| l["path"] == path && l["grpc_status"] == status)
        .collect();
    assert_eq!(found.len(), 1, "lines with {path} {status}: {lines:#?}");
    found[0]
}

/// The bytes a message takes on the wire in a gRPC call: 5 bytes of prefix and the message.
fn wire(m: &impl Message) -> u64 {
    5 + m.encoded_len() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_and_proxy_answered_calls_are_logged_with_status_bytes_cluster_and_endpoint() {
    let backend = EchoBackend::start("b0", Duration::ZERO).await.unwrap();
    let (_dead_socket, dead) = dead_endpoint();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let gw = start(&config(
        backend.addr,
        dead,
        "",
        "max_requests = 1",
        Some(&to_file(&log)),
    ))
    .await;
    let addr = gw.listener_addr("edge").unwrap();
    let mut c = client(addr).await;

    // Unary, OK.
    let req = EchoRequest {
        payload: vec![7; 100],
        ..Default::default()
    };
    let resp = bounded(c.unary(req.clone())).await.unwrap().into_inner();
    let unary_bytes = (wire(&req), wire(&resp));
    // Unary, failed by the backend (trailers-only: no response message).
    let failing = EchoRequest {
        fail_code: 5,
        fail_message: "nope".into(),
        ..Default::default()
    };
    let status = bounded(c.unary(failing.clone())).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    // Server streaming: three messages.
    let req3 = EchoRequest {
        payload: vec![1; 10],
        count: 3,
        ..Default::default()
    };
    let mut stream = bounded(c.server_stream(req3.clone()))
        .await
        .unwrap()
        .into_inner();
    let mut streamed = 0;
    while let Some(m) = bounded(stream.message()).await.unwrap() {
        streamed += wire(&m);
    }
    // Client streaming: four messages up.
    let ups: Vec<EchoRequest> = (0..4)
        .map(|i| EchoRequest {
            payload: vec![i; 1000],
            ..Default::default()
        })
        .collect();
    let up_bytes: u64 = ups.iter().map(wire).sum();
    let summary = bounded(c.client_stream(tokio_stream::iter(ups)))
        .await
        .unwrap()
        .into_inner();

    // Answered by the proxy: no route (UNIMPLEMENTED), a grpc-timeout it cannot read (INTERNAL),
    // the cluster's max_requests (RESOURCE_EXHAUSTED, while a slow call holds the one slot), and a
    // cluster whose only endpoint refuses connections (UNAVAILABLE).
    let mut raw = raw_client(addr, h2::client::Builder::new()).await;
    let mut status_of = async |path: &str, headers: &[(&str, &[u8])]| {
        let out = unary(&mut raw, request(addr, path, headers), &req)
            .await
            .unwrap();
        out.grpc_status.unwrap_or_default()
    };
    assert_eq!(status_of("/no.Such/Method", &[]).await, "12");
    assert_eq!(
        status_of("/echo.Echo/Unary", &[("grpc-timeout", b"soon")]).await,
        "13"
    );
    let slow = EchoRequest {
        delay_ms: 3_000,
        ..Default::default()
    };
    let mut slow_client = c.clone();
    let slow_call = tokio::spawn(async move { slow_client.bidi(tokio_stream::iter([slow])).await });
    bounded(backend.stats.wait_started(5)).await;
    assert_eq!(status_of("/echo.Echo/Unary", &[]).await, "8");
    assert_eq!(status_of("/dead.Dead/Call", &[]).await, "14");
    slow_call.abort();

    let lines = lines_in(&log, 8).await;
    let endpoint = backend.addr.to_string();
    let ok = line(&lines, "/echo.Echo/Unary", 0);
    assert_eq!(ok["listener"], "edge");
    assert_eq!(ok["client"], "127.0.0.1");
    assert!(ok["client_port"].as_u64().unwrap() > 0);
    assert_eq!(ok["authority"], addr.to_string());
    assert_eq!(ok["cluster"], "echo");
    assert_eq!(ok["endpoint"], endpoint);
    assert_eq!(ok["request_bytes"], unary_bytes.0);
    assert_eq!(ok["response_bytes"], unary_bytes.1);
    assert_eq!(ok["retries"], 0);
    assert!(ok["duration_us"].as_u64().is_some());
    let time = ok["time"].as_str().unwrap();
    assert!(
        time.len() == 24 && time.ends_with('Z') && time.as_bytes()[19] == b'.',
        "{time}"
    );

    let failed = line(&lines, "/echo.Echo/Unary", 5);
    assert_eq!(failed["endpoint"], endpoint);
    assert_eq!(failed["request_bytes"], wire(&failing));
    assert_eq!(failed["response_bytes"], 0);

    let ss = line(&lines, "/echo.Echo/ServerStream", 0);
    assert_eq!(ss["request_bytes"], wire(&req3));
    assert_eq!(ss["response_bytes"], streamed);
    assert_eq!(ss["endpoint"], endpoint);

    let cs = line(&lines, "/echo.Echo/ClientStream", 0);
    assert_eq!(cs["request_bytes"], up_bytes);
    assert_eq!(cs["response_bytes"], wire(&summary));

    let none = line(&lines, "/no.Such/Method", 12);
    assert!(
        none["cluster"].is_null() && none["endpoint"].is_null(),
        "{none}"
    );
    assert_eq!(none["listener"], "edge");
    assert_eq!(none["request_bytes"], 0);
    let bad_timeout = line(&lines, "/echo.Echo/Unary", 13);
    assert_eq!(bad_timeout["cluster"], "echo");
    assert!(bad_timeout["endpoint"].is_null());
    let exhausted = line(&lines, "/echo.Echo/Unary", 8);
    assert_eq!(exhausted["cluster"], "echo");
    assert!(exhausted["endpoint"].is_null());
    let unavailable = line(&lines, "/dead.Dead/Call", 14);
    assert_eq!(unavailable["cluster"], "dead");
    assert!(unavailable["endpoint"].is_null(), "{unavailable}");

    let s = scrape(&gw).await;
    assert_eq!(sample(&s, "grpcgate_access_log_dropped_total", &[]), 0.0);
    assert!(sample(&s, "grpcgate_access_log_lines_total", &[]) >= 8.0);
}

fn proxy_v2(family: u8, block: &[u8]) -> Vec<u8> {
    let mut v = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    v.push(0x21);
    v.push(family);
    v.extend_from_slice(&(block.len() as u16).to_be_bytes());
    v.extend_from_slice(block);
    v
}

/// One unary call over a new connection that first sends `header`, to `/echo.Echo/Unary` with
/// `:authority` set to `authority` (which tells the calls apart in the log).
async fn call_after_header(addr: SocketAddr, header: &[u8], authority: &str) {
    let mut tcp = bounded(TcpStream::connect(addr)).await.unwrap();
    tcp.write_all(header).await.unwrap();
    let (h2, conn) = bounded(h2::client::handshake(tcp)).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{authority}/echo.Echo/Unary"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let mut h2 = bounded(h2.ready()).await.unwrap();
    let (resp, mut send) = h2.send_request(req, false).unwrap();
    send.send_data(grpc_frame(&EchoRequest::default()), true)
        .unwrap();
    let resp = bounded(resp).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    while let Some(d) = bounded(body.data()).await {
        d.unwrap();
    }
    let trailers = bounded(body.trailers()).await.unwrap().unwrap();
    assert_eq!(trailers["grpc-status"], "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_v1_and_v2_clients_are_the_logged_client_address() {
    let backend = EchoBackend::start("b0", Duration::ZERO).await.unwrap();
    let (_dead_socket, dead) = dead_endpoint();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let gw = start(&config(
        backend.addr,
        dead,
        "proxy_protocol = true",
        "",
        Some(&to_file(&log)),
    ))
    .await;
    let addr = gw.listener_addr("edge").unwrap();

    call_after_header(
        addr,
        b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 443\r\n",
        "v1.test",
    )
    .await;
    call_after_header(
        addr,
        b"PROXY TCP6 2001:db8::7 2001:db8::1 40001 443\r\n",
        "v1-6.test",
    )
    .await;
    let mut v4 = vec![198, 51, 100, 23, 10, 0, 0, 1];
    v4.extend_from_slice(&50000u16.to_be_bytes());
    v4.extend_from_slice(&443u16.to_be_bytes());
    call_after_header(addr, &proxy_v2(0x11, &v4), "v2.test").await;
    let mut v6 = "2001:db8::42"
        .parse::<std::net::Ipv6Addr>()
        .unwrap()
        .octets()
        .to_vec();
    v6.extend_from_slice(&[0; 16]);
    v6.extend_from_slice(&50001u16.to_be_bytes());
    v6.extend_from_slice(&443u16.to_be_bytes());
    call_after_header(addr, &proxy_v2(0x21, &v6), "v2-6.test").await;

    let lines = lines_in(&log, 4).await;
    let by_authority = |a: &str| {
        lines
            .iter()
            .find(|l| l["authority"] == a)
            .unwrap_or_else(|| panic!("no line for {a}: {lines:#?}"))
    };
    for (authority, client, port) in [
        ("v1.test", "192.0.2.7", 40000),
        ("v1-6.test", "2001:db8::7", 40001),
        ("v2.test", "198.51.100.23", 50000),
        ("v2-6.test", "2001:db8::42", 50001),
    ] {
        let l = by_authority(authority);
        assert_eq!(l["client"], client, "{l}");
        assert_eq!(l["client_port"], port, "{l}");
        assert_eq!(l["grpc_status"], 0, "{l}");
        assert_eq!(l["endpoint"], backend.addr.to_string(), "{l}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_reopens_the_file_follows_a_new_path_and_can_turn_the_log_off() {
    let backend = EchoBackend::start("b0", Duration::ZERO).await.unwrap();
    let (_dead_socket, dead) = dead_endpoint();
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.log");
    let b = dir.path().join("b.log");
    let text = |log: Option<&Path>| config(backend.addr, dead, "", "", log.map(to_file).as_deref());
    let gw = start(&text(Some(&a))).await;
    let mut c = edge_client(&gw).await;
    let call = |c: &mut grpcgate::pb::echo::echo_client::EchoClient<_>, n: u32| {
        let req = EchoRequest {
            payload: n.to_be_bytes().to_vec(),
            ..Default::default()
        };
        let mut c = c.clone();
        async move { bounded(c.unary(req)).await.unwrap() }
    };
    call(&mut c, 1).await;
    assert_eq!(lines_in(&a, 1).await.len(), 1);

    // logrotate: the file is moved away, then SIGHUP (here: reload with the same config). The next
    // line goes to a new file at the path, none to the moved one.
    let rotated: PathBuf = dir.path().join("a.log.1");
    std::fs::rename(&a, &rotated).unwrap();
    gw.reload(parse(&text(Some(&a)))).unwrap();
    call(&mut c, 2).await;
    assert_eq!(lines_in(&a, 1).await.len(), 1);

    // A new path: lines go there.
    gw.reload(parse(&text(Some(&b)))).unwrap();
    call(&mut c, 3).await;
    assert_eq!(lines_in(&b, 1).await.len(), 1);

    // Off: no more lines anywhere. Then on again.
    gw.reload(parse(&text(None))).unwrap();
    call(&mut c, 4).await;
    gw.reload(parse(&text(Some(&b)))).unwrap();
    call(&mut c, 5).await;
    let b_lines = lines_in(&b, 2).await;
    assert_eq!(b_lines.len(), 2, "{b_lines:#?}");
    // Everything written, nothing twice: 1 line in a.log.1 and a.log each, 2 in b.log.
    assert_eq!(lines_in(&rotated, 1).await.len(), 1);
    assert_eq!(lines_in(&a, 1).await.len(), 1);
    let s = scrape(&gw).await;
    assert_eq!(sample(&s, "grpcgate_access_log_lines_total", &[]), 4.0);
    assert_eq!(sample(&s, "grpcgate_access_log_dropped_total", &[]), 0.0);
}

/// Reads lines from a pipe in the background and sends each (parsed) on.
fn read_lines(rx: tokio::net::unix::pipe::Receiver) -> tokio::sync::mpsc::UnboundedReceiver<Value> {
    let (tx, out) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut lines = BufReader::new(rx).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            let v: Value =
                serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}"));
            if tx.send(v).is_err() {
                return;
            }
        }
    });
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipe_nobody_reads_never_stalls_calls_and_lines_flow_again_once_it_is_read() {
    let backend = EchoBackend::start("b0", Duration::ZERO).await.unwrap();
    let (_dead_socket, dead) = dead_endpoint();
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("access.fifo");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    // The read end, opened (non-blocking) but not read yet.
    let reader = tokio::net::unix::pipe::OpenOptions::new()
        .open_receiver(&fifo)
        .unwrap();
    let gw = start(&config(
        backend.addr,
        dead,
        "",
        "",
        Some(&format!("{}\nqueue = 64", to_file(&fifo))),
    ))
    .await;
    let addr = gw.listener_addr("edge").unwrap();
    let dropped =
        |s: &prometheus_parse::Scrape| sample(s, "grpcgate_access_log_dropped_total", &[]);

    // Nobody reads: the pipe fills (64 KiB, a few hundred lines), the writer blocks on it, its
    // queue fills, and lines are dropped. Calls go on all the while, each as fast as ever.
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(client(addr).await);
    }
    let mut calls = 0u64;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut batch = tokio::task::JoinSet::new();
        for c in &clients {
            let mut c = c.clone();
            batch.spawn(async move {
                for _ in 0..50 {
                    // Each call bounded far below the test's wait: a stall would show here.
                    tokio::time::timeout(Duration::from_secs(2), c.unary(EchoRequest::default()))
                        .await
                        .expect("a call stalled behind the access log")
                        .expect("call failed");
                }
            });
        }
        while let Some(r) = batch.join_next().await {
            r.unwrap();
        }
        calls += 200;
        if dropped(&scrape(&gw).await) > 0.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no line dropped after {calls} calls"
        );
    }
    // Every call was counted, logged or not.
    let s = wait_settled(&gw, &[("OK", calls)]).await;
    let written = sample(&s, "grpcgate_access_log_lines_total", &[]);
    assert!(
        dropped(&s) > 0.0 && written < calls as f64,
        "{written} written of {calls}"
    );

    // The reader starts: what was queued comes out, then new calls' lines again.
    let mut lines = read_lines(reader);
    let mut c = clients[0].clone();
    let marker = EchoRequest {
        count: 2,
        ..Default::default()
    };
    let mut got = 0;
    bounded(async {
        loop {
            let mut s = c.server_stream(marker.clone()).await.unwrap().into_inner();
            while s.message().await.unwrap().is_some() {}
            // Lines that were in the pipe and the queue, then the marker's.
            let until = tokio::time::Instant::now() + Duration::from_millis(500);
            while let Ok(Some(l)) = tokio::time::timeout_at(until, lines.recv()).await {
                got += 1;
                if l["path"] == "/echo.Echo/ServerStream" {
                    return;
                }
            }
        }
    })
    .await;
    assert!(got > 1, "only {got} lines after the reader started");
    // Flowing again: the next calls' lines all arrive, none dropped. (Lines queued before the
    // marker's were written before it.)
    let before = dropped(&scrape(&gw).await);
    for i in 0..10u8 {
        let up = EchoRequest {
            payload: vec![i],
            ..Default::default()
        };
        bounded(c.client_stream(tokio_stream::iter([up])))
            .await
            .unwrap();
    }
    let mut seen = 0;
    while seen < 10 {
        let l = bounded(lines.recv()).await.expect("the pipe closed");
        // (A marker call whose line came after its 500 ms is the only other line possible.)
        if l["path"] == "/echo.Echo/ClientStream" {
            seen += 1;
        } else {
            assert_eq!(l["path"], "/echo.Echo/ServerStream", "{l}");
        }
    }
    assert_eq!(dropped(&scrape(&gw).await), before);
}

#[test]
fn access_log_config_errors_name_the_line_and_key() {
    let base = "[[listeners]]\nname = \"e\"\nlisten = \"127.0.0.1:0\"\n";
    let err = |extra: &str| {
        grpcgate::Config::parse(&format!("{base}{extra}"), "gw.toml", Path::new("."))
            .unwrap_err()
            .to_string()
    };
    let e = err("[access_log]\npath = \"-\"\nformat = \"json\"\n");
    assert!(
        e.starts_with("gw.toml:6:1: access_log") && e.contains("format"),
        "{e}"
    );
    let e = err("[access_log]\npath = \"\"\n");
    assert!(e.starts_with("gw.toml:5:8: access_log.path"), "{e}");
    // The directory is checked when the file is loaded (start, SIGHUP, --check), not by the pure
    // parser.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gw.toml");
    std::fs::write(
        &file,
        format!("{base}[access_log]\npath = \"/no/such/dir/access.log\"\n"),
    )
    .unwrap();
    let e = grpcgate::load::config_file(&file).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!("{}:5:8: access_log.path", file.display()))
            && e.contains("/no/such/dir"),
        "{e}"
    );
    std::fs::write(&file, format!("{base}[access_log]\npath = \".\"\n")).unwrap();
    let e = grpcgate::load::config_file(&file).unwrap_err().to_string();
    assert!(e.contains("is a directory"), "{e}");
    let e = err("[access_log]\npath = 5\n");
    assert!(e.contains("access_log.path"), "{e}");
    let e = err("[access_log]\nqueue = 0\n");
    assert!(e.contains("access_log.queue"), "{e}");
    // Absent: off; "-" and an empty table: standard output.
    let ok = |extra: &str| {
        grpcgate::Config::parse(&format!("{base}{extra}"), "gw.toml", Path::new("."))
            .unwrap()
            .access_log
    };
    assert!(ok("").is_none());
    assert_eq!(
        ok("[access_log]\npath = \"-\"\n").unwrap().target,
        grpcgate::config::AccessLogTarget::Stdout
    );
    assert_eq!(
        ok("[access_log]\n").unwrap().target,
        grpcgate::config::AccessLogTarget::Stdout
    );
}

/// An upstream that refuses every stream unprocessed (RST_STREAM `REFUSED_STREAM`).
async fn refuser() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((tcp, _)) = listener.accept().await {
            conns.spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_sent_again_after_a_refusal_logs_its_retries_and_its_bytes_once() {
    let backend = EchoBackend::start("b0", Duration::ZERO).await.unwrap();
    let (refuser, task) = refuser().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let text = format!(
        r#"
workers = 1

[access_log]
path = {path:?}

[[listeners]]
name = "edge"
listen = "127.0.0.1:0"

[[listeners.routes]]
cluster = "echo"

[[clusters]]
name = "echo"
balancer = "round_robin"
endpoints = ["{refuser}", "{backend}"]
"#,
        path = log.to_str().unwrap(),
        backend = backend.addr
    );
    let gw = start(&text).await;
    let mut c = edge_client(&gw).await;
    // A body of several messages: what reached the refuser is sent again whole, but counted once.
    let ups: Vec<EchoRequest> = (0..3)
        .map(|i| EchoRequest {
            payload: vec![i; 500],
            ..Default::default()
        })
        .collect();
    let want: u64 = ups.iter().map(wire).sum();
    for _ in 0..4 {
        bounded(c.client_stream(tokio_stream::iter(ups.clone())))
            .await
            .unwrap();
    }
    let lines = lines_in(&log, 4).await;
    let retries: Vec<u64> = lines
        .iter()
        .map(|l| l["retries"].as_u64().unwrap())
        .collect();
    // Round robin over the refuser and the backend: a call that went to the refuser first went to
    // the backend next.
    assert!(retries.contains(&1), "{retries:?}");
    for l in &lines {
        assert_eq!(l["grpc_status"], 0, "{l}");
        assert_eq!(l["endpoint"], backend.addr.to_string(), "{l}");
        assert_eq!(l["request_bytes"], want, "{l}");
    }
    task.abort();
}
