//! Passive outlier detection: endpoints whose calls keep failing are ejected for a while. It runs on
//! the call path (every finished call reports to it), so it lives with the balancer.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::Endpoint;
use crate::config::OutlierConfig;

/// The longest an ejection lasts, unless `base_ejection_time` is longer.
const MAX_EJECTION: Duration = Duration::from_secs(300);

/// Passive outlier detection for one cluster: endpoints whose calls keep failing are ejected for a
/// while, never more than `max_ejection_percent` of the cluster at once.
pub struct OutlierDetector {
    config: OutlierConfig,
    cluster: String,
    total: usize,
    /// Ejected endpoints now; shared with the detector of the snapshot this one replaces, so an
    /// ejection made before a change of the endpoint set still counts against the cap.
    ejected: Arc<AtomicUsize>,
}

impl OutlierDetector {
    /// A detector for a cluster snapshot of `total` endpoints, carrying over `previous`'s count of
    /// ejected endpoints.
    pub fn new(
        config: OutlierConfig,
        cluster: &str,
        total: usize,
        previous: Option<&OutlierDetector>,
    ) -> OutlierDetector {
        OutlierDetector {
            config,
            cluster: cluster.to_string(),
            total,
            ejected: previous.map(|p| p.ejected.clone()).unwrap_or_default(),
        }
    }

    /// Records how a call to endpoint `index` ended: `failed` for UNAVAILABLE or a connect/reset failure.
    pub fn record(&self, endpoint: &Arc<Endpoint>, failed: bool) {
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
        endpoint.ejections.inc();
        tracing::warn!(cluster = %self.cluster, endpoint = %endpoint.address, failures = n, ejection_ms = duration.as_millis() as u64, "endpoint ejected");
        // The timer holds the endpoint weakly: one that leaves its cluster while ejected is dropped
        // (and its pooled connections closed) when its last call ends, not when the ejection would.
        let endpoint = Arc::downgrade(endpoint);
        let ejected = self.ejected.clone();
        let cluster = self.cluster.clone();
        tokio::spawn(async move {
            tokio::time::sleep(duration).await;
            ejected.fetch_sub(1, Ordering::AcqRel);
            let Some(endpoint) = endpoint.upgrade() else {
                return;
            };
            endpoint.consecutive_failures.store(0, Ordering::Relaxed);
            endpoint.set_ejected(false);
            tracing::info!(%cluster, endpoint = %endpoint.address, "endpoint returned from ejection");
        });
    }
}

#[cfg(test)]
mod tests {
    use super::super::Cluster;
    use super::*;
    use crate::metrics::Metrics;

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

    /// An endpoint that leaves its cluster while ejected is freed (its pool with it) as soon as no
    /// snapshot and no call holds it, not when the ejection timer ends.
    #[tokio::test(start_paused = true)]
    async fn removed_ejected_endpoint_is_not_kept_by_its_timer() {
        let text = "[[listeners]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n[[clusters]]\nname = \"c\"\n\
                    endpoints = [\"a:1\", \"b:1\"]\n[clusters.outlier_detection]\n\
                    consecutive_failures = 1\nbase_ejection_time = \"60s\"\nmax_ejection_percent = 50\n";
        let config = crate::Config::parse(text, "t.toml", std::path::Path::new(".")).unwrap();
        let metrics = Metrics::new();
        let cluster = Cluster::new(&config.clusters[0], &metrics);
        cluster.report(0, true);
        assert!(cluster.endpoints[0].is_ejected());
        let a = Arc::downgrade(&cluster.endpoints[0]);
        let pool = Arc::downgrade(&cluster.endpoints[0].pool);
        let only_b = vec![config.clusters[0].endpoints[1].clone()];
        let (next, changes) =
            Cluster::build(&config.clusters[0], &only_b, &metrics, Some(&cluster));
        assert_eq!(changes.removed.len(), 1);
        drop((changes, cluster));
        tokio::task::yield_now().await;
        assert!(
            a.upgrade().is_none(),
            "the ejection timer keeps the endpoint alive"
        );
        assert!(
            pool.upgrade().is_none(),
            "the ejection timer keeps the pool alive"
        );
        // The timer still frees its slot under max_ejection_percent when it ends.
        tokio::time::sleep(Duration::from_secs(61)).await;
        next.report(0, true);
        assert!(
            next.endpoints[0].is_ejected(),
            "b may be ejected once a's slot is free"
        );
    }
}
