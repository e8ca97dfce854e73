//! Which endpoint of a cluster gets the next call.
//!
//! A [`Cluster`] is an immutable snapshot: its endpoints and balancer are built once from the config.
//! Per-endpoint state that changes per request (in-flight count, health) lives in atomics on the
//! [`Endpoint`], so a pick reads a slice and a few atomics and takes no lock.

mod least_request;
mod round_robin;
mod shortest_queue;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus::{Histogram, IntGauge};

use crate::config::{BalancerKind, ClusterConfig};
use crate::metrics::Metrics;
use crate::upstream::Pool;

pub use least_request::LeastRequest;
pub use round_robin::RoundRobin;
pub use shortest_queue::JoinShortestQueue;

/// A balancing algorithm: picks the index of a healthy endpoint, or `None` when none is healthy.
pub trait Balance: Send + Sync {
    fn pick(&self, endpoints: &[Arc<Endpoint>]) -> Option<usize>;
}

/// Builds the balancer a config names.
pub fn build(kind: BalancerKind) -> Box<dyn Balance> {
    match kind {
        BalancerKind::RoundRobin => Box::new(RoundRobin::default()),
        BalancerKind::JoinShortestQueue => Box::new(JoinShortestQueue::default()),
        BalancerKind::LeastRequest => Box::new(LeastRequest::new(2)),
    }
}

/// One upstream address of a cluster: its connection pool and the load/health state balancers read.
pub struct Endpoint {
    /// `host:port` as written in the config (also the metric label).
    pub address: String,
    /// The h2c connections to this endpoint.
    pub pool: Pool,
    in_flight: AtomicUsize,
    healthy: AtomicBool,
    in_flight_gauge: IntGauge,
    healthy_gauge: IntGauge,
}

impl Endpoint {
    /// Creates an endpoint that starts healthy.
    pub fn new(cluster: &ClusterConfig, address: &str, metrics: &Metrics) -> Endpoint {
        let healthy_gauge = metrics.healthy(&cluster.name, address);
        healthy_gauge.set(1);
        Endpoint {
            address: address.to_string(),
            pool: Pool::new(address, cluster.connect_timeout),
            in_flight: AtomicUsize::new(0),
            healthy: AtomicBool::new(true),
            in_flight_gauge: metrics.in_flight(&cluster.name, address),
            healthy_gauge,
        }
    }

    /// Calls in flight to this endpoint through this proxy.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether balancers may pick this endpoint.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Marks the endpoint healthy or not; returns whether that changed anything.
    pub fn set_healthy(&self, healthy: bool) -> bool {
        self.healthy_gauge.set(i64::from(healthy));
        self.healthy.swap(healthy, Ordering::Relaxed) != healthy
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
    /// `grpcgate_request_duration_seconds{cluster}`.
    pub duration: Histogram,
}

impl Cluster {
    /// Builds a cluster from its config, registering its metrics.
    pub fn new(config: &ClusterConfig, metrics: &Metrics) -> Cluster {
        Cluster {
            name: config.name.clone(),
            endpoints: config
                .endpoints
                .iter()
                .map(|a| Arc::new(Endpoint::new(config, a, metrics)))
                .collect(),
            balancer: build(config.balancer),
            duration: metrics.duration(&config.name),
        }
    }

    /// Picks the endpoint for the next call.
    pub fn pick(&self) -> Option<usize> {
        self.balancer.pick(&self.endpoints)
    }

    /// Whether at least one endpoint is healthy.
    pub fn has_healthy(&self) -> bool {
        self.endpoints.iter().any(|e| e.is_healthy())
    }
}
