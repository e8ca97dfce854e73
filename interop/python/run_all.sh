#!/usr/bin/env bash
# Runs every check script in order; prints each script's FAIL lines and summary.
# Usage (from anywhere): bash interop/python/run_all.sh
#   GRPCGATE=/path/to/grpcgate   binary under test (default: <repo>/target/release/grpcgate; build it first
#                                with `cargo build --release`)
# Per-script output goes to run/<script>.out, generated configs and proxy logs to run/<name>.{toml,log}.
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
cd "$HERE"
export GRPCGATE="${GRPCGATE:-$REPO/target/release/grpcgate}"
if [ ! -x "$GRPCGATE" ]; then
  echo "grpcgate binary not found at $GRPCGATE: run \`cargo build --release\` in $REPO (or set GRPCGATE)" >&2
  exit 2
fi
bash ./setup.sh || { echo "setup.sh failed" >&2; exit 2; }
mkdir -p run
PY=./venv/bin/python
rc=0
for t in t1_calltypes t2_metadata_status t3_routing_health_metrics t4_deadlines_cancel t5_balancing_reload \
         t6_compression t7_tls t8_keepalive t8_backend_conn t8_restart t8_misc t9_headers t10_extras \
         t11_protocol_knobs t12_lifecycle t13_health_conn_rotation t14_aio t15_retry_panic; do
  timeout 600 $PY $t.py > run/$t.out 2>&1 || rc=1
  grep -E "^\[FAIL\]|^== " run/$t.out
done
exit $rc
