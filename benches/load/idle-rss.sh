#!/usr/bin/env bash
# RSS per idle downstream connection of one grpcgate binary: run.sh's `idle` scenario alone, with
# run.sh's grpcgate config and pinning (proxy on CPU 1, load generator and 2 echo backends on CPU 0),
# a fresh proxy per round. usage: idle-rss.sh GRPCGATE_BINARY [LABEL]
# ROUNDS (default 3), IDLE_CONNS (1000), SETTLE (seconds between the last call and the RSS reading,
# loadgen's --settle, default 1 as in run.sh). Prints one JSON line per round (loadgen's idle result).
# Uses LOADGEN / ECHO_SERVER (default: this tree's target/release/examples).
set -euo pipefail
BIN=$1 LABEL=${2:-grpcgate}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
LOADGEN=${LOADGEN:-$ROOT/target/release/examples/loadgen}
ECHO_SERVER=${ECHO_SERVER:-$ROOT/target/release/examples/echo-server}
ROUNDS=${ROUNDS:-3} IDLE_CONNS=${IDLE_CONNS:-1000} SETTLE=${SETTLE:-1} PORT=${PORT:-19700}
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
W=$(mktemp -d /tmp/idle-rss.XXXXXX)
. "$(dirname "$0")/perf-session/bench-setup.sh"
LISTENER_KEYS="max_concurrent_streams = 1000" bench_config
start_echo
trap 'kill $ECHO 2>/dev/null; wait $ECHO 2>/dev/null; rm -rf "$W"' EXIT
for _ in $(seq "$ROUNDS"); do
  taskset -c 1 "$BIN" --config "$W/gg.toml" >"$W/gg.log" 2>&1 &
  GG=$!
  wait_proxy
  taskset -c 0 "$LOADGEN" idle -c "$IDLE_CONNS" --payload 64 --settle "$SETTLE" --name idle --label "$LABEL" \
    -t "127.0.0.1:$PORT" --proxy-pid "$GG"
  kill $GG; wait $GG 2>/dev/null || true
done
