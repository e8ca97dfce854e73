#!/usr/bin/env bash
# Runs every interop check in sequence (each bounded by a timeout) and prints the FAIL lines and summaries.
# Usage (from anywhere): bash interop/node/run_all.sh
#   GRPCGATE=/path/to/grpcgate   binary under test (default: <repo>/target/release/grpcgate; build it first
#                                with `cargo build --release`)
# Setup: `npm ci` (from package-lock.json; needs the npm registry) when node_modules is missing.
# Per-script output goes to run/<name>.out, results to run/<name>.results.json, proxy logs to run/<name>.log.
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
cd "$HERE"
export GRPCGATE="${GRPCGATE:-$REPO/target/release/grpcgate}"
if [ ! -x "$GRPCGATE" ]; then
  echo "grpcgate binary not found at $GRPCGATE: run \`cargo build --release\` in $REPO (or set GRPCGATE)" >&2
  exit 2
fi
if [ ! -d node_modules/@grpc/grpc-js ] || [ ! -d node_modules/@grpc/proto-loader ]; then
  npm ci --no-audit --no-fund || { echo "npm ci failed" >&2; exit 2; }
fi
mkdir -p run
fail=0
for t in t1_calltypes t2_metadata t3_routing_health t4_deadlines t5_raw_http2 t6_balancing t7_metrics \
         t8_keepalive_streams t9_upstream_failures t9b_upstream_frames t10_tls t11_misc t12_early_replies \
         t13_conn_age repro_bigheaders_goaway; do
  timeout 300 node "$t.js" > "run/$t.out" 2>&1
  rc=$?
  [ $rc -ne 0 ] && fail=1
  grep -E '^\[(FAIL)\]' "run/$t.out"
  tail -1 "run/$t.out" | sed "s/^/  /"
done
exit $fail
