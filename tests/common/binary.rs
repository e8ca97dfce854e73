//! The real `grpcgate` binary as a child process: started from config text whose listeners and admin
//! server listen on port 0, with the bound addresses read from its own "listening" log lines (no
//! port is picked by the test, so parallel tests cannot collide), its stderr collected, and signals.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Notify;

use super::WAIT;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_grpcgate");

/// A command for the binary with a predictable log format.
pub fn grpcgate() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Writes `text` as `grpcgate.toml` into `dir` and returns its path.
pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("grpcgate.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// The child's stderr, collected line by line.
#[derive(Default)]
pub struct Log {
    text: Mutex<String>,
    changed: Notify,
}

/// A running `grpcgate --config FILE`, killed when dropped.
pub struct GrpcGate {
    pub child: Child,
    log: Arc<Log>,
    /// The bound address of each listener, by name, as the binary logged it.
    pub listeners: Vec<(String, SocketAddr)>,
    /// The bound address of the admin server.
    pub admin: SocketAddr,
    /// The config file (rewrite it and send SIGHUP to reload).
    pub config: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for GrpcGate {
    fn drop(&mut self) {
        // No-op if it already exited; otherwise do not leak it.
        let _ = self.child.start_kill();
    }
}

/// The value of `key=` in a log line of tracing's plain format.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

impl GrpcGate {
    /// Starts the binary on `text` (which must configure an admin server; any port, 0 included),
    /// learns every listener's and the admin server's bound address from the log, and waits (bounded)
    /// until `/ready` answers 200. Panics with the log if the process exits or is not ready in time.
    pub async fn spawn(text: &str) -> GrpcGate {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_config(dir.path(), text);
        let mut child = grpcgate()
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn grpcgate");
        let log = Arc::new(Log::default());
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[grpcgate] {line}");
                let mut t = sink.text.lock().unwrap();
                t.push_str(&line);
                t.push('\n');
                drop(t);
                sink.changed.notify_waiters();
            }
        });
        let mut gate = GrpcGate {
            child,
            log,
            listeners: Vec::new(),
            admin: "0.0.0.0:0".parse().unwrap(),
            config: path,
            _dir: dir,
        };
        // The gateway logs "admin listening" and one "listening" line per listener once all are
        // bound (before that, a failed bind exits the process, which the wait reports).
        let listeners = text.matches("[[listeners]]").count();
        gate.wait_until("the bound addresses", |log| {
            let admin = log
                .lines()
                .find(|l| l.contains(" admin listening "))
                .and_then(|l| field(l, "addr"));
            let bound: Vec<_> = log
                .lines()
                .filter(|l| l.contains(" listening ") && !l.contains(" admin listening "))
                .filter_map(|l| Some((field(l, "listener")?, field(l, "addr")?)))
                .collect();
            (admin.is_some() && bound.len() >= listeners).then_some(())
        })
        .await;
        let log = gate.log();
        gate.admin = log
            .lines()
            .find(|l| l.contains(" admin listening "))
            .and_then(|l| field(l, "addr"))
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no admin address in the log:\n{log}"));
        gate.listeners = log
            .lines()
            .filter(|l| l.contains(" listening ") && !l.contains(" admin listening "))
            .filter_map(|l| {
                Some((
                    field(l, "listener")?.to_string(),
                    field(l, "addr")?.parse().ok()?,
                ))
            })
            .collect();
        // Poll readiness, bounded; fail fast if the process died.
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = gate.child.try_wait().unwrap() {
                panic!("grpcgate exited early with {status}:\n{}", gate.log());
            }
            if try_http_get(gate.admin, "/ready").await.map(|r| r.0) == Some(200) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "grpcgate not ready within {WAIT:?}:\n{}",
                gate.log()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        gate
    }

    /// The bound address of listener `name`.
    pub fn listener(&self, name: &str) -> SocketAddr {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no listener {name:?} in {:?}", self.listeners))
            .1
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("still running")
    }

    /// Everything the child has written to stderr so far.
    pub fn log(&self) -> String {
        self.log.text.lock().unwrap().clone()
    }

    /// Waits (bounded) until `check` accepts the log; panics with `what` and the log otherwise, or
    /// at once if the process exits meanwhile.
    pub async fn wait_until<T>(&mut self, what: &str, check: impl Fn(&str) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let changed = self.log.changed.notified();
            if let Some(t) = check(&self.log.text.lock().unwrap()) {
                return t;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "grpcgate exited with {status} while waiting for {what}:\n{}",
                    self.log()
                );
            }
            // Woken by a new line; the short bound only serves to notice an exit.
            let _ = tokio::time::timeout(Duration::from_millis(100), changed).await;
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {what} in the log within {WAIT:?}:\n{}",
                self.log()
            );
        }
    }

    /// Waits (bounded) until the log contains `needle`.
    pub async fn wait_for_log(&mut self, needle: &str) {
        self.wait_until(&format!("{needle:?}"), |log| {
            log.contains(needle).then_some(())
        })
        .await
    }

    /// Sends `sig` to the process.
    pub fn signal(&self, sig: libc::c_int) {
        let pid = self.pid() as libc::pid_t;
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
    }

    /// Waits (bounded) for the process to exit.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        match tokio::time::timeout(WAIT, self.child.wait()).await {
            Ok(status) => status.expect("wait"),
            Err(_) => panic!("grpcgate did not exit within {WAIT:?}:\n{}", self.log()),
        }
    }

    /// How many files the process has open (`/proc/PID/fd`).
    pub fn open_files(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("read /proc/PID/fd")
            .count()
    }
}

/// A minimal HTTP/1.1 GET that reports failure instead of panicking: `None` if the server cannot be
/// reached or does not answer within the bound.
pub async fn try_http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Some((status, body))
    };
    tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .ok()
        .flatten()
}
