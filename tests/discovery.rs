//! Dynamic endpoint sets (issue 18): DNS clusters against a real DNS server on loopback, replicas on
//! 127.0.0.2–4 sharing one port like pods behind a headless Service, reloads that change one
//! endpoint, and slow start.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use common::dns::*;
use common::*;
use grpcgate::pb::echo::EchoRequest;
use parking_lot::Mutex;
use tonic::Code;

fn dns_config(dns: &DnsServer, port: u16, extra: &str) -> String {
    format!(
        r#"
workers = 2

[dns]
nameservers = ["{dns}"]

[admin]
listen = "127.0.0.1:0"

[[listeners]]
name = "edge"
listen = "127.0.0.1:0"

[[listeners.routes]]
cluster = "echo"

[[clusters]]
name = "echo"
balancer = "round_robin"
dns = "echo-headless.test.svc.cluster.local:{port}"
dns_refresh = "100ms"
{extra}

[clusters.health_check]
interval = "100ms"
timeout = "1s"
"#,
        dns = dns.addr
    )
}

/// `GET /clusters`, parsed.
async fn clusters(gw: &grpcgate::Gateway) -> serde_json::Value {
    let (status, body) = http_get(gw.admin_addr().unwrap(), "/clusters").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// The addresses `/clusters` lists for cluster `echo` that may receive calls.
async fn healthy_endpoints(gw: &grpcgate::Gateway) -> Vec<String> {
    let c = clusters(gw).await;
    let mut v: Vec<String> = c["clusters"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["healthy"] == true)
        .map(|e| e["address"].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

/// Polls `/clusters` until the healthy endpoints are exactly `want` (bounded by WAIT).
async fn wait_endpoints(gw: &grpcgate::Gateway, want: &[String]) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = healthy_endpoints(gw).await;
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "endpoints {got:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Steady load: `n` callers making unary calls until `stop`; counts calls per backend and failures.
struct Load {
    stop: Arc<AtomicBool>,
    /// Bumped by the test; each caller records the epoch its last finished call started in.
    epoch: Arc<AtomicU64>,
    done_epochs: Arc<Vec<AtomicU64>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    per_backend: Arc<Mutex<HashMap<String, u64>>>,
    failures: Arc<Mutex<Vec<String>>>,
}

impl Load {
    async fn start(gw: &grpcgate::Gateway, n: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let per_backend = Arc::new(Mutex::new(HashMap::new()));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let client = edge_client(gw).await;
        let epoch = Arc::new(AtomicU64::new(0));
        let done_epochs: Arc<Vec<AtomicU64>> =
            Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
        let tasks = (0..n)
            .map(|i| {
                let (stop, per, fail, mut c) = (
                    stop.clone(),
                    per_backend.clone(),
                    failures.clone(),
                    client.clone(),
                );
                let (epoch, done) = (epoch.clone(), done_epochs.clone());
                tokio::spawn(async move {
                    while !stop.load(SeqCst) {
                        let started_in = epoch.load(SeqCst);
                        let r = tokio::time::timeout(WAIT, c.unary(EchoRequest::default())).await;
                        done[i].store(started_in, SeqCst);
                        match r {
                            Ok(Ok(r)) => {
                                *per.lock().entry(r.into_inner().backend).or_insert(0) += 1
                            }
                            Ok(Err(s)) => {
                                fail.lock().push(format!("{:?}: {}", s.code(), s.message()))
                            }
                            Err(_) => fail.lock().push("timed out".into()),
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            epoch,
            done_epochs,
            tasks,
            per_backend,
            failures,
        }
    }

    /// Waits until every call that had started before now has finished (each caller has finished
    /// a call started after now).
    async fn wait_calls_started_before_now(&self) {
        let now = self.epoch.fetch_add(1, SeqCst) + 1;
        bounded(async {
            while self.done_epochs.iter().any(|d| d.load(SeqCst) < now) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
    }

    fn calls_to(&self, backend: &str) -> u64 {
        self.per_backend.lock().get(backend).copied().unwrap_or(0)
    }

    /// Waits until `backend` has had `n` more calls than now.
    async fn wait_calls(&self, backend: &str, n: u64) {
        let target = self.calls_to(backend) + n;
        bounded(async {
            while self.calls_to(backend) < target {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }

    async fn stop(self) -> (HashMap<String, u64>, Vec<String>) {
        self.stop.store(true, SeqCst);
        for t in self.tasks {
            bounded(t).await.unwrap();
        }
        let per = self.per_backend.lock().clone();
        let failures = self.failures.lock().clone();
        (per, failures)
    }
}

fn addr_list(port: u16, ips: &[u8]) -> Vec<String> {
    ips.iter().map(|l| format!("127.0.0.{l}:{port}")).collect()
}

// ---------------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_cluster_follows_its_records_under_load_without_failed_calls() {
    let (port, _pods) = pods().await;
    let dns = DnsServer::start(&[ip(2), ip(3)]).await;
    let gw = start(&dns_config(&dns, port, "")).await;
    // Every address of the answer is an endpoint, labelled ip:port.
    wait_endpoints(&gw, &addr_list(port, &[2, 3])).await;
    let c = clusters(&gw).await;
    assert_eq!(c["clusters"][0]["source"], "dns");
    assert_eq!(c["clusters"][0]["balancer"], "round_robin");

    let load = Load::start(&gw, 4).await;
    load.wait_calls("b2", 20).await;
    load.wait_calls("b3", 20).await;

    // A record added: the new pod gets calls within dns_refresh + a health check.
    dns.set(&[ip(2), ip(3), ip(4)], Mode::Answer);
    wait_endpoints(&gw, &addr_list(port, &[2, 3, 4])).await;
    load.wait_calls("b4", 20).await;

    // A record removed: that pod stops getting calls.
    dns.set(&[ip(3), ip(4)], Mode::Answer);
    wait_endpoints(&gw, &addr_list(port, &[3, 4])).await;
    // Calls sent to b2 before the change finish (as they should): wait for them.
    load.wait_calls_started_before_now().await;
    let b2_after = load.calls_to("b2");
    load.wait_calls("b4", 50).await;
    assert_eq!(
        load.calls_to("b2"),
        b2_after,
        "a removed endpoint got calls"
    );

    let (per, failures) = load.stop().await;
    assert!(failures.is_empty(), "failed calls: {failures:?}");
    println!("calls per backend: {per:?}");

    let s = scrape(&gw).await;
    assert!(
        sample(
            &s,
            "grpcgate_dns_resolutions_total",
            &[("cluster", "echo"), ("result", "success")]
        ) >= 3.0
    );
    // The removed endpoint's gauges went with it.
    let gone = format!("127.0.0.2:{port}");
    assert!(!s.samples.iter().any(
        |x| x.metric == "grpcgate_endpoint_healthy" && x.labels.get("endpoint") == Some(&gone)
    ));
    assert_eq!(
        sample(
            &s,
            "grpcgate_endpoint_healthy",
            &[("endpoint", &format!("127.0.0.4:{port}"))]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_failure_keeps_the_last_set_and_an_empty_answer_empties_the_cluster() {
    let (port, _pods) = pods().await;
    let dns = DnsServer::start(&[ip(2)]).await;
    let gw = start(&dns_config(&dns, port, "")).await;
    wait_endpoints(&gw, &addr_list(port, &[2])).await;
    let mut client = edge_client(&gw).await;

    // SERVFAIL: counted as failures, the last set keeps serving.
    dns.set(&[], Mode::ServFail);
    eventually(&gw, |s| {
        let n = sample(
            &s.clone(),
            "grpcgate_dns_resolutions_total",
            &[("result", "failure")],
        );
        if n >= 3.0 {
            Ok(())
        } else {
            Err(format!("{n} failures"))
        }
    })
    .await;
    for _ in 0..10 {
        bounded(client.unary(EchoRequest::default()))
            .await
            .expect("last set serves");
    }
    assert_eq!(healthy_endpoints(&gw).await, addr_list(port, &[2]));

    // NXDOMAIN: the service has no replicas. Calls get UNAVAILABLE, /ready says why.
    dns.set(&[], Mode::NxDomain);
    wait_endpoints(&gw, &[]).await;
    let e = bounded(client.unary(EchoRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let (status, body) = http_get(gw.admin_addr().unwrap(), "/ready").await;
    assert_eq!(status, 503, "{body}");
    let s = scrape(&gw).await;
    assert!(sample(&s, "grpcgate_dns_resolutions_total", &[("result", "empty")]) >= 1.0);

    // Records again: back in service.
    dns.set(&[ip(3)], Mode::Answer);
    wait_endpoints(&gw, &addr_list(port, &[3])).await;
    let r = bounded(client.unary(EchoRequest::default())).await.unwrap();
    assert_eq!(r.into_inner().backend, "b3");
    assert!(dns.queries.load(SeqCst) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_one_endpoint_keeps_the_others_state() {
    let b = backends(4).await;
    let text = |eps: &[SocketAddr]| {
        config_text(
            eps,
            "round_robin",
            "",
            "[clusters.outlier_detection]\nconsecutive_failures = 2\nbase_ejection_time = \"60s\"\nmax_ejection_percent = 33\n\
             [clusters.health_check]\ninterval = \"100ms\"\nstart_healthy = true\n",
        )
    };
    let first = [b[0].addr, b[1].addr, b[2].addr];
    let gw = start(&text(&first)).await;
    let mut client = edge_client(&gw).await;
    // Calls ending UNAVAILABLE eject one endpoint (the cap allows one of three).
    for _ in 0..6 {
        let _ = bounded(client.unary(EchoRequest {
            fail_code: Code::Unavailable as i32,
            ..Default::default()
        }))
        .await;
    }
    for _ in 0..6 {
        let _ = bounded(client.unary(EchoRequest::default())).await;
    }
    let before = gw.clusters()[0].endpoints.clone();
    let ejected: Vec<_> = before.iter().filter(|e| e.is_ejected()).collect();
    assert_eq!(ejected.len(), 1, "one endpoint ejected");
    let ejected_addr = ejected[0].address.clone();
    let conns: HashMap<String, usize> = before
        .iter()
        .map(|e| (e.address.clone(), e.pool.connections()))
        .collect();
    // Replace one endpoint that is not the ejected one.
    let replaced = before
        .iter()
        .find(|e| !e.is_ejected())
        .unwrap()
        .address
        .clone();
    let mut second: Vec<SocketAddr> = first
        .iter()
        .copied()
        .filter(|a| a.to_string() != replaced)
        .collect();
    second.push(b[3].addr);
    gw.reload(parse(&text(&second))).expect("reload");

    let after = gw.clusters()[0].endpoints.clone();
    for e in &after {
        if let Some(old) = before.iter().find(|o| o.address == e.address) {
            // The same endpoint object: connections, health, ejection and counters carried over.
            assert!(Arc::ptr_eq(old, e), "{} was rebuilt", e.address);
            assert_eq!(
                e.pool.connections(),
                conns[&e.address],
                "{} reconnected",
                e.address
            );
        }
    }
    let still = after.iter().find(|e| e.address == ejected_addr).unwrap();
    assert!(still.is_ejected(), "the reload cleared an ejection");
    assert!(!after.iter().any(|e| e.address == replaced));
    // The new endpoint serves (start_healthy) and the removed one gets nothing more.
    let b3_before = b[3].stats.completed.load(SeqCst);
    for _ in 0..10 {
        bounded(client.unary(EchoRequest::default())).await.unwrap();
    }
    assert!(b[3].stats.completed.load(SeqCst) > b3_before);
    let s = scrape(&gw).await;
    assert_eq!(
        sample(
            &s,
            "grpcgate_outlier_ejections_total",
            &[("endpoint", &ejected_addr)]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_start_gives_a_new_endpoint_a_small_share_at_first() {
    let b = backends(3).await;
    let text = |eps: &[SocketAddr]| config_text(eps, "round_robin", "", "slow_start = \"3s\"");
    let gw = start(&text(&[b[0].addr, b[1].addr])).await;
    let load = Load::start(&gw, 4).await;
    load.wait_calls("b0", 20).await;
    // b2 joins a running cluster: its weight starts at 10 % and ramps over 3 s.
    gw.reload(parse(&text(&[b[0].addr, b[1].addr, b[2].addr])))
        .expect("reload");
    let c = clusters(&gw).await;
    let weight = c["clusters"][0]["endpoints"][2]["weight"].as_f64().unwrap();
    assert!(weight < 0.3, "weight right after joining: {weight}");
    let start = (
        load.calls_to("b0") + load.calls_to("b1"),
        load.calls_to("b2"),
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    let early = (
        load.calls_to("b0") + load.calls_to("b1") - start.0,
        load.calls_to("b2") - start.1,
    );
    let early_share = early.1 as f64 / (early.0 + early.1) as f64;
    // Past the window, it gets its full share.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let late_start = (
        load.calls_to("b0") + load.calls_to("b1"),
        load.calls_to("b2"),
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    let late = (
        load.calls_to("b0") + load.calls_to("b1") - late_start.0,
        load.calls_to("b2") - late_start.1,
    );
    let late_share = late.1 as f64 / (late.0 + late.1) as f64;
    let (_, failures) = load.stop().await;
    assert!(failures.is_empty(), "{failures:?}");
    println!(
        "new endpoint's share: first 0.6 s {early_share:.3}, after the window {late_share:.3}"
    );
    // 10 % → 28 % of a full weight over the first 0.6 s: a share of at most ~12 %; a full third later.
    assert!(early_share < 0.18, "early share {early_share}");
    assert!(late_share > 0.28, "late share {late_share}");
    let c = clusters(&gw).await;
    assert_eq!(
        c["clusters"][0]["endpoints"][2]["weight"].as_f64(),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_slow_start_when_every_endpoint_is_new() {
    let b = backends(2).await;
    let gw = start(&config_text(
        &[b[0].addr, b[1].addr],
        "round_robin",
        "",
        "slow_start = \"30s\"",
    ))
    .await;
    let c = clusters(&gw).await;
    for e in c["clusters"][0]["endpoints"].as_array().unwrap() {
        assert_eq!(e["weight"].as_f64(), Some(1.0), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_can_turn_a_dns_cluster_static_and_its_dns_task_stops() {
    let (port, _pods) = pods().await;
    let dns = DnsServer::start(&[ip(2), ip(3)]).await;
    let gw = start(&dns_config(&dns, port, "")).await;
    wait_endpoints(&gw, &addr_list(port, &[2, 3])).await;
    let kept = gw.clusters()[0]
        .endpoints
        .iter()
        .find(|e| e.address == format!("127.0.0.3:{port}"))
        .unwrap()
        .clone();

    // Same cluster, now a static list with one of the two addresses: that endpoint is kept as is.
    let static_text = dns_config(&dns, port, "").replace(
        &format!("dns = \"echo-headless.test.svc.cluster.local:{port}\"\ndns_refresh = \"100ms\""),
        &format!("endpoints = [\"127.0.0.3:{port}\"]"),
    );
    assert!(static_text.contains("endpoints = ["), "{static_text}");
    gw.reload(parse(&static_text)).expect("reload");
    let c = clusters(&gw).await;
    assert_eq!(c["clusters"][0]["source"], "static");
    let after = gw.clusters()[0].endpoints.clone();
    assert_eq!(after.len(), 1);
    assert!(
        Arc::ptr_eq(&after[0], &kept),
        "the kept endpoint was rebuilt"
    );
    let mut client = edge_client(&gw).await;
    let r = bounded(client.unary(EchoRequest::default())).await.unwrap();
    assert_eq!(r.into_inner().backend, "b3");

    // The DNS task stopped: no more queries (one may have been in flight during the reload).
    let queries = dns.queries.load(SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        dns.queries.load(SeqCst) <= queries + 2,
        "DNS still queried after the cluster became static"
    );
    let s = scrape(&gw).await;
    let gone = format!("127.0.0.2:{port}");
    assert!(!s.samples.iter().any(
        |x| x.metric == "grpcgate_endpoint_healthy" && x.labels.get("endpoint") == Some(&gone)
    ));
}
