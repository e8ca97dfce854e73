#!/usr/bin/env bash
# The fleet benchmark over several service times (fast/slow, the slow backend always 5x slower):
# least_request against peak_ewma, to show where a latency signal beats in-flight counts and where the
# fast backends' own latency tails drown it. Writes sweep.md (+ one results dir per pair) under OUT_DIR.
#
#   bash benches/fleet/sweep.sh                         # builds, then ~1.5 min per pair
#   BUILD=0 PAIRS="2/10 20/100" bash benches/fleet/sweep.sh
#
# Other knobs are run.sh's (PROXIES, IN_FLIGHT, SECONDS_PER_RUN, WARMUP, NICE, BALANCERS).
set -euo pipefail
cd "$(dirname "$0")/../.."
PAIRS=${PAIRS:-"2/10 5/25 10/50 20/100"}
OUT_DIR=${OUT_DIR:-benches/fleet/sweep}
export BALANCERS=${BALANCERS:-least_request,peak_ewma}
BUILD=${BUILD:-1}

mkdir -p "$OUT_DIR"
for pair in $PAIRS; do
  fast=${pair%/*} slow=${pair#*/}
  echo "sweep: fast ${fast} ms, slow ${slow} ms" >&2
  BUILD=$BUILD FAST_MS=$fast SLOW_MS=$slow OUT_DIR="$OUT_DIR/$fast-$slow" bash benches/fleet/run.sh
  BUILD=0 # once is enough
done

python3 - "$OUT_DIR" $PAIRS >"$OUT_DIR/sweep.md" <<'EOF'
import json, sys
out, pairs = sys.argv[1], sys.argv[2:]
print("| fast / slow ms | balancer | slow share | fleet p50 ms | fleet p99 ms | p99 ms slow / fast-1 / fast-2 | calls/s | machine busy CPU-s/s | others CPU-s/s |")
print("|---|---|---:|---:|---:|---|---:|---:|---:|")
targets = []
label = None
for pair in pairs:
    fast, slow = pair.split("/")
    d = json.load(open(f"{out}/{fast}-{slow}/results.json"))
    label = label or d["label"]
    runs = {r["balancer"]: r for r in d["runs"]}
    for name, r in runs.items():
        b = r["backend_p99_ms"]
        print(f"| {fast} / {slow} | {name} | {100 * r['slow_share']:.2f} % | {r['p50_ms']:.2f} | "
              f"{r['p99_ms']:.2f} | {b['slow']:.1f} / {b['fast-1']:.1f} / {b['fast-2']:.1f} | "
              f"{r['calls_per_s']:.0f} | {r['machine_busy_cpu_s_per_s']:.2f} | {r['others_cpu_s_per_s']:.2f} |")
    if "least_request" in runs and "peak_ewma" in runs:
        lr, pe = runs["least_request"], runs["peak_ewma"]
        share = pe["slow_share"] / lr["slow_share"]
        p99 = lr["p99_ms"] / pe["p99_ms"]
        targets.append(f"| {fast} / {slow} | {share:.2f}x ({'met' if share <= 1 / 3 else 'missed'}) | "
                       f"{p99:.2f}x ({'met' if p99 >= 2 else 'missed'}) |")
print()
print(f"First run: {label}")
print()
print("| fast / slow ms | peak_ewma's slow share / least_request's (target <= 0.33x) | least_request's fleet p99 / peak_ewma's (target >= 2x) |")
print("|---|---|---|")
print("\n".join(targets))
EOF
cat "$OUT_DIR/sweep.md"
