use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::{Balance, Endpoint};

/// The healthy endpoint with the fewest calls in flight; the scan starts at a rotating offset so that
/// equally loaded endpoints share calls evenly instead of the first one taking every tie.
#[derive(Default)]
pub struct JoinShortestQueue {
    offset: AtomicUsize,
}

impl Balance for JoinShortestQueue {
    fn pick(&self, endpoints: &[Arc<Endpoint>]) -> Option<usize> {
        let n = endpoints.len();
        if n == 0 {
            return None;
        }
        let start = self.offset.fetch_add(1, Ordering::Relaxed);
        let mut best: Option<(usize, usize)> = None;
        for k in 0..n {
            let i = start.wrapping_add(k) % n;
            let e = &endpoints[i];
            if !e.is_healthy() {
                continue;
            }
            let load = e.in_flight();
            if best.is_none_or(|(_, b)| load < b) {
                best = Some((i, load));
                if load == 0 {
                    break;
                }
            }
        }
        best.map(|(i, _)| i)
    }
}
