//! The control plane: wires a validated [`Config`] into running listeners, clusters, health checks,
//! DNS discovery and the admin server; applies every change of an endpoint set (a reload, a DNS
//! answer, a slow-start step) through one path; drains on shutdown.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use hickory_resolver::TokioResolver;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access_log::{self, AccessLog};
use crate::admin;
use crate::balancer::{Changes, Cluster};
use crate::config::{
    AccessLogConfig, AccessLogTarget, ClusterConfig, Config, DnsConfig, EndpointConfig,
    EndpointSource, ListenerConfig,
};
use crate::discovery::{self, DnsTask};
use crate::health;
use crate::listener::{Listener, ListenerReload};
use crate::load;
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
    control: Arc<Control>,
    admin_addr: Option<SocketAddr>,
    admin_config: Option<SocketAddr>,
    shutdown: CancellationToken,
    /// Stops what must outlive the drain: the admin server, the health checkers, DNS discovery.
    admin_shutdown: CancellationToken,
    connections: TaskTracker,
    /// The data-plane threads; dropped (stopped) with the gateway, after the drain.
    workers: Arc<Workers>,
    workers_config: (u32, bool),
}

/// Everything that changes what the data plane sees goes through here, one change at a time (the
/// `inner` lock): reloads, DNS answers and slow-start steps build new cluster snapshots the same way.
struct Control {
    shared: Arc<Shared>,
    inner: Mutex<Inner>,
    /// Parent of every health checker and DNS task.
    stop: CancellationToken,
}

struct Inner {
    listeners: Vec<RunningListener>,
    /// Cluster names in config order (the order of `Shared::clusters`).
    order: Vec<String>,
    clusters: HashMap<String, ClusterState>,
    dns: DnsConfig,
    /// Built when the first DNS cluster needs it; rebuilt when `[dns]` changes.
    resolver: Option<Arc<TokioResolver>>,
    /// The access log's writer and its settings, when `[access_log]` is on.
    access_log: Option<(AccessLogConfig, AccessLog)>,
}

/// The control plane's side of one cluster.
struct ClusterState {
    config: ClusterConfig,
    /// The current endpoint set: the config's, or the last DNS answer.
    endpoints: Vec<EndpointConfig>,
    /// The health checker of each endpoint, by address, and the settings they run with.
    checkers: HashMap<String, CancellationToken>,
    checker_config: Option<crate::config::HealthCheckConfig>,
    /// The DNS task, for a DNS cluster.
    discovery: Option<CancellationToken>,
    /// Whether a slow-start step is already scheduled.
    ramp_scheduled: bool,
    /// `weighted_round_robin`'s weight updates, and the period they run at.
    weights_task: Option<(Duration, CancellationToken)>,
}

impl Drop for ClusterState {
    fn drop(&mut self) {
        for c in self.checkers.values() {
            c.cancel();
        }
        if let Some(d) = &self.discovery {
            d.cancel();
        }
        if let Some((_, t)) = &self.weights_task {
            t.cancel();
        }
    }
}

impl ClusterState {
    fn new(config: ClusterConfig) -> ClusterState {
        ClusterState {
            endpoints: config.endpoints.clone(),
            config,
            checkers: HashMap::new(),
            checker_config: None,
            discovery: None,
            ramp_scheduled: false,
            weights_task: None,
        }
    }
}

impl Gateway {
    /// Binds every listener and the admin port and starts serving. Fails if a listener's TLS files
    /// cannot be read or do not make a usable certificate and key (an error naming the config's line
    /// and key), if an address cannot be bound or the DNS resolver cannot be set up. A DNS cluster's
    /// name is resolved once before the listeners open, so the first calls find its endpoints.
    pub async fn start(config: Config) -> anyhow::Result<Gateway> {
        // The TLS files are read now, not when the config was parsed: the config is only text.
        let tls = load::listener_tls(&config)?;
        // Threads first: if they cannot start, nothing else has been started to leak.
        let workers = Arc::new(Workers::start(config.workers as usize, config.busy_poll)?);
        tracing::info!(
            workers = workers.len(),
            busy_poll = config.busy_poll,
            "data-plane workers started"
        );
        let metrics = Metrics::new();
        let shared = Arc::new(Shared {
            metrics: metrics.clone(),
            clusters: ArcSwap::from_pointee(Vec::new()),
            draining: AtomicBool::new(false),
            access_log: Mutex::new(None),
        });
        // Before the routers: they take the access log's queue when built.
        let access_log = match &config.access_log {
            Some(c) => Some((
                c.clone(),
                start_access_log(c, &metrics).map_err(anyhow::Error::msg)?,
            )),
            None => None,
        };
        *shared.access_log.lock() = access_log.as_ref().map(|(_, l)| l.sender());
        let shutdown = CancellationToken::new();
        let admin_shutdown = CancellationToken::new();
        let connections = TaskTracker::new();
        let control = Arc::new(Control {
            shared: shared.clone(),
            inner: Mutex::new(Inner {
                listeners: Vec::new(),
                order: Vec::new(),
                clusters: HashMap::new(),
                dns: config.dns.clone(),
                resolver: None,
                access_log,
            }),
            stop: admin_shutdown.clone(),
        });
        let mut first_answers = HashMap::new();
        if config
            .clusters
            .iter()
            .any(|c| c.source != EndpointSource::Static)
        {
            let resolver = discovery::resolver(&config.dns).map_err(anyhow::Error::msg)?;
            for c in &config.clusters {
                if let EndpointSource::Dns { host, port, .. } = &c.source {
                    let answer = discovery::resolve(&resolver, host, *port).await;
                    first_answers.insert(c.name.clone(), answer);
                }
            }
            control.inner.lock().resolver = Some(resolver);
        }
        // Clusters first (routers point at them), without health checks or DNS tasks yet: those
        // start once every address is bound, so a failed start leaves none running.
        control.install_clusters(&config.clusters, &first_answers);

        let mut bound = Vec::new();
        for (l, tls) in config.listeners.iter().zip(tls) {
            let router = Router::new(l, &shared);
            bound.push(Listener::bind(l, router, metrics.listener(&l.name), tls).await?);
        }
        let admin_addr = match &config.admin {
            Some(a) => Some(admin::spawn(a.listen, shared.clone(), admin_shutdown.clone()).await?),
            None => None,
        };
        {
            let mut inner = control.inner.lock();
            for (l, c) in bound.into_iter().zip(&config.listeners) {
                tracing::info!(listener = %l.name, addr = %l.local_addr, tls = c.tls.is_some(), "listening");
                inner.listeners.push(RunningListener {
                    config: c.clone(),
                    addr: l.local_addr,
                    reload: l.reloader(),
                });
                workers.spawn(l.serve(workers.spawner(), shutdown.clone(), connections.clone()));
            }
            let names = inner.order.clone();
            for name in &names {
                control.start_background(&mut inner, name);
            }
        }
        Ok(Gateway {
            control,
            admin_addr,
            admin_config: config.admin.as_ref().map(|a| a.listen),
            shutdown,
            admin_shutdown,
            connections,
            workers,
            workers_config: (config.workers, config.busy_poll),
        })
    }

    /// Applies a new, already validated config without dropping a connection: routes, clusters,
    /// balancers, health checks, DNS names and TLS certificates change; calls in flight finish on the
    /// old ones. Endpoints that stay keep their connections, health verdict, ejection, counters and
    /// health checker: a reload that changes one endpoint touches only that endpoint. Listener and
    /// admin addresses cannot change this way (that needs a restart); such a config is refused and
    /// the running one stays.
    pub fn reload(&self, config: Config) -> Result<(), String> {
        let result = self.try_reload(&config);
        self.control.shared.metrics.config_reload(result.is_ok());
        match &result {
            Ok(()) => tracing::info!(file = %config.origin, "config reloaded"),
            Err(e) => {
                tracing::error!(file = %config.origin, error = %e, "config reload refused; keeping the running config")
            }
        }
        result
    }

    fn try_reload(&self, config: &Config) -> Result<(), String> {
        let control = &self.control;
        // Check everything that can fail before changing anything, so a reload is all or nothing.
        // The TLS files are read again: a reload is how renewed certificates take effect. Read
        // before taking the lock, which DNS answers and slow-start steps also wait on.
        let tls = load::listener_tls(config).map_err(|e| e.to_string())?;
        let mut inner = control.inner.lock();
        self.check_no_restart_needed(&inner, config)?;
        // A new writer on the file, opened now (a file that cannot be opened refuses the reload) and
        // put in place below. Each reload reopens the file, so `mv access.log access.log.1` and a
        // SIGHUP (logrotate) starts a new file; standard output stays as it is.
        let access_log = match (&config.access_log, &inner.access_log) {
            (Some(new), Some((old, _))) if new == old && new.target == AccessLogTarget::Stdout => {
                None
            }
            (Some(new), _) => Some(Some((
                new.clone(),
                start_access_log(new, &control.shared.metrics)?,
            ))),
            (None, _) => Some(None),
        };
        let wants_dns = config
            .clusters
            .iter()
            .any(|c| c.source != EndpointSource::Static);
        let resolver_changed = inner.dns != config.dns;
        if wants_dns && (resolver_changed || inner.resolver.is_none()) {
            inner.resolver = Some(discovery::resolver(&config.dns)?);
        }
        inner.dns = config.dns.clone();
        if let Some(log) = access_log {
            *control.shared.access_log.lock() = log.as_ref().map(|(_, l)| l.sender());
            // The old writer, if any, writes what its calls still send it and stops when the last
            // router holding its queue is gone.
            inner.access_log = log;
        }

        update_cluster_states(&mut inner, &config.clusters, resolver_changed);
        let names = inner.order.clone();
        control.rebuild(&mut inner, &names);
        for ((running, l), tls) in inner.listeners.iter_mut().zip(&config.listeners).zip(tls) {
            running
                .reload
                .apply(l, Router::new(l, &control.shared), tls);
            running.config = l.clone();
        }
        for name in &names {
            control.start_background(&mut inner, name);
        }
        Ok(())
    }

    /// Refuses a config whose differences from the running one only a restart can apply.
    fn check_no_restart_needed(&self, inner: &Inner, config: &Config) -> Result<(), String> {
        let old: Vec<_> = inner
            .listeners
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
        Ok(())
    }

    /// How many data-plane worker threads run.
    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// The bound address of a listener (useful with port 0).
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.control
            .inner
            .lock()
            .listeners
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
        &self.control.shared.metrics
    }

    /// The current clusters, in config order.
    pub fn clusters(&self) -> Arc<Vec<Arc<Cluster>>> {
        self.control.shared.clusters()
    }

    /// Graceful shutdown: `/ready` turns 503, listeners stop accepting, every client connection gets
    /// GOAWAY, and in-flight calls may finish for up to `drain_timeout`. Returns whether everything
    /// finished in time.
    pub async fn shutdown(self, drain_timeout: Duration) -> bool {
        self.control.shared.draining.store(true, Ordering::Relaxed);
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
        // Whatever the drained calls logged is written before the process exits; a write stuck on a
        // pipe nobody reads is given up after a moment.
        let access_log = self.control.inner.lock().access_log.take();
        self.control.shared.access_log.lock().take();
        if let Some((_, log)) = access_log {
            let _ = tokio::task::spawn_blocking(move || log.close(ACCESS_LOG_CLOSE)).await;
        }
        drained
    }
}

/// How long shutdown waits for the access log's last lines to be written.
const ACCESS_LOG_CLOSE: Duration = Duration::from_secs(2);

/// Opens the access log's destination and starts its writer.
fn start_access_log(config: &AccessLogConfig, metrics: &Metrics) -> Result<AccessLog, String> {
    let output = access_log::open(&config.target)
        .map_err(|e| format!("access_log: cannot open {}: {e}", config.target))?;
    AccessLog::start(
        config.target.clone(),
        output,
        config.queue,
        metrics.access_log_lines.clone(),
        metrics.access_log_dropped.clone(),
    )
    .map_err(|e| format!("access_log: cannot start its writer thread: {e}"))
}

impl Control {
    /// Creates the control state of `configs` and their first snapshots (start-up). A DNS cluster's
    /// endpoints are its first answer, when there is one.
    fn install_clusters(
        &self,
        configs: &[ClusterConfig],
        first_answers: &HashMap<String, discovery::Answer>,
    ) {
        let mut inner = self.inner.lock();
        for c in configs {
            let mut state = ClusterState::new(c.clone());
            if let Some(discovery::Answer::Addresses(addrs)) = first_answers.get(&c.name) {
                state.endpoints = discovery::endpoints_of(addrs);
            }
            inner.clusters.insert(c.name.clone(), state);
        }
        inner.order = configs.iter().map(|c| c.name.clone()).collect();
        let names = inner.order.clone();
        self.rebuild(&mut inner, &names);
    }

    /// Builds new snapshots of the clusters named, from their current endpoint sets, carrying over
    /// the endpoints that stay, and swaps them in with the unchanged others (in config order).
    /// Endpoints that left are retired: no new calls, their gauges and health checkers go, their
    /// calls in flight finish, and their pooled connections close once idle (when the last snapshot
    /// or call holding them is gone). Routers must be re-pointed by the caller.
    fn rebuild(self: &Control, inner: &mut Inner, names: &[String]) {
        let metrics = &self.shared.metrics;
        let previous = self.shared.clusters();
        let mut next = Vec::with_capacity(inner.order.len());
        for name in &inner.order {
            let old = previous.iter().find(|c| &c.name == name);
            if let (false, Some(o)) = (names.contains(name), old) {
                next.push(o.clone());
                continue;
            }
            let state = inner
                .clusters
                .get_mut(name)
                .expect("every ordered cluster has a state");
            let (cluster, changes) =
                Cluster::build(&state.config, &state.endpoints, metrics, old.map(|c| &**c));
            let cluster = Arc::new(cluster);
            self.apply_changes(name, state, &cluster, changes);
            next.push(cluster);
        }
        // Clusters the config no longer has: retire their endpoints and drop their gauges.
        for o in previous.iter().filter(|o| !inner.order.contains(&o.name)) {
            let (_, changes) = Cluster::build(&empty_like(o), &[], metrics, Some(o));
            for e in changes.removed {
                metrics.forget_endpoint(&o.name, &e.address);
            }
        }
        self.shared.clusters.store(Arc::new(next));
    }

    /// Health checkers and gauges after a snapshot change: checkers stop for endpoints that left
    /// and start for those that joined (all restart if the settings changed); gauges of endpoints
    /// that left go.
    fn apply_changes(
        &self,
        name: &str,
        state: &mut ClusterState,
        cluster: &Cluster,
        changes: Changes,
    ) {
        let metrics = &self.shared.metrics;
        for e in &changes.removed {
            if !cluster.endpoints.iter().any(|n| n.address == e.address) {
                metrics.forget_endpoint(name, &e.address);
            }
            if let Some(c) = state.checkers.remove(&e.address) {
                c.cancel();
            }
        }
        if state.checker_config != state.config.health_check {
            for c in state.checkers.values() {
                c.cancel();
            }
            state.checkers.clear();
            state.checker_config = state.config.health_check.clone();
        }
        if let Some(hc) = &state.config.health_check {
            for e in &cluster.endpoints {
                if !state.checkers.contains_key(&e.address) && !self.stop.is_cancelled() {
                    let token = self.stop.child_token();
                    health::spawn_check(name, e, hc, metrics, token.clone());
                    state.checkers.insert(e.address.clone(), token);
                }
            }
        }
        if changes.ramping {
            state.ramp_scheduled = true;
        }
    }

    /// Starts what runs beside a cluster once the proxy serves: its DNS task and its next
    /// slow-start step.
    fn start_background(self: &Arc<Self>, inner: &mut Inner, name: &str) {
        let resolver = inner.resolver.clone();
        let Some(state) = inner.clusters.get_mut(name) else {
            return;
        };
        if let (
            EndpointSource::Dns {
                host,
                port,
                refresh,
            },
            None,
            Some(resolver),
        ) = (&state.config.source, &state.discovery, resolver)
        {
            let stop = self.stop.child_token();
            let metrics = &self.shared.metrics;
            let task = DnsTask {
                cluster: name.to_string(),
                host: host.clone(),
                port: *port,
                refresh: *refresh,
                resolver,
                counters: discovery::Counters {
                    success: metrics.dns_resolutions(name, "success"),
                    empty: metrics.dns_resolutions(name, "empty"),
                    failure: metrics.dns_resolutions(name, "failure"),
                },
            };
            let control = Arc::downgrade(self);
            let cluster = name.to_string();
            let known = state.endpoints.clone();
            tokio::spawn(task.run(
                known,
                move |endpoints| set_endpoints(&control, &cluster, endpoints),
                stop.clone(),
            ));
            state.discovery = Some(stop);
        }
        if state.ramp_scheduled {
            self.schedule_ramp(name, state);
        }
        self.run_weight_updates(name, state);
    }

    /// Keeps a `weighted_round_robin` cluster's schedule following its endpoints' load reports:
    /// recomputed every `weight_update_period`, off the call path.
    fn run_weight_updates(&self, name: &str, state: &mut ClusterState) {
        let wanted = (state.config.balancer == crate::config::BalancerKind::WeightedRoundRobin)
            .then_some(state.config.orca.weight_update_period);
        if state.weights_task.as_ref().map(|(p, _)| *p) == wanted {
            return;
        }
        if let Some((_, t)) = state.weights_task.take() {
            t.cancel();
        }
        let Some(period) = wanted else {
            return;
        };
        let stop = self.stop.child_token();
        let shared = self.shared.clone();
        let (name, token) = (name.to_string(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = token.cancelled() => return,
                }
                if let Some(c) = shared.cluster(&name) {
                    c.refresh_weights();
                }
            }
        });
        state.weights_task = Some((period, stop));
    }

    /// Builds the cluster's snapshot again after one slow-start step, with its endpoints' new weights.
    fn schedule_ramp(self: &Arc<Self>, name: &str, state: &mut ClusterState) {
        let Some(window) = state.config.slow_start else {
            return;
        };
        state.ramp_scheduled = false;
        let step = (window / 20).clamp(Duration::from_millis(50), Duration::from_secs(1));
        let control = Arc::downgrade(self);
        let name = name.to_string();
        let stop = self.stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(step) => {}
                _ = stop.cancelled() => return,
            }
            if let Some(control) = control.upgrade() {
                let mut inner = control.inner.lock();
                if inner.clusters.contains_key(&name) {
                    control.rebuild(&mut inner, std::slice::from_ref(&name));
                    control.repoint_routers(&inner);
                    control.start_background(&mut inner, &name);
                }
            }
        });
    }

    /// Gives every listener a router over the current clusters (routes hold their cluster).
    fn repoint_routers(&self, inner: &Inner) {
        for l in &inner.listeners {
            l.reload.set_router(Router::new(&l.config, &self.shared));
        }
    }
}

/// Brings the control state of every cluster to a reloaded config. The endpoint set of each
/// cluster: a static cluster's from the new config; a DNS cluster whose name stays keeps its last
/// answer (its task goes on, unless the resolver changed), otherwise it starts empty until its new
/// task's first answer. Clusters the config no longer has are dropped, which stops their checkers
/// and DNS tasks.
fn update_cluster_states(inner: &mut Inner, configs: &[ClusterConfig], resolver_changed: bool) {
    let mut states = std::mem::take(&mut inner.clusters);
    for c in configs {
        let mut state = states
            .remove(&c.name)
            .unwrap_or_else(|| ClusterState::new(c.clone()));
        let same_source = state.config.source == c.source;
        if !same_source || resolver_changed {
            if let Some(d) = state.discovery.take() {
                d.cancel();
            }
        }
        match &c.source {
            EndpointSource::Static => state.endpoints = c.endpoints.clone(),
            EndpointSource::Dns { .. } if !same_source => state.endpoints = Vec::new(),
            EndpointSource::Dns { .. } => {}
        }
        state.config = c.clone();
        inner.clusters.insert(c.name.clone(), state);
    }
    drop(states);
    inner.order = configs.iter().map(|c| c.name.clone()).collect();
}

/// Applies a DNS answer: the cluster's endpoint set becomes `endpoints`.
fn set_endpoints(control: &Weak<Control>, name: &str, endpoints: Vec<EndpointConfig>) {
    let Some(control) = control.upgrade() else {
        return;
    };
    let mut inner = control.inner.lock();
    let Some(state) = inner.clusters.get_mut(name) else {
        return;
    };
    state.endpoints = endpoints;
    control.rebuild(&mut inner, &[name.to_string()]);
    control.repoint_routers(&inner);
    control.start_background(&mut inner, name);
}

/// A config for retiring a removed cluster's endpoints (`Cluster::build` with no endpoints).
fn empty_like(cluster: &Cluster) -> ClusterConfig {
    ClusterConfig {
        name: cluster.name.clone(),
        balancer: cluster.balancer_kind,
        endpoints: Vec::new(),
        source: EndpointSource::Static,
        slow_start: None,
        choice_count: 2,
        health_check: None,
        outlier_detection: None,
        panic_threshold: 0,
        connect_timeout: Duration::from_secs(1),
        max_streams_per_connection: 1,
        keepalive: crate::config::Keepalive {
            interval: Duration::from_secs(300),
            timeout: Duration::from_secs(20),
        },
        max_requests: None,
        orca: Default::default(),
        forward_load_reports: false,
    }
}
