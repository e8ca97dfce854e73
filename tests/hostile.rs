//! Hostile clients (issue 17): what one client connection can send must not cost the proxy its memory,
//! nor other clients their calls. Real echo backends, the real gateway, raw h2 clients doing the
//! abuse and a well-behaved tonic client beside them.

mod common;
#[path = "common/raw_h2.rs"]
mod raw_h2;

use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use common::hostile::*;
use common::*;
use grpcgate::pb::echo::EchoRequest;
use tonic::Code;

// ---------------------------------------------------------------------------------------------------
// Item 1: a header value the proxy cannot parse is answered, not forwarded.
// ---------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unparsable_grpc_timeout_and_binary_metadata_are_answered_not_forwarded() {
    let backends = backends(1).await;
    let gw = gateway_for(&backends).await;
    let addr = gw.listener_addr("edge").unwrap();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let steady = steady_client(addr, stop);

    let mut raw = raw_client(addr, h2::client::Builder::new()).await;
    let msg = EchoRequest {
        payload: b"x".to_vec(),
        ..Default::default()
    };
    let bad: &[(&str, &[u8])] = &[
        ("grpc-timeout", b"1x"),
        ("grpc-timeout", b""),
        ("grpc-timeout", b"-1S"),
        ("grpc-timeout", b"123456789S"),
        ("x-trace-bin", b"not base64!"),
        ("x-trace-bin", b"A"),
    ];
    for _ in 0..3 {
        for &(name, value) in bad {
            let req = request(addr, "/echo.Echo/Unary", &[(name, value)]);
            let out = unary(&mut raw, req, &msg)
                .await
                .expect("answered on the stream");
            assert_eq!(out.http, 200, "{name}: {value:?}: {out:?}");
            assert_eq!(
                out.grpc_status.as_deref(),
                Some("13"),
                "{name}: {value:?} must be INTERNAL: {out:?}"
            );
            assert!(
                out.grpc_message.contains(name),
                "message names the header: {out:?}"
            );
        }
    }
    // The same connection goes on working, with a valid timeout and valid binary metadata.
    let req = request(
        addr,
        "/echo.Echo/Unary",
        &[("grpc-timeout", b"5S"), ("x-trace-bin", b"AAEC")],
    );
    let out = unary(&mut raw, req, &msg).await.expect("good call");
    assert_eq!(out.grpc_status.as_deref(), Some("0"), "{out:?}");

    stop_tx.send(true).unwrap();
    let (calls, failures) = bounded(steady).await.unwrap();
    assert!(calls > 0);
    assert!(failures.is_empty(), "steady client failed: {failures:?}");
    // Never forwarded: the backend saw the steady client's calls and the good one, nothing else.
    assert_eq!(backends[0].stats.started.load(SeqCst), u64::from(calls) + 1);
    let s = scrape(&gw).await;
    assert!(
        sample(
            &s,
            "grpcgate_requests_total",
            &[("grpc_status", "INTERNAL")]
        ) >= 18.0
    );
}

// ---------------------------------------------------------------------------------------------------
// Item 3: header lists over max_header_list_size are refused without costing the connection.
// ---------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hpack_bomb_and_oversized_headers_are_refused_and_the_connection_survives() {
    let backends = backends(1).await;
    let gw = gateway_for(&backends).await;
    let addr = gw.listener_addr("edge").unwrap();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let steady = steady_client(addr, stop);
    let mut raw = raw_client(addr, h2::client::Builder::new()).await;
    let msg = EchoRequest::default();

    let cpu_before = process_cpu();
    for round in 0..20 {
        // The bomb, built by hand: one 1000-byte value inserted in the HPACK table, then referenced
        // 16,000 times: a ~17 KB header block (HEADERS + CONTINUATION) that decodes to ~16 MB.
        // Beyond 4× the limit h2 stops decoding and closes the connection (ENHANCE_YOUR_CALM): that
        // is abuse, not a large request.
        let mut bomber = raw_h2::RawConn::connect(addr).await;
        // Literal with incremental indexing, new name "x-bomb", a 1000-byte value (its length is
        // an HPACK integer: 127 in the prefix, then 873 in two bytes).
        let mut bomb = vec![0x40, 6];
        bomb.extend_from_slice(b"x-bomb");
        bomb.extend_from_slice(&[0x7f, 0xe9, 0x06]);
        bomb.extend_from_slice(&[b'a'; 1000]);
        let mut block = raw_h2::unary_block(&[bomb]);
        block.extend(std::iter::repeat_n(0x80 | 62u8, 16_000));
        let (first, rest) = block.split_at(16_000);
        let mut frames = raw_h2::frame(raw_h2::HEADERS, 0, 1, first);
        frames.extend(raw_h2::frame(0x9, raw_h2::END_HEADERS, 1, rest));
        bomber.send(frames);
        let (code, _) = bomber
            .until(|ev| match ev {
                raw_h2::Event::GoAway { code, .. } => Some(Some(*code)),
                raw_h2::Event::Closed => Some(None),
                raw_h2::Event::Headers { .. } => panic!("round {round}: the bomb was answered"),
                _ => None,
            })
            .await;
        // GOAWAY(ENHANCE_YOUR_CALM), or the socket closed before the client read it.
        assert!(
            code.is_none_or(|c| c == raw_h2::ENHANCE_YOUR_CALM),
            "round {round}: GOAWAY code {code:?}"
        );
        // Over the limit but not abusive (20 KiB in two frames): refused with 431, and the
        // connection lives on.
        let big = vec![b'b'; 20 * 1024];
        let req = request(addr, "/echo.Echo/Unary", &[("x-big", &big)]);
        match unary(&mut raw, req, &msg).await {
            Ok(out) => assert_eq!(out.http, 431, "round {round}: {out:?}"),
            Err(e) => assert!(e.is_reset() && !e.is_go_away(), "round {round}: {e:?}"),
        }
    }
    let cpu = process_cpu() - cpu_before;
    println!("20 bombs and 20 over-limit requests cost {cpu:?} of process CPU");

    // Headers just under the limit still go through, on the same connection.
    let fits = vec![b'c'; 8 * 1024];
    let req = request(addr, "/echo.Echo/Unary", &[("x-fits", &fits)]);
    let out = unary(&mut raw, req, &msg)
        .await
        .expect("connection survived");
    assert_eq!(out.grpc_status.as_deref(), Some("0"), "{out:?}");

    stop_tx.send(true).unwrap();
    let (calls, failures) = bounded(steady).await.unwrap();
    assert!(failures.is_empty(), "steady client failed: {failures:?}");
    // Nothing over the limit was forwarded: the backend saw the steady calls and the one that fit.
    assert_eq!(
        backends[0].stats.started.load(SeqCst),
        u64::from(calls) + 1,
        "nothing over the limit forwarded"
    );
}

// ---------------------------------------------------------------------------------------------------
// Item 5: connections that stall are closed.
// ---------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_half_header_connections_are_closed_after_the_idle_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backends = backends(1).await;
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let text = with_listener_keys(
        &config_text(&addrs, "round_robin", "", ""),
        "idle_timeout = \"300ms\"",
    );
    let gw = start(&text).await;
    let addr = gw.listener_addr("edge").unwrap();

    const SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    // (a) preface and SETTINGS, then nothing.
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    silent.write_all(preface).await.unwrap();
    silent.write_all(SETTINGS).await.unwrap();
    // (b) a HEADERS frame without END_HEADERS (a header block that never ends), then nothing.
    let mut half = tokio::net::TcpStream::connect(addr).await.unwrap();
    half.write_all(preface).await.unwrap();
    half.write_all(SETTINGS).await.unwrap();
    let block = [0x83u8, 0x86]; // :method POST, :scheme http
    let mut frame = vec![
        0,
        0,
        block.len() as u8,
        1,
        0x0, /* no END_HEADERS */
        0,
        0,
        0,
        1,
    ];
    frame.extend_from_slice(&block);
    half.write_all(&frame).await.unwrap();

    // Both are closed by the proxy: reads reach EOF (or a reset) within idle + grace, well within WAIT.
    for (what, conn) in [("silent", &mut silent), ("half header block", &mut half)] {
        let closed = tokio::time::timeout(WAIT, async {
            let mut buf = [0u8; 4096];
            loop {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {} // SETTINGS, its ACK, GOAWAY
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "{what} connection was not closed");
    }

    // A connection with a call in flight is not idle: a 1 s call outlives the 300 ms idle timeout.
    let mut client = edge_client(&gw).await;
    let r = bounded(client.unary(EchoRequest {
        delay_ms: 1000,
        ..Default::default()
    }))
    .await;
    assert!(r.is_ok(), "{r:?}");
    // Once closed for idleness, the client reconnects transparently.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let r = bounded(client.unary(EchoRequest::default())).await;
    assert!(r.is_ok(), "{r:?}");
}

// ---------------------------------------------------------------------------------------------------
// Item 8: a cluster's cap on calls in flight.
// ---------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_requests_caps_a_clusters_calls_in_flight() {
    let backends = backends(2).await;
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let gw = start(&config_text(&addrs, "round_robin", "", "max_requests = 10")).await;
    let addr = gw.listener_addr("edge").unwrap();

    // One connection starts 40 slow calls: 10 run, 30 are refused at once.
    let edge = edge_client(&gw).await;
    let mut calls = Vec::new();
    for _ in 0..40 {
        let mut c = edge.clone();
        calls.push(tokio::spawn(async move {
            c.unary(EchoRequest {
                delay_ms: 1500,
                ..Default::default()
            })
            .await
        }));
    }
    let mut ok = 0;
    let mut exhausted = 0;
    for c in calls {
        match bounded(c).await.unwrap() {
            Ok(_) => ok += 1,
            Err(s) if s.code() == Code::ResourceExhausted => {
                assert!(s.message().contains("max_requests"), "{}", s.message());
                exhausted += 1
            }
            Err(s) => panic!("unexpected {s:?}"),
        }
    }
    assert_eq!((ok, exhausted), (10, 30));
    let started: u64 = backends.iter().map(|b| b.stats.started.load(SeqCst)).sum();
    assert_eq!(started, 10);
    let s = scrape(&gw).await;
    assert_eq!(
        sample(
            &s,
            "grpcgate_cluster_overflow_total",
            &[("cluster", "echo")]
        ),
        30.0
    );
    // Under the cap again, calls go through.
    let mut c = client(addr).await;
    assert!(bounded(c.unary(EchoRequest::default())).await.is_ok());
}
