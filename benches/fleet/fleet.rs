//! The fleet benchmark's driver (issue 21; `benches/fleet/run.sh` builds and runs it): a fleet of
//! independent grpcgate processes (the release binary), each driven by its own client at 1–2 calls in
//! flight, in front of the same three echo backends, one of them slower than the others and reporting
//! itself busy in ORCA load reports. Per balancer it reports the slow backend's share of the calls and
//! the fleet's latency quantiles, and checks the targets. Writes `results.json` and
//! `results.md` into `--out-dir`.
//!
//! Low concurrency per proxy is the point: each proxy sees 0–2 calls in flight, as a sidecar does, so
//! in-flight counts say little and only latency (`peak_ewma`) or the backends' own reports
//! (`weighted_round_robin`) can tell the slow backend apart.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use grpcgate::echo::EchoBackend;
use grpcgate::pb::echo::echo_client::EchoClient;
use grpcgate::pb::echo::EchoRequest;
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

#[derive(Parser, Clone)]
#[command(
    name = "fleet",
    about = "Fleet benchmark: N grpcgate processes, 3 backends, one slow"
)]
struct Args {
    /// The grpcgate binary to run.
    #[arg(long, default_value = "target/release/grpcgate")]
    grpcgate: PathBuf,
    /// Proxy processes, each with its own client.
    #[arg(long, default_value_t = 8)]
    proxies: usize,
    /// Calls in flight per client, cycled over the clients (client i gets entry i mod len).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    in_flight: Vec<usize>,
    /// Service time of the two fast backends, ms.
    #[arg(long, default_value_t = 10)]
    fast_ms: u64,
    /// Service time of the slow backend, ms.
    #[arg(long, default_value_t = 50)]
    slow_ms: u64,
    /// Utilization the slow backend reports (ORCA).
    #[arg(long, default_value_t = 0.9)]
    busy_utilization: f64,
    /// Utilization the fast backends report (ORCA).
    #[arg(long, default_value_t = 0.3)]
    idle_utilization: f64,
    /// Measured seconds per balancer.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Unmeasured seconds before measuring (every balancer; weighted_round_robin adds its blackout).
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    /// weighted_round_robin's `blackout_period`, seconds (gRPC's default is 10).
    #[arg(long, default_value_t = 10)]
    blackout: u64,
    /// Balancers to run, in order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "round_robin,least_request,join_shortest_queue,peak_ewma,weighted_round_robin"
    )]
    balancers: Vec<String>,
    /// Where results.json, results.md and the proxies' configs and logs go.
    #[arg(long, default_value = "benches/fleet")]
    out_dir: PathBuf,
    /// Free text recorded with the results (commit, machine).
    #[arg(long, default_value = "")]
    label: String,
}

/// The backends: name, service time, reported utilization. The slow one is first in every config.
struct Backends {
    slow: EchoBackend,
    fast: [EchoBackend; 2],
}

impl Backends {
    fn addrs(&self) -> [SocketAddr; 3] {
        [self.slow.addr, self.fast[0].addr, self.fast[1].addr]
    }
}

/// A latency histogram in µs, 1 µs to 60 s, 3 significant figures (fixed bounds so histograms add).
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

/// What one client worker measured in the measured window.
struct Tally {
    latency: Histogram<u64>,
    /// Calls each backend answered, and their latency.
    by_backend: BTreeMap<String, (u64, Histogram<u64>)>,
    errors: u64,
}

/// Picks a free loopback port (bound and released: the proxy binds it again right after).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One GET over HTTP/1.1 to the admin server: (status, body). Blocking, bounded by socket timeouts.
fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may contain spaces): state is field 3, utime 14, stime 15.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap_or(0.0) + f[12].parse::<f64>().unwrap_or(0.0);
    ticks / clock_ticks()
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// The machine's CPU counters from /proc/stat: (busy, steal, total), in seconds summed over CPUs.
fn machine_cpu() -> (f64, f64, f64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = text.lines().next().unwrap_or("");
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    if v.len() < 8 {
        return (0.0, 0.0, 0.0);
    }
    let t = clock_ticks();
    // user nice system idle iowait irq softirq steal
    let busy = v[0] + v[1] + v[2] + v[5] + v[6];
    (busy / t, v[7] / t, v.iter().sum::<f64>() / t)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A running proxy process; killed if dropped before [`Proxy::stop`].
struct Proxy {
    child: Child,
    edge: SocketAddr,
    admin: SocketAddr,
}

impl Proxy {
    async fn start(
        args: &Args,
        dir: &Path,
        i: usize,
        balancer: &str,
        backends: &[SocketAddr; 3],
    ) -> anyhow::Result<Proxy> {
        let edge: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let endpoints: Vec<String> = backends.iter().map(|a| format!("\"{a}\"")).collect();
        let orca = if balancer == "weighted_round_robin" {
            format!("blackout_period = \"{}s\"\n", args.blackout)
        } else {
            String::new()
        };
        let config = format!(
            "workers = 1\n\n[admin]\nlisten = \"{admin}\"\n\n[[listeners]]\nname = \"edge\"\n\
             listen = \"{edge}\"\n\n[[listeners.routes]]\ncluster = \"echo\"\n\n[[clusters]]\n\
             name = \"echo\"\nbalancer = \"{balancer}\"\n{orca}endpoints = [{}]\n",
            endpoints.join(", ")
        );
        let path = dir.join(format!("{balancer}-{i}.toml"));
        std::fs::write(&path, config)?;
        let log = std::fs::File::create(dir.join(format!("{balancer}-{i}.log")))?;
        let child = Command::new(&args.grpcgate)
            .arg("--config")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", args.grpcgate.display()))?;
        let proxy = Proxy { child, edge, admin };
        // Ready = the admin server answers /ready with 200 (bounded: a proxy that never gets there
        // fails the run instead of hanging it).
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((200, _)) =
                tokio::task::spawn_blocking(move || http_get(admin, "/ready")).await?
            {
                return Ok(proxy);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "proxy {i} ({balancer}) not ready after 20 s; see {}",
                dir.join(format!("{balancer}-{i}.log")).display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// SIGTERM, then up to 10 s for a clean exit, then SIGKILL.
    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// One client's worker: calls back to back until `until`, recording those started at or after
/// `measure_from`.
async fn worker(mut client: EchoClient<Channel>, measure_from: Instant, until: Instant) -> Tally {
    let mut t = Tally {
        latency: histogram(),
        by_backend: BTreeMap::new(),
        errors: 0,
    };
    loop {
        let start = Instant::now();
        if start >= until {
            return t;
        }
        let result = tokio::time::timeout(
            Duration::from_secs(10),
            client.unary(EchoRequest::default()),
        )
        .await;
        if start < measure_from {
            continue;
        }
        match result {
            Ok(Ok(resp)) => {
                let us = (start.elapsed().as_micros() as u64).max(1);
                t.latency.saturating_record(us);
                let name = resp.into_inner().backend;
                // The name is an owned String from the response already: no allocation here.
                let (n, h) = t.by_backend.entry(name).or_insert_with(|| (0, histogram()));
                *n += 1;
                h.saturating_record(us);
            }
            _ => t.errors += 1,
        }
    }
}

/// Runs one balancer over the fleet; returns its JSON result.
async fn run_balancer(
    args: &Args,
    balancer: &str,
    backends: &Backends,
    dir: &Path,
) -> anyhow::Result<serde_json::Value> {
    let addrs = backends.addrs();
    let mut proxies = Vec::with_capacity(args.proxies);
    for i in 0..args.proxies {
        proxies.push(Proxy::start(args, dir, i, balancer, &addrs).await?);
    }
    let mut clients = Vec::with_capacity(args.proxies);
    for p in &proxies {
        let channel = Endpoint::from_shared(format!("http://{}", p.edge))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .with_context(|| format!("connecting to {}", p.edge))?;
        clients.push(EchoClient::new(channel));
    }
    let warmup = Duration::from_secs(
        args.warmup
            + if balancer == "weighted_round_robin" {
                args.blackout
            } else {
                0
            },
    );
    let start = Instant::now();
    let measure_from = start + warmup;
    let until = measure_from + Duration::from_secs(args.seconds);
    let mut workers = tokio::task::JoinSet::new();
    let mut in_flight = Vec::new();
    for (i, client) in clients.iter().enumerate() {
        let n = args.in_flight[i % args.in_flight.len()];
        in_flight.push(n);
        for _ in 0..n {
            workers.spawn(worker(client.clone(), measure_from, until));
        }
    }
    tokio::time::sleep_until(measure_from).await;
    let pids: Vec<u32> = proxies.iter().map(Proxy::pid).collect();
    let proxy_cpu0: f64 = pids.iter().map(|&p| cpu_seconds(p)).sum();
    let self_cpu0 = cpu_seconds(std::process::id());
    let (busy0, steal0, total0) = machine_cpu();
    let load_start = loadavg();
    let mut latency = histogram();
    let mut per_backend = BTreeMap::<String, (u64, Histogram<u64>)>::new();
    let mut errors = 0;
    while let Some(t) = workers.join_next().await {
        let t = t?;
        latency.add(&t.latency).expect("same bounds");
        for (k, (n, h)) in t.by_backend {
            let b = per_backend.entry(k).or_insert((0, histogram()));
            b.0 += n;
            b.1.add(&h).expect("same bounds");
        }
        errors += t.errors;
    }
    let by_backend: BTreeMap<&str, u64> = per_backend
        .iter()
        .map(|(k, (n, _))| (k.as_str(), *n))
        .collect();
    let backend_ms = |q: f64| -> BTreeMap<&str, f64> {
        per_backend
            .iter()
            .map(|(k, (_, h))| (k.as_str(), h.value_at_quantile(q) as f64 / 1000.0))
            .collect()
    };
    let window = measure_from.elapsed().as_secs_f64();
    let proxy_cpu = pids.iter().map(|&p| cpu_seconds(p)).sum::<f64>() - proxy_cpu0;
    let self_cpu = cpu_seconds(std::process::id()) - self_cpu0;
    let (busy1, steal1, total1) = machine_cpu();
    let cpus = ((total1 - total0) / window).round().max(1.0);
    // The weights as /clusters shows them, per proxy (the `weight` field).
    let mut weights = Vec::new();
    for p in &proxies {
        let admin = p.admin;
        let (_, body) = tokio::task::spawn_blocking(move || http_get(admin, "/clusters")).await??;
        let v: serde_json::Value = serde_json::from_str(&body).context("/clusters JSON")?;
        let w: Vec<f64> = v["clusters"][0]["endpoints"]
            .as_array()
            .map(|a| a.iter().filter_map(|e| e["weight"].as_f64()).collect())
            .unwrap_or_default();
        weights.push(w);
    }
    drop(clients);
    for p in proxies {
        p.stop().await;
    }
    let calls: u64 = by_backend.values().sum();
    let share =
        |name: &str| by_backend.get(name).copied().unwrap_or(0) as f64 / calls.max(1) as f64;
    let q = |x: f64| latency.value_at_quantile(x) as f64 / 1000.0;
    let slow_share = share("slow");
    Ok(json!({
        "balancer": balancer,
        "calls": calls,
        "errors": errors,
        "seconds": window,
        "calls_per_s": calls as f64 / window,
        "by_backend": by_backend,
        "slow_share": slow_share,
        // Slow : fast capacity as the shares imply it (each fast backend has (1 - slow) / 2).
        "implied_weight_ratio": if slow_share < 1.0 { slow_share / ((1.0 - slow_share) / 2.0) } else { f64::NAN },
        "p50_ms": q(0.50),
        "p90_ms": q(0.90),
        "p99_ms": q(0.99),
        "p999_ms": q(0.999),
        "max_ms": latency.max() as f64 / 1000.0,
        "backend_p50_ms": backend_ms(0.50),
        "backend_p99_ms": backend_ms(0.99),
        "in_flight_per_client": in_flight,
        "proxy_cpu_us_per_call": proxy_cpu / calls.max(1) as f64 * 1e6,
        "proxies_cpu_s_per_s": proxy_cpu / window,
        "driver_and_backends_cpu_s_per_s": self_cpu / window,
        "machine_busy_cpu_s_per_s": (busy1 - busy0) / window,
        "others_cpu_s_per_s": ((busy1 - busy0) - proxy_cpu - self_cpu) / window,
        "steal_cpu_s_per_s": (steal1 - steal0) / window,
        "cpus": cpus,
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "clusters_weights": weights,
    }))
}

/// The targets, from the runs present.
fn targets(args: &Args, runs: &[serde_json::Value]) -> Vec<serde_json::Value> {
    let get = |b: &str| runs.iter().find(|r| r["balancer"] == b);
    let mut out = Vec::new();
    if let (Some(lr), Some(pe)) = (get("least_request"), get("peak_ewma")) {
        let (lr_share, pe_share) = (
            lr["slow_share"].as_f64().unwrap_or(0.0),
            pe["slow_share"].as_f64().unwrap_or(1.0),
        );
        out.push(json!({
            "target": "peak_ewma's slow share <= least_request's / 3",
            "value": format!("{:.2} % vs {:.2} % (limit {:.2} %)", pe_share * 100.0, lr_share * 100.0, lr_share * 100.0 / 3.0),
            "met": pe_share <= lr_share / 3.0,
        }));
        let (lr_p99, pe_p99) = (
            lr["p99_ms"].as_f64().unwrap_or(0.0),
            pe["p99_ms"].as_f64().unwrap_or(f64::MAX),
        );
        out.push(json!({
            "target": "fleet p99: least_request / peak_ewma >= 2",
            "value": format!("{lr_p99:.2} ms / {pe_p99:.2} ms = {:.2}x", lr_p99 / pe_p99),
            "met": lr_p99 / pe_p99 >= 2.0,
        }));
    }
    if let Some(w) = get("weighted_round_robin") {
        // qps / utilization with equal qps: slow : fast = (1 / busy) : (1 / idle) = idle / busy.
        let expected = args.idle_utilization / args.busy_utilization;
        let implied = w["implied_weight_ratio"].as_f64().unwrap_or(f64::NAN);
        out.push(json!({
            "target": "weighted_round_robin: slow/fast weight ratio (from shares) within 10 % of idle/busy utilization",
            "value": format!("{implied:.3} vs {expected:.3} ({:+.1} %)", (implied / expected - 1.0) * 100.0),
            "met": (implied / expected - 1.0).abs() <= 0.10,
        }));
    }
    out
}

fn markdown(args: &Args, runs: &[serde_json::Value], targets: &[serde_json::Value]) -> String {
    let mut md = String::new();
    md.push_str("# Fleet benchmark results\n\n");
    md.push_str(&format!(
        "{} grpcgate processes (`workers = 1`), each with its own client (calls in flight per client, \
         cycled: {:?}); 3 echo backends: `slow` ({} ms, reports utilization {}), `fast-1` and `fast-2` \
         ({} ms, report {}). {} s measured per balancer after {} s warm-up (weighted_round_robin: plus \
         its {} s blackout). {}\n\n",
        args.proxies,
        args.in_flight,
        args.slow_ms,
        args.busy_utilization,
        args.fast_ms,
        args.idle_utilization,
        args.seconds,
        args.warmup,
        args.blackout,
        args.label
    ));
    md.push_str(
        "| balancer | calls/s | slow share | fast-1 | fast-2 | p50 ms | p90 ms | p99 ms | p99.9 ms | errors \
         | p99 ms per backend: slow / fast-1 / fast-2 | proxy CPU µs/call | machine busy CPU-s/s | others CPU-s/s \
         | steal | load avg start → end |\n",
    );
    md.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in runs {
        let calls = r["calls"].as_f64().unwrap_or(0.0).max(1.0);
        let fast = |n: &str| r["by_backend"][n].as_f64().unwrap_or(0.0) / calls * 100.0;
        md.push_str(&format!(
            "| {} | {:.0} | **{:.2} %** | {:.1} % | {:.1} % | {:.2} | {:.2} | **{:.2}** | {:.2} | {} | {:.1} / {:.1} / {:.1} | {:.1} | {:.2} | {:.2} | {:.2} | {} → {} |\n",
            r["balancer"].as_str().unwrap_or(""),
            r["calls_per_s"].as_f64().unwrap_or(0.0),
            r["slow_share"].as_f64().unwrap_or(0.0) * 100.0,
            fast("fast-1"),
            fast("fast-2"),
            r["p50_ms"].as_f64().unwrap_or(0.0),
            r["p90_ms"].as_f64().unwrap_or(0.0),
            r["p99_ms"].as_f64().unwrap_or(0.0),
            r["p999_ms"].as_f64().unwrap_or(0.0),
            r["errors"],
            r["backend_p99_ms"]["slow"].as_f64().unwrap_or(0.0),
            r["backend_p99_ms"]["fast-1"].as_f64().unwrap_or(0.0),
            r["backend_p99_ms"]["fast-2"].as_f64().unwrap_or(0.0),
            r["proxy_cpu_us_per_call"].as_f64().unwrap_or(0.0),
            r["machine_busy_cpu_s_per_s"].as_f64().unwrap_or(0.0),
            r["others_cpu_s_per_s"].as_f64().unwrap_or(0.0),
            r["steal_cpu_s_per_s"].as_f64().unwrap_or(0.0),
            r["loadavg_start"].as_str().unwrap_or(""),
            r["loadavg_end"].as_str().unwrap_or(""),
        ));
    }
    md.push_str("\n| target | value | met |\n|---|---|---|\n");
    for t in targets {
        md.push_str(&format!(
            "| {} | {} | {} |\n",
            t["target"].as_str().unwrap_or(""),
            t["value"].as_str().unwrap_or(""),
            if t["met"].as_bool() == Some(true) {
                "yes"
            } else {
                "**no**"
            }
        ));
    }
    md
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.grpcgate.exists(),
        "no grpcgate binary at {} (cargo build --release)",
        args.grpcgate.display()
    );
    anyhow::ensure!(
        !args.in_flight.is_empty() && args.in_flight.iter().all(|&n| n > 0),
        "--in-flight needs positive counts"
    );
    let backends = Backends {
        slow: EchoBackend::start_reporting_with_delay(
            "slow",
            Duration::from_millis(args.slow_ms),
            args.busy_utilization,
        )
        .await?,
        fast: [
            EchoBackend::start_reporting_with_delay(
                "fast-1",
                Duration::from_millis(args.fast_ms),
                args.idle_utilization,
            )
            .await?,
            EchoBackend::start_reporting_with_delay(
                "fast-2",
                Duration::from_millis(args.fast_ms),
                args.idle_utilization,
            )
            .await?,
        ],
    };
    let work = args.out_dir.join("work");
    std::fs::create_dir_all(&work)?;
    let mut runs = Vec::new();
    for balancer in &args.balancers {
        eprintln!("fleet: {balancer} ...");
        let r = run_balancer(&args, balancer, &backends, &work).await?;
        eprintln!(
            "fleet: {balancer}: slow share {:.2} %, p50 {:.2} ms, p99 {:.2} ms, {:.0} calls/s, {} errors",
            r["slow_share"].as_f64().unwrap_or(0.0) * 100.0,
            r["p50_ms"].as_f64().unwrap_or(0.0),
            r["p99_ms"].as_f64().unwrap_or(0.0),
            r["calls_per_s"].as_f64().unwrap_or(0.0),
            r["errors"]
        );
        runs.push(r);
    }
    let targets = targets(&args, &runs);
    let md = markdown(&args, &runs, &targets);
    let out = json!({
        "label": args.label,
        "setup": {
            "proxies": args.proxies,
            "in_flight": args.in_flight,
            "fast_ms": args.fast_ms,
            "slow_ms": args.slow_ms,
            "busy_utilization": args.busy_utilization,
            "idle_utilization": args.idle_utilization,
            "seconds": args.seconds,
            "warmup": args.warmup,
            "blackout": args.blackout,
        },
        "runs": runs,
        "targets": targets,
    });
    std::fs::write(
        args.out_dir.join("results.json"),
        serde_json::to_string_pretty(&out)? + "\n",
    )?;
    std::fs::write(args.out_dir.join("results.md"), &md)?;
    std::fs::remove_dir_all(&work).ok();
    print!("{md}");
    drop(backends);
    Ok(())
}
