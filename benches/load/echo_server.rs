//! Echo backends for the load benchmark: `echo-server --ports 50051,50052` starts one
//! `grpcgate::echo::EchoBackend` (tonic `echo.Echo` + `grpc.health.v1.Health`, h2c) per port, each on
//! its own thread and current-thread runtime, prints `READY <addr> <addr>...` on stdout and serves until
//! it is killed (SIGTERM/SIGINT end it cleanly).

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use grpcgate::echo::EchoBackend;
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser)]
#[command(
    name = "echo-server",
    about = "Echo gRPC backends for the load benchmark"
)]
struct Args {
    /// Comma-separated ports to listen on (port 0 picks a free one).
    #[arg(long, value_delimiter = ',', default_value = "50051,50052")]
    ports: Vec<u16>,
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// Delay before each answer, in microseconds.
    #[arg(long, default_value_t = 0)]
    delay_us: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The main thread only starts the backends and waits for a signal.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut backends = Vec::new();
        for (i, port) in args.ports.iter().enumerate() {
            let addr = SocketAddr::new(args.host, *port);
            let b =
                EchoBackend::start_on(addr, &format!("b{i}"), Duration::from_micros(args.delay_us))
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot start echo backend on {addr}: {e}"))?;
            backends.push(b);
        }
        let addrs: Vec<String> = backends.iter().map(|b| b.addr.to_string()).collect();
        println!("READY {}", addrs.join(" "));
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        for mut b in backends {
            b.kill();
        }
        Ok(())
    })
}
