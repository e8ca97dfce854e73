//! The admin server's limits against misbehaving clients, over real sockets: a slowloris connection
//! and an idle keep-alive connection are closed after the header timeout, a busy one at its maximum
//! age, connections over the cap are closed at once, and an accept loop out of file descriptors backs
//! off instead of spinning.
//!
//! The timer tests run on tokio's paused clock, so the real 10 s and 60 s limits take no wall-clock
//! time: the test runtime also runs the admin server, and when every task waits it jumps to the next
//! timer. Loopback I/O is ready as soon as the peer's call returns, so the jump never overtakes a
//! byte in flight. Every wait is bounded.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{bounded, http_get};
use grpcgate::admin::{HEADER_READ_TIMEOUT, MAX_CONNECTIONS, MAX_CONNECTION_AGE};
use grpcgate::Gateway;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

/// How much later than its bound a connection may be closed (virtual time: only scheduling slack).
const SLACK: Duration = Duration::from_secs(1);

/// A gateway with an admin server; its one cluster points at a port nothing listens on (the admin
/// tests make no calls) and has no health checks, so no timer but the admin server's runs.
async fn gateway() -> (Gateway, SocketAddr, tokio::net::TcpSocket) {
    let (hold, dead) = common::dead_endpoint();
    let gw = common::start(&common::config_text(&[dead], "round_robin", "", "")).await;
    let admin = gw.admin_addr().expect("admin configured");
    (gw, admin, hold)
}

async fn connect(addr: SocketAddr) -> TcpStream {
    bounded(TcpStream::connect(addr)).await.expect("connect")
}

/// Waits (at most `limit`) for the server to close `s`; returns how long that took. Whatever the
/// client sent unread may turn the close into a reset, which counts as closed too.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match timeout(limit.saturating_sub(start.elapsed()), s.read(&mut buf)).await {
            Err(_) => panic!("connection still open after {limit:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
            Ok(Ok(_)) => continue,
        }
    }
}

/// A `GET path` with `connection: close`: `Some((status, body))`, or `None` if the server closed the
/// connection without an answer (as it does over the cap). Unlike `common::http_get`, a reset is not
/// a failure here.
async fn try_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = connect(addr).await;
    let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    bounded(s.read_to_end(&mut buf)).await.ok()?;
    let text = String::from_utf8_lossy(&buf);
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}

/// Sends a keep-alive `GET path` on `s` and reads one response to its end; returns its status line.
async fn keep_alive_get(s: &mut TcpStream, path: &str) -> String {
    let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write request");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = bounded(s.read(&mut chunk)).await.expect("read response");
        assert!(n > 0, "connection closed before a whole response");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .expect("content-length");
            if body.len() >= length {
                return head.lines().next().unwrap().to_string();
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn slowloris_connection_is_closed_after_the_header_timeout_while_metrics_are_served() {
    let (_gw, admin, _hold) = gateway().await;
    let mut slow = connect(admin).await;
    let opened = Instant::now();
    slow.write_all(b"GET /metrics HTT").await.unwrap();

    let (status, body) = http_get(admin, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("grpcgate_"), "not the metrics: {body}");

    closed_within(&mut slow, HEADER_READ_TIMEOUT + SLACK).await;
    let after = opened.elapsed();
    assert!(
        after >= HEADER_READ_TIMEOUT - Duration::from_millis(10),
        "closed after {after:?}, before the header timeout ({HEADER_READ_TIMEOUT:?})"
    );
    // The server still answers once the slow client is gone.
    assert_eq!(http_get(admin, "/healthz").await.0, 200);
}

#[tokio::test(start_paused = true)]
async fn connections_over_the_cap_are_closed_at_once_and_healthz_answers_after_they_go() {
    let (_gw, admin, _hold) = gateway().await;
    let mut held = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        held.push(connect(admin).await);
    }
    // The server takes connections in order, so these arrive with every slot taken.
    for i in 0..4 {
        let mut extra = connect(admin).await;
        let took = closed_within(&mut extra, HEADER_READ_TIMEOUT).await;
        assert!(
            took < SLACK,
            "connection {i} over the cap closed after {took:?}, not at once"
        );
    }
    assert_eq!(
        try_get(admin, "/healthz").await,
        None,
        "/healthz answered with every slot taken"
    );

    // Well before any of them times out, the held connections go and free their slots.
    let dropped = Instant::now();
    drop(held);
    loop {
        if try_get(admin, "/healthz").await == Some((200, "ok\n".to_string())) {
            break;
        }
        assert!(
            dropped.elapsed() < HEADER_READ_TIMEOUT / 2,
            "/healthz still refused {:?} after the connections went",
            dropped.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn silent_connections_holding_every_slot_are_closed_after_the_header_timeout() {
    let (_gw, admin, _hold) = gateway().await;
    let opened = Instant::now();
    let mut held = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        held.push(connect(admin).await);
    }
    assert_eq!(try_get(admin, "/healthz").await, None, "cap not reached");
    for s in &mut held {
        closed_within(s, HEADER_READ_TIMEOUT + SLACK).await;
    }
    assert!(opened.elapsed() >= HEADER_READ_TIMEOUT - Duration::from_millis(10));
    // The clients keep their sockets open; the server closing them freed the slots.
    assert_eq!(http_get(admin, "/healthz").await, (200, "ok\n".to_string()));
}

#[tokio::test(start_paused = true)]
async fn idle_keep_alive_connection_is_closed_after_the_header_timeout() {
    let (_gw, admin, _hold) = gateway().await;
    let mut s = connect(admin).await;
    assert_eq!(keep_alive_get(&mut s, "/healthz").await, "HTTP/1.1 200 OK");
    // Kept alive: a second request on the same connection is served.
    assert_eq!(keep_alive_get(&mut s, "/ready").await, "HTTP/1.1 200 OK");
    let idle = closed_within(&mut s, HEADER_READ_TIMEOUT + SLACK).await;
    assert!(
        idle >= HEADER_READ_TIMEOUT - Duration::from_millis(10),
        "idle connection closed after {idle:?}, before {HEADER_READ_TIMEOUT:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn busy_keep_alive_connection_is_closed_at_the_max_age() {
    let (_gw, admin, _hold) = gateway().await;
    let mut s = connect(admin).await;
    let opened = Instant::now();
    // A request every 7 s never leaves the connection idle for the header timeout.
    let gap = Duration::from_secs(7);
    assert!(gap < HEADER_READ_TIMEOUT);
    let mut served = 0;
    let age = loop {
        assert_eq!(keep_alive_get(&mut s, "/metrics").await, "HTTP/1.1 200 OK");
        served += 1;
        let mut byte = [0u8; 1];
        match timeout(gap, s.read(&mut byte)).await {
            Err(_) => continue,
            Ok(Ok(0)) | Ok(Err(_)) => break opened.elapsed(),
            Ok(Ok(_)) => panic!("unexpected bytes between responses"),
        }
    };
    assert!(
        age >= MAX_CONNECTION_AGE - Duration::from_millis(10) && age < MAX_CONNECTION_AGE + SLACK,
        "closed at {age:?} after {served} requests; want {MAX_CONNECTION_AGE:?}"
    );
    assert!(served >= (MAX_CONNECTION_AGE.as_secs() / gap.as_secs()) as usize);
}

/// The real binary out of file descriptors: its soft limit is lowered (prlimit) to what it has open
/// plus two, so the third admin connection makes `accept` fail with EMFILE while the connection waits
/// in the backlog and keeps the listener readable. The process must log that once and stay near idle
/// (the old loop retried at once and used ~95 % of a core).
#[cfg(target_os = "linux")]
/// An NLB with PROXY protocol on its target group sends the header on health-check connections
/// too: `/ready` answers after a v1 line or a v2 LOCAL header, as without one; a broken header gets
/// the connection closed without an answer, and a header split over two writes still works.
#[tokio::test(start_paused = true)]
async fn health_checks_with_a_proxy_header_are_answered() {
    let (_gw, admin, _hold) = gateway().await;
    let get = |prefix: Vec<u8>, split: usize| async move {
        let mut s = connect(admin).await;
        let mut req = prefix;
        req.extend_from_slice(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        s.write_all(&req[..split]).await.expect("write");
        tokio::time::sleep(Duration::from_millis(20)).await;
        s.write_all(&req[split..]).await.expect("write");
        let mut buf = Vec::new();
        let _ = bounded(s.read_to_end(&mut buf)).await;
        String::from_utf8_lossy(&buf).into_owned()
    };
    let v1 = b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 9901\r\n".to_vec();
    let mut v2_local = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    v2_local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    for (name, prefix) in [
        ("none", Vec::new()),
        ("v1", v1.clone()),
        ("v2 LOCAL", v2_local),
    ] {
        for split in [1, 3, prefix.len().max(1)] {
            let reply = get(prefix.clone(), split).await;
            assert!(
                reply.starts_with("HTTP/1.1 200"),
                "{name} header, first write {split} bytes: {reply:?}"
            );
        }
    }
    let mut broken = v1;
    broken[10] = b'X'; // "PROXY TCP4" -> "PROXY TCPX"
    assert_eq!(
        get(broken, 1).await,
        "",
        "a broken PROXY header gets no answer"
    );
}

#[tokio::test]
async fn accept_out_of_file_descriptors_backs_off_instead_of_spinning() {
    use std::process::Stdio;
    use tokio::io::AsyncBufReadExt;

    let dir = tempfile::tempdir().unwrap();
    let (_hold, dead) = common::dead_endpoint();
    let path = dir.path().join("grpcgate.toml");
    std::fs::write(
        &path,
        common::config_text(&[dead], "round_robin", "", "").replace("workers = 2", "workers = 1"),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_grpcgate"))
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn grpcgate");
    let pid = child.id().unwrap() as libc::pid_t;
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let admin: SocketAddr = bounded(async {
        loop {
            let line = lines.next_line().await.unwrap().expect("grpcgate exited");
            if let Some(rest) = line.split("admin listening addr=").nth(1) {
                break rest.split_whitespace().next().unwrap().parse().unwrap();
            }
        }
    })
    .await;
    // Every descriptor it needs to serve is open once it has answered a request.
    assert_eq!(http_get(admin, "/healthz").await.0, 200);
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit only reads and writes the structs passed; the hard limit is kept as it is.
    unsafe {
        assert_eq!(
            libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut limit),
            0
        );
        limit.rlim_cur = open + 2;
        assert_eq!(
            libc::prlimit(pid, libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut()),
            0,
            "prlimit: {}",
            std::io::Error::last_os_error()
        );
    }

    let mut held = Vec::new();
    for _ in 0..6 {
        held.push(connect(admin).await);
    }
    bounded(async {
        loop {
            let line = lines.next_line().await.unwrap().expect("grpcgate exited");
            if line.contains("admin: accept failed") {
                break;
            }
        }
    })
    .await;

    let cpu = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        // utime and stime, fields 14 and 15 of proc(5), in clock ticks.
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let (before, started) = (cpu(), std::time::Instant::now());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = (cpu() - before) as f64 / ticks_per_second / started.elapsed().as_secs_f64();
    assert!(
        used < 0.25,
        "grpcgate used {:.0} % of a core while out of file descriptors",
        used * 100.0
    );

    // Logged once, not on every retry; then, with descriptors back, it serves again.
    drop(held);
    let more = bounded(async {
        let mut more = 0;
        let mut recovered = false;
        while !recovered {
            let line = lines.next_line().await.unwrap().expect("grpcgate exited");
            more += usize::from(line.contains("admin: accept failed"));
            recovered = line.contains("admin: accepting connections again");
        }
        more
    })
    .await;
    assert_eq!(more, 0, "the accept failure was logged more than once");
    let served = bounded(async {
        loop {
            // Connections still in the backlog may take the descriptors for a moment.
            if let Some((status, _)) = try_get(admin, "/healthz").await {
                break status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(served, 200);
    child.start_kill().unwrap();
}
