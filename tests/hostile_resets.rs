//! Issue 17 item 4: clients that reset streams. A client that cancels half its calls at once keeps its
//! connection and every call it did not cancel; a client that opens streams only to reset them (rapid
//! reset, CVE-2023-44487), batched or paced, gets GOAWAY(ENHANCE_YOUR_CALM) after a bounded number of
//! streams, and few of them reach the backend. The rule is h2's premature-reset limit as the listener
//! configures it (see `h2_handshake` in src/listener.rs).

mod common;
#[path = "common/raw_h2.rs"]
mod raw_h2;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{bounded, busy_endpoints, edge_client, eventually, start};
use grpcgate::echo::EchoBackend;
use grpcgate::pb::echo::EchoRequest;
use raw_h2::{Event, RawConn};

/// The listener's rule: at least 500 streams counted, at most half of them reset prematurely. A
/// client that only resets is cut off at the 251st reset.
const PREMATURE_LIMIT: u32 = 251;

/// One listener, as the default config will be (100 concurrent streams), in front of `backend`.
fn config(backend: &EchoBackend) -> String {
    format!(
        r#"
workers = 2

[admin]
listen = "127.0.0.1:0"

[[listeners]]
name = "edge"
listen = "127.0.0.1:0"
max_concurrent_streams = 100

[[listeners.routes]]
cluster = "echo"

[[clusters]]
name = "echo"
balancer = "round_robin"
endpoints = ["{}"]
"#,
        backend.addr
    )
}

fn request(i: usize, delay_ms: u32) -> EchoRequest {
    EchoRequest {
        payload: i.to_le_bytes().to_vec(),
        delay_ms,
        ..Default::default()
    }
}

/// Waits until the gateway has no call in flight to any backend.
async fn wait_idle(gw: &grpcgate::Gateway) {
    eventually(gw, |s| {
        let busy = busy_endpoints(s);
        if busy.is_empty() {
            Ok(())
        } else {
            Err(format!("in flight: {busy:?}"))
        }
    })
    .await;
}

/// (a) 2,000 calls in parallel on one connection, every other one cancelled as soon as it starts,
/// several rounds: no call that was not cancelled fails. Even rounds cancel every other call at once
/// once the first calls reach the backend (the grpcio pattern: a burst of RST_STREAM); odd rounds
/// drop each odd call's future after 0–7 scheduler turns, so its RST_STREAM follows its HEADERS at
/// once, often in the same read, before the proxy accepts the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_heavy_client_loses_no_call() {
    const CALLS: usize = 2_000;
    const ROUNDS: usize = 10;
    let backend = EchoBackend::start("b0", Duration::ZERO).await.unwrap();
    let gw = start(&config(&backend)).await;
    let client = edge_client(&gw).await;
    let mut report = Vec::new();
    for round in 0..ROUNDS {
        let started_before = backend.stats.started.load(Ordering::SeqCst);
        let mut keep = Vec::new();
        let mut cancel = Vec::new();
        for i in 0..CALLS {
            let mut c = client.clone();
            if i % 2 == 0 {
                keep.push(tokio::spawn(async move {
                    c.unary(request(i, 20)).await.map(|r| (i, r.into_inner()))
                }));
            } else if round % 2 == 0 {
                cancel.push(tokio::spawn(async move {
                    let _ = c.unary(request(i, 20)).await;
                }));
            } else {
                // Cancel timing is the test input here: the future is dropped after a few turns.
                let turns = (i / 2) % 8;
                tokio::spawn(async move {
                    let call = c.unary(request(i, 20));
                    tokio::pin!(call);
                    for _ in 0..turns {
                        if futures_poll_once(call.as_mut()).await {
                            return;
                        }
                        tokio::task::yield_now().await;
                    }
                });
            }
        }
        if round % 2 == 0 {
            bounded(backend.stats.wait_started(started_before + 50)).await;
            for h in &cancel {
                h.abort();
            }
        }
        let mut errors = Vec::new();
        for h in keep {
            match bounded(h).await.expect("task") {
                Ok((i, resp)) => assert_eq!(resp.payload, i.to_le_bytes().to_vec()),
                Err(status) => errors.push(status),
            }
        }
        let cancelled = backend.stats.cancelled.load(Ordering::SeqCst);
        report.push(format!(
            "round {round}: {} of {} kept calls failed (backend cancelled so far: {cancelled})",
            errors.len(),
            CALLS / 2
        ));
        assert!(
            errors.is_empty(),
            "round {round}: {} of {} calls not cancelled failed, first: {:?}",
            errors.len(),
            CALLS / 2,
            errors.first()
        );
    }
    // The connection survived every round: one more call on it works.
    let mut c = client.clone();
    bounded(c.unary(request(0, 0)))
        .await
        .expect("call after the rounds");
    println!("{}", report.join("\n"));
}

/// Polls `f` once; true if it completed.
async fn futures_poll_once<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> bool {
    let mut f = Some(f);
    std::future::poll_fn(move |cx| {
        let done = f.as_mut().unwrap().as_mut().poll(cx).is_ready();
        std::task::Poll::Ready(done)
    })
    .await
}

/// A tonic client making calls in a loop until stopped; returns (calls OK, errors).
fn steady_client(
    gw: &grpcgate::Gateway,
) -> (
    Arc<AtomicBool>,
    tokio::task::JoinHandle<(usize, Vec<tonic::Status>)>,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let addr = gw.listener_addr("edge").unwrap();
    let s = stop.clone();
    let task = tokio::spawn(async move {
        let mut c = common::client(addr).await;
        let (mut ok, mut errors) = (0, Vec::new());
        while !s.load(Ordering::SeqCst) || ok == 0 {
            match bounded(c.unary(request(ok, 0))).await {
                Ok(_) => ok += 1,
                Err(e) => errors.push(e),
            }
        }
        (ok, errors)
    });
    (stop, task)
}

/// Reads events until the GOAWAY and then the close; returns the GOAWAY's (last stream, code, debug).
async fn goaway_and_close(conn: &mut RawConn) -> (u32, u32, String) {
    let ((last, code, debug), _) = conn
        .until(|e| match e {
            Event::GoAway {
                last_stream,
                code,
                debug,
            } => Some((*last_stream, *code, debug.clone())),
            _ => None,
        })
        .await;
    conn.until(|e| matches!(e, Event::Closed).then_some(()))
        .await;
    (last, code, debug)
}

/// (b) Batched rapid reset: 5,000 × (HEADERS, DATA asking the backend to wait 10 s, RST_STREAM)
/// written in one go. GOAWAY(ENHANCE_YOUR_CALM) comes within the limit, at most that many calls reach
/// the backend, and a client on another connection sees no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_rapid_reset_is_cut_off() {
    const STREAMS: u32 = 5_000;
    let backend = EchoBackend::start("b0", Duration::ZERO).await.unwrap();
    let gw = start(&config(&backend)).await;
    let (stop, steady) = steady_client(&gw);

    let mut conn = RawConn::connect(gw.listener_addr("edge").unwrap()).await;
    let mut attack = Vec::new();
    for n in 0..STREAMS {
        let id = 2 * n + 1;
        attack.extend(raw_h2::unary_call(id, b"attack", 10_000));
        attack.extend(raw_h2::rst_stream(id, raw_h2::CANCEL));
    }
    conn.send(attack);
    let (last, code, debug) = goaway_and_close(&mut conn).await;
    let opened = last.div_ceil(2);
    stop.store(true, Ordering::SeqCst);
    let (ok, errors) = bounded(steady).await.unwrap();
    wait_idle(&gw).await;
    // The steady client's calls reached the same backend.
    let reached = backend.stats.started.load(Ordering::SeqCst) - (ok + errors.len()) as u64;
    println!(
        "batched rapid reset: GOAWAY({code:#x}, {debug:?}) last stream {last} ({opened} streams), \
         {reached} calls reached the backend; steady client: {ok} OK, {} errors",
        errors.len()
    );
    assert_eq!(code, raw_h2::ENHANCE_YOUR_CALM, "GOAWAY code ({debug})");
    assert_eq!(debug, "too_many_premature_resets");
    assert!(opened <= PREMATURE_LIMIT, "{opened} streams before GOAWAY");
    assert!(
        reached <= PREMATURE_LIMIT as u64,
        "{reached} calls reached the backend"
    );
    assert!(errors.is_empty(), "steady client errors: {errors:?}");
}

/// (c) Paced rapid reset: 10 HEADERS (+ DATA), 2 ms, their 10 RST_STREAM, again and again, up to
/// 20,000 streams. Cut off within the limit plus one batch, like the batched attack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paced_rapid_reset_is_cut_off() {
    const BATCH: u32 = 10;
    const MAX_STREAMS: u32 = 20_000;
    let backend = EchoBackend::start("b0", Duration::ZERO).await.unwrap();
    let gw = start(&config(&backend)).await;
    let (stop, steady) = steady_client(&gw);

    let mut conn = RawConn::connect(gw.listener_addr("edge").unwrap()).await;
    let mut next = 1u32;
    let mut sent = 0;
    let mut early = None;
    while sent < MAX_STREAMS {
        // Other frames (none expected before the GOAWAY) are skipped.
        if let Ok(ev @ (Event::GoAway { .. } | Event::Closed)) = conn.events.try_recv() {
            early = Some(ev);
            break;
        }
        let ids: Vec<u32> = (0..BATCH).map(|k| next + 2 * k).collect();
        next += 2 * BATCH;
        sent += BATCH;
        let mut opens = Vec::new();
        let mut resets = Vec::new();
        for &id in &ids {
            opens.extend(raw_h2::unary_call(id, b"attack", 10_000));
            resets.extend(raw_h2::rst_stream(id, raw_h2::CANCEL));
        }
        conn.send(opens);
        // The pacing is the attack's shape, not synchronisation.
        tokio::time::sleep(Duration::from_millis(2)).await;
        conn.send(resets);
    }
    let (last, code, debug) = match early {
        Some(Event::GoAway {
            last_stream,
            code,
            debug,
        }) => {
            conn.until(|e| matches!(e, Event::Closed).then_some(()))
                .await;
            (last_stream, code, debug)
        }
        Some(other) => panic!("connection ended without GOAWAY: {other:?}"),
        None => goaway_and_close(&mut conn).await,
    };
    let opened = last.div_ceil(2);
    stop.store(true, Ordering::SeqCst);
    let (ok, errors) = bounded(steady).await.unwrap();
    wait_idle(&gw).await;
    // The steady client's calls reached the same backend.
    let reached = backend.stats.started.load(Ordering::SeqCst) - (ok + errors.len()) as u64;
    println!(
        "paced rapid reset: {sent} streams sent; GOAWAY({code:#x}, {debug:?}) last stream {last} \
         ({opened} streams), {reached} calls reached the backend; steady client: {ok} OK, {} errors",
        errors.len()
    );
    assert_eq!(code, raw_h2::ENHANCE_YOUR_CALM, "GOAWAY code ({debug})");
    assert_eq!(debug, "too_many_premature_resets");
    assert!(
        opened <= PREMATURE_LIMIT + BATCH,
        "{opened} streams before GOAWAY"
    );
    assert!(
        reached <= (PREMATURE_LIMIT + BATCH) as u64,
        "{reached} calls reached the backend"
    );
    assert!(errors.is_empty(), "steady client errors: {errors:?}");
}
