//! Health: active `grpc.health.v1` checks (poll and watch) against real tonic-health servers, passive
//! outlier ejection, what happens when nothing is healthy (and panic mode), and the proxy's own
//! `Health/Check` and `/ready`.
//!
//! These are real-network tests on loopback with short check intervals: every wait is a bounded poll
//! of the gateway's metrics (or state), with generous bounds so a loaded machine does not flake. The
//! ejection-timer test drives a cluster directly, without network.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicI32, AtomicU64};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};

use common::*;
use grpcgate::echo::EchoBackend;
use grpcgate::pb::echo::echo_client::EchoClient;
use grpcgate::pb::echo::EchoRequest;
use grpcgate::pb::health::health_check_response::ServingStatus as PbStatus;
use grpcgate::pb::health::health_client::HealthClient;
use grpcgate::pb::health::health_server::{Health, HealthServer};
use grpcgate::pb::health::{HealthCheckRequest, HealthCheckResponse};
use grpcgate::Gateway;
use prometheus_parse::Scrape;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};
use tonic_health::ServingStatus;

// ---------------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------------

/// A `[clusters.health_check]` table: thresholds 2 (unhealthy) and 1 (healthy), plus `extra` lines.
fn health_check(interval: &str, timeout: &str, extra: &str) -> String {
    format!(
        "[clusters.health_check]\ninterval = \"{interval}\"\ntimeout = \"{timeout}\"\n\
         unhealthy_threshold = 2\nhealthy_threshold = 1\n{extra}\n"
    )
}

fn addrs(backends: &[EchoBackend]) -> Vec<SocketAddr> {
    backends.iter().map(|b| b.addr).collect()
}

/// `grpcgate_endpoint_healthy` for an endpoint (endpoint addresses are unique within a test).
fn healthy(s: &Scrape, ep: SocketAddr) -> f64 {
    sample(
        s,
        "grpcgate_endpoint_healthy",
        &[("endpoint", &ep.to_string())],
    )
}

/// `grpcgate_health_checks_total{result}` for an endpoint.
fn checks(s: &Scrape, ep: SocketAddr, result: &str) -> f64 {
    sample(
        s,
        "grpcgate_health_checks_total",
        &[("endpoint", &ep.to_string()), ("result", result)],
    )
}

/// `grpcgate_outlier_ejections_total` for an endpoint.
fn ejections(s: &Scrape, ep: SocketAddr) -> f64 {
    sample(
        s,
        "grpcgate_outlier_ejections_total",
        &[("endpoint", &ep.to_string())],
    )
}

/// Scrapes the gateway until `check` accepts a scrape, for at most `bound`; returns that scrape and
/// how long it took. Panics with `what` and the last scrape's relevant lines if the bound passes.
async fn wait_for<F>(gw: &Gateway, bound: Duration, what: &str, check: F) -> (Scrape, Duration)
where
    F: Fn(&Scrape) -> bool,
{
    let start = Instant::now();
    loop {
        let s = scrape(gw).await;
        if check(&s) {
            return (s, start.elapsed());
        }
        if start.elapsed() >= bound {
            let (_, text) = http_get(gw.admin_addr().unwrap(), "/metrics").await;
            let relevant: Vec<&str> = text
                .lines()
                .filter(|l| {
                    l.starts_with("grpcgate_endpoint_healthy")
                        || l.starts_with("grpcgate_health_checks_total")
                        || l.starts_with("grpcgate_outlier_ejections_total")
                })
                .collect();
            panic!(
                "{what}: not reached within {bound:?}; metrics:\n{}",
                relevant.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits (bounded by [`WAIT`]) until every endpoint's healthy gauge is as given.
async fn wait_health(gw: &Gateway, eps: &[SocketAddr], want: &[bool]) -> Scrape {
    let what = format!("healthy gauges {eps:?} = {want:?}");
    wait_for(gw, WAIT, &what, |s| {
        eps.iter()
            .zip(want)
            .all(|(ep, up)| healthy(s, *ep) == f64::from(u8::from(*up)))
    })
    .await
    .0
}

/// One unary call through the proxy; the name of the backend that answered.
async fn call(c: &mut EchoClient<Channel>) -> Result<String, Status> {
    bounded(c.unary(EchoRequest {
        payload: b"health".to_vec(),
        ..Default::default()
    }))
    .await
    .map(|r| r.into_inner().backend)
}

/// `n` calls that must all succeed; how many each backend answered.
async fn spread(c: &mut EchoClient<Channel>, n: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for i in 0..n {
        let b = call(c)
            .await
            .unwrap_or_else(|e| panic!("call {i} of {n} failed: {e:?}"));
        *seen.entry(b).or_insert(0) += 1;
    }
    seen
}

/// A health client for the proxy's listener.
async fn proxy_health(gw: &Gateway) -> HealthClient<Channel> {
    let ch = tonic::transport::Endpoint::from_shared(format!(
        "http://{}",
        gw.listener_addr("edge").unwrap()
    ))
    .unwrap()
    .connect_timeout(WAIT)
    .connect()
    .await
    .expect("connect to proxy");
    HealthClient::new(ch)
}

/// `Health/Check(service)` against the proxy: the status, or the error.
async fn proxy_check(h: &mut HealthClient<Channel>, service: &str) -> Result<PbStatus, Status> {
    bounded(h.check(HealthCheckRequest {
        service: service.to_string(),
    }))
    .await
    .map(|r| PbStatus::try_from(r.into_inner().status).expect("a known status"))
}

/// A TCP listener that accepts connections and holds them open without ever writing a byte: a "dead"
/// server that still accepts connections. Stops when the returned handle is aborted.
async fn silent_listener() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    (addr, task)
}

/// A `grpc.health.v1.Health` server that implements only Check (Watch is UNIMPLEMENTED), answers with
/// a status the test sets, and counts what it answered.
#[derive(Clone, Default)]
struct CheckOnly {
    status: Arc<AtomicI32>,
    answered_serving: Arc<AtomicU64>,
    answered_other: Arc<AtomicU64>,
    watch_calls: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl Health for CheckOnly {
    async fn check(
        &self,
        _req: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let status = self.status.load(SeqCst);
        if status == PbStatus::Serving as i32 {
            self.answered_serving.fetch_add(1, SeqCst);
        } else {
            self.answered_other.fetch_add(1, SeqCst);
        }
        Ok(Response::new(HealthCheckResponse { status }))
    }

    type WatchStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

    async fn watch(
        &self,
        _req: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.watch_calls.fetch_add(1, SeqCst);
        Err(Status::unimplemented("this server only implements Check"))
    }
}

/// Starts a [`CheckOnly`] server on a free loopback port (it runs until the test's runtime ends).
async fn check_only_server(initial: PbStatus) -> (SocketAddr, CheckOnly) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().unwrap();
    let svc = CheckOnly::default();
    svc.status.store(initial as i32, SeqCst);
    let server = tonic::transport::Server::builder()
        .add_service(HealthServer::new(svc.clone()))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l));
    tokio::spawn(server);
    (addr, svc)
}

/// Runs a blocking `EchoBackend::kill` without stalling the runtime (needs the multi-thread flavor).
fn kill(b: &mut EchoBackend) {
    tokio::task::block_in_place(|| b.kill());
}

// ---------------------------------------------------------------------------------------------------
// Active checks, poll mode
// ---------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_serving_backend_loses_all_traffic_and_regains_it_after_recovery() {
    let mut bs = backends(3).await;
    let eps = addrs(&bs);
    let gw = start(&config_text(
        &eps,
        "round_robin",
        "",
        &health_check("100ms", "1s", ""),
    ))
    .await;
    wait_health(&gw, &eps, &[true, true, true]).await;
    let mut c = edge_client(&gw).await;
    let all = spread(&mut c, 30).await;
    assert!(
        all.get("b1").copied().unwrap_or(0) > 0,
        "b1 took no calls while healthy: {all:?}"
    );

    bs[1]
        .health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    let (_, took) = wait_for(&gw, WAIT, "b1 marked unhealthy", |s| {
        healthy(s, eps[1]) == 0.0
    })
    .await;
    // unhealthy_threshold × interval (+10 % jitter) = 220 ms, plus check round trips; generous bound.
    assert!(
        took < Duration::from_secs(3),
        "b1 took {took:?} to be marked unhealthy (2 × 100ms expected)"
    );
    let before = bs[1].stats.started.load(SeqCst);
    let seen = spread(&mut c, 30).await;
    assert_eq!(
        seen.get("b1"),
        None,
        "calls reached the NOT_SERVING backend: {seen:?}"
    );
    assert!(
        seen.get("b0").copied().unwrap_or(0) > 0 && seen.get("b2").copied().unwrap_or(0) > 0,
        "traffic should move to both others: {seen:?}"
    );
    assert_eq!(
        bs[1].stats.started.load(SeqCst),
        before,
        "b1 saw calls while unhealthy"
    );

    bs[1]
        .health
        .set_service_status("", ServingStatus::Serving)
        .await;
    let (_, back) = wait_for(&gw, WAIT, "b1 healthy again", |s| healthy(s, eps[1]) == 1.0).await;
    assert!(
        back < Duration::from_secs(3),
        "b1 took {back:?} to recover (healthy_threshold 1)"
    );
    let seen = spread(&mut c, 30).await;
    assert!(
        seen.get("b1").copied().unwrap_or(0) > 0,
        "the recovered backend gets no calls: {seen:?}"
    );
    assert!(bs[1].stats.started.load(SeqCst) > before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_that_accepts_tcp_but_never_answers_is_marked_unhealthy_by_the_timeout() {
    let (silent, task) = silent_listener().await;
    // start_healthy, so only the failing checks (two timeouts) can turn it unhealthy.
    let gw = start(&config_text(
        &[silent],
        "round_robin",
        "",
        &health_check("100ms", "300ms", "start_healthy = true"),
    ))
    .await;
    let t = Instant::now();
    let (s, took) = wait_for(&gw, WAIT, "silent endpoint unhealthy", |s| {
        healthy(s, silent) == 0.0
    })
    .await;
    let took_total = t.elapsed().max(took);
    // Two failed checks, each ending only when its 300ms timeout fires (the first may have started a
    // few ms before `start` returned).
    assert!(
        took_total >= Duration::from_millis(500),
        "marked unhealthy after {took_total:?}: faster than two 300ms timeouts, so not by the timeout"
    );
    assert!(checks(&s, silent, "failure") >= 2.0);
    assert_eq!(checks(&s, silent, "success"), 0.0);

    // The cluster's only endpoint is unhealthy: the proxy is not ready, and calls fail fast.
    let (code, body) = http_get(gw.admin_addr().unwrap(), "/ready").await;
    assert_eq!(code, 503, "/ready: {body}");
    assert!(
        body.contains("echo"),
        "/ready body should name the cluster: {body}"
    );
    let mut c = edge_client(&gw).await;
    let err = call(&mut c).await.expect_err("no endpoint is healthy");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_endpoints_start_unhealthy_and_only_a_successful_check_makes_them_healthy() {
    let mut bs = backends(2).await;
    bs[1]
        .health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    let eps = addrs(&bs);
    let gw = start(&config_text(
        &eps,
        "round_robin",
        "",
        &health_check("100ms", "1s", "start_healthy = false"),
    ))
    .await;
    // Unhealthy from the start, before any check could fail it (a NOT_SERVING endpoint can never
    // become healthy, so this holds whatever the checker has done by now).
    let b1 = gw.clusters()[0].endpoints[1].clone();
    assert!(!b1.is_healthy(), "a new endpoint must start unhealthy");
    // The SERVING one becomes healthy after its first success; the NOT_SERVING one never does, however
    // many checks it gets (and is never seen healthy on the way).
    let (s, _) = wait_for(&gw, WAIT, "b0 healthy and b1 checked 4 times", |s| {
        assert_eq!(
            healthy(s, eps[1]),
            0.0,
            "the NOT_SERVING endpoint was healthy"
        );
        healthy(s, eps[0]) == 1.0 && checks(s, eps[1], "failure") >= 4.0
    })
    .await;
    assert_eq!(
        healthy(&s, eps[1]),
        0.0,
        "a never-SERVING endpoint became healthy"
    );
    assert_eq!(checks(&s, eps[1], "success"), 0.0);
    assert!(checks(&s, eps[0], "success") >= 1.0);
    let mut c = edge_client(&gw).await;
    let seen = spread(&mut c, 20).await;
    assert_eq!(seen.get("b0"), Some(&20), "{seen:?}");
    assert_eq!(bs[1].stats.started.load(SeqCst), 0);
    // Once it reports SERVING, one success is enough.
    bs[1]
        .health
        .set_service_status("", ServingStatus::Serving)
        .await;
    wait_health(&gw, &eps, &[true, true]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_healthy_endpoints_count_as_healthy_until_the_threshold_of_failures() {
    let mut bs = backends(1).await;
    bs[0]
        .health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    let eps = addrs(&bs);
    let gw = start(&config_text(
        &eps,
        "round_robin",
        "",
        &health_check("2s", "1s", "start_healthy = true"),
    ))
    .await;
    // The first check fails at once, the second ~2s later. Counted, not timed: every scrape that shows
    // fewer than two failed checks must show the endpoint healthy, and the one that shows it unhealthy
    // must count at least two (the counter goes up before the verdict is applied).
    let deadline = Instant::now() + WAIT;
    loop {
        let s = scrape(&gw).await;
        let (failures, h) = (checks(&s, eps[0], "failure"), healthy(&s, eps[0]));
        if failures < 2.0 {
            assert_eq!(
                h, 1.0,
                "start_healthy endpoint unhealthy after {failures} failed checks (threshold 2)"
            );
        }
        if h == 0.0 {
            assert!(failures >= 2.0, "unhealthy after {failures} failed checks");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never unhealthy: {failures} failed checks"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------------
// Passive outlier detection
// ---------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backend_is_ejected_passively_before_the_next_active_check() {
    let mut bs = backends(2).await;
    let eps = addrs(&bs);
    // A 60s interval: after the first checks, only outlier detection can act during the test.
    let extra = format!(
        "{}[clusters.outlier_detection]\nconsecutive_failures = 2\nbase_ejection_time = \"60s\"\n\
         max_ejection_percent = 50\n",
        health_check("60s", "1s", "")
    );
    let gw = start(&config_text(&eps, "round_robin", "", &extra)).await;
    wait_health(&gw, &eps, &[true, true]).await;
    let mut c = edge_client(&gw).await;
    let seen = spread(&mut c, 10).await;
    assert_eq!(
        seen.len(),
        2,
        "both backends should take calls first: {seen:?}"
    );

    kill(&mut bs[1]);
    let mut calls = 0;
    let mut failures = Vec::new();
    loop {
        let s = scrape(&gw).await;
        if ejections(&s, eps[1]) >= 1.0 {
            break;
        }
        assert!(
            calls < 40,
            "b1 not ejected after {calls} calls (consecutive_failures = 2); failures: {failures:?}"
        );
        match call(&mut c).await {
            Ok(b) => assert_eq!(b, "b0"),
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                failures.push(e.message().to_string());
            }
        }
        calls += 1;
    }
    if !failures.is_empty() {
        eprintln!(
            "calls failing before the ejection ({} of {calls}): {failures:?}",
            failures.len()
        );
    }

    // After the ejection every call succeeds on the survivor.
    let seen = spread(&mut c, 20).await;
    assert_eq!(seen.get("b0"), Some(&20), "{seen:?}");
    let s = scrape(&gw).await;
    assert_eq!(ejections(&s, eps[1]), 1.0, "exactly one ejection of b1");
    assert_eq!(
        ejections(&s, eps[0]),
        0.0,
        "the survivor must not be ejected"
    );
    assert_eq!(
        healthy(&s, eps[1]),
        0.0,
        "an ejected endpoint is not available"
    );
    assert_eq!(healthy(&s, eps[0]), 1.0);
    // The active checker did not act: its one check of b1 succeeded, none failed.
    assert_eq!(
        checks(&s, eps[1], "failure"),
        0.0,
        "an active check ran; the interval is 60s"
    );
    assert_eq!(checks(&s, eps[1], "success"), 1.0);
}

/// Waits (bounded) until endpoint `i` of `cluster` is no longer ejected; how long that took.
async fn wait_returned(cluster: &grpcgate::balancer::Cluster, i: usize) -> Duration {
    let t = Instant::now();
    while cluster.endpoints[i].is_ejected() {
        assert!(
            t.elapsed() < WAIT,
            "endpoint {i} never returned from ejection"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    t.elapsed()
}

/// Ejection length = base_ejection_time × times ejected, ejected endpoints come back on their own, and
/// max_ejection_percent caps how many are out at once. No network: the cluster is driven through its
/// public API. (This is purely about timers and would run on tokio's paused clock, but the crate does
/// not enable tokio's `test-util` feature; real time with lower bounds, which cannot flake, instead.)
#[tokio::test]
async fn ejections_last_base_time_times_ejections_and_respect_the_cap() {
    const BASE: Duration = Duration::from_millis(200);
    let eps: Vec<SocketAddr> = (1..=4)
        .map(|p| format!("127.0.0.1:{p}").parse().unwrap())
        .collect();
    let text = config_text(
        &eps,
        "round_robin",
        "",
        "[clusters.outlier_detection]\nconsecutive_failures = 3\nbase_ejection_time = \"200ms\"\n\
         max_ejection_percent = 50\n",
    );
    let config = parse(&text);
    let metrics = grpcgate::metrics::Metrics::new();
    let cluster = grpcgate::balancer::Cluster::new(&config.clusters[0], &metrics);
    assert_eq!(cluster.available(), 4);

    // Failures below the threshold, or interrupted by a success, do not eject.
    cluster.report(0, true);
    cluster.report(0, true);
    cluster.report(0, false);
    cluster.report(0, true);
    cluster.report(0, true);
    assert!(
        !cluster.endpoints[0].is_ejected(),
        "a success resets the consecutive count"
    );
    cluster.report(0, true);
    assert!(
        cluster.endpoints[0].is_ejected(),
        "3 consecutive failures eject"
    );
    assert_eq!(cluster.available(), 3);
    let counter = metrics.ejections("echo", &eps[0].to_string());
    assert_eq!(counter.get(), 1);
    // Already ejected: more failures neither re-eject nor count.
    cluster.report(0, true);
    assert_eq!(counter.get(), 1);

    // First ejection: base_ejection_time.
    let took = wait_returned(&cluster, 0).await;
    assert!(
        took >= BASE - Duration::from_millis(5),
        "first ejection lasted only {took:?}"
    );
    assert_eq!(cluster.available(), 4);

    // Second ejection of the same endpoint: 2 × base_ejection_time.
    for _ in 0..3 {
        cluster.report(0, true);
    }
    assert!(
        cluster.endpoints[0].is_ejected(),
        "3 fresh failures after returning eject again"
    );
    assert_eq!(counter.get(), 2);
    let took = wait_returned(&cluster, 0).await;
    assert!(
        took >= 2 * BASE - Duration::from_millis(5),
        "the second ejection lasted only {took:?}; expected 2 × {BASE:?}"
    );

    // The cap: at most 50 % of 4 endpoints out at once.
    for i in 1..4 {
        for _ in 0..3 {
            cluster.report(i, true);
        }
    }
    let out: Vec<usize> = (0..4)
        .filter(|&i| cluster.endpoints[i].is_ejected())
        .collect();
    assert_eq!(
        out.len(),
        2,
        "max_ejection_percent = 50 of 4 endpoints allows 2 ejected: {out:?}"
    );
    assert_eq!(cluster.available(), 2);
    // They come back on their own.
    for i in out {
        wait_returned(&cluster, i).await;
    }
    assert_eq!(cluster.available(), 4);
}

// ---------------------------------------------------------------------------------------------------
// Watch mode
// ---------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_mode_reacts_to_not_serving_without_waiting_for_an_interval() {
    let mut bs = backends(2).await;
    let eps = addrs(&bs);
    let gw = start(&config_text(
        &eps,
        "round_robin",
        "",
        &health_check("30s", "1s", "mode = \"watch\""),
    ))
    .await;
    wait_health(&gw, &eps, &[true, true]).await;
    let mut c = edge_client(&gw).await;

    bs[1]
        .health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    // Well under the 30s interval (−10 % jitter = 27s): only the Watch stream can explain it.
    let bound = Duration::from_secs(10);
    let (_, took) = wait_for(&gw, bound, "watch: b1 unhealthy", |s| {
        healthy(s, eps[1]) == 0.0
    })
    .await;
    assert!(
        took < Duration::from_secs(5),
        "watch reacted after {took:?}"
    );
    let seen = spread(&mut c, 20).await;
    assert_eq!(seen.get("b0"), Some(&20), "{seen:?}");

    bs[1]
        .health
        .set_service_status("", ServingStatus::Serving)
        .await;
    let (_, took) = wait_for(&gw, bound, "watch: b1 healthy again", |s| {
        healthy(s, eps[1]) == 1.0
    })
    .await;
    assert!(
        took < Duration::from_secs(5),
        "watch recovery after {took:?}"
    );
    let seen = spread(&mut c, 20).await;
    assert!(seen.get("b1").copied().unwrap_or(0) > 0, "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_mode_falls_back_to_polling_when_watch_is_unimplemented() {
    let (ep, server) = check_only_server(PbStatus::Serving).await;
    let gw = start(&config_text(
        &[ep],
        "round_robin",
        "",
        &health_check("100ms", "1s", "mode = \"watch\""),
    ))
    .await;
    // Polling: Check succeeds over and over.
    let (s, _) = wait_for(&gw, WAIT, "fallback polling", |s| {
        healthy(s, ep) == 1.0 && checks(s, ep, "success") >= 3.0
    })
    .await;
    assert!(
        server.watch_calls.load(SeqCst) >= 1,
        "Watch was never tried"
    );
    assert!(server.answered_serving.load(SeqCst) as f64 >= checks(&s, ep, "success"));
    server.status.store(PbStatus::NotServing as i32, SeqCst);
    let (_, took) = wait_for(&gw, WAIT, "polled NOT_SERVING", |s| healthy(s, ep) == 0.0).await;
    assert!(
        took < Duration::from_secs(3),
        "fallback polling took {took:?}"
    );
}

/// A tonic-health server whose connections rotate the way grpcio's `grpc.max_connection_age_ms` (with
/// `max_connection_age_grace_ms`) rotates them: `age` after accepting a connection it sends GOAWAY
/// (hyper's graceful shutdown), and `grace` later it closes the connection, ending the streams still
/// open on it. (tonic's own `max_connection_age` only sends the GOAWAY and then waits for the open
/// streams to finish, which a Watch stream never does, so it would not rotate a watched connection.)
struct RotatingHealth {
    addr: SocketAddr,
    reporter: tonic_health::server::HealthReporter,
    /// Connections accepted so far; `accepted_notify` is notified on each.
    accepted: Arc<AtomicU64>,
    accepted_notify: Arc<tokio::sync::Notify>,
    /// Stops the server: the listener closes and every open connection is dropped.
    stop: tokio_util::sync::CancellationToken,
}

impl RotatingHealth {
    async fn start(age: Duration, grace: Duration) -> RotatingHealth {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().unwrap();
        let (mut reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("", ServingStatus::Serving)
            .await;
        let accepted = Arc::new(AtomicU64::new(0));
        let accepted_notify = Arc::new(tokio::sync::Notify::new());
        let stop = tokio_util::sync::CancellationToken::new();
        let (count, notify, stopped) = (accepted.clone(), accepted_notify.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let tcp = tokio::select! {
                    _ = stopped.cancelled() => return,
                    r = l.accept() => match r {
                        Ok((tcp, _)) => tcp,
                        Err(_) => continue,
                    },
                };
                count.fetch_add(1, SeqCst);
                notify.notify_waiters();
                let service = hyper_util::service::TowerToHyperService::new(service.clone());
                let stopped = stopped.clone();
                tokio::spawn(async move {
                    let conn = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service);
                    tokio::pin!(conn);
                    let age_over = tokio::time::sleep(age);
                    tokio::pin!(age_over);
                    tokio::select! {
                        _ = &mut conn => return,
                        _ = stopped.cancelled() => return,
                        _ = &mut age_over => conn.as_mut().graceful_shutdown(),
                    }
                    // GOAWAY sent; the open Watch stream keeps the connection until the grace ends.
                    tokio::select! {
                        _ = &mut conn => {}
                        _ = stopped.cancelled() => {}
                        _ = tokio::time::sleep(grace) => {}
                    }
                    // Dropping the connection closes the socket under its streams.
                });
            }
        });
        RotatingHealth {
            addr,
            reporter,
            accepted,
            accepted_notify,
            stop,
        }
    }

    /// Waits (bounded by [`WAIT`]) until at least `n` connections have been accepted.
    async fn wait_accepted(&self, n: u64) {
        bounded(async {
            loop {
                let notified = self.accepted_notify.notified();
                if self.accepted.load(SeqCst) >= n {
                    return;
                }
                notified.await;
            }
        })
        .await
    }
}

/// A backend that rotates its connections (GOAWAY, then close, every ~1s, like grpcio with
/// `max_connection_age_ms`) ends the Watch stream each time. Each time it is reopened at once on a new
/// connection and no failure is counted: with unhealthy_threshold = 1 the endpoint stays healthy over
/// several rotations, though the 30s interval means only an immediate reopen could have opened the new
/// connections. The reopened Watch still applies updates, and a reopen that cannot connect (the
/// backend is gone) is a failure as usual, counted once rather than in a hot loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_mode_reopens_a_stream_whose_connection_rotated_without_counting_a_failure() {
    let mut server =
        RotatingHealth::start(Duration::from_millis(700), Duration::from_millis(300)).await;
    let ep = server.addr;
    let gw = start(&config_text(
        &[ep],
        "round_robin",
        "",
        "[clusters.health_check]\ninterval = \"30s\"\ntimeout = \"5s\"\nunhealthy_threshold = 1\n\
         healthy_threshold = 1\nmode = \"watch\"\n",
    ))
    .await;
    wait_health(&gw, &[ep], &[true]).await;
    server.wait_accepted(1).await;

    // Four rotations: the first connection and four more, each opened by a reopened Watch.
    {
        let rotations = async {
            for n in 2..=5 {
                server.wait_accepted(n).await;
            }
        };
        tokio::pin!(rotations);
        loop {
            let s = scrape(&gw).await;
            assert_eq!(
                checks(&s, ep, "failure"),
                0.0,
                "a connection rotation counted as a failed check (after {} connections)",
                server.accepted.load(SeqCst)
            );
            assert_eq!(healthy(&s, ep), 1.0, "the endpoint flapped");
            tokio::select! {
                _ = &mut rotations => break,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    }
    let s = scrape(&gw).await;
    assert_eq!(checks(&s, ep, "failure"), 0.0);
    assert_eq!(healthy(&s, ep), 1.0);
    assert!(
        checks(&s, ep, "success") >= 4.0,
        "each reopened Watch delivers the current status"
    );

    // The Watch open now, on the latest connection, still applies updates at once.
    server
        .reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    wait_health(&gw, &[ep], &[false]).await;
    server
        .reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    let s = wait_health(&gw, &[ep], &[true]).await;
    let failures = checks(&s, ep, "failure");
    // The NOT_SERVING update counts, once more if a rotation reopened the Watch while it held.
    assert!(failures >= 1.0, "the NOT_SERVING update is a failure");

    // The backend goes away: the broken Watch is reopened, cannot connect, and that is one failure;
    // the next attempt waits for the 30s interval.
    server.stop.cancel();
    let s = wait_health(&gw, &[ep], &[false]).await;
    assert_eq!(checks(&s, ep, "failure"), failures + 1.0);
    // An observation window, not a synchronisation: a hot loop (even one spaced by the 1 s reopen
    // spacing) would count more by now.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let s = scrape(&gw).await;
    assert_eq!(
        checks(&s, ep, "failure"),
        failures + 1.0,
        "a failed reopen must wait for the interval"
    );
}

// ---------------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_counters_match_the_checks_made() {
    let (ep, server) = check_only_server(PbStatus::Serving).await;
    let gw = start(&config_text(
        &[ep],
        "round_robin",
        "",
        &health_check("100ms", "1s", ""),
    ))
    .await;
    // Each metric increment follows the server's answer, and at most one check is in flight: so at
    // any moment  metric <= answered <= metric + 1.
    let consistent = |s: &Scrape, before: (u64, u64), after: (u64, u64)| {
        let (ok, bad) = (checks(s, ep, "success"), checks(s, ep, "failure"));
        assert!(
            ok <= after.0 as f64 && before.0 as f64 <= ok + 1.0,
            "success metric {ok} vs server answered SERVING {before:?}..{after:?}"
        );
        assert!(
            bad <= after.1 as f64 && before.1 as f64 <= bad + 1.0,
            "failure metric {bad} vs server answered NOT_SERVING {before:?}..{after:?}"
        );
    };
    let answered = || {
        (
            server.answered_serving.load(SeqCst),
            server.answered_other.load(SeqCst),
        )
    };

    let (s, _) = wait_for(&gw, WAIT, "first successes", |s| {
        checks(s, ep, "success") >= 2.0
    })
    .await;
    let first = checks(&s, ep, "success");
    assert_eq!(checks(&s, ep, "failure"), 0.0);
    // Ten more checks take at least nine intervals of 100ms − 10 %: one count per check, jitter bounded.
    let t = Instant::now();
    wait_for(&gw, WAIT, "ten more successes", |s| {
        checks(s, ep, "success") >= first + 10.0
    })
    .await;
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(800),
        "10 checks in {took:?}: faster than the 100ms interval (−10 % jitter) allows"
    );
    let before = answered();
    let s = scrape(&gw).await;
    consistent(&s, before, answered());

    server.status.store(PbStatus::NotServing as i32, SeqCst);
    let (s, _) = wait_for(&gw, WAIT, "failures counted", |s| {
        checks(s, ep, "failure") >= 4.0 && healthy(s, ep) == 0.0
    })
    .await;
    let successes = checks(&s, ep, "success");
    let (s, _) = wait_for(&gw, WAIT, "more failures", |s| {
        checks(s, ep, "failure") >= 7.0
    })
    .await;
    assert_eq!(
        checks(&s, ep, "success"),
        successes,
        "successes counted while the server answers NOT_SERVING"
    );
    let before = answered();
    let s = scrape(&gw).await;
    consistent(&s, before, answered());
}

// ---------------------------------------------------------------------------------------------------
// Nothing healthy, panic mode
// ---------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_healthy_gives_unavailable_naming_the_cluster() {
    let mut bs = backends(2).await;
    for b in &mut bs {
        b.health
            .set_service_status("", ServingStatus::NotServing)
            .await;
    }
    let eps = addrs(&bs);
    let text = config_text(&eps, "round_robin", "", &health_check("100ms", "1s", ""))
        .replace("\"echo\"", "\"inventory\"");
    let gw = start(&text).await;
    wait_for(&gw, WAIT, "both checked and failing", |s| {
        eps.iter()
            .all(|&e| checks(s, e, "failure") >= 2.0 && healthy(s, e) == 0.0)
    })
    .await;
    let mut c = edge_client(&gw).await;
    for _ in 0..3 {
        let err = call(&mut c).await.expect_err("nothing is healthy");
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        assert!(
            err.message().contains("inventory"),
            "the message should name the cluster: {:?}",
            err.message()
        );
    }
    assert_eq!(
        bs[0].stats.started.load(SeqCst) + bs[1].stats.started.load(SeqCst),
        0
    );
    let (code, body) = http_get(gw.admin_addr().unwrap(), "/ready").await;
    assert_eq!(code, 503);
    assert!(body.contains("inventory"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_threshold_routes_to_every_endpoint_when_too_few_are_healthy() {
    let mut bs = backends(2).await;
    for b in &mut bs {
        b.health
            .set_service_status("", ServingStatus::NotServing)
            .await;
    }
    let eps = addrs(&bs);
    // panic_threshold is a cluster key: it must come before the health_check sub-table.
    let extra = format!("panic_threshold = 50\n{}", health_check("100ms", "1s", ""));
    let gw = start(&config_text(&eps, "round_robin", "", &extra)).await;
    wait_for(&gw, WAIT, "both checked and failing", |s| {
        eps.iter()
            .all(|&e| checks(s, e, "failure") >= 2.0 && healthy(s, e) == 0.0)
    })
    .await;
    let mut c = edge_client(&gw).await;
    // 0 of 2 available < 50 %: panic mode balances over all of them.
    let seen = spread(&mut c, 20).await;
    assert!(
        seen.get("b0").copied().unwrap_or(0) > 0 && seen.get("b1").copied().unwrap_or(0) > 0,
        "panic mode should use every endpoint: {seen:?}"
    );

    // 1 of 2 available = 50 %, not below the threshold: only the healthy one.
    bs[0]
        .health
        .set_service_status("", ServingStatus::Serving)
        .await;
    wait_health(&gw, &eps, &[true, false]).await;
    let seen = spread(&mut c, 20).await;
    assert_eq!(seen.get("b0"), Some(&20), "{seen:?}");
}

// ---------------------------------------------------------------------------------------------------
// The proxy's own health
// ---------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_answers_its_own_health_check_and_ready_follows_the_cluster() {
    let mut bs = backends(1).await;
    let eps = addrs(&bs);
    let gw = start(&config_text(
        &eps,
        "round_robin",
        "",
        &health_check("100ms", "1s", ""),
    ))
    .await;
    let admin = gw.admin_addr().unwrap();
    wait_health(&gw, &eps, &[true]).await;
    let mut h = proxy_health(&gw).await;

    assert_eq!(proxy_check(&mut h, "").await.unwrap(), PbStatus::Serving);
    assert_eq!(
        proxy_check(&mut h, "echo").await.unwrap(),
        PbStatus::Serving
    );
    let err = proxy_check(&mut h, "nope")
        .await
        .expect_err("unknown service");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    // The proxy answers itself rather than forwarding: the backend knows "echo.Echo", the proxy does not.
    let err = proxy_check(&mut h, "echo.Echo")
        .await
        .expect_err("not a cluster");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert_eq!(http_get(admin, "/ready").await.0, 200);

    bs[0]
        .health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    wait_health(&gw, &eps, &[false]).await;
    assert_eq!(
        proxy_check(&mut h, "echo").await.unwrap(),
        PbStatus::NotServing
    );
    assert_eq!(
        proxy_check(&mut h, "").await.unwrap(),
        PbStatus::Serving,
        "the proxy itself is still serving"
    );
    let (code, body) = http_get(admin, "/ready").await;
    assert_eq!(code, 503, "/ready with the only endpoint unhealthy: {body}");
    assert!(body.contains("echo"), "{body}");
    assert_eq!(http_get(admin, "/healthz").await.0, 200, "alive regardless");

    bs[0]
        .health
        .set_service_status("", ServingStatus::Serving)
        .await;
    wait_health(&gw, &eps, &[true]).await;
    assert_eq!(
        proxy_check(&mut h, "echo").await.unwrap(),
        PbStatus::Serving
    );
    assert_eq!(http_get(admin, "/ready").await.0, 200);
}

/// A cluster name long enough that grpcio's gzip channel compresses the request (the interop repro).
const LONG_CLUSTER: &str = "inventory-and-fulfilment-service-cluster";

/// A gateway whose only cluster is [`LONG_CLUSTER`] over one healthy backend (no active checks).
async fn long_named_gateway() -> (Gateway, Vec<EchoBackend>) {
    let bs = backends(1).await;
    let text = config_text(&addrs(&bs), "round_robin", "", "")
        .replace("\"echo\"", &format!("\"{LONG_CLUSTER}\""));
    (start(&text).await, bs)
}

/// `data` compressed with gRPC's "gzip" (RFC 1952) or "deflate" (zlib, RFC 1950).
fn compress(encoding: &str, data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let level = flate2::Compression::default();
    match encoding {
        "gzip" => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), level);
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        "deflate" => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), level);
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        other => panic!("no encoder for {other}"),
    }
}

/// A length-prefixed gRPC message with the given compressed flag.
fn grpc_frame(compressed: bool, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + payload.len());
    b.put_u8(u8::from(compressed));
    b.put_u32(payload.len() as u32);
    b.put_slice(payload);
    b.freeze()
}

/// The encoded `HealthCheckRequest{service}`.
fn check_request(service: &str) -> Vec<u8> {
    prost::Message::encode_to_vec(&HealthCheckRequest {
        service: service.to_string(),
    })
}

/// What a raw `Health/Check` got back: the status code, `grpc-accept-encoding`, and the decoded
/// response if there was one.
#[derive(Debug)]
struct RawCheck {
    code: Code,
    message: String,
    accept_encoding: Option<String>,
    status: Option<PbStatus>,
}

/// One `Health/Check` over a fresh raw h2 connection: exact request headers and body bytes.
async fn raw_check(addr: SocketAddr, headers: &[(&str, &str)], body: Bytes) -> RawCheck {
    bounded(async {
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
        tokio::spawn(conn);
        let mut client = client.ready().await.expect("ready");
        let mut req = http::Request::builder()
            .method("POST")
            .uri(format!("http://{addr}/grpc.health.v1.Health/Check"))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let (resp, mut send) = client
            .send_request(req.body(()).unwrap(), false)
            .expect("send request");
        send.send_data(body, true).expect("send body");
        let (head, mut recv) = resp.await.expect("response").into_parts();
        assert_eq!(head.status, http::StatusCode::OK);
        let mut data = BytesMut::new();
        while let Some(chunk) = recv.data().await {
            let chunk = chunk.expect("body");
            let _ = recv.flow_control().release_capacity(chunk.len());
            data.extend_from_slice(&chunk);
        }
        // A trailers-only response carries the status in its headers.
        let trailers = recv.trailers().await.expect("trailers");
        let status_headers = trailers.as_ref().unwrap_or(&head.headers);
        let text = |h: &http::HeaderMap, name: &str| {
            h.get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        let code = text(status_headers, "grpc-status")
            .and_then(|c| c.parse::<i32>().ok())
            .map(Code::from_i32)
            .expect("a grpc-status");
        let status = (!data.is_empty()).then(|| {
            assert_eq!(data[0], 0, "the response is not compressed");
            let msg: HealthCheckResponse =
                prost::Message::decode(&data[5..]).expect("a HealthCheckResponse");
            PbStatus::try_from(msg.status).expect("a known status")
        });
        RawCheck {
            code,
            message: text(status_headers, "grpc-message").unwrap_or_default(),
            accept_encoding: text(&head.headers, "grpc-accept-encoding"),
            status,
        }
    })
    .await
}

/// The interop failure: a client with gzip on compresses `Health/Check(service)`. tonic's client with
/// `send_compressed(Gzip)` compresses every request; the proxy answers them like plain ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_health_check_accepts_gzip_compressed_requests() {
    let (gw, _bs) = long_named_gateway().await;
    let mut h = proxy_health(&gw)
        .await
        .send_compressed(tonic::codec::CompressionEncoding::Gzip);
    assert_eq!(
        proxy_check(&mut h, LONG_CLUSTER).await.unwrap(),
        PbStatus::Serving
    );
    assert_eq!(proxy_check(&mut h, "").await.unwrap(), PbStatus::Serving);
    let err = proxy_check(&mut h, "no-such-cluster-with-a-long-enough-name")
        .await
        .expect_err("unknown service");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    wait_settled(&gw, &[("OK", 2), ("NOT_FOUND", 1)]).await;
}

/// Hand-compressed requests over raw HTTP/2, so the exact bytes are known: gzip and deflate (zlib)
/// are read; an unsupported encoding is UNIMPLEMENTED naming what is accepted (grpc-accept-encoding);
/// a compressed message without grpc-encoding, or with identity, is INTERNAL; corrupt data is
/// INTERNAL; and a zip bomb stops at the 4 KiB cap with RESOURCE_EXHAUSTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_health_check_decompresses_gzip_and_deflate_and_rejects_the_rest() {
    let (gw, _bs) = long_named_gateway().await;
    let addr = gw.listener_addr("edge").unwrap();
    let msg = check_request(LONG_CLUSTER);

    for encoding in ["gzip", "deflate"] {
        let body = grpc_frame(true, &compress(encoding, &msg));
        let r = raw_check(addr, &[("grpc-encoding", encoding)], body).await;
        assert_eq!(r.code, Code::Ok, "{encoding}: {r:?}");
        assert_eq!(r.status, Some(PbStatus::Serving), "{encoding}: {r:?}");
        // An uncompressed message with a grpc-encoding header is fine too (compression is per message).
        let r = raw_check(
            addr,
            &[("grpc-encoding", encoding)],
            grpc_frame(false, &msg),
        )
        .await;
        assert_eq!(
            r.status,
            Some(PbStatus::Serving),
            "{encoding}, flag 0: {r:?}"
        );
    }

    let r = raw_check(addr, &[("grpc-encoding", "snappy")], grpc_frame(true, &msg)).await;
    assert_eq!(r.code, Code::Unimplemented, "{r:?}");
    assert!(r.message.contains("snappy"), "{r:?}");
    let accepted: Vec<&str> = r
        .accept_encoding
        .as_deref()
        .expect("grpc-accept-encoding with the UNIMPLEMENTED")
        .split(',')
        .map(str::trim)
        .collect();
    assert!(
        accepted.contains(&"gzip") && accepted.contains(&"deflate"),
        "{accepted:?}"
    );

    let compressed = grpc_frame(true, &compress("gzip", &msg));
    let r = raw_check(addr, &[], compressed.clone()).await;
    assert_eq!(
        r.code,
        Code::Internal,
        "compressed flag, no grpc-encoding: {r:?}"
    );
    let r = raw_check(addr, &[("grpc-encoding", "identity")], compressed).await;
    assert_eq!(r.code, Code::Internal, "compressed flag, identity: {r:?}");

    let r = raw_check(
        addr,
        &[("grpc-encoding", "gzip")],
        grpc_frame(true, b"this is not gzip data at all"),
    )
    .await;
    assert_eq!(r.code, Code::Internal, "corrupt gzip: {r:?}");

    // 16 MiB of zeros gzips to ~16 KiB, well within the 64 KiB limit on the request as sent: only the
    // cap on the decompressed size stops it.
    let bomb = compress("gzip", &vec![0u8; 16 << 20]);
    assert!(bomb.len() < 64 * 1024, "{}", bomb.len());
    let r = raw_check(addr, &[("grpc-encoding", "gzip")], grpc_frame(true, &bomb)).await;
    assert_eq!(r.code, Code::ResourceExhausted, "zip bomb: {r:?}");
    // Just under the cap is fine: a service name of 4000 bytes is read (and is no cluster).
    let big = check_request(&"x".repeat(4000));
    let r = raw_check(
        addr,
        &[("grpc-encoding", "deflate")],
        grpc_frame(true, &compress("deflate", &big)),
    )
    .await;
    assert_eq!(r.code, Code::NotFound, "{r:?}");

    // The proxy still answers after all that.
    let r = raw_check(addr, &[], grpc_frame(false, &msg)).await;
    assert_eq!(r.status, Some(PbStatus::Serving), "{r:?}");
}

/// A poll-mode Check that the endpoint refused without processing it (REFUSED_STREAM here; a GOAWAY
/// crossing the Check as an idle connection is closed is the same) is asked again at once and is not
/// counted as a failure. The endpoint, a raw h2 server, refuses every other Check and answers the rest
/// SERVING.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_poll_check_is_asked_again_not_counted() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ep = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicU64::new(0));
    let seen2 = seen.clone();
    let server = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let seen = seen2.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    if seen.fetch_add(1, SeqCst).is_multiple_of(2) {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    let head = http::Response::builder()
                        .header("content-type", "application/grpc")
                        .body(())
                        .unwrap();
                    let mut s = respond.send_response(head, false).unwrap();
                    // HealthCheckResponse { status: SERVING }, length-prefixed.
                    let _ = s.send_data(Bytes::from_static(&[0, 0, 0, 0, 2, 0x08, 0x01]), false);
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", "0".parse().unwrap());
                    let _ = s.send_trailers(trailers);
                }
            });
        }
    });
    let gw = start(&config_text(
        &[ep],
        "round_robin",
        "",
        &health_check("50ms", "1s", "")
            .replace("unhealthy_threshold = 2", "unhealthy_threshold = 1"),
    ))
    .await;
    let (s, _) = wait_for(&gw, WAIT, "8 successful checks", |s| {
        checks(s, ep, "success") >= 8.0
    })
    .await;
    assert_eq!(checks(&s, ep, "failure"), 0.0);
    assert_eq!(healthy(&s, ep), 1.0);
    assert!(
        seen.load(SeqCst) >= 16,
        "every check was refused once first"
    );
    server.abort();
}
