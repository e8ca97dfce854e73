#!/usr/bin/env bash
# Instructions and atomics per unary call of one grpcgate binary under callgrind (benches/load/README.md,
# "Diagnostics"). usage: callgrind.sh GRPCGATE_BINARY OUT_PREFIX
# Uses LOADGEN / ECHO_SERVER (default: this tree's target/release/examples), workers = 1, proxy on CPU 1,
# load generator and echo backends on CPU 0. Warm-up load first, then callgrind_control -z, the measured
# load (LOAD, SECS; warm-up 0, so every call counted by the generator is in the zeroed window), 1 s for the
# connections to close, callgrind_control -d. PER=message: atomics per streamed message instead of per call.
# LISTENER_KEYS: extra keys for the listener (e.g. 'x_forwarded_for = false'); TOML_TOP: extra top-level TOML
# before it (e.g. '[access_log]' and 'path = "/tmp/al.log"', one per line).
set -euo pipefail
BIN=$1 OUT=$2
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
LOADGEN=${LOADGEN:-$ROOT/target/release/examples/loadgen}
ECHO_SERVER=${ECHO_SERVER:-$ROOT/target/release/examples/echo-server}
LOAD=${LOAD:-"unary-closed -c 4 -s 32 --payload 64"}
SECS=${SECS:-10}
PORT=${PORT:-19600}
W=$(mktemp -d /tmp/perf-cg.XXXXXX)
. "$(dirname "$0")/bench-setup.sh"
bench_config
start_echo
taskset -c 1 valgrind --tool=callgrind --dump-instr=yes --callgrind-out-file="$OUT.%p" "$BIN" --config "$W/gg.toml" >"$W/gg.log" 2>&1 &
GG=$!
wait_proxy 300 0.2
# warm-up: connections up, pools and allocator warm
taskset -c 0 "$LOADGEN" $LOAD -t 127.0.0.1:$PORT -d 2 --warmup 0 >/dev/null
sleep 1
callgrind_control -z $GG >/dev/null
taskset -c 0 "$LOADGEN" $LOAD -t 127.0.0.1:$PORT -d "$SECS" --warmup 0 --label cg >"$W/load.json"
sleep 1
callgrind_control -d $GG >/dev/null
sleep 1
kill $GG; wait $GG 2>/dev/null || true
kill $ECHO; wait $ECHO 2>/dev/null || true
REQ=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["requests"], d.get("errors",0), d.get("messages",0), d["bytes_recv"])' "$W/load.json")
DUMP=$(ls "$OUT.$GG".* | sort | head -1)   # the -d dump (.1); the exit dump is OUT.PID
IR=$(grep -m1 '^summary:\|^totals:' "$DUMP" | awk '{print $2}')
set -- $REQ
echo "binary=$BIN load=[$LOAD] requests=$1 errors=$2 messages=$3 bytes_recv=$4 Ir=$IR Ir_per_call=$(python3 -c "print(round($IR/$1))") dump=$DUMP"
if [[ $3 != 0 ]]; then echo "Ir_per_message=$(python3 -c "print(round($IR/$3))") Ir_per_MB=$(python3 -c "print(round($IR/($4/1e6)))")"; fi
DIV=${DIV:-$1}; [[ ${PER:-call} == message ]] && DIV=$3
if [[ ${ATOMICS:-1} == 1 ]]; then python3 "$ROOT/benches/load/count_atomics.py" "$BIN" "$DUMP" "$DIV" ${TOP:-}; fi
rm -rf "$W"
