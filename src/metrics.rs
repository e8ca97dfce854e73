//! The Prometheus registry and the handles the hot path touches.
//!
//! Label lookups happen once, when a cluster or listener is built (or the first time a status is seen
//! for an endpoint), never per request: the proxy holds [`IntCounter`]/[`IntGauge`] handles directly.

use std::sync::{Arc, OnceLock};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::grpc::{Code, CODE_COUNT};

/// Latency buckets for gRPC calls, from sub-millisecond unary calls to long streams.
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Every metric grpcgate exports, registered in one registry per gateway.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    in_flight: IntGaugeVec,
    healthy: IntGaugeVec,
    health_checks: IntCounterVec,
    ejections: IntCounterVec,
    refused: IntCounterVec,
    reloads: IntCounterVec,
    overflows: IntCounterVec,
    dns: IntCounterVec,
    downstream_connections: IntGaugeVec,
    downstream_accepted: IntCounterVec,
    downstream_rejected: IntCounterVec,
    downstream_closed: IntCounterVec,
    goaways: IntCounterVec,
    proxy_protocol_rejected: IntCounterVec,
    /// Access log lines written, and records dropped (queue full, or the write failed).
    pub access_log_lines: IntCounter,
    pub access_log_dropped: IntCounter,
}

/// A listener's connection metrics.
#[derive(Clone)]
pub struct ListenerMetrics {
    /// Open connections.
    pub active: IntGauge,
    /// Connections accepted and served (those refused over `max_connections` are not).
    pub accepted: IntCounter,
    /// Connections closed at once because the listener had `max_connections` open.
    pub rejected: IntCounter,
    /// Graceful GOAWAYs sent (age, idle, drain).
    pub goaways: IntCounter,
    /// Connections closed because their PROXY protocol header was missing or invalid.
    pub proxy_protocol_rejected: IntCounter,
    closed: IntCounterVec,
    listener: String,
}

impl ListenerMetrics {
    /// Counts a closed connection by why it closed (`age`, `idle`, `keepalive`, `handshake`,
    /// `proxy_protocol`, `drain`, `client`, `error`). Once per connection: the label lookup is fine.
    pub fn closed(&self, reason: &str) {
        self.closed
            .with_label_values(&[&self.listener, reason])
            .inc();
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Arc<Metrics> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "grpcgate_requests_total",
                "gRPC calls handled, by final grpc-status.",
            ),
            &["listener", "cluster", "endpoint", "grpc_status"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "grpcgate_request_duration_seconds",
                "Time from the request's headers to the end of its response.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["cluster"],
        )
        .expect("valid metric");
        let in_flight = IntGaugeVec::new(
            Opts::new(
                "grpcgate_endpoint_in_flight",
                "Calls in flight to an endpoint through this proxy.",
            ),
            &["cluster", "endpoint"],
        )
        .expect("valid metric");
        let healthy = IntGaugeVec::new(
            Opts::new(
                "grpcgate_endpoint_healthy",
                "1 if the endpoint may receive calls, 0 if not.",
            ),
            &["cluster", "endpoint"],
        )
        .expect("valid metric");
        let health_checks = IntCounterVec::new(
            Opts::new(
                "grpcgate_health_checks_total",
                "Active health checks, by result.",
            ),
            &["cluster", "endpoint", "result"],
        )
        .expect("valid metric");
        let downstream_connections = IntGaugeVec::new(
            Opts::new(
                "grpcgate_downstream_connections_active",
                "Open client connections.",
            ),
            &["listener"],
        )
        .expect("valid metric");
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
        };
        let downstream_accepted = counter(
            "grpcgate_downstream_connections_total",
            "Client connections accepted and served (those refused over max_connections are not counted here).",
            &["listener"],
        );
        let downstream_rejected = counter(
            "grpcgate_downstream_connections_rejected_total",
            "Client connections closed at once because the listener had max_connections open.",
            &["listener"],
        );
        let downstream_closed = counter(
            "grpcgate_downstream_connections_closed_total",
            "Client connections closed, by reason: age, idle, keepalive, handshake, proxy_protocol, drain, client, error.",
            &["listener", "reason"],
        );
        let goaways = counter(
            "grpcgate_downstream_goaways_total",
            "Graceful GOAWAYs sent to clients (max_connection_age, idle_timeout, drain).",
            &["listener"],
        );
        let proxy_protocol_rejected = counter(
            "grpcgate_proxy_protocol_rejected_total",
            "Client connections closed because their PROXY protocol header was missing or invalid.",
            &["listener"],
        );
        let ejections = IntCounterVec::new(
            Opts::new(
                "grpcgate_outlier_ejections_total",
                "Times outlier detection ejected an endpoint.",
            ),
            &["cluster", "endpoint"],
        )
        .expect("valid metric");
        let refused = IntCounterVec::new(
            Opts::new(
                "grpcgate_upstream_refused_total",
                "Calls an endpoint refused without processing them (GOAWAY, REFUSED_STREAM); each was sent again or failed.",
            ),
            &["cluster", "endpoint"],
        )
        .expect("valid metric");
        let reloads = IntCounterVec::new(
            Opts::new(
                "grpcgate_config_reloads_total",
                "SIGHUP config reloads, by result.",
            ),
            &["result"],
        )
        .expect("valid metric");
        let overflows = IntCounterVec::new(
            Opts::new(
                "grpcgate_cluster_overflow_total",
                "Calls refused with RESOURCE_EXHAUSTED because the cluster had max_requests calls in flight.",
            ),
            &["cluster"],
        )
        .expect("valid metric");
        let dns = IntCounterVec::new(
            Opts::new(
                "grpcgate_dns_resolutions_total",
                "DNS resolutions of a DNS cluster's name, by result: success (addresses), empty (NXDOMAIN or no records: no endpoints), failure (the last endpoints kept).",
            ),
            &["cluster", "result"],
        )
        .expect("valid metric");
        let access_log_lines = IntCounter::new(
            "grpcgate_access_log_lines_total",
            "Access log lines written.",
        )
        .expect("valid metric");
        let access_log_dropped = IntCounter::new(
            "grpcgate_access_log_dropped_total",
            "Access log lines dropped: the writer's queue was full (the disk or pipe was slower than the calls) or the write failed.",
        )
        .expect("valid metric");
        for c in [&access_log_lines, &access_log_dropped] {
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
        }
        for c in [
            &downstream_accepted,
            &downstream_rejected,
            &downstream_closed,
            &goaways,
            &proxy_protocol_rejected,
            &dns,
            &requests,
            &health_checks,
            &ejections,
            &refused,
            &reloads,
            &overflows,
        ] {
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
        }
        for g in [&in_flight, &healthy, &downstream_connections] {
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
        }
        registry
            .register(Box::new(duration.clone()))
            .expect("unique metric");
        Arc::new(Metrics {
            registry,
            requests,
            duration,
            in_flight,
            healthy,
            health_checks,
            ejections,
            refused,
            reloads,
            overflows,
            dns,
            downstream_connections,
            downstream_accepted,
            downstream_rejected,
            downstream_closed,
            goaways,
            proxy_protocol_rejected,
            access_log_lines,
            access_log_dropped,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut buf = Vec::with_capacity(4096);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("prometheus text is utf-8")
    }

    /// Per-status request counters for one (listener, cluster, endpoint); empty strings where a call never
    /// got that far (no route, no endpoint).
    pub fn request_counters(
        &self,
        listener: &str,
        cluster: &str,
        endpoint: &str,
    ) -> StatusCounters {
        StatusCounters {
            vec: self.requests.clone(),
            labels: [
                listener.to_string(),
                cluster.to_string(),
                endpoint.to_string(),
            ],
            slots: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    /// The call-duration histogram of a cluster.
    pub fn duration(&self, cluster: &str) -> Histogram {
        self.duration.with_label_values(&[cluster])
    }

    /// The in-flight gauge of an endpoint.
    pub fn in_flight(&self, cluster: &str, endpoint: &str) -> IntGauge {
        self.in_flight.with_label_values(&[cluster, endpoint])
    }

    /// The healthy gauge of an endpoint.
    pub fn healthy(&self, cluster: &str, endpoint: &str) -> IntGauge {
        self.healthy.with_label_values(&[cluster, endpoint])
    }

    /// Drops the gauges of an endpoint a reload removed (`grpcgate_endpoint_healthy`,
    /// `grpcgate_endpoint_in_flight`), so it does not go on being reported as healthy. Its counters stay:
    /// they only ever grow, and dropping them would make rates jump.
    pub fn forget_endpoint(&self, cluster: &str, endpoint: &str) {
        let _ = self.healthy.remove_label_values(&[cluster, endpoint]);
        let _ = self.in_flight.remove_label_values(&[cluster, endpoint]);
    }

    /// The health-check counter of an endpoint for one result (`success`, `failure`, ...).
    pub fn health_checks(&self, cluster: &str, endpoint: &str, result: &str) -> IntCounter {
        self.health_checks
            .with_label_values(&[cluster, endpoint, result])
    }

    /// The ejection counter of an endpoint.
    pub fn ejections(&self, cluster: &str, endpoint: &str) -> IntCounter {
        self.ejections.with_label_values(&[cluster, endpoint])
    }

    /// The counter of calls an endpoint refused unprocessed.
    pub fn refused(&self, cluster: &str, endpoint: &str) -> IntCounter {
        self.refused.with_label_values(&[cluster, endpoint])
    }

    /// The counter of calls a cluster refused over its `max_requests`.
    pub fn overflows(&self, cluster: &str) -> IntCounter {
        self.overflows.with_label_values(&[cluster])
    }

    /// The resolution counter of a DNS cluster for one result (`success`, `empty`, `failure`).
    pub fn dns_resolutions(&self, cluster: &str, result: &str) -> IntCounter {
        self.dns.with_label_values(&[cluster, result])
    }

    /// Counts a config reload attempt.
    pub fn config_reload(&self, success: bool) {
        self.reloads
            .with_label_values(&[if success { "success" } else { "failure" }])
            .inc();
    }

    /// The open-connections gauge of a listener.
    pub fn downstream_connections(&self, listener: &str) -> IntGauge {
        self.downstream_connections.with_label_values(&[listener])
    }

    /// The connection metrics of a listener.
    pub fn listener(&self, listener: &str) -> ListenerMetrics {
        ListenerMetrics {
            active: self.downstream_connections(listener),
            accepted: self.downstream_accepted.with_label_values(&[listener]),
            rejected: self.downstream_rejected.with_label_values(&[listener]),
            goaways: self.goaways.with_label_values(&[listener]),
            proxy_protocol_rejected: self.proxy_protocol_rejected.with_label_values(&[listener]),
            closed: self.downstream_closed.clone(),
            listener: listener.to_string(),
        }
    }
}

/// `grpcgate_requests_total` handles for one label set, one per status, each created on first use so
/// the output only lists statuses that happened.
pub struct StatusCounters {
    vec: IntCounterVec,
    labels: [String; 3],
    slots: [OnceLock<IntCounter>; CODE_COUNT],
}

impl StatusCounters {
    /// Counts one finished call.
    pub fn inc(&self, code: Code) {
        self.slots[code as usize]
            .get_or_init(|| {
                let [l, c, e] = &self.labels;
                self.vec.with_label_values(&[l, c, e, code.name()])
            })
            .inc();
    }
}
