//! Maps a gRPC path (`/package.Service/Method`) to a route: the first route that matches wins.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::access_log;
use crate::balancer::Cluster;
use crate::config::ListenerConfig;
use crate::grpc::HEALTH_SERVICE;
use crate::metrics::StatusCounters;
use crate::state::Shared;

/// Where matching calls go and how long they may take.
pub struct Route {
    service: Option<String>,
    method: Option<String>,
    pub cluster: Arc<Cluster>,
    pub timeout: Option<Duration>,
    /// `grpcgate_requests_total` handles, one per endpoint of the cluster (same index), and one more
    /// at the end for calls that never reached an endpoint.
    pub counters: Arc<[StatusCounters]>,
}

impl Route {
    fn matches(&self, service: &str, method: &str) -> bool {
        self.service.as_deref().is_none_or(|s| s == service)
            && self.method.as_deref().is_none_or(|m| m == method)
    }

    /// The counters for calls that never reached an endpoint.
    pub fn unrouted_counters(&self) -> &StatusCounters {
        &self.counters[self.counters.len() - 1]
    }
}

/// A listener's routes, in config order.
pub struct Router {
    pub listener: String,
    routes: Vec<Route>,
    /// Counters for calls the proxy answered itself (no route matched, or its own health check):
    /// `cluster` and `endpoint` are empty.
    pub local: StatusCounters,
    /// Whether `grpc.health.v1.Health/Check` is answered by the proxy (no route names that service).
    pub answers_health: bool,
    /// Gateway state the proxy's own health answer reads.
    pub shared: Arc<Shared>,
    /// Where calls send their access log records, when `[access_log]` is on.
    pub access_log: Option<access_log::Sender>,
}

impl Router {
    /// Builds the routes of a listener against the gateway's clusters.
    pub fn new(config: &ListenerConfig, shared: &Arc<Shared>) -> Router {
        let metrics = &shared.metrics;
        let mut counters_by_cluster: HashMap<&str, Arc<[StatusCounters]>> = HashMap::new();
        let routes = config
            .routes
            .iter()
            .map(|r| {
                let cluster = shared
                    .cluster(&r.cluster)
                    .expect("config validation checked the cluster exists");
                let counters = counters_by_cluster
                    .entry(&r.cluster)
                    .or_insert_with(|| {
                        cluster
                            .endpoints
                            .iter()
                            .map(|e| e.address.as_str())
                            .chain(std::iter::once(""))
                            .map(|ep| metrics.request_counters(&config.name, &cluster.name, ep))
                            .collect()
                    })
                    .clone();
                Route {
                    service: r.service.clone(),
                    method: r.method.clone(),
                    cluster,
                    timeout: r.timeout,
                    counters,
                }
            })
            .collect();
        Router {
            listener: config.name.clone(),
            routes,
            local: metrics.request_counters(&config.name, "", ""),
            answers_health: !config
                .routes
                .iter()
                .any(|r| r.service.as_deref() == Some(HEALTH_SERVICE)),
            shared: shared.clone(),
            access_log: shared.access_log.lock().clone(),
        }
    }

    /// The route for a request path, if any, and its position (for the access log). A path that is
    /// not `/service/method` only matches catch-all routes.
    pub fn route(&self, path: &str) -> Option<(usize, &Route)> {
        let (service, method) = split_path(path).unwrap_or(("", ""));
        self.routes
            .iter()
            .enumerate()
            .find(|(_, r)| r.matches(service, method))
    }
}

/// The names an access log line gives a call's numbers.
impl access_log::Names for Router {
    fn listener(&self) -> &str {
        &self.listener
    }

    fn cluster(&self, route: usize) -> Option<&str> {
        self.routes.get(route).map(|r| r.cluster.name.as_str())
    }

    fn endpoint(&self, route: usize, endpoint: usize) -> Option<&str> {
        let cluster = &self.routes.get(route)?.cluster;
        cluster.endpoints.get(endpoint).map(|e| e.address.as_str())
    }
}

/// Splits `/package.Service/Method` into its service and method.
pub fn split_path(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix('/')?;
    let (service, method) = rest.split_once('/')?;
    (!service.is_empty() && !method.is_empty() && !method.contains('/'))
        .then_some((service, method))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_paths() {
        assert_eq!(split_path("/echo.Echo/Unary"), Some(("echo.Echo", "Unary")));
        assert_eq!(split_path("/echo.Echo/"), None);
        assert_eq!(split_path("echo.Echo/Unary"), None);
        assert_eq!(split_path("/a/b/c"), None);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig {
                cases: 4000,
                failure_persistence: None,
                ..ProptestConfig::default()
            })]

            /// `/service/method` with non-empty parts free of '/' splits back into them.
            #[test]
            fn split_round_trip(service in "[^/]{1,40}", method in "[^/]{1,40}") {
                let path = format!("/{service}/{method}");
                prop_assert_eq!(split_path(&path), Some((service.as_str(), method.as_str())));
            }

            /// Any path: no panic, and a split puts the path back together exactly.
            #[test]
            fn split_is_exact_or_none(path in "(/|[a-zA-Z0-9._]|\\PC){0,24}") {
                if let Some((service, method)) = split_path(&path) {
                    prop_assert!(!service.is_empty() && !method.is_empty());
                    prop_assert!(!method.contains('/'));
                    prop_assert_eq!(format!("/{service}/{method}"), path);
                } else {
                    let parts: Vec<&str> = path.split('/').collect();
                    let well_formed = parts.len() == 3 && parts[0].is_empty() && !parts[1].is_empty() && !parts[2].is_empty();
                    prop_assert!(!well_formed, "{path:?} was not split");
                }
            }
        }
    }
}
