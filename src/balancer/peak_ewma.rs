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

/// The process's reference instant for the timestamps stored in atomics. Set a while before the
/// first use, so that an instant taken a little before that first use (by another thread, or from a
/// test's paused clock, which starts at the moment its runtime was built) is still after it: before
/// the epoch, timestamps would all read as 0.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(|| {
        let now = Instant::now();
        // The monotonic clock may start at boot, less than the margin ago: then a shorter one.
        [3600, 60, 1]
            .into_iter()
            .find_map(|s| now.checked_sub(Duration::from_secs(s)))
            .unwrap_or(now)
    })
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
            Some(_) => {
                // EWMA towards the faster sample, weighted by how long ago the estimate was made.
                // From the stored estimate, not the decayed one: decaying it here as well would
                // count the elapsed time twice (a 5 s decay, and a pull towards half the sample).
                let stored = f64::from_bits(self.estimate.load(Ordering::Relaxed));
                let elapsed = now_ns.saturating_sub(self.updated.load(Ordering::Relaxed));
                let w = (-(elapsed as f64) / DECAY.as_nanos() as f64).exp();
                stored * w + sample * (1.0 - w)
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

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// The estimate at the (paused) clock's now, in ms.
    fn estimate_ms(l: &Latency) -> f64 {
        l.current(nanos_since_epoch(Instant::now())) / 1e6
    }

    fn assert_close(actual: f64, expected: f64, what: &str) {
        assert!(
            (actual - expected).abs() < 1e-6 * expected.max(1.0),
            "{what}: {actual} ms, expected {expected} ms"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_samples_means_the_30ms_default_at_any_time() {
        let l = Latency::default();
        assert_close(estimate_ms(&l), 30.0, "at once");
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_close(
            estimate_ms(&l),
            30.0,
            "an hour later: the default does not decay",
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_peak_is_taken_at_once() {
        let l = Latency::default();
        l.observe(ms(10), Instant::now());
        assert_close(estimate_ms(&l), 10.0, "first sample");
        tokio::time::advance(ms(1)).await;
        l.observe(ms(100), Instant::now());
        // The slower sample replaces the estimate whole, not averaged in with the 10 ms.
        assert_close(estimate_ms(&l), 100.0, "peak");
        tokio::time::advance(ms(1)).await;
        l.observe(ms(250), Instant::now());
        assert_close(estimate_ms(&l), 250.0, "a higher peak");
    }

    #[tokio::test(start_paused = true)]
    async fn faster_samples_pull_it_down_with_the_10s_decay() {
        let l = Latency::default();
        l.observe(ms(100), Instant::now());
        // One 10 ms sample a second later moves it by 1 - e^-0.1 of the gap, no more.
        tokio::time::advance(Duration::from_secs(1)).await;
        l.observe(ms(10), Instant::now());
        let w = (-0.1f64).exp();
        assert_close(estimate_ms(&l), 100.0 * w + 10.0 * (1.0 - w), "after 1 s");
        // A 10 ms sample every 100 ms for 10 s more: the gap shrinks by e^-1 (the decay is 10 s),
        // however the samples are spaced.
        let gap = estimate_ms(&l) - 10.0;
        for _ in 0..100 {
            tokio::time::advance(ms(100)).await;
            l.observe(ms(10), Instant::now());
        }
        assert_close(estimate_ms(&l), 10.0 + gap * (-1.0f64).exp(), "after 10 s");
        assert!(estimate_ms(&l) > 30.0, "still well above the fast samples");
    }

    #[tokio::test(start_paused = true)]
    async fn without_samples_it_decays_towards_zero() {
        let l = Latency::default();
        l.observe(ms(100), Instant::now());
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_close(estimate_ms(&l), 100.0 * (-1.0f64).exp(), "10 s idle");
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_close(estimate_ms(&l), 100.0 * (-3.0f64).exp(), "30 s idle");
        // A sample above the decayed estimate is a new peak.
        l.observe(ms(20), Instant::now());
        assert_close(estimate_ms(&l), 20.0, "new peak after idling");
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
