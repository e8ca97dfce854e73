#!/usr/bin/env bash
# The fleet benchmark (issue 21): 8 grpcgate processes in front of the same 3 echo backends, one 5x
# slower, each proxy driven by its own client at 1-2 calls in flight; per balancer the slow
# backend's share and the fleet's p50/p99. See benches/fleet/README.md.
#
#   bash benches/fleet/run.sh                       # builds, runs (~3 min), writes results.{md,json}
#   BUILD=0 SECONDS_PER_RUN=5 bash benches/fleet/run.sh
#   BALANCERS=least_request,peak_ewma bash benches/fleet/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"

BUILD=${BUILD:-1}                    # 0: use what $CARGO_TARGET_DIR/release holds
OUT_DIR=${OUT_DIR:-benches/fleet}    # results.md, results.json
PROXIES=${PROXIES:-8}
IN_FLIGHT=${IN_FLIGHT:-1,2}          # per client, cycled over the clients
FAST_MS=${FAST_MS:-10}
SLOW_MS=${SLOW_MS:-50}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-20}
WARMUP=${WARMUP:-3}
BLACKOUT=${BLACKOUT:-10}             # weighted_round_robin's blackout_period (gRPC's default)
BALANCERS=${BALANCERS:-round_robin,least_request,join_shortest_queue,peak_ewma,weighted_round_robin}
NICE=${NICE:-0}                      # e.g. -5 (root): the benchmark's processes ahead of other work

if [ "$BUILD" = 1 ]; then
  # Two invocations on purpose: the proxy as `cargo build --release` ships it, without the features
  # dev-dependencies add (tokio's test-util, which makes every Instant::now() consult the mockable
  # clock); the example is built with them, in its own copy of the library.
  cargo build --release --locked --bin grpcgate
  cargo build --release --locked --example fleet
fi

LABEL="commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo '+dirty'), \
$(nproc) CPUs, $(uname -r), $(date -u +%Y-%m-%dT%H:%MZ)"

# The driver runs in its own session so that every process it starts (the 8 proxies) can be
# stopped as a group whatever way this script ends.
LABEL="$LABEL, nice $NICE"
setsid nice -n "$NICE" "$CARGO_TARGET_DIR/release/examples/fleet" \
  --grpcgate "$CARGO_TARGET_DIR/release/grpcgate" \
  --proxies "$PROXIES" --in-flight "$IN_FLIGHT" --fast-ms "$FAST_MS" --slow-ms "$SLOW_MS" \
  --seconds "$SECONDS_PER_RUN" --warmup "$WARMUP" --blackout "$BLACKOUT" \
  --balancers "$BALANCERS" --out-dir "$OUT_DIR" --label "$LABEL" &
DRIVER=$!
trap 'kill -TERM -- "-$DRIVER" 2>/dev/null || true' EXIT INT TERM
wait "$DRIVER"
