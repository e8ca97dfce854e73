//! The `grpcgate` command: run the proxy from a config file, check a config, or run the demo (the
//! `demo` feature, on by default).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
#[cfg(feature = "demo")]
use grpcgate::demo;
use grpcgate::{load, Config, Gateway};
use tokio::signal::unix::{signal, SignalKind};

// jemalloc rather than glibc malloc. A proxied call allocates and frees the same handful of sizes on
// a worker thread. Measured at 496d942 on the load benchmark:
// - a unary call: 50.5k -> 48.1k instructions (callgrind);
// - 10,000 concurrent streams, where glibc's tcache overflows into its bins: ~7 % less CPU.
// Idle memory per connection came out the same (13-14 KiB) with jemalloc's default options; see
// `MALLOC_CONF` for what returns it sooner.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read once at start-up (the prefixed build reads `_rjem_malloc_conf`).
/// - The thread cache is garbage-collected every 2 MiB allocated instead of every 64 KiB: with the
///   default, the GC sweeps cost ~0.8k instructions per proxied call (callgrind), and a worker's
///   working set is the same few sizes over and over, so the cache has little to give back.
/// - Freed pages go back to the OS about a second after they were last used, from jemalloc's
///   background thread. By default jemalloc purges only when it is called again, 10 s later at the
///   earliest, so a proxy that went quiet after a burst kept the burst's buffers resident: RSS per
///   idle connection read 18-21 KiB one second after 1,000 connections went idle, 10-14 KiB with
///   this (benches/load `idle`).
#[export_name = "_rjem_malloc_conf"]
pub static MALLOC_CONF: &[u8; 72] =
    b"tcache_gc_incr_bytes:2097152,background_thread:true,dirty_decay_ms:1000\0";

/// A gRPC-aware L7 load-balancing reverse proxy.
#[derive(Parser)]
#[command(name = "grpcgate", version, about)]
struct Cli {
    /// The TOML config file to run (or check).
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Validate the config and exit: 0 if it is good, 1 with the error otherwise.
    #[arg(long, requires = "config")]
    check: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Start three echo backends and the proxy in-process, drive load through it and print a report.
    #[cfg(feature = "demo")]
    Demo(demo::DemoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                // rustls warns about every client that sends an IP address as SNI (grpc-js does):
                // a client's quirk, not the operator's problem, on every connection.
                tracing_subscriber::EnvFilter::new(if cli.command.is_some() {
                    "warn,rustls=error"
                } else {
                    "info,rustls=error"
                })
            }),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    raise_fd_limit();
    // The control plane (admin, health checks, signals, reloads) needs one thread; the data plane,
    // accept loops included, runs on the gateway's worker threads, each with a runtime of its own
    // (see `grpcgate::worker`).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");

    #[cfg(feature = "demo")]
    if let Some(Command::Demo(args)) = cli.command {
        return match runtime.block_on(demo::run(args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("grpcgate demo: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let Some(path) = cli.config else {
        let or_demo = if cfg!(feature = "demo") {
            " (or run `grpcgate demo`)"
        } else {
            ""
        };
        eprintln!("grpcgate: --config FILE is required{or_demo}; see --help");
        return ExitCode::from(2);
    };
    let config = match load::config_file(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if cli.check {
        println!("{}: ok", path.display());
        return ExitCode::SUCCESS;
    }
    match runtime.block_on(run(path, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("grpcgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A proxy holds two sockets per busy client (downstream and its share of upstream), so the usual soft
/// limit of 1024 open files is hit long before the machine's real limit: raise the soft limit to the
/// hard one, as Go's runtime and Envoy's packaging do.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                tracing::warn!(
                    "could not raise the open-files limit: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

async fn run(path: PathBuf, config: Config) -> anyhow::Result<()> {
    let mut drain_timeout = config.drain_timeout;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let gateway = Gateway::start(config).await?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                tracing::info!(file = %path.display(), "SIGHUP received: reloading config");
                // A bad file is reported with its line and key, and the running config stays.
                match load::config_file(&path) {
                    Ok(config) => {
                        let timeout = config.drain_timeout;
                        if gateway.reload(config).is_ok() {
                            drain_timeout = timeout;
                        }
                    }
                    Err(e) => {
                        gateway.metrics().config_reload(false);
                        tracing::error!(error = %e, "config reload failed; keeping the running config");
                    }
                }
            }
        }
    }
    tracing::info!(
        drain_timeout_ms = drain_timeout.as_millis() as u64,
        "shutting down: draining connections"
    );
    let drained = gateway.shutdown(drain_timeout).await;
    tracing::info!(drained, "stopped");
    Ok(())
}
