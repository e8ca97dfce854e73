//! `weighted_round_robin`: smooth weighted round robin over weights the backends report themselves,
//! in ORCA load reports (gRPC's weighted_round_robin, gRFC A58). A backend sends its load in a trailer,
//! `endpoint-load-metrics-bin` (a serialized `xds.data.orca.v3.OrcaLoadReport`) or the text form
//! `endpoint-load-metrics: TEXT cpu_utilization=0.3,rps_fractional=100,eps=2`; each report sets
//! the endpoint's weight to qps / (utilization + eps / qps × error_utilization_penalty). Every
//! `weight_update_period` the control plane rebuilds the schedule from the weights in use (off the call
//! path; a pick stays one atomic increment into a precomputed schedule).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use base64::Engine;
use http::HeaderMap;
use prost::Message;
use tokio::time::Instant;

use super::{Balance, Eligible, Endpoint, RoundRobin};
use crate::config::OrcaConfig;
use crate::pb::orca::OrcaLoadReport;

/// The binary (protobuf, base64 in the header value) load report trailer.
pub const LOAD_REPORT_BIN: &str = "endpoint-load-metrics-bin";
/// The text load report trailer (`TEXT name=value,...`), as Envoy reads it.
pub const LOAD_REPORT_TEXT: &str = "endpoint-load-metrics";

/// What A58 reads from a report.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadReport {
    /// `application_utilization` if set, else `cpu_utilization`.
    pub utilization: f64,
    /// `rps_fractional`.
    pub qps: f64,
    /// `eps`.
    pub eps: f64,
}

impl LoadReport {
    fn from_proto(r: &OrcaLoadReport) -> LoadReport {
        LoadReport {
            utilization: if r.application_utilization > 0.0 {
                r.application_utilization
            } else {
                r.cpu_utilization
            },
            qps: r.rps_fractional,
            eps: r.eps,
        }
    }

    /// The report in a response's trailers (or trailers-only head), if any and if it parses.
    pub fn from_headers(headers: &HeaderMap) -> Option<LoadReport> {
        if let Some(v) = headers.get(LOAD_REPORT_BIN) {
            // gRPC's base64, padded or not.
            let text = v.as_bytes();
            let trimmed = text
                .strip_suffix(b"==")
                .or_else(|| text.strip_suffix(b"="))
                .unwrap_or(text);
            let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
                .decode(trimmed)
                .ok()?;
            return OrcaLoadReport::decode(bytes.as_slice())
                .ok()
                .map(|r| LoadReport::from_proto(&r));
        }
        let text = headers.get(LOAD_REPORT_TEXT)?.to_str().ok()?;
        let fields = text.strip_prefix("TEXT ")?;
        let mut r = OrcaLoadReport::default();
        for field in fields.split(',') {
            let (name, value) = field.trim().split_once('=')?;
            let value: f64 = value.trim().parse().ok()?;
            match name.trim() {
                "cpu_utilization" => r.cpu_utilization = value,
                "application_utilization" => r.application_utilization = value,
                "mem_utilization" => r.mem_utilization = value,
                "rps_fractional" => r.rps_fractional = value,
                "eps" => r.eps = value,
                _ => {}
            }
        }
        Some(LoadReport::from_proto(&r))
    }

    /// A58's weight, or None when the report cannot give one (no qps or no utilization).
    pub fn weight(&self, error_utilization_penalty: f64) -> Option<f64> {
        if !(self.qps > 0.0 && self.utilization > 0.0) {
            return None;
        }
        let penalty = if self.eps > 0.0 {
            self.eps / self.qps * error_utilization_penalty
        } else {
            0.0
        };
        let w = self.qps / (self.utilization + penalty);
        w.is_finite().then_some(w)
    }
}

/// An endpoint's weight from its load reports. Lock-free: written by the calls that carry reports,
/// read by the control plane when it rebuilds the schedule.
#[derive(Default)]
pub struct ReportedWeight {
    /// The last usable report: utilization, qps and eps, as f64 bits.
    utilization: AtomicU64,
    qps: AtomicU64,
    eps: AtomicU64,
    /// When the last usable report arrived, in ns since [`super::peak_ewma`]'s epoch; 0 = never.
    updated: AtomicU64,
    /// Since when reports have kept arriving without a gap longer than the expiration (the blackout
    /// runs from here); 0 = not reporting.
    non_empty_since: AtomicU64,
}

impl ReportedWeight {
    /// Records one report received at `now` (one without qps or utilization says nothing).
    pub fn record(&self, report: &LoadReport, now: Instant) {
        if report.weight(1.0).is_none() {
            return;
        }
        let now_ns = super::peak_ewma::nanos_since_epoch(now).max(1);
        self.utilization
            .store(report.utilization.to_bits(), Ordering::Relaxed);
        self.qps.store(report.qps.to_bits(), Ordering::Relaxed);
        self.eps.store(report.eps.to_bits(), Ordering::Relaxed);
        self.updated.store(now_ns, Ordering::Relaxed);
        let _ =
            self.non_empty_since
                .compare_exchange(0, now_ns, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// The weight to use at `now`, if any: reported, past the blackout, not expired. An expired
    /// weight restarts the blackout when reports resume.
    pub fn usable(&self, config: &OrcaConfig, now: Instant) -> Option<f64> {
        let now_ns = super::peak_ewma::nanos_since_epoch(now);
        let updated = self.updated.load(Ordering::Relaxed);
        if updated == 0 {
            return None;
        }
        if now_ns.saturating_sub(updated) > config.weight_expiration_period.as_nanos() as u64 {
            self.non_empty_since.store(0, Ordering::Relaxed);
            return None;
        }
        let since = self.non_empty_since.load(Ordering::Relaxed);
        if since == 0 || now_ns.saturating_sub(since) < config.blackout_period.as_nanos() as u64 {
            return None;
        }
        let load = |a: &AtomicU64| f64::from_bits(a.load(Ordering::Relaxed));
        LoadReport {
            utilization: load(&self.utilization),
            qps: load(&self.qps),
            eps: load(&self.eps),
        }
        .weight(config.error_utilization_penalty)
    }
}

/// The balancer: a round-robin schedule swapped whole when the weights are recomputed.
pub struct WeightedRoundRobin {
    config: OrcaConfig,
    schedule: ArcSwap<RoundRobin>,
    /// The weights `schedule` was built from: a schedule is replaced only when they change.
    weights: parking_lot::Mutex<Vec<u32>>,
}

impl WeightedRoundRobin {
    /// Starts as plain (configured-weight) round robin, until weights are reported; the rotation
    /// starts at endpoint `resume` when given.
    pub fn new(config: OrcaConfig, weights: &[u32], resume: Option<usize>) -> WeightedRoundRobin {
        let g = weights.iter().fold(0, |g, &w| gcd(g, w)).max(1);
        WeightedRoundRobin {
            config,
            schedule: ArcSwap::from_pointee(RoundRobin::starting_at(weights, resume)),
            weights: parking_lot::Mutex::new(weights.iter().map(|w| w / g).collect()),
        }
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// A58's weights for these endpoints at `now`, scaled to integers for the schedule, times each
/// endpoint's configured weight: endpoints without a usable weight get the mean of the others; with
/// fewer than two usable weights, plain round robin.
pub fn schedule_weights(
    endpoints: &[Arc<Endpoint>],
    config: &OrcaConfig,
    now: Instant,
) -> Vec<u32> {
    let reported: Vec<Option<f64>> = endpoints
        .iter()
        .map(|e| e.reported.usable(config, now))
        .collect();
    let usable: Vec<f64> = reported.iter().flatten().copied().collect();
    if usable.len() < 2 {
        return endpoints.iter().map(|e| e.weight()).collect();
    }
    let mean = usable.iter().sum::<f64>() / usable.len() as f64;
    let max = usable.iter().copied().fold(f64::MIN, f64::max);
    endpoints
        .iter()
        .zip(&reported)
        .map(|(e, r)| {
            let share = r.unwrap_or(mean) / max;
            // Times the configured weight (in hundredths): 1000 steps between the lightest and the
            // heaviest endpoint of weight 1 are plenty for a spread.
            (share * f64::from(e.weight()) * 10.0).round().max(1.0) as u32
        })
        .collect()
}

impl Balance for WeightedRoundRobin {
    fn pick(&self, endpoints: &[Arc<Endpoint>], eligible: Eligible) -> Option<usize> {
        self.schedule.load().pick(endpoints, eligible)
    }

    fn upcoming(&self) -> Vec<usize> {
        self.schedule.load().upcoming()
    }

    fn computed_weights(&self) -> Option<Vec<u32>> {
        Some(self.weights.lock().clone())
    }

    fn refresh(&self, endpoints: &[Arc<Endpoint>], now: Instant) {
        let mut weights = schedule_weights(endpoints, &self.config, now);
        // In lowest terms, so that weights in the same ratio (configured 1:1, reported 1000:1000)
        // count as unchanged.
        let g = weights.iter().fold(0, |g, &w| gcd(g, w)).max(1);
        weights.iter_mut().for_each(|w| *w /= g);
        let mut current = self.weights.lock();
        if *current != weights {
            let resume = self.schedule.load().upcoming().first().copied();
            self.schedule
                .store(Arc::new(RoundRobin::starting_at(&weights, resume)));
            *current = weights;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::balancer::tests::{cluster, spread};

    fn report(u: f64, qps: f64, eps: f64) -> LoadReport {
        LoadReport {
            utilization: u,
            qps,
            eps,
        }
    }

    #[test]
    fn reports_parse_in_both_forms() {
        let proto = OrcaLoadReport {
            cpu_utilization: 0.5,
            application_utilization: 0.25,
            rps_fractional: 100.0,
            eps: 5.0,
            ..Default::default()
        };
        let b64 = base64::engine::general_purpose::STANDARD.encode(proto.encode_to_vec());
        let mut h = HeaderMap::new();
        h.insert(LOAD_REPORT_BIN, b64.parse().unwrap());
        assert_eq!(LoadReport::from_headers(&h), Some(report(0.25, 100.0, 5.0)));
        let mut h = HeaderMap::new();
        h.insert(
            LOAD_REPORT_TEXT,
            "TEXT cpu_utilization=0.3, rps_fractional=10,eps=1"
                .parse()
                .unwrap(),
        );
        assert_eq!(LoadReport::from_headers(&h), Some(report(0.3, 10.0, 1.0)));
        let mut h = HeaderMap::new();
        h.insert(LOAD_REPORT_BIN, "!!".parse().unwrap());
        assert_eq!(LoadReport::from_headers(&h), None);
    }

    #[test]
    fn weight_formula() {
        assert_eq!(report(0.5, 100.0, 0.0).weight(1.0), Some(200.0));
        // 10 % errors at penalty 1: utilization 0.5 + 0.1.
        let w = report(0.5, 100.0, 10.0).weight(1.0).unwrap();
        assert!((w - 100.0 / 0.6).abs() < 1e-9, "{w}");
        assert_eq!(report(0.0, 100.0, 0.0).weight(1.0), None);
        assert_eq!(report(0.5, 0.0, 0.0).weight(1.0), None);
    }

    #[test]
    fn the_penalty_scales_the_error_rate() {
        // qps / (utilization + eps / qps × penalty): 100 / (0.5 + 10 / 100 × 2).
        let w = report(0.5, 100.0, 10.0).weight(2.0).unwrap();
        assert!((w - 100.0 / 0.7).abs() < 1e-9, "{w}");
        // Penalty 0: errors do not count.
        assert_eq!(report(0.5, 100.0, 10.0).weight(0.0), Some(200.0));
        // The penalty configured for the cluster is the one a usable weight gets.
        let config = OrcaConfig {
            blackout_period: Duration::ZERO,
            error_utilization_penalty: 2.0,
            ..OrcaConfig::default()
        };
        let r = ReportedWeight::default();
        let now = Instant::now();
        r.record(&report(0.5, 100.0, 10.0), now);
        let w = r.usable(&config, now).unwrap();
        assert!((w - 100.0 / 0.7).abs() < 1e-9, "{w}");
    }

    async fn advance(d: Duration) {
        tokio::time::advance(d).await;
    }

    #[tokio::test(start_paused = true)]
    async fn blackout_and_expiry_on_the_paused_clock() {
        // The defaults: blackout 10 s, expiry 3 min.
        let config = OrcaConfig::default();
        let w = ReportedWeight::default();
        assert_eq!(w.usable(&config, Instant::now()), None, "no report yet");
        w.record(&report(0.5, 100.0, 0.0), Instant::now());
        advance(Duration::from_millis(9_999)).await;
        w.record(&report(0.5, 100.0, 0.0), Instant::now());
        assert_eq!(w.usable(&config, Instant::now()), None, "in the blackout");
        advance(Duration::from_millis(1)).await;
        assert_eq!(
            w.usable(&config, Instant::now()),
            Some(200.0),
            "10 s after the first report"
        );
        // No report for 3 min after the last one: still in use at 3 min, expired just after.
        advance(Duration::from_secs(180) - Duration::from_millis(1)).await;
        assert_eq!(w.usable(&config, Instant::now()), Some(200.0), "3 min");
        advance(Duration::from_millis(2)).await;
        assert_eq!(w.usable(&config, Instant::now()), None, "expired");
        // Reports resume: a new blackout from the first of them.
        w.record(&report(0.25, 100.0, 0.0), Instant::now());
        advance(Duration::from_secs(5)).await;
        w.record(&report(0.25, 100.0, 0.0), Instant::now());
        assert_eq!(w.usable(&config, Instant::now()), None, "blackout again");
        advance(Duration::from_secs(5)).await;
        assert_eq!(w.usable(&config, Instant::now()), Some(400.0));
    }

    /// Every endpoint of `c` in `reports` (by index) reports at the paused clock's now.
    fn report_all(c: &crate::balancer::Cluster, reports: &[(usize, LoadReport)]) {
        for (i, r) in reports {
            c.endpoints[*i].reported.record(r, Instant::now());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn fallback_plain_round_robin_then_the_mean_for_the_silent() {
        let c = cluster("weighted_round_robin", r#"["a:1", "b:1", "c:1"]"#);
        let a = (0, report(0.5, 100.0, 0.0)); // weight 200
        let b = (1, report(0.25, 100.0, 0.0)); // weight 400
                                               // Only a reports, past its blackout: one weight is not enough, plain round robin.
        report_all(&c, &[a]);
        advance(Duration::from_secs(11)).await;
        report_all(&c, &[a]);
        c.refresh_weights();
        assert_eq!(spread(&c, 300), vec![100, 100, 100], "one weight");
        // b starts reporting: until its own blackout ends, still one weight.
        report_all(&c, &[a, b]);
        c.refresh_weights();
        assert_eq!(spread(&c, 300), vec![100, 100, 100], "b in its blackout");
        advance(Duration::from_secs(10)).await;
        report_all(&c, &[a, b]);
        c.refresh_weights();
        // a : b : c = 200 : 400 : the mean 300, exactly, over whole rounds.
        assert_eq!(spread(&c, 900), vec![200, 400, 300], "two weights");
        // b goes silent; 3 min later its weight expires: one weight again, plain round robin.
        advance(Duration::from_secs(181)).await;
        report_all(&c, &[a]);
        c.refresh_weights();
        assert_eq!(spread(&c, 300), vec![100, 100, 100], "b expired");
    }

    #[tokio::test(start_paused = true)]
    async fn equal_reports_spread_exactly_evenly() {
        let c = cluster("weighted_round_robin", r#"["a:1", "b:1", "c:1", "d:1"]"#);
        let all: Vec<(usize, LoadReport)> = (0..4).map(|i| (i, report(0.4, 50.0, 1.0))).collect();
        report_all(&c, &all);
        advance(Duration::from_secs(10)).await;
        report_all(&c, &all);
        c.refresh_weights();
        assert_eq!(spread(&c, 4000), vec![1000; 4]);
        // And unequal ones do not (the same cluster, so this is not vacuous).
        report_all(&c, &[(0, report(0.8, 50.0, 1.0))]);
        c.refresh_weights();
        assert!(spread(&c, 4000)[0] < 1000);
    }
}
