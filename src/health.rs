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
use crate::grpc::{Code, Status};
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

async fn check_loop(mut tracker: Tracker, config: HealthCheckConfig) {
    let uri = format!("http://{}", tracker.endpoint.address);
    let channel = match tonic::transport::Endpoint::from_shared(uri) {
        Ok(e) => e
            .connect_timeout(config.timeout)
            .tcp_nodelay(true)
            .connect_lazy(),
        Err(e) => {
            tracing::error!(endpoint = %tracker.endpoint.address, error = %e, "cannot health-check endpoint");
            return;
        }
    };
    let mut client = HealthClient::new(channel);
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
    match tokio::time::timeout(timeout, client.check(request.clone())).await {
        Err(_) => Err(format!(
            "health check timed out after {}ms",
            timeout.as_millis()
        )),
        Ok(Err(status)) => Err(format!(
            "health check failed: {} {}",
            status.code(),
            status.message()
        )),
        Ok(Ok(resp)) => serving(resp.get_ref()),
    }
}

fn serving(resp: &HealthCheckResponse) -> Result<(), String> {
    match ServingStatus::try_from(resp.status) {
        Ok(ServingStatus::Serving) => Ok(()),
        Ok(other) => Err(format!("endpoint reports {}", other.as_str_name())),
        Err(_) => Err(format!("endpoint reports unknown status {}", resp.status)),
    }
}

/// Keeps a `Health/Watch` stream open and applies each update at once; re-opens it after `interval`
/// when it breaks. Returns only if the endpoint does not implement Watch.
async fn watch_loop(
    tracker: &mut Tracker,
    client: &mut HealthClient<tonic::transport::Channel>,
    request: &HealthCheckRequest,
    config: &HealthCheckConfig,
) {
    loop {
        match tokio::time::timeout(config.timeout, client.watch(request.clone())).await {
            Err(_) => tracker.record(Err(format!(
                "Health/Watch timed out after {}ms",
                config.timeout.as_millis()
            ))),
            Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => return,
            Ok(Err(status)) => tracker.record(Err(format!(
                "Health/Watch failed: {} {}",
                status.code(),
                status.message()
            ))),
            Ok(Ok(resp)) => {
                let mut stream = resp.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(update)) => {
                            let verdict = serving(&update);
                            tracker.force(verdict.is_ok(), verdict.err());
                        }
                        Ok(None) => {
                            tracker.record(Err("Health/Watch stream ended".into()));
                            break;
                        }
                        Err(status) => {
                            tracker.record(Err(format!(
                                "Health/Watch stream broke: {}",
                                status.message()
                            )));
                            break;
                        }
                    }
                }
            }
        }
        tokio::time::sleep(jittered(config.interval)).await;
    }
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

/// Answers `grpc.health.v1.Health/Check` on a listener: service "" is SERVING while the proxy is not
/// draining; a cluster's name is SERVING while that cluster has an available endpoint; anything else
/// is NOT_FOUND, as the health protocol specifies.
pub async fn answer_check(
    mut req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    draining: bool,
    cluster_status: impl Fn(&str) -> Option<bool>,
) -> Code {
    let status = match read_unary(req.body_mut()).await {
        Err(status) => Err(status),
        Ok(msg) => match HealthCheckRequest::decode(msg) {
            Err(e) => Err(Status::new(
                Code::Internal,
                format!("grpcgate: bad HealthCheckRequest: {e}"),
            )),
            Ok(r) if r.service.is_empty() => Ok(!draining),
            Ok(r) => match cluster_status(&r.service) {
                Some(up) => Ok(up && !draining),
                None => Err(Status::new(
                    Code::NotFound,
                    format!("grpcgate: unknown service \"{}\"", r.service),
                )),
            },
        },
    };
    let serving = match status {
        Ok(s) => s,
        Err(status) => {
            let _ = respond.send_response(status.to_trailers_only(), true);
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
    if let Ok(mut send) = respond.send_response(head, false) {
        let _ = send.send_data(frame.freeze(), false);
        let _ = send.send_trailers(Status::new(Code::Ok, "").to_trailers());
    }
    Code::Ok
}

/// Reads the one length-prefixed message of a unary gRPC request body (at most 64 KiB).
async fn read_unary(body: &mut RecvStream) -> Result<Bytes, Status> {
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
    if buf[0] != 0 {
        return Err(Status::new(
            Code::Unimplemented,
            "grpcgate: compressed health check requests are not supported",
        ));
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if buf.len() != 5 + len {
        return Err(Status::new(
            Code::Internal,
            "grpcgate: malformed gRPC message framing",
        ));
    }
    Ok(buf.freeze().split_off(5))
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
