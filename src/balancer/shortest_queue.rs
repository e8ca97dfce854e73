use std::cmp::Ordering;
use std::sync::Arc;

use super::{less_loaded, Balance, Eligible, Endpoint};

/// The eligible endpoint with the fewest calls in flight per unit of weight. Ties go to a random one of
/// the tied endpoints with probability proportional to weight, so equal endpoints share evenly and an
/// idle cluster still follows the weights. O(n) per pick: it looks at every endpoint.
pub struct JoinShortestQueue;

impl Balance for JoinShortestQueue {
    fn pick(&self, endpoints: &[Arc<Endpoint>], eligible: Eligible) -> Option<usize> {
        let mut best: Option<usize> = None;
        let mut tied_weight: u64 = 0;
        for (i, e) in endpoints.iter().enumerate() {
            if !eligible.accepts(e) {
                continue;
            }
            let ord = match best {
                None => Ordering::Less,
                Some(b) => less_loaded(e, &endpoints[b]),
            };
            match ord {
                Ordering::Less => {
                    best = Some(i);
                    tied_weight = u64::from(e.weight());
                }
                Ordering::Equal => {
                    // Weighted reservoir sampling over the tied endpoints.
                    tied_weight += u64::from(e.weight());
                    if fastrand::u64(..tied_weight) < u64::from(e.weight()) {
                        best = Some(i);
                    }
                }
                Ordering::Greater => {}
            }
        }
        best
    }
}
