//! `peak_ewma` (issue 21): the latency signal survives low concurrency, where in-flight counts do not.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use grpcgate::echo::EchoBackend;
use grpcgate::pb::echo::EchoRequest;

/// One caller, one call at a time: every endpoint has 0 calls in flight at each pick, so
/// `least_request` cannot tell a backend 20× slower from its peer (about half the calls each), while
/// `peak_ewma` ranks them by latency and sends the slow one only what its decay lets it re-try.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_ewma_avoids_a_slow_backend_with_one_call_at_a_time() {
    let fast = EchoBackend::start("fast", Duration::from_millis(5))
        .await
        .unwrap();
    let slow = EchoBackend::start("slow", Duration::from_millis(100))
        .await
        .unwrap();
    let mut shares = BTreeMap::new();
    for balancer in ["least_request", "peak_ewma"] {
        let gw = start(&config_text(&[fast.addr, slow.addr], balancer, "", "")).await;
        let mut client = edge_client(&gw).await;
        let mut counts = BTreeMap::<String, usize>::new();
        for _ in 0..60 {
            let r = bounded(client.unary(EchoRequest::default()))
                .await
                .expect("call")
                .into_inner();
            *counts.entry(r.backend).or_default() += 1;
        }
        eprintln!("{balancer}: {counts:?}");
        shares.insert(
            balancer,
            counts.get("slow").copied().unwrap_or(0) as f64 / 60.0,
        );
    }
    eprintln!("slow backend's share with one caller: {shares:?}");
    assert!(
        shares["least_request"] > 0.3,
        "least_request cannot see latency at one call in flight: {shares:?}"
    );
    assert!(
        shares["peak_ewma"] < 0.1,
        "peak_ewma should route around the slow backend: {shares:?}"
    );
}
