//! Where a cluster's endpoints come from when the config does not list them: DNS. Every A and AAAA
//! address of a name (a Kubernetes headless Service: one record per ready pod) is one endpoint, and
//! the name is resolved again every `dns_refresh`. Changes go to the gateway through a callback, the
//! same path a reload takes, so endpoints that stay keep their state.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;
use prometheus::IntCounter;
use tokio_util::sync::CancellationToken;

use crate::config::{DnsConfig, EndpointConfig};

/// How long one resolution may take before it counts as a failure.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// Builds the resolver DNS clusters share: the `[dns]` nameservers, or the system's.
pub fn resolver(config: &DnsConfig) -> Result<Arc<TokioResolver>, String> {
    let mut builder = if config.nameservers.is_empty() {
        TokioResolver::builder(TokioRuntimeProvider::default())
            .map_err(|e| format!("cannot read the system DNS configuration: {e}"))?
    } else {
        let servers = config
            .nameservers
            .iter()
            .map(|addr| {
                let mut server = NameServerConfig::udp_and_tcp(addr.ip());
                for c in &mut server.connections {
                    c.port = addr.port();
                }
                server
            })
            .collect();
        TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            TokioRuntimeProvider::default(),
        )
    };
    let options = builder.options_mut();
    options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    // Every refresh must ask the nameserver: a cached answer would hide a pod that went away.
    options.cache_size = 0;
    options.timeout = QUERY_TIMEOUT;
    options.attempts = 1;
    builder
        .build()
        .map(Arc::new)
        .map_err(|e| format!("cannot build the DNS resolver: {e}"))
}

/// One resolution's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The addresses found, sorted; empty for NXDOMAIN or an answer without records (the service
    /// has no ready replicas).
    Addresses(Vec<SocketAddr>),
    /// The resolution failed (timeout, SERVFAIL, refused, unreachable nameserver): nothing is known.
    Failure(String),
}

/// Resolves `host` to its A and AAAA addresses, each with `port`.
pub async fn resolve(resolver: &TokioResolver, host: &str, port: u16) -> Answer {
    // Fully qualified: a headless Service name must not go through the search list.
    let fqdn = if host.ends_with('.') {
        host.to_string()
    } else {
        format!("{host}.")
    };
    match resolver.lookup_ip(fqdn.as_str()).await {
        Ok(ips) => {
            let mut addrs: Vec<SocketAddr> =
                ips.iter().map(|ip| SocketAddr::new(ip, port)).collect();
            addrs.sort();
            addrs.dedup();
            Answer::Addresses(addrs)
        }
        Err(e) if e.is_nx_domain() || e.is_no_records_found() => Answer::Addresses(Vec::new()),
        Err(e) => Answer::Failure(e.to_string()),
    }
}

/// The `endpoint` label and address of a resolved address: `ip:port`, `[v6]:port`.
pub fn endpoint_address(addr: &SocketAddr) -> String {
    match addr.ip() {
        IpAddr::V4(_) => addr.to_string(),
        IpAddr::V6(ip) => format!("[{ip}]:{}", addr.port()),
    }
}

/// The endpoints of a DNS answer: one per address, weight 1.
pub fn endpoints_of(addrs: &[SocketAddr]) -> Vec<EndpointConfig> {
    addrs
        .iter()
        .map(|a| EndpointConfig {
            address: endpoint_address(a),
            weight: 1,
        })
        .collect()
}

/// `grpcgate_dns_resolutions_total{cluster,result}`, one handle per result.
pub struct Counters {
    pub success: IntCounter,
    pub empty: IntCounter,
    pub failure: IntCounter,
}

/// What a DNS cluster's resolution loop needs.
pub struct DnsTask {
    pub cluster: String,
    pub host: String,
    pub port: u16,
    pub refresh: Duration,
    pub resolver: Arc<TokioResolver>,
    pub counters: Counters,
}

impl DnsTask {
    /// Resolves every `refresh` until `stop` fires, calling `apply` with the new endpoint set each
    /// time it differs from the last one applied (the first answer always). A failure keeps the last
    /// set. Logs once per change of state, not once per resolution.
    pub async fn run(
        self,
        known: Vec<EndpointConfig>,
        apply: impl Fn(Vec<EndpointConfig>) + Send + Sync + 'static,
        stop: CancellationToken,
    ) {
        // What the cluster has now (the answer resolved at start-up, or kept across a reload).
        let mut applied: Option<Vec<EndpointConfig>> = Some(known);
        let mut failing = false;
        loop {
            let answer = tokio::select! {
                a = resolve(&self.resolver, &self.host, self.port) => a,
                _ = stop.cancelled() => return,
            };
            match answer {
                Answer::Addresses(addrs) => {
                    if addrs.is_empty() {
                        &self.counters.empty
                    } else {
                        &self.counters.success
                    }
                    .inc();
                    if std::mem::take(&mut failing) {
                        tracing::info!(cluster = %self.cluster, name = %self.host, "DNS resolution works again");
                    }
                    let endpoints = endpoints_of(&addrs);
                    if applied.as_ref() != Some(&endpoints) {
                        if addrs.is_empty() {
                            tracing::warn!(cluster = %self.cluster, name = %self.host, "DNS name has no addresses: the cluster has no endpoints");
                        } else {
                            tracing::info!(cluster = %self.cluster, name = %self.host, endpoints = addrs.len(), "DNS answer changed the endpoint set");
                        }
                        apply(endpoints.clone());
                        applied = Some(endpoints);
                    }
                }
                Answer::Failure(e) => {
                    self.counters.failure.inc();
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!(cluster = %self.cluster, name = %self.host, error = %e, "DNS resolution failed; keeping the last known endpoints");
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.refresh) => {}
                _ = stop.cancelled() => return,
            }
        }
    }
}
