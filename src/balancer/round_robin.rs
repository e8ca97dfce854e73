use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::{Balance, Eligible, Endpoint};

/// Longest schedule we precompute; bigger weight sums are scaled down to fit.
const MAX_SCHEDULE: u64 = 1 << 20;

/// Smooth weighted round robin (as NGINX does it), precomputed: the schedule lists endpoint indices in
/// the order SWRR would pick them over one full cycle, and a pick is one atomic increment into it.
/// With equal weights the schedule is 0, 1, 2, ... and the spread is exact under any concurrency.
pub struct RoundRobin {
    schedule: Vec<u32>,
    next: AtomicUsize,
}

impl RoundRobin {
    /// Builds the schedule for these weights.
    pub fn new(weights: &[u32]) -> RoundRobin {
        Self::starting_at(weights, None)
    }

    /// Builds the schedule for these weights with the rotation starting at `endpoint`'s first
    /// slot: a schedule that replaces another (a new snapshot, new reported weights) carries on
    /// where the old one was instead of sending the next pick to the first endpoint again.
    pub fn starting_at(weights: &[u32], endpoint: Option<usize>) -> RoundRobin {
        let schedule = schedule(weights);
        let next = endpoint
            .and_then(|e| schedule.iter().position(|&i| i as usize == e))
            .unwrap_or(0);
        RoundRobin {
            schedule,
            next: AtomicUsize::new(next),
        }
    }

    /// Endpoint indices in the order the rotation reaches them from where it is, each once.
    pub fn upcoming(&self) -> Vec<usize> {
        let len = self.schedule.len();
        let start = self.next.load(Ordering::Relaxed);
        let mut order: Vec<usize> = Vec::new();
        for k in 0..len {
            let i = self.schedule[start.wrapping_add(k) % len] as usize;
            if !order.contains(&i) {
                order.push(i);
            }
        }
        order
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// One cycle of smooth weighted round robin: each step adds every weight to its running total, picks
/// the largest total and subtracts the weight sum from it. Interleaves (a:1, b:3 → b a b b) instead of
/// sending bursts.
fn schedule(weights: &[u32]) -> Vec<u32> {
    let g = weights
        .iter()
        .fold(0u64, |g, &w| gcd(g, u64::from(w)))
        .max(1);
    let mut w: Vec<u64> = weights.iter().map(|&w| u64::from(w) / g).collect();
    let sum: u64 = w.iter().sum();
    if sum > MAX_SCHEDULE {
        for x in &mut w {
            *x = (*x * MAX_SCHEDULE / sum).max(1);
        }
    }
    let total: i64 = w.iter().sum::<u64>() as i64;
    let mut current = vec![0i64; w.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..w.len() {
            current[i] += w[i] as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(best as u32);
    }
    out
}

impl Balance for RoundRobin {
    fn pick(&self, endpoints: &[Arc<Endpoint>], eligible: Eligible) -> Option<usize> {
        let len = self.schedule.len();
        if len == 0 {
            return None;
        }
        // All available: the first slot is taken. Otherwise take the next eligible slot and move the
        // counter past the ineligible ones too, so they are used up like any other: an unavailable
        // endpoint's share then spreads over the rest in schedule order, where walking on to the next
        // eligible entry alone would hand its whole share to the one after it.
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let first = self.schedule[start % len] as usize;
        if eligible.accepts(&endpoints[first]) {
            return Some(first);
        }
        let (skipped, i) = (1..len)
            .map(|k| (k, self.schedule[start.wrapping_add(k) % len] as usize))
            .find(|&(_, i)| eligible.accepts(&endpoints[i]))?;
        self.next.fetch_add(skipped, Ordering::Relaxed);
        Some(i)
    }

    fn upcoming(&self) -> Vec<usize> {
        RoundRobin::upcoming(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::tests::{cluster, cluster_config, spread};
    use crate::balancer::Cluster;
    use crate::metrics::Metrics;

    #[test]
    fn swrr_interleaves() {
        assert_eq!(schedule(&[1, 1, 1]), vec![0, 1, 2]);
        assert_eq!(schedule(&[1, 3]), vec![1, 0, 1, 1]);
        assert_eq!(schedule(&[2, 6]), vec![1, 0, 1, 1]);
        assert_eq!(schedule(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn exact_spread() {
        let c = cluster("round_robin", r#"["a:1", "b:1", "c:1"]"#);
        assert_eq!(spread(&c, 3000), vec![1000, 1000, 1000]);
        let c = cluster("round_robin", r#"["a:1", { address = "b:1", weight = 3 }]"#);
        assert_eq!(spread(&c, 4000), vec![1000, 3000]);
    }

    /// An unavailable endpoint's share goes to the others evenly, not all to the one after it.
    #[test]
    fn unavailable_share_spreads_evenly() {
        let c = cluster("round_robin", r#"["a:1", "b:1", "c:1", "d:1"]"#);
        c.endpoints[1].set_healthy(false);
        assert_eq!(spread(&c, 3000), vec![1000, 0, 1000, 1000]);
        c.endpoints[2].set_healthy(false);
        assert_eq!(spread(&c, 3000), vec![1500, 0, 0, 1500]);
    }

    /// A new snapshot carries on the rotation where the old one was (by address), skipping
    /// endpoints that left, instead of starting over at the first endpoint.
    #[test]
    fn new_snapshot_keeps_the_rotation() {
        let c = cluster("round_robin", r#"["a:1", "b:1", "c:1"]"#);
        assert_eq!(c.pick(), Some(0));
        let rebuilt = |c: &Cluster, endpoints: &str| {
            let config = cluster_config("round_robin", endpoints);
            Cluster::build(&config, &config.endpoints, &Metrics::new(), Some(c)).0
        };
        // d joins: the next pick is still b, and the cycle goes on from there.
        let c = rebuilt(&c, r#"["a:1", "b:1", "c:1", "d:1"]"#);
        let picks: Vec<_> = (0..4)
            .map(|_| c.endpoints[c.pick().unwrap()].address.clone())
            .collect();
        assert_eq!(picks, ["b:1", "c:1", "d:1", "a:1"]);
        // b (next in line) leaves: the rotation goes on with the one after it.
        let c = rebuilt(&c, r#"["a:1", "c:1", "d:1"]"#);
        assert_eq!(c.endpoints[c.pick().unwrap()].address, "c:1");
    }
}
