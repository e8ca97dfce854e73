//! Endpoint health: active `grpc.health.v1` checks (poll or watch), passive outlier ejection, and the
//! proxy's own `grpc.health.v1.Health/Check` answered on its listeners.
//!
//! Active checks decide [`Endpoint::set_healthy`]; outlier detection decides ejections. Balancers only
//! see the result, [`Endpoint::is_available`], so health never adds work to a pick.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use h2::server::SendResponse;
use h2::RecvStream;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Request, Response};
use prometheus::IntCounter;
use prost::Message;
use tokio_util::sync::CancellationToken;

use crate::balancer::{Cluster, Endpoint};
use crate::config::{HealthCheckConfig, HealthCheckMode, OutlierConfig};
use crate::grpc::{self, Code, Status, GRPC_ACCEPT_ENCODING, GRPC_ENCODING};
use crate::metrics::Metrics;
use crate::pb::health::health_check_response::ServingStatus;
use crate::pb::health::health_client::HealthClient;
use crate::pb::health::{HealthCheckRequest, HealthCheckResponse};

/// The gRPC path of the standard health check, which the proxy can answer itself.
pub const CHECK_PATH: &str = "/grpc.health.v1.Health/Check";
/// The standard health service name.
pub const HEALTH_SERVICE: &str = "grpc.health.v1.Health";
/// An ejection never lasts longer than this (or `base_ejection_time`, if that is longer).
const MAX_EJECTION: Duration = Duration::from_secs(300);

/// `interval` ± 10 %, so the checks of many endpoints (and proxies) do not synchronise.
pub fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(0.9 + fastrand::f64() * 0.2)
}

/// Consecutive-result thresholds for one endpoint.
#[derive(Debug)]
pub struct Thresholds {
    healthy_threshold: u32,
    unhealthy_threshold: u32,
    successes: u32,
    failures: u32,
    /// No check has succeeded yet: the first success counts as enough.
    first: bool,
}

impl Thresholds {
    /// Thresholds from the config.
    pub fn new(config: &HealthCheckConfig) -> Thresholds {
        Thresholds {
            healthy_threshold: config.healthy_threshold,
            unhealthy_threshold: config.unhealthy_threshold,
            successes: 0,
            failures: 0,
            first: true,
        }
    }

    /// Records one result; returns the verdict it changes to, if it reaches a threshold.
    pub fn record(&mut self, success: bool, currently_healthy: bool) -> Option<bool> {
        if success {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            let enough = self.first || self.successes >= self.healthy_threshold;
            self.first = false;
            (!currently_healthy && enough).then_some(true)
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            (currently_healthy && self.failures >= self.unhealthy_threshold).then_some(false)
        }
    }
}

/// The per-endpoint side of active checking: thresholds, metrics, logging of transitions.
struct Tracker {
    cluster: String,
    endpoint: Arc<Endpoint>,
    thresholds: Thresholds,
    success: IntCounter,
    failure: IntCounter,
    /// Whether a result has been seen: an endpoint that starts unhealthy and fails its first check
    /// gets one log line saying why, since no transition will.
    seen_first: bool,
}

impl Tracker {
    fn record(&mut self, result: Result<(), String>) {
        let ok = result.is_ok();
        if ok { &self.success } else { &self.failure }.inc();
        if !std::mem::replace(&mut self.seen_first, true) && !ok && !self.endpoint.is_healthy() {
            tracing::warn!(cluster = %self.cluster, endpoint = %self.endpoint.address, reason = result.as_ref().err().map_or("", |e| e.as_str()), "endpoint is not healthy yet");
        }
        if let Some(healthy) = self.thresholds.record(ok, self.endpoint.is_healthy()) {
            self.set(healthy, result.err());
        }
    }

    /// Applies a verdict at once (a Watch update), bypassing thresholds.
    fn force(&mut self, healthy: bool, reason: Option<String>) {
        if healthy {
            &self.success
        } else {
            &self.failure
        }
        .inc();
        self.thresholds.record(healthy, self.endpoint.is_healthy());
        self.set(healthy, reason);
    }

    fn set(&self, healthy: bool, reason: Option<String>) {
        if self.endpoint.set_healthy(healthy) {
            if healthy {
                tracing::info!(cluster = %self.cluster, endpoint = %self.endpoint.address, "endpoint is healthy");
            } else {
                tracing::warn!(cluster = %self.cluster, endpoint = %self.endpoint.address, reason = reason.as_deref().unwrap_or(""), "endpoint is unhealthy");
            }
        }
    }
}

/// Starts one checking task per endpoint of `cluster`; they stop when `shutdown` fires.
pub fn spawn_active_checks(
    cluster: &Arc<Cluster>,
    config: &HealthCheckConfig,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) {
    for endpoint in &cluster.endpoints {
        let tracker = Tracker {
            cluster: cluster.name.clone(),
            endpoint: endpoint.clone(),
            thresholds: Thresholds::new(config),
            success: metrics.health_checks(&cluster.name, &endpoint.address, "success"),
            failure: metrics.health_checks(&cluster.name, &endpoint.address, "failure"),
            seen_first: false,
        };
        let config = config.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = check_loop(tracker, config) => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

/// A health client on its own lazily connected channel to `address`.
fn health_client(
    address: &str,
    timeout: Duration,
) -> Result<HealthClient<tonic::transport::Channel>, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| e.to_string())?;
    Ok(HealthClient::new(
        endpoint
            .connect_timeout(timeout)
            .tcp_nodelay(true)
            .connect_lazy(),
    ))
}

async fn check_loop(mut tracker: Tracker, config: HealthCheckConfig) {
    let mut client = match health_client(&tracker.endpoint.address, config.timeout) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(endpoint = %tracker.endpoint.address, error = %e, "cannot health-check endpoint");
            return;
        }
    };
    let request = HealthCheckRequest {
        service: config.service.clone(),
    };
    if config.mode == HealthCheckMode::Watch {
        watch_loop(&mut tracker, &mut client, &request, &config).await;
        tracing::warn!(cluster = %tracker.cluster, endpoint = %tracker.endpoint.address, "Health/Watch is unimplemented by the endpoint; polling Health/Check instead");
    }
    loop {
        let result = check_once(&mut client, &request, config.timeout).await;
        tracker.record(result);
        tokio::time::sleep(jittered(config.interval)).await;
    }
}

/// One `Health/Check`: Ok for SERVING, otherwise why not.
async fn check_once(
    client: &mut HealthClient<tonic::transport::Channel>,
    request: &HealthCheckRequest,
    timeout: Duration,
) -> Result<(), String> {
    // A Check the endpoint refused unprocessed (a GOAWAY that crossed it, as when the endpoint closes
    // an idle connection, or REFUSED_STREAM) says nothing about its health: ask once more at once.
    let mut asked_again = false;
    loop {
        return match tokio::time::timeout(timeout, client.check(request.clone())).await {
            Err(_) => Err(format!(
                "health check timed out after {}ms",
                timeout.as_millis()
            )),
            Ok(Err(status)) if !asked_again && refused(&status) => {
                asked_again = true;
                continue;
            }
            Ok(Err(status)) => Err(format!(
                "health check failed: {} {}",
                status.code(),
                status.message()
            )),
            Ok(Ok(resp)) => serving(resp.get_ref()),
        };
    }
}

/// Whether a call failed because the server refused its stream without processing it
/// ([`grpc::refused`], on the HTTP/2 error under the status).
fn refused(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if let Some(e) = e.downcast_ref::<h2::Error>() {
            return grpc::refused(e);
        }
        source = e.source();
    }
    false
}

fn serving(resp: &HealthCheckResponse) -> Result<(), String> {
    match ServingStatus::try_from(resp.status) {
        Ok(ServingStatus::Serving) => Ok(()),
        Ok(other) => Err(format!("endpoint reports {}", other.as_str_name())),
        Err(_) => Err(format!("endpoint reports unknown status {}", resp.status)),
    }
}

/// Watch streams that lost their connection are reopened at once, but never sooner than this after
/// the previous one was opened: a server that keeps dropping connections right after answering cannot
/// drive the checker into a hot loop.
const WATCH_REOPEN_SPACING: Duration = Duration::from_secs(1);

/// How one `Health/Watch` stream ended.
enum WatchEnd {
    /// The endpoint does not implement Watch (before any update).
    Unimplemented,
    /// The stream had delivered at least one update when its connection went away (GOAWAY, closed
    /// connection, UNAVAILABLE): connection rotation, not a health verdict.
    ConnectionLost(String),
    /// Anything else: a failed check.
    Failed(String),
}

/// Keeps a `Health/Watch` stream open and applies each update at once. A stream that delivered an
/// update and then lost its connection (a backend rotating connections: GOAWAY, then close) is
/// reopened at once on a new connection, without counting a failure; any other end, or a reopened
/// stream that fails before its first update, is a failed check and the stream is reopened after
/// `interval`. Returns only if the endpoint does not implement Watch.
async fn watch_loop(
    tracker: &mut Tracker,
    client: &mut HealthClient<tonic::transport::Channel>,
    request: &HealthCheckRequest,
    config: &HealthCheckConfig,
) {
    loop {
        let opened = tokio::time::Instant::now();
        match watch_once(tracker, client, request, config).await {
            WatchEnd::Unimplemented => return,
            WatchEnd::ConnectionLost(reason) => {
                tracing::debug!(cluster = %tracker.cluster, endpoint = %tracker.endpoint.address, %reason, "Health/Watch lost its connection; reopening it on a new one");
                // A fresh channel, so the reopened stream cannot land on the dying connection.
                if let Ok(c) = health_client(&tracker.endpoint.address, config.timeout) {
                    *client = c;
                }
                tokio::time::sleep_until(opened + WATCH_REOPEN_SPACING).await;
                continue;
            }
            WatchEnd::Failed(reason) => tracker.record(Err(reason)),
        }
        tokio::time::sleep(jittered(config.interval)).await;
    }
}

/// Opens one `Health/Watch` stream and applies its updates until it ends. Opening it and its first
/// update must take at most `timeout`.
async fn watch_once(
    tracker: &mut Tracker,
    client: &mut HealthClient<tonic::transport::Channel>,
    request: &HealthCheckRequest,
    config: &HealthCheckConfig,
) -> WatchEnd {
    let open = async {
        let mut stream = client.watch(request.clone()).await?.into_inner();
        let first = stream.message().await?;
        Ok::<_, tonic::Status>((stream, first))
    };
    let mut stream = match tokio::time::timeout(config.timeout, open).await {
        Err(_) => {
            return WatchEnd::Failed(format!(
                "Health/Watch timed out after {}ms",
                config.timeout.as_millis()
            ))
        }
        Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
            return WatchEnd::Unimplemented
        }
        Ok(Err(status)) => {
            return WatchEnd::Failed(format!(
                "Health/Watch failed: {} {}",
                status.code(),
                status.message()
            ))
        }
        Ok(Ok((_, None))) => {
            return WatchEnd::Failed("Health/Watch stream ended without an update".into())
        }
        Ok(Ok((stream, Some(first)))) => {
            let verdict = serving(&first);
            tracker.force(verdict.is_ok(), verdict.err());
            stream
        }
    };
    loop {
        match stream.message().await {
            Ok(Some(update)) => {
                let verdict = serving(&update);
                tracker.force(verdict.is_ok(), verdict.err());
            }
            Ok(None) => return WatchEnd::Failed("Health/Watch stream ended".into()),
            Err(status) => {
                let reason = format!(
                    "Health/Watch stream broke: {} {}",
                    status.code(),
                    status.message()
                );
                return if connection_lost(&status) {
                    WatchEnd::ConnectionLost(reason)
                } else {
                    WatchEnd::Failed(reason)
                };
            }
        }
    }
}

/// Whether a stream error means the stream's connection went away (rather than the server ending
/// the call with a status): UNAVAILABLE, a GOAWAY, or the connection closing or failing under it.
fn connection_lost(status: &tonic::Status) -> bool {
    if status.code() == tonic::Code::Unavailable {
        return true;
    }
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if let Some(e) = e.downcast_ref::<h2::Error>() {
            return e.is_go_away() || e.is_io();
        }
        if e.is::<std::io::Error>() {
            return true;
        }
        if let Some(e) = e.downcast_ref::<hyper::Error>() {
            if e.is_closed() || e.is_incomplete_message() {
                return true;
            }
        }
        source = e.source();
    }
    false
}

/// Passive outlier detection for one cluster: endpoints whose calls keep failing are ejected for a
/// while, never more than `max_ejection_percent` of the cluster at once.
pub struct OutlierDetector {
    config: OutlierConfig,
    cluster: String,
    total: usize,
    ejected: Arc<AtomicUsize>,
    ejections: Vec<IntCounter>,
}

impl OutlierDetector {
    /// A detector for a cluster of `total` endpoints.
    pub fn new(
        config: OutlierConfig,
        cluster: &str,
        addresses: &[&str],
        metrics: &Metrics,
    ) -> OutlierDetector {
        OutlierDetector {
            config,
            cluster: cluster.to_string(),
            total: addresses.len(),
            ejected: Arc::new(AtomicUsize::new(0)),
            ejections: addresses
                .iter()
                .map(|a| metrics.ejections(cluster, a))
                .collect(),
        }
    }

    /// Records how a call to endpoint `index` ended: `failed` for UNAVAILABLE or a connect/reset failure.
    pub fn record(&self, index: usize, endpoint: &Arc<Endpoint>, failed: bool) {
        if !failed {
            if endpoint.consecutive_failures.load(Ordering::Relaxed) != 0 {
                endpoint.consecutive_failures.store(0, Ordering::Relaxed);
            }
            return;
        }
        let n = endpoint
            .consecutive_failures
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        if n < self.config.consecutive_failures || endpoint.is_ejected() {
            return;
        }
        // Reserve an ejection slot under the cap; if another call took the last one, stay in.
        let max = self.config.max_ejection_percent as usize;
        let reserved = self
            .ejected
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |e| {
                (e * 100 < max * self.total).then_some(e + 1)
            })
            .is_ok();
        if !reserved {
            return;
        }
        if !endpoint.set_ejected(true) {
            self.ejected.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        let times = endpoint.times_ejected.fetch_add(1, Ordering::Relaxed) + 1;
        let duration = self
            .config
            .base_ejection_time
            .saturating_mul(times)
            .min(MAX_EJECTION.max(self.config.base_ejection_time));
        self.ejections[index].inc();
        tracing::warn!(cluster = %self.cluster, endpoint = %endpoint.address, failures = n, ejection_ms = duration.as_millis() as u64, "endpoint ejected");
        let endpoint = endpoint.clone();
        let ejected = self.ejected.clone();
        let cluster = self.cluster.clone();
        tokio::spawn(async move {
            tokio::time::sleep(duration).await;
            endpoint.consecutive_failures.store(0, Ordering::Relaxed);
            endpoint.set_ejected(false);
            ejected.fetch_sub(1, Ordering::AcqRel);
            tracing::info!(%cluster, endpoint = %endpoint.address, "endpoint returned from ejection");
        });
    }
}

/// The encodings the proxy's own `Health/Check` accepts, sent as `grpc-accept-encoding` with every
/// answer (the gRPC compression spec asks for it with the UNIMPLEMENTED of an unsupported encoding).
const ACCEPTED_ENCODINGS: &str = "identity,deflate,gzip";
/// A compressed health check request may grow to this much when decompressed: a HealthCheckRequest
/// is one service name, so this is plenty and a zip bomb stops here.
const MAX_DECOMPRESSED: usize = 4 * 1024;

/// A request message encoding `Health/Check` can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Identity,
    Gzip,
    /// gRPC's "deflate" is the zlib format (RFC 1950).
    Deflate,
}

impl Encoding {
    /// The encoding named by a `grpc-encoding` header (absent = identity); an unsupported one is
    /// UNIMPLEMENTED, as the compression spec says.
    fn from_header(value: Option<&HeaderValue>) -> Result<Encoding, Status> {
        let Some(value) = value else {
            return Ok(Encoding::Identity);
        };
        let name = value.to_str().unwrap_or("").trim();
        if name.eq_ignore_ascii_case("identity") {
            Ok(Encoding::Identity)
        } else if name.eq_ignore_ascii_case("gzip") {
            Ok(Encoding::Gzip)
        } else if name.eq_ignore_ascii_case("deflate") {
            Ok(Encoding::Deflate)
        } else {
            Err(Status::new(
                Code::Unimplemented,
                format!(
                    "grpcgate: unsupported grpc-encoding \"{}\" (supported: {ACCEPTED_ENCODINGS})",
                    String::from_utf8_lossy(value.as_bytes())
                ),
            ))
        }
    }

    /// Decompresses a message, at most [`MAX_DECOMPRESSED`] bytes of it.
    fn decompress(self, data: &[u8]) -> Result<Bytes, Status> {
        use std::io::Read;
        let mut decoder: Box<dyn Read + '_> = match self {
            Encoding::Identity => return Ok(Bytes::copy_from_slice(data)),
            Encoding::Gzip => Box::new(flate2::read::GzDecoder::new(data)),
            Encoding::Deflate => Box::new(flate2::read::ZlibDecoder::new(data)),
        };
        let mut out = Vec::new();
        decoder
            .by_ref()
            .take(MAX_DECOMPRESSED as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| {
                Status::new(
                    Code::Internal,
                    format!("grpcgate: cannot decompress the health check request: {e}"),
                )
            })?;
        if out.len() > MAX_DECOMPRESSED {
            return Err(Status::new(
                Code::ResourceExhausted,
                format!(
                    "grpcgate: decompressed health check request larger than {MAX_DECOMPRESSED} bytes"
                ),
            ));
        }
        Ok(out.into())
    }
}

/// Answers `grpc.health.v1.Health/Check` on a listener: service "" is SERVING while the proxy is not
/// draining; a cluster's name is SERVING while that cluster has an available endpoint; anything else
/// is NOT_FOUND, as the health protocol specifies. The request may be compressed with gzip or deflate.
pub async fn answer_check(
    mut req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    draining: bool,
    cluster_status: impl Fn(&str) -> Option<bool>,
) -> Code {
    let status = match read_request(&mut req).await {
        Err(status) => Err(status),
        Ok(r) if r.service.is_empty() => Ok(!draining),
        Ok(r) => match cluster_status(&r.service) {
            Some(up) => Ok(up && !draining),
            None => Err(Status::new(
                Code::NotFound,
                format!("grpcgate: unknown service \"{}\"", r.service),
            )),
        },
    };
    let accept = HeaderValue::from_static(ACCEPTED_ENCODINGS);
    let serving = match status {
        Ok(s) => s,
        Err(status) => {
            let mut head = status.to_trailers_only();
            head.headers_mut()
                .insert(GRPC_ACCEPT_ENCODING.clone(), accept);
            let _ = respond.send_response(head, true);
            return status.code;
        }
    };
    let msg = HealthCheckResponse {
        status: if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        } as i32,
    };
    let mut frame = BytesMut::with_capacity(5 + msg.encoded_len());
    frame.put_u8(0);
    frame.put_u32(msg.encoded_len() as u32);
    msg.encode(&mut frame).expect("buffer has room");
    let mut head = Response::new(());
    head.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    head.headers_mut()
        .insert(GRPC_ACCEPT_ENCODING.clone(), accept);
    if let Ok(mut send) = respond.send_response(head, false) {
        let _ = send.send_data(frame.freeze(), false);
        let _ = send.send_trailers(Status::new(Code::Ok, "").to_trailers());
    }
    Code::Ok
}

/// Reads the request's one message, decompresses it as its `grpc-encoding` says and decodes it.
async fn read_request(req: &mut Request<RecvStream>) -> Result<HealthCheckRequest, Status> {
    let encoding = req.headers().get(&GRPC_ENCODING).cloned();
    let (compressed, msg) = read_unary(req.body_mut()).await?;
    let encoding = Encoding::from_header(encoding.as_ref())?;
    let msg = match (compressed, encoding) {
        (false, _) => msg,
        (true, Encoding::Identity) => return Err(Status::new(
            Code::Internal,
            "grpcgate: compressed health check request without a grpc-encoding (or with identity)",
        )),
        (true, encoding) => encoding.decompress(&msg)?,
    };
    HealthCheckRequest::decode(msg).map_err(|e| {
        Status::new(
            Code::Internal,
            format!("grpcgate: bad HealthCheckRequest: {e}"),
        )
    })
}

/// Reads the one length-prefixed message of a unary gRPC request body (at most 64 KiB): whether its
/// compressed flag is set, and its bytes.
async fn read_unary(body: &mut RecvStream) -> Result<(bool, Bytes), Status> {
    const LIMIT: usize = 64 * 1024;
    let mut buf = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| {
            Status::new(
                Code::Cancelled,
                format!("grpcgate: request body failed: {e}"),
            )
        })?;
        let _ = body.flow_control().release_capacity(chunk.len());
        buf.extend_from_slice(&chunk);
        if buf.len() > LIMIT {
            return Err(Status::new(
                Code::ResourceExhausted,
                "grpcgate: health check request too large",
            ));
        }
    }
    if buf.len() < 5 {
        return Err(Status::new(
            Code::Internal,
            "grpcgate: empty health check request",
        ));
    }
    let compressed = match buf[0] {
        0 => false,
        1 => true,
        flag => {
            return Err(Status::new(
                Code::Internal,
                format!("grpcgate: bad gRPC message flag {flag}"),
            ))
        }
    };
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if buf.len() != 5 + len {
        return Err(Status::new(
            Code::Internal,
            "grpcgate: malformed gRPC message framing",
        ));
    }
    Ok((compressed, buf.freeze().split_off(5)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(healthy: u32, unhealthy: u32) -> HealthCheckConfig {
        HealthCheckConfig {
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            unhealthy_threshold: unhealthy,
            healthy_threshold: healthy,
            service: String::new(),
            mode: HealthCheckMode::Poll,
            start_healthy: false,
        }
    }

    #[test]
    fn thresholds() {
        let mut t = Thresholds::new(&config(2, 3));
        // The very first success is enough for a new endpoint.
        assert_eq!(t.record(true, false), Some(true));
        assert_eq!(t.record(false, true), None);
        assert_eq!(t.record(false, true), None);
        assert_eq!(
            t.record(true, true),
            None,
            "a success resets the failure count"
        );
        assert_eq!(t.record(false, true), None);
        assert_eq!(t.record(false, true), None);
        assert_eq!(t.record(false, true), Some(false));
        assert_eq!(
            t.record(true, false),
            None,
            "afterwards, healthy_threshold successes are needed"
        );
        assert_eq!(t.record(true, false), Some(true));
    }

    /// Ejection timing on tokio's paused clock: the first ejection lasts `base_ejection_time`, the
    /// second twice that, and an ejected endpoint comes back on its own.
    #[tokio::test(start_paused = true)]
    async fn ejections_grow_and_end_on_their_own() {
        let text = "[[listeners]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n[[clusters]]\nname = \"c\"\n\
                    endpoints = [\"a:1\", \"b:1\"]\n[clusters.outlier_detection]\n\
                    consecutive_failures = 2\nbase_ejection_time = \"10s\"\nmax_ejection_percent = 50\n";
        let config = crate::Config::parse(text, "t.toml", std::path::Path::new(".")).unwrap();
        let cluster = Cluster::new(&config.clusters[0], &Metrics::new());
        let a = &cluster.endpoints[0];
        let eject = || {
            cluster.report(0, true);
            cluster.report(0, true);
        };
        cluster.report(0, true);
        cluster.report(0, false); // a success in between resets the count
        cluster.report(0, true);
        assert!(a.is_available(), "one failure in a row is not enough");
        cluster.report(0, true);
        assert!(!a.is_available(), "two in a row eject");
        // The other endpoint may not be ejected too: 1 of 2 is already the 50 % cap.
        cluster.report(1, true);
        cluster.report(1, true);
        assert!(cluster.endpoints[1].is_available());

        tokio::time::sleep(Duration::from_millis(9_990)).await;
        assert!(!a.is_available());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(a.is_available(), "back after base_ejection_time");

        eject();
        tokio::time::sleep(Duration::from_millis(19_990)).await;
        assert!(!a.is_available(), "the second ejection lasts 2 x base");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(a.is_available());
    }

    #[test]
    fn watch_stream_ends_that_mean_the_connection_went_away() {
        assert!(connection_lost(&tonic::Status::unavailable("GOAWAY")));
        let closed = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "connection closed");
        assert!(connection_lost(&tonic::Status::from_error(Box::new(
            closed
        ))));
        // A status the server ended the call with, or a reset of just this stream, is not.
        assert!(!connection_lost(&tonic::Status::internal("boom")));
        let reset = h2::Error::from(h2::Reason::CANCEL);
        assert!(!connection_lost(&tonic::Status::from_error(Box::new(
            reset
        ))));
    }

    #[test]
    fn request_encodings() {
        let header = |v: &'static str| HeaderValue::from_static(v);
        assert_eq!(Encoding::from_header(None).unwrap(), Encoding::Identity);
        assert_eq!(
            Encoding::from_header(Some(&header("gzip"))).unwrap(),
            Encoding::Gzip
        );
        assert_eq!(
            Encoding::from_header(Some(&header("deflate"))).unwrap(),
            Encoding::Deflate
        );
        let err = Encoding::from_header(Some(&header("snappy"))).unwrap_err();
        assert_eq!(err.code, Code::Unimplemented);

        use std::io::Write;
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&[7; MAX_DECOMPRESSED]).unwrap();
        let at_cap = z.finish().unwrap();
        assert_eq!(
            Encoding::Deflate.decompress(&at_cap).unwrap().len(),
            MAX_DECOMPRESSED
        );
        let mut g = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        g.write_all(&[7; MAX_DECOMPRESSED + 1]).unwrap();
        let over = g.finish().unwrap();
        assert_eq!(
            Encoding::Gzip.decompress(&over).unwrap_err().code,
            Code::ResourceExhausted
        );
        assert_eq!(
            Encoding::Gzip.decompress(b"not gzip").unwrap_err().code,
            Code::Internal
        );
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        for _ in 0..1000 {
            let d = jittered(Duration::from_secs(1));
            assert!(
                d >= Duration::from_millis(900) && d <= Duration::from_millis(1100),
                "{d:?}"
            );
        }
    }
}
