//! Which endpoint of a cluster gets the next call.
//!
//! A [`Cluster`] is an immutable snapshot: its endpoints and balancer are built once from the config.
//! Per-endpoint state that changes per request (in-flight count, health, ejection) lives in atomics on
//! the [`Endpoint`], so a pick reads a slice and a few atomics and takes no lock.

mod least_request;
mod outlier;
mod round_robin;
mod shortest_queue;

pub use outlier::OutlierDetector;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus::{Histogram, IntCounter, IntGauge};

use crate::config::{BalancerKind, ClusterConfig, EndpointConfig};
use crate::metrics::Metrics;
use crate::upstream::Pool;

pub use least_request::LeastRequest;
pub use round_robin::RoundRobin;
pub use shortest_queue::JoinShortestQueue;

/// A balancing algorithm. `pick` returns the index of an endpoint that `eligible` accepts, or `None`
/// when there is none. Implementations are built once per cluster (so they can precompute from the
/// weights) and must be lock-free.
pub trait Balance: Send + Sync {
    fn pick(&self, endpoints: &[Arc<Endpoint>], eligible: Eligible) -> Option<usize>;
}

/// Which endpoints a pick may return.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Eligible {
    /// Healthy and not ejected: the normal case.
    Available,
    /// Any endpoint: panic mode, when too few are available for health to mean much.
    All,
}

impl Eligible {
    /// Whether `e` may be picked.
    #[inline]
    pub fn accepts(self, e: &Endpoint) -> bool {
        self == Eligible::All || e.is_available()
    }
}

/// Builds the balancer a cluster's config names, for these endpoints (their weights).
pub fn build(config: &ClusterConfig) -> Box<dyn Balance> {
    let weights: Vec<u32> = config.endpoints.iter().map(|e| e.weight).collect();
    match config.balancer {
        BalancerKind::RoundRobin => Box::new(RoundRobin::new(&weights)),
        BalancerKind::JoinShortestQueue => Box::new(JoinShortestQueue),
        BalancerKind::LeastRequest => Box::new(LeastRequest::new(&weights, config.choice_count)),
    }
}

/// Whether `a`'s load per unit of weight is below `b`'s: `a.in_flight / a.weight < b.in_flight /
/// b.weight`, cross-multiplied so it stays in integers.
#[inline]
fn less_loaded(a: &Endpoint, b: &Endpoint) -> std::cmp::Ordering {
    let la = a.in_flight() as u64 * u64::from(b.weight);
    let lb = b.in_flight() as u64 * u64::from(a.weight);
    la.cmp(&lb)
}

/// One upstream address of a cluster: its connection pool and the load/health state balancers read.
pub struct Endpoint {
    /// `host:port` as written in the config (also the metric label).
    pub address: String,
    /// Relative share of calls.
    pub weight: u32,
    /// The h2c connections to this endpoint (kept across reloads while the address stays).
    pub pool: Arc<Pool>,
    in_flight: AtomicUsize,
    /// The active health checker's verdict.
    healthy: AtomicBool,
    /// Set by passive outlier detection for the length of an ejection.
    ejected: AtomicBool,
    /// Calls in a row that ended in an upstream failure (for outlier detection).
    pub(crate) consecutive_failures: AtomicU32,
    /// How many times the endpoint has been ejected (each ejection lasts longer).
    pub(crate) times_ejected: AtomicU32,
    /// Available endpoints of the cluster, shared by all of them.
    cluster_available: Arc<AtomicUsize>,
    in_flight_gauge: IntGauge,
    healthy_gauge: IntGauge,
    /// `grpcgate_upstream_refused_total` of this endpoint.
    pub refused: IntCounter,
}

impl Endpoint {
    fn new(
        cluster: &ClusterConfig,
        config: &EndpointConfig,
        metrics: &Metrics,
        cluster_available: Arc<AtomicUsize>,
        healthy: bool,
        pool: Option<Arc<Pool>>,
    ) -> Endpoint {
        let healthy_gauge = metrics.healthy(&cluster.name, &config.address);
        healthy_gauge.set(i64::from(healthy));
        if healthy {
            cluster_available.fetch_add(1, Ordering::Relaxed);
        }
        Endpoint {
            address: config.address.clone(),
            weight: config.weight,
            pool: pool.unwrap_or_else(|| {
                Arc::new(Pool::new(
                    &config.address,
                    cluster.connect_timeout,
                    cluster.max_streams_per_connection,
                ))
            }),
            in_flight: AtomicUsize::new(0),
            healthy: AtomicBool::new(healthy),
            ejected: AtomicBool::new(false),
            consecutive_failures: AtomicU32::new(0),
            times_ejected: AtomicU32::new(0),
            cluster_available,
            in_flight_gauge: metrics.in_flight(&cluster.name, &config.address),
            healthy_gauge,
            refused: metrics.refused(&cluster.name, &config.address),
        }
    }

    /// Calls in flight to this endpoint through this proxy.
    #[inline]
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether the active health check considers the endpoint healthy.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Whether the endpoint is currently ejected by outlier detection.
    pub fn is_ejected(&self) -> bool {
        self.ejected.load(Ordering::Relaxed)
    }

    /// Whether balancers may pick this endpoint: healthy and not ejected.
    #[inline]
    pub fn is_available(&self) -> bool {
        self.healthy.load(Ordering::Relaxed) && !self.ejected.load(Ordering::Relaxed)
    }

    /// Records the active health check's verdict; returns whether it changed.
    pub fn set_healthy(&self, healthy: bool) -> bool {
        self.update(|| self.healthy.swap(healthy, Ordering::Relaxed) != healthy)
    }

    /// Ejects or restores the endpoint; returns whether that changed anything.
    pub(crate) fn set_ejected(&self, ejected: bool) -> bool {
        self.update(|| self.ejected.swap(ejected, Ordering::Relaxed) != ejected)
    }

    /// Applies a state change and keeps the cluster's available count and the gauge in step.
    fn update(&self, change: impl FnOnce() -> bool) -> bool {
        let before = self.is_available();
        let changed = change();
        let after = self.is_available();
        if before != after {
            if after {
                self.cluster_available.fetch_add(1, Ordering::Relaxed);
            } else {
                self.cluster_available.fetch_sub(1, Ordering::Relaxed);
            }
            self.healthy_gauge.set(i64::from(after));
        }
        changed
    }

    /// Counts a call as in flight until the returned guard drops, whatever way the call ends.
    pub fn start_call(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.in_flight_gauge.inc();
        InFlight(self.clone())
    }
}

/// Holds one unit of an endpoint's in-flight count; dropping it ends the call.
pub struct InFlight(Arc<Endpoint>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.in_flight_gauge.dec();
    }
}

/// A named set of endpoints and the balancer that chooses among them.
pub struct Cluster {
    pub name: String,
    pub endpoints: Vec<Arc<Endpoint>>,
    balancer: Box<dyn Balance>,
    available: Arc<AtomicUsize>,
    panic_threshold: u32,
    /// What the endpoints' pools were built with; pools are only reused by a reload that keeps them.
    pool_settings: (std::time::Duration, u32),
    /// Passive outlier detection, when configured.
    pub outlier: Option<OutlierDetector>,
    /// `grpcgate_request_duration_seconds{cluster}`.
    pub duration: Histogram,
    /// `max_requests`: the cap and the count of calls in flight to the cluster (shared with the
    /// cluster a reload replaces this one with, so calls in flight across a reload still count).
    requests: Option<RequestLimit>,
}

/// A cluster's cap on calls in flight (`max_requests`).
struct RequestLimit {
    max: usize,
    in_flight: Arc<AtomicUsize>,
    overflows: IntCounter,
}

/// One admitted call under a cluster's `max_requests`; dropping it ends the call.
pub struct Admitted(Option<Arc<AtomicUsize>>);

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some(n) = &self.0 {
            n.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Cluster {
    /// Builds a cluster from its config, registering its metrics. With active health checks,
    /// endpoints start unhealthy unless the config says otherwise.
    pub fn new(config: &ClusterConfig, metrics: &Metrics) -> Cluster {
        Self::reloaded(config, metrics, None)
    }

    /// Builds a cluster that replaces `previous` (a reload): endpoints whose address stays keep their
    /// connections and their health verdict, so a reload neither reconnects nor blips availability.
    pub fn reloaded(
        config: &ClusterConfig,
        metrics: &Metrics,
        previous: Option<&Cluster>,
    ) -> Cluster {
        let available = Arc::new(AtomicUsize::new(0));
        let start_healthy = config.health_check.as_ref().is_none_or(|h| h.start_healthy);
        let endpoints = config
            .endpoints
            .iter()
            .map(|e| {
                let old =
                    previous.and_then(|p| p.endpoints.iter().find(|o| o.address == e.address));
                // Without health checks now, every endpoint is healthy; otherwise keep what was known.
                let healthy = match (old, &config.health_check) {
                    (Some(o), Some(_)) => o.is_healthy(),
                    _ => start_healthy,
                };
                let pool = old
                    .filter(|_| {
                        previous.is_some_and(|p| {
                            p.pool_settings
                                == (config.connect_timeout, config.max_streams_per_connection)
                        })
                    })
                    .map(|o| o.pool.clone());
                Arc::new(Endpoint::new(
                    config,
                    e,
                    metrics,
                    available.clone(),
                    healthy,
                    pool,
                ))
            })
            .collect();
        Cluster {
            name: config.name.clone(),
            endpoints,
            balancer: build(config),
            available,
            panic_threshold: config.panic_threshold,
            outlier: config.outlier_detection.as_ref().map(|o| {
                let addresses: Vec<&str> = config
                    .endpoints
                    .iter()
                    .map(|e| e.address.as_str())
                    .collect();
                OutlierDetector::new(o.clone(), &config.name, &addresses, metrics)
            }),
            pool_settings: (config.connect_timeout, config.max_streams_per_connection),
            duration: metrics.duration(&config.name),
            requests: config.max_requests.map(|max| RequestLimit {
                max: max as usize,
                in_flight: previous
                    .and_then(|p| p.requests.as_ref())
                    .map(|r| r.in_flight.clone())
                    .unwrap_or_default(),
                overflows: metrics.overflows(&config.name),
            }),
        }
    }

    /// Admits one more call under `max_requests`, or None (counted) when the cluster is at it. A
    /// cluster without the cap admits every call at no cost.
    #[inline]
    pub fn admit(&self) -> Option<Admitted> {
        let Some(limit) = &self.requests else {
            return Some(Admitted(None));
        };
        if limit.in_flight.fetch_add(1, Ordering::Relaxed) >= limit.max {
            limit.in_flight.fetch_sub(1, Ordering::Relaxed);
            limit.overflows.inc();
            return None;
        }
        Some(Admitted(Some(limit.in_flight.clone())))
    }

    /// The cluster's `max_requests`, if set.
    pub fn max_requests(&self) -> Option<usize> {
        self.requests.as_ref().map(|r| r.max)
    }

    /// Picks the endpoint for the next call: an available one, or any one in panic mode.
    pub fn pick(&self) -> Option<usize> {
        if self.is_panicking() {
            return self.balancer.pick(&self.endpoints, Eligible::All);
        }
        if self.available.load(Ordering::Relaxed) == 0 {
            return None;
        }
        self.balancer.pick(&self.endpoints, Eligible::Available)
    }

    /// Whether too few endpoints are available (`panic_threshold`), so that every endpoint is picked.
    pub fn is_panicking(&self) -> bool {
        let available = self.available.load(Ordering::Relaxed);
        self.panic_threshold > 0
            && (available as u64) * 100
                < u64::from(self.panic_threshold) * self.endpoints.len() as u64
    }

    /// Whether at least one endpoint is available.
    pub fn has_available(&self) -> bool {
        self.available.load(Ordering::Relaxed) > 0
    }

    /// Tells outlier detection how a call to endpoint `index` ended.
    #[inline]
    pub fn report(&self, index: usize, failed: bool) {
        if let Some(o) = &self.outlier {
            o.record(index, &self.endpoints[index], failed);
        }
    }

    /// How many endpoints are available (healthy and not ejected).
    pub fn available(&self) -> usize {
        self.available.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::Config;

    /// A cluster built from `endpoints = [...]` TOML, with the given balancer.
    pub(crate) fn cluster(balancer: &str, endpoints: &str) -> Cluster {
        let text = format!(
            "[[listeners]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n[[clusters]]\nname = \"c\"\nbalancer = \"{balancer}\"\nendpoints = {endpoints}\n"
        );
        let config = Config::parse(&text, "t.toml", std::path::Path::new(".")).unwrap();
        Cluster::new(&config.clusters[0], &Metrics::new())
    }

    /// Counts picks per endpoint over `n` picks, holding `hold` calls in flight per pick (0 = none).
    pub(crate) fn spread(c: &Cluster, n: usize) -> Vec<usize> {
        let mut counts = vec![0; c.endpoints.len()];
        for _ in 0..n {
            counts[c.pick().unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn unavailable_endpoints_are_never_picked() {
        for b in ["round_robin", "join_shortest_queue", "least_request"] {
            let c = cluster(b, r#"["a:1", "b:1", "c:1"]"#);
            c.endpoints[1].set_healthy(false);
            c.endpoints[2].set_ejected(true);
            assert_eq!(c.available(), 1);
            assert!(spread(&c, 1000)[0] == 1000, "{b}");
            c.endpoints[0].set_healthy(false);
            assert_eq!(c.pick(), None, "{b}");
        }
    }

    #[test]
    fn panic_mode_uses_every_endpoint() {
        let text = "[[listeners]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n[[clusters]]\nname = \"c\"\nendpoints = [\"a:1\", \"b:1\"]\npanic_threshold = 50\n";
        let config = Config::parse(text, "t.toml", std::path::Path::new(".")).unwrap();
        let c = Cluster::new(&config.clusters[0], &Metrics::new());
        c.endpoints[0].set_healthy(false);
        // 1 of 2 available = 50%: not below the threshold, so only the healthy one.
        assert_eq!(spread(&c, 100), vec![0, 100]);
        c.endpoints[1].set_healthy(false);
        assert_eq!(spread(&c, 100), vec![50, 50]);
    }

    #[test]
    fn weights_are_honoured_by_every_balancer() {
        for b in ["round_robin", "join_shortest_queue", "least_request"] {
            let c = cluster(b, r#"["a:1", { address = "b:1", weight = 3 }]"#);
            let counts = spread(&c, 10_000);
            let share = counts[0] as f64 / 10_000.0;
            assert!((share - 0.25).abs() < 0.03, "{b}: {counts:?}");
        }
    }

    #[test]
    fn equal_endpoints_share_evenly() {
        for b in ["round_robin", "join_shortest_queue", "least_request"] {
            let c = cluster(b, r#"["a:1", "b:1"]"#);
            let counts = spread(&c, 10_000);
            let share = counts[0] as f64 / 10_000.0;
            assert!((share - 0.5).abs() < 0.05, "{b}: {counts:?}");
        }
    }

    #[test]
    fn load_aware_balancers_prefer_the_less_loaded() {
        for b in ["join_shortest_queue", "least_request"] {
            let c = cluster(b, r#"["a:1", "b:1"]"#);
            let _held: Vec<_> = (0..10).map(|_| c.endpoints[0].start_call()).collect();
            assert_eq!(spread(&c, 1000), vec![0, 1000], "{b}");
        }
    }

    #[test]
    fn weighted_p2c_always_compares_two_endpoints() {
        // The heavy endpoint is busy: every pick must see the idle light one, even though a weighted
        // draw names the heavy one most of the time.
        let c = cluster(
            "least_request",
            r#"["a:1", { address = "b:1", weight = 3 }]"#,
        );
        let _held: Vec<_> = (0..300).map(|_| c.endpoints[1].start_call()).collect();
        assert_eq!(spread(&c, 10_000), vec![10_000, 0]);
    }

    #[test]
    fn in_flight_guard_never_leaks() {
        let c = cluster("round_robin", r#"["a:1"]"#);
        {
            let _a = c.endpoints[0].start_call();
            let _b = c.endpoints[0].start_call();
            assert_eq!(c.endpoints[0].in_flight(), 2);
        }
        assert_eq!(c.endpoints[0].in_flight(), 0);
    }
}
