#!/usr/bin/env bash
# Builds grpcgate with profile-guided optimisation (PGO):
#   1. an instrumented release build (-Cprofile-generate);
#   2. a training run: the load generator against the echo backends through that binary, over h2c and
#      TLS (unary at high and at low concurrency, server streaming, connection churn, 10k streams);
#   3. the optimised release build (-Cprofile-use) from the merged profile.
# The optimised binary ends up in target/pgo/<host>/release/grpcgate; that path is all the script prints
# on stdout (progress goes to stderr), so `bin=$(bash benches/load/pgo.sh)` works.
#
#   bash benches/load/pgo.sh
#   TRAIN_SECONDS=5 bash benches/load/pgo.sh     # a longer training run (default 3 s per scenario)
#
# Needs llvm-profdata matching rustc's LLVM (`rustup component add llvm-tools`; tried automatically).
set -euo pipefail

cd "$(dirname "$0")/../.."
ROOT=$PWD
TRAIN_SECONDS=${TRAIN_SECONDS:-3}
BASE_PORT=${PGO_BASE_PORT:-19500}  # backends BASE+1, BASE+2; h2c listener BASE+10, TLS listener BASE+11

log() { printf '[pgo.sh] %s\n' "$*" >&2; }

HOST=$(rustc -vV | sed -n 's/^host: //p')
PROFDATA=$(rustc --print sysroot)/lib/rustlib/$HOST/bin/llvm-profdata
if [[ ! -x $PROFDATA ]]; then
  log "llvm-profdata missing: rustup component add llvm-tools"
  rustup component add llvm-tools >&2 || true
fi
if [[ ! -x $PROFDATA ]]; then
  log "no llvm-profdata for this toolchain ($PROFDATA); install the llvm-tools component"
  exit 1
fi

WORK=$(mktemp -d /tmp/grpcgate-pgo.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

wait_port() {
  local port=$1
  for _ in $(seq 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  log "nothing listens on port $port"
  return 1
}

# The load generator and the echo backends are ordinary release builds. `--target` keeps RUSTFLAGS off
# build scripts and proc macros, so only grpcgate itself is instrumented.
log "building the load generator and echo backends"
cargo build --release --locked --example loadgen --example echo-server
LOADGEN=$ROOT/target/release/examples/loadgen
ECHO_SERVER=$ROOT/target/release/examples/echo-server

log "building instrumented grpcgate"
CARGO_TARGET_DIR=$ROOT/target/pgo-gen RUSTFLAGS="-Cprofile-generate=$WORK/profiles" \
  cargo build --release --locked --bin grpcgate --target "$HOST"

"$LOADGEN" cert --cert-dir "$WORK"
cat >"$WORK/grpcgate.toml" <<EOF
drain_timeout = "1s"

[[listeners]]
name = "h2c"
listen = "127.0.0.1:$((BASE_PORT + 10))"
max_concurrent_streams = 1000

[[listeners.routes]]
cluster = "echo"

[[listeners]]
name = "tls"
listen = "127.0.0.1:$((BASE_PORT + 11))"
max_concurrent_streams = 1000

[listeners.tls]
cert = "server.crt"
key = "server.key"

[[listeners.routes]]
cluster = "echo"

[[clusters]]
name = "echo"
endpoints = ["127.0.0.1:$((BASE_PORT + 1))", "127.0.0.1:$((BASE_PORT + 2))"]
EOF

"$ECHO_SERVER" --ports "$((BASE_PORT + 1)),$((BASE_PORT + 2))" >"$WORK/echo.log" 2>&1 &
PIDS+=($!)
LLVM_PROFILE_FILE="$WORK/profiles/grpcgate-%p-%m.profraw" \
  "$ROOT/target/pgo-gen/$HOST/release/grpcgate" --config "$WORK/grpcgate.toml" >"$WORK/grpcgate.log" 2>&1 &
GG_PID=$!
PIDS+=("$GG_PID")
wait_port $((BASE_PORT + 1))
wait_port $((BASE_PORT + 2))
wait_port $((BASE_PORT + 10))
wait_port $((BASE_PORT + 11))

train() { # port scenario args...
  local port=$1
  shift
  log "training: $* (port $port)"
  "$LOADGEN" "$@" -t "127.0.0.1:$port" -d "$TRAIN_SECONDS" --warmup 0 >/dev/null
}
H2C=$((BASE_PORT + 10))
TLS=$((BASE_PORT + 11))
train $H2C unary-closed -c 4 -s 32
train $H2C unary-closed -c 1 -s 1
train $H2C stream -c 2 -s 4 --count 1000 --payload 1024
train $H2C conns -c 200 --requests-per-conn 5
train $H2C streams10k -c 10 -s 1000
train $TLS unary-closed -c 4 -s 32 --tls-ca "$WORK/ca.crt"
train $TLS stream -c 2 -s 4 --count 1000 --payload 1024 --tls-ca "$WORK/ca.crt"
train $TLS conns -c 200 --requests-per-conn 5 --tls-ca "$WORK/ca.crt"

# The profile is written when grpcgate exits: SIGTERM drains and returns from main.
kill -TERM "$GG_PID"
wait "$GG_PID" || true
ls "$WORK"/profiles/grpcgate-*.profraw >/dev/null 2>&1 || {
  log "the instrumented grpcgate wrote no profile"
  exit 1
}
"$PROFDATA" merge -o "$WORK/grpcgate.profdata" "$WORK"/profiles/grpcgate-*.profraw >&2

log "building optimised grpcgate"
CARGO_TARGET_DIR=$ROOT/target/pgo RUSTFLAGS="-Cprofile-use=$WORK/grpcgate.profdata" \
  cargo build --release --locked --bin grpcgate --target "$HOST"
echo "$ROOT/target/pgo/$HOST/release/grpcgate"
