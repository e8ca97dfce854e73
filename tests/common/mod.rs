//! Shared helpers for the integration tests: real echo backends, a real gateway, real clients.
#![allow(dead_code)]

pub mod binary;
pub mod dns;
pub mod hostile;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use grpcgate::echo::EchoBackend;
use grpcgate::pb::echo::echo_client::EchoClient;
use grpcgate::{Config, Gateway};
use tonic::transport::{Channel, Endpoint};

/// Every wait in a test is bounded by this.
pub const WAIT: Duration = Duration::from_secs(20);

/// Runs a future with the test timeout.
pub async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(WAIT, f).await.expect("timed out")
}

/// Starts `n` echo backends named b0, b1, ... with no delay.
pub async fn backends(n: usize) -> Vec<EchoBackend> {
    let mut v = Vec::new();
    for i in 0..n {
        v.push(
            EchoBackend::start(&format!("b{i}"), Duration::ZERO)
                .await
                .expect("backend"),
        );
    }
    v
}

/// A config with two data-plane workers (the same on every machine), an admin server, one h2c listener
/// "edge" on a free port routing everything to cluster "echo" over `endpoints`; `extra_route` (TOML) is
/// inserted as the listener's first route, and `cluster_extra` is appended to the cluster table.
pub fn config_text(
    endpoints: &[SocketAddr],
    balancer: &str,
    route_extra: &str,
    cluster_extra: &str,
) -> String {
    let eps: Vec<String> = endpoints.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        r#"
workers = 2

[admin]
listen = "127.0.0.1:0"

[[listeners]]
name = "edge"
listen = "127.0.0.1:0"

[[listeners.routes]]
cluster = "echo"
{route_extra}

[[clusters]]
name = "echo"
balancer = "{balancer}"
endpoints = [{eps}]
{cluster_extra}
"#,
        eps = eps.join(", ")
    )
}

/// Adds `extra` (TOML keys) to the "edge" listener of a [`config_text`] config.
pub fn with_listener_keys(text: &str, extra: &str) -> String {
    let marker = "name = \"edge\"\nlisten = \"127.0.0.1:0\"\n";
    assert!(text.contains(marker), "not a config_text config");
    text.replacen(marker, &format!("{marker}{extra}\n"), 1)
}

/// Parses config text, panicking with the error.
pub fn parse(text: &str) -> Config {
    Config::parse(text, "test.toml", Path::new(".")).unwrap_or_else(|e| panic!("{e}"))
}

/// Parses config text (panicking with the error) and starts a gateway.
pub async fn start(text: &str) -> Gateway {
    Gateway::start(parse(text)).await.expect("gateway start")
}

/// A gateway in front of `backends` with round robin and no extras.
pub async fn gateway_for(backends: &[EchoBackend]) -> Gateway {
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    start(&config_text(&addrs, "round_robin", "", "")).await
}

/// An echo client over one h2c connection to `addr`.
pub async fn client(addr: SocketAddr) -> EchoClient<Channel> {
    let ch = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(WAIT)
        .connect()
        .await
        .expect("connect");
    EchoClient::new(ch)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

/// The client for a gateway's "edge" listener.
pub async fn edge_client(gw: &Gateway) -> EchoClient<Channel> {
    client(gw.listener_addr("edge").unwrap()).await
}

/// Fetches `/metrics` from the gateway's admin server over real HTTP and parses it.
pub async fn scrape(gw: &Gateway) -> prometheus_parse::Scrape {
    let (_, body) = http_get(gw.admin_addr().unwrap(), "/metrics").await;
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .expect("valid prometheus text")
}

/// The value of a sample with exactly these labels (a subset match), or 0 if absent.
pub fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

/// A minimal HTTP/1.1 GET; returns (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = bounded(tokio::net::TcpStream::connect(addr))
        .await
        .expect("connect admin");
    let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    bounded(s.read_to_end(&mut buf)).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A loopback address with nothing listening on it: the port is bound (so no other test can take it)
/// but never listened on, so a connect is refused. Keep the returned socket alive while the address is
/// in use.
pub fn dead_endpoint() -> (tokio::net::TcpSocket, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().unwrap())
        .expect("bind a free port");
    let addr = socket.local_addr().expect("local addr");
    (socket, addr)
}

/// Scrapes `/metrics` until `check` accepts the scrape (returns `Ok`), and returns that scrape. Metrics
/// are updated just after a call's last frame goes out, so a test that has seen a call end must wait for
/// the metric rather than read it once. Panics with the last `check` error after [`WAIT`].
pub async fn eventually<F>(gw: &Gateway, check: F) -> prometheus_parse::Scrape
where
    F: Fn(&prometheus_parse::Scrape) -> Result<(), String>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let s = scrape(gw).await;
        match check(&s) {
            Ok(()) => return s,
            Err(e) if tokio::time::Instant::now() >= deadline => {
                panic!("metrics never reached the expected state: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// `grpcgate_requests_total` summed by `grpc_status` (statuses with a zero count left out).
pub fn status_counts(s: &prometheus_parse::Scrape) -> std::collections::BTreeMap<String, f64> {
    let mut m = std::collections::BTreeMap::new();
    for x in s
        .samples
        .iter()
        .filter(|x| x.metric == "grpcgate_requests_total")
    {
        if let prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) = x.value {
            if v != 0.0 {
                *m.entry(x.labels.get("grpc_status").unwrap_or("").to_string())
                    .or_insert(0.0) += v;
            }
        }
    }
    m
}

/// Every `grpcgate_endpoint_in_flight` sample that is not 0, as (endpoint, value).
pub fn busy_endpoints(s: &prometheus_parse::Scrape) -> Vec<(String, f64)> {
    s.samples
        .iter()
        .filter(|x| x.metric == "grpcgate_endpoint_in_flight")
        .filter_map(|x| match x.value {
            prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) if v != 0.0 => {
                Some((x.labels.get("endpoint").unwrap_or("").to_string(), v))
            }
            _ => None,
        })
        .collect()
}

/// Waits until no call is in flight to any endpoint and `grpcgate_requests_total` by status is exactly
/// `expected` (status name, count); returns that scrape.
pub async fn wait_settled(gw: &Gateway, expected: &[(&str, u64)]) -> prometheus_parse::Scrape {
    let want: std::collections::BTreeMap<String, f64> = expected
        .iter()
        .filter(|(_, n)| *n != 0)
        .map(|(k, n)| (k.to_string(), *n as f64))
        .collect();
    eventually(gw, |s| {
        let busy = busy_endpoints(s);
        let got = status_counts(s);
        if busy.is_empty() && got == want {
            Ok(())
        } else {
            Err(format!(
                "in flight {busy:?} (want none); requests by status {got:?} (want {want:?})"
            ))
        }
    })
    .await
}

/// Waits until `sample(name, labels)` is exactly `want`; returns that scrape.
pub async fn wait_sample(
    gw: &Gateway,
    name: &str,
    labels: &[(&str, &str)],
    want: f64,
) -> prometheus_parse::Scrape {
    eventually(gw, |s| {
        let got = sample(s, name, labels);
        if got == want {
            Ok(())
        } else {
            Err(format!("{name}{labels:?} is {got}, want {want}"))
        }
    })
    .await
}

/// Whether tonic failed a call because its connection had just received GOAWAY, before the call
/// left the client: hyper dropped it from its queue (`CANCELLED: operation was canceled`), or h2
/// refused to open its stream on a connection going away (an h2 GOAWAY NO_ERROR error, which tonic
/// reports as `INTERNAL: h2 protocol error`). A test that sends such a call again must check that the
/// proxy never counted it (tests/nlb.rs, tests/chaos.rs).
pub fn unsent_in_client(s: &tonic::Status) -> bool {
    if s.code() == tonic::Code::Cancelled && s.message() == "operation was canceled" {
        return true;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(s);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.is_go_away() && h2.reason() == Some(h2::Reason::NO_ERROR);
        }
        source = e.source();
    }
    false
}
