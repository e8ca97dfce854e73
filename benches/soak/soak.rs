//! The soak driver (`benches/soak/run.sh` builds and runs it): mixed gRPC load through a grpcgate
//! process for a long while, sampling the proxy's resident memory, open files and CPU time.
//!
//! It starts three echo backends in-process, writes two grpcgate configs that differ in balancer and
//! endpoint set, starts the grpcgate binary on the first, and then, until `--duration` is over:
//! `--concurrency` workers make calls of every kind (unary, server-, client- and bidi-streaming),
//! some asking the backend for an error, some with a deadline shorter than the backend's delay, some
//! cancelled by the client half-way; the config is swapped and grpcgate reloaded (SIGHUP) every
//! `--reload-every`; and every `--sample-every` one CSV row is written: seconds since start, the
//! proxy's VmRSS (KiB), its open file descriptors, its CPU seconds, calls completed so far and
//! unexpected outcomes so far. Each call's outcome is checked against what its kind must give, so a
//! proxy bug shows up as `unexpected`, not as noise.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use grpcgate::echo::EchoBackend;
use grpcgate::pb::echo::echo_client::EchoClient;
use grpcgate::pb::echo::EchoRequest;
use tonic::transport::Channel;
use tonic::Code;

#[derive(Parser)]
#[command(
    name = "soak",
    about = "Long mixed load through grpcgate, sampling its memory and files"
)]
struct Args {
    /// The grpcgate binary to run.
    #[arg(long)]
    grpcgate: PathBuf,
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 600)]
    duration: u64,
    /// Seconds between samples.
    #[arg(long, default_value_t = 10)]
    sample_every: u64,
    /// Seconds between reloads.
    #[arg(long, default_value_t = 5)]
    reload_every: u64,
    /// Calls in flight (one worker each).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Client connections the workers share.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Where to write the CSV and the proxy's log.
    #[arg(long, default_value = "benches/soak")]
    out: PathBuf,
}

/// Counts of what the workers saw.
#[derive(Default)]
struct Tally {
    calls: AtomicU64,
    unexpected: AtomicU64,
    /// Calls failed by the client's own h2 closing its connection (see `lost_by_client_connection`).
    client_goaways: AtomicU64,
}

/// Whether a call failed because the client's own h2 closed its connection: `GOAWAY(ENHANCE_YOUR_CALM,
/// "too_many_internal_resets")` after 1,024 frames arrived for streams it had cancelled and already
/// forgotten, a lifetime count per connection that tonic cannot raise (hyperium/h2#856; the cancels
/// here make ~150 such late frames a second, which is legal). tonic reports the calls on that
/// connection as RESOURCE_EXHAUSTED "h2 protocol error: …", and those it had queued but not sent as
/// CANCELLED "operation was canceled". The proxy's `reason="abuse"` count (metrics.txt) shows the
/// GOAWAYs were not the proxy's doing.
fn lost_by_client_connection(what: &str) -> bool {
    what.starts_with("ResourceExhausted \"h2 protocol error: ")
        || what.starts_with("Cancelled \"operation was canceled\"")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Two configs that differ where a reload has work to do: the balancer, the endpoint set (one
/// endpoint leaves and comes back) and a weight.
fn config(version: usize, port: u16, admin: u16, backends: &[SocketAddr]) -> String {
    let (balancer, endpoints) = if version.is_multiple_of(2) {
        (
            "least_request",
            format!(
                "[\"{}\", \"{}\", \"{}\"]",
                backends[0], backends[1], backends[2]
            ),
        )
    } else {
        (
            "round_robin",
            format!(
                "[\"{}\", {{ address = \"{}\", weight = 2 }}]",
                backends[0], backends[1]
            ),
        )
    };
    format!(
        "drain_timeout = \"5s\"\nworkers = 1\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
         [[listeners]]\nname = \"soak\"\nlisten = \"127.0.0.1:{port}\"\n\n\
         [[listeners.routes]]\ncluster = \"echo\"\n\n\
         [[clusters]]\nname = \"echo\"\nbalancer = \"{balancer}\"\nendpoints = {endpoints}\n\n\
         [clusters.health_check]\ninterval = \"1s\"\ntimeout = \"500ms\"\n"
    )
}

/// One call of kind `k` (0..10); Err describes an outcome that kind must not give.
async fn call(client: &mut EchoClient<Channel>, k: u64) -> Result<(), String> {
    let req = |count: u32, delay_ms: u32, fail_code: i32| EchoRequest {
        payload: vec![7u8; 256],
        count,
        delay_ms,
        fail_code,
        fail_message: if fail_code != 0 {
            "asked for".into()
        } else {
            String::new()
        },
    };
    let status = |s: tonic::Status| format!("{:?} {:?}", s.code(), s.message());
    // Reads a response stream to its end (or `limit` messages); how many arrived.
    async fn drain(
        s: &mut tonic::Streaming<grpcgate::pb::echo::EchoResponse>,
        limit: usize,
    ) -> Result<usize, String> {
        let mut n = 0;
        while n < limit {
            match s.message().await {
                Ok(Some(_)) => n += 1,
                Ok(None) => break,
                Err(e) => {
                    return Err(format!(
                        "{:?} {:?} after {n} messages",
                        e.code(),
                        e.message()
                    ))
                }
            }
        }
        Ok(n)
    }
    let expect = |ok: bool, what: &str| if ok { Ok(()) } else { Err(what.to_string()) };
    match k {
        // Plain unary calls, the bulk of the load.
        0..=3 => client.unary(req(0, 0, 0)).await.map(|_| ()).map_err(status),
        // The backend answers with an error, which must reach the client as it was sent.
        4 => match client.unary(req(0, 0, 5)).await {
            Err(s) if s.code() == Code::NotFound && s.message() == "asked for" => Ok(()),
            Err(s) => Err(status(s)),
            Ok(_) => Err("OK instead of NOT_FOUND".into()),
        },
        // A deadline shorter than the backend's delay: the call ends at the deadline. tonic's own
        // timer usually fires first (CANCELLED "Timeout expired", the proxy sees RST_STREAM); when
        // the proxy's fires first it answers DEADLINE_EXCEEDED.
        5 => {
            let mut r = tonic::Request::new(req(0, 200, 0));
            r.set_timeout(Duration::from_millis(20));
            match client.unary(r).await {
                Err(s) if s.code() == Code::DeadlineExceeded => Ok(()),
                Err(s) if s.code() == Code::Cancelled && s.message() == "Timeout expired" => Ok(()),
                Err(s) => Err(status(s)),
                Ok(_) => Err("OK past the deadline".into()),
            }
        }
        // A server stream read to its end.
        6 => {
            let mut s = client
                .server_stream(req(20, 0, 0))
                .await
                .map_err(status)?
                .into_inner();
            let n = drain(&mut s, usize::MAX).await?;
            expect(n == 20, &format!("{n} of 20 messages"))
        }
        // A client stream.
        7 => {
            let msgs = tokio_stream::iter((0..10).map(move |_| req(0, 0, 0)));
            let r = client.client_stream(msgs).await.map_err(status)?;
            expect(r.get_ref().seq == 10, "not 10 messages received")
        }
        // Bidi, message for message.
        8 => {
            let msgs = tokio_stream::iter((0..10).map(move |_| req(0, 0, 0)));
            let mut s = client.bidi(msgs).await.map_err(status)?.into_inner();
            let n = drain(&mut s, usize::MAX).await?;
            expect(n == 10, &format!("{n} of 10 messages"))
        }
        // Cancelled by the client: a slow server stream dropped after its first messages (the
        // proxy sees RST_STREAM CANCEL and must cancel upstream and free everything).
        _ => {
            let mut s = client
                .server_stream(req(1000, 2, 0))
                .await
                .map_err(status)?
                .into_inner();
            let n = drain(&mut s, 3).await?;
            expect(n == 3, &format!("{n} of the first 3 messages"))
        }
    }
}

/// The proxy's resident memory (KiB), open descriptors and CPU seconds, from /proc.
fn sample(pid: u32) -> Option<(u64, usize, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): utime and stime are the 12th and 13th.
    let after = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some((rss, fds, ticks as f64 / 100.0))
}

struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
}

/// `GET path` on the admin port: the whole response, if one came within 2 s.
async fn http_get(admin: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", admin))
        .await
        .ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    String::from_utf8(buf).ok()
}

async fn wait_ready(admin: u16) -> bool {
    for _ in 0..200 {
        if http_get(admin, "/ready")
            .await
            .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The client side's own log (its h2 and tonic), off unless SOAK_CLIENT_LOG is set.
    if let Ok(filter) = std::env::var("SOAK_CLIENT_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .init();
    }
    std::fs::create_dir_all(&args.out)?;
    let mut backends = Vec::new();
    for i in 0..3 {
        backends.push(EchoBackend::start(&format!("b{i}"), Duration::ZERO).await?);
    }
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let (port, admin) = (free_port(), free_port());
    let config_path = args.out.join("soak.toml");
    std::fs::write(&config_path, config(0, port, admin, &addrs))?;
    let log = std::fs::File::create(args.out.join("grpcgate.log"))?;
    let proxy = Proxy(
        Command::new(&args.grpcgate)
            .arg("--config")
            .arg(&config_path)
            .env(
                "RUST_LOG",
                std::env::var("SOAK_PROXY_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?,
    );
    let pid = proxy.0.id();
    anyhow::ensure!(wait_ready(admin).await, "grpcgate did not become ready");

    let mut channels = Vec::new();
    for _ in 0..args.connections {
        channels.push(
            Channel::from_shared(format!("http://127.0.0.1:{port}"))?
                .connect()
                .await?,
        );
    }
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..args.concurrency {
        let mut client = EchoClient::new(channels[w % channels.len()].clone());
        let (tally, stop) = (tally.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut k = w as u64;
            while !stop.load(Ordering::Relaxed) {
                let outcome = call(&mut client, k % 10).await;
                tally.calls.fetch_add(1, Ordering::Relaxed);
                if let Err(what) = outcome {
                    if lost_by_client_connection(&what) {
                        tally.client_goaways.fetch_add(1, Ordering::Relaxed);
                    } else if tally.unexpected.fetch_add(1, Ordering::Relaxed) < 50 {
                        eprintln!("unexpected outcome, call kind {}: {what}", k % 10);
                    }
                }
                k += 1;
            }
        }));
    }

    let start = Instant::now();
    let csv_path = args.out.join("soak.csv");
    let mut csv = std::fs::File::create(&csv_path)?;
    writeln!(
        csv,
        "t_s,rss_kib,fds,cpu_s,calls,unexpected,client_goaway_failures"
    )?;
    let mut reloads = 0usize;
    let mut next_sample = Duration::ZERO;
    let mut next_reload = Duration::from_secs(args.reload_every);
    let end = Duration::from_secs(args.duration);
    loop {
        let now = start.elapsed();
        if now >= next_sample {
            let (rss, fds, cpu) = sample(pid).ok_or_else(|| anyhow::anyhow!("grpcgate exited"))?;
            let (calls, bad, lost) = (
                tally.calls.load(Ordering::Relaxed),
                tally.unexpected.load(Ordering::Relaxed),
                tally.client_goaways.load(Ordering::Relaxed),
            );
            writeln!(
                csv,
                "{},{rss},{fds},{cpu:.2},{calls},{bad},{lost}",
                now.as_secs()
            )?;
            csv.flush()?;
            eprintln!(
                "t={:>4}s rss={rss} KiB fds={fds} cpu={cpu:.1}s calls={calls} unexpected={bad} client_goaway_failures={lost} reloads={reloads}",
                now.as_secs()
            );
            next_sample += Duration::from_secs(args.sample_every);
        }
        if now >= end {
            break;
        }
        if now >= next_reload {
            reloads += 1;
            std::fs::write(&config_path, config(reloads, port, admin, &addrs))?;
            signal(pid, "-HUP");
            next_reload += Duration::from_secs(args.reload_every);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The proxy's own account of the run, for when the numbers above need explaining.
    if let Some(text) = http_get(admin, "/metrics").await {
        std::fs::write(args.out.join("metrics.txt"), text)?;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(10), w).await;
    }
    println!(
        "calls {} unexpected {} reloads {reloads} csv {}",
        tally.calls.load(Ordering::Relaxed),
        tally.unexpected.load(Ordering::Relaxed),
        csv_path.display()
    );
    drop(proxy);
    Ok(())
}
