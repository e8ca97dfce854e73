//! `weighted_round_robin` from backend load reports (ORCA, issue 21): real tonic backends that report
//! their utilization in `endpoint-load-metrics-bin` trailers, the real gateway between them and a
//! client, and the trailers as the client sees them.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use common::hostile::{raw_client, request};
use common::*;
use grpcgate::echo::EchoBackend;
use grpcgate::pb::echo::EchoRequest;

fn config(backends: &[&EchoBackend], extra: &str) -> String {
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    config_text(&addrs, "weighted_round_robin", "", extra)
}

/// `n` sequential calls; how many each backend answered.
async fn calls(gw: &grpcgate::Gateway, n: usize) -> BTreeMap<String, usize> {
    let mut client = edge_client(gw).await;
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        let r = bounded(client.unary(EchoRequest::default()))
            .await
            .expect("call")
            .into_inner();
        *counts.entry(r.backend).or_default() += 1;
    }
    counts
}

/// The trailers of one unary call made through the gateway, as a client receives them.
async fn trailers_seen_by_client(gw: &grpcgate::Gateway) -> http::HeaderMap {
    let addr = gw.listener_addr("edge").unwrap();
    let client = raw_client(addr, h2::client::Builder::new()).await;
    let mut ready = bounded(client.ready()).await.unwrap();
    let (resp, mut send) = ready
        .send_request(request(addr, "/echo.Echo/Unary", &[]), false)
        .unwrap();
    send.send_data(common::hostile::grpc_frame(&EchoRequest::default()), true)
        .unwrap();
    let (_, mut body) = bounded(resp).await.unwrap().into_parts();
    while let Some(chunk) = bounded(body.data()).await {
        let _ = body.flow_control().release_capacity(chunk.unwrap().len());
    }
    bounded(body.trailers()).await.unwrap().expect("trailers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_follow_the_reported_utilization_past_the_blackout() {
    let busy = EchoBackend::start_reporting("busy", 0.9).await.unwrap();
    let idle_a = EchoBackend::start_reporting("idle_a", 0.3).await.unwrap();
    let idle_b = EchoBackend::start_reporting("idle_b", 0.3).await.unwrap();
    let gw = start(&config(
        &[&busy, &idle_a, &idle_b],
        "blackout_period = \"2s\"\nweight_update_period = \"100ms\"",
    ))
    .await;
    // In the blackout: plain round robin, an even spread.
    let first = calls(&gw, 15).await;
    assert_eq!(first.get("busy"), Some(&5), "{first:?}");
    // Past the blackout (reports kept arriving with the calls above and below) the weights are
    // qps / utilization: 1/0.9 against 1/0.3 twice, so the busy backend's share is 1/7.
    let deadline = tokio::time::Instant::now() + WAIT;
    let counts = loop {
        let counts = calls(&gw, 70).await;
        if counts.get("busy").copied().unwrap_or(0) < 20 || tokio::time::Instant::now() > deadline {
            break counts;
        }
    };
    let counts = {
        let mut total = counts;
        for (k, v) in calls(&gw, 700).await {
            *total.entry(k).or_default() += v;
        }
        total
    };
    let n: usize = counts.values().sum();
    let busy_share = counts.get("busy").copied().unwrap_or(0) as f64 / n as f64;
    eprintln!("with reports: {counts:?} (busy share {busy_share:.3}, expected 0.143)");
    // Within 10 % of the reported capacity ratio.
    assert!(
        (busy_share - 1.0 / 7.0).abs() < 0.1 / 7.0 + 0.01,
        "busy share {busy_share}: {counts:?}"
    );
    // The operator sees the schedule's shares in GET /clusters.
    let (status, body) = http_get(gw.admin_addr().expect("admin"), "/clusters").await;
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let endpoints = json["clusters"][0]["endpoints"]
        .as_array()
        .expect("endpoints");
    let share_of = |addr: SocketAddr| {
        endpoints
            .iter()
            .find(|e| e["address"] == addr.to_string())
            .and_then(|e| e["computed_share"].as_f64())
            .unwrap_or_else(|| panic!("computed_share of {addr}: {body}"))
    };
    let busy_computed = share_of(busy.addr);
    assert!(
        (busy_computed - 1.0 / 7.0).abs() < 0.1 / 7.0,
        "computed share {busy_computed}: {body}"
    );
    assert!(
        (share_of(idle_a.addr) - 3.0 / 7.0).abs() < 0.3 / 7.0,
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_reports_are_removed_unless_forwarding_is_on() {
    let b = EchoBackend::start_reporting("b", 0.5).await.unwrap();
    for (extra, forwarded) in [("", false), ("forward_load_reports = true", true)] {
        let gw = start(&config(&[&b], extra)).await;
        let trailers = trailers_seen_by_client(&gw).await;
        assert_eq!(trailers.get("grpc-status").unwrap(), "0");
        assert_eq!(
            trailers.contains_key("endpoint-load-metrics-bin"),
            forwarded,
            "{extra:?}: {trailers:?}"
        );
    }
    // Other balancers remove them too.
    let gw = start(&config_text(&[b.addr], "round_robin", "", "")).await;
    assert!(!trailers_seen_by_client(&gw)
        .await
        .contains_key("endpoint-load-metrics-bin"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_reports_spread_evenly_and_without_reports_it_is_round_robin() {
    let a = EchoBackend::start_reporting("a", 0.5).await.unwrap();
    let b = EchoBackend::start_reporting("b", 0.5).await.unwrap();
    let gw = start(&config(
        &[&a, &b],
        "blackout_period = \"0s\"\nweight_update_period = \"100ms\"",
    ))
    .await;
    let counts = calls(&gw, 200).await;
    assert_eq!(counts.get("a"), Some(&100), "{counts:?}");
    let plain = backends(2).await;
    let gw = start(&config_text(
        &[plain[0].addr, plain[1].addr],
        "weighted_round_robin",
        "",
        "",
    ))
    .await;
    let counts = calls(&gw, 100).await;
    assert_eq!(counts.get("b0"), Some(&50), "{counts:?}");
}
