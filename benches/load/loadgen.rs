//! Load generator for the grpcgate benchmark (issue 7), on the `h2` crate directly.
//!
//! Speaks h2c with prior knowledge and sends one pre-encoded gRPC frame of an `echo.EchoRequest` per call
//! (the frame is a `Bytes` built once; each call clones a refcount). Each run prints one JSON object on
//! stdout. Scenarios:
//!
//! * `unary-closed`: `-c` connections x `-s` concurrent streams each, closed loop, for `-d` seconds.
//! * `unary-open`: a fixed rate `--rate` (open loop) spread over `-c` connections; latency is measured
//!   from each call's *scheduled* send time, so a stall shows up in the tail (no coordinated omission).
//! * `stream`: server streaming, `--count` messages of `--payload` bytes per call; messages/s and MB/s.
//! * `conns`: `-c` (1,000) concurrent clients, each: connect, `--requests-per-conn` calls, close, repeat.
//! * `streams10k`: like `unary-closed` with 10 x 1,000 streams; more connections are opened when the
//!   server's SETTINGS_MAX_CONCURRENT_STREAMS is lower than `-s`.
//! * `idle`: opens `-c` connections (one call each, then idle) and reports the proxy's RSS growth per
//!   connection (`--proxy-pid` required).
//! * `report`: turns the JSON lines of a run into `results.md` / `results.json` and prints the
//!   grpcgate/best-peer ratios and the issue-7 targets.
//! * `cert`: writes a test CA and a `localhost` / 127.0.0.1 server certificate into `--cert-dir`
//!   (`ca.crt`, `server.crt`, `server.key`), for a TLS listener under load (the PGO training run).
//!
//! With `--tls-ca FILE` every connection is TLS (ALPN h2, server name `localhost`) verified against
//! that CA instead of h2c. Every handshake is a full one unless `--tls-resume` is given: then the
//! generator keeps rustls' in-memory session cache (shared by all its connections, like one client
//! process) and offers TLS 1.3 tickets it was given. The JSON counts full and resumed handshakes.
//!
//! With `--proxy-pid` (repeatable; each pid's descendants are included, e.g. NGINX workers) the run also
//! reports the proxy's CPU seconds (utime+stime from /proc/<pid>/stat, sampled at the start and the end of
//! the measured window) per 1,000 requests and its peak RSS (sum of VmHWM).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::future::poll_fn;
use std::net::{SocketAddr, ToSocketAddrs};
use std::rc::Rc;
use std::sync::{Arc, Barrier, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use bytes::{BufMut, Bytes, BytesMut};
use clap::{Parser, ValueEnum};
use grpcgate::pb::echo::EchoRequest;
use h2::client::SendRequest;
use hdrhistogram::Histogram;
use http::header::{CONTENT_TYPE, TE};
use http::{HeaderValue, Method, Request, Uri};
use prost::Message;
use serde_json::{json, Value};

/// Per-stream receive window the generator grants (responses).
const STREAM_WINDOW: u32 = 1 << 20;
/// Per-connection receive window.
const CONN_WINDOW: u32 = 16 << 20;

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    UnaryClosed,
    UnaryOpen,
    Stream,
    Conns,
    Streams10k,
    Idle,
    Report,
    Cert,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::UnaryClosed => "unary-closed",
            Scenario::UnaryOpen => "unary-open",
            Scenario::Stream => "stream",
            Scenario::Conns => "conns",
            Scenario::Streams10k => "streams10k",
            Scenario::Idle => "idle",
            Scenario::Report => "report",
            Scenario::Cert => "cert",
        }
    }
}

#[derive(Parser, Clone, Debug)]
#[command(
    name = "loadgen",
    about = "h2c gRPC load generator for the grpcgate benchmark"
)]
struct Args {
    /// What to run.
    #[arg(value_enum)]
    scenario: Scenario,
    /// Where to send load: host:port, comma-separated; connections are spread over them round-robin.
    #[arg(long, short, value_delimiter = ',')]
    target: Vec<String>,
    /// System label written into the JSON (direct, grpcgate, nginx, haproxy).
    #[arg(long, default_value = "unknown")]
    label: String,
    /// Scenario name written into the JSON (default: the scenario).
    #[arg(long)]
    name: Option<String>,
    /// Connections (conns: concurrent clients; idle: connections to open). Default per scenario.
    #[arg(long, short)]
    connections: Option<usize>,
    /// Concurrent streams per connection (closed-loop scenarios). Default per scenario.
    #[arg(long, short)]
    streams: Option<usize>,
    /// Measured duration in seconds.
    #[arg(long, short, default_value_t = 5.0)]
    duration: f64,
    /// Warm-up seconds before the measured window (load runs, nothing is recorded).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// EchoRequest.payload size in bytes (echoed back in every response message).
    #[arg(long)]
    payload: Option<usize>,
    /// Open loop: requests per second.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Stream: messages per ServerStream call.
    #[arg(long, default_value_t = 1000)]
    count: u32,
    /// Conns: calls per connection before it is closed.
    #[arg(long, default_value_t = 5)]
    requests_per_conn: usize,
    /// Open loop: how long after the window calls scheduled in it may still complete.
    #[arg(long, default_value_t = 5.0)]
    grace: f64,
    /// Runtime threads (each a current-thread runtime with its share of the connections).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Proxy process(es) to account CPU and RSS of (their descendants are included).
    #[arg(long, value_delimiter = ',')]
    proxy_pid: Vec<u32>,
    /// Diagnostic: send each request message in a DATA frame without END_STREAM followed by an empty
    /// DATA frame with END_STREAM (two frames, the way some proxies forward), instead of one frame.
    #[arg(long)]
    split_end_stream: bool,
    /// Other processes of ours (the echo backends): not counted as interference.
    #[arg(long, value_delimiter = ',')]
    load_pid: Vec<u32>,
    /// Idle: seconds to let the proxy settle before reading RSS.
    #[arg(long, default_value_t = 1.0)]
    settle: f64,
    /// Report: the JSON-lines file of the runs.
    #[arg(long)]
    input: Option<String>,
    /// Report: Markdown output.
    #[arg(long)]
    md: Option<String>,
    /// Report: JSON output.
    #[arg(long)]
    json: Option<String>,
    /// Report: key=value facts about the run (repeatable).
    #[arg(long)]
    meta: Vec<String>,
    /// Report: notes to print under the tables (repeatable).
    #[arg(long)]
    note: Vec<String>,
    /// Connect with TLS, trusting this CA certificate (PEM); the server must present `localhost`.
    #[arg(long)]
    tls_ca: Option<String>,
    /// With --tls-ca: resume TLS sessions (tickets from the server, one in-memory cache for the whole
    /// generator). Without it every TLS connection is a full handshake.
    #[arg(long)]
    tls_resume: bool,
    /// cert: the directory to write `ca.crt`, `server.crt` and `server.key` into.
    #[arg(long)]
    cert_dir: Option<String>,
}

fn main() {
    let args = Args::parse();
    if let Some(ca) = &args.tls_ca {
        match tls_connector(ca, args.tls_resume) {
            Ok(c) => {
                let _ = TLS.set(c);
            }
            Err(e) => {
                eprintln!("loadgen: --tls-ca {ca}: {e:#}");
                std::process::exit(1);
            }
        }
    }
    let result = match args.scenario {
        Scenario::Report => report(&args),
        Scenario::Cert => write_cert(&args),
        Scenario::Idle => run_idle(&args).map(|v| println!("{v}")),
        _ => run_load(&args).map(|v| println!("{v}")),
    };
    if let Err(e) = result {
        eprintln!("loadgen {}: {e:#}", args.scenario.name());
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------------------------------
// gRPC calls over h2

/// A length-prefixed gRPC message.
fn grpc_frame(msg: &EchoRequest) -> Bytes {
    let len = msg.encoded_len();
    let mut b = BytesMut::with_capacity(5 + len);
    b.put_u8(0);
    b.put_u32(len as u32);
    msg.encode(&mut b).expect("encode");
    b.freeze()
}

/// Counts gRPC messages in a response body that arrives in arbitrary chunks.
#[derive(Default)]
struct FrameCounter {
    header: [u8; 5],
    have: usize,
    body_left: usize,
    messages: u64,
}

impl FrameCounter {
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.body_left > 0 {
                let n = self.body_left.min(data.len());
                self.body_left -= n;
                data = &data[n..];
                continue;
            }
            let n = (5 - self.have).min(data.len());
            self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == 5 {
                self.have = 0;
                self.messages += 1;
                self.body_left = u32::from_be_bytes(self.header[1..5].try_into().unwrap()) as usize;
            }
        }
    }
}

/// What one call failed with: `Conn` errors mean the connection is gone (reconnect), `Stream` errors
/// concern the call only.
#[derive(Debug)]
enum CallErr {
    Conn(String),
    Stream(String),
}

impl CallErr {
    fn text(&self) -> &str {
        match self {
            CallErr::Conn(s) | CallErr::Stream(s) => s,
        }
    }
}

fn classify(e: h2::Error) -> CallErr {
    if e.is_io() || e.is_go_away() {
        CallErr::Conn(format!("connection: {e}"))
    } else {
        CallErr::Stream(format!("stream: {e}"))
    }
}

#[derive(Default)]
struct CallOk {
    sent: u64,
    recv: u64,
    messages: u64,
    /// Response DATA frames (chunks h2 handed over).
    data_frames: u64,
}

static GRPC: HeaderValue = HeaderValue::from_static("application/grpc");
static TRAILERS: HeaderValue = HeaderValue::from_static("trailers");

/// What every call of a run sends.
struct CallSpec {
    body: Bytes,
    path: &'static str,
    count_messages: bool,
    split_end_stream: bool,
}

fn make_uri(addr: SocketAddr, path: &str) -> Uri {
    let scheme = if TLS.get().is_some() { "https" } else { "http" };
    format!("{scheme}://{addr}{path}").parse().expect("uri")
}

/// One gRPC call: headers + one DATA frame (end of stream), then the response to its trailers.
async fn call(
    sender: &mut SendRequest<Bytes>,
    uri: &Uri,
    spec: &CallSpec,
) -> Result<CallOk, CallErr> {
    poll_fn(|cx| sender.poll_ready(cx))
        .await
        .map_err(|e| CallErr::Conn(format!("not ready: {e}")))?;
    let mut req = Request::new(());
    *req.method_mut() = Method::POST;
    *req.uri_mut() = uri.clone();
    req.headers_mut().insert(CONTENT_TYPE, GRPC.clone());
    req.headers_mut().insert(TE, TRAILERS.clone());
    let (resp, mut tx) = sender.send_request(req, false).map_err(classify)?;
    if spec.split_end_stream {
        tx.send_data(spec.body.clone(), false).map_err(classify)?;
        tx.send_data(Bytes::new(), true).map_err(classify)?;
    } else {
        tx.send_data(spec.body.clone(), true).map_err(classify)?;
    }
    let resp = resp.await.map_err(classify)?;
    if resp.status() != http::StatusCode::OK {
        return Err(CallErr::Stream(format!("HTTP {}", resp.status())));
    }
    let mut ok = CallOk {
        sent: spec.body.len() as u64,
        ..Default::default()
    };
    let (head, mut body) = resp.into_parts();
    let mut status = head.headers.get("grpc-status").cloned();
    let mut message = head.headers.get("grpc-message").cloned();
    if !body.is_end_stream() {
        let mut counter = FrameCounter::default();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(classify)?;
            ok.recv += chunk.len() as u64;
            ok.data_frames += 1;
            if spec.count_messages {
                counter.feed(&chunk);
            }
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        ok.messages = counter.messages;
        if let Some(t) = body.trailers().await.map_err(classify)? {
            if let Some(s) = t.get("grpc-status") {
                status = Some(s.clone());
                message = t.get("grpc-message").cloned();
            }
        }
    }
    match status {
        Some(s) if s == "0" => {
            if !spec.count_messages {
                ok.messages = 1;
            }
            Ok(ok)
        }
        Some(s) => {
            // Error kinds are keyed by this text: keep it short and free of per-call detail.
            let m = message.as_ref().and_then(|m| m.to_str().ok()).unwrap_or("");
            let m: String = m.chars().take(100).collect();
            Err(CallErr::Stream(format!(
                "grpc-status {}: {m}",
                s.to_str().unwrap_or("?")
            )))
        }
        None => Err(CallErr::Stream("no grpc-status".into())),
    }
}

/// The TLS client config when `--tls-ca` is given (set once in `main`).
static TLS: OnceLock<tokio_rustls::TlsConnector> = OnceLock::new();

/// TLS handshakes completed by this process: full, resumed (whole run, warm-up included).
static HANDSHAKES: [std::sync::atomic::AtomicU64; 2] = [
    std::sync::atomic::AtomicU64::new(0),
    std::sync::atomic::AtomicU64::new(0),
];
/// What the first TLS handshake negotiated: version, cipher suite, key-exchange group.
static TLS_PARAMS: OnceLock<String> = OnceLock::new();

/// A TLS connector that offers ALPN h2 and trusts only the CA in `ca_file`; with `resume`, it keeps
/// and offers session tickets.
fn tls_connector(ca_file: &str, resume: bool) -> anyhow::Result<tokio_rustls::TlsConnector> {
    let pem = std::fs::read(ca_file).context("read")?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(cert.context("parse PEM")?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    if !resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// `cert`: a CA and a server certificate for `localhost` and 127.0.0.1, as PEM files.
fn write_cert(args: &Args) -> anyhow::Result<()> {
    let dir = std::path::Path::new(args.cert_dir.as_deref().context("cert needs --cert-dir")?);
    std::fs::create_dir_all(dir)?;
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "loadgen test CA");
    let ca = ca_params.self_signed(&ca_key)?;
    let key = rcgen::KeyPair::generate()?;
    let cert =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?
            .signed_by(&key, &ca, &ca_key)?;
    std::fs::write(dir.join("ca.crt"), ca.pem())?;
    std::fs::write(dir.join("server.crt"), cert.pem())?;
    std::fs::write(dir.join("server.key"), key.serialize_pem())?;
    Ok(())
}

/// Connects and handshakes (TLS first with `--tls-ca`); the connection is driven by a local task whose
/// handle is returned.
async fn connect(
    addr: SocketAddr,
) -> Result<(SendRequest<Bytes>, tokio::task::JoinHandle<()>), String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    match TLS.get() {
        None => h2_handshake(tcp, addr).await,
        Some(tls) => {
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("server name");
            let io = tls
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS {addr}: {e}"))?;
            let tls = io.get_ref().1;
            let resumed = tls.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
            HANDSHAKES[resumed as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            TLS_PARAMS.get_or_init(|| {
                format!(
                    "{:?} {:?} {:?}",
                    tls.protocol_version(),
                    tls.negotiated_cipher_suite().map(|s| s.suite()),
                    tls.negotiated_key_exchange_group().map(|g| g.name())
                )
            });
            h2_handshake(io, addr).await
        }
    }
}

/// The h2 client handshake over `io`, with the generator's windows; spawns the connection task.
async fn h2_handshake<T>(
    io: T,
    addr: SocketAddr,
) -> Result<(SendRequest<Bytes>, tokio::task::JoinHandle<()>), String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
{
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .enable_push(false)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(|e| format!("handshake {addr}: {e}"))?;
    let handle = tokio::task::spawn_local(async move {
        let _ = conn.await;
    });
    Ok((send, handle))
}

// ---------------------------------------------------------------------------------------------------
// Measurement state (one per runtime thread, merged at the end)

struct Stats {
    hist: Histogram<u64>,
    ok: u64,
    errors: u64,
    sent: u64,
    recv: u64,
    messages: u64,
    data_frames: u64,
    error_kinds: BTreeMap<String, u64>,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            // Nanoseconds, 1 ns .. 120 s, 3 significant digits.
            hist: Histogram::new_with_bounds(1, 120_000_000_000, 3).expect("histogram"),
            ok: 0,
            errors: 0,
            sent: 0,
            recv: 0,
            messages: 0,
            data_frames: 0,
            error_kinds: BTreeMap::new(),
        }
    }

    fn error(&mut self, what: &str) {
        self.errors += 1;
        if self.error_kinds.len() < 16 || self.error_kinds.contains_key(what) {
            *self.error_kinds.entry(what.to_string()).or_default() += 1;
        }
    }

    fn merge(&mut self, o: Stats) {
        self.hist.add(&o.hist).expect("histogram add");
        self.ok += o.ok;
        self.errors += o.errors;
        self.sent += o.sent;
        self.recv += o.recv;
        self.messages += o.messages;
        self.data_frames += o.data_frames;
        for (k, v) in o.error_kinds {
            *self.error_kinds.entry(k).or_default() += v;
        }
    }
}

/// The measured window and what calls send, shared by all tasks of one runtime thread.
struct Ctx {
    start: Instant,
    end: Instant,
    spec: Arc<CallSpec>,
    stats: RefCell<Stats>,
    /// Open loop: counted calls not finished yet.
    in_flight: Cell<u64>,
}

impl Ctx {
    fn in_window(&self, t: Instant) -> bool {
        t >= self.start && t < self.end
    }

    fn record(&self, latency: Duration, r: &Result<CallOk, CallErr>) {
        let mut s = self.stats.borrow_mut();
        match r {
            Ok(ok) => {
                s.ok += 1;
                s.sent += ok.sent;
                s.recv += ok.recv;
                s.messages += ok.messages;
                s.data_frames += ok.data_frames;
                let ns = (latency.as_nanos() as u64).clamp(1, 120_000_000_000);
                s.hist.record(ns).expect("record");
            }
            Err(e) => s.error(e.text()),
        }
    }
}

/// One client connection, reconnected by whichever task first sees it die.
struct Slot {
    addr: SocketAddr,
    uri: Uri,
    gen: Cell<u64>,
    sender: RefCell<Option<SendRequest<Bytes>>>,
    reconnecting: Cell<bool>,
    changed: tokio::sync::Notify,
}

impl Slot {
    fn new(addr: SocketAddr, path: &str, sender: SendRequest<Bytes>) -> Slot {
        Slot {
            addr,
            uri: make_uri(addr, path),
            gen: Cell::new(0),
            sender: RefCell::new(Some(sender)),
            reconnecting: Cell::new(false),
            changed: tokio::sync::Notify::new(),
        }
    }

    fn current(&self) -> (u64, Option<SendRequest<Bytes>>) {
        (self.gen.get(), self.sender.borrow().clone())
    }

    /// Replaces connection generation `gen` (if nobody has yet), retrying until `until`.
    async fn reconnect(&self, gen: u64, until: Instant) {
        loop {
            if self.gen.get() != gen {
                return;
            }
            if self.reconnecting.get() {
                let changed = self.changed.notified();
                if self.gen.get() != gen {
                    return;
                }
                changed.await;
                continue;
            }
            self.reconnecting.set(true);
            let mut delay = Duration::from_millis(1);
            let sender = loop {
                match connect(self.addr).await {
                    Ok((s, _)) => break Some(s),
                    Err(e) => {
                        if Instant::now() >= until {
                            eprintln!("loadgen: reconnect to {} failed: {e}", self.addr);
                            break None;
                        }
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_millis(100));
                    }
                }
            };
            *self.sender.borrow_mut() = sender;
            self.gen.set(gen + 1);
            self.reconnecting.set(false);
            self.changed.notify_waiters();
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// /proc accounting

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Fields of /proc/<pid>/stat after the `(comm)`; index 0 is field 3 (state).
fn stat_fields(pid: u32) -> Option<Vec<u64>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    Some(
        rest.split_whitespace()
            .map(|f| f.parse::<u64>().unwrap_or(0))
            .collect(),
    )
}

/// The pids and all their descendants.
fn proc_tree(roots: &[u32]) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) {
                if let Some(f) = stat_fields(pid) {
                    children.entry(f[1] as u32).or_default().push(pid);
                }
            }
        }
    }
    let mut out = roots.to_vec();
    let mut i = 0;
    while i < out.len() {
        if let Some(c) = children.get(&out[i]) {
            for &p in c {
                if !out.contains(&p) {
                    out.push(p);
                }
            }
        }
        i += 1;
    }
    out
}

/// utime+stime of every process of the tree, in seconds.
fn cpu_seconds(roots: &[u32]) -> f64 {
    let ticks: u64 = proc_tree(roots)
        .iter()
        .filter_map(|&p| stat_fields(p))
        .map(|f| f[11] + f[12])
        .sum();
    ticks as f64 / clk_tck()
}

/// Sum of a `/proc/<pid>/status` field (in kB) over the tree.
fn status_kib(roots: &[u32], field: &str) -> u64 {
    proc_tree(roots)
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum()
}

// ---------------------------------------------------------------------------------------------------
// Load scenarios

fn resolve_targets(args: &Args) -> anyhow::Result<Vec<SocketAddr>> {
    if args.target.is_empty() {
        bail!("--target host:port is required");
    }
    args.target
        .iter()
        .map(|t| {
            t.to_socket_addrs()
                .with_context(|| format!("bad target {t}"))?
                .next()
                .ok_or_else(|| anyhow!("target {t} resolves to nothing"))
        })
        .collect()
}

fn payload_size(args: &Args) -> usize {
    let streaming = args.scenario == Scenario::Stream;
    args.payload.unwrap_or(if streaming { 1024 } else { 64 })
}

fn call_spec(args: &Args) -> CallSpec {
    let streaming = args.scenario == Scenario::Stream;
    let payload = payload_size(args);
    let msg = EchoRequest {
        payload: vec![b'x'; payload],
        count: if streaming { args.count } else { 0 },
        ..Default::default()
    };
    CallSpec {
        body: grpc_frame(&msg),
        path: if streaming {
            "/echo.Echo/ServerStream"
        } else {
            "/echo.Echo/Unary"
        },
        count_messages: streaming,
        split_end_stream: args.split_end_stream,
    }
}

fn local_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// One call on a fresh connection to check the target works; returns the server's
/// SETTINGS_MAX_CONCURRENT_STREAMS as the client sees it (usize::MAX when unlimited).
fn probe(addr: SocketAddr, spec: &CallSpec) -> anyhow::Result<usize> {
    let rt = local_runtime();
    let local = tokio::task::LocalSet::new();
    rt.block_on(local.run_until(async {
        let (mut s, _h) = connect(addr).await.map_err(|e| anyhow!(e))?;
        let uri = make_uri(addr, spec.path);
        call(&mut s, &uri, spec)
            .await
            .map_err(|e| anyhow!("probe call to {addr} failed: {}", e.text()))?;
        Ok(s.current_max_send_streams())
    }))
}

/// How the window is shared with the threads once they are connected.
struct Sync {
    ready: Barrier,
    window: Mutex<Option<(Instant, Instant)>>,
    go: Barrier,
}

struct Plan {
    connections: usize,
    streams: usize,
}

fn run_load(args: &Args) -> anyhow::Result<Value> {
    let targets = resolve_targets(args)?;
    let spec = Arc::new(call_spec(args));
    let server_max = probe(targets[0], &spec)?;
    let (c, s) = match args.scenario {
        Scenario::UnaryClosed => (4, 32),
        Scenario::UnaryOpen => (4, 0),
        Scenario::Stream => (2, 4),
        Scenario::Conns => (1000, 1),
        Scenario::Streams10k => (10, 1000),
        _ => unreachable!(),
    };
    let c = args.connections.unwrap_or(c).max(1);
    let s = args.streams.unwrap_or(s).max(1);
    let plan = match args.scenario {
        Scenario::UnaryClosed | Scenario::Stream | Scenario::Streams10k => {
            // Respect the server's stream limit: keep the total concurrency, open more connections.
            let per = s.min(server_max.max(1));
            let total = c * s;
            Plan {
                connections: total.div_ceil(per),
                streams: per,
            }
        }
        _ => Plan {
            connections: c,
            streams: s,
        },
    };
    if plan.connections != c {
        eprintln!(
            "loadgen: server allows {server_max} streams per connection: using {} connections x {} streams",
            plan.connections, plan.streams
        );
    }
    let threads = args.threads.max(1).min(plan.connections);
    let sync = Arc::new(Sync {
        ready: Barrier::new(threads + 1),
        window: Mutex::new(None),
        go: Barrier::new(threads + 1),
    });
    // Open loop: one channel of scheduled send times per thread, fed by the ticker (this thread).
    let mut tick_txs = Vec::new();
    let mut handles = Vec::new();
    for tid in 0..threads {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        tick_txs.push(tx);
        let args = args.clone();
        let targets = targets.clone();
        let spec = spec.clone();
        let sync = sync.clone();
        let conn_ids: Vec<usize> = (tid..plan.connections).step_by(threads).collect();
        let streams = plan.streams;
        handles.push(std::thread::spawn(move || {
            thread_main(args, targets, spec, sync, conn_ids, streams, rx)
        }));
    }
    sync.ready.wait();
    let t0 = Instant::now();
    let start = t0 + Duration::from_secs_f64(args.warmup);
    let end = start + Duration::from_secs_f64(args.duration);
    *sync.window.lock().unwrap() = Some((start, end));
    // CPU is sampled by a thread of its own, at the edges of the window.
    let pids = args.proxy_pid.clone();
    let load_pids = args.load_pid.clone();
    let sampler = std::thread::spawn(move || {
        let mut ours = load_pids.clone();
        ours.push(std::process::id());
        ours.extend(&pids);
        sleep_until(start);
        let c0 = cpu_seconds(&pids);
        let others0 = others_ticks(&ours);
        let steal0 = steal_ticks();
        sleep_until(end);
        let c1 = cpu_seconds(&pids);
        let others1 = others_ticks(&ours);
        let steal1 = steal_ticks();
        let window = (end - start).as_secs_f64();
        let others: u64 = others1
            .iter()
            .map(|(pid, &t)| match others0.get(pid) {
                Some(&t0) if t0 <= t => t - t0,
                _ => t, // started during the window
            })
            .sum();
        let interference = Interference {
            other_processes: others as f64 / clk_tck() / window,
            steal: steal1.saturating_sub(steal0) as f64 / clk_tck() / window,
        };
        let proxy = (!pids.is_empty()).then(|| {
            (
                c1 - c0,
                status_kib(&pids, "VmHWM:"),
                status_kib(&pids, "VmRSS:"),
            )
        });
        (proxy, interference)
    });
    sync.go.wait();
    if args.scenario == Scenario::UnaryOpen {
        ticker(args.rate, t0, end, &tick_txs);
    }
    drop(tick_txs);
    let mut stats = Stats::new();
    for h in handles {
        let st = h
            .join()
            .map_err(|_| anyhow!("load thread panicked"))?
            .map_err(|e| anyhow!(e))?;
        stats.merge(st);
    }
    let (proxy, interference) = sampler.join().map_err(|_| anyhow!("sampler panicked"))?;
    let mut v = result_json(args, &plan, server_max, &stats, proxy);
    if args.tls_ca.is_some() {
        v["tls"] = json!({
            "full_handshakes": HANDSHAKES[0].load(std::sync::atomic::Ordering::Relaxed),
            "resumed_handshakes": HANDSHAKES[1].load(std::sync::atomic::Ordering::Relaxed),
            "negotiated": TLS_PARAMS.get(),
            "resume_offered": args.tls_resume,
        });
    }
    let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
    v["interference"] = json!({
        "other_processes": r3(interference.other_processes),
        "steal": r3(interference.steal),
    });
    Ok(v)
}

/// What else ran during the window, in CPU-seconds per second: a run with a high value was disturbed
/// (a compiler or a test suite on the machine, or the hypervisor running another guest on our CPUs).
struct Interference {
    /// CPU time of every process that is not the proxy, the load generator or the backends (a child
    /// that ran and exited within the window counts through its parent's cutime/cstime).
    other_processes: f64,
    /// Time the hypervisor took from this VM's CPUs (steal, all CPUs).
    steal: f64,
}

/// utime + stime + cutime + cstime of every process outside `ours` and their descendants, in ticks.
fn others_ticks(ours: &[u32]) -> HashMap<u32, u64> {
    let mine: std::collections::HashSet<u32> = proc_tree(ours).into_iter().collect();
    let mut out = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if mine.contains(&pid) {
                continue;
            }
            if let Some(f) = stat_fields(pid) {
                out.insert(pid, f[11] + f[12] + f[13] + f[14]);
            }
        }
    }
    out
}

/// Steal ticks of all CPUs, from the first line of /proc/stat.
fn steal_ticks() -> u64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(8))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

/// Open loop: sends the scheduled time of every call, `rate` per second from `t0` until `end`,
/// round-robin over the threads. Sleeps precisely (nanosleep), so the schedule is not quantised to the
/// runtime timer's millisecond; calls that fall behind are sent at once, late, and their latency still
/// counts from the schedule.
fn ticker(
    rate: f64,
    t0: Instant,
    end: Instant,
    txs: &[tokio::sync::mpsc::UnboundedSender<Instant>],
) {
    let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
    // Wake up on time: the default 50 µs timer slack would be added to every scheduled send.
    // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's timer slack.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
    let mut i: u64 = 0;
    loop {
        let t = t0 + interval.mul_f64(i as f64);
        if t >= end {
            break;
        }
        sleep_until(t);
        let _ = txs[(i as usize) % txs.len()].send(t);
        i += 1;
    }
}

fn thread_main(
    args: Args,
    targets: Vec<SocketAddr>,
    spec: Arc<CallSpec>,
    sync: Arc<Sync>,
    conn_ids: Vec<usize>,
    streams: usize,
    mut ticks: tokio::sync::mpsc::UnboundedReceiver<Instant>,
) -> Result<Stats, String> {
    let rt = local_runtime();
    let local = tokio::task::LocalSet::new();
    rt.block_on(local.run_until(async move {
        // Connect first (except conns, which connects all along), then start together.
        let mut slots = Vec::new();
        let mut setup_err = None;
        if args.scenario != Scenario::Conns {
            let mut pending = Vec::new();
            for &i in &conn_ids {
                let addr = targets[i % targets.len()];
                pending.push(tokio::task::spawn_local(async move {
                    connect(addr).await.map(|(s, _)| (addr, s))
                }));
            }
            for p in pending {
                match p.await {
                    Ok(Ok((addr, s))) => slots.push(Rc::new(Slot::new(addr, spec.path, s))),
                    Ok(Err(e)) => setup_err = Some(e),
                    Err(e) => setup_err = Some(e.to_string()),
                }
            }
        }
        sync.ready.wait();
        sync.go.wait();
        if let Some(e) = setup_err {
            return Err(e);
        }
        let (start, end) = sync.window.lock().unwrap().expect("window");
        let ctx = Rc::new(Ctx {
            start,
            end,
            spec,
            stats: RefCell::new(Stats::new()),
            in_flight: Cell::new(0),
        });
        match args.scenario {
            Scenario::UnaryClosed | Scenario::Stream | Scenario::Streams10k => {
                for slot in &slots {
                    for _ in 0..streams {
                        tokio::task::spawn_local(closed_worker(slot.clone(), ctx.clone()));
                    }
                }
                tokio::time::sleep_until(end.into()).await;
            }
            Scenario::Conns => {
                for &i in &conn_ids {
                    let addr = targets[i % targets.len()];
                    tokio::task::spawn_local(churn_worker(
                        addr,
                        ctx.clone(),
                        args.requests_per_conn.max(1),
                    ));
                }
                tokio::time::sleep_until(end.into()).await;
            }
            Scenario::UnaryOpen => {
                let mut k = 0usize;
                while let Some(sched) = ticks.recv().await {
                    let slot = slots[k % slots.len()].clone();
                    k += 1;
                    let counted = ctx.in_window(sched);
                    if counted {
                        ctx.in_flight.set(ctx.in_flight.get() + 1);
                    }
                    let ctx = ctx.clone();
                    tokio::task::spawn_local(async move {
                        let (gen, sender) = slot.current();
                        let r = match sender {
                            Some(mut s) => call(&mut s, &slot.uri, &ctx.spec).await,
                            None => Err(CallErr::Conn("no connection".into())),
                        };
                        if counted {
                            ctx.record(sched.elapsed(), &r);
                            ctx.in_flight.set(ctx.in_flight.get() - 1);
                        }
                        if let Err(CallErr::Conn(_)) = r {
                            slot.reconnect(gen, ctx.end).await;
                        }
                    });
                }
                // The ticker is done: give calls scheduled in the window time to finish.
                let deadline = end + Duration::from_secs_f64(args.grace);
                while ctx.in_flight.get() > 0 && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                let left = ctx.in_flight.get();
                let mut s = ctx.stats.borrow_mut();
                for _ in 0..left {
                    s.error("not completed within the grace period");
                }
            }
            _ => unreachable!(),
        }
        let stats = std::mem::replace(&mut *ctx.stats.borrow_mut(), Stats::new());
        Ok(stats)
    }))
}

/// Closed loop on one connection: the next call starts when the previous one ends.
async fn closed_worker(slot: Rc<Slot>, ctx: Rc<Ctx>) {
    loop {
        let t = Instant::now();
        if t >= ctx.end {
            return;
        }
        let (gen, sender) = slot.current();
        let Some(mut sender) = sender else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let r = call(&mut sender, &slot.uri, &ctx.spec).await;
        let done = Instant::now();
        if ctx.in_window(done) {
            ctx.record(done - t, &r);
        }
        if let Err(CallErr::Conn(_)) = r {
            slot.reconnect(gen, ctx.end).await;
        }
    }
}

/// Connection churn: connect, `k` calls one after the other, close, repeat. The first call's latency
/// includes the TCP connect and the HTTP/2 handshake.
async fn churn_worker(addr: SocketAddr, ctx: Rc<Ctx>, k: usize) {
    let uri = make_uri(addr, ctx.spec.path);
    while Instant::now() < ctx.end {
        let t_conn = Instant::now();
        let (mut sender, mut conn) = match connect(addr).await {
            Ok(x) => x,
            Err(e) => {
                if ctx.in_window(Instant::now()) {
                    ctx.stats.borrow_mut().error(&e);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        for i in 0..k {
            let t = if i == 0 { t_conn } else { Instant::now() };
            if t >= ctx.end {
                break;
            }
            let r = call(&mut sender, &uri, &ctx.spec).await;
            let done = Instant::now();
            if ctx.in_window(done) {
                ctx.record(done - t, &r);
            }
            if let Err(CallErr::Conn(_)) = r {
                break;
            }
        }
        // Dropping the last handle lets the connection send GOAWAY and close.
        drop(sender);
        tokio::select! {
            _ = &mut conn => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => conn.abort(),
        }
    }
}

fn us(ns: u64) -> f64 {
    (ns as f64 / 100.0).round() / 10.0
}

fn result_json(
    args: &Args,
    plan: &Plan,
    server_max: usize,
    s: &Stats,
    proxy: Option<(f64, u64, u64)>,
) -> Value {
    let d = args.duration;
    let h = &s.hist;
    let q = |p: f64| {
        if s.ok > 0 {
            us(h.value_at_quantile(p))
        } else {
            0.0
        }
    };
    let mut v = json!({
        "system": args.label,
        "scenario": args.name.clone().unwrap_or_else(|| args.scenario.name().to_string()),
        "kind": args.scenario.name(),
        "targets": args.target,
        "connections": plan.connections,
        "streams_per_conn": if args.scenario == Scenario::UnaryOpen || args.scenario == Scenario::Conns { Value::Null } else { json!(plan.streams) },
        "server_max_streams": if server_max == usize::MAX { Value::Null } else { json!(server_max) },
        "payload": payload_size(args),
        "frame_bytes": call_spec(args).body.len(),
        "duration_s": d,
        "requests": s.ok,
        "errors": s.errors,
        "rps": (s.ok as f64 / d).round(),
        "p50_us": q(0.5),
        "p99_us": q(0.99),
        "p999_us": q(0.999),
        "max_us": if s.ok > 0 { us(h.max()) } else { 0.0 },
        "mean_us": if s.ok > 0 { (h.mean() / 100.0).round() / 10.0 } else { 0.0 },
        "bytes_sent": s.sent,
        "bytes_recv": s.recv,
        "bytes": s.sent + s.recv,
    });
    let o = v.as_object_mut().unwrap();
    match args.scenario {
        Scenario::UnaryOpen => {
            o.insert("rate".into(), json!(args.rate));
        }
        Scenario::Conns => {
            o.insert("requests_per_conn".into(), json!(args.requests_per_conn));
        }
        Scenario::Stream => {
            o.insert("count".into(), json!(args.count));
            o.insert("messages".into(), json!(s.messages));
            o.insert("msgs_per_s".into(), json!((s.messages as f64 / d).round()));
            // How the server (or the proxy) framed the stream: the client's per-frame work.
            o.insert(
                "data_frame_bytes".into(),
                json!((s.recv as f64 / s.data_frames.max(1) as f64).round()),
            );
            o.insert(
                "mb_per_s".into(),
                json!((s.recv as f64 / d / 1e6 * 10.0).round() / 10.0),
            );
        }
        _ => {}
    }
    if let Some((cpu, hwm, rss)) = proxy {
        o.insert("proxy_cpu_s".into(), json!((cpu * 1000.0).round() / 1000.0));
        o.insert(
            "cpu_s_per_1k_req".into(),
            if s.ok > 0 {
                json!(cpu / s.ok as f64 * 1000.0)
            } else {
                Value::Null
            },
        );
        if args.scenario == Scenario::Stream {
            o.insert(
                "cpu_s_per_1k_msgs".into(),
                if s.messages > 0 {
                    json!(cpu / s.messages as f64 * 1000.0)
                } else {
                    Value::Null
                },
            );
        }
        o.insert("proxy_peak_rss_kib".into(), json!(hwm));
        o.insert("proxy_rss_kib".into(), json!(rss));
    }
    if !s.error_kinds.is_empty() {
        o.insert("error_kinds".into(), json!(s.error_kinds));
    }
    v
}

// ---------------------------------------------------------------------------------------------------
// Idle connections: RSS per connection

fn run_idle(args: &Args) -> anyhow::Result<Value> {
    let targets = resolve_targets(args)?;
    if args.proxy_pid.is_empty() {
        bail!("idle needs --proxy-pid");
    }
    let n = args.connections.unwrap_or(1000);
    let spec = call_spec(args);
    let rt = local_runtime();
    let local = tokio::task::LocalSet::new();
    let pids = args.proxy_pid.clone();
    let settle = Duration::from_secs_f64(args.settle);
    let (before, after, opened, errors) = rt.block_on(local.run_until(async move {
        // Warm the proxy up (upstream connections, first-use allocations) before the baseline.
        let mut warm = Vec::new();
        for &addr in &targets {
            let (mut s, h) = connect(addr).await.map_err(|e| anyhow!(e))?;
            let uri = make_uri(addr, spec.path);
            for _ in 0..20 {
                call(&mut s, &uri, &spec)
                    .await
                    .map_err(|e| anyhow!("warm-up call failed: {}", e.text()))?;
            }
            warm.push((s, h));
        }
        tokio::time::sleep(settle).await;
        let before = status_kib(&pids, "VmRSS:");
        let spec = Rc::new(spec);
        let mut tasks = Vec::new();
        for i in 0..n {
            let addr = targets[i % targets.len()];
            let spec = spec.clone();
            tasks.push(tokio::task::spawn_local(async move {
                let (mut s, h) = connect(addr).await.map_err(|e| e.to_string())?;
                let uri = make_uri(addr, spec.path);
                call(&mut s, &uri, &spec)
                    .await
                    .map_err(|e| e.text().to_string())?;
                Ok::<_, String>((s, h))
            }));
        }
        let mut open = Vec::new();
        let mut errors = Stats::new();
        for t in tasks {
            match t.await {
                Ok(Ok(c)) => open.push(c),
                Ok(Err(e)) => errors.error(&e),
                Err(e) => errors.error(&e.to_string()),
            }
        }
        tokio::time::sleep(settle).await;
        let after = status_kib(&pids, "VmRSS:");
        let opened = open.len();
        drop(open);
        drop(warm);
        Ok::<_, anyhow::Error>((before, after, opened, errors))
    }))?;
    let per = if opened > 0 {
        (after as f64 - before as f64) / opened as f64
    } else {
        0.0
    };
    Ok(json!({
        "system": args.label,
        "scenario": args.name.clone().unwrap_or_else(|| "idle".into()),
        "kind": "idle",
        "requested": n,
        "connections": opened,
        "errors": errors.errors,
        "error_kinds": errors.error_kinds,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "rss_per_conn_kib": (per * 100.0).round() / 100.0,
        "proxy_peak_rss_kib": status_kib(&args.proxy_pid, "VmHWM:"),
    }))
}

// ---------------------------------------------------------------------------------------------------
// Report

/// Every system a run may have, in table order. `tcp-relay` (HAProxy in TCP mode, run.sh) is not a gRPC load
/// balancer and never a peer: it is the floor, what the extra hop costs a proxy that parses nothing.
/// "grpcgate-base": another grpcgate build measured in the same run (run.sh `GRPCGATE_BASE`).
const SYSTEMS: [&str; 6] = [
    "direct",
    "grpcgate",
    "grpcgate-base",
    "nginx",
    "haproxy",
    "tcp-relay",
];
const PEERS: [&str; 2] = ["nginx", "haproxy"];

fn num(v: &Value, k: &str) -> Option<f64> {
    v.get(k).and_then(Value::as_f64)
}

fn fmt_num(x: Option<f64>, decimals: usize) -> String {
    match x {
        Some(x) => format!("{x:.decimals$}"),
        None => "–".into(),
    }
}

fn machine() -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    if let Ok(s) = std::fs::read_to_string("/proc/cpuinfo") {
        if let Some(l) = s.lines().find(|l| l.starts_with("model name")) {
            m.insert(
                "cpu".into(),
                l.split(':').nth(1).unwrap_or("").trim().to_string(),
            );
        }
        let n = s.lines().filter(|l| l.starts_with("processor")).count();
        m.insert("cpus".into(), n.to_string());
    }
    if let Ok(s) = std::fs::read_to_string("/proc/meminfo") {
        if let Some(l) = s.lines().find(|l| l.starts_with("MemTotal")) {
            let kib: f64 = l
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            m.insert("memory".into(), format!("{:.1} GiB", kib / 1048576.0));
        }
    }
    if let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/osrelease") {
        m.insert("kernel".into(), s.trim().to_string());
    }
    m
}

/// With `ROUNDS` > 1 every (scenario, system) ran several times, interleaved with the other systems:
/// one record per pair, each top-level number the median over its rounds (so a single run that caught
/// the VM in a slow phase moves nothing), `rounds` saying how many.
fn merge_rounds(runs: &[Value]) -> Vec<Value> {
    let key = |r: &Value| {
        (
            r.get("scenario")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            r.get("system")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        )
    };
    let mut order: Vec<(String, String)> = Vec::new();
    let mut groups: BTreeMap<(String, String), Vec<&Value>> = BTreeMap::new();
    for r in runs {
        let k = key(r);
        if !groups.contains_key(&k) {
            order.push(k.clone());
        }
        groups.entry(k).or_default().push(r);
    }
    order
        .into_iter()
        .map(|k| {
            let group = &groups[&k];
            let mut merged = group[0].clone();
            if let Some(obj) = merged.as_object_mut() {
                for (field, value) in obj.iter_mut() {
                    if !value.is_number() {
                        continue;
                    }
                    let mut xs: Vec<f64> = group.iter().filter_map(|r| num(r, field)).collect();
                    if xs.len() == group.len() && xs.len() > 1 {
                        xs.sort_by(f64::total_cmp);
                        let n = xs.len();
                        let median = if n % 2 == 1 {
                            xs[n / 2]
                        } else {
                            (xs[n / 2 - 1] + xs[n / 2]) / 2.0
                        };
                        // Counts stay integers (an even number of rounds can land between two).
                        *value = if group.iter().all(|r| r[field.as_str()].is_u64()) {
                            json!(median.round() as u64)
                        } else {
                            json!(median)
                        };
                    }
                }
                obj.insert("rounds".into(), json!(group.len()));
            }
            merged
        })
        .collect()
}

fn report(args: &Args) -> anyhow::Result<()> {
    let input = args
        .input
        .as_deref()
        .ok_or_else(|| anyhow!("--input is required"))?;
    let text = std::fs::read_to_string(input).with_context(|| format!("reading {input}"))?;
    let runs: Vec<Value> = text
        .lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("parsing the runs")?;
    let runs = merge_rounds(&runs);
    let find = |scenario: &str, system: &str| {
        runs.iter().find(|r| {
            r.get("scenario").and_then(Value::as_str) == Some(scenario)
                && r.get("system").and_then(Value::as_str) == Some(system)
        })
    };
    let mut scenarios: Vec<String> = Vec::new();
    for r in &runs {
        if let Some(s) = r.get("scenario").and_then(Value::as_str) {
            if !scenarios.iter().any(|x| x == s) {
                scenarios.push(s.to_string());
            }
        }
    }
    let meta: BTreeMap<String, String> = args
        .meta
        .iter()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mach = machine();

    let mut md = String::new();
    md.push_str("# grpcgate load benchmark results\n\n");
    md.push_str(&format!(
        "Machine: {} ({} CPUs, {}), Linux {}.\n\n",
        mach.get("cpu").map(String::as_str).unwrap_or("?"),
        mach.get("cpus").map(String::as_str).unwrap_or("?"),
        mach.get("memory").map(String::as_str).unwrap_or("?"),
        mach.get("kernel").map(String::as_str).unwrap_or("?"),
    ));
    for (k, v) in &meta {
        md.push_str(&format!("- {k}: {v}\n"));
    }
    md.push_str("\nLatencies in µs. \"disturbance\": CPU-seconds per second used during the measured window by processes other than the proxy, the load generator and the backends / taken by the hypervisor (steal); above 0.05, the run was disturbed.\n\n");
    for scenario in &scenarios {
        let first = SYSTEMS.iter().find_map(|s| find(scenario, s));
        let Some(first) = first else { continue };
        let kind = first.get("kind").and_then(Value::as_str).unwrap_or("");
        md.push_str(&format!("## {scenario}\n\n"));
        md.push_str(&describe(first));
        md.push_str("\n\n");
        if kind == "idle" {
            md.push_str("| system | connections open | failed | RSS before (MiB) | RSS after (MiB) | RSS per idle connection (KiB) |\n|---|---:|---:|---:|---:|---:|\n");
            for sys in SYSTEMS {
                if let Some(r) = find(scenario, sys) {
                    md.push_str(&format!(
                        "| {sys} | {} | {} | {} | {} | {} |\n",
                        fmt_num(num(r, "connections"), 0),
                        fmt_num(num(r, "errors"), 0),
                        fmt_num(num(r, "rss_before_kib").map(|k| k / 1024.0), 1),
                        fmt_num(num(r, "rss_after_kib").map(|k| k / 1024.0), 1),
                        fmt_num(num(r, "rss_per_conn_kib"), 2),
                    ));
                }
            }
            md.push('\n');
            continue;
        }
        let streaming = kind == "stream";
        if streaming {
            md.push_str("| system | calls/s | msgs/s | MB/s | p50 µs | p99 µs | p99.9 µs | errors | proxy CPU s / 1k msgs | proxy CPU s / 1k calls | proxy peak RSS (MiB) | disturbance: other processes / steal |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        } else {
            md.push_str("| system | req/s | p50 µs | p99 µs | p99.9 µs | errors | proxy CPU s / 1k req | proxy peak RSS (MiB) | disturbance: other processes / steal |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        }
        for sys in SYSTEMS {
            let Some(r) = find(scenario, sys) else {
                continue;
            };
            let rss = fmt_num(num(r, "proxy_peak_rss_kib").map(|k| k / 1024.0), 1);
            let other = match r.get("interference") {
                Some(i) => format!(
                    "{} / {}",
                    fmt_num(num(i, "other_processes"), 2),
                    fmt_num(num(i, "steal"), 2)
                ),
                None => "–".into(),
            };
            if streaming {
                md.push_str(&format!(
                    "| {sys} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {rss} | {other} |\n",
                    fmt_num(num(r, "rps"), 0),
                    fmt_num(num(r, "msgs_per_s"), 0),
                    fmt_num(num(r, "mb_per_s"), 1),
                    fmt_num(num(r, "p50_us"), 0),
                    fmt_num(num(r, "p99_us"), 0),
                    fmt_num(num(r, "p999_us"), 0),
                    fmt_num(num(r, "errors"), 0),
                    fmt_num(num(r, "cpu_s_per_1k_msgs"), 4),
                    fmt_num(num(r, "cpu_s_per_1k_req"), 3),
                ));
            } else {
                md.push_str(&format!(
                    "| {sys} | {} | {} | {} | {} | {} | {} | {rss} | {other} |\n",
                    fmt_num(num(r, "rps"), 0),
                    fmt_num(num(r, "p50_us"), 0),
                    fmt_num(num(r, "p99_us"), 0),
                    fmt_num(num(r, "p999_us"), 0),
                    fmt_num(num(r, "errors"), 0),
                    fmt_num(num(r, "cpu_s_per_1k_req"), 4),
                ));
            }
        }
        // TLS scenarios: what was negotiated, and whether the handshakes were full or resumed.
        let tls: Vec<String> = SYSTEMS
            .iter()
            .filter_map(|sys| {
                let t = find(scenario, sys)?.get("tls")?;
                Some(format!(
                    "{sys} {} full / {} resumed ({})",
                    fmt_num(num(t, "full_handshakes"), 0),
                    fmt_num(num(t, "resumed_handshakes"), 0),
                    t.get("negotiated").and_then(Value::as_str).unwrap_or("?")
                ))
            })
            .collect();
        if !tls.is_empty() {
            md.push_str(&format!(
                "\nTLS handshakes of the load generator (whole run with warm-up; first round): {}.\n",
                tls.join("; ")
            ));
        }
        md.push('\n');
    }

    // Ratios: grpcgate / best peer (lowest CPU, highest rps, lowest p99).
    let mut ratios = Vec::new();
    let mut ratio_text = String::from(
        "## grpcgate / best peer (NGINX, HAProxy)\n\nCPU: grpcgate CPU per request / the lowest peer's (< 1 is better). rps: grpcgate / the highest peer's (> 1 is better). p99: grpcgate / the lowest peer's (< 1 is better). vs direct: grpcgate rps / direct rps.\n\n| scenario | CPU ratio | rps ratio | p99 ratio | rps vs direct |\n|---|---:|---:|---:|---:|\n",
    );
    for scenario in &scenarios {
        let Some(gg) = find(scenario, "grpcgate") else {
            continue;
        };
        if gg.get("kind").and_then(Value::as_str) == Some("idle") {
            continue;
        }
        let streaming = gg.get("kind").and_then(Value::as_str) == Some("stream");
        let cpu_key = if streaming {
            "cpu_s_per_1k_msgs"
        } else {
            "cpu_s_per_1k_req"
        };
        let rps_key = if streaming { "msgs_per_s" } else { "rps" };
        let peers: Vec<&Value> = PEERS.iter().filter_map(|p| find(scenario, p)).collect();
        let best = |k: &str, max: bool| -> Option<(f64, String)> {
            peers
                .iter()
                .filter_map(|p| Some((num(p, k)?, p.get("system")?.as_str()?.to_string())))
                .filter(|(x, _)| *x > 0.0)
                .reduce(|a, b| if (b.0 > a.0) == max { b } else { a })
        };
        let ratio = |k: &str, max: bool| -> Option<(f64, String)> {
            let (b, who) = best(k, max)?;
            Some((num(gg, k)? / b, who))
        };
        let cpu = ratio(cpu_key, false);
        let rps = ratio(rps_key, true);
        let p99 = ratio("p99_us", false);
        let vs_direct =
            find(scenario, "direct").and_then(|d| Some(num(gg, rps_key)? / num(d, rps_key)?));
        let cell = |r: &Option<(f64, String)>| match r {
            Some((x, who)) => format!("{x:.2} (vs {who})"),
            None => "–".into(),
        };
        ratio_text.push_str(&format!(
            "| {scenario} | {} | {} | {} | {} |\n",
            cell(&cpu),
            cell(&rps),
            cell(&p99),
            fmt_num(vs_direct, 2)
        ));
        ratios.push(json!({
            "scenario": scenario,
            "cpu_ratio": cpu.as_ref().map(|x| x.0), "cpu_best_peer": cpu.as_ref().map(|x| x.1.clone()),
            "rps_ratio": rps.as_ref().map(|x| x.0), "rps_best_peer": rps.as_ref().map(|x| x.1.clone()),
            "p99_ratio": p99.as_ref().map(|x| x.0), "p99_best_peer": p99.as_ref().map(|x| x.1.clone()),
            "rps_vs_direct": vs_direct,
        }));
    }

    // Issue-7 targets.
    let mut targets = Vec::new();
    let mut target = |name: &str,
                      measured: Option<f64>,
                      goal: f64,
                      lower_is_better: bool,
                      unit: &str| {
        let (status, margin) = match measured {
            None => ("n/a".to_string(), String::new()),
            Some(m) => {
                let met = if lower_is_better {
                    m <= goal
                } else {
                    m >= goal
                };
                let by = (m - goal).abs();
                (
                    if met { "MET" } else { "MISSED" }.to_string(),
                    format!("{by:.2}{unit} {}", if met { "to spare" } else { "short" }),
                )
            }
        };
        targets.push(json!({"target": name, "measured": measured, "goal": goal, "status": status, "margin": margin,
            "lower_is_better": lower_is_better, "unit": unit}));
    };
    let r = |scenario: &str, sys: &str, k: &str| find(scenario, sys).and_then(|v| num(v, k));
    let best_peer = |scenario: &str, k: &str, max: bool| {
        PEERS
            .iter()
            .filter_map(|p| r(scenario, p, k))
            .filter(|x| *x > 0.0)
            .reduce(|a, b| if (b > a) == max { b } else { a })
    };
    let sc = "unary-closed";
    target(
        "unary-closed: grpcgate CPU/req ÷ best peer's ≤ 0.75",
        r(sc, "grpcgate", "cpu_s_per_1k_req")
            .zip(best_peer(sc, "cpu_s_per_1k_req", false))
            .map(|(a, b)| a / b),
        0.75,
        true,
        "",
    );
    target(
        "unary-closed: grpcgate rps ÷ best peer's ≥ 1.0",
        r(sc, "grpcgate", "rps")
            .zip(best_peer(sc, "rps", true))
            .map(|(a, b)| a / b),
        1.0,
        false,
        "",
    );
    target(
        "unary-closed: grpcgate rps ÷ direct ≥ 0.85",
        r(sc, "grpcgate", "rps")
            .zip(r(sc, "direct", "rps"))
            .map(|(a, b)| a / b),
        0.85,
        false,
        "",
    );
    target(
        "unary-closed: grpcgate p99 ÷ best peer's p99 ≤ 1.0",
        r(sc, "grpcgate", "p99_us")
            .zip(best_peer(sc, "p99_us", false))
            .map(|(a, b)| a / b),
        1.0,
        true,
        "",
    );
    target(
        "unary-1x1: grpcgate p50 − direct p50 ≤ 30 µs",
        r("unary-1x1", "grpcgate", "p50_us")
            .zip(r("unary-1x1", "direct", "p50_us"))
            .map(|(a, b)| a - b),
        30.0,
        true,
        " µs",
    );
    target(
        "idle: grpcgate RSS per idle downstream connection < 20 KiB",
        r("idle", "grpcgate", "rss_per_conn_kib"),
        20.0,
        true,
        " KiB",
    );
    target(
        "stream: grpcgate MB/s ÷ direct ≥ 0.80",
        r("stream", "grpcgate", "mb_per_s")
            .zip(r("stream", "direct", "mb_per_s"))
            .map(|(a, b)| a / b),
        0.80,
        false,
        "",
    );
    let mut target_text =
        String::from("## Issue 7 targets\n\n| target | measured | status |\n|---|---:|---|\n");
    for t in &targets {
        target_text.push_str(&format!(
            "| {} | {} | {} {} |\n",
            t["target"].as_str().unwrap_or(""),
            fmt_num(t["measured"].as_f64(), 2),
            t["status"].as_str().unwrap_or(""),
            t["margin"].as_str().unwrap_or(""),
        ));
    }

    // The floor: a byte relay on the same CPU, for the targets that are relative to direct.
    let mut floor = Vec::new();
    let mut floor_text = String::from(
        "## The floor: a TCP relay\n\n`tcp-relay` is HAProxy in TCP mode on the proxy's CPU: it copies bytes and parses nothing, so what it adds over direct is what the extra hop costs any proxy on this machine.\n\n| measure | tcp-relay | grpcgate |\n|---|---:|---:|\n",
    );
    let mut floor_row = |name: &str, f: &dyn Fn(&str) -> Option<f64>| {
        let (relay, gg) = (f("tcp-relay"), f("grpcgate"));
        if relay.is_some() {
            floor_text.push_str(&format!(
                "| {name} | {} | {} |\n",
                fmt_num(relay, 2),
                fmt_num(gg, 2)
            ));
            floor.push(json!({"measure": name, "tcp_relay": relay, "grpcgate": gg}));
        }
    };
    floor_row("unary-1x1: p50 − direct p50 (µs)", &|sys| {
        Some(r("unary-1x1", sys, "p50_us")? - r("unary-1x1", "direct", "p50_us")?)
    });
    floor_row("stream: MB/s ÷ direct", &|sys| {
        Some(r("stream", sys, "mb_per_s")? / r("stream", "direct", "mb_per_s")?)
    });

    md.push_str(&ratio_text);
    md.push('\n');
    md.push_str(&target_text);
    if !floor.is_empty() {
        md.push('\n');
        md.push_str(&floor_text);
    }
    if !args.note.is_empty() {
        md.push_str("\n## Notes\n\n");
        for n in &args.note {
            md.push_str(&format!("- {n}\n"));
        }
    }
    if let Some(path) = &args.md {
        std::fs::write(path, &md).with_context(|| format!("writing {path}"))?;
    }
    if let Some(path) = &args.json {
        let out = json!({
            "machine": mach,
            "meta": meta,
            "notes": args.note,
            "runs": runs,
            "ratios": ratios,
            "targets": targets,
            "floor": floor,
        });
        std::fs::write(path, serde_json::to_string_pretty(&out)? + "\n")
            .with_context(|| format!("writing {path}"))?;
    }
    println!("{ratio_text}\n{target_text}");
    if !floor.is_empty() {
        println!("{floor_text}");
    }
    Ok(())
}

/// One line on what a scenario ran.
fn describe(r: &Value) -> String {
    let kind = r.get("kind").and_then(Value::as_str).unwrap_or("");
    let g = |k: &str| {
        r.get(k)
            .map(|v| v.to_string())
            .unwrap_or_else(|| "?".into())
    };
    let tls = match r.get("tls") {
        Some(t) if t["resume_offered"] == json!(true) => {
            " Over TLS (ALPN h2); the client resumes sessions when the server gave it a ticket."
        }
        Some(_) => " Over TLS (ALPN h2); every handshake a full one (the client does not resume).",
        None => "",
    };
    let text = match kind {
        "unary-closed" | "streams10k" => format!(
            "Unary, closed loop: {} connections × {} streams, {}-byte payload, {} s.",
            g("connections"), g("streams_per_conn"), g("payload"), g("duration_s")
        ),
        "unary-open" => format!(
            "Unary, open loop at {} req/s over {} connections; latency from the scheduled send time, {} s.",
            g("rate"), g("connections"), g("duration_s")
        ),
        "stream" => format!(
            "Server streaming: {} connections × {} streams, {} messages of {} payload bytes per call, {} s. CPU per 1k messages.",
            g("connections"), g("streams_per_conn"), g("count"), g("payload"), g("duration_s")
        ),
        "conns" => format!(
            "{} concurrent clients, each: connect, {} unary calls, close, repeat; first call's latency includes connect + handshake, {} s.",
            g("connections"), g("requests_per_conn"), g("duration_s")
        ),
        "idle" => format!(
            "{} h2c connections opened at once (one call each, then idle); proxy RSS growth per open connection.",
            r.get("requested").map(|v| v.to_string()).unwrap_or_else(|| "1000".into())
        ),
        _ => String::new(),
    };
    text + tls
}
