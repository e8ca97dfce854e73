use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::{Balance, Endpoint};

/// Each healthy endpoint in turn: one atomic increment per pick, exact spread under any concurrency.
#[derive(Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Balance for RoundRobin {
    fn pick(&self, endpoints: &[Arc<Endpoint>]) -> Option<usize> {
        let n = endpoints.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        // All healthy: the first probe hits. Otherwise skip ahead to the next healthy endpoint.
        (0..n)
            .map(|k| (start.wrapping_add(k)) % n)
            .find(|&i| endpoints[i].is_healthy())
    }
}
