//! `peak_ewma`: power of two choices over cost = peak-EWMA of response latency × (calls in flight + 1),
//! as linkerd2-proxy and Finagle do it. The latency signal survives low concurrency, where in-flight
//! counts are all 0 or 1 (a sidecar proxy) and `least_request` degrades to a random pick.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use super::least_request::Sampler;
use super::{Balance, Eligible, Endpoint, JoinShortestQueue};

/// How fast an estimate forgets: a sample's weight halves in about 7 s (e^-1 per 10 s).
const DECAY: Duration = Duration::from_secs(10);
/// The estimate of an endpoint with no samples yet: optimistic enough that a new endpoint gets tried.
const DEFAULT_LATENCY: Duration = Duration::from_millis(30);

/// The process's reference instant for the timestamps stored in atomics.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

pub(super) fn nanos_since_epoch(now: Instant) -> u64 {
    now.saturating_duration_since(epoch()).as_nanos() as u64
}

/// An endpoint's latency estimate: peak-sensitive (a slower sample replaces it at once), decaying
/// towards faster samples, and towards zero while no call completes (so an endpoint that was slow
/// gets tried again). Lock-free: two atomics, updated without coordination (a lost update only
/// loses one sample).
#[derive(Default)]
pub struct Latency {
    /// The estimate in nanoseconds, as f64 bits; 0 = no sample yet.
    estimate: AtomicU64,
    /// When it was last updated, in nanoseconds since [`epoch`].
    updated: AtomicU64,
}

impl Latency {
    /// Folds in one call's latency (request to response headers), measured at `now`.
    pub fn observe(&self, sample: Duration, now: Instant) {
        let sample = sample.as_nanos() as f64;
        let now_ns = nanos_since_epoch(now);
        let current = self.decayed(now_ns);
        let next = match current {
            None => sample,
            Some(est) if sample > est => sample,
            Some(est) => {
                // EWMA towards the faster sample, weighted by how long ago the estimate was made.
                let elapsed = now_ns.saturating_sub(self.updated.load(Ordering::Relaxed));
                let w = (-(elapsed as f64) / DECAY.as_nanos() as f64).exp();
                est * w + sample * (1.0 - w)
            }
        };
        self.estimate.store(next.to_bits(), Ordering::Relaxed);
        self.updated.store(now_ns, Ordering::Relaxed);
    }

    /// The estimate at `now_ns`, decayed towards zero for the time since it was last updated;
    /// None before the first sample.
    fn decayed(&self, now_ns: u64) -> Option<f64> {
        let bits = self.estimate.load(Ordering::Relaxed);
        if bits == 0 {
            return None;
        }
        let est = f64::from_bits(bits);
        let elapsed = now_ns.saturating_sub(self.updated.load(Ordering::Relaxed));
        Some(est * (-(elapsed as f64) / DECAY.as_nanos() as f64).exp())
    }

    /// The estimate used to rank endpoints at `now_ns` (the default before any sample).
    fn current(&self, now_ns: u64) -> f64 {
        self.decayed(now_ns)
            .unwrap_or(DEFAULT_LATENCY.as_nanos() as f64)
    }
}

/// The `peak_ewma` balancer: two samples (in proportion to weight), the lower cost per unit of
/// weight wins.
pub struct PeakEwma {
    sampler: Sampler,
}

impl PeakEwma {
    /// A balancer over endpoints with these weights.
    pub fn new(weights: &[u32]) -> PeakEwma {
        PeakEwma {
            sampler: Sampler::new(weights),
        }
    }
}

/// An endpoint's cost at `now_ns` per unit of weight.
fn cost(e: &Endpoint, now_ns: u64) -> f64 {
    e.latency.current(now_ns) * (e.in_flight() as f64 + 1.0) / f64::from(e.weight().max(1))
}

impl Balance for PeakEwma {
    fn pick(&self, endpoints: &[Arc<Endpoint>], eligible: Eligible) -> Option<usize> {
        let n = endpoints.len();
        if n <= 1 {
            return endpoints.first().filter(|e| eligible.accepts(e)).map(|_| 0);
        }
        let a = self.sampler.sample_other_than(usize::MAX);
        let b = self.sampler.sample_other_than(a);
        let now_ns = nanos_since_epoch(Instant::now());
        let pick = match (
            eligible.accepts(&endpoints[a]),
            eligible.accepts(&endpoints[b]),
        ) {
            (true, true) => {
                if cost(&endpoints[b], now_ns) < cost(&endpoints[a], now_ns) {
                    Some(b)
                } else {
                    Some(a)
                }
            }
            (true, false) => Some(a),
            (false, true) => Some(b),
            (false, false) => None,
        };
        // Both samples ineligible: scan so an eligible endpoint is never missed.
        pick.or_else(|| JoinShortestQueue.pick(endpoints, eligible))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::tests::{cluster, spread};

    #[test]
    fn a_slower_sample_is_taken_at_once_and_faster_ones_pull_it_down() {
        let l = Latency::default();
        let t0 = Instant::now();
        let now = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(
            l.current(nanos_since_epoch(t0)),
            30e6,
            "default before any sample"
        );
        l.observe(Duration::from_millis(10), now(0));
        l.observe(Duration::from_millis(100), now(1));
        let peak = l.current(nanos_since_epoch(now(1)));
        assert!((peak - 100e6).abs() < 1e5, "peak taken at once: {peak}");
        // Faster samples, 1 s apart: the estimate moves towards them, a step at a time.
        l.observe(Duration::from_millis(10), now(1001));
        let after = l.current(nanos_since_epoch(now(1001)));
        assert!(after < 100e6 && after > 50e6, "{after}");
        // Idle for a minute: decays towards zero, so the endpoint is tried again.
        let idle = l.current(nanos_since_epoch(now(61_001)));
        assert!(idle < 1e6, "{idle}");
    }

    #[test]
    fn a_slow_endpoint_gets_few_calls_even_with_nothing_in_flight() {
        let c = cluster("peak_ewma", r#"["a:1", "b:1", "c:1"]"#);
        let now = Instant::now();
        for _ in 0..5 {
            c.endpoints[0]
                .latency
                .observe(Duration::from_millis(200), now);
            c.endpoints[1]
                .latency
                .observe(Duration::from_millis(5), now);
            c.endpoints[2]
                .latency
                .observe(Duration::from_millis(5), now);
        }
        let counts = spread(&c, 3000);
        // The slow one wins only when both samples are it... which P2C never draws twice.
        assert_eq!(counts[0], 0, "{counts:?}");
        assert!(counts[1] > 1000 && counts[2] > 1000, "{counts:?}");
    }
}
