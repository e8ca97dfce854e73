use std::sync::Arc;

use super::{Balance, Endpoint, JoinShortestQueue};

/// Power of `choices` random choices: sample that many distinct endpoints, take the least loaded.
/// O(1) per pick whatever the cluster size.
pub struct LeastRequest {
    choices: usize,
    fallback: JoinShortestQueue,
}

impl LeastRequest {
    /// A P2C balancer sampling `choices` endpoints per pick (at least 2).
    pub fn new(choices: usize) -> LeastRequest {
        LeastRequest {
            choices: choices.max(2),
            fallback: JoinShortestQueue::default(),
        }
    }
}

impl Balance for LeastRequest {
    fn pick(&self, endpoints: &[Arc<Endpoint>]) -> Option<usize> {
        let n = endpoints.len();
        match n {
            0 => return None,
            1 => return endpoints[0].is_healthy().then_some(0),
            _ => {}
        }
        let mut best: Option<(usize, usize)> = None;
        let first = fastrand::usize(..n);
        for k in 0..self.choices.min(n) {
            // Distinct samples: the first at random, the rest at random offsets that skip it.
            let i = if k == 0 {
                first
            } else {
                (first + 1 + fastrand::usize(..n - 1)) % n
            };
            let e = &endpoints[i];
            if !e.is_healthy() {
                continue;
            }
            let load = e.in_flight();
            if best.is_none_or(|(_, b)| load < b) {
                best = Some((i, load));
            }
        }
        // Every sample unhealthy: fall back to a full scan so a healthy endpoint is never missed.
        best.map(|(i, _)| i)
            .or_else(|| self.fallback.pick(endpoints))
    }
}
