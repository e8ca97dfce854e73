//! `grpcgate demo`: the proxy end to end with no set-up.
//!
//! Starts three echo backends in-process on loopback (one of them deliberately slow), puts the proxy in
//! front of them from the built-in config (`config/demo.toml` with the real ports swapped in), drives a
//! few seconds of concurrent unary and server-streaming load through it with tonic clients, and prints
//! how the calls were spread over the backends, their latency and the gRPC status counts, next to what
//! the proxy's own `/metrics` counted.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::task::JoinSet;
use tonic::transport::{Channel, Endpoint};

use crate::config::BalancerKind;
use crate::echo::EchoBackend;
use crate::grpc::Code;
use crate::pb::echo::echo_client::EchoClient;
use crate::pb::echo::EchoRequest;
use crate::{Config, Gateway};

/// The demo's config as checked in; [`demo_config`] rewrites its addresses and balancer.
pub const DEMO_CONFIG: &str = include_str!("../config/demo.toml");

/// Where the built-in config's errors point (it has no file of its own).
const DEMO_ORIGIN: &str = "<built-in demo config>";

/// The backends: name, the port `config/demo.toml` gives it, and the delay before each answer.
/// The fast ones wait a little too, so latency measures the balancer's choices rather than only CPU
/// contention on a small machine; the slow one is ten times slower, which any balancer that looks at
/// load steers around.
const BACKENDS: [(&str, u16, Duration); 3] = [
    ("fast-1", 50051, Duration::from_millis(1)),
    ("fast-2", 50052, Duration::from_millis(1)),
    ("slow-3", 50053, Duration::from_millis(10)),
];

/// The ORCA section's backends: name and the utilization each reports in its load-report trailer
/// (all answer after 1 ms; only what they say about themselves differs).
const ORCA_BACKENDS: [(&str, f64); 3] = [("idle-1", 0.3), ("idle-2", 0.3), ("busy-3", 0.9)];

/// The ORCA section's load: this many workers, each making this many calls one after another
/// (a few hundred calls: a fraction of a second).
const ORCA_WORKERS: u32 = 8;
const ORCA_CALLS_PER_WORKER: u32 = 100;

/// Client connections the workers share: several, so the proxy sees more than one downstream
/// connection, but fewer than workers, so calls multiplex as they do in real gRPC clients.
const CONNECTIONS: u32 = 4;

/// Every this-many-th call of a worker is server-streaming; the rest are unary.
const STREAM_EVERY: u64 = 4;

/// Messages per server-streaming call (the backend waits its delay before each one).
const STREAM_MESSAGES: u32 = 5;

/// Payload of each request, echoed back and checked.
const PAYLOAD: &[u8] = b"grpcgate demo payload: 0123456789abcdefghijklmnopqrstuvwxyz";

/// Upper bound for one call: sent as `grpc-timeout` and enforced here too, so a stuck call can never
/// hang the demo.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the demo waits for every backend to pass its first health check before it gives up.
/// The endpoints start unhealthy and the proxy checks each at once and then every second (the demo
/// config's `interval`), so they are normally healthy within milliseconds; 10 s leaves room for a
/// busy machine and a few failed checks.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the demo looks at the endpoints' health while it waits.
const READY_POLL: Duration = Duration::from_millis(10);

/// How long shutdown waits for in-flight calls (there should be none left by then).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Options of `grpcgate demo`.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Seconds of load to drive through the proxy.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub seconds: u64,

    /// Concurrent client workers, each making one call at a time (shared over a few connections).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub concurrency: u32,

    /// Load-balancing algorithm for the backends' cluster; try each to compare the spread.
    #[arg(
        long,
        default_value = "least_request",
        value_parser = clap::builder::PossibleValuesParser::new(BalancerKind::NAMES)
    )]
    pub balancer: String,
}

/// Runs the demo: backends, proxy, load, report, clean shutdown.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let mut backends = Vec::with_capacity(BACKENDS.len());
    for (name, _, delay) in BACKENDS {
        let backend = EchoBackend::start(name, delay)
            .await
            .with_context(|| format!("starting echo backend {name}"))?;
        backends.push(backend);
    }
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();

    let text = demo_config(&addrs, &args.balancer)?;
    let config = Config::parse(&text, DEMO_ORIGIN, Path::new("."))?;
    let gateway = Gateway::start(config).await.context("starting the proxy")?;
    let edge = gateway
        .listener_addr("edge")
        .context("the demo config has no listener named \"edge\"")?;

    println!("grpcgate demo");
    for ((name, _, delay), addr) in BACKENDS.iter().zip(&addrs) {
        println!(
            "  backend  {name:<7} {addr:<21} answers after {}",
            fmt_delay(*delay)
        );
    }
    println!(
        "  proxy    edge    {edge:<21} h2c, balancer {}",
        args.balancer
    );
    if let Some(admin) = gateway.admin_addr() {
        println!("  admin            http://{admin}/metrics");
    }
    // Endpoints start unhealthy until their first health check passes; a call before that fails
    // with UNAVAILABLE, which is the proxy doing its job but not what the showcase is about.
    match wait_until_healthy(&gateway, &addrs).await {
        Ok(waited) => println!(
            "  ready            every backend passed its first health check after {} ms",
            waited.as_millis()
        ),
        Err(e) => {
            gateway.shutdown(DRAIN_TIMEOUT).await;
            return Err(e);
        }
    }
    let connections = CONNECTIONS.min(args.concurrency);
    println!(
        "  load     {} workers over {connections} connections for {} s: 1 call in {STREAM_EVERY} \
         server-streaming ({STREAM_MESSAGES} messages), the rest unary",
        args.concurrency, args.seconds
    );
    println!();

    let mut clients = Vec::with_capacity(connections as usize);
    for _ in 0..connections {
        // One `connect` is one HTTP/2 connection; clones of the client multiplex streams over it.
        let channel = Endpoint::from_shared(format!("http://{edge}"))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .with_context(|| format!("connecting to the proxy at {edge}"))?;
        clients.push(EchoClient::new(channel));
    }

    let (tally, elapsed) = drive_load(&clients, &args).await?;
    drop(clients);

    // Shut down before reading the proxy's counters: once drained, every call has been counted.
    let metrics = gateway.metrics().clone();
    if !gateway.shutdown(DRAIN_TIMEOUT).await {
        eprintln!("grpcgate demo: warning: calls were still in flight when the proxy shut down");
    }
    let proxy = ProxyCounts::parse(&metrics.encode());

    report(&tally, elapsed, &addrs, &proxy);
    // Dropping the backends stops their threads.
    drop(backends);

    orca_section().await?;

    println!();
    let others: Vec<String> = BalancerKind::NAMES
        .iter()
        .filter(|n| **n != args.balancer)
        .map(|n| format!("`--balancer {n}`"))
        .collect();
    println!("Run again with {} to compare.", others.join(" or "));
    Ok(())
}

/// A second, short showcase: backends that report their own load (ORCA) behind a
/// `weighted_round_robin` cluster, one of them reporting itself three times as busy as the others.
/// Each backend's weight is qps / utilization (gRFC A58), so the busy one gets a third of the calls
/// of each idle one, about 1/7 of them, where round robin would give it 1/3.
async fn orca_section() -> anyhow::Result<()> {
    let mut backends = Vec::with_capacity(ORCA_BACKENDS.len());
    for (name, utilization) in ORCA_BACKENDS {
        let b =
            EchoBackend::start_reporting_with_delay(name, Duration::from_millis(1), utilization)
                .await
                .with_context(|| format!("starting echo backend {name}"))?;
        backends.push(b);
    }
    let endpoints: Vec<String> = backends.iter().map(|b| format!("\"{}\"", b.addr)).collect();
    // No blackout: the demo shows the weights, not their warm-up (gRPC's default waits 10 s).
    let text = format!(
        "[[listeners]]\nname = \"orca\"\nlisten = \"127.0.0.1:0\"\n\n[[listeners.routes]]\n\
         cluster = \"orca\"\ntimeout = \"10s\"\n\n[[clusters]]\nname = \"orca\"\n\
         balancer = \"weighted_round_robin\"\nblackout_period = \"0s\"\nendpoints = [{}]\n",
        endpoints.join(", ")
    );
    let config = Config::parse(&text, DEMO_ORIGIN, Path::new("."))?;
    let gateway = Gateway::start(config)
        .await
        .context("starting the ORCA proxy")?;
    let result = orca_load(&gateway).await;
    gateway.shutdown(DRAIN_TIMEOUT).await;
    drop(backends);
    let (tally, rr_calls) = result?;

    let answered: u64 = tally.backends.values().map(|b| b.calls).sum();
    println!();
    println!(
        "ORCA load reports: another proxy, balancer weighted_round_robin, over three backends that \
         report their utilization in an `endpoint-load-metrics-bin` trailer ({rr_calls} calls to \
         collect the first reports, then {answered} calls)"
    );
    println!(
        "{:<8} {:>11} {:>9} {:>7}",
        "backend", "reports", "calls", "share"
    );
    for (name, utilization) in ORCA_BACKENDS {
        let calls = tally.backends.get(name).map_or(0, |b| b.calls);
        println!(
            "{name:<8} {:>11} {calls:>9} {:>6.1}%",
            format!("cpu {utilization}"),
            100.0 * calls as f64 / answered.max(1) as f64
        );
    }
    let statuses: Vec<String> = tally
        .statuses
        .iter()
        .map(|(code, n)| format!("{code} {n}"))
        .collect();
    println!(
        "ORCA status   {}; weight = qps / utilization, so busy-3 should get 1/3 of each idle \
         backend's calls (1/7 = 14.3 %), not round robin's 33.3 %",
        statuses.join(", ")
    );
    if tally.statuses.keys().any(|c| *c != "OK") || tally.bad_payloads > 0 {
        println!(
            "warning       ORCA section: calls that did not succeed or echoed the wrong payload"
        );
    }
    Ok(())
}

/// The ORCA section's calls: one round robin round so that every backend has reported (a report is
/// recorded as its trailers pass the proxy, before the client sees the call end), the schedule
/// rebuilt from those reports at once (rather than at the next `weight_update_period` tick, so the
/// counts do not depend on timing), then the measured calls. Returns their tally and how many
/// calls the first round took.
async fn orca_load(gateway: &Gateway) -> anyhow::Result<(Tally, u64)> {
    let addr = gateway.listener_addr("orca").context("no ORCA listener")?;
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connecting to the ORCA proxy at {addr}"))?;
    let mut client = EchoClient::new(channel);
    let mut first = Tally::default();
    for _ in 0..ORCA_BACKENDS.len() {
        let started = Instant::now();
        let outcome = tokio::time::timeout(CALL_TIMEOUT, unary_call(&mut client))
            .await
            .context("an ORCA call timed out")?;
        first.record(false, &outcome, started.elapsed());
    }
    anyhow::ensure!(
        first.statuses.keys().all(|c| *c == "OK"),
        "the first ORCA calls failed: {:?}",
        first.statuses
    );
    for c in gateway.clusters().iter() {
        c.refresh_weights();
    }
    let mut workers = JoinSet::new();
    for _ in 0..ORCA_WORKERS {
        let mut client = client.clone();
        workers.spawn(async move {
            let mut tally = Tally::default();
            for _ in 0..ORCA_CALLS_PER_WORKER {
                let started = Instant::now();
                let outcome = tokio::time::timeout(CALL_TIMEOUT, unary_call(&mut client))
                    .await
                    .unwrap_or(Outcome {
                        backend: None,
                        code: Code::DeadlineExceeded,
                        messages: 0,
                        bad_payload: false,
                    });
                tally.record(false, &outcome, started.elapsed());
            }
            tally
        });
    }
    let mut tally = Tally::default();
    while let Some(t) = workers.join_next().await {
        tally.merge(t.context("an ORCA worker panicked")?);
    }
    Ok((tally, first.total()))
}

/// Waits until every endpoint of every cluster is available (bounded by [`READY_TIMEOUT`]); returns
/// how long that took, or an error naming the backends still unhealthy.
async fn wait_until_healthy(gateway: &Gateway, addrs: &[SocketAddr]) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        let clusters = gateway.clusters();
        let waiting: Vec<String> = clusters
            .iter()
            .flat_map(|c| c.endpoints.iter())
            .filter(|e| !e.is_available())
            .map(|e| {
                let name = BACKENDS
                    .iter()
                    .zip(addrs)
                    .find(|(_, a)| a.to_string() == e.address)
                    .map_or("?", |((name, _, _), _)| name);
                format!("{name} ({})", e.address)
            })
            .collect();
        if waiting.is_empty() {
            return Ok(start.elapsed());
        }
        if start.elapsed() >= READY_TIMEOUT {
            anyhow::bail!(
                "the proxy was not ready after {} s: no health check has passed yet for {}; \
                 the health-check warnings above say why",
                READY_TIMEOUT.as_secs(),
                waiting.join(", ")
            );
        }
        tokio::time::sleep(READY_POLL).await;
    }
}

/// The built-in config for backends listening on `backends` (in [`BACKENDS`] order), with the
/// listener and admin server on free ports and `balancer` for the cluster.
fn demo_config(backends: &[SocketAddr], balancer: &str) -> anyhow::Result<String> {
    let mut text = replace_once(
        DEMO_CONFIG,
        "listen = \"127.0.0.1:8080\"",
        "listen = \"127.0.0.1:0\"",
    )?;
    text = replace_once(
        &text,
        "listen = \"127.0.0.1:9901\"",
        "listen = \"127.0.0.1:0\"",
    )?;
    for ((_, port, _), addr) in BACKENDS.iter().zip(backends) {
        text = replace_once(
            &text,
            &format!("\"127.0.0.1:{port}\""),
            &format!("\"{addr}\""),
        )?;
    }
    replace_once(
        &text,
        "balancer = \"least_request\"",
        &format!("balancer = \"{balancer}\""),
    )
}

/// Replaces `from` with `to`, insisting it occurs exactly once, so an edit to `config/demo.toml` that
/// the rewrite no longer fits fails loudly instead of silently running the wrong config.
fn replace_once(text: &str, from: &str, to: &str) -> anyhow::Result<String> {
    let n = text.matches(from).count();
    anyhow::ensure!(
        n == 1,
        "{DEMO_ORIGIN}: expected `{from}` exactly once in config/demo.toml, found it {n} times"
    );
    Ok(text.replacen(from, to, 1))
}

/// Runs the workers for `args.seconds` with a progress bar; returns their merged tally and the
/// wall-clock time until the last call finished.
async fn drive_load(
    clients: &[EchoClient<Channel>],
    args: &DemoArgs,
) -> anyhow::Result<(Tally, Duration)> {
    let total = Duration::from_secs(args.seconds);
    let start = Instant::now();
    let until = start + total;
    let done = Arc::new(AtomicU64::new(0));

    let mut workers = JoinSet::new();
    for id in 0..args.concurrency {
        let client = clients[id as usize % clients.len()].clone();
        workers.spawn(worker(client, u64::from(id), until, done.clone()));
    }

    // Drawn on stderr, and not at all when stderr is not a terminal (indicatif's default).
    let bar = ProgressBar::new(total.as_millis() as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner:.green} [{bar:40.cyan/blue}] {msg}")?
            .progress_chars("=> "),
    );
    // Recent (time, calls) samples: the current rate is taken over the last second, not since start.
    let mut window: VecDeque<(Instant, u64)> = VecDeque::from([(start, 0)]);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let now = Instant::now();
        let calls = done.load(Ordering::Relaxed);
        window.push_back((now, calls));
        while window.len() > 2 && now.duration_since(window[0].0) > Duration::from_secs(1) {
            window.pop_front();
        }
        let (t0, c0) = window[0];
        let span = now.duration_since(t0).as_secs_f64();
        let rate = if span > 0.0 {
            (calls - c0) as f64 / span
        } else {
            0.0
        };
        let elapsed = now.duration_since(start).min(total);
        bar.set_position(elapsed.as_millis() as u64);
        bar.set_message(format!(
            "{:.1}s/{}s  {calls} calls  {rate:.0} calls/s",
            elapsed.as_secs_f64(),
            args.seconds
        ));
        if now >= until {
            break;
        }
    }
    bar.finish();
    if !bar.is_hidden() {
        // Keep the finished bar apart from the report.
        println!();
    }

    // Workers stop starting calls at `until`; wait for the calls they still have in flight.
    let mut tally = Tally::default();
    while let Some(result) = workers.join_next().await {
        tally.merge(result.context("a load worker panicked")?);
    }
    Ok((tally, start.elapsed()))
}

/// One worker: calls back to back until `until`, a server stream every [`STREAM_EVERY`] calls.
async fn worker(
    mut client: EchoClient<Channel>,
    id: u64,
    until: Instant,
    done: Arc<AtomicU64>,
) -> Tally {
    let mut tally = Tally::default();
    // Start each worker at a different point of the unary/stream cycle so streams are spread out.
    let mut n = id;
    while Instant::now() < until {
        let streaming = n.is_multiple_of(STREAM_EVERY);
        n += 1;
        let started = Instant::now();
        let call = async {
            if streaming {
                stream_call(&mut client).await
            } else {
                unary_call(&mut client).await
            }
        };
        let outcome = tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .unwrap_or(Outcome {
                backend: None,
                code: Code::DeadlineExceeded,
                messages: 0,
                bad_payload: false,
            });
        tally.record(streaming, &outcome, started.elapsed());
        done.fetch_add(1, Ordering::Relaxed);
    }
    tally
}

/// What one call came back with.
struct Outcome {
    /// The backend that answered, if any response message arrived.
    backend: Option<String>,
    code: Code,
    /// Response messages received.
    messages: u32,
    /// A response did not echo the request's payload.
    bad_payload: bool,
}

fn request() -> tonic::Request<EchoRequest> {
    let mut req = tonic::Request::new(EchoRequest {
        payload: PAYLOAD.to_vec(),
        count: STREAM_MESSAGES,
        ..Default::default()
    });
    req.set_timeout(CALL_TIMEOUT);
    req
}

fn code_of(status: &tonic::Status) -> Code {
    Code::from_i32(status.code() as i32)
}

async fn unary_call(client: &mut EchoClient<Channel>) -> Outcome {
    match client.unary(request()).await {
        Ok(resp) => {
            let resp = resp.into_inner();
            Outcome {
                bad_payload: resp.payload != PAYLOAD,
                backend: Some(resp.backend),
                code: Code::Ok,
                messages: 1,
            }
        }
        Err(status) => Outcome {
            backend: None,
            code: code_of(&status),
            messages: 0,
            bad_payload: false,
        },
    }
}

async fn stream_call(client: &mut EchoClient<Channel>) -> Outcome {
    let mut out = Outcome {
        backend: None,
        code: Code::Ok,
        messages: 0,
        bad_payload: false,
    };
    let mut stream = match client.server_stream(request()).await {
        Ok(resp) => resp.into_inner(),
        Err(status) => {
            out.code = code_of(&status);
            return out;
        }
    };
    loop {
        match stream.message().await {
            Ok(Some(msg)) => {
                out.messages += 1;
                out.bad_payload |= msg.payload != PAYLOAD;
                out.backend.get_or_insert(msg.backend);
            }
            Ok(None) => return out,
            Err(status) => {
                out.code = code_of(&status);
                return out;
            }
        }
    }
}

/// A latency histogram in microseconds, 1 µs to 60 s at 3 significant figures. Fixed bounds (rather
/// than auto-resizing) so `saturating_record` clamps instead of losing values, and every histogram can
/// be added to every other.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Per-backend results.
struct BackendTally {
    /// Calls this backend answered (whatever their final status).
    calls: u64,
    /// Latency of successful unary calls.
    unary: Histogram<u64>,
    /// Latency of successful server-streaming calls, first byte out to last message in.
    stream: Histogram<u64>,
}

impl Default for BackendTally {
    fn default() -> Self {
        BackendTally {
            calls: 0,
            unary: histogram(),
            stream: histogram(),
        }
    }
}

/// Everything the workers measured.
#[derive(Default)]
struct Tally {
    backends: HashMap<String, BackendTally>,
    /// Final gRPC status of every call, by canonical name.
    statuses: BTreeMap<&'static str, u64>,
    unary_calls: u64,
    stream_calls: u64,
    /// Streams that ended OK with fewer messages than asked for: something lost data.
    short_streams: u64,
    /// Calls whose response did not echo the payload.
    bad_payloads: u64,
    /// Successful calls (both kinds), for the "all backends" row.
    all_unary: Option<Histogram<u64>>,
    all_stream: Option<Histogram<u64>>,
}

impl Tally {
    fn record(&mut self, streaming: bool, outcome: &Outcome, latency: Duration) {
        *self.statuses.entry(outcome.code.name()).or_default() += 1;
        if streaming {
            self.stream_calls += 1;
            if outcome.code == Code::Ok && outcome.messages < STREAM_MESSAGES {
                self.short_streams += 1;
            }
        } else {
            self.unary_calls += 1;
        }
        self.bad_payloads += u64::from(outcome.bad_payload);
        let Some(name) = &outcome.backend else {
            return;
        };
        let b = self.backends.entry(name.clone()).or_default();
        b.calls += 1;
        if outcome.code == Code::Ok {
            let us = (latency.as_micros() as u64).max(1);
            let (mine, all) = if streaming {
                (&mut b.stream, &mut self.all_stream)
            } else {
                (&mut b.unary, &mut self.all_unary)
            };
            mine.saturating_record(us);
            all.get_or_insert_with(histogram).saturating_record(us);
        }
    }

    fn merge(&mut self, other: Tally) {
        for (name, o) in other.backends {
            let b = self.backends.entry(name).or_default();
            b.calls += o.calls;
            // Same bounds everywhere, so adding cannot fail.
            let _ = b.unary.add(&o.unary);
            let _ = b.stream.add(&o.stream);
        }
        for (code, n) in other.statuses {
            *self.statuses.entry(code).or_default() += n;
        }
        self.unary_calls += other.unary_calls;
        self.stream_calls += other.stream_calls;
        self.short_streams += other.short_streams;
        self.bad_payloads += other.bad_payloads;
        for (mine, theirs) in [
            (&mut self.all_unary, other.all_unary),
            (&mut self.all_stream, other.all_stream),
        ] {
            if let Some(h) = theirs {
                let _ = mine.get_or_insert_with(histogram).add(&h);
            }
        }
    }

    fn total(&self) -> u64 {
        self.unary_calls + self.stream_calls
    }
}

/// `grpcgate_requests_total` as the proxy counted it, from its Prometheus text.
#[derive(Default)]
struct ProxyCounts {
    total: u64,
    by_endpoint: HashMap<String, u64>,
    by_status: BTreeMap<String, u64>,
}

impl ProxyCounts {
    fn parse(text: &str) -> ProxyCounts {
        let mut counts = ProxyCounts::default();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("grpcgate_requests_total{") else {
                continue;
            };
            let Some((labels, value)) = rest.rsplit_once('}') else {
                continue;
            };
            let Ok(value) = value.trim().parse::<f64>() else {
                continue;
            };
            let n = value as u64;
            counts.total += n;
            if let Some(endpoint) = label(labels, "endpoint") {
                *counts.by_endpoint.entry(endpoint.to_string()).or_default() += n;
            }
            if let Some(status) = label(labels, "grpc_status") {
                *counts.by_status.entry(status.to_string()).or_default() += n;
            }
        }
        counts
    }
}

/// The value of `name="..."` in a Prometheus label set (the demo's values never contain quotes).
fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    labels.split(',').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k.trim() == name).then(|| v.trim().trim_matches('"'))
    })
}

fn report(tally: &Tally, elapsed: Duration, addrs: &[SocketAddr], proxy: &ProxyCounts) {
    let answered: u64 = tally.backends.values().map(|b| b.calls).sum();
    let share = |n: u64| {
        if answered == 0 {
            0.0
        } else {
            100.0 * n as f64 / answered as f64
        }
    };
    println!(
        "{:<8} {:>6} {:>9} {:>7} {:>10} {:>10} {:>11} {:>11}",
        "backend", "delay", "calls", "share", "unary p50", "unary p99", "stream p50", "stream p99"
    );
    let empty = BackendTally::default();
    for (name, _, delay) in BACKENDS {
        let b = tally.backends.get(name).unwrap_or(&empty);
        println!(
            "{name:<8} {:>6} {:>9} {:>6.1}% {:>10} {:>10} {:>11} {:>11}",
            fmt_delay(delay),
            b.calls,
            share(b.calls),
            fmt_quantile(&b.unary, 0.50),
            fmt_quantile(&b.unary, 0.99),
            fmt_quantile(&b.stream, 0.50),
            fmt_quantile(&b.stream, 0.99),
        );
    }
    // Any name the demo did not start would be a proxy bug (a response from nowhere): show it too.
    let mut strangers: Vec<_> = tally
        .backends
        .iter()
        .filter(|(name, _)| !BACKENDS.iter().any(|(n, _, _)| n == name))
        .collect();
    strangers.sort_by(|a, b| a.0.cmp(b.0));
    for (name, b) in strangers {
        println!(
            "{name:<8} {:>6} {:>9} {:>6.1}%",
            "?",
            b.calls,
            share(b.calls)
        );
    }
    let all = histogram();
    let all_unary = tally.all_unary.as_ref().unwrap_or(&all);
    let all_stream = tally.all_stream.as_ref().unwrap_or(&all);
    println!(
        "{:<8} {:>6} {:>9} {:>6.1}% {:>10} {:>10} {:>11} {:>11}",
        "all",
        "",
        answered,
        share(answered),
        fmt_quantile(all_unary, 0.50),
        fmt_quantile(all_unary, 0.99),
        fmt_quantile(all_stream, 0.50),
        fmt_quantile(all_stream, 0.99),
    );
    println!();

    let statuses: Vec<String> = tally
        .statuses
        .iter()
        .map(|(code, n)| format!("{code} {n}"))
        .collect();
    println!("gRPC status   {}", statuses.join(", "));
    let secs = elapsed.as_secs_f64().max(f64::EPSILON);
    println!(
        "throughput    {:.0} calls/s ({} calls in {secs:.1} s: {} unary, {} server-streaming x {STREAM_MESSAGES} messages)",
        tally.total() as f64 / secs,
        tally.total(),
        tally.unary_calls,
        tally.stream_calls,
    );

    // The proxy's own view, from the same counters /metrics serves.
    let per_backend: Vec<String> = BACKENDS
        .iter()
        .zip(addrs)
        .map(|((name, _, _), addr)| {
            let n = proxy
                .by_endpoint
                .get(&addr.to_string())
                .copied()
                .unwrap_or(0);
            format!("{name} {n}")
        })
        .collect();
    let proxy_statuses: Vec<String> = proxy
        .by_status
        .iter()
        .map(|(code, n)| format!("{code} {n}"))
        .collect();
    let client_statuses: BTreeMap<String, u64> = tally
        .statuses
        .iter()
        .map(|(code, n)| (code.to_string(), *n))
        .collect();
    let agrees = proxy.total == tally.total() && proxy.by_status == client_statuses;
    println!(
        "proxy metrics grpcgate_requests_total {} ({}; {}): {}",
        proxy.total,
        per_backend.join(", "),
        proxy_statuses.join(", "),
        if agrees {
            "agrees with the clients"
        } else {
            "DIFFERS from what the clients saw"
        }
    );

    if tally.short_streams > 0 {
        println!(
            "warning       {} server streams ended OK with fewer than {STREAM_MESSAGES} messages",
            tally.short_streams
        );
    }
    if tally.bad_payloads > 0 {
        println!(
            "warning       {} responses did not echo the request payload",
            tally.bad_payloads
        );
    }
}

fn fmt_delay(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

/// A latency quantile in milliseconds, or "-" when nothing was recorded.
fn fmt_quantile(h: &Histogram<u64>, q: f64) -> String {
    if h.is_empty() {
        return "-".to_string();
    }
    let ms = h.value_at_quantile(q) as f64 / 1000.0;
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else if ms < 100.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs() -> Vec<SocketAddr> {
        ["127.0.0.1:41001", "127.0.0.1:41002", "127.0.0.1:41003"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect()
    }

    #[test]
    fn checked_in_config_is_valid() {
        Config::parse(DEMO_CONFIG, "config/demo.toml", Path::new("."))
            .unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn built_in_config_uses_real_ports_and_the_chosen_balancer() {
        for balancer in BalancerKind::NAMES {
            let text = demo_config(&addrs(), balancer).unwrap();
            let config =
                Config::parse(&text, DEMO_ORIGIN, Path::new(".")).unwrap_or_else(|e| panic!("{e}"));
            for addr in addrs() {
                assert!(text.contains(&format!("\"{addr}\"")), "{addr} missing");
            }
            assert!(text.contains(&format!("balancer = \"{balancer}\"")));
            assert!(config.cluster("echo").is_some());
            assert_eq!(config.listeners[0].listen.port(), 0);
            assert_eq!(config.admin.as_ref().unwrap().listen.port(), 0);
        }
    }

    #[test]
    fn parses_proxy_request_counters() {
        let text = "\
# TYPE grpcgate_requests_total counter
grpcgate_requests_total{cluster=\"echo\",endpoint=\"127.0.0.1:41001\",grpc_status=\"OK\",listener=\"edge\"} 7
grpcgate_requests_total{cluster=\"echo\",endpoint=\"127.0.0.1:41002\",grpc_status=\"OK\",listener=\"edge\"} 5
grpcgate_requests_total{cluster=\"\",endpoint=\"\",grpc_status=\"UNIMPLEMENTED\",listener=\"edge\"} 1
grpcgate_request_duration_seconds_count{cluster=\"echo\"} 12
";
        let c = ProxyCounts::parse(text);
        assert_eq!(c.total, 13);
        assert_eq!(c.by_endpoint["127.0.0.1:41001"], 7);
        assert_eq!(c.by_status["OK"], 12);
        assert_eq!(c.by_status["UNIMPLEMENTED"], 1);
    }
}
