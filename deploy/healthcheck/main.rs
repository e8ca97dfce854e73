//! `grpcgate-healthcheck`: the container image's HEALTHCHECK, so that the runtime image needs no shell
//! and no curl. Standard library only; built with plain `rustc` (see the Dockerfile and
//! deploy/test-image.sh), not part of the grpcgate crate.
//!
//! Sends `GET <path>` to the admin server on 127.0.0.1 and exits 0 on a `200` status line, 1 on anything
//! else (refused, timed out, another status). Both limits are 2 s, below the HEALTHCHECK's `--timeout`.
//!
//!   grpcgate-healthcheck                   # GET /healthz on 127.0.0.1:$HEALTHCHECK_ADMIN_PORT (9901)
//!   grpcgate-healthcheck /ready            # another path
//!   grpcgate-healthcheck /ready 127.0.0.1:9902
//!
//! Environment: HEALTHCHECK_ADMIN_PORT (default 9901), HEALTHCHECK_PATH (default /healthz); arguments win.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(2);

fn check(addr: &str, path: &str) -> Result<String, String> {
    let sockaddr: SocketAddr = addr
        .to_socket_addrs()
        .map_err(|e| format!("bad address {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("bad address {addr}"))?;
    let mut conn = TcpStream::connect_timeout(&sockaddr, TIMEOUT)
        .map_err(|e| format!("connect {addr}: {e}"))?;
    conn.set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    conn.set_write_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nUser-Agent: grpcgate-healthcheck\r\n\r\n");
    conn.write_all(request.as_bytes())
        .map_err(|e| format!("write to {addr}: {e}"))?;
    // The status line is all we need: read until its end (or 512 bytes).
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    while !head.contains(&b'\n') && head.len() < 512 {
        let n = conn
            .read(&mut buf)
            .map_err(|e| format!("read from {addr}: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let status_line = line.lines().next().unwrap_or("").trim().to_string();
    let mut parts = status_line.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some(v), Some("200")) if v.starts_with("HTTP/") => Ok(status_line),
        _ => Err(format!("GET {path} on {addr}: {status_line:?}")),
    }
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .or_else(|| std::env::var("HEALTHCHECK_PATH").ok())
        .unwrap_or_else(|| "/healthz".to_string());
    let addr = args.next().unwrap_or_else(|| {
        let port = std::env::var("HEALTHCHECK_ADMIN_PORT").unwrap_or_else(|_| "9901".to_string());
        format!("127.0.0.1:{port}")
    });
    match check(&addr, &path) {
        Ok(status) => {
            println!("GET {path} on {addr}: {status}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("unhealthy: {e}");
            ExitCode::FAILURE
        }
    }
}
