//! The TOML configuration: schema (serde), parsing and validation.
//!
//! Every error names the file, the line and column, and the key it is about, e.g.
//! `config/x.toml:12:1: clusters[0].balancer: unknown balancer "rr"; expected one of ...`.
//! Parsing is a pure function of the text, so a bad file never disturbs a running proxy.
//!
//! This module is a leaf that does no I/O (tests/layering.rs checks it): it never reads a file, not
//! even the ones the config names. Certificate and key paths come out as [`TlsFiles`], each with the
//! [`Place`] it was written at; the `load` module reads the config file and those files (with size
//! limits) and builds the TLS configuration, reporting its errors at those places.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;
use toml::Spanned;

#[cfg(test)]
mod properties;

/// A configuration that parsed and passed every check.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from (for messages); `<inline>` when built from a string.
    pub origin: String,
    pub admin: Option<AdminConfig>,
    pub listeners: Vec<ListenerConfig>,
    pub clusters: Vec<ClusterConfig>,
    /// How long in-flight calls may run on after SIGTERM/SIGINT before the proxy exits anyway.
    pub drain_timeout: Duration,
    /// Data-plane worker threads; 0 = one per CPU the process may run on.
    pub workers: u32,
    /// Workers poll for I/O without sleeping (like HAProxy's `busy-polling`): lower latency, a full
    /// CPU per worker.
    pub busy_poll: bool,
    /// Where DNS clusters resolve their names.
    pub dns: DnsConfig,
    /// `[access_log]`: one JSON line per call; None = off.
    pub access_log: Option<AccessLogConfig>,
}

/// The access log (`[access_log]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogConfig {
    /// Standard output (`path = "-"`) or a file (relative paths from the config file's directory).
    pub target: AccessLogTarget,
    /// Records waiting for the writer before new ones are dropped.
    pub queue: usize,
    /// Where the config names the file, for errors about it.
    pub place: Option<Place>,
}

/// Where the access log goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    /// `path = "-"`: the process's standard output.
    Stdout,
    /// A file, opened for appending (created if missing).
    File(PathBuf),
}

impl fmt::Display for AccessLogTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AccessLogTarget::Stdout => f.write_str("stdout"),
            AccessLogTarget::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// The resolver of DNS clusters (`[dns]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsConfig {
    /// Nameservers (`ip:port`, UDP with TCP on truncation); empty = the system's (/etc/resolv.conf).
    pub nameservers: Vec<SocketAddr>,
}

/// Where a cluster's endpoints come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointSource {
    /// The `endpoints` list of the config.
    Static,
    /// Every A and AAAA address of `host`, with `port`, re-resolved at least every `refresh`.
    Dns {
        host: String,
        port: u16,
        refresh: Duration,
    },
}

/// Keepalive PINGs on an upstream connection: one every `interval`; a connection whose peer has not
/// answered within `timeout` is closed (its calls fail) and leaves the pool, so a backend that
/// vanished without a FIN (a node gone, a network partition) is noticed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    pub interval: Duration,
    pub timeout: Duration,
}

/// The admin HTTP server (`/metrics`, `/healthz`, `/ready`).
#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

/// One downstream listener.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub name: String,
    pub listen: SocketAddr,
    pub tls: Option<TlsFiles>,
    pub routes: Vec<RouteConfig>,
    /// SETTINGS_MAX_CONCURRENT_STREAMS announced to each downstream connection.
    pub max_concurrent_streams: u32,
    /// SETTINGS_MAX_HEADER_LIST_SIZE: most bytes of decoded headers (RFC 9113 §6.5.2 sizing) one
    /// request may carry; a larger request is refused (HTTP 431) and its connection lives on.
    pub max_header_list_size: u32,
    /// A connection with no open stream for this long is closed (GOAWAY NO_ERROR).
    pub idle_timeout: Duration,
    /// Time a new connection has to finish its PROXY protocol header, TLS handshake and HTTP/2
    /// preface.
    pub handshake_timeout: Duration,
    /// Open connections beyond which a new one is closed at once (and counted).
    pub max_connections: u32,
    /// A connection is sent a graceful GOAWAY at this age (±10 %); None: never.
    pub max_connection_age: Option<Duration>,
    /// How long calls in flight may run on after the age's GOAWAY before the connection is closed.
    pub max_connection_age_grace: Duration,
    /// A PING is sent every this long ...
    pub keepalive_interval: Duration,
    /// ... and a peer that has not answered it within this long is closed.
    pub keepalive_timeout: Duration,
    /// Every connection must start with a PROXY protocol header (v1 or v2).
    pub proxy_protocol: bool,
    /// Append the client's address to `x-forwarded-for` on every forwarded call.
    pub x_forwarded_for: bool,
}

/// A listener's `[listeners.tls]`: the PEM files to load, paths resolved against the config file's
/// directory. Only named here: the `load` module reads them and builds the rustls config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain (`cert`).
    pub cert: FileRef,
    /// The private key (`key`).
    pub key: FileRef,
    /// CA certificates that client certificates must chain to (`client_ca`, mTLS).
    pub client_ca: Option<FileRef>,
    /// The table as a whole (`listeners[i].tls`, at its `cert`): where a key that does not match
    /// its certificate is reported.
    pub place: Place,
}

/// A file the config names, and where it names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRef {
    /// The path as written, joined to the config file's directory when relative.
    pub path: PathBuf,
    /// Where the config names it.
    pub place: Place,
}

/// Where a value is written in the config: file, line and column, key. A check made after parsing
/// (reading a file the value names) reports its errors here, as the parser would.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    /// The config file (its origin, for text that did not come from a file).
    pub file: String,
    /// 1-based line and column.
    pub position: Option<(usize, usize)>,
    /// Dotted key path such as `listeners[0].tls.cert`.
    pub key: String,
}

impl Place {
    /// An error about the value written here.
    pub fn error(&self, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            position: self.position,
            key: self.key.clone(),
            message: message.into(),
        }
    }
}

/// One route: which calls it matches and where they go.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub service: Option<String>,
    pub method: Option<String>,
    pub cluster: String,
    pub timeout: Option<Duration>,
}

/// The balancing algorithms a cluster can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BalancerKind {
    RoundRobin,
    JoinShortestQueue,
    LeastRequest,
    /// Power of two choices over peak-EWMA latency × (calls in flight + 1).
    PeakEwma,
    /// Smooth weighted round robin over weights from the backends' ORCA load reports (gRFC A58).
    WeightedRoundRobin,
}

impl BalancerKind {
    /// The name used in `balancer = "..."`.
    pub fn name(self) -> &'static str {
        match self {
            BalancerKind::RoundRobin => "round_robin",
            BalancerKind::JoinShortestQueue => "join_shortest_queue",
            BalancerKind::LeastRequest => "least_request",
            BalancerKind::PeakEwma => "peak_ewma",
            BalancerKind::WeightedRoundRobin => "weighted_round_robin",
        }
    }

    /// All names accepted in `balancer = "..."`.
    pub const NAMES: &'static [&'static str] = &[
        "round_robin",
        "join_shortest_queue",
        "least_request",
        "peak_ewma",
        "weighted_round_robin",
    ];
}

/// A named group of interchangeable upstream endpoints.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub name: String,
    pub balancer: BalancerKind,
    /// The static endpoints (empty for a DNS cluster, whose endpoints come from its answers).
    pub endpoints: Vec<EndpointConfig>,
    pub source: EndpointSource,
    /// A new endpoint's weight ramps from 10 % to 100 % over this window (off when None).
    pub slow_start: Option<Duration>,
    /// `least_request`: how many endpoints to sample per pick.
    pub choice_count: usize,
    pub health_check: Option<HealthCheckConfig>,
    pub outlier_detection: Option<OutlierConfig>,
    /// Below this percentage of available endpoints the cluster ignores health and balances over all
    /// of them (Envoy's panic mode); 0 disables it.
    pub panic_threshold: u32,
    /// Limit for one TCP connect + HTTP/2 handshake to an endpoint.
    pub connect_timeout: Duration,
    /// Most concurrent calls on one upstream connection (fewer if the endpoint announces fewer).
    pub max_streams_per_connection: u32,
    /// PINGs on upstream connections (`keepalive_interval`, `keepalive_timeout`).
    pub keepalive: Keepalive,
    /// Most calls in flight to the cluster through this proxy (Envoy's circuit breaker
    /// `max_requests`); a call over it gets RESOURCE_EXHAUSTED at once. None: no limit.
    pub max_requests: Option<u32>,
    /// `weighted_round_robin`'s settings (named as gRPC names them).
    pub orca: OrcaConfig,
    /// Whether ORCA load-report trailers reach the client (removed by default).
    pub forward_load_reports: bool,
}

/// How `weighted_round_robin` turns load reports into weights (gRFC A58).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OrcaConfig {
    /// A new endpoint's (or one whose reports stopped and resumed) weight is used only after this.
    pub blackout_period: Duration,
    /// A weight whose last report is older than this is no longer used.
    pub weight_expiration_period: Duration,
    /// How often the weights are recomputed (at least 100 ms).
    pub weight_update_period: Duration,
    /// How much errors count against an endpoint: weight = qps / (utilization + eps / qps × this).
    pub error_utilization_penalty: f64,
}

impl Default for OrcaConfig {
    fn default() -> OrcaConfig {
        OrcaConfig {
            blackout_period: Duration::from_secs(10),
            weight_expiration_period: Duration::from_secs(180),
            weight_update_period: Duration::from_secs(1),
            error_utilization_penalty: 1.0,
        }
    }
}

/// One upstream endpoint of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointConfig {
    /// `host:port` as written in the config; also the `endpoint` metric label.
    pub address: String,
    /// Relative share of calls (1..=1000, default 1).
    pub weight: u32,
}

/// How active health checks learn an endpoint's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthCheckMode {
    /// `Health/Check` every `interval`.
    Poll,
    /// A `Health/Watch` stream per endpoint, falling back to polling if Watch is unimplemented.
    Watch,
}

/// Passive outlier detection: eject endpoints whose calls keep failing.
#[derive(Debug, Clone)]
pub struct OutlierConfig {
    /// Consecutive calls ending UNAVAILABLE (or failing to connect) that eject an endpoint.
    pub consecutive_failures: u32,
    /// An ejection lasts this long × the number of times the endpoint has been ejected.
    pub base_ejection_time: Duration,
    /// Never eject more than this percentage of a cluster's endpoints.
    pub max_ejection_percent: u32,
}

/// Active grpc.health.v1 checking of a cluster's endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckConfig {
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
    pub service: String,
    pub mode: HealthCheckMode,
    /// Whether endpoints count as healthy before their first check completes.
    pub start_healthy: bool,
}

/// A configuration error, formatted `file:line:column: key: message`.
#[derive(Debug, Clone)]
pub struct ConfigError {
    pub file: String,
    /// 1-based line and column, when the error can be tied to a place in the file.
    pub position: Option<(usize, usize)>,
    /// Dotted key path such as `clusters[0].balancer`; empty for whole-file errors.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some((line, col)) = self.position {
            write!(f, ":{line}:{col}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// What gRPC servers and HAProxy announce; with the stream windows it bounds what one client connection
/// can make the proxy hold (README, "Limits").
const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 100;
/// grpc-core's hard limit (its soft limit is 8 KiB); far above what gRPC metadata needs.
const DEFAULT_MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
/// Below an AWS NLB's 350 s idle timeout, so the proxy closes an idle flow cleanly before the NLB
/// drops it silently.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;
const DEFAULT_MAX_CONNECTION_AGE_GRACE: Duration = Duration::from_secs(30);
/// With the timeout, a dead peer is noticed within 80 s, and a live idle one exchanges a PING every
/// 60 s: well inside the 350 s after which an AWS NLB forgets an idle flow without telling anyone.
const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Upstream: grpc-go's default enforcement allows a client one PING every 5 minutes (see
/// `upstream::drive`).
const DEFAULT_UPSTREAM_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(300);
/// Re-resolve a DNS cluster's name at least this often: a pod that became ready gets calls within
/// this (plus a health check).
const DEFAULT_DNS_REFRESH: Duration = Duration::from_secs(5);
/// RFC 9113 recommends servers allow at least 100 streams; staying at 100 per upstream connection keeps
/// the blast radius of one connection's failure (or GOAWAY) small and spreads load over more sockets.
const DEFAULT_MAX_STREAMS_PER_CONNECTION: u32 = 100;
/// Access log records waiting for the writer: at its 50 ms pace ~300k lines/s, and a few MiB held
/// while a write is stuck.
const DEFAULT_ACCESS_LOG_QUEUE: u32 = 16 * 1024;

// ---- raw schema, as written in the file ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    admin: Option<RawAdmin>,
    #[serde(default)]
    listeners: Vec<RawListener>,
    #[serde(default)]
    clusters: Vec<RawCluster>,
    drain_timeout: Option<Spanned<DurationStr>>,
    workers: Option<Spanned<u32>>,
    busy_poll: Option<bool>,
    dns: Option<RawDns>,
    access_log: Option<RawAccessLog>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccessLog {
    path: Option<Spanned<String>>,
    queue: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDns {
    #[serde(default)]
    nameservers: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: Spanned<String>,
    listen: Spanned<String>,
    tls: Option<RawTls>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    max_concurrent_streams: Option<Spanned<u32>>,
    max_header_list_size: Option<Spanned<u32>>,
    idle_timeout: Option<Spanned<DurationStr>>,
    handshake_timeout: Option<Spanned<DurationStr>>,
    max_connections: Option<Spanned<u32>>,
    max_connection_age: Option<Spanned<DurationStr>>,
    max_connection_age_grace: Option<Spanned<DurationStr>>,
    keepalive_interval: Option<Spanned<DurationStr>>,
    keepalive_timeout: Option<Spanned<DurationStr>>,
    proxy_protocol: Option<bool>,
    x_forwarded_for: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Spanned<String>,
    key: Spanned<String>,
    client_ca: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    service: Option<Spanned<String>>,
    method: Option<Spanned<String>>,
    cluster: Spanned<String>,
    timeout: Option<Spanned<DurationStr>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    name: Spanned<String>,
    #[serde(default = "default_balancer")]
    balancer: BalancerName,
    endpoints: Option<Spanned<Vec<Spanned<RawEndpoint>>>>,
    dns: Option<Spanned<String>>,
    dns_refresh: Option<Spanned<DurationStr>>,
    slow_start: Option<Spanned<DurationStr>>,
    choice_count: Option<Spanned<u32>>,
    health_check: Option<RawHealthCheck>,
    outlier_detection: Option<RawOutlier>,
    panic_threshold: Option<Spanned<u32>>,
    connect_timeout: Option<Spanned<DurationStr>>,
    max_streams_per_connection: Option<Spanned<u32>>,
    max_requests: Option<Spanned<u32>>,
    blackout_period: Option<Spanned<DurationStr>>,
    weight_expiration_period: Option<Spanned<DurationStr>>,
    weight_update_period: Option<Spanned<DurationStr>>,
    error_utilization_penalty: Option<Spanned<f64>>,
    #[serde(default)]
    forward_load_reports: bool,
    keepalive_interval: Option<Spanned<DurationStr>>,
    keepalive_timeout: Option<Spanned<DurationStr>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutlier {
    consecutive_failures: Option<Spanned<u32>>,
    base_ejection_time: Option<Spanned<DurationStr>>,
    max_ejection_percent: Option<Spanned<u32>>,
}

/// `"host:port"` or `{ address = "host:port", weight = 3 }`.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawEndpoint {
    Address(String),
    Weighted(RawWeightedEndpoint),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWeightedEndpoint {
    address: String,
    #[serde(default = "default_weight")]
    weight: i64,
}

fn default_weight() -> i64 {
    1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealthCheck {
    interval: Option<Spanned<DurationStr>>,
    timeout: Option<Spanned<DurationStr>>,
    unhealthy_threshold: Option<Spanned<u32>>,
    healthy_threshold: Option<Spanned<u32>>,
    #[serde(default)]
    service: String,
    mode: Option<Spanned<String>>,
    #[serde(default)]
    start_healthy: bool,
}

/// A balancer name with an error message that lists the valid names.
struct BalancerName(BalancerKind);

fn default_balancer() -> BalancerName {
    BalancerName(BalancerKind::RoundRobin)
}

impl<'de> Deserialize<'de> for BalancerName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let kind = match s.as_str() {
            "round_robin" => BalancerKind::RoundRobin,
            "join_shortest_queue" => BalancerKind::JoinShortestQueue,
            "least_request" => BalancerKind::LeastRequest,
            "peak_ewma" => BalancerKind::PeakEwma,
            "weighted_round_robin" => BalancerKind::WeightedRoundRobin,
            other => {
                return Err(de::Error::custom(format!(
                    "unknown balancer \"{other}\"; expected one of {}",
                    BalancerKind::NAMES.join(", ")
                )))
            }
        };
        Ok(BalancerName(kind))
    }
}

/// A duration written as a string: "250ms", "5s", "1m", "1h".
struct DurationStr(Duration);

impl<'de> Deserialize<'de> for DurationStr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s)
            .map(DurationStr)
            .map_err(de::Error::custom)
    }
}

/// Parses "250ms", "5s", "1.5s", "1m", "2h", "100us". A bare number is rejected: the unit is required.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("invalid duration \"{s}\": missing unit (ms, s, m, h)"))?;
    let (num, unit) = s.split_at(split);
    let value: f64 = num.parse().map_err(|_| {
        format!("invalid duration \"{s}\": expected a number followed by ms, s, m or h")
    })?;
    let secs = match unit {
        "us" | "µs" => value / 1_000_000.0,
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(format!(
                "invalid duration \"{s}\": unknown unit \"{unit}\" (expected ms, s, m or h)"
            ))
        }
    };
    if !secs.is_finite() || secs > 1e9 {
        return Err(format!("invalid duration \"{s}\": out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

// ---- parsing ----

impl Config {
    /// Parses and validates config text. `origin` names it in errors; relative certificate paths are
    /// resolved against `base_dir` (joined, not read: `load::config_file` reads a file and
    /// what it names).
    pub fn parse(text: &str, origin: &str, base_dir: &Path) -> Result<Config, ConfigError> {
        let loc = Locator { text, file: origin };
        let de = toml::Deserializer::new(text);
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            // Spanned<T> shows up in the path as a private field; hide it.
            let key = e
                .path()
                .to_string()
                .replace(".$__serde_spanned_private_value", "");
            let inner = e.into_inner();
            // One line, as every error is (the TOML parser may give two, or none: a control
            // character in a comment got an empty message).
            let mut message = inner.message().trim().replace('\n', "; ");
            if let Some(rest) = message.strip_prefix("unknown field ") {
                message = format!("unknown key {rest}");
            }
            if message.is_empty() {
                let at = inner
                    .span()
                    .and_then(|s| text.get(s.start..)?.chars().next());
                message = match at {
                    Some(c) => format!("invalid TOML: unexpected character {c:?}"),
                    None => "invalid TOML".to_string(),
                };
            }
            let key = if key == "." { String::new() } else { key };
            loc.err(inner.span(), &key, message)
        })?;
        validate(raw, &loc, base_dir)
    }

    /// The cluster with this name.
    pub fn cluster(&self, name: &str) -> Option<&ClusterConfig> {
        self.clusters.iter().find(|c| c.name == name)
    }
}

struct Locator<'a> {
    text: &'a str,
    file: &'a str,
}

impl Locator<'_> {
    fn err(
        &self,
        span: Option<Range<usize>>,
        key: &str,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            file: self.file.to_string(),
            position: span.map(|s| line_col(self.text, s.start)),
            key: key.to_string(),
            message: message.into(),
        }
    }

    /// An optional duration that must be greater than zero; `default` when absent.
    fn duration(
        &self,
        v: &Option<Spanned<DurationStr>>,
        key: &str,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match v {
            None => Ok(default),
            Some(d) if d.get_ref().0.is_zero() => {
                Err(self.at(d, key, format!("{} must be greater than zero", leaf(key))))
            }
            Some(d) => Ok(d.get_ref().0),
        }
    }

    /// An optional integer that must lie in `range`; `default` when absent.
    fn int(
        &self,
        v: &Option<Spanned<u32>>,
        key: &str,
        range: impl std::ops::RangeBounds<u32>,
        default: u32,
    ) -> Result<u32, ConfigError> {
        use std::ops::Bound::{Included, Unbounded};
        let Some(v) = v else { return Ok(default) };
        if range.contains(v.get_ref()) {
            return Ok(*v.get_ref());
        }
        let name = leaf(key);
        let message = match (range.start_bound(), range.end_bound()) {
            (Included(0), Included(100)) => format!("{name} is a percentage (0-100)"),
            (Included(lo), Unbounded) => format!("{name} must be at least {lo}"),
            (Included(lo), Included(hi)) => format!("{name} must be between {lo} and {hi}"),
            _ => format!("{name} is out of range"),
        };
        Err(self.at(v, key, message))
    }

    fn at<T>(&self, spanned: &Spanned<T>, key: &str, message: impl Into<String>) -> ConfigError {
        self.err(Some(spanned.span()), key, message)
    }

    fn place<T>(&self, spanned: &Spanned<T>, key: &str) -> Place {
        Place {
            file: self.file.to_string(),
            position: Some(line_col(self.text, spanned.span().start)),
            key: key.to_string(),
        }
    }
}

/// The last segment of a key path (`clusters[0].health_check.interval` -> `interval`).
fn leaf(key: &str) -> &str {
    key.rsplit('.').next().unwrap_or(key)
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |i| before.len() - i - 1)
        + 1;
    (line, col)
}

fn parse_socket_addr(
    loc: &Locator,
    s: &Spanned<String>,
    key: &str,
) -> Result<SocketAddr, ConfigError> {
    s.get_ref().parse().map_err(|_| {
        loc.at(
            s,
            key,
            format!(
                "invalid address \"{}\": expected ip:port, e.g. 127.0.0.1:8443",
                s.get_ref()
            ),
        )
    })
}

fn check_endpoint(loc: &Locator, s: &Spanned<String>, key: &str) -> Result<(), ConfigError> {
    let v = s.get_ref();
    let bad = || {
        loc.at(
            s,
            key,
            format!("invalid endpoint \"{v}\": expected host:port, e.g. 10.0.0.7:50051"),
        )
    };
    if v.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let (host, port) = v.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty()
        || host.contains(['/', ' ', '[', ']'])
        || port.parse::<u16>().map_or(true, |p| p == 0)
    {
        return Err(bad());
    }
    Ok(())
}

fn validate(raw: RawConfig, loc: &Locator, base: &Path) -> Result<Config, ConfigError> {
    let admin = match &raw.admin {
        Some(a) => Some(AdminConfig {
            listen: parse_socket_addr(loc, &a.listen, "admin.listen")?,
        }),
        None => None,
    };

    let mut clusters = Vec::with_capacity(raw.clusters.len());
    let mut cluster_names = HashSet::new();
    for (i, c) in raw.clusters.iter().enumerate() {
        let cluster = validate_cluster(loc, i, c)?;
        if !cluster_names.insert(cluster.name.clone()) {
            return Err(loc.at(
                &c.name,
                &format!("clusters[{i}].name"),
                format!("duplicate cluster name \"{}\"", cluster.name),
            ));
        }
        clusters.push(cluster);
    }

    if raw.listeners.is_empty() {
        // Reported at the top of the file: there is no line to point at, and every error names one.
        return Err(loc.err(
            Some(0..0),
            "listeners",
            "at least one [[listeners]] is required",
        ));
    }
    let mut listeners = Vec::with_capacity(raw.listeners.len());
    let mut listener_names = HashSet::new();
    let mut addrs = HashSet::new();
    if let Some(a) = &admin {
        addrs.insert(a.listen);
    }
    for (i, l) in raw.listeners.iter().enumerate() {
        let listener = validate_listener(loc, i, l, base, &cluster_names, &mut addrs)?;
        if !listener_names.insert(listener.name.clone()) {
            return Err(loc.at(
                &l.name,
                &format!("listeners[{i}].name"),
                format!("duplicate listener name \"{}\"", listener.name),
            ));
        }
        listeners.push(listener);
    }

    let dns = match &raw.dns {
        None => DnsConfig::default(),
        Some(d) => DnsConfig {
            nameservers: d
                .nameservers
                .iter()
                .enumerate()
                .map(|(i, n)| parse_socket_addr(loc, n, &format!("dns.nameservers[{i}]")))
                .collect::<Result<_, _>>()?,
        },
    };

    let access_log = match &raw.access_log {
        None => None,
        Some(a) => Some(validate_access_log(loc, a, base)?),
    };

    Ok(Config {
        origin: loc.file.to_string(),
        admin,
        listeners,
        clusters,
        drain_timeout: loc.duration(&raw.drain_timeout, "drain_timeout", DEFAULT_DRAIN_TIMEOUT)?,
        workers: loc.int(&raw.workers, "workers", 0..=1024, 0)?,
        busy_poll: raw.busy_poll.unwrap_or(false),
        dns,
        access_log,
    })
}

/// Checks `[access_log]`: `path` is "-" (standard output, also when absent) or a file path (whose
/// directory `load::access_log_dir` checks).
fn validate_access_log(
    loc: &Locator,
    a: &RawAccessLog,
    base: &Path,
) -> Result<AccessLogConfig, ConfigError> {
    use AccessLogTarget as Target;
    let queue = loc.int(
        &a.queue,
        "access_log.queue",
        1..=1 << 20,
        DEFAULT_ACCESS_LOG_QUEUE,
    )? as usize;
    let Some(p) = a.path.as_ref().filter(|p| p.get_ref() != "-") else {
        return Ok(AccessLogConfig {
            target: Target::Stdout,
            queue,
            place: None,
        });
    };
    let value = p.get_ref();
    if value.is_empty() {
        return Err(loc.at(
            p,
            "access_log.path",
            "path is empty; use \"-\" for standard output or a file path",
        ));
    }
    Ok(AccessLogConfig {
        target: Target::File(base.join(value)),
        queue,
        place: Some(loc.place(p, "access_log.path")),
    })
}

/// Checks one `[[clusters]]` table (all but the uniqueness of its name).
fn validate_cluster(loc: &Locator, i: usize, c: &RawCluster) -> Result<ClusterConfig, ConfigError> {
    let key = |k: &str| format!("clusters[{i}].{k}");
    let name = c.name.get_ref().clone();
    if name.is_empty() {
        return Err(loc.at(&c.name, &key("name"), "cluster name must not be empty"));
    }
    let (endpoints, source) = match (&c.endpoints, &c.dns) {
        (Some(_), Some(d)) => {
            return Err(loc.at(
                d,
                &key("dns"),
                format!("cluster \"{name}\" has both dns and endpoints; use one of them"),
            ))
        }
        (None, None) => {
            return Err(loc.at(
                &c.name,
                &key("dns"),
                format!("cluster \"{name}\" needs endpoints = [...] or dns = \"name:port\""),
            ))
        }
        (Some(list), None) => (
            validate_endpoints(loc, &key, &name, list)?,
            EndpointSource::Static,
        ),
        (None, Some(d)) => (Vec::new(), validate_dns_source(loc, &key, c, d)?),
    };
    if let (Some(refresh), None) = (&c.dns_refresh, &c.dns) {
        return Err(loc.at(
            refresh,
            &key("dns_refresh"),
            "dns_refresh needs dns to be set as well",
        ));
    }
    let health_check = match &c.health_check {
        None => None,
        Some(h) => Some(validate_health_check(loc, &key, h)?),
    };
    let outlier_detection = match &c.outlier_detection {
        None => None,
        Some(o) => Some(validate_outlier(loc, &key, o)?),
    };
    let connect_timeout = loc.duration(
        &c.connect_timeout,
        &key("connect_timeout"),
        DEFAULT_CONNECT_TIMEOUT,
    )?;
    let choice_count = loc.int(&c.choice_count, &key("choice_count"), 2.., 2)? as usize;
    let panic_threshold = loc.int(&c.panic_threshold, &key("panic_threshold"), 0..=100, 0)?;
    let max_streams_per_connection = loc.int(
        &c.max_streams_per_connection,
        &key("max_streams_per_connection"),
        1..,
        DEFAULT_MAX_STREAMS_PER_CONNECTION,
    )?;
    let keepalive = Keepalive {
        interval: loc.duration(
            &c.keepalive_interval,
            &key("keepalive_interval"),
            DEFAULT_UPSTREAM_KEEPALIVE_INTERVAL,
        )?,
        timeout: loc.duration(
            &c.keepalive_timeout,
            &key("keepalive_timeout"),
            DEFAULT_KEEPALIVE_TIMEOUT,
        )?,
    };
    let max_requests = match &c.max_requests {
        Some(_) => Some(loc.int(&c.max_requests, &key("max_requests"), 1.., 0)?),
        None => None,
    };
    let slow_start = match &c.slow_start {
        Some(_) => Some(loc.duration(&c.slow_start, &key("slow_start"), Duration::ZERO)?),
        None => None,
    };
    let orca = validate_orca(loc, &key, c)?;
    Ok(ClusterConfig {
        orca,
        forward_load_reports: c.forward_load_reports,
        source,
        slow_start,
        max_requests,
        name,
        balancer: c.balancer.0,
        endpoints,
        choice_count,
        health_check,
        outlier_detection,
        panic_threshold,
        connect_timeout,
        max_streams_per_connection,
        keepalive,
    })
}

/// Checks `weighted_round_robin`'s keys; they need that balancer.
fn validate_orca(
    loc: &Locator,
    key: &dyn Fn(&str) -> String,
    c: &RawCluster,
) -> Result<OrcaConfig, ConfigError> {
    let defaults = OrcaConfig::default();
    if c.balancer.0 != BalancerKind::WeightedRoundRobin {
        let set = [
            (
                "blackout_period",
                c.blackout_period.as_ref().map(|s| s.span()),
            ),
            (
                "weight_expiration_period",
                c.weight_expiration_period.as_ref().map(|s| s.span()),
            ),
            (
                "weight_update_period",
                c.weight_update_period.as_ref().map(|s| s.span()),
            ),
            (
                "error_utilization_penalty",
                c.error_utilization_penalty.as_ref().map(|s| s.span()),
            ),
        ];
        if let Some((name, Some(span))) = set.into_iter().find(|(_, s)| s.is_some()) {
            return Err(loc.err(
                Some(span),
                &key(name),
                format!("{name} needs balancer = \"weighted_round_robin\""),
            ));
        }
        return Ok(defaults);
    }
    let weight_update_period = loc.duration(
        &c.weight_update_period,
        &key("weight_update_period"),
        defaults.weight_update_period,
    )?;
    if weight_update_period < Duration::from_millis(100) {
        let at = c
            .weight_update_period
            .as_ref()
            .expect("set when below the default");
        return Err(loc.at(
            at,
            &key("weight_update_period"),
            "weight_update_period must be at least 100ms",
        ));
    }
    let error_utilization_penalty = match &c.error_utilization_penalty {
        None => defaults.error_utilization_penalty,
        Some(p) if p.get_ref().is_finite() && *p.get_ref() >= 0.0 => *p.get_ref(),
        Some(p) => {
            return Err(loc.at(
                p,
                &key("error_utilization_penalty"),
                "error_utilization_penalty must be a number >= 0",
            ))
        }
    };
    Ok(OrcaConfig {
        blackout_period: match &c.blackout_period {
            // Zero is allowed: weights used as soon as they arrive.
            Some(b) => b.get_ref().0,
            None => defaults.blackout_period,
        },
        weight_expiration_period: loc.duration(
            &c.weight_expiration_period,
            &key("weight_expiration_period"),
            defaults.weight_expiration_period,
        )?,
        weight_update_period,
        error_utilization_penalty,
    })
}

/// Checks a static `endpoints` list: addresses, weights, no duplicates.
fn validate_endpoints(
    loc: &Locator,
    key: &dyn Fn(&str) -> String,
    name: &str,
    list: &Spanned<Vec<Spanned<RawEndpoint>>>,
) -> Result<Vec<EndpointConfig>, ConfigError> {
    if list.get_ref().is_empty() {
        return Err(loc.at(
            list,
            &key("endpoints"),
            format!("cluster \"{name}\" has no endpoints"),
        ));
    }
    let mut seen = HashSet::new();
    let mut endpoints = Vec::new();
    for (j, e) in list.get_ref().iter().enumerate() {
        let k = key(&format!("endpoints[{j}]"));
        let (address, weight) = match e.get_ref() {
            RawEndpoint::Address(a) => (a.clone(), 1),
            RawEndpoint::Weighted(w) => (w.address.clone(), w.weight),
        };
        check_endpoint(loc, &Spanned::new(e.span(), address.clone()), &k)?;
        if !(1..=1000).contains(&weight) {
            return Err(loc.at(
                e,
                &format!("{k}.weight"),
                format!("weight must be between 1 and 1000, got {weight}"),
            ));
        }
        if !seen.insert(address.clone()) {
            return Err(loc.at(e, &k, format!("duplicate endpoint \"{address}\"")));
        }
        endpoints.push(EndpointConfig {
            address,
            weight: weight as u32,
        });
    }
    Ok(endpoints)
}

/// Checks `dns = "name:port"` and `dns_refresh`.
fn validate_dns_source(
    loc: &Locator,
    key: &dyn Fn(&str) -> String,
    c: &RawCluster,
    d: &Spanned<String>,
) -> Result<EndpointSource, ConfigError> {
    let value = d.get_ref();
    let bad = |why: &str| loc.at(d, &key("dns"), format!("invalid dns \"{value}\": {why}"));
    let (host, port) = value.rsplit_once(':').ok_or_else(|| {
        bad("expected name:port, e.g. \"echo-headless.prod.svc.cluster.local:50051\"")
    })?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| bad("the port must be a number from 1 to 65535"))?;
    let valid_name = !host.is_empty()
        && host.len() <= 253
        && host.split('.').enumerate().all(|(i, label)| {
            (!label.is_empty() || i > 0)
                && label.len() <= 63
                && label
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
        });
    if !valid_name {
        return Err(bad("not a DNS name"));
    }
    Ok(EndpointSource::Dns {
        host: host.to_string(),
        port,
        refresh: loc.duration(&c.dns_refresh, &key("dns_refresh"), DEFAULT_DNS_REFRESH)?,
    })
}

/// Checks `[clusters.health_check]`.
fn validate_health_check(
    loc: &Locator,
    key: &dyn Fn(&str) -> String,
    h: &RawHealthCheck,
) -> Result<HealthCheckConfig, ConfigError> {
    let hk = |k: &str| key(&format!("health_check.{k}"));
    Ok(HealthCheckConfig {
        interval: loc.duration(&h.interval, &hk("interval"), Duration::from_secs(5))?,
        timeout: loc.duration(&h.timeout, &hk("timeout"), Duration::from_secs(1))?,
        unhealthy_threshold: loc.int(&h.unhealthy_threshold, &hk("unhealthy_threshold"), 1.., 2)?,
        healthy_threshold: loc.int(&h.healthy_threshold, &hk("healthy_threshold"), 1.., 1)?,
        service: h.service.clone(),
        mode: match h.mode.as_ref().map(|m| (m, m.get_ref().as_str())) {
            None | Some((_, "poll")) => HealthCheckMode::Poll,
            Some((_, "watch")) => HealthCheckMode::Watch,
            Some((m, other)) => {
                return Err(loc.at(
                    m,
                    &hk("mode"),
                    format!("unknown mode \"{other}\"; expected poll or watch"),
                ))
            }
        },
        start_healthy: h.start_healthy,
    })
}

/// Checks `[clusters.outlier_detection]`.
fn validate_outlier(
    loc: &Locator,
    key: &dyn Fn(&str) -> String,
    o: &RawOutlier,
) -> Result<OutlierConfig, ConfigError> {
    let ok = |k: &str| key(&format!("outlier_detection.{k}"));
    Ok(OutlierConfig {
        consecutive_failures: loc.int(
            &o.consecutive_failures,
            &ok("consecutive_failures"),
            1..,
            5,
        )?,
        base_ejection_time: loc.duration(
            &o.base_ejection_time,
            &ok("base_ejection_time"),
            Duration::from_secs(30),
        )?,
        max_ejection_percent: loc.int(
            &o.max_ejection_percent,
            &ok("max_ejection_percent"),
            0..=100,
            10,
        )?,
    })
}

/// Checks one `[[listeners]]` table (all but the uniqueness of its name); `addrs` collects the
/// addresses bound so far.
fn validate_listener(
    loc: &Locator,
    i: usize,
    l: &RawListener,
    base: &Path,
    cluster_names: &HashSet<String>,
    addrs: &mut HashSet<SocketAddr>,
) -> Result<ListenerConfig, ConfigError> {
    let key = |k: &str| format!("listeners[{i}].{k}");
    let name = l.name.get_ref().clone();
    if name.is_empty() {
        return Err(loc.at(&l.name, &key("name"), "listener name must not be empty"));
    }
    let listen = parse_socket_addr(loc, &l.listen, &key("listen"))?;
    if listen.port() != 0 && !addrs.insert(listen) {
        return Err(loc.at(
            &l.listen,
            &key("listen"),
            format!("address {listen} is already used by another listener or the admin server"),
        ));
    }
    let tls = match &l.tls {
        None => None,
        Some(t) => Some(validate_tls(loc, &key, t, base)?),
    };
    let mut routes = Vec::with_capacity(l.routes.len());
    for (j, r) in l.routes.iter().enumerate() {
        let rk = |k: &str| key(&format!("routes[{j}].{k}"));
        let cluster = r.cluster.get_ref().clone();
        if !cluster_names.contains(&cluster) {
            return Err(loc.at(
                &r.cluster,
                &rk("cluster"),
                format!("route refers to unknown cluster \"{cluster}\""),
            ));
        }
        if let Some(s) = &r.service {
            if s.get_ref().is_empty() || s.get_ref().contains('/') {
                return Err(loc.at(
                    s,
                    &rk("service"),
                    format!(
                        "invalid service name \"{}\": expected e.g. \"package.Service\"",
                        s.get_ref()
                    ),
                ));
            }
        }
        if let Some(m) = &r.method {
            if r.service.is_none() {
                return Err(loc.at(m, &rk("method"), "method needs service to be set as well"));
            }
            if m.get_ref().is_empty() || m.get_ref().contains('/') {
                return Err(loc.at(
                    m,
                    &rk("method"),
                    format!("invalid method name \"{}\"", m.get_ref()),
                ));
            }
        }
        let timeout = match &r.timeout {
            Some(_) => Some(loc.duration(&r.timeout, &rk("timeout"), Duration::ZERO)?),
            None => None,
        };
        routes.push(RouteConfig {
            service: r.service.as_ref().map(|s| s.get_ref().clone()),
            method: r.method.as_ref().map(|s| s.get_ref().clone()),
            cluster,
            timeout,
        });
    }
    let max_concurrent_streams = loc.int(
        &l.max_concurrent_streams,
        &key("max_concurrent_streams"),
        1..,
        DEFAULT_MAX_CONCURRENT_STREAMS,
    )?;
    let max_header_list_size = loc.int(
        &l.max_header_list_size,
        &key("max_header_list_size"),
        1024..=16 * 1024 * 1024,
        DEFAULT_MAX_HEADER_LIST_SIZE,
    )?;
    let idle_timeout = loc.duration(&l.idle_timeout, &key("idle_timeout"), DEFAULT_IDLE_TIMEOUT)?;
    let handshake_timeout = loc.duration(
        &l.handshake_timeout,
        &key("handshake_timeout"),
        DEFAULT_HANDSHAKE_TIMEOUT,
    )?;
    let max_connections = loc.int(
        &l.max_connections,
        &key("max_connections"),
        1..,
        DEFAULT_MAX_CONNECTIONS,
    )?;
    let max_connection_age = match &l.max_connection_age {
        Some(_) => Some(loc.duration(
            &l.max_connection_age,
            &key("max_connection_age"),
            Duration::ZERO,
        )?),
        None => None,
    };
    let max_connection_age_grace = loc.duration(
        &l.max_connection_age_grace,
        &key("max_connection_age_grace"),
        DEFAULT_MAX_CONNECTION_AGE_GRACE,
    )?;
    let keepalive_interval = loc.duration(
        &l.keepalive_interval,
        &key("keepalive_interval"),
        DEFAULT_KEEPALIVE_INTERVAL,
    )?;
    let keepalive_timeout = loc.duration(
        &l.keepalive_timeout,
        &key("keepalive_timeout"),
        DEFAULT_KEEPALIVE_TIMEOUT,
    )?;
    Ok(ListenerConfig {
        max_header_list_size,
        idle_timeout,
        handshake_timeout,
        max_connections,
        max_connection_age,
        max_connection_age_grace,
        keepalive_interval,
        keepalive_timeout,
        proxy_protocol: l.proxy_protocol.unwrap_or(false),
        x_forwarded_for: l.x_forwarded_for.unwrap_or(true),
        name,
        listen,
        tls,
        routes,
        max_concurrent_streams,
    })
}

/// Names a listener's `[listeners.tls]` files; the `load` module reads and checks them.
fn validate_tls(
    loc: &Locator,
    key: &dyn Fn(&str) -> String,
    t: &RawTls,
    base: &Path,
) -> Result<TlsFiles, ConfigError> {
    let file = |s: &Spanned<String>, k: &str| -> Result<FileRef, ConfigError> {
        if s.get_ref().is_empty() {
            return Err(loc.at(s, &key(k), format!("{} must name a file", leaf(k))));
        }
        Ok(FileRef {
            path: base.join(s.get_ref()),
            place: loc.place(s, &key(k)),
        })
    };
    Ok(TlsFiles {
        cert: file(&t.cert, "tls.cert")?,
        key: file(&t.key, "tls.key")?,
        client_ca: t
            .client_ca
            .as_ref()
            .map(|ca| file(ca, "tls.client_ca"))
            .transpose()?,
        place: loc.place(&t.cert, &key("tls")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "x.toml", Path::new("."))
    }

    const GOOD: &str = r#"
[admin]
listen = "127.0.0.1:9901"

[[listeners]]
name = "edge"
listen = "127.0.0.1:8443"

[[listeners.routes]]
service = "echo.Echo"
cluster = "echo"
timeout = "10s"

[[clusters]]
name = "echo"
balancer = "round_robin"
endpoints = ["127.0.0.1:50051", "localhost:50052"]
"#;

    #[test]
    fn parses_good_config() {
        let c = parse(GOOD).unwrap();
        assert_eq!(
            c.listeners[0].routes[0].timeout,
            Some(Duration::from_secs(10))
        );
        assert_eq!(c.clusters[0].endpoints.len(), 2);
    }

    #[test]
    fn unknown_balancer_names_line_and_key() {
        let text = GOOD.replace("\"round_robin\"", "\"rr\"");
        let e = parse(&text).unwrap_err().to_string();
        assert!(
            e.starts_with("x.toml:16:12: clusters[0].balancer: unknown balancer \"rr\"; expected one of round_robin"),
            "{e}"
        );
    }

    #[test]
    fn unknown_key_is_an_error() {
        let text = GOOD.replace("timeout = \"10s\"", "timeot = \"10s\"");
        let e = parse(&text).unwrap_err().to_string();
        assert!(
            e.starts_with(
                "x.toml:12:1: listeners[0].routes[0].timeot: unknown key `timeot`, expected one of"
            ),
            "{e}"
        );
    }

    #[test]
    fn missing_cluster_is_an_error() {
        let text = GOOD.replace("cluster = \"echo\"", "cluster = \"nope\"");
        let e = parse(&text).unwrap_err().to_string();
        assert_eq!(e, "x.toml:11:11: listeners[0].routes[0].cluster: route refers to unknown cluster \"nope\"");
    }

    #[test]
    fn bad_endpoint_and_duration() {
        let e = parse(&GOOD.replace("localhost:50052", "localhost"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("x.toml:17:33: clusters[0].endpoints[1]: invalid endpoint"),
            "{e}"
        );
        let e = parse(&GOOD.replace("\"10s\"", "\"10\""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("listeners[0].routes[0].timeout: invalid duration \"10\""),
            "{e}"
        );
    }

    #[test]
    fn weighted_endpoints() {
        let c = parse(&GOOD.replace(
            r#"["127.0.0.1:50051", "localhost:50052"]"#,
            r#"["127.0.0.1:50051", { address = "localhost:50052", weight = 3 }]"#,
        ))
        .unwrap();
        assert_eq!(
            c.clusters[0].endpoints[1],
            EndpointConfig {
                address: "localhost:50052".into(),
                weight: 3
            }
        );
        assert_eq!(c.clusters[0].endpoints[0].weight, 1);
        let e = parse(&GOOD.replace(
            r#""localhost:50052""#,
            r#"{ address = "localhost:50052", weight = 0 }"#,
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("clusters[0].endpoints[1].weight: weight must be between 1 and 1000, got 0"),
            "{e}"
        );
    }

    #[test]
    fn out_of_range_values_name_the_key_and_the_range() {
        let cluster_extra = |extra: &str| {
            GOOD.replace(
                "balancer = \"round_robin\"",
                &format!("balancer = \"round_robin\"\n{extra}"),
            )
        };
        let e = parse(&cluster_extra("panic_threshold = 101"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "x.toml:17:19: clusters[0].panic_threshold: panic_threshold is a percentage (0-100)"
        );
        let e = parse(&format!("workers = 2000\n{GOOD}"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "x.toml:1:11: workers: workers must be between 0 and 1024"
        );
        assert_eq!(parse(&format!("workers = 3\n{GOOD}")).unwrap().workers, 3);
        assert_eq!(parse(GOOD).unwrap().workers, 0);
        assert!(!parse(GOOD).unwrap().busy_poll);
        assert!(
            parse(&format!("busy_poll = true\n{GOOD}"))
                .unwrap()
                .busy_poll
        );
        let e = parse(&format!("busy_poll = 1\n{GOOD}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.toml:1") && e.contains("busy_poll"), "{e}");
        let e = parse(&cluster_extra("choice_count = 1"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "x.toml:17:16: clusters[0].choice_count: choice_count must be at least 2"
        );
        let e = parse(&format!(
            "{GOOD}[clusters.health_check]\ninterval = \"0s\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "x.toml:19:12: clusters[0].health_check.interval: interval must be greater than zero"
        );
    }

    #[test]
    fn dns_clusters() {
        let base =
            "[[listeners]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n[[clusters]]\nname = \"c\"\n";
        let c = parse(&format!(
            "[dns]\nnameservers = [\"10.100.0.10:53\"]\n{base}dns = \"echo-headless.prod.svc.cluster.local:50051\"\nslow_start = \"30s\"\n"
        ))
        .unwrap();
        assert_eq!(c.dns.nameservers, vec!["10.100.0.10:53".parse().unwrap()]);
        assert_eq!(
            c.clusters[0].source,
            EndpointSource::Dns {
                host: "echo-headless.prod.svc.cluster.local".into(),
                port: 50051,
                refresh: Duration::from_secs(5),
            }
        );
        assert!(c.clusters[0].endpoints.is_empty());
        assert_eq!(c.clusters[0].slow_start, Some(Duration::from_secs(30)));
        let err = |extra: &str| parse(&format!("{base}{extra}")).unwrap_err().to_string();
        let e = err("dns = \"a.b:1\"\nendpoints = [\"127.0.0.1:1\"]\n");
        assert!(e.contains("clusters[0].dns") && e.contains("both"), "{e}");
        let e = err("");
        assert!(
            e.contains("clusters[0].dns") && e.contains("needs endpoints"),
            "{e}"
        );
        let e = err("dns = \"echo-headless\"\n");
        assert!(
            e.contains("clusters[0].dns") && e.contains("name:port"),
            "{e}"
        );
        let e = err("dns = \"echo:0\"\n");
        assert!(e.contains("clusters[0].dns") && e.contains("port"), "{e}");
        let e = err("dns = \"bad name:80\"\n");
        assert!(e.contains("not a DNS name"), "{e}");
        let e = err("endpoints = [\"127.0.0.1:1\"]\ndns_refresh = \"1s\"\n");
        assert!(e.contains("clusters[0].dns_refresh"), "{e}");
        let e = parse(&format!(
            "[dns]\nnameservers = [\"10.0.0.1\"]\n{base}dns = \"a:1\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("dns.nameservers[0]"), "{e}");
    }

    #[test]
    fn weighted_round_robin_keys() {
        let base = "[[listeners]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n[[clusters]]\nname = \"c\"\nendpoints = [\"127.0.0.1:1\"]\n";
        let c = parse(&format!(
            "{base}balancer = \"weighted_round_robin\"\nblackout_period = \"0s\"\nweight_update_period = \"200ms\"\nerror_utilization_penalty = 2.5\n"
        ))
        .unwrap();
        let orca = c.clusters[0].orca;
        assert_eq!(orca.blackout_period, Duration::ZERO);
        assert_eq!(orca.weight_update_period, Duration::from_millis(200));
        assert_eq!(orca.weight_expiration_period, Duration::from_secs(180));
        assert_eq!(orca.error_utilization_penalty, 2.5);
        let err = |extra: &str| parse(&format!("{base}{extra}")).unwrap_err().to_string();
        let e = err("blackout_period = \"1s\"\n");
        assert!(
            e.contains("clusters[0].blackout_period") && e.contains("weighted_round_robin"),
            "{e}"
        );
        let e = err("balancer = \"weighted_round_robin\"\nweight_update_period = \"50ms\"\n");
        assert!(e.contains("at least 100ms"), "{e}");
        let e = err("balancer = \"weighted_round_robin\"\nerror_utilization_penalty = -1.0\n");
        assert!(e.contains("error_utilization_penalty"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5d").is_err());
    }
}
