//! `peak_ewma` (issue 21): the latency signal survives low concurrency, where in-flight counts do not.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use grpcgate::balancer::Cluster;
use grpcgate::echo::EchoBackend;
use grpcgate::metrics::Metrics;
use grpcgate::pb::echo::EchoRequest;
use tokio::time::Instant;

/// A `peak_ewma` cluster over `n` endpoints (addresses only: picks never connect).
fn cluster(n: usize) -> Cluster {
    let addrs: Vec<SocketAddr> = (0..n)
        .map(|i| format!("127.0.0.1:{}", 1 + i).parse().unwrap())
        .collect();
    let config = parse(&config_text(&addrs, "peak_ewma", "", ""));
    Cluster::new(&config.clusters[0], &Metrics::new())
}

/// Picks per endpoint over `n` picks (nothing in flight: the sidecar case).
fn spread(c: &Cluster, n: usize) -> Vec<usize> {
    let mut counts = vec![0; c.endpoints.len()];
    for _ in 0..n {
        counts[c.pick().expect("an endpoint")] += 1;
    }
    counts
}

/// Feeds `latency` to endpoints `which` at the paused clock's now.
fn observe(c: &Cluster, which: &[usize], latency: Duration) {
    for &i in which {
        c.endpoints[i].latency.observe(latency, Instant::now());
    }
}

/// Equal latencies: P2C breaks ties evenly. The pick's random draws are seeded (the test runs on one
/// thread), so the counts are the same on every run.
#[tokio::test(start_paused = true)]
async fn equal_backends_still_spread_evenly() {
    fastrand::seed(21);
    let c = cluster(3);
    observe(&c, &[0, 1, 2], Duration::from_millis(5));
    let counts = spread(&c, 3000);
    eprintln!("{counts:?}");
    for n in &counts {
        assert!(n.abs_diff(1000) < 100, "{counts:?}");
    }
    // Not vacuous: one slower endpoint and it is never picked.
    observe(&c, &[2], Duration::from_millis(6));
    assert_eq!(spread(&c, 3000)[2], 0);
}

/// With the fast endpoints answering every 100 ms at 10 ms, a 100 ms endpoint is left alone until its
/// estimate decays below theirs (100 × e^(-t / 10 s) < 10: after 23 s), then tried again; one slow
/// answer and it is a peak again.
#[tokio::test(start_paused = true)]
async fn a_slow_endpoint_is_tried_again_once_its_estimate_has_decayed() {
    fastrand::seed(7);
    let c = cluster(3);
    observe(&c, &[0], Duration::from_millis(100));
    observe(&c, &[1, 2], Duration::from_millis(10));
    let mut first_retry = None;
    for step in 1..=300u32 {
        tokio::time::advance(Duration::from_millis(100)).await;
        observe(&c, &[1, 2], Duration::from_millis(10));
        let picked = spread(&c, 30)[0];
        if picked > 0 {
            first_retry = Some(step);
            break;
        }
    }
    let step = first_retry.expect("the slow endpoint was never tried again");
    // ln(10) × 10 s = 23.03 s: the first 100 ms step past it.
    assert_eq!(step, 231, "tried again after {} ms", step * 100);
    // Past that point it wins every comparison it is drawn into: about 2/3 of the picks.
    let counts = spread(&c, 3000);
    assert!(counts[0] > 1700, "{counts:?}");
    // It answers slowly again: back to no calls.
    observe(&c, &[0], Duration::from_millis(100));
    assert_eq!(spread(&c, 3000)[0], 0);
}

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
