//! The echo test backend (`echo.Echo` plus `grpc.health.v1.Health`), used by `grpcgate demo`, the
//! integration tests and the load benchmark.
//!
//! Each backend runs on its own thread and runtime, so [`EchoBackend::kill`] can take it down the way
//! a crashed process goes: every connection closed at once, nothing drained.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::metadata::{KeyAndValueRef, MetadataMap};
use tonic::{Request, Response, Status, Streaming};

use crate::pb::echo::echo_server::{Echo, EchoServer};
use crate::pb::echo::{EchoRequest, EchoResponse};

/// Counters a test can read (and wait on) to see what the backend saw.
#[derive(Default)]
pub struct EchoStats {
    /// Calls that reached a handler.
    pub started: AtomicU64,
    /// Calls whose handler ran to the end.
    pub completed: AtomicU64,
    /// Calls whose handler was dropped before finishing: the client (or proxy) cancelled them.
    pub cancelled: AtomicU64,
    /// Notified on every cancellation.
    pub cancel_notify: Notify,
    /// Notified on every call start.
    pub start_notify: Notify,
}

impl EchoStats {
    /// Waits until at least `n` calls have been cancelled.
    pub async fn wait_cancelled(&self, n: u64) {
        loop {
            let notified = self.cancel_notify.notified();
            if self.cancelled.load(Ordering::SeqCst) >= n {
                return;
            }
            notified.await;
        }
    }

    /// Waits until at least `n` calls have started.
    pub async fn wait_started(&self, n: u64) {
        loop {
            let notified = self.start_notify.notified();
            if self.started.load(Ordering::SeqCst) >= n {
                return;
            }
            notified.await;
        }
    }
}

/// Counts a call as started, and as cancelled if dropped before [`CallGuard::done`].
struct CallGuard {
    stats: Arc<EchoStats>,
    done: bool,
}

impl CallGuard {
    fn new(stats: &Arc<EchoStats>) -> CallGuard {
        stats.started.fetch_add(1, Ordering::SeqCst);
        stats.start_notify.notify_waiters();
        CallGuard {
            stats: stats.clone(),
            done: false,
        }
    }
    fn done(mut self) {
        self.done = true;
        self.stats.completed.fetch_add(1, Ordering::SeqCst);
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if !self.done {
            self.stats.cancelled.fetch_add(1, Ordering::SeqCst);
            self.stats.cancel_notify.notify_waiters();
        }
    }
}

/// The echo service implementation.
#[derive(Clone)]
pub struct EchoService {
    name: Arc<str>,
    delay: Duration,
    stats: Arc<EchoStats>,
}

/// Copies the request's `x-*` metadata (ASCII and `-bin`) into a response's metadata.
fn echo_metadata(from: &MetadataMap, to: &mut MetadataMap) {
    for kv in from.iter() {
        match kv {
            KeyAndValueRef::Ascii(k, v) if k.as_str().starts_with("x-") => {
                to.append(k.clone(), v.clone());
            }
            KeyAndValueRef::Binary(k, v) if k.as_str().starts_with("x-") => {
                to.append_bin(k.clone(), v.clone());
            }
            _ => {}
        }
    }
}

impl EchoService {
    fn response(&self, req: &EchoRequest, seq: u32) -> EchoResponse {
        EchoResponse {
            payload: req.payload.clone(),
            backend: self.name.to_string(),
            seq,
            total_bytes: 0,
        }
    }

    /// The error a request asks for: code `fail_code`, its message, the payload as
    /// `grpc-status-details-bin` and the request's `x-*` metadata as trailers.
    fn failure(req: &EchoRequest, md: &MetadataMap) -> Option<Status> {
        if req.fail_code == 0 {
            return None;
        }
        let mut trailers = MetadataMap::new();
        echo_metadata(md, &mut trailers);
        Some(Status::with_details_and_metadata(
            tonic::Code::from_i32(req.fail_code),
            req.fail_message.clone(),
            req.payload.clone().into(),
            trailers,
        ))
    }

    async fn wait(&self, req: &EchoRequest) {
        let d = self.delay + Duration::from_millis(req.delay_ms.into());
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
    }
}

type BoxStream = Pin<Box<dyn Stream<Item = Result<EchoResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        let guard = CallGuard::new(&self.stats);
        let md = request.metadata().clone();
        let req = request.into_inner();
        self.wait(&req).await;
        guard.done();
        if let Some(status) = Self::failure(&req, &md) {
            return Err(status);
        }
        let mut resp = Response::new(self.response(&req, 0));
        echo_metadata(&md, resp.metadata_mut());
        Ok(resp)
    }

    type ServerStreamStream = BoxStream;

    async fn server_stream(
        &self,
        request: Request<EchoRequest>,
    ) -> Result<Response<BoxStream>, Status> {
        let guard = CallGuard::new(&self.stats);
        let md = request.metadata().clone();
        let req = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let this = self.clone();
        let mut resp_md = MetadataMap::new();
        echo_metadata(&md, &mut resp_md);
        tokio::spawn(async move {
            let count = req.count.max(1);
            for seq in 0..count {
                this.wait(&req).await;
                if tx.send(Ok(this.response(&req, seq))).await.is_err() {
                    return; // client gone: the guard counts the cancel
                }
            }
            if let Some(status) = Self::failure(&req, &md) {
                let _ = tx.send(Err(status)).await;
            }
            guard.done();
        });
        let mut resp = Response::new(Box::pin(ReceiverStream::new(rx)) as BoxStream);
        *resp.metadata_mut() = resp_md;
        Ok(resp)
    }

    async fn client_stream(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoResponse>, Status> {
        let guard = CallGuard::new(&self.stats);
        let md = request.metadata().clone();
        let mut stream = request.into_inner();
        let mut count = 0u32;
        let mut total = 0u64;
        let mut last = EchoRequest::default();
        while let Some(msg) = stream.next().await {
            let msg = msg?;
            count += 1;
            total += msg.payload.len() as u64;
            last = msg;
        }
        self.wait(&last).await;
        guard.done();
        if let Some(status) = Self::failure(&last, &md) {
            return Err(status);
        }
        let mut resp = Response::new(EchoResponse {
            payload: Default::default(),
            backend: self.name.to_string(),
            seq: count,
            total_bytes: total,
        });
        echo_metadata(&md, resp.metadata_mut());
        Ok(resp)
    }

    type BidiStream = BoxStream;

    async fn bidi(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<BoxStream>, Status> {
        let guard = CallGuard::new(&self.stats);
        let md = request.metadata().clone();
        let mut stream = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let this = self.clone();
        let mut resp_md = MetadataMap::new();
        echo_metadata(&md, &mut resp_md);
        tokio::spawn(async move {
            let mut seq = 0;
            loop {
                tokio::select! {
                    msg = stream.next() => match msg {
                        Some(Ok(req)) => {
                            this.wait(&req).await;
                            if let Some(status) = Self::failure(&req, &md) {
                                let _ = tx.send(Err(status)).await;
                                break;
                            }
                            if tx.send(Ok(this.response(&req, seq))).await.is_err() {
                                return;
                            }
                            seq += 1;
                        }
                        Some(Err(_)) => return, // client reset: counted as cancelled
                        None => break,
                    },
                    _ = tx.closed() => return,
                }
            }
            guard.done();
        });
        let mut resp = Response::new(Box::pin(ReceiverStream::new(rx)) as BoxStream);
        *resp.metadata_mut() = resp_md;
        Ok(resp)
    }
}

/// A running echo backend on loopback.
pub struct EchoBackend {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// What it has seen.
    pub stats: Arc<EchoStats>,
    /// Its `grpc.health.v1` status: flip it to test health checking.
    pub health: tonic_health::server::HealthReporter,
    kill: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EchoBackend {
    /// Starts a backend named `name` on 127.0.0.1 (a free port) that waits `delay` before each answer.
    pub async fn start(name: &str, delay: Duration) -> std::io::Result<EchoBackend> {
        Self::start_on("127.0.0.1:0".parse().expect("addr"), name, delay).await
    }

    /// Starts a backend on a given address (port 0 picks a free one).
    pub async fn start_on(
        addr: SocketAddr,
        name: &str,
        delay: Duration,
    ) -> std::io::Result<EchoBackend> {
        Self::start_with(addr, name, delay, None).await
    }

    /// Starts a backend that announces `SETTINGS_MAX_CONCURRENT_STREAMS = max_streams` (None: no limit).
    pub async fn start_with(
        addr: SocketAddr,
        name: &str,
        delay: Duration,
        max_streams: Option<u32>,
    ) -> std::io::Result<EchoBackend> {
        Self::start_full(addr, name, delay, max_streams, None).await
    }

    /// Starts a backend on 127.0.0.1 that reports itself `utilization` busy (0..1) in an ORCA load
    /// report (`endpoint-load-metrics-bin`, with `rps_fractional` 100) in every response's trailers,
    /// for `weighted_round_robin`.
    pub async fn start_reporting(name: &str, utilization: f64) -> std::io::Result<EchoBackend> {
        Self::start_full(
            "127.0.0.1:0".parse().expect("addr"),
            name,
            Duration::ZERO,
            None,
            Some(utilization),
        )
        .await
    }

    /// Like [`EchoBackend::start_reporting`], but waiting `delay` before each answer: a backend that is
    /// both slow and reports itself busy (the fleet benchmark's and the demo's ORCA backends).
    pub async fn start_reporting_with_delay(
        name: &str,
        delay: Duration,
        utilization: f64,
    ) -> std::io::Result<EchoBackend> {
        Self::start_full(
            "127.0.0.1:0".parse().expect("addr"),
            name,
            delay,
            None,
            Some(utilization),
        )
        .await
    }

    async fn start_full(
        addr: SocketAddr,
        name: &str,
        delay: Duration,
        max_streams: Option<u32>,
        utilization: Option<f64>,
    ) -> std::io::Result<EchoBackend> {
        let report = utilization.map(load_report);
        let std_listener = std::net::TcpListener::bind(addr)?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let stats = Arc::new(EchoStats::default());
        let service = EchoService {
            name: name.into(),
            delay,
            stats: stats.clone(),
        };
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        let (health_tx, health_rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(format!("echo-{name}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(std_listener).expect("listener");
                    let (mut reporter, health_service) = tonic_health::server::health_reporter();
                    reporter.set_serving::<EchoServer<EchoService>>().await;
                    reporter
                        .set_service_status("", tonic_health::ServingStatus::Serving)
                        .await;
                    let _ = health_tx.send(reporter);
                    let server = tonic::transport::Server::builder()
                        .max_concurrent_streams(max_streams)
                        // h2's default (GOAWAY once 20 streams the client reset wait to be
                        // accepted) ends the proxy's upstream connection when the proxy forwards a
                        // burst of client cancels, failing every call on it: in half the runs of
                        // tests/hostile_resets.rs's cancel-heavy client. Raised so that the tests
                        // measure the proxy, not this backend's limit.
                        .http2_max_pending_accept_reset_streams(Some(1000))
                        .layer(tower::util::MapResponseLayer::new(
                            move |resp: http::Response<tonic::body::BoxBody>| match &report {
                                Some(r) => resp.map(|body| {
                                    tonic::body::BoxBody::new(WithLoadReport {
                                        inner: body,
                                        report: r.clone(),
                                    })
                                }),
                                None => resp,
                            },
                        ))
                        .add_service(health_service)
                        .add_service(
                            EchoServer::new(service)
                                .max_decoding_message_size(64 << 20)
                                .max_encoding_message_size(64 << 20),
                        )
                        // TcpIncoming sets TCP_NODELAY on each accepted socket (Server::tcp_nodelay only
                        // applies to serve()); without it small responses wait for delayed ACKs.
                        .serve_with_incoming(
                            tonic::transport::server::TcpIncoming::from_listener(
                                listener, true, None,
                            )
                            .expect("incoming"),
                        );
                    tokio::select! {
                        _ = server => {}
                        _ = kill_rx => {}
                    }
                });
                // Dropping the runtime drops every connection task: the peer sees the sockets close.
                rt.shutdown_background();
            })?;
        let health = health_rx
            .await
            .map_err(|_| std::io::Error::other("echo backend failed to start"))?;
        Ok(EchoBackend {
            addr,
            stats,
            health,
            kill: Some(kill_tx),
            thread: Some(thread),
        })
    }

    /// Stops the backend abruptly, like a crashed process: every open connection closes at once.
    pub fn kill(&mut self) {
        if let Some(k) = self.kill.take() {
            let _ = k.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The `endpoint-load-metrics-bin` value reporting `utilization` (as CPU utilization) at 100 qps.
fn load_report(utilization: f64) -> http::HeaderValue {
    use base64::Engine;
    use prost::Message;
    let report = crate::pb::orca::OrcaLoadReport {
        cpu_utilization: utilization,
        rps_fractional: 100.0,
        ..Default::default()
    };
    let text = base64::engine::general_purpose::STANDARD.encode(report.encode_to_vec());
    http::HeaderValue::from_str(&text).expect("base64 is a valid header value")
}

/// A response body whose trailers get the backend's load report.
struct WithLoadReport {
    inner: tonic::body::BoxBody,
    report: http::HeaderValue,
}

impl http_body::Body for WithLoadReport {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let frame = match std::pin::Pin::new(&mut self.inner).poll_frame(cx) {
            std::task::Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        let frame = match frame.into_trailers() {
            Ok(mut trailers) => {
                trailers.insert("endpoint-load-metrics-bin", self.report.clone());
                http_body::Frame::trailers(trailers)
            }
            Err(data) => data,
        };
        std::task::Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
