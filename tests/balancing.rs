//! End-to-end tests of the balancers (issue 5): real echo backends on loopback, an in-process gateway,
//! real tonic clients with many concurrent callers. Every balancer is run through the same scenarios:
//! equal backends, one backend that does not answer, weights 1:3, in-flight accounting after every kind of call
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

/// Runs `total` unary calls one after another, each picked on an idle cluster: before each call, waits
/// until the balancer sees no call in flight (the previous call's count is dropped just after its last
/// frame goes out, which can be after the client has seen it). Every pick is then the balancer's choice
/// on equal loads, whatever the machine's load, so random tie-breaks give a binomial count.
/// `held`: calls the test keeps in flight on purpose, which stay counted.
async fn idle_picks(
    gw: &Gateway,
    client: &EchoClient<Channel>,
    total: usize,
    held: usize,
) -> BTreeMap<String, usize> {
    let mut c = client.clone();
    let mut counts = BTreeMap::<String, usize>::new();
    for _ in 0..total {
        wait_in_flight(gw, held).await;
        let r = bounded(c.unary(EchoRequest::default()))
            .await
            .unwrap_or_else(|s| panic!("call failed: {s:?}"))
            .into_inner();
        *counts.entry(r.backend).or_default() += 1;
    }
    counts
}

/// Waits (bounded) until the balancers count exactly `n` calls in flight over every cluster.
async fn wait_in_flight(gw: &Gateway, n: usize) {
    let count = || -> usize {
        gw.clusters()
            .iter()
            .flat_map(|c| c.endpoints.iter())
            .map(|e| e.in_flight())
            .sum()
    };
    bounded(async {
        // Polled: the count has no notification.
        while count() != n {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
}

/// Asserts that `got` of `n` independent picks, each going this way with probability `p`, is within
/// six standard deviations of the mean: a false failure has odds of about one in 500 million.
fn assert_binomial(what: &str, got: usize, n: usize, p: f64) {
    let (mean, sd) = (n as f64 * p, (n as f64 * p * (1.0 - p)).sqrt());
    assert!(
        (got as f64 - mean).abs() <= 6.0 * sd,
        "{what}: {got} of {n}, want {mean} ± {:.0} (6 σ)",
        6.0 * sd
    );
}

// ---------------------------------------------------------------------------------------------------
// Two backends of equal capacity: an even spread (round robin exactly even)
// ---------------------------------------------------------------------------------------------------

/// Round robin with 16 concurrent callers: exactly even. The load-aware balancers, called on an idle
/// cluster each time (see [`idle_picks`]): a fair coin between equals.
async fn equal_backends_share_evenly(balancer: &str) {
    let b0 = backend("b0", 0).await;
    let b1 = backend("b1", 0).await;
    let gw = start(&gateway_config(balancer, &endpoint_list(&[&b0, &b1]), "")).await;
    let client = edge_client(&gw).await;
    let counts = if balancer == "round_robin" {
        let counts = spread_calls(&client, 10_000, 16).await;
        let want: BTreeMap<String, usize> =
            [("b0".to_string(), 5000), ("b1".to_string(), 5000)].into();
        assert_eq!(counts, want, "round robin must be exact");
        counts
    } else {
        const CALLS: usize = 3000;
        let counts = idle_picks(&gw, &client, CALLS, 0).await;
        let b0_calls = counts.get("b0").copied().unwrap_or(0);
        assert_binomial(&format!("{balancer}: b0's calls"), b0_calls, CALLS, 0.5);
        counts
    };
    eprintln!("{balancer}: equal backends: {counts:?}");
    check_metrics_agree(&gw, &counts, &[("b0", b0.addr), ("b1", b1.addr)]).await;
}

per_balancer!(equal_backends, equal_backends_share_evenly);

// ---------------------------------------------------------------------------------------------------
// One backend that does not answer: load-aware balancers route around it, round robin does not
// ---------------------------------------------------------------------------------------------------

/// A fast backend and a slow one. Round robin, the control, sends the slow one every other call:
/// with sequential calls, exactly half. The load-aware balancers are shown, by count rather than by
/// timing, to route around a backend with calls in flight: calls go one at a time until one lands on
/// a slow backend that holds it for longer than the test runs; from then on, with that call held and
/// the fast backend idle before each pick, every one of 200 calls must go to the fast backend (with
/// two endpoints both compare their loads, and 1 > 0 whatever the machine's load).
async fn slow_backend_gets_few_calls(balancer: &str) {
    if balancer == "round_robin" {
        let fast = backend("fast", 0).await;
        let slow = backend("slow", 20).await;
        let gw = start(&gateway_config(
            balancer,
            &endpoint_list(&[&fast, &slow]),
            "",
        ))
        .await;
        let client = edge_client(&gw).await;
        let counts = spread_calls(&client, 200, 1).await;
        let want: BTreeMap<String, usize> =
            [("fast".to_string(), 100), ("slow".to_string(), 100)].into();
        assert_eq!(counts, want, "round robin must be exact");
        check_metrics_agree(&gw, &counts, &[("fast", fast.addr), ("slow", slow.addr)]).await;
        return;
    }
    let fast = backend("fast", 0).await;
    let slow = backend("slow", 3_600_000).await;
    let gw = start(&gateway_config(
        balancer,
        &endpoint_list(&[&fast, &slow]),
        "",
    ))
    .await;
    let client = edge_client(&gw).await;
    // One at a time until the slow backend holds a call: each pick between two idle endpoints is a
    // coin flip, so 100 picks all going to the fast one would be a bug (odds 2^-100).
    let mut held = None;
    for _ in 0..100 {
        wait_in_flight(&gw, 0).await;
        let mut c = client.clone();
        let mut call = tokio::spawn(async move { c.unary(EchoRequest::default()).await });
        let answered = bounded(async {
            tokio::select! {
                r = &mut call => Some(r),
                _ = slow.stats.wait_started(1) => None,
            }
        })
        .await;
        match answered {
            Some(r) => {
                let r = r
                    .expect("call task")
                    .unwrap_or_else(|s| panic!("call failed: {s:?}"));
                assert_eq!(r.into_inner().backend, "fast");
            }
            None => {
                held = Some(call);
                break;
            }
        }
    }
    let held =
        held.unwrap_or_else(|| panic!("{balancer}: 100 idle picks never chose the slow backend"));
    let counts = idle_picks(&gw, &client, 200, 1).await;
    let want: BTreeMap<String, usize> = [("fast".to_string(), 200)].into();
    assert_eq!(
        counts, want,
        "{balancer}: a call went to the backend with a call in flight"
    );
    assert_eq!(slow.stats.started.load(SeqCst), 1);
    // The held call, cancelled by its client, is cancelled through to the slow backend.
    held.abort();
    bounded(slow.stats.wait_cancelled(1)).await;
    wait_in_flight(&gw, 0).await;
}

per_balancer!(slow_backend, slow_backend_gets_few_calls);

// ---------------------------------------------------------------------------------------------------
// Weights 1:3 give 25/75
// ---------------------------------------------------------------------------------------------------

/// Round robin with 64 concurrent callers: exactly 1:3. The load-aware balancers on an idle cluster
/// (see [`idle_picks`]) pick in proportion to weight: a binomial count with p = 1/4.
async fn weights_one_to_three(balancer: &str) {
    let light = backend("light", 0).await;
    let heavy = backend("heavy", 0).await;
    let endpoints = format!(
        r#"["{}", {{ address = "{}", weight = 3 }}]"#,
        light.addr, heavy.addr
    );
    let gw = start(&gateway_config(balancer, &endpoints, "")).await;
    let client = edge_client(&gw).await;
    let counts = if balancer == "round_robin" {
        let counts = spread_calls(&client, 800, 64).await;
        let want: BTreeMap<String, usize> =
            [("heavy".to_string(), 600), ("light".to_string(), 200)].into();
        assert_eq!(counts, want, "weighted round robin must be exact");
        counts
    } else {
        const CALLS: usize = 3000;
        let counts = idle_picks(&gw, &client, CALLS, 0).await;
        let light_calls = counts.get("light").copied().unwrap_or(0);
        assert_binomial(
            &format!("{balancer}: the weight-1 backend's calls"),
            light_calls,
            CALLS,
            0.25,
        );
        counts
    };
    eprintln!("{balancer}: weights 1:3: {counts:?}");
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
