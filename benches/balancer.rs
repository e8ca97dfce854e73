//! The cost of one pick (`Cluster::pick()`) for each balancer at 3, 100 and 10,000 endpoints.
//!
//! Run with `cargo bench --bench balancer` (add `-- --warm-up-time 1 --measurement-time 2` for a quick
//! run). Groups:
//! - `pick/<balancer>`: an idle cluster of equal-weight endpoints (nothing in flight).
//! - `pick/<balancer>_weighted`: weights cycling 1..=10.
//! - `pick/<balancer>_loaded`: the load-aware balancers with 0..=7 calls in flight per endpoint, so
//!   comparisons are not all ties.
//!
//! Round robin and least_request (P2C) are O(1) and must not grow with the endpoint count;
//! join_shortest_queue looks at every endpoint and is O(n) by design.

use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use grpcgate::balancer::{Cluster, InFlight};
use grpcgate::metrics::Metrics;
use grpcgate::Config;

const SIZES: [usize; 3] = [3, 100, 10_000];

/// A cluster of `n` endpoints 10.0.x.y:50051 with this balancer; `weight(i)` gives endpoint i's
/// weight (None: the plain `"host:port"` form).
fn cluster(balancer: &str, n: usize, weight: impl Fn(usize) -> Option<u32>) -> Cluster {
    let endpoints: Vec<String> = (0..n)
        .map(|i| {
            let address = format!("10.0.{}.{}:50051", i / 250, i % 250 + 1);
            match weight(i) {
                None => format!("\"{address}\""),
                Some(w) => format!("{{ address = \"{address}\", weight = {w} }}"),
            }
        })
        .collect();
    let text = format!(
        "[[listeners]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n\n[[clusters]]\nname = \"c\"\nbalancer = \"{balancer}\"\nendpoints = [{}]\n",
        endpoints.join(", ")
    );
    let config = Config::parse(&text, "bench", Path::new(".")).expect("valid bench config");
    Cluster::new(&config.clusters[0], &Metrics::new())
}

/// Holds 0..=7 calls in flight on each endpoint (pseudo-random but fixed) until dropped.
fn load(c: &Cluster) -> Vec<InFlight> {
    let mut state: u32 = 0x9e37_79b9;
    let mut held = Vec::new();
    for e in &c.endpoints {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        for _ in 0..(state % 8) {
            held.push(e.start_call());
        }
    }
    held
}

fn bench_group(
    crit: &mut Criterion,
    name: &str,
    balancer: &str,
    weight: impl Fn(usize) -> Option<u32> + Copy,
    loaded: bool,
) {
    let mut group = crit.benchmark_group(format!("pick/{name}"));
    for n in SIZES {
        let c = cluster(balancer, n, weight);
        let _held = if loaded { load(&c) } else { Vec::new() };
        assert!(c.pick().is_some());
        group.bench_with_input(BenchmarkId::from_parameter(n), &c, |b, c| {
            b.iter(|| black_box(c.pick()))
        });
    }
    group.finish();
}

fn picks(crit: &mut Criterion) {
    let equal = |_| None;
    let weighted = |i: usize| Some((i % 10) as u32 + 1);
    for balancer in [
        "round_robin",
        "join_shortest_queue",
        "least_request",
        "peak_ewma",
    ] {
        bench_group(crit, balancer, balancer, equal, false);
    }
    for balancer in ["round_robin", "least_request"] {
        bench_group(
            crit,
            &format!("{balancer}_weighted"),
            balancer,
            weighted,
            false,
        );
    }
    for balancer in ["join_shortest_queue", "least_request", "peak_ewma"] {
        bench_group(crit, &format!("{balancer}_loaded"), balancer, equal, true);
    }
}

criterion_group!(benches, picks);
criterion_main!(benches);
