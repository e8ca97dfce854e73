//! Wires a validated [`Config`] into running listeners, clusters and the admin server, and drains them
//! on shutdown.

use std::net::SocketAddr;

use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin;
use crate::balancer::Cluster;
use crate::config::{Config, ListenerConfig};
use crate::health;
use crate::listener::{Listener, ListenerReload};
use crate::metrics::Metrics;
use crate::router::Router;
use crate::state::Shared;
use crate::worker::Workers;

/// A running listener, as the gateway keeps track of it.
struct RunningListener {
    config: ListenerConfig,
    addr: SocketAddr,
    reload: ListenerReload,
}

/// A running proxy: every listener accepting, the admin server answering.
pub struct Gateway {
    shared: Arc<Shared>,
    listeners: Mutex<Vec<RunningListener>>,
    admin_addr: Option<SocketAddr>,
    admin_config: Option<SocketAddr>,
    shutdown: CancellationToken,
    /// Stops what must outlive the drain: the admin server and the health checkers.
    admin_shutdown: CancellationToken,
    /// Stops the current generation of health checkers (replaced on reload).
    health_checks: Mutex<CancellationToken>,
    connections: TaskTracker,
    /// The data-plane threads; dropped (stopped) with the gateway, after the drain.
    workers: Arc<Workers>,
    workers_config: (u32, bool),
}

impl Gateway {
    /// Binds every listener and the admin port and starts serving. Fails if an address cannot be bound.
    pub async fn start(config: Config) -> anyhow::Result<Gateway> {
        // Threads first: if they cannot start, nothing else has been started to leak.
        let workers = Arc::new(Workers::start(config.workers as usize, config.busy_poll)?);
        tracing::info!(
            workers = workers.len(),
            busy_poll = config.busy_poll,
            "data-plane workers started"
        );
        let metrics = Metrics::new();
        let clusters: Vec<Arc<Cluster>> = config
            .clusters
            .iter()
            .map(|c| Arc::new(Cluster::new(c, &metrics)))
            .collect();
        let shared = Arc::new(Shared {
            metrics: metrics.clone(),
            clusters: ArcSwap::from_pointee(clusters),
            draining: AtomicBool::new(false),
        });
        let shutdown = CancellationToken::new();
        let admin_shutdown = CancellationToken::new();
        let connections = TaskTracker::new();

        let mut bound = Vec::new();
        for l in &config.listeners {
            let router = Router::new(l, &shared);
            bound.push(Listener::bind(l, router, metrics.downstream_connections(&l.name)).await?);
        }
        let admin_addr = match &config.admin {
            Some(a) => Some(admin::spawn(a.listen, shared.clone(), admin_shutdown.clone()).await?),
            None => None,
        };
        // Health checks start once every address is bound, so a failed start leaves none running.
        let health_checks = admin_shutdown.child_token();
        spawn_health_checks(&shared, &config, &health_checks);
        let mut listeners = Vec::new();
        for (l, c) in bound.into_iter().zip(&config.listeners) {
            tracing::info!(listener = %l.name, addr = %l.local_addr, tls = c.tls.is_some(), "listening");
            listeners.push(RunningListener {
                config: c.clone(),
                addr: l.local_addr,
                reload: l.reloader(),
            });
            workers.spawn(l.serve(workers.spawner(), shutdown.clone(), connections.clone()));
        }
        Ok(Gateway {
            shared,
            listeners: Mutex::new(listeners),
            admin_addr,
            admin_config: config.admin.as_ref().map(|a| a.listen),
            shutdown,
            admin_shutdown,
            health_checks: Mutex::new(health_checks),
            connections,
            workers,
            workers_config: (config.workers, config.busy_poll),
        })
    }

    /// Applies a new, already validated config without dropping a connection: routes, clusters,
    /// balancers, health checks and TLS certificates change; calls in flight finish on the old ones.
    /// Endpoints that stay keep their connections and health. Listener and admin addresses cannot
    /// change this way (that needs a restart); such a config is refused and the running one stays.
    pub fn reload(&self, config: Config) -> Result<(), String> {
        let result = self.try_reload(&config);
        self.shared.metrics.config_reload(result.is_ok());
        match &result {
            Ok(()) => tracing::info!(file = %config.origin, "config reloaded"),
            Err(e) => {
                tracing::error!(file = %config.origin, error = %e, "config reload refused; keeping the running config")
            }
        }
        result
    }

    fn try_reload(&self, config: &Config) -> Result<(), String> {
        let mut listeners = self.listeners.lock();
        let old: Vec<_> = listeners
            .iter()
            .map(|l| (l.config.name.as_str(), l.config.listen))
            .collect();
        let new: Vec<_> = config
            .listeners
            .iter()
            .map(|l| (l.name.as_str(), l.listen))
            .collect();
        if old != new {
            return Err(format!(
                "listeners changed (running: {old:?}, new: {new:?}); adding, removing or moving a listener needs a restart"
            ));
        }
        if self.admin_config != config.admin.as_ref().map(|a| a.listen) {
            return Err("the admin address changed; that needs a restart".into());
        }
        if self.workers_config.0 != config.workers {
            return Err("workers changed; that needs a restart".into());
        }
        if self.workers_config.1 != config.busy_poll {
            return Err("busy_poll changed; that needs a restart".into());
        }
        let previous = self.shared.clusters();
        let clusters: Vec<Arc<Cluster>> = config
            .clusters
            .iter()
            .map(|c| {
                let old = previous.iter().find(|p| p.name == c.name);
                Arc::new(Cluster::reloaded(
                    c,
                    &self.shared.metrics,
                    old.map(|o| &**o),
                ))
            })
            .collect();
        // Check everything that can fail before changing anything, so a reload is all or nothing.
        let tls: Vec<_> = config
            .listeners
            .iter()
            .map(|l| match &l.tls {
                Some(t) => crate::tls::server_tls_config(t)
                    .map(Some)
                    .map_err(|e| format!("listener \"{}\": {e}", l.name)),
                None => Ok(None),
            })
            .collect::<Result<_, _>>()?;
        for old in previous.iter() {
            let kept = config.clusters.iter().find(|c| c.name == old.name);
            for e in &old.endpoints {
                if !kept.is_some_and(|c| c.endpoints.iter().any(|n| n.address == e.address)) {
                    self.shared.metrics.forget_endpoint(&old.name, &e.address);
                }
            }
        }
        self.shared.clusters.store(Arc::new(clusters));
        for ((running, l), tls) in listeners.iter_mut().zip(&config.listeners).zip(tls) {
            running.reload.apply(l, Router::new(l, &self.shared), tls);
            running.config = l.clone();
        }
        let mut health = self.health_checks.lock();
        health.cancel();
        *health = self.admin_shutdown.child_token();
        spawn_health_checks(&self.shared, config, &health);
        Ok(())
    }

    /// How many data-plane worker threads run.
    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// The bound address of a listener (useful with port 0).
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .lock()
            .iter()
            .find(|l| l.config.name == name)
            .map(|l| l.addr)
    }

    /// The bound address of the admin server, if one is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The gateway's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    /// The current clusters, in config order.
    pub fn clusters(&self) -> Arc<Vec<Arc<Cluster>>> {
        self.shared.clusters()
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

/// Starts the active health checks of every cluster that has them, stopped by `token`.
fn spawn_health_checks(shared: &Shared, config: &Config, token: &CancellationToken) {
    for (cluster, c) in shared.clusters().iter().zip(&config.clusters) {
        if let Some(hc) = &c.health_check {
            health::spawn_active_checks(cluster, hc, &shared.metrics, token);
        }
    }
}
