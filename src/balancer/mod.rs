//! Which endpoint of a cluster gets the next call.
//!
//! A [`Cluster`] is an immutable snapshot: its endpoint list and balancer are built once per change of
//! the endpoint set (a reload, a DNS answer, a slow-start step) and swapped in whole. An [`Endpoint`] is
//! identified by its address and outlives snapshots: one that stays in the set is the same object in the
//! next snapshot, with its connections, health verdict, ejection, counters and in-flight calls. State that
//! changes per request lives in atomics on it, so a pick reads a slice and a few atomics and takes no
//! lock.

mod least_request;
mod outlier;
mod peak_ewma;
mod round_robin;
mod shortest_queue;
mod weighted_round_robin;

pub use outlier::OutlierDetector;
pub use peak_ewma::{Latency, PeakEwma};
pub use weighted_round_robin::{
    LoadReport, ReportedWeight, WeightedRoundRobin, LOAD_REPORT_BIN, LOAD_REPORT_TEXT,
};

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use prometheus::{Histogram, IntCounter, IntGauge};

use crate::config::{BalancerKind, ClusterConfig, EndpointConfig};
use crate::metrics::Metrics;
use crate::upstream::{Keepalive, Pool};

pub use least_request::LeastRequest;
pub use round_robin::RoundRobin;
pub use shortest_queue::JoinShortestQueue;

/// A balancing algorithm. `pick` returns the index of an endpoint that `eligible` accepts, or `None`
/// when there is none. Implementations are built once per cluster (so they can precompute from the
/// weights) and must be lock-free.
pub trait Balance: Send + Sync {
    fn pick(&self, endpoints: &[Arc<Endpoint>], eligible: Eligible) -> Option<usize>;

    /// Recomputes what the balancer derives from the endpoints' reported state (the control plane
    /// calls it every `weight_update_period`; most balancers derive nothing).
    fn refresh(&self, _endpoints: &[Arc<Endpoint>], _now: Instant) {}

    /// Endpoint indices in the order a rotation will reach them, each once, so that a balancer
    /// built for a new snapshot can go on from the same place; empty for balancers without one.
    fn upcoming(&self) -> Vec<usize> {
        Vec::new()
    }

    /// The relative weights the balancer picks by, when it computes its own
    /// (`weighted_round_robin`'s, from load reports); None for the others.
    fn computed_weights(&self) -> Option<Vec<u32>> {
        None
    }
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

/// Builds the balancer a cluster's config names, for these endpoints (their current weights);
/// a rotation starts at `resume` (an index into `endpoints`) when given.
pub fn build(
    config: &ClusterConfig,
    endpoints: &[Arc<Endpoint>],
    resume: Option<usize>,
) -> Box<dyn Balance> {
    let weights: Vec<u32> = endpoints.iter().map(|e| e.weight()).collect();
    match config.balancer {
        BalancerKind::RoundRobin => Box::new(RoundRobin::starting_at(&weights, resume)),
        BalancerKind::JoinShortestQueue => Box::new(JoinShortestQueue),
        BalancerKind::LeastRequest => Box::new(LeastRequest::new(&weights, config.choice_count)),
        BalancerKind::PeakEwma => Box::new(PeakEwma::new(&weights)),
        BalancerKind::WeightedRoundRobin => {
            Box::new(WeightedRoundRobin::new(config.orca, &weights, resume))
        }
    }
}

/// Whether `a`'s load per unit of weight is below `b`'s: `a.in_flight / a.weight < b.in_flight /
/// b.weight`, cross-multiplied so it stays in integers.
#[inline]
fn less_loaded(a: &Endpoint, b: &Endpoint) -> std::cmp::Ordering {
    let la = a.in_flight() as u64 * u64::from(b.weight());
    let lb = b.in_flight() as u64 * u64::from(a.weight());
    la.cmp(&lb)
}

/// A weight of 1 in the config is this many units inside: slow start ramps from 10 % of it.
const WEIGHT_UNIT: u32 = 100;

/// One upstream address of a cluster: its connection pool and the load/health state balancers read.
pub struct Endpoint {
    /// `host:port` as written in the config, or `ip:port` from DNS (also the metric label).
    pub address: String,
    /// The weight balancers use, in hundredths of the configured weight: the configured weight, or a
    /// share of it while the endpoint is in slow start. Set when a snapshot is built.
    weight: AtomicU32,
    /// When slow start began for this endpoint (it joined a running cluster), if it applies.
    ramp_start: Option<Instant>,
    /// The h2c connections to this endpoint (kept while the endpoint stays in its cluster).
    pub pool: Arc<Pool>,
    in_flight: AtomicUsize,
    /// The active health checker's verdict.
    healthy: AtomicBool,
    /// Set by passive outlier detection for the length of an ejection.
    ejected: AtomicBool,
    /// Set when the endpoint left its cluster: its state no longer counts towards the cluster's.
    retired: AtomicBool,
    /// Serialises health, ejection and retirement changes so the available count stays exact.
    transitions: Mutex<()>,
    /// Calls in a row that ended in an upstream failure (for outlier detection).
    pub(crate) consecutive_failures: AtomicU32,
    /// How many times the endpoint has been ejected (each ejection lasts longer).
    pub(crate) times_ejected: AtomicU32,
    /// Available endpoints of the cluster, shared by all of them (and by every snapshot).
    cluster_available: Arc<AtomicUsize>,
    in_flight_gauge: IntGauge,
    healthy_gauge: IntGauge,
    /// `grpcgate_upstream_refused_total` of this endpoint.
    pub refused: IntCounter,
    /// `grpcgate_outlier_ejections_total` of this endpoint.
    pub(crate) ejections: IntCounter,
    /// Response latency, for `peak_ewma` (fed only by clusters that use it).
    pub latency: Latency,
    /// The weight from the backend's load reports, for `weighted_round_robin`.
    pub reported: ReportedWeight,
    /// What to do with load-report trailers of this endpoint's responses: `REPORTS_*` bits, set
    /// with each snapshot.
    report_handling: std::sync::atomic::AtomicU8,
}

/// Load-report trailers are removed before the response reaches the client.
const REPORTS_STRIP: u8 = 1;
/// Load reports are recorded (the balancer uses them).
const REPORTS_RECORD: u8 = 2;

impl Endpoint {
    fn new(
        cluster: &ClusterConfig,
        config: &EndpointConfig,
        metrics: &Metrics,
        cluster_available: Arc<AtomicUsize>,
        healthy: bool,
        ramp_start: Option<Instant>,
    ) -> Endpoint {
        let healthy_gauge = metrics.healthy(&cluster.name, &config.address);
        healthy_gauge.set(i64::from(healthy));
        if healthy {
            cluster_available.fetch_add(1, Ordering::Relaxed);
        }
        Endpoint {
            address: config.address.clone(),
            weight: AtomicU32::new(config.weight * WEIGHT_UNIT),
            ramp_start,
            pool: Arc::new(Pool::new(
                &config.address,
                cluster.connect_timeout,
                cluster.max_streams_per_connection,
                cluster.keepalive,
            )),
            in_flight: AtomicUsize::new(0),
            healthy: AtomicBool::new(healthy),
            ejected: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            transitions: Mutex::new(()),
            consecutive_failures: AtomicU32::new(0),
            times_ejected: AtomicU32::new(0),
            cluster_available,
            in_flight_gauge: metrics.in_flight(&cluster.name, &config.address),
            healthy_gauge,
            refused: metrics.refused(&cluster.name, &config.address),
            ejections: metrics.ejections(&cluster.name, &config.address),
            latency: Latency::default(),
            reported: ReportedWeight::default(),
            report_handling: std::sync::atomic::AtomicU8::new(REPORTS_STRIP),
        }
    }

    /// The weight balancers use now (hundredths of the configured weight; see `weight`).
    #[inline]
    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    /// Sets the weight for the next snapshot: `configured` (1..=1000) scaled by slow start at `now`.
    /// Returns whether the endpoint is still ramping up.
    fn set_weight(&self, configured: u32, slow_start: Option<Duration>, now: Instant) -> bool {
        let full = configured * WEIGHT_UNIT;
        let (weight, ramping) = match (self.ramp_start, slow_start) {
            (Some(start), Some(window)) if now < start + window => {
                // Linear from 10 % to 100 % over the window (Envoy's slow start, aggression 1).
                let progress = (now - start).as_secs_f64() / window.as_secs_f64();
                let share = 0.1 + 0.9 * progress;
                (((f64::from(full) * share) as u32).max(1), true)
            }
            _ => (full, false),
        };
        self.weight.store(weight, Ordering::Relaxed);
        ramping
    }

    /// Handles the load report in a response's trailers (or trailers-only head) from this endpoint:
    /// recorded when the balancer uses it, removed unless the cluster forwards them. One flag load
    /// when the cluster does neither.
    #[inline]
    pub fn take_load_report(&self, trailers: &mut http::HeaderMap) {
        let handling = self.report_handling.load(Ordering::Relaxed);
        if handling == 0 {
            return;
        }
        if handling & REPORTS_RECORD != 0 {
            if let Some(report) = LoadReport::from_headers(trailers) {
                self.reported.record(&report, Instant::now());
            }
        }
        if handling & REPORTS_STRIP != 0 {
            trailers.remove(LOAD_REPORT_BIN);
            trailers.remove(LOAD_REPORT_TEXT);
        }
    }

    /// Takes the endpoint out of its cluster's accounting: it gets no more calls (it is in no new
    /// snapshot), its gauges are dropped by the caller, and later health or ejection changes (a
    /// checker or ejection timer finishing) no longer touch the cluster's available count.
    fn retire(&self) {
        let _t = self.transitions.lock();
        if !self.retired.swap(true, Ordering::Relaxed) && self.is_available() {
            self.cluster_available.fetch_sub(1, Ordering::Relaxed);
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
        let _t = self.transitions.lock();
        let before = self.is_available();
        let changed = change();
        let after = self.is_available();
        if before != after && !self.retired.load(Ordering::Relaxed) {
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
    /// The balancer's name in the config (for `/clusters`).
    pub balancer_kind: BalancerKind,
    /// Whether the endpoints come from DNS (for `/clusters`).
    pub from_dns: bool,
    /// Whether the balancer ranks endpoints by latency, so calls must report theirs.
    pub tracks_latency: bool,
    balancer: Box<dyn Balance>,
    available: Arc<AtomicUsize>,
    panic_threshold: u32,
    /// What the endpoints' pools were built with; pools are only reused by a reload that keeps them.
    pool_settings: (std::time::Duration, u32, Keepalive),
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

/// What building a cluster snapshot changed: the endpoints that joined (they need health checkers)
/// and those that left (their checkers stop, their gauges go).
pub struct Changes {
    pub added: Vec<Arc<Endpoint>>,
    pub removed: Vec<Arc<Endpoint>>,
    /// Whether an endpoint is still in slow start: the snapshot should be built again soon, with
    /// the weights of the next step.
    pub ramping: bool,
}

impl Cluster {
    /// Builds a cluster from its config and static endpoints, registering its metrics. With active
    /// health checks, endpoints start unhealthy unless the config says otherwise.
    pub fn new(config: &ClusterConfig, metrics: &Metrics) -> Cluster {
        Self::build(config, &config.endpoints, metrics, None).0
    }

    /// Builds the snapshot of a cluster with these endpoints, replacing `previous` (if any), in the
    /// manner of pingora's `Backends::do_update`: an endpoint whose address stays is carried over
    /// as the same object (connections, health, ejection, counters, in-flight calls); new addresses
    /// get new endpoints (unhealthy until checked, unless `start_healthy`), ramped up by slow start
    /// when they join a cluster that had endpoints; endpoints that left are retired. A change of the
    /// connect settings builds every endpoint anew, since their pools depend on them.
    pub fn build(
        config: &ClusterConfig,
        endpoints: &[EndpointConfig],
        metrics: &Metrics,
        previous: Option<&Cluster>,
    ) -> (Cluster, Changes) {
        let now = Instant::now();
        let pool_settings = (
            config.connect_timeout,
            config.max_streams_per_connection,
            config.keepalive,
        );
        let reusable = previous.filter(|p| p.pool_settings == pool_settings);
        let available = previous.map(|p| p.available.clone()).unwrap_or_default();
        let start_healthy = config.health_check.as_ref().is_none_or(|h| h.start_healthy);
        // Slow start applies to endpoints joining a cluster that kept some: at start-up, or when
        // every endpoint is new, there is nobody to shield them from.
        let keeps_some = reusable.is_some_and(|p| {
            p.endpoints
                .iter()
                .any(|o| endpoints.iter().any(|e| e.address == o.address))
        });
        let mut changes = Changes {
            added: Vec::new(),
            removed: Vec::new(),
            ramping: false,
        };
        let list: Vec<Arc<Endpoint>> = endpoints
            .iter()
            .map(|e| {
                let old =
                    reusable.and_then(|p| p.endpoints.iter().find(|o| o.address == e.address));
                let endpoint = match old {
                    Some(o) => {
                        if config.health_check.is_none() {
                            // Without health checks every endpoint counts as healthy.
                            o.set_healthy(true);
                        }
                        o.clone()
                    }
                    None => {
                        let ramp = (keeps_some && config.slow_start.is_some()).then_some(now);
                        let new = Arc::new(Endpoint::new(
                            config,
                            e,
                            metrics,
                            available.clone(),
                            start_healthy,
                            ramp,
                        ));
                        changes.added.push(new.clone());
                        new
                    }
                };
                changes.ramping |= endpoint.set_weight(e.weight, config.slow_start, now);
                let handling = if config.forward_load_reports {
                    0
                } else {
                    REPORTS_STRIP
                } | if config.balancer == BalancerKind::WeightedRoundRobin {
                    REPORTS_RECORD
                } else {
                    0
                };
                endpoint.report_handling.store(handling, Ordering::Relaxed);
                endpoint
            })
            .collect();
        if let Some(p) = previous {
            for o in &p.endpoints {
                if !list.iter().any(|e| Arc::ptr_eq(e, o)) {
                    o.retire();
                    changes.removed.push(o.clone());
                }
            }
        }
        // The balancer's place: the first endpoint the old rotation would reach that is still here.
        let resume = previous.and_then(|p| {
            p.balancer.upcoming().into_iter().find_map(|i| {
                let address = &p.endpoints.get(i)?.address;
                list.iter().position(|e| &e.address == address)
            })
        });
        let cluster = Cluster {
            name: config.name.clone(),
            balancer_kind: config.balancer,
            from_dns: config.source != crate::config::EndpointSource::Static,
            tracks_latency: config.balancer == BalancerKind::PeakEwma,
            balancer: build(config, &list, resume),
            endpoints: list,
            available,
            panic_threshold: config.panic_threshold,
            outlier: config.outlier_detection.as_ref().map(|o| {
                OutlierDetector::new(
                    o.clone(),
                    &config.name,
                    endpoints.len(),
                    previous.and_then(|p| p.outlier.as_ref()),
                )
            }),
            pool_settings,
            duration: metrics.duration(&config.name),
            requests: config.max_requests.map(|max| RequestLimit {
                max: max as usize,
                in_flight: previous
                    .and_then(|p| p.requests.as_ref())
                    .map(|r| r.in_flight.clone())
                    .unwrap_or_default(),
                overflows: metrics.overflows(&config.name),
            }),
        };
        // Carry reported weights (kept on the endpoints) into the new schedule at once.
        cluster.balancer.refresh(&cluster.endpoints, now);
        (cluster, changes)
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

    /// Each endpoint's share of the picks by the weights the balancer computes itself
    /// (`weighted_round_robin`), in endpoint order; None for balancers that compute none.
    pub fn computed_shares(&self) -> Option<Vec<f64>> {
        let weights = self.balancer.computed_weights()?;
        let sum: f64 = weights.iter().map(|&w| f64::from(w)).sum();
        (sum > 0.0).then(|| weights.iter().map(|&w| f64::from(w) / sum).collect())
    }

    /// Recomputes balancer state derived from reports (`weighted_round_robin`'s schedule).
    pub fn refresh_weights(&self) {
        self.balancer.refresh(&self.endpoints, Instant::now());
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
            o.record(&self.endpoints[index], failed);
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
        Cluster::new(&cluster_config(balancer, endpoints), &Metrics::new())
    }

    /// The config of cluster `c` with this balancer and `endpoints` (a TOML array).
    pub(crate) fn cluster_config(balancer: &str, endpoints: &str) -> ClusterConfig {
        let text = format!(
            "[[listeners]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n[[clusters]]\nname = \"c\"\nbalancer = \"{balancer}\"\nendpoints = {endpoints}\n"
        );
        let config = Config::parse(&text, "t.toml", std::path::Path::new(".")).unwrap();
        config.clusters.into_iter().next().unwrap()
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
        for b in [
            "round_robin",
            "join_shortest_queue",
            "least_request",
            "peak_ewma",
            "weighted_round_robin",
        ] {
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
