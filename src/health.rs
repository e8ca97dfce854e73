//! Endpoint health: active `grpc.health.v1` checks (poll or watch), passive outlier ejection, and the
//! proxy's own `grpc.health.v1.Health/Check` answered on its listeners.
//!
//! Active checks decide [`Endpoint::set_healthy`]; outlier detection decides ejections. Balancers only
//! see the result, [`Endpoint::is_available`], so health never adds work to a pick.

use std::sync::Arc;
use std::time::Duration;

use prometheus::IntCounter;
use tokio_util::sync::CancellationToken;

use crate::balancer::Endpoint;
use crate::config::{HealthCheckConfig, HealthCheckMode};
use crate::grpc::{self};
use crate::metrics::Metrics;
use crate::pb::health::health_check_response::ServingStatus;
use crate::pb::health::health_client::HealthClient;
use crate::pb::health::{HealthCheckRequest, HealthCheckResponse};

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

/// Starts the checking task of one endpoint; it stops when `stop` fires (the endpoint left its
/// cluster, the cluster's health-check settings changed, or the proxy shuts down).
pub fn spawn_check(
    cluster: &str,
    endpoint: &Arc<Endpoint>,
    config: &HealthCheckConfig,
    metrics: &Metrics,
    stop: CancellationToken,
) {
    let tracker = Tracker {
        cluster: cluster.to_string(),
        endpoint: endpoint.clone(),
        thresholds: Thresholds::new(config),
        success: metrics.health_checks(cluster, &endpoint.address, "success"),
        failure: metrics.health_checks(cluster, &endpoint.address, "failure"),
        seen_first: false,
    };
    let config = config.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = check_loop(tracker, config) => {}
            _ = stop.cancelled() => {}
        }
    });
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
