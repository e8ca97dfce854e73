//! End-to-end tests of the balancers (issue 5): real echo backends on loopback, an in-process gateway,
//! real tonic clients with many concurrent callers. Every balancer is run through the same scenarios:
//! equal backends, one backend 20× slower, weights 1:3, in-flight accounting after every kind of call
//! ending, and unhealthy/ejected endpoints.
//!
//! Shares are counted twice: by the `backend` field of each response and by
//! `grpcgate_requests_total{endpoint}`, which must agree.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use grpcgate::echo::EchoBackend;
use grpcgate::pb::echo::echo_client::EchoClient;
use grpcgate::pb::echo::EchoRequest;
use grpcgate::Gateway;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Code;

// ---------------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------------

/// Generates one `#[tokio::test]` per balancer, in a module named after the scenario, each calling
/// `$scenario(balancer_name)`.
macro_rules! per_balancer {
    ($module:ident, $scenario:ident) => {
        mod $module {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn round_robin() {
                super::$scenario("round_robin").await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn join_shortest_queue() {
                super::$scenario("join_shortest_queue").await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn least_request() {
                super::$scenario("least_request").await
            }
        }
    };
}

/// A gateway config: admin on a free port, listener "edge" routing everything to cluster "echo" with
/// this balancer; `endpoints` is the TOML array, `cluster_extra` is appended to the cluster table.
fn gateway_config(balancer: &str, endpoints: &str, cluster_extra: &str) -> String {
    format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[[listeners]]
name = "edge"
listen = "127.0.0.1:0"

[[listeners.routes]]
cluster = "echo"

[[clusters]]
name = "echo"
balancer = "{balancer}"
endpoints = {endpoints}
{cluster_extra}
"#
    )
}

/// `["a", "b"]` for these backends.
fn endpoint_list(backends: &[&EchoBackend]) -> String {
    let eps: Vec<String> = backends.iter().map(|b| format!("\"{}\"", b.addr)).collect();
    format!("[{}]", eps.join(", "))
}

/// Starts a backend named `name` that waits `delay_ms` before each answer.
async fn backend(name: &str, delay_ms: u64) -> EchoBackend {
    EchoBackend::start(name, Duration::from_millis(delay_ms))
        .await
        .expect("backend")
}

/// Runs `total` unary calls (each must succeed) from `callers` concurrent tasks sharing `client`'s
/// connection; returns how many calls each backend answered, by the response's `backend` field.
async fn spread_calls(
    client: &EchoClient<Channel>,
    total: usize,
    callers: usize,
) -> BTreeMap<String, usize> {
    let next = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let mut c = client.clone();
            let next = next.clone();
            tokio::spawn(async move {
                let mut seen = BTreeMap::<String, usize>::new();
                while next.fetch_add(1, SeqCst) < total {
                    let r = bounded(c.unary(EchoRequest::default()))
                        .await
                        .unwrap_or_else(|s| panic!("call failed: {s:?}"))
                        .into_inner();
                    *seen.entry(r.backend).or_default() += 1;
                }
                seen
            })
        })
        .collect();
    // Each call is bounded by WAIT; the whole run gets longer, as it is many calls in a debug build
    // on a shared machine.
    let mut counts = BTreeMap::new();
    for t in tasks {
        let done = tokio::time::timeout(Duration::from_secs(180), t).await;
        for (k, v) in done.expect("callers timed out").expect("caller task") {
            *counts.entry(k).or_default() += v;
        }
    }
    assert_eq!(counts.values().sum::<usize>(), total);
    counts
}

/// Waits until every call settled as OK (`total` of them, nothing in flight), then checks that
/// `grpcgate_requests_total{endpoint}` agrees with the counts by response for each `(name, addr)`.
async fn check_metrics_agree(
    gw: &Gateway,
    counts: &BTreeMap<String, usize>,
    backends: &[(&str, SocketAddr)],
) {
    let total: usize = counts.values().sum();
    let s = wait_settled(gw, &[("OK", total as u64)]).await;
    for (name, addr) in backends {
        let ep = addr.to_string();
        let by_metric = sample(
            &s,
            "grpcgate_requests_total",
            &[
                ("cluster", "echo"),
                ("endpoint", ep.as_str()),
                ("grpc_status", "OK"),
            ],
        );
        let by_response = counts.get(*name).copied().unwrap_or(0);
        assert_eq!(
            by_metric, by_response as f64,
            "{name} ({ep}): requests_total disagrees with the responses"
        );
    }
}

/// `name`'s share of all calls in `counts`.
fn share(counts: &BTreeMap<String, usize>, name: &str) -> f64 {
    let total: usize = counts.values().sum();
    counts.get(name).copied().unwrap_or(0) as f64 / total as f64
}

/// Runs a blocking `EchoBackend::kill` without stalling the runtime (needs the multi-thread flavor).
fn kill(b: &mut EchoBackend) {
    tokio::task::block_in_place(|| b.kill());
}

/// `grpcgate_endpoint_healthy` for one endpoint of cluster "echo" (None when absent).
fn healthy_gauge(s: &prometheus_parse::Scrape, addr: SocketAddr) -> Option<f64> {
    let ep = addr.to_string();
    s.samples
        .iter()
        .find(|x| {
            x.metric == "grpcgate_endpoint_healthy"
                && x.labels.get("cluster") == Some("echo")
                && x.labels.get("endpoint") == Some(ep.as_str())
        })
        .map(|x| match x.value {
            prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

/// Waits until `grpcgate_endpoint_healthy` for this endpoint of cluster "echo" reads `want`.
async fn wait_healthy_gauge(gw: &Gateway, addr: SocketAddr, want: f64) {
    eventually(gw, |s| {
        let v = healthy_gauge(s, addr);
        if v == Some(want) {
            Ok(())
        } else {
            Err(format!("{addr} healthy gauge {v:?}, want {want}"))
        }
    })
    .await;
}

/// Sum of `grpcgate_endpoint_in_flight` over the endpoints of `cluster`.
fn in_flight(s: &prometheus_parse::Scrape, cluster: &str) -> f64 {
    sample(s, "grpcgate_endpoint_in_flight", &[("cluster", cluster)])
}

// ---------------------------------------------------------------------------------------------------
// Two backends of equal capacity: an even spread (round robin exactly even)
// ---------------------------------------------------------------------------------------------------

async fn equal_backends_share_evenly(balancer: &str) {
    const CALLS: usize = 10_000;
    let b0 = backend("b0", 0).await;
    let b1 = backend("b1", 0).await;
    let gw = start(&gateway_config(balancer, &endpoint_list(&[&b0, &b1]), "")).await;
    let client = edge_client(&gw).await;
    let counts = spread_calls(&client, CALLS, 16).await;
    eprintln!("{balancer}: equal backends: {counts:?}");
    if balancer == "round_robin" {
        let want: BTreeMap<String, usize> =
            [("b0".to_string(), 5000), ("b1".to_string(), 5000)].into();
        assert_eq!(counts, want, "round robin must be exact");
    } else {
        // These balancers follow in-flight counts, so a backend that the scheduler delays (20 tests
        // share 2 cores here) rightly gets fewer calls: runs of this test measured 46-54 % for b0
        // and, now and then, 42 %. A tie-breaking or counting bug skews much further.
        let s0 = share(&counts, "b0");
        assert!(
            (s0 - 0.5).abs() <= 0.10,
            "{balancer}: b0 got {:.1}% of calls, want 50 ± 10 %: {counts:?}",
            s0 * 100.0
        );
    }
    check_metrics_agree(&gw, &counts, &[("b0", b0.addr), ("b1", b1.addr)]).await;
}

per_balancer!(equal_backends, equal_backends_share_evenly);

// ---------------------------------------------------------------------------------------------------
// One backend 20× slower: load-aware balancers route around it, round robin does not
// ---------------------------------------------------------------------------------------------------

/// Fast backend: 25 ms per call, slow: 500 ms (20×), 32 concurrent callers. With the load-aware
/// balancers both endpoints hold about the same number of calls in flight, so the slow share is about
/// (fast latency) / (fast + slow latency): ~5 % plus the per-call overhead of clients, proxy and
/// backends. That overhead is large in a debug build on 2 shared cores (the whole setup tops out near
/// 1000 calls/s, so at full speed every call waits several ms for CPU), hence delays large next to
/// it: with 1 ms/20 ms the slow share measured 15-16 %, with 10 ms/200 ms 13 %.
/// Round robin's share is exact, so it needs fewer calls (it waits on the slow backend a lot).
async fn slow_backend_gets_few_calls(balancer: &str) {
    let calls = if balancer == "round_robin" { 320 } else { 800 };
    let fast = backend("fast", 25).await;
    let slow = backend("slow", 500).await;
    let gw = start(&gateway_config(
        balancer,
        &endpoint_list(&[&fast, &slow]),
        "",
    ))
    .await;
    let client = edge_client(&gw).await;
    let counts = spread_calls(&client, calls, 32).await;
    let slow_share = share(&counts, "slow");
    eprintln!(
        "{balancer}: slow backend got {:.1}% of {calls} calls: {counts:?}",
        slow_share * 100.0
    );
    if balancer == "round_robin" {
        assert!(
            (slow_share - 0.5).abs() <= 0.02,
            "round robin: slow got {:.1}%, want 50 ± 2 %: {counts:?}",
            slow_share * 100.0
        );
    } else {
        assert!(
            slow_share < 0.15,
            "{balancer}: slow got {:.1}%, want < 15 %: {counts:?}",
            slow_share * 100.0
        );
    }
    check_metrics_agree(&gw, &counts, &[("fast", fast.addr), ("slow", slow.addr)]).await;
}

per_balancer!(slow_backend, slow_backend_gets_few_calls);

// ---------------------------------------------------------------------------------------------------
// Weights 1:3 give 25/75
// ---------------------------------------------------------------------------------------------------

/// Both backends wait 120 ms per call, so their latency (which the load-aware balancers react to) is
/// the same whatever share they get, and the spread reflects the weights only. (Without a delay the
/// calls are CPU-bound in a debug build, and the heavy backend, on its own single thread with 3× the
/// calls, answers more slowly, which the load-aware balancers rightly count against it.)
/// 64 callers: in-flight counts are integers, and a load-aware balancer picks the weight-1 endpoint
/// whenever its count is below a quarter of the total k, so it holds about ceil(k/4) of k calls, a bias
/// toward it that shrinks as k grows (JSQ measured 26-27.6 % with 16 or 32 callers).
/// Round robin is exact, so it needs fewer calls.
async fn weights_one_to_three(balancer: &str) {
    let calls = if balancer == "round_robin" { 800 } else { 1600 };
    let light = backend("light", 120).await;
    let heavy = backend("heavy", 120).await;
    let endpoints = format!(
        r#"["{}", {{ address = "{}", weight = 3 }}]"#,
        light.addr, heavy.addr
    );
    let gw = start(&gateway_config(balancer, &endpoints, "")).await;
    let client = edge_client(&gw).await;
    let counts = spread_calls(&client, calls, 64).await;
    let light_share = share(&counts, "light");
    eprintln!(
        "{balancer}: weight-1 backend got {:.1}% of {calls} calls: {counts:?}",
        light_share * 100.0
    );
    if balancer == "round_robin" {
        let want: BTreeMap<String, usize> =
            [("heavy".to_string(), 600), ("light".to_string(), 200)].into();
        assert_eq!(counts, want, "weighted round robin must be exact");
    } else {
        assert!(
            (light_share - 0.25).abs() <= 0.03,
            "{balancer}: weight-1 backend got {:.1}%, want 25 ± 3 %: {counts:?}",
            light_share * 100.0
        );
    }
    check_metrics_agree(
        &gw,
        &counts,
        &[("light", light.addr), ("heavy", heavy.addr)],
    )
    .await;
}

per_balancer!(weights, weights_one_to_three);

// ---------------------------------------------------------------------------------------------------
// In-flight accounting after every way a call can end
// ---------------------------------------------------------------------------------------------------

/// Two listeners: "edge" (no timeout; Bidi goes to cluster "doomed", whose backend d0 gets killed) and
/// "strict" (route timeout 500ms), both in front of cluster "echo".
fn mixed_config(balancer: &str, echo: &[&EchoBackend], doomed: &[&EchoBackend]) -> String {
    format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[[listeners]]
name = "edge"
listen = "127.0.0.1:0"

[[listeners.routes]]
service = "echo.Echo"
method = "Bidi"
cluster = "doomed"

[[listeners.routes]]
cluster = "echo"

[[listeners]]
name = "strict"
listen = "127.0.0.1:0"

[[listeners.routes]]
cluster = "echo"
timeout = "500ms"

[[clusters]]
name = "echo"
balancer = "{balancer}"
endpoints = {}

[[clusters]]
name = "doomed"
balancer = "{balancer}"
endpoints = {}
"#,
        endpoint_list(echo),
        endpoint_list(doomed)
    )
}

/// An endless server stream: `delay_ms` between messages.
fn endless(delay_ms: u32) -> EchoRequest {
    EchoRequest {
        count: 1_000_000,
        delay_ms,
        ..Default::default()
    }
}

/// Reads a server stream (or bidi response stream) to its end; returns (messages, final code).
async fn drain<T>(r: Result<tonic::Response<tonic::Streaming<T>>, tonic::Status>) -> (usize, Code) {
    let mut s = match r {
        Ok(s) => s.into_inner(),
        Err(e) => return (0, e.code()),
    };
    let mut n = 0;
    loop {
        match s.message().await {
            Ok(Some(_)) => n += 1,
            Ok(None) => return (n, Code::Ok),
            Err(e) => return (n, e.code()),
        }
    }
}

/// OK calls, backend-chosen errors, route deadlines (before and after the response started), client
/// cancels (before and after the response started) and a backend killed under open bidi streams,
/// partly concurrent: afterwards `grpcgate_endpoint_in_flight` is 0 for every endpoint and the request
/// counters by status are exactly what the clients saw.
async fn in_flight_is_zero_after_mixed_outcomes(balancer: &str) {
    let b0 = backend("b0", 0).await;
    let b1 = backend("b1", 0).await;
    let mut d0 = backend("d0", 0).await;
    let d1 = backend("d1", 0).await;
    let gw = start(&mixed_config(balancer, &[&b0, &b1], &[&d0, &d1])).await;
    let edge = edge_client(&gw).await;
    let strict = client(gw.listener_addr("strict").unwrap()).await;
    let mut want = BTreeMap::<&str, u64>::new();

    // OK: unary (concurrently) and server streams.
    let counts = spread_calls(&edge, 200, 8).await;
    assert_eq!(counts.values().sum::<usize>(), 200);
    *want.entry("OK").or_default() += 200;
    for _ in 0..10 {
        let mut c = edge.clone();
        let req = EchoRequest {
            count: 5,
            ..Default::default()
        };
        let got = bounded(async { drain(c.server_stream(req).await).await }).await;
        assert_eq!(got, (5, Code::Ok));
    }
    *want.entry("OK").or_default() += 10;

    // Errors chosen by the backend: unary, and a server stream that fails after its messages.
    let failing = (0..10).map(|_| {
        let mut c = edge.clone();
        async move {
            let r = c
                .unary(EchoRequest {
                    fail_code: Code::FailedPrecondition as i32,
                    fail_message: "no".into(),
                    ..Default::default()
                })
                .await;
            r.expect_err("must fail").code()
        }
    });
    for code in bounded(futures_util::future::join_all(failing)).await {
        assert_eq!(code, Code::FailedPrecondition);
    }
    *want.entry("FAILED_PRECONDITION").or_default() += 10;
    for _ in 0..5 {
        let mut c = edge.clone();
        let req = EchoRequest {
            count: 3,
            fail_code: Code::Aborted as i32,
            ..Default::default()
        };
        let got = bounded(async { drain(c.server_stream(req).await).await }).await;
        assert_eq!(got, (3, Code::Aborted));
    }
    *want.entry("ABORTED").or_default() += 5;

    // Route timeout (500ms): unary and client streaming before any response, server streaming in the
    // middle of the response. All concurrently.
    let mut deadline_calls = Vec::new();
    for _ in 0..4 {
        let mut c = strict.clone();
        deadline_calls.push(tokio::spawn(async move {
            c.unary(EchoRequest {
                delay_ms: 60_000,
                ..Default::default()
            })
            .await
            .expect_err("must time out")
            .code()
        }));
        let mut c = strict.clone();
        deadline_calls.push(tokio::spawn(async move {
            let msgs = vec![
                EchoRequest::default(),
                EchoRequest {
                    delay_ms: 60_000,
                    ..Default::default()
                },
            ];
            c.client_stream(tokio_stream::iter(msgs))
                .await
                .expect_err("must time out")
                .code()
        }));
        let mut c = strict.clone();
        deadline_calls.push(tokio::spawn(async move {
            let r = c.server_stream(endless(10)).await;
            drain(r).await.1
        }));
    }
    for t in deadline_calls {
        assert_eq!(bounded(t).await.unwrap(), Code::DeadlineExceeded);
    }
    *want.entry("DEADLINE_EXCEEDED").or_default() += 12;
    // Settle before counting calls in flight below.
    let so_far: Vec<(&str, u64)> = want.iter().map(|(k, v)| (*k, *v)).collect();
    wait_settled(&gw, &so_far).await;

    // Client cancels: unary calls dropped while the backend works on them (seen in flight at the
    // proxy first), and server streams dropped after their first message.
    let mut held = Vec::new();
    for _ in 0..6 {
        let mut c = edge.clone();
        held.push(tokio::spawn(async move {
            c.unary(EchoRequest {
                delay_ms: 60_000,
                ..Default::default()
            })
            .await
        }));
    }
    eventually(&gw, |s| {
        let n = in_flight(s, "echo");
        if n == 6.0 {
            Ok(())
        } else {
            Err(format!("{n} calls in flight to echo, want 6"))
        }
    })
    .await;
    for t in &held {
        t.abort();
    }
    for t in held {
        assert!(bounded(t).await.unwrap_err().is_cancelled());
    }
    for _ in 0..4 {
        let mut c = edge.clone();
        let mut s = bounded(c.server_stream(endless(5)))
            .await
            .expect("stream starts")
            .into_inner();
        bounded(s.message()).await.expect("message").expect("one");
        drop(s);
    }
    *want.entry("CANCELLED").or_default() += 10;

    // A backend killed under open bidi streams: the streams on d0 end UNAVAILABLE; those on d1 are
    // then cancelled by the client.
    let mut streams = Vec::new();
    for _ in 0..6 {
        let mut c = edge.clone();
        let (tx, rx) = mpsc::channel(4);
        bounded(tx.send(EchoRequest::default())).await.unwrap();
        let mut s = bounded(c.bidi(ReceiverStream::new(rx)))
            .await
            .expect("bidi starts")
            .into_inner();
        let first = bounded(s.message()).await.expect("message").expect("one");
        streams.push((first.backend, tx, s));
    }
    let on_d0 = streams.iter().filter(|(name, ..)| name == "d0").count();
    assert!(on_d0 > 0, "no bidi stream went to d0");
    kill(&mut d0);
    for (name, tx, mut s) in streams {
        if name == "d0" {
            let code = bounded(async {
                loop {
                    match s.message().await {
                        Ok(Some(_)) => {}
                        Ok(None) => break Code::Ok,
                        Err(e) => break e.code(),
                    }
                }
            })
            .await;
            assert_eq!(code, Code::Unavailable, "stream on the killed backend");
        } else {
            // Give the backend something to chew on, so that it cannot finish the call OK when the
            // request stream ends, then drop both halves: the client resets the stream. (Dropping
            // only the response stream does not: the client keeps the stream open while its request
            // stream is.)
            let busy = EchoRequest {
                delay_ms: 60_000,
                ..Default::default()
            };
            bounded(tx.send(busy)).await.expect("send");
            drop(s);
            drop(tx);
        }
    }
    *want.entry("UNAVAILABLE").or_default() += on_d0 as u64;
    *want.entry("CANCELLED").or_default() += (6 - on_d0) as u64;

    let want: Vec<(&str, u64)> = want.into_iter().collect();
    let s = wait_settled(&gw, &want).await;
    // Every endpoint has its gauge, and it reads 0.
    for (cluster, addr) in [
        ("echo", b0.addr),
        ("echo", b1.addr),
        ("doomed", d0.addr),
        ("doomed", d1.addr),
    ] {
        let ep = addr.to_string();
        let gauge = s.samples.iter().find(|x| {
            x.metric == "grpcgate_endpoint_in_flight"
                && x.labels.get("cluster") == Some(cluster)
                && x.labels.get("endpoint") == Some(ep.as_str())
        });
        let gauge = gauge.unwrap_or_else(|| panic!("no in-flight gauge for {cluster}/{ep}"));
        assert!(
            matches!(
                gauge.value,
                prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) if v == 0.0
            ),
            "{cluster}/{ep}: {:?}",
            gauge.value
        );
    }
    // And the balancers see the same: nothing in flight.
    for c in gw.clusters().iter() {
        for e in &c.endpoints {
            assert_eq!(e.in_flight(), 0, "{}/{}", c.name, e.address);
        }
    }
}

per_balancer!(in_flight_accounting, in_flight_is_zero_after_mixed_outcomes);

// ---------------------------------------------------------------------------------------------------
// Unhealthy and ejected endpoints are never picked while a healthy one exists
// ---------------------------------------------------------------------------------------------------

/// Three backends, the middle one with the largest weight; active health checks. Once b1 reports
/// NOT_SERVING and the proxy has marked it unhealthy, no call reaches it; once it serves again, it gets
/// calls again.
async fn unhealthy_endpoint_is_never_picked(balancer: &str) {
    let b0 = backend("b0", 0).await;
    let mut b1 = backend("b1", 0).await;
    let b2 = backend("b2", 0).await;
    let endpoints = format!(
        r#"["{}", {{ address = "{}", weight = 5 }}, "{}"]"#,
        b0.addr, b1.addr, b2.addr
    );
    let health = r#"
[clusters.health_check]
interval = "100ms"
timeout = "5s"
unhealthy_threshold = 1
healthy_threshold = 1
"#;
    let gw = start(&gateway_config(balancer, &endpoints, health)).await;
    let all = [b0.addr, b1.addr, b2.addr];
    eventually(&gw, |s| {
        let g: Vec<_> = all.iter().map(|a| healthy_gauge(s, *a)).collect();
        if g.iter().all(|v| *v == Some(1.0)) {
            Ok(())
        } else {
            Err(format!("healthy gauges {g:?}, want all 1"))
        }
    })
    .await;

    b1.health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    wait_healthy_gauge(&gw, b1.addr, 0.0).await;

    let client = edge_client(&gw).await;
    let counts = spread_calls(&client, 600, 8).await;
    assert_eq!(
        counts.get("b1"),
        None,
        "{balancer}: unhealthy b1 was picked: {counts:?}"
    );
    assert!(
        counts.contains_key("b0") && counts.contains_key("b2"),
        "{balancer}: both healthy endpoints should get calls: {counts:?}"
    );
    assert_eq!(b1.stats.started.load(SeqCst), 0);
    check_metrics_agree(
        &gw,
        &counts,
        &[("b0", b0.addr), ("b1", b1.addr), ("b2", b2.addr)],
    )
    .await;

    // Back to SERVING: picked again (it has 5/7 of the weight).
    b1.health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    wait_healthy_gauge(&gw, b1.addr, 1.0).await;
    let again = spread_calls(&client, 300, 8).await;
    assert!(
        again.get("b1").copied().unwrap_or(0) > 0,
        "{balancer}: recovered b1 never picked: {again:?}"
    );
}

per_balancer!(unhealthy_endpoint, unhealthy_endpoint_is_never_picked);

/// Two backends with outlier detection (one failure ejects, for 10 minutes). b1 is killed; after at
/// most a couple of failed calls it is ejected, and from then on every call succeeds on b0.
async fn ejected_endpoint_is_never_picked(balancer: &str) {
    let b0 = backend("b0", 0).await;
    let mut b1 = backend("b1", 0).await;
    let outlier = r#"
[clusters.outlier_detection]
consecutive_failures = 1
base_ejection_time = "10m"
max_ejection_percent = 50
"#;
    let gw = start(&gateway_config(
        balancer,
        &endpoint_list(&[&b0, &b1]),
        outlier,
    ))
    .await;
    let client = edge_client(&gw).await;
    // Both endpoints in use, with pooled connections.
    let warm = spread_calls(&client, 100, 4).await;
    assert!(warm.len() == 2, "{warm:?}");

    kill(&mut b1);
    let cluster = gw.clusters()[0].clone();
    let mut c = client.clone();
    let mut failures = 0;
    let mut attempts = 0;
    while !cluster.endpoints[1].is_ejected() {
        attempts += 1;
        assert!(attempts <= 50, "b1 not ejected after 50 calls");
        if let Err(s) = bounded(c.unary(EchoRequest::default())).await {
            assert_eq!(s.code(), Code::Unavailable, "{s:?}");
            failures += 1;
        }
    }
    assert!(
        failures <= 2,
        "{failures} calls failed before b1 was ejected"
    );
    wait_healthy_gauge(&gw, b1.addr, 0.0).await;

    let before = b0.stats.completed.load(SeqCst);
    let counts = spread_calls(&client, 500, 8).await;
    let want: BTreeMap<String, usize> = [("b0".to_string(), 500)].into();
    assert_eq!(counts, want, "{balancer}: every call must succeed on b0");
    assert_eq!(b0.stats.completed.load(SeqCst) - before, 500);
}

per_balancer!(ejected_endpoint, ejected_endpoint_is_never_picked);

// ---------------------------------------------------------------------------------------------------
// Reloads
// ---------------------------------------------------------------------------------------------------

/// An endpoint a reload removes stops being reported: its healthy and in-flight gauges go, while the
/// endpoints that stay keep theirs.
#[tokio::test]
async fn removed_endpoint_gauges_are_dropped_on_reload() {
    let b = backends(2).await;
    let text = config_text(&[b[0].addr, b[1].addr], "round_robin", "", "");
    let gw = start(&text).await;
    let mut c = edge_client(&gw).await;
    for _ in 0..4 {
        bounded(c.unary(EchoRequest::default()))
            .await
            .expect("call");
    }
    wait_healthy_gauge(&gw, b[1].addr, 1.0).await;
    let series = |s: &prometheus_parse::Scrape, name: &str, addr: SocketAddr| {
        let addr = addr.to_string();
        s.samples
            .iter()
            .filter(|x| x.metric == name && x.labels.get("endpoint") == Some(addr.as_str()))
            .count()
    };
    gw.reload(parse(&config_text(&[b[0].addr], "round_robin", "", "")))
        .expect("reload");
    let s = eventually(&gw, |s| match healthy_gauge(s, b[1].addr) {
        None => Ok(()),
        Some(v) => Err(format!("removed endpoint still reported healthy = {v}")),
    })
    .await;
    assert_eq!(series(&s, "grpcgate_endpoint_in_flight", b[1].addr), 0);
    assert_eq!(healthy_gauge(&s, b[0].addr), Some(1.0));
    assert_eq!(series(&s, "grpcgate_endpoint_in_flight", b[0].addr), 1);
    bounded(c.unary(EchoRequest::default()))
        .await
        .expect("call after reload");
}

/// Calls whose picked endpoint refuses connections fail over as the balancer would spread them: with
/// round robin over three endpoints, one refusing, the other two share evenly (not 1:2 in favour of the
/// one after it in the config).
#[tokio::test]
async fn connect_failover_spreads_evenly() {
    let (_keep, dead) = dead_endpoint();
    let b = backends(2).await;
    let gw = start(&config_text(
        &[b[0].addr, dead, b[1].addr],
        "round_robin",
        "",
        "",
    ))
    .await;
    let c = edge_client(&gw).await;
    let counts = spread_calls(&c, 120, 1).await;
    assert_eq!(counts.get("b0"), Some(&60), "{counts:?}");
    assert_eq!(counts.get("b1"), Some(&60), "{counts:?}");
}
