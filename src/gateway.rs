//! Wires a validated [`Config`] into running listeners, clusters and the admin server, and drains them
//! on shutdown.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin;
use crate::balancer::Cluster;
use crate::config::Config;
use crate::health;
use crate::listener::Listener;
use crate::metrics::Metrics;
use crate::router::Router;

/// State the admin server reads.
pub struct Shared {
    pub metrics: Arc<Metrics>,
    pub clusters: Vec<Arc<Cluster>>,
    /// Set once shutdown begins: `/ready` answers 503 from then on.
    pub draining: AtomicBool,
}

impl Shared {
    /// The cluster with this name.
    pub fn cluster(&self, name: &str) -> Option<&Arc<Cluster>> {
        self.clusters.iter().find(|c| c.name == name)
    }

    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// A running proxy: every listener accepting, the admin server answering.
pub struct Gateway {
    shared: Arc<Shared>,
    listeners: Vec<(String, SocketAddr)>,
    admin_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    /// Stops what must outlive the drain: the admin server and the health checkers.
    admin_shutdown: CancellationToken,
    connections: TaskTracker,
}

impl Gateway {
    /// Binds every listener and the admin port and starts serving. Fails if an address cannot be bound.
    pub async fn start(config: Config) -> anyhow::Result<Gateway> {
        let metrics = Metrics::new();
        let shared = Arc::new(Shared {
            metrics: metrics.clone(),
            clusters: config
                .clusters
                .iter()
                .map(|c| Arc::new(Cluster::new(c, &metrics)))
                .collect(),
            draining: AtomicBool::new(false),
        });
        let shutdown = CancellationToken::new();
        let admin_shutdown = CancellationToken::new();
        let connections = TaskTracker::new();
        for (cluster, c) in shared.clusters.iter().zip(&config.clusters) {
            if let Some(hc) = &c.health_check {
                health::spawn_active_checks(cluster, hc, &metrics, &admin_shutdown);
            }
        }

        let mut bound = Vec::new();
        for l in &config.listeners {
            let router = Arc::new(ArcSwap::from_pointee(Router::new(l, &shared)));
            let listener =
                Listener::bind(l, router, metrics.downstream_connections(&l.name)).await?;
            bound.push(listener);
        }
        let admin_addr = match &config.admin {
            Some(a) => Some(admin::spawn(a.listen, shared.clone(), admin_shutdown.clone()).await?),
            None => None,
        };
        let mut listeners = Vec::new();
        for l in bound {
            tracing::info!(listener = %l.name, addr = %l.local_addr, tls = config.listeners.iter().any(|c| c.name == l.name && c.tls.is_some()), "listening");
            listeners.push((l.name.clone(), l.local_addr));
            tokio::spawn(l.serve(shutdown.clone(), connections.clone()));
        }
        Ok(Gateway {
            shared,
            listeners,
            admin_addr,
            shutdown,
            admin_shutdown,
            connections,
        })
    }

    /// The bound address of a listener (useful with port 0).
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| a.to_owned())
    }

    /// The bound address of the admin server, if one is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The gateway's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    /// The clusters, in config order.
    pub fn clusters(&self) -> &[Arc<Cluster>] {
        &self.shared.clusters
    }

    /// Graceful shutdown: `/ready` turns 503, listeners stop accepting, every client connection gets
    /// GOAWAY, and in-flight calls may finish for up to `drain_timeout`. Returns whether everything
    /// finished in time.
    pub async fn shutdown(self, drain_timeout: Duration) -> bool {
        self.shared.draining.store(true, Ordering::Relaxed);
        self.shutdown.cancel();
        self.connections.close();
        let drained = tokio::time::timeout(drain_timeout, self.connections.wait())
            .await
            .is_ok();
        if !drained {
            tracing::warn!(
                timeout_ms = drain_timeout.as_millis() as u64,
                "drain timeout reached with calls still in flight"
            );
        }
        self.admin_shutdown.cancel();
        drained
    }
}
