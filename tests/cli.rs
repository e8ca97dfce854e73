//! The real `grpcgate` binary as a child process: `--version`, `--check` on good and bad configs (the
//! exact error line), SIGTERM drain with a call in flight, SIGHUP not killing the process, and a short
//! `demo` run with nothing but OK calls.
//!
//! Every child is killed when its guard drops, and every wait is bounded.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use common::binary::{grpcgate, try_http_get, write_config, GrpcGate};
use common::{bounded, WAIT};
use grpcgate::echo::EchoBackend;
use grpcgate::pb::echo::echo_client::EchoClient;
use grpcgate::pb::echo::EchoRequest;
use tonic::transport::Endpoint;

/// The result of running the binary to completion.
struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs the binary with `args` to completion (bounded; the child is killed if it overruns).
async fn run(args: &[&str]) -> Output {
    let out = tokio::time::timeout(WAIT, grpcgate().args(args).output())
        .await
        .unwrap_or_else(|_| panic!("grpcgate {args:?} did not exit within {WAIT:?}"))
        .expect("run grpcgate");
    Output {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `grpcgate --config <file with text> --check`; returns the output and the file's path.
async fn check(text: &str) -> (Output, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), text);
    let out = run(&["--config", path.to_str().unwrap(), "--check"]).await;
    (out, path, dir)
}

/// Asserts that `--check` on `text` fails and prints exactly `expected` (with `{path}` replaced by the
/// config file's path) as one line on stderr.
async fn assert_check_fails(text: &str, expected: &str) {
    let (out, path, _dir) = check(text).await;
    let expected = expected.replace("{path}", &path.display().to_string());
    assert!(
        !out.status.success(),
        "--check accepted a bad config (expected: {expected}); stdout: {}",
        out.stdout
    );
    assert_eq!(out.status.code(), Some(1), "exit status: {:?}", out.status);
    assert!(
        out.stderr.lines().any(|l| l == expected),
        "--check did not print the exact error line\nexpected: {expected}\nstderr:   {}",
        out.stderr
    );
}

/// A good config; its line numbers are what the bad variants below refer to.
const GOOD: &str = r#"[admin]
listen = "127.0.0.1:9901"

[[listeners]]
name = "edge"
listen = "127.0.0.1:8443"

[[listeners.routes]]
service = "echo.Echo"
cluster = "echo"
timeout = "10s"

[[clusters]]
name = "echo"
balancer = "round_robin"
endpoints = ["127.0.0.1:50051", "127.0.0.1:50052"]
"#;

/// `GOOD` with `from` replaced by `to` (which must occur exactly once).
fn good_with(from: &str, to: &str) -> String {
    assert_eq!(GOOD.matches(from).count(), 1, "{from:?} must occur once");
    GOOD.replace(from, to)
}

#[tokio::test]
async fn version_prints_the_crate_version() {
    let out = run(&["--version"]).await;
    assert!(out.status.success(), "{:?}: {}", out.status, out.stderr);
    assert_eq!(
        out.stdout.trim_end(),
        format!("grpcgate {}", env!("CARGO_PKG_VERSION"))
    );
}

#[tokio::test]
async fn check_accepts_a_good_config() {
    let (out, path, _dir) = check(GOOD).await;
    assert!(
        out.status.success(),
        "--check rejected a good config: {:?}\n{}",
        out.status,
        out.stderr
    );
    assert_eq!(out.stdout.trim_end(), format!("{}: ok", path.display()));
}

#[tokio::test]
async fn check_accepts_every_option() {
    // TLS with mTLS, health checking, every balancer, drain and connect timeouts.
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    std::fs::write(dir.path().join("server.crt"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("server.key"), key.serialize_pem()).unwrap();
    std::fs::write(dir.path().join("ca.crt"), ca.pem()).unwrap();
    let text = r#"drain_timeout = "5s"

[admin]
listen = "127.0.0.1:9901"

[[listeners]]
name = "edge"
listen = "127.0.0.1:8443"
max_concurrent_streams = 100

[listeners.tls]
cert = "server.crt"
key = "server.key"
client_ca = "ca.crt"

[[listeners.routes]]
service = "echo.Echo"
method = "Unary"
cluster = "a"
timeout = "250ms"

[[listeners.routes]]
cluster = "b"

[[clusters]]
name = "a"
balancer = "least_request"
endpoints = ["127.0.0.1:50051", "localhost:50052"]
connect_timeout = "1s"

[clusters.health_check]
interval = "1s"
timeout = "500ms"
unhealthy_threshold = 2
healthy_threshold = 1
service = ""

[[clusters]]
name = "b"
balancer = "join_shortest_queue"
endpoints = ["127.0.0.1:50053"]
"#;
    // Relative certificate paths resolve against the config file's directory.
    let path = write_config(dir.path(), text);
    let out = run(&["--config", path.to_str().unwrap(), "--check"]).await;
    assert!(
        out.status.success(),
        "--check rejected a good config: {:?}\n{}",
        out.status,
        out.stderr
    );
    assert_eq!(out.stdout.trim_end(), format!("{}: ok", path.display()));
}

#[tokio::test]
async fn check_rejects_an_unknown_balancer() {
    assert_check_fails(
        &good_with("\"round_robin\"", "\"rr\""),
        "{path}:15:12: clusters[0].balancer: unknown balancer \"rr\"; expected one of round_robin, join_shortest_queue, least_request, peak_ewma, weighted_round_robin",
    )
    .await;
}

#[tokio::test]
async fn check_rejects_an_unknown_key() {
    assert_check_fails(
        &good_with("timeout = \"10s\"", "timeot = \"10s\""),
        "{path}:11:1: listeners[0].routes[0].timeot: unknown key `timeot`, expected one of `service`, `method`, `cluster`, `timeout`",
    )
    .await;
}

#[tokio::test]
async fn check_rejects_a_route_to_a_missing_cluster() {
    assert_check_fails(
        &good_with("cluster = \"echo\"", "cluster = \"nope\""),
        "{path}:10:11: listeners[0].routes[0].cluster: route refers to unknown cluster \"nope\"",
    )
    .await;
}

#[tokio::test]
async fn check_rejects_a_duplicate_cluster_name() {
    let text =
        format!("{GOOD}\n[[clusters]]\nname = \"echo\"\nendpoints = [\"127.0.0.1:50053\"]\n");
    assert_check_fails(
        &text,
        "{path}:19:8: clusters[1].name: duplicate cluster name \"echo\"",
    )
    .await;
}

#[tokio::test]
async fn check_rejects_a_bad_listen_address() {
    assert_check_fails(
        &good_with("\"127.0.0.1:9901\"", "\"localhost:9901\""),
        "{path}:2:10: admin.listen: invalid address \"localhost:9901\": expected ip:port, e.g. 127.0.0.1:8443",
    )
    .await;
    assert_check_fails(
        &good_with("\"127.0.0.1:8443\"", "\"127.0.0.1:99999\""),
        "{path}:6:10: listeners[0].listen: invalid address \"127.0.0.1:99999\": expected ip:port, e.g. 127.0.0.1:8443",
    )
    .await;
}

#[tokio::test]
async fn check_rejects_a_bad_endpoint() {
    assert_check_fails(
        &good_with("\"127.0.0.1:50052\"", "\"127.0.0.1\""),
        "{path}:16:33: clusters[0].endpoints[1]: invalid endpoint \"127.0.0.1\": expected host:port, e.g. 10.0.0.7:50051",
    )
    .await;
}

#[tokio::test]
async fn check_rejects_empty_endpoints() {
    assert_check_fails(
        &good_with(
            "endpoints = [\"127.0.0.1:50051\", \"127.0.0.1:50052\"]",
            "endpoints = []",
        ),
        "{path}:16:13: clusters[0].endpoints: cluster \"echo\" has no endpoints",
    )
    .await;
}

#[tokio::test]
async fn check_rejects_an_unreadable_cert_file() {
    let text = good_with(
        "listen = \"127.0.0.1:8443\"\n",
        "listen = \"127.0.0.1:8443\"\n\n[listeners.tls]\ncert = \"missing.crt\"\nkey = \"missing.key\"\n",
    );
    // The path in the message is the cert's path resolved against the config file's directory.
    let (out, path, dir) = check(&text).await;
    let expected = format!(
        "{}:9:8: listeners[0].tls.cert: cannot read {}: No such file or directory (os error 2)",
        path.display(),
        dir.path().join("missing.crt").display()
    );
    assert_eq!(out.status.code(), Some(1), "exit status: {:?}", out.status);
    assert!(
        out.stderr.lines().any(|l| l == expected),
        "expected: {expected}\nstderr:   {}",
        out.stderr
    );
}

#[tokio::test]
async fn check_rejects_a_cert_file_without_a_certificate() {
    let text = good_with(
        "listen = \"127.0.0.1:8443\"\n",
        "listen = \"127.0.0.1:8443\"\n\n[listeners.tls]\ncert = \"garbage.crt\"\nkey = \"garbage.key\"\n",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("garbage.crt"), "not a certificate\n").unwrap();
    let path = write_config(dir.path(), &text);
    let out = run(&["--config", path.to_str().unwrap(), "--check"]).await;
    let expected = format!(
        "{}:9:8: listeners[0].tls.cert: no certificate found in {}",
        path.display(),
        dir.path().join("garbage.crt").display()
    );
    assert_eq!(out.status.code(), Some(1), "exit status: {:?}", out.status);
    assert!(
        out.stderr.lines().any(|l| l == expected),
        "expected: {expected}\nstderr:   {}",
        out.stderr
    );
}

/// `cert = "/dev/zero"` was read until memory ran out: now `--check` stops at the 1 MiB limit and
/// names the line, the key and the limit (`run` bounds the wait).
#[tokio::test]
async fn check_rejects_an_endless_cert_file_at_the_size_limit() {
    assert_check_fails(
        &good_with(
            "listen = \"127.0.0.1:8443\"\n",
            "listen = \"127.0.0.1:8443\"\n\n[listeners.tls]\ncert = \"/dev/zero\"\nkey = \"/dev/zero\"\n",
        ),
        "{path}:9:8: listeners[0].tls.cert: cannot read /dev/zero: larger than 1 MiB, the limit for a PEM file",
    )
    .await;
}

#[tokio::test]
async fn check_on_a_missing_config_file_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nope.toml");
    let out = run(&["--config", path.to_str().unwrap(), "--check"]).await;
    assert_eq!(out.status.code(), Some(1), "exit status: {:?}", out.status);
    let expected = format!(
        "{}: cannot read config file: No such file or directory (os error 2)",
        path.display()
    );
    assert!(
        out.stderr.lines().any(|l| l == expected),
        "expected: {expected}\nstderr:   {}",
        out.stderr
    );
}

// ---- the running proxy ----

/// Starts the binary with a listener "edge" and an admin server, both on port 0 (the binary logs the
/// addresses it bound), routing everything to `endpoint`, and waits (bounded) until `/ready` answers
/// 200.
async fn start_proxy(endpoint: SocketAddr) -> GrpcGate {
    let text = format!(
        r#"drain_timeout = "20s"

[admin]
listen = "127.0.0.1:0"

[[listeners]]
name = "edge"
listen = "127.0.0.1:0"

[[listeners.routes]]
cluster = "echo"

[[clusters]]
name = "echo"
endpoints = ["{endpoint}"]
"#
    );
    GrpcGate::spawn(&text).await
}

/// An echo client over one h2c connection.
async fn connect(
    addr: SocketAddr,
) -> Result<EchoClient<tonic::transport::Channel>, tonic::transport::Error> {
    let ch = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(WAIT)
        .connect()
        .await?;
    Ok(EchoClient::new(ch))
}

/// A proxy in front of an echo backend with one slow unary call (`delay_ms`) in flight when SIGTERM
/// is sent; returns once `/ready` answers 503.
struct Draining {
    proxy: GrpcGate,
    backend: EchoBackend,
    call: tokio::task::JoinHandle<
        Result<tonic::Response<grpcgate::pb::echo::EchoResponse>, tonic::Status>,
    >,
}

async fn start_draining(delay_ms: u32) -> Draining {
    let backend = EchoBackend::start("slow", Duration::ZERO)
        .await
        .expect("backend");
    let proxy = start_proxy(backend.addr).await;
    let mut c = bounded(connect(proxy.listener("edge")))
        .await
        .expect("connect");
    let call = tokio::spawn(async move {
        c.unary(EchoRequest {
            payload: b"in flight".to_vec(),
            delay_ms,
            ..Default::default()
        })
        .await
    });
    bounded(backend.stats.wait_started(1)).await;
    proxy.signal(libc::SIGTERM);

    // The admin server stays up during the drain (it stops only once connections are drained), so
    // `/ready` must turn 503 while the call is still in flight. Poll it, bounded.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let r = try_http_get(proxy.admin, "/ready").await;
        match r {
            Some((503, body)) => {
                assert_eq!(body.trim(), "draining");
                break;
            }
            Some((200, _)) => {}
            other => panic!(
                "/ready answered {other:?} during the drain; expected 503 while a call is in flight:\n{}",
                proxy.log()
            ),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/ready never turned 503 after SIGTERM:\n{}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        !call.is_finished(),
        "the slow call finished before /ready turned 503; the test cannot observe the drain"
    );
    Draining {
        proxy,
        backend,
        call,
    }
}

#[tokio::test]
async fn sigterm_drains_the_in_flight_call_and_exits_zero() {
    let Draining {
        mut proxy,
        backend,
        call,
    } = start_draining(2000).await;
    // `/healthz` keeps answering during the drain.
    assert_eq!(
        try_http_get(proxy.admin, "/healthz").await.map(|r| r.0),
        Some(200)
    );
    let resp = bounded(call)
        .await
        .expect("call task")
        .unwrap_or_else(|s| panic!("in-flight call failed during drain: {s:?}\n{}", proxy.log()));
    assert_eq!(resp.get_ref().payload, b"in flight");
    assert_eq!(resp.get_ref().backend, "slow");
    let status = proxy.wait_exit().await;
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status}:\n{}",
        proxy.log()
    );
    assert_eq!(
        backend
            .stats
            .completed
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    assert_eq!(
        backend
            .stats
            .cancelled
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    // Once it has exited, the admin server is gone too.
    assert_eq!(try_http_get(proxy.admin, "/healthz").await, None);
}

#[tokio::test]
async fn sigterm_refuses_new_calls_while_draining() {
    let Draining {
        mut proxy,
        backend,
        call,
    } = start_draining(5000).await;
    // A new client must be turned away promptly (connection refused, or the call fails), not served
    // and not left hanging until the drain is over.
    let attempt = tokio::time::timeout(Duration::from_secs(2), async {
        let mut c = connect(proxy.listener("edge"))
            .await
            .map_err(|e| e.to_string())?;
        c.unary(EchoRequest {
            payload: b"late".to_vec(),
            ..Default::default()
        })
        .await
        .map_err(|s| s.to_string())
    })
    .await;
    let still_in_flight = !call.is_finished();
    match attempt {
        Ok(Err(_refused)) => {}
        Ok(Ok(r)) => panic!(
            "a new call was served during the drain (by {})",
            r.get_ref().backend
        ),
        Err(_) => {
            let tcp = tokio::net::TcpStream::connect(proxy.listener("edge")).await;
            panic!(
                "a new connection during the drain was neither refused nor failed within 2s (it \
                 hangs); a plain TCP connect to {} {}",
                proxy.listener("edge"),
                if tcp.is_ok() {
                    "still succeeds: the listening socket is still open but nobody accepts"
                } else {
                    "is refused"
                }
            )
        }
    }
    assert!(
        still_in_flight,
        "the new call was only refused after the drain ended"
    );
    assert_eq!(
        backend
            .stats
            .started
            .load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the late call reached the backend"
    );
    let resp = bounded(call).await.expect("call task");
    assert!(resp.is_ok(), "in-flight call failed: {resp:?}");
    let status = proxy.wait_exit().await;
    assert_eq!(status.code(), Some(0), "exit status {status}");
}

#[tokio::test]
async fn sighup_reloads_the_config_and_keeps_the_old_one_when_the_new_one_is_bad() {
    let b0 = EchoBackend::start("b0", Duration::ZERO)
        .await
        .expect("backend");
    let b1 = EchoBackend::start("b1", Duration::ZERO)
        .await
        .expect("backend");
    let mut proxy = start_proxy(b0.addr).await;
    let mut c = bounded(connect(proxy.listener("edge")))
        .await
        .expect("connect");
    let backend_of = |r: tonic::Response<grpcgate::pb::echo::EchoResponse>| r.into_inner().backend;
    let call = EchoRequest {
        payload: b"x".to_vec(),
        ..Default::default()
    };
    assert_eq!(
        backend_of(bounded(c.unary(call.clone())).await.unwrap()),
        "b0"
    );

    // A good new config: the cluster now points at b1. The client's connection stays up.
    let text = std::fs::read_to_string(&proxy.config).unwrap();
    let moved = text.replace(&b0.addr.to_string(), &b1.addr.to_string());
    std::fs::write(&proxy.config, &moved).unwrap();
    proxy.signal(libc::SIGHUP);
    proxy.wait_for_log("config reloaded").await;
    assert_eq!(
        backend_of(bounded(c.unary(call.clone())).await.unwrap()),
        "b1"
    );

    // A bad one: refused with file, line and key; the running config keeps serving.
    std::fs::write(
        &proxy.config,
        moved.replace("name = \"echo\"\n", "name = \"echo\"\nbalancer = \"rr\"\n"),
    )
    .unwrap();
    proxy.signal(libc::SIGHUP);
    proxy.wait_for_log("config reload failed").await;
    let path = proxy.config.display().to_string();
    assert!(
        proxy.log().contains(&format!(
            "{path}:15:12: clusters[0].balancer: unknown balancer"
        )),
        "{}",
        proxy.log()
    );
    assert!(
        proxy.child.try_wait().unwrap().is_none(),
        "grpcgate exited on SIGHUP"
    );
    assert_eq!(
        backend_of(bounded(c.unary(call.clone())).await.unwrap()),
        "b1"
    );
    let (status, metrics) = try_http_get(proxy.admin, "/metrics")
        .await
        .expect("metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("grpcgate_config_reloads_total{result=\"success\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("grpcgate_config_reloads_total{result=\"failure\"} 1"),
        "{metrics}"
    );
    drop(c);
    // And an idle proxy still stops cleanly on SIGTERM.
    proxy.signal(libc::SIGTERM);
    let status = proxy.wait_exit().await;
    assert_eq!(status.code(), Some(0), "exit status {status}");
}

/// Every call of the demo succeeds: its load starts only once every backend has passed a health check
/// (before, the first call of each worker could find no healthy endpoint: `UNAVAILABLE 32`).
#[tokio::test]
async fn demo_reports_only_ok_calls() {
    let out = run(&["demo", "--seconds", "1"]).await;
    assert!(
        out.status.success(),
        "demo failed: {:?}\n{}\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    assert!(
        out.stdout
            .contains("ready            every backend passed its first health check"),
        "{}",
        out.stdout
    );
    let statuses = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("gRPC status"))
        .unwrap_or_else(|| panic!("no status line:\n{}", out.stdout))
        .trim();
    let ok: u64 = statuses
        .strip_prefix("OK ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("statuses other than OK: {statuses}\n{}", out.stdout));
    assert!(ok > 0, "no calls made:\n{}", out.stdout);
    assert!(
        out.stdout.contains("agrees with the clients"),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains("warning"), "{}", out.stdout);
}
