//! Chaos under load (issue 20): steady mixed load (unary, server streaming, client streaming; tonic
//! clients on several connections, rotated by the listener's `max_connection_age`) through the real
//! `grpcgate` binary while, one at a time and then all together, a backend process is SIGKILLed and
//! restarted, a backend process restarts gracefully (SIGTERM: NOT_SERVING, GOAWAY, drain), the config
//! is reloaded every 500 ms alternating two versions (SIGHUP), and a DNS cluster's records change.
//!
//! Pass: no call fails except those in flight on a SIGKILLed backend, each of which is accounted for
//! one by one and fails with `UNAVAILABLE`; afterwards every in-flight gauge reads 0, the proxy's open
//! files are back to its baseline (plus the upstream connections it reports pooled), its log has no
//! warning the test did not expect, and it drains and exits 0 on SIGTERM.
//!
//! The backends that get killed are separate processes: this test binary itself, run again with
//! [`CHILD_ENV`] set (see [`chaos_backend_process`]). Each prints a line when a call's handler starts
//! and when it ends, with the call's `x-call-id`, so the test knows which calls a kill caught.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use common::binary::GrpcGate;
use common::dns::{ip, pods, DnsServer, Mode};
use common::*;
use grpcgate::pb::echo::echo_client::EchoClient;
use grpcgate::pb::echo::echo_server::{Echo, EchoServer};
use grpcgate::pb::echo::{EchoRequest, EchoResponse};
use grpcgate::pb::health::health_check_response::ServingStatus;
use grpcgate::pb::health::health_server::{Health, HealthServer};
use grpcgate::pb::health::{HealthCheckRequest, HealthCheckResponse};
use parking_lot::Mutex;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status, Streaming};

/// Set (to `name@addr`) in the environment of this binary run as a backend process.
const CHILD_ENV: &str = "GRPCGATE_CHAOS_BACKEND";

/// How long after a SIGKILLed backend process has gone the proxy may still send a call on its pooled
/// connection to it: until the proxy's worker reads the connection's end, a call leased on it may be
/// written into a closed socket and fail (`broken pipe`, `connection reset`) although nothing of it
/// reached a backend. Measured 0-13 ms after the process was reaped; the bound is generous for CI.
/// (A call still queued in h2 when the connection's end is read is sent again on another connection,
/// `take_unwritten_request_head`: 3 such calls in 3 runs, none failed. Only the ones whose HEADERS
/// were already written can fail: the proxy cannot know that the dead process never read them.)
const DEAD_CONNECTION: Duration = Duration::from_secs(1);

/// How long all the faults go on together.
const TOGETHER: Duration = Duration::from_secs(30);

/// The whole test, setup and checks included, must end within this: it can never hang CI.
const HARD_LIMIT: Duration = Duration::from_secs(240);

// ---------------------------------------------------------------------------------------------------
// The backend process
// ---------------------------------------------------------------------------------------------------

/// One protocol line to the test on stdout (`CHAOS ...`), written and flushed at once so that a
/// SIGKILL loses none that the process has written. Goes to the file descriptor, not through the
/// test harness's output capture.
fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "CHAOS {line}");
    let _ = out.flush();
}

/// Not a test: the backend process. Run normally, it returns at once; run with [`CHILD_ENV`] set, it
/// serves `echo.Echo` and `grpc.health.v1.Health` on the address given until SIGTERM (then drains and
/// exits 0) or SIGKILL.
#[test]
fn chaos_backend_process() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (name, addr) = spec.split_once('@').expect("name@addr");
    let addr: SocketAddr = addr.parse().expect("addr");
    let code = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(serve_backend(name, addr));
    std::process::exit(code);
}

/// Serves until SIGTERM; returns the exit code.
async fn serve_backend(name: &str, addr: SocketAddr) -> i32 {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    // A restart binds the address its predecessor had; the kernel may take a moment to release it.
    let mut tries = 0;
    let listener = loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 100 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("bind {addr}: {e}"),
        }
    };
    let local = listener.local_addr().expect("local addr");
    let (status_tx, status_rx) = watch::channel(ServingStatus::Serving);
    let stop = CancellationToken::new();
    // Ends on shutdown, dropping the listener: new connections are refused at once (as grpc-go's
    // GracefulStop does), while tonic drains the open ones.
    let incoming = futures_util::stream::unfold(
        (Some(listener), stop.clone()),
        |(listener, stop)| async move {
            let l = listener?;
            let conn = tokio::select! {
                _ = stop.cancelled() => return None,
                c = l.accept() => c.map(|(s, _)| {
                    let _ = s.set_nodelay(true);
                    s
                }),
            };
            Some((conn, (Some(l), stop)))
        },
    );
    let echo = ChaosEcho { name: name.into() };
    let server = tonic::transport::Server::builder()
        .http2_max_pending_accept_reset_streams(Some(1000))
        .add_service(HealthServer::new(ChaosHealth { status: status_rx }))
        .add_service(EchoServer::new(echo))
        .serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned());
    let mut server = std::pin::pin!(server);
    say(&format!("READY {local}"));
    tokio::select! {
        r = &mut server => panic!("server ended by itself: {r:?}"),
        _ = term.recv() => {}
    }
    say("DRAINING");
    // Health/Watch streams get NOT_SERVING and then end (their sender is gone), so that they do not
    // hold the drain open; connections get GOAWAY and close once their calls are done.
    let _ = status_tx.send(ServingStatus::NotServing);
    drop(status_tx);
    stop.cancel();
    match tokio::time::timeout(Duration::from_secs(10), server).await {
        Ok(Ok(())) => {
            say("DRAINED");
            0
        }
        other => {
            say(&format!("DRAIN FAILED {other:?}"));
            1
        }
    }
}

/// `echo.Echo` that reports each call's start (`S id`) and end (`F id`, when its handler has handed
/// over the last message) by `x-call-id`.
#[derive(Clone)]
struct ChaosEcho {
    name: Arc<str>,
}

/// The `x-call-id` of a request, reported as started.
fn started(md: &tonic::metadata::MetadataMap) -> String {
    let id = md
        .get("x-call-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    say(&format!("S {id}"));
    id
}

impl ChaosEcho {
    fn response(&self, req: &EchoRequest, seq: u32) -> EchoResponse {
        EchoResponse {
            payload: req.payload.clone(),
            backend: self.name.to_string(),
            seq,
            total_bytes: 0,
        }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for ChaosEcho {
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        let id = started(request.metadata());
        let req = request.into_inner();
        tokio::time::sleep(Duration::from_millis(req.delay_ms.into())).await;
        let resp = self.response(&req, 0);
        say(&format!("F {id}"));
        Ok(Response::new(resp))
    }

    type ServerStreamStream = BoxStream<EchoResponse>;

    async fn server_stream(
        &self,
        request: Request<EchoRequest>,
    ) -> Result<Response<Self::ServerStreamStream>, Status> {
        let id = started(request.metadata());
        let req = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let this = self.clone();
        tokio::spawn(async move {
            for seq in 0..req.count {
                tokio::time::sleep(Duration::from_millis(req.delay_ms.into())).await;
                if tx.send(Ok(this.response(&req, seq))).await.is_err() {
                    return;
                }
            }
            say(&format!("F {id}"));
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn client_stream(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoResponse>, Status> {
        let id = started(request.metadata());
        let mut stream = request.into_inner();
        let (mut count, mut total) = (0u32, 0u64);
        while let Some(msg) = stream.next().await {
            let msg = msg?;
            count += 1;
            total += msg.payload.len() as u64;
        }
        let resp = EchoResponse {
            payload: Vec::new(),
            backend: self.name.to_string(),
            seq: count,
            total_bytes: total,
        };
        say(&format!("F {id}"));
        Ok(Response::new(resp))
    }

    type BidiStream = BoxStream<EchoResponse>;

    async fn bidi(
        &self,
        _request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<Self::BidiStream>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

/// `grpc.health.v1.Health` following one status for every service name.
struct ChaosHealth {
    status: watch::Receiver<ServingStatus>,
}

fn health_response(s: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse { status: s as i32 }
}

#[tonic::async_trait]
impl Health for ChaosHealth {
    async fn check(
        &self,
        _request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        Ok(Response::new(health_response(*self.status.borrow())))
    }

    type WatchStream = BoxStream<HealthCheckResponse>;

    async fn watch(
        &self,
        _request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        // The current status, then each change; ends once the sender is gone.
        let updates = futures_util::stream::unfold(
            (self.status.clone(), true),
            |(mut rx, first)| async move {
                if !first {
                    rx.changed().await.ok()?;
                }
                let s = *rx.borrow_and_update();
                Some((Ok(health_response(s)), (rx, false)))
            },
        );
        Ok(Response::new(Box::pin(updates)))
    }
}

// ---------------------------------------------------------------------------------------------------
// The backend processes, seen from the test
// ---------------------------------------------------------------------------------------------------

/// Where a call's handler ran: backend index and life (incremented by each restart).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seen {
    backend: usize,
    life: u32,
    finished: bool,
}

/// What the backend processes reported, by call id.
type Ledger = Arc<Mutex<HashMap<u64, Seen>>>;

/// What went wrong in a backend process: a call that reached two handlers, a panic.
type Problems = Arc<Mutex<Vec<String>>>;

/// One backend process (one life of a backend).
struct Proc {
    addr: SocketAddr,
    life: u32,
    child: Child,
    /// Collects the process's stdout until EOF; gives the lines that were not call reports.
    reader: tokio::task::JoinHandle<Vec<String>>,
}

impl Proc {
    /// Starts backend `index` (named `s{index}`) on `addr` (port 0 the first time) and waits until it
    /// listens.
    async fn spawn(
        index: usize,
        addr: SocketAddr,
        life: u32,
        ledger: &Ledger,
        problems: &Problems,
    ) -> Proc {
        let mut child = Command::new(std::env::current_exe().expect("current exe"))
            .args([
                "--exact",
                "chaos_backend_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, format!("s{index}@{addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn backend process");
        let stderr = child.stderr.take().unwrap();
        let panics = problems.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[s{index}/{life}] {line}");
                if line.contains("panicked") {
                    panics.lock().push(format!("s{index} life {life}: {line}"));
                }
            }
        });
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let stdout = child.stdout.take().unwrap();
        let (ledger, problems) = (ledger.clone(), problems.clone());
        let reader = tokio::spawn(async move {
            let mut ready_tx = Some(ready_tx);
            let mut other = Vec::new();
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                // The harness's "test chaos_backend_process ... " has no newline of its own.
                let Some((_, report)) = line.split_once("CHAOS ") else {
                    continue; // the test harness's own lines
                };
                let (what, arg) = report.split_once(' ').unwrap_or((report, ""));
                match (what, arg.parse::<u64>()) {
                    ("S", Ok(id)) => {
                        let seen = Seen {
                            backend: index,
                            life,
                            finished: false,
                        };
                        if let Some(before) = ledger.lock().insert(id, seen) {
                            problems.lock().push(format!(
                                "call {id} reached a backend twice: {before:?}, then {seen:?}"
                            ));
                        }
                    }
                    ("F", Ok(id)) => {
                        if let Some(s) = ledger.lock().get_mut(&id) {
                            s.finished = true;
                        }
                    }
                    ("READY", _) => {
                        let addr: SocketAddr = arg.parse().expect("READY addr");
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(addr);
                        }
                    }
                    _ => other.push(report.to_string()),
                }
            }
            other
        });
        let addr = tokio::time::timeout(WAIT, ready_rx)
            .await
            .unwrap_or_else(|_| panic!("backend s{index} not listening within {WAIT:?}"))
            .unwrap_or_else(|_| panic!("backend s{index} exited before listening"));
        Proc {
            addr,
            life,
            child,
            reader,
        }
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = self.child.id().expect("running") as libc::pid_t;
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
    }

    /// Waits (bounded) for the exit and for every line the process wrote.
    async fn reap(mut self) -> (std::process::ExitStatus, Vec<String>) {
        let status = bounded(self.child.wait()).await.expect("wait backend");
        let lines = bounded(self.reader).await.expect("backend reader");
        (status, lines)
    }
}

/// One stop of a backend process: which life ended, from the signal to the process's end.
#[derive(Clone, Copy, Debug)]
struct Stop {
    backend: usize,
    life: u32,
    signalled: Instant,
    reaped: Instant,
}

impl Stop {
    fn overlaps(&self, c: &Call) -> bool {
        c.start <= self.reaped && self.signalled <= c.end
    }
}

/// `t` - `origin` in milliseconds, signed.
fn ms_after(origin: Instant, t: Instant) -> f64 {
    if t >= origin {
        (t - origin).as_secs_f64() * 1e3
    } else {
        -(origin - t).as_secs_f64() * 1e3
    }
}

/// The restartable backends: their current processes, and the calls each kill caught.
struct Backends {
    procs: Vec<Option<Proc>>,
    ledger: Ledger,
    problems: Problems,
    /// Every SIGKILL.
    kills: Vec<Stop>,
    /// Every graceful restart.
    graceful: Vec<Stop>,
}

impl Backends {
    async fn start(n: usize) -> Backends {
        let (ledger, problems) = (Ledger::default(), Problems::default());
        let mut procs = Vec::new();
        for i in 0..n {
            let any_port = "127.0.0.1:0".parse().unwrap();
            procs.push(Some(Proc::spawn(i, any_port, 0, &ledger, &problems).await));
        }
        Backends {
            procs,
            ledger,
            problems,
            kills: Vec::new(),
            graceful: Vec::new(),
        }
    }

    fn addr(&self, i: usize) -> SocketAddr {
        self.procs[i].as_ref().expect("running").addr
    }

    /// SIGKILL backend `i`, then start it again on the same address.
    async fn kill_and_restart(&mut self, i: usize) {
        let p = self.procs[i].take().expect("running");
        let (addr, life) = (p.addr, p.life);
        let signalled = Instant::now();
        p.signal(libc::SIGKILL);
        let (status, _) = p.reap().await;
        self.kills.push(Stop {
            backend: i,
            life,
            signalled,
            reaped: Instant::now(),
        });
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        self.procs[i] = Some(Proc::spawn(i, addr, life + 1, &self.ledger, &self.problems).await);
    }

    /// SIGTERM backend `i` (it reports NOT_SERVING, sends GOAWAY, drains and exits 0), then start it
    /// again on the same address.
    async fn graceful_restart(&mut self, i: usize) {
        let p = self.procs[i].take().expect("running");
        let (addr, life) = (p.addr, p.life);
        let signalled = Instant::now();
        p.signal(libc::SIGTERM);
        let (status, lines) = p.reap().await;
        self.graceful.push(Stop {
            backend: i,
            life,
            signalled,
            reaped: Instant::now(),
        });
        assert!(
            status.success() && lines.iter().any(|l| l == "DRAINED"),
            "backend s{i} did not drain: {status}, {lines:?}"
        );
        self.procs[i] = Some(Proc::spawn(i, addr, life + 1, &self.ledger, &self.problems).await);
    }

    /// Waits (bounded) until the current life of backend `i` has answered a call: it is back in
    /// rotation.
    async fn wait_serving(&self, i: usize) {
        let life = self.procs[i].as_ref().expect("running").life;
        let deadline = Instant::now() + WAIT;
        loop {
            if self
                .ledger
                .lock()
                .values()
                .any(|s| s.backend == i && s.life == life && s.finished)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "backend s{i} (life {life}) got no call within {WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Kind {
    Unary,
    ServerStream,
    ClientStream,
}

/// One call as its client saw it.
#[derive(Debug)]
struct Call {
    id: u64,
    kind: Kind,
    start: Instant,
    end: Instant,
    /// The backend that answered, or the status.
    result: Result<String, Status>,
}

/// What the load's callers saw.
#[derive(Default)]
struct Outcome {
    calls: Vec<Call>,
    /// Calls tonic lost in the client at a GOAWAY before sending them (see
    /// [`common::unsent_in_client`], [`written_after_close`]); each was sent again with the same id.
    /// The proxy's counters must show that none of them reached it.
    unsent: Vec<String>,
}

/// Whether hyper failed a call because writing it hit a connection the proxy had already closed
/// (`UNKNOWN: transport error`, an I/O error `BrokenPipe` or `ConnectionReset` from hyper): a call
/// hyper sent on a connection after its GOAWAY and last stream had ended, which is hyper's side of
/// the race [`common::unsent_in_client`] describes. The write failed, so the proxy never read it;
/// the test checks that with the proxy's counters.
fn written_after_close(s: &Status) -> bool {
    if s.code() != Code::Unknown {
        return false;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(s);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            );
        }
        source = e.source();
    }
    false
}

/// Messages per streaming call.
const STREAM_LEN: u32 = 4;

/// `r` with `x-call-id: id`.
fn tagged<T>(mut r: Request<T>, id: u64) -> Request<T> {
    r.metadata_mut()
        .insert("x-call-id", id.to_string().parse().unwrap());
    r
}

/// One call of `kind` with id `id`: Ok(backend) or the status (a wrong answer is `INTERNAL`).
async fn one_call(c: &mut EchoClient<Channel>, kind: Kind, id: u64) -> Result<String, Status> {
    let payload = vec![b'x'; 64 + (id % 200) as usize];
    let with_id = |r| tagged(r, id);
    let wrong = |what: String| Status::internal(format!("wrong answer: {what}"));
    match kind {
        Kind::Unary => {
            let r = c
                .unary(with_id(Request::new(EchoRequest {
                    payload: payload.clone(),
                    delay_ms: (id % 10) as u32,
                    ..Default::default()
                })))
                .await?
                .into_inner();
            if r.payload != payload {
                return Err(wrong("payload".into()));
            }
            Ok(r.backend)
        }
        Kind::ServerStream => {
            let mut s = c
                .server_stream(with_id(Request::new(EchoRequest {
                    payload: payload.clone(),
                    count: STREAM_LEN,
                    delay_ms: 5,
                    ..Default::default()
                })))
                .await?
                .into_inner();
            let mut backend = String::new();
            let mut seq = 0;
            while let Some(m) = s.message().await? {
                if m.seq != seq || m.payload != payload {
                    return Err(wrong(format!("message {} as {seq}", m.seq)));
                }
                seq += 1;
                backend = m.backend;
            }
            if seq != STREAM_LEN {
                return Err(wrong(format!("{seq} messages")));
            }
            Ok(backend)
        }
        Kind::ClientStream => {
            let msgs: Vec<EchoRequest> = (0..STREAM_LEN)
                .map(|_| EchoRequest {
                    payload: payload.clone(),
                    ..Default::default()
                })
                .collect();
            let r = c
                .client_stream(tagged(Request::new(tokio_stream::iter(msgs)), id))
                .await?
                .into_inner();
            if r.seq != STREAM_LEN || r.total_bytes != u64::from(STREAM_LEN) * payload.len() as u64
            {
                return Err(wrong(format!(
                    "{} messages, {} bytes",
                    r.seq, r.total_bytes
                )));
            }
            Ok(r.backend)
        }
    }
}

/// Steady load: on each of `connections` client connections, one caller per call kind, calling back
/// to back until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Outcome>>,
    done: Arc<AtomicU64>,
}

impl Load {
    async fn start(addr: SocketAddr, connections: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let next_id = Arc::new(AtomicU64::new(1));
        let done = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..connections {
            let client = client(addr).await;
            for kind in [Kind::Unary, Kind::ServerStream, Kind::ClientStream] {
                let (stop, next_id, done, mut c) =
                    (stop.clone(), next_id.clone(), done.clone(), client.clone());
                tasks.push(tokio::spawn(async move {
                    let mut out = Outcome::default();
                    while !stop.load(SeqCst) {
                        let id = next_id.fetch_add(1, SeqCst);
                        let start = Instant::now();
                        let result = loop {
                            let r = match tokio::time::timeout(WAIT, one_call(&mut c, kind, id))
                                .await
                            {
                                Ok(r) => r,
                                Err(_) => Err(Status::deadline_exceeded("no answer within WAIT")),
                            };
                            match r {
                                Err(s)
                                    if (unsent_in_client(&s) || written_after_close(&s))
                                        && out.unsent.len() < 1000 =>
                                {
                                    out.unsent.push(format!("{kind:?} {id}: {s:?}"));
                                }
                                r => break r,
                            }
                        };
                        out.calls.push(Call {
                            id,
                            kind,
                            start,
                            end: Instant::now(),
                            result,
                        });
                        done.fetch_add(1, SeqCst);
                    }
                    out
                }));
            }
        }
        Load { stop, tasks, done }
    }

    /// Waits (bounded) until `n` more calls have finished.
    async fn wait_calls(&self, n: u64) {
        let target = self.done.load(SeqCst) + n;
        bounded(async {
            while self.done.load(SeqCst) < target {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }

    async fn stop(self) -> Outcome {
        self.stop.store(true, SeqCst);
        let mut all = Outcome::default();
        for t in self.tasks {
            let o = bounded(t).await.expect("caller");
            all.calls.extend(o.calls);
            all.unsent.extend(o.unsent);
        }
        all
    }
}

// ---------------------------------------------------------------------------------------------------
// The proxy
// ---------------------------------------------------------------------------------------------------

/// Two versions of one config, alternated by the reloads: they move the streaming methods between the
/// clusters and switch the static cluster's balancer; listeners and endpoints stay.
fn config(version: u8, statics: &[SocketAddr], dns: SocketAddr, pod_port: u16) -> String {
    let eps: Vec<String> = statics.iter().map(|a| format!("\"{a}\"")).collect();
    let (to_pods, balancer) = if version == 0 {
        ("ServerStream", "round_robin")
    } else {
        ("ClientStream", "least_request")
    };
    format!(
        r#"workers = 2
drain_timeout = "10s"

[dns]
nameservers = ["{dns}"]

[admin]
listen = "127.0.0.1:0"

[[listeners]]
name = "edge"
listen = "127.0.0.1:0"
max_connection_age = "1s"
max_connection_age_grace = "10s"

[[listeners.routes]]
service = "echo.Echo"
method = "{to_pods}"
cluster = "pods"

[[listeners.routes]]
cluster = "static"

[[clusters]]
name = "static"
balancer = "{balancer}"
endpoints = [{eps}]

[clusters.health_check]
interval = "200ms"
timeout = "1s"

[[clusters]]
name = "pods"
balancer = "round_robin"
dns = "pods.chaos.test:{pod_port}"
dns_refresh = "100ms"

[clusters.health_check]
interval = "200ms"
timeout = "1s"
"#,
        eps = eps.join(", ")
    )
}

/// `GET /clusters`: per cluster, (address, healthy, connections) of each endpoint.
async fn clusters(admin: SocketAddr) -> BTreeMap<String, Vec<(String, bool, u64)>> {
    let (status, body) = http_get(admin, "/clusters").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let mut eps: Vec<_> = c["endpoints"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| {
                    (
                        e["address"].as_str().unwrap().to_string(),
                        e["healthy"] == true,
                        e["connections"].as_u64().unwrap_or(0),
                    )
                })
                .collect();
            eps.sort();
            (c["name"].as_str().unwrap().to_string(), eps)
        })
        .collect()
}

/// Waits (bounded) until each cluster's healthy endpoints are exactly `want` (sorted addresses).
async fn wait_healthy(admin: SocketAddr, want: &[(&str, Vec<String>)]) {
    let deadline = Instant::now() + WAIT;
    loop {
        let c = clusters(admin).await;
        let ok = want.iter().all(|(name, addrs)| {
            let healthy: Vec<String> = c
                .get(*name)
                .map(|eps| eps.iter().filter(|e| e.1).map(|e| e.0.clone()).collect())
                .unwrap_or_default();
            &healthy == addrs
        });
        if ok {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "clusters {c:?}, want healthy {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Replaces the config file at once (a reload never reads half a file) and sends SIGHUP; waits
/// (bounded) until the proxy has logged the `n`th successful reload.
async fn reload(gate: &mut GrpcGate, text: &str, n: usize) {
    let tmp = gate.config.with_extension("toml.new");
    std::fs::write(&tmp, text).expect("write config");
    std::fs::rename(&tmp, &gate.config).expect("replace config");
    gate.signal(libc::SIGHUP);
    gate.wait_until(&format!("reload {n}"), |log| {
        (log.matches("config reloaded").count() >= n).then_some(())
    })
    .await;
}

/// The DNS answers the pods cluster cycles through (last octets of 127.0.0.x).
const POD_SETS: [&[u8]; 4] = [&[2, 3], &[2, 3, 4], &[3, 4], &[2, 4]];

fn pod_addrs(port: u16, set: &[u8]) -> Vec<String> {
    let mut v: Vec<String> = set.iter().map(|l| format!("127.0.0.{l}:{port}")).collect();
    v.sort();
    v
}

/// Every sample of a gauge that counts something in flight or open, that is not 0.
fn nonzero_in_flight(s: &prometheus_parse::Scrape) -> Vec<String> {
    s.samples
        .iter()
        .filter(|x| {
            x.metric.contains("in_flight")
                || x.metric.contains("inflight")
                || x.metric.ends_with("_active")
        })
        .filter_map(|x| match x.value {
            prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) if v != 0.0 => {
                Some(format!("{}{:?} = {v}", x.metric, x.labels))
            }
            _ => None,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_under_load() {
    tokio::time::timeout(HARD_LIMIT, chaos())
        .await
        .unwrap_or_else(|_| panic!("the chaos test overran its hard limit of {HARD_LIMIT:?}"));
}

async fn chaos() {
    const KILLED: usize = 0; // SIGKILLed and restarted
    const GRACEFUL: usize = 1; // SIGTERM, drained and restarted
    let t0 = Instant::now();
    let mut backends = Backends::start(3).await;
    let statics: Vec<SocketAddr> = (0..3).map(|i| backends.addr(i)).collect();
    let (pod_port, _pods) = pods().await;
    let dns = DnsServer::start(&[ip(2), ip(3)]).await;
    let configs = [0, 1].map(|v| config(v, &statics, dns.addr, pod_port));
    let mut gate = GrpcGate::spawn(&configs[0]).await;
    let admin = gate.admin;
    let edge = gate.listener("edge");
    let mut static_addrs: Vec<String> = statics.iter().map(|a| a.to_string()).collect();
    static_addrs.sort();
    wait_healthy(
        admin,
        &[
            ("static", static_addrs.clone()),
            ("pods", pod_addrs(pod_port, POD_SETS[0])),
        ],
    )
    .await;
    // Baseline: the proxy idle, every health check running, no call made yet.
    let baseline_files = gate.open_files();
    let baseline_pooled: u64 = clusters(admin).await.values().flatten().map(|e| e.2).sum();
    eprintln!("chaos: baseline {baseline_files} open files, {baseline_pooled} pooled upstream connections");

    let load = Load::start(edge, 4).await;
    load.wait_calls(200).await;

    // One at a time. SIGKILL.
    for _ in 0..5 {
        backends.kill_and_restart(KILLED).await;
        backends.wait_serving(KILLED).await;
        load.wait_calls(100).await;
    }
    eprintln!("chaos: {:?} kills done", t0.elapsed());
    // Graceful restarts.
    for _ in 0..5 {
        backends.graceful_restart(GRACEFUL).await;
        backends.wait_serving(GRACEFUL).await;
        load.wait_calls(100).await;
    }
    eprintln!("chaos: {:?} graceful restarts done", t0.elapsed());
    // Reloads every 500 ms.
    let mut reloads = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    for _ in 0..20 {
        tick.tick().await;
        reloads += 1;
        reload(&mut gate, &configs[reloads % 2], reloads).await;
    }
    eprintln!("chaos: {:?} reloads done", t0.elapsed());
    // Endpoint sets changing through DNS.
    for set in POD_SETS.iter().cycle().skip(1).take(8) {
        dns.set(
            &set.iter().map(|l| ip(*l)).collect::<Vec<_>>(),
            Mode::Answer,
        );
        wait_healthy(admin, &[("pods", pod_addrs(pod_port, set))]).await;
        load.wait_calls(100).await;
    }
    eprintln!("chaos: {:?} DNS changes done", t0.elapsed());

    // All together, connection-age rotation going on throughout: reloads every 500 ms and DNS changes
    // every 700 ms while the two backends are killed and restarted in turn.
    let stop_churn = CancellationToken::new();
    let churn = {
        let stop = stop_churn.clone();
        let configs = configs.clone();
        async move {
            let mut reload_tick = tokio::time::interval(Duration::from_millis(500));
            let mut dns_tick = tokio::time::interval(Duration::from_millis(700));
            let mut n = 0usize;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = reload_tick.tick() => {
                        reloads += 1;
                        reload(&mut gate, &configs[reloads % 2], reloads).await;
                    }
                    _ = dns_tick.tick() => {
                        n += 1;
                        let set = POD_SETS[n % POD_SETS.len()];
                        dns.set(&set.iter().map(|l| ip(*l)).collect::<Vec<_>>(), Mode::Answer);
                    }
                }
            }
            (gate, dns, reloads, n)
        }
    };
    let together_until = Instant::now() + TOGETHER;
    let faults = async {
        let mut round = 0;
        while Instant::now() < together_until {
            backends.kill_and_restart(KILLED).await;
            load.wait_calls(50).await;
            backends.graceful_restart(GRACEFUL).await;
            backends.wait_serving(KILLED).await;
            backends.wait_serving(GRACEFUL).await;
            load.wait_calls(200).await;
            round += 1;
            eprintln!("chaos: {:?} together, round {round}", t0.elapsed());
        }
        stop_churn.cancel();
    };
    let ((mut gate, dns, reloads, dns_changes), ()) = tokio::join!(churn, faults);
    eprintln!(
        "chaos: {:?} all together done ({reloads} reloads, {dns_changes} DNS changes in all)",
        t0.elapsed()
    );
    // Back to the first endpoint set, for the open-files check.
    dns.set(&[ip(2), ip(3)], Mode::Answer);
    wait_healthy(
        admin,
        &[
            ("static", static_addrs.clone()),
            ("pods", pod_addrs(pod_port, POD_SETS[0])),
        ],
    )
    .await;
    load.wait_calls(100).await;
    let outcome = load.stop().await;

    // ---- every call accounted for ----
    let problems = backends.problems.lock().clone();
    assert!(problems.is_empty(), "in the backends: {problems:#?}");
    let ledger = backends.ledger.lock().clone();
    let killed: Vec<(usize, u32)> = backends.kills.iter().map(|k| (k.backend, k.life)).collect();
    let on_killed = |s: &Seen| killed.contains(&(s.backend, s.life));
    let killed_addr = statics[KILLED].to_string();
    let mut ok = 0u64;
    let (mut caught_running, mut caught_answered, mut caught_unread) = (0u64, 0u64, 0u64);
    let mut after_death = 0u64;
    let mut unexplained = Vec::new();
    let mut per_backend = BTreeMap::<String, u64>::new();
    let mut per_kind = BTreeMap::<String, u64>::new();
    for c in &outcome.calls {
        *per_kind.entry(format!("{:?}", c.kind)).or_default() += 1;
        match &c.result {
            Ok(backend) => {
                ok += 1;
                *per_backend.entry(backend.clone()).or_default() += 1;
                if let Some(s) = ledger.get(&c.id) {
                    if !s.finished {
                        unexplained
                            .push(format!("{c:?} succeeded, but its handler never finished"));
                    }
                }
            }
            Err(status) => {
                let seen = ledger.get(&c.id);
                let killed_during = backends.kills.iter().any(|k| k.overlaps(c));
                let explained = status.code() == Code::Unavailable
                    && match seen {
                        // Its handler was running when the process died.
                        Some(s) if on_killed(s) && !s.finished => {
                            caught_running += 1;
                            true
                        }
                        // Its handler had answered, but the answer had not left the process.
                        Some(s) if on_killed(s) && killed_during => {
                            caught_answered += 1;
                            true
                        }
                        // Sent to the killed process, which died before reading it: the proxy
                        // names the endpoint.
                        None if killed_during && status.message().contains(&killed_addr) => {
                            caught_unread += 1;
                            true
                        }
                        // Sent just after the kill on a pooled connection to the dead process,
                        // before the proxy had read the connection's end: the write failed, so
                        // nothing reached a backend. See `DEAD_CONNECTION`.
                        None if status.message().contains(&killed_addr)
                            && (status.message().contains("broken pipe")
                                || status.message().contains("connection reset"))
                            && backends.kills.iter().any(|k| {
                                k.signalled <= c.end && c.start <= k.reaped + DEAD_CONNECTION
                            }) =>
                        {
                            after_death += 1;
                            true
                        }
                        _ => false,
                    };
                if !explained {
                    let stops: Vec<String> = backends
                        .kills
                        .iter()
                        .map(|k| ("SIGKILL", k))
                        .chain(backends.graceful.iter().map(|g| ("SIGTERM", g)))
                        .filter(|(_, k)| {
                            k.signalled <= c.end && c.start <= k.reaped + Duration::from_secs(1)
                        })
                        .map(|(how, k)| {
                            format!(
                                "{how} of s{} ({}) at call start {:+?} ms, reaped at {:+?} ms",
                                k.backend,
                                statics[k.backend],
                                ms_after(c.start, k.signalled),
                                ms_after(c.start, k.reaped)
                            )
                        })
                        .collect();
                    unexplained.push(format!(
                        "{c:?} (backend saw it: {seen:?}; during {stops:?})"
                    ));
                }
            }
        }
    }
    // Every call a kill caught running must have failed (and so was counted above).
    let failed_ids: std::collections::HashSet<u64> = outcome
        .calls
        .iter()
        .filter(|c| c.result.is_err())
        .map(|c| c.id)
        .collect();
    let running_at_kill: Vec<u64> = ledger
        .iter()
        .filter(|(_, s)| on_killed(s) && !s.finished)
        .map(|(id, _)| *id)
        .collect();
    for id in &running_at_kill {
        if !failed_ids.contains(id) {
            unexplained.push(format!(
                "call {id} was running on a killed backend but did not fail"
            ));
        }
    }
    let failed = outcome.calls.len() as u64 - ok;
    eprintln!(
        "chaos: {} calls ({ok} OK) in {:?}; per kind {per_kind:?}; per backend {per_backend:?}; {} SIGKILLs caught {failed} \
         calls: {caught_running} running in the handler, {caught_answered} answered but not yet sent, \
         {caught_unread} not yet read, {after_death} sent after the kill on a connection to the dead \
         process; {} graceful restarts; {} calls lost in the tonic client at a \
         GOAWAY (never reached the proxy) and sent again, {} of them written after the proxy \
         had closed the connection",
        outcome.calls.len(),
        t0.elapsed(),
        backends.kills.len(),
        backends.graceful.len(),
        outcome.unsent.len(),
        outcome.unsent.iter().filter(|u| u.contains("BrokenPipe") || u.contains("ConnectionReset")).count()
    );
    for u in outcome.unsent.iter().take(5) {
        eprintln!("chaos: sent again: {u}");
    }
    assert!(
        unexplained.is_empty(),
        "{} calls failed (or succeeded) unexplained:\n{}",
        unexplained.len(),
        unexplained.join("\n")
    );
    assert_eq!(caught_running, running_at_kill.len() as u64);
    // Each backend, the restarted ones included, answered; the pods too.
    for name in ["s0", "s1", "s2", "b2", "b3", "b4"] {
        assert!(
            per_backend.get(name).copied().unwrap_or(0) > 0,
            "{name}: {per_backend:?}"
        );
    }

    // ---- the proxy's own view ----
    let settled = eventually_at(admin, |s| {
        let busy = nonzero_in_flight(s);
        let counted: f64 = status_counts(s).values().sum();
        let want = outcome.calls.len() as f64;
        if busy.is_empty() && counted == want {
            Ok(())
        } else {
            Err(format!(
                "busy {busy:?}; the proxy counted {counted} calls, the clients made {want}"
            ))
        }
    })
    .await;
    // Calls the tonic client lost never reached the proxy: it counted exactly the calls the clients
    // saw end, and as many UNAVAILABLE as failed.
    let by_status = status_counts(&settled);
    assert_eq!(
        by_status.get("UNAVAILABLE").copied().unwrap_or(0.0),
        failed as f64,
        "{by_status:?}"
    );
    assert_eq!(
        by_status.get("OK").copied().unwrap_or(0.0),
        ok as f64,
        "{by_status:?}"
    );
    assert_eq!(
        sample(
            &settled,
            "grpcgate_config_reloads_total",
            &[("result", "failure")]
        ),
        0.0
    );
    assert_eq!(
        sample(
            &settled,
            "grpcgate_config_reloads_total",
            &[("result", "success")]
        ),
        reloads as f64
    );

    // ---- open files back to the baseline ----
    // Upstream connections stay pooled (that is the pool's job): counted by /clusters, they are the
    // only files allowed above the baseline.
    let deadline = Instant::now() + WAIT;
    loop {
        let pooled: u64 = clusters(admin).await.values().flatten().map(|e| e.2).sum();
        let files = gate.open_files();
        if files as u64 == baseline_files as u64 + pooled - baseline_pooled {
            eprintln!("chaos: {files} open files with {pooled} pooled upstream connections");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{files} open files with {pooled} pooled upstream connections; baseline {baseline_files} \
             with {baseline_pooled}:\n{:?}",
            std::fs::read_dir(format!("/proc/{}/fd", gate.pid()))
                .unwrap()
                .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // ---- a clean exit and a clean log ----
    gate.signal(libc::SIGTERM);
    let status = gate.wait_exit().await;
    assert!(status.success(), "grpcgate exited with {status}");
    let log = gate.log();
    let victims = [statics[KILLED].to_string(), statics[GRACEFUL].to_string()];
    let expected_warning = |line: &str| {
        let names_victim = victims
            .iter()
            .any(|v| line.contains(&format!("endpoint={v} ")));
        names_victim
            && ["endpoint is unhealthy", "endpoint is not healthy yet"]
                .iter()
                .any(|m| line.contains(m))
    };
    let unexpected: Vec<&str> = log
        .lines()
        .filter(|l| {
            let level = l.split_whitespace().nth(1).unwrap_or("");
            l.contains("panicked")
                || ((level == "WARN" || level == "ERROR") && !expected_warning(l))
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "unexpected warnings in the proxy's log:\n{}",
        unexpected.join("\n")
    );
    eprintln!("chaos: passed in {:?}", t0.elapsed());
}

/// [`common::eventually`] for an admin address (the proxy is a child process here).
async fn eventually_at<F>(admin: SocketAddr, check: F) -> prometheus_parse::Scrape
where
    F: Fn(&prometheus_parse::Scrape) -> Result<(), String>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, body) = http_get(admin, "/metrics").await;
        let s = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
            .expect("valid prometheus text");
        match check(&s) {
            Ok(()) => return s,
            Err(e) if Instant::now() >= deadline => {
                panic!("metrics never reached the expected state: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}
