#!/usr/bin/env bash
# System calls of one grpcgate binary per unary call (or per streamed message), counted with
# `perf stat` (syscalls:sys_enter_* tracepoints, no tracing overhead) over a fixed load, with
# callgrind.sh's config and pinning (workers = 1, proxy on CPU 1, load generator and echo backends on CPU 0).
# usage: syscalls.sh GRPCGATE_BINARY   LOAD (default "unary-closed -c 4 -s 32 --payload 64"; for streaming
# "stream -c 2 -s 4 --count 1000 --payload 1024", then per message), SECS (5), ROUNDS (3).
# Uses LOADGEN / ECHO_SERVER (default: this tree's target/release/examples). Needs perf and tracefs (root).
set -euo pipefail
BIN=$1
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
LOADGEN=${LOADGEN:-$ROOT/target/release/examples/loadgen}
ECHO_SERVER=${ECHO_SERVER:-$ROOT/target/release/examples/echo-server}
LOAD=${LOAD:-"unary-closed -c 4 -s 32 --payload 64"}
SECS=${SECS:-5} ROUNDS=${ROUNDS:-3} PORT=${PORT:-19800}
EVENTS=syscalls:sys_enter_recvfrom,syscalls:sys_enter_writev,syscalls:sys_enter_sendto,syscalls:sys_enter_write,syscalls:sys_enter_epoll_wait
W=$(mktemp -d /tmp/perf-sc.XXXXXX)
. "$(dirname "$0")/perf-session/bench-setup.sh"
bench_config
start_echo
taskset -c 1 "$BIN" --config "$W/gg.toml" >"$W/gg.log" 2>&1 &
GG=$!
trap 'kill $GG $ECHO 2>/dev/null; wait $GG $ECHO 2>/dev/null; rm -rf "$W"' EXIT
wait_proxy
taskset -c 0 "$LOADGEN" $LOAD -t 127.0.0.1:$PORT -d 2 --warmup 0 >/dev/null
for r in $(seq "$ROUNDS"); do
  perf stat -x, -e "$EVENTS" -p $GG -o "$W/perf.$r" &
  PERF=$!
  sleep 0.2   # perf attached before the load starts; an idle proxy makes no system calls
  taskset -c 0 "$LOADGEN" $LOAD -t 127.0.0.1:$PORT -d "$SECS" --warmup 0 --label sc >"$W/load.$r.json"
  kill -INT $PERF; wait $PERF || true
  python3 - "$W/load.$r.json" "$W/perf.$r" "$BIN" "$LOAD" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
n, msgs = d["requests"], d.get("messages", 0)
div, unit = (msgs, "message") if msgs else (n, "call")
c = {}
for line in open(sys.argv[2]):
    f = line.strip().split(",")
    if len(f) > 2 and f[2].startswith("syscalls:sys_enter_"):
        c[f[2][len("syscalls:sys_enter_"):]] = int(f[0])
print(json.dumps({"binary": sys.argv[3], "load": sys.argv[4], "requests": n, "messages": msgs,
                  "errors": d.get("errors", 0), "per": unit,
                  **{k + "_per_" + unit: round(v / div, 3) for k, v in c.items()}}))
PY
done
