//! What the data plane reads and the control plane swaps: the current clusters, the metrics and
//! whether the proxy is draining. The gateway (control plane) owns it; routers, the proxy's own health
//! answer and the admin server read it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use crate::access_log;
use crate::balancer::Cluster;
use crate::metrics::Metrics;

/// State shared by the listeners, the admin server and reloads.
pub struct Shared {
    pub metrics: Arc<Metrics>,
    /// The current clusters, in config order; a reload swaps the whole list.
    pub(crate) clusters: ArcSwap<Vec<Arc<Cluster>>>,
    /// Set once shutdown begins: `/ready` answers 503 from then on.
    pub draining: AtomicBool,
    /// The access log's queue, if `[access_log]` is on: routers take a handle when built, so the
    /// call path reads it from its router, never from here.
    pub access_log: Mutex<Option<access_log::Sender>>,
}

impl Shared {
    /// The current cluster with this name.
    pub fn cluster(&self, name: &str) -> Option<Arc<Cluster>> {
        self.clusters
            .load()
            .iter()
            .find(|c| c.name == name)
            .cloned()
    }

    /// The current clusters, in config order.
    pub fn clusters(&self) -> Arc<Vec<Arc<Cluster>>> {
        self.clusters.load_full()
    }

    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}
