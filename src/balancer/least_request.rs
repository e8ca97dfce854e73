use std::cmp::Ordering;
use std::sync::Arc;

use super::{less_loaded, Balance, Eligible, Endpoint, JoinShortestQueue};

/// Power of d choices: sample `choices` endpoints (at random, in proportion to weight), take the one
/// with the fewest calls in flight per unit of weight; on a tie the first sample wins, so an idle
/// cluster follows the weights. O(1) per pick whatever the cluster size.
pub struct LeastRequest {
    choices: usize,
    sampler: Sampler,
}

impl LeastRequest {
    /// A P2C balancer over endpoints with these weights, sampling `choices` (at least 2) per pick.
    pub fn new(weights: &[u32], choices: usize) -> LeastRequest {
        LeastRequest {
            choices: choices.max(2),
            sampler: Sampler::new(weights),
        }
    }
}

impl Balance for LeastRequest {
    fn pick(&self, endpoints: &[Arc<Endpoint>], eligible: Eligible) -> Option<usize> {
        let n = endpoints.len();
        if n <= 1 {
            return endpoints.first().filter(|e| eligible.accepts(e)).map(|_| 0);
        }
        let mut best: Option<usize> = None;
        let mut previous = usize::MAX;
        for _ in 0..self.choices {
            let i = self.sampler.sample_other_than(previous);
            previous = i;
            let e = &endpoints[i];
            if eligible.accepts(e)
                && best.is_none_or(|b| less_loaded(e, &endpoints[b]) == Ordering::Less)
            {
                best = Some(i);
            }
        }
        // Every sample ineligible: scan so an eligible endpoint is never missed.
        best.or_else(|| JoinShortestQueue.pick(endpoints, eligible))
    }
}

/// Draws an endpoint index at random, in proportion to weight: uniform when weights are equal,
/// otherwise Vose's alias method (O(1) per draw).
pub(super) enum Sampler {
    Uniform(usize),
    Alias { prob: Vec<f64>, alias: Vec<u32> },
}

impl Sampler {
    pub(super) fn new(weights: &[u32]) -> Sampler {
        let n = weights.len();
        if weights.windows(2).all(|w| w[0] == w[1]) {
            return Sampler::Uniform(n);
        }
        let sum: f64 = weights.iter().map(|&w| f64::from(w)).sum();
        let mut scaled: Vec<f64> = weights
            .iter()
            .map(|&w| f64::from(w) * n as f64 / sum)
            .collect();
        let mut prob = vec![1.0; n];
        let mut alias: Vec<u32> = (0..n as u32).collect();
        let (mut small, mut large): (Vec<usize>, Vec<usize>) =
            (0..n).partition(|&i| scaled[i] < 1.0);
        while let (Some(s), Some(&l)) = (small.pop(), large.last()) {
            prob[s] = scaled[s];
            alias[s] = l as u32;
            scaled[l] -= 1.0 - scaled[s];
            if scaled[l] < 1.0 {
                large.pop();
                small.push(l);
            }
        }
        Sampler::Alias { prob, alias }
    }

    /// A sample that differs from `previous`, so two choices always compare two endpoints. Weighted:
    /// redraw a few times (keeping the draw proportional to weight), then take any other endpoint.
    #[inline]
    pub(super) fn sample_other_than(&self, previous: usize) -> usize {
        let n = match self {
            Sampler::Uniform(n) => *n,
            Sampler::Alias { prob, .. } => prob.len(),
        };
        if previous >= n {
            return self.sample();
        }
        if let Sampler::Alias { .. } = self {
            for _ in 0..8 {
                let i = self.sample();
                if i != previous {
                    return i;
                }
            }
        }
        (previous + 1 + fastrand::usize(..n - 1)) % n
    }

    #[inline]
    fn sample(&self) -> usize {
        match self {
            Sampler::Uniform(n) => fastrand::usize(..*n),
            Sampler::Alias { prob, alias } => {
                let i = fastrand::usize(..prob.len());
                if fastrand::f64() < prob[i] {
                    i
                } else {
                    alias[i] as usize
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alias_sampler_follows_weights() {
        let s = Sampler::new(&[1, 3, 6]);
        let mut counts = [0usize; 3];
        for _ in 0..100_000 {
            counts[s.sample()] += 1;
        }
        for (c, want) in counts.iter().zip([0.1, 0.3, 0.6]) {
            assert!((*c as f64 / 100_000.0 - want).abs() < 0.01, "{counts:?}");
        }
    }
}
