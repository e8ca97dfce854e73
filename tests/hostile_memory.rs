//! Hostile clients (issue 17, item 2): a client that reads nothing cannot make the proxy hold more
//! than its streams' windows. Alone in its test binary: it measures the process's resident memory,
//! which tests running beside it would disturb.

mod common;

// The allocator the grpcgate binary runs with (src/main.rs), so that the memory measured is what the
// proxy would hold. With glibc malloc the figure was bimodal under CPU contention: 37 MiB in most runs,
// 60-70 MiB in about one of five, as memory freed on one thread's arena was not reused by another's.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::time::Duration;

use common::hostile::*;
use common::*;
use grpcgate::pb::echo::EchoRequest;

// ---------------------------------------------------------------------------------------------------
// Item 2: a client that reads nothing cannot make the proxy hold more than its streams' windows.
// ---------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_holds_a_bounded_amount_of_memory() {
    let backends = backends(1).await;
    let gw = gateway_for(&backends).await;
    let addr = gw.listener_addr("edge").unwrap();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let steady = steady_client(addr, stop);

    // Window 0: the proxy may send this client no DATA at all.
    let mut builder = h2::client::Builder::new();
    builder.initial_window_size(0);
    let raw = raw_client(addr, builder).await;
    let before = rss_bytes();

    // 1,024 server streams of 4 MiB each (4,096 × 1 KiB); the proxy lets 100 run at once
    // (max_concurrent_streams), and the client's h2 queues the rest.
    let msg = EchoRequest {
        payload: vec![7u8; 1024],
        count: 4096,
        ..Default::default()
    };
    let mut held = Vec::new();
    let mut opened = 0;
    for _ in 0..1024 {
        let mut ready =
            match tokio::time::timeout(Duration::from_millis(500), raw.clone().ready()).await {
                Ok(r) => r.expect("ready"),
                // The proxy's stream limit is reached: the client cannot open more.
                Err(_) => break,
            };
        let (resp, mut send) = ready
            .send_request(request(addr, "/echo.Echo/ServerStream", &[]), false)
            .expect("send");
        if send.send_data(grpc_frame(&msg), true).is_err() {
            // Opened before the client's h2 had read the proxy's SETTINGS (max_concurrent_streams
            // 100) and refused (REFUSED_STREAM) at once: not one of the held streams.
            continue;
        }
        held.push(resp);
        opened += 1;
    }
    println!("streams sent: {opened}");

    // Memory grows while the upstream windows fill, then stops: wait for it to level off.
    let mut last = rss_bytes();
    let mut flat = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    while flat < 10 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = rss_bytes();
        if now <= last + 256 * 1024 {
            flat += 1;
        } else {
            flat = 0;
        }
        last = last.max(now);
    }
    let grown = last.saturating_sub(before);
    // The proxy let 100 run at once (max_concurrent_streams); the client's h2 queues the rest.
    let s = scrape(&gw).await;
    let in_flight = sample(&s, "grpcgate_endpoint_in_flight", &[("cluster", "echo")]);
    assert!(
        (1.0..=101.0).contains(&in_flight),
        "calls in flight: {in_flight} (100 stalled, the steady client's at most 1)"
    );
    println!(
        "RSS grew {:.1} MiB with {opened} stalled server streams",
        grown as f64 / (1 << 20) as f64
    );
    // The stated bound (README, "Limits"): 100 streams × 256 KiB of upstream window (25 MiB), plus
    // the frames' bookkeeping and what the backend itself buffers; 2.4 GB before.
    assert!(grown < 64 << 20, "RSS grew {} MiB", grown >> 20);

    stop_tx.send(true).unwrap();
    let (_, failures) = bounded(steady).await.unwrap();
    assert!(failures.is_empty(), "steady client failed: {failures:?}");
    drop(held);
}
