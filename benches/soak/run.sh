#!/usr/bin/env bash
# The soak: mixed gRPC load with cancels, deadlines, errors and reloads through a release build of
# grpcgate, sampling its RSS, open files and CPU every 10 s (benches/soak/soak.rs), then a plot and a
# flatness check.
#   bash benches/soak/run.sh                 # 10 minutes; DURATION=120 for a short run
# Writes benches/soak/soak.csv, soak.svg and grpcgate.log (the proxy's log); prints the verdict:
# RSS and open files after the warm-up (WARMUP seconds, default 60) within 5 % of their first
# post-warm-up sample, and no unexpected call outcome.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
DURATION=${DURATION:-600}
WARMUP=${WARMUP:-60}
CONCURRENCY=${CONCURRENCY:-32}
# Two builds: one that also builds the example would give the binary tokio's test-util feature (the
# example's dev-dependencies are unified with it).
cargo build --release --bin grpcgate
cargo build --release --example soak
target/release/examples/soak --grpcgate target/release/grpcgate --duration "$DURATION" \
    --concurrency "$CONCURRENCY" --out benches/soak
python3 benches/soak/plot.py benches/soak/soak.csv benches/soak/soak.svg --warmup "$WARMUP"
