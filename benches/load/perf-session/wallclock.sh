#!/usr/bin/env bash
# Alternating wall-clock runs of two grpcgate binaries (and direct), same load, same pinning as run.sh:
# proxy on CPU 1 (workers = 1), generator and 2 echo backends on CPU 0. A fresh proxy per run.
# usage: wallclock.sh OUT.jsonl NAME=BINARY... ; ROUNDS, DURATION, WARMUP, SCEN ("name|loadgen args;...")
set -euo pipefail
OUTF=$1; shift
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
LOADGEN=${LOADGEN:-$ROOT/target/release/examples/loadgen}
ECHO_SERVER=${ECHO_SERVER:-$ROOT/target/release/examples/echo-server}
ROUNDS=${ROUNDS:-5} DURATION=${DURATION:-5} WARMUP=${WARMUP:-1} PORT=${PORT:-19700}
SCEN=${SCEN:-"stream-1k|stream -c 2 -s 4 --count 1000 --payload 1024;stream-64k|stream -c 2 -s 4 --count 100 --payload 65536"}
W=$(mktemp -d /tmp/perf-wc.XXXXXX)
. "$(dirname "$0")/bench-setup.sh"
bench_config
start_echo
trap 'kill $ECHO 2>/dev/null; rm -rf "$W"' EXIT
IFS=';' read -ra SCENS <<<"$SCEN"
for r in $(seq "$ROUNDS"); do
  for sc in "${SCENS[@]}"; do
    name=${sc%%|*} args=${sc#*|}
    for sys in "$@" direct; do
      label=${sys%%=*} bin=${sys#*=}
      if [[ $label == direct ]]; then
        taskset -c 0 "$LOADGEN" $args -t 127.0.0.1:$((PORT+51)),127.0.0.1:$((PORT+52)) -d "$DURATION" --warmup "$WARMUP" \
          --label direct --name "$name" --load-pid $ECHO | sed "s/^{/{\"round\":$r,/" >>"$OUTF"
        continue
      fi
      taskset -c 1 "$bin" --config "$W/gg.toml" >>"$W/gg.log" 2>&1 &
      GG=$!
      wait_proxy
      taskset -c 0 "$LOADGEN" $args -t 127.0.0.1:$PORT -d "$DURATION" --warmup "$WARMUP" --label "$label" --name "$name" \
        --proxy-pid $GG --load-pid $ECHO | sed "s/^{/{\"round\":$r,/" >>"$OUTF"
      kill $GG; wait $GG 2>/dev/null || true
    done
  done
  echo "round $r done $(date -u +%T)" >&2
done
