#!/usr/bin/env bash
# Builds the grpcgate container image with podman and runs it for real:
#   bash deploy/test-image.sh
#
# No container registry is reachable where this runs, so nothing is pulled:
#   - the runtime base is made locally: `debootstrap --download-only` fetches Debian bookworm's packages
#     (verified against the archive key) from the Debian mirror apt already uses, and the base is only
#     libc6, libgcc-s1 and base-files unpacked, plus /etc/passwd, /etc/group and /tmp: the same kind
#     of base as the default gcr.io/distroless/cc-debian12 (no shell, no package manager);
#   - grpcgate is built on the host (`cargo build --release`; set GRPCGATE_BIN to use a binary you
#     have) and so is the HEALTHCHECK helper (rustc deploy/healthcheck/main.rs);
#   - the image is the Dockerfile's `prebuilt` target (--format docker, which keeps HEALTHCHECK), with
#     RUNTIME_IMAGE set to that base. Everything else in it (user, config, HEALTHCHECK, STOPSIGNAL,
#     entrypoint) is the runtime-base stage the default `docker build` uses too.
# Then, with the container on the host network and every address on 127.0.0.1, it checks:
#   1. the image has no shell (`podman run --entrypoint /bin/sh` fails);
#   2. the container runs as the non-root user 10001 (image config and the running process's uids),
#      with a read-only root filesystem and no capabilities;
#   3. HEALTHCHECK turns healthy (`podman healthcheck run`), and the helper reports a 404 as a failure;
#   4. a gRPC call (Python grpcio, deploy/grpc_call.py) goes through the container to an echo backend
#      (the echo-server example) on the host;
#   5. /metrics is served and counts that call;
#   6. `podman stop` while a 3 s call is in flight: the call still ends OK, the container exits 0, and
#      it took less than drain_timeout (10 s here).
# Prints the image size. Installs what it needs (podman, runc, debootstrap with apt-get; grpcio into
# the deploy venv), bounds every wait, removes the containers and images it made, and exits non-zero on
# any failure. If podman is installed but cannot run any container at all on this machine, it says so
# loudly and exits 0 (skipped), unless REQUIRE_PODMAN=1.
#
# Needs root (rootful podman). Ports used on 127.0.0.1: 23051 (backend), 23443 (listener), 23901 (admin).
# Environment: GRPCGATE_BIN (skip the release build), DEBIAN_MIRROR (default: the first Debian URI in
# apt's sources), KEEP=1 (keep the work directory).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
T0=$(date +%s)

BACKEND_PORT=23051
LISTEN_PORT=23443
ADMIN_PORT=23901
DRAIN_TIMEOUT_S=10

TAG="t$$"
BASE_IMAGE="localhost/grpcgate-test-base:$TAG"
IMAGE="localhost/grpcgate-test:$TAG"
CTR="grpcgate-test-$TAG"

log() { printf '[test-image] %s\n' "$*" >&2; }
fail() {
    printf '[test-image] FAIL: %s\n' "$*" >&2
    exit 1
}
pass() { printf '[test-image] ok: %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
    fail "needs root (rootful podman): run it with sudo"
fi

WORK=$(mktemp -d /tmp/grpcgate-image-test.XXXXXX)
BACKEND_PID=""
CLIENT_PID=""
cleanup() {
    local rc=$?
    set +e
    if [[ $rc -ne 0 ]] && command -v podman >/dev/null && podman container exists "$CTR" 2>/dev/null; then
        log "container logs (last 30 lines):"
        timeout 10 podman logs --tail 30 "$CTR" >&2 2>&1
    fi
    if command -v podman >/dev/null; then
        timeout 30 podman rm -f -t 0 "$CTR" >/dev/null 2>&1
        timeout 30 podman rmi -f "$IMAGE" "$BASE_IMAGE" >/dev/null 2>&1
    fi
    [[ -n $CLIENT_PID ]] && kill "$CLIENT_PID" 2>/dev/null
    [[ -n $BACKEND_PID ]] && kill "$BACKEND_PID" 2>/dev/null && wait "$BACKEND_PID" 2>/dev/null
    if [[ ${KEEP:-0} = 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
    log "finished in $(($(date +%s) - T0)) s (exit $rc)"
}
trap cleanup EXIT

# ---- tools ---------------------------------------------------------------------------------------
need=()
for cmd in podman runc debootstrap dpkg-deb; do
    command -v "$cmd" >/dev/null || need+=("$cmd")
done
if ((${#need[@]})); then
    log "installing podman runc debootstrap with apt-get (missing: ${need[*]})"
    timeout 600 apt-get update -qq
    DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq --no-install-recommends \
        podman runc conmon netavark containernetworking-plugins uidmap debootstrap >/dev/null
fi
# podman's defaults do not work in this sandbox: its default nofile ulimit cannot be set (runc: "error
# setting rlimit type 7: operation not permitted"), crun is not installed and there is no systemd. A
# containers.conf of our own (only for this script's podman calls) fixes all three.
cat >"$WORK/containers.conf" <<'EOF'
[containers]
default_ulimits = []

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
export CONTAINERS_CONF=$WORK/containers.conf
log "$(podman --version), runc $(runc --version | sed -n 's/^runc version //p')"

# Runs a podman command without its "unable to get systemd connection" errors: podman sets up (and
# removes) a systemd timer for a container with a HEALTHCHECK, and there is no systemd here.
podman_nosd() {
    "$@" 2> >(grep -v "unable to get systemd connection" >&2)
}

VENV=$(bash deploy/venv.sh)
PY=$VENV/bin/python

# ---- binaries -------------------------------------------------------------------------------------
CTX=$WORK/context
mkdir -p "$CTX/dist" "$CTX/config"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
if [[ -n ${GRPCGATE_BIN:-} ]]; then
    log "using GRPCGATE_BIN=$GRPCGATE_BIN"
else
    t=$(date +%s)
    log "cargo build --release --locked --bin grpcgate"
    timeout 1800 cargo build --release --locked --bin grpcgate
    log "release build step: $(($(date +%s) - t)) s"
    GRPCGATE_BIN=$TARGET_DIR/release/grpcgate
fi
log "cargo build --locked --example echo-server (the backend on the host)"
timeout 1200 cargo build --locked --example echo-server
ECHO_SERVER=$TARGET_DIR/debug/examples/echo-server
# As the Dockerfile does: without the line tables (symbols stay).
objcopy --strip-debug "$GRPCGATE_BIN" "$CTX/dist/grpcgate"
chmod 0755 "$CTX/dist/grpcgate"
rustc --edition 2021 -C opt-level=s -C strip=symbols -C panic=abort \
    deploy/healthcheck/main.rs -o "$CTX/dist/grpcgate-healthcheck"
cp Dockerfile "$CTX/Dockerfile"
cp config/example.toml "$CTX/config/example.toml"

# ---- base image -----------------------------------------------------------------------------------
MIRROR=${DEBIAN_MIRROR:-}
if [[ -z $MIRROR ]]; then
    # deb822 "URIs:" lines, then one-line "deb URI suite ..." entries; the first Debian archive that is
    # not the security one.
    MIRROR=$(
        {
            grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}'
            grep -hE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
                sed -E 's/^deb +(\[[^]]*\] +)?//' | awk '{print $1}'
        } | grep -E '/debian/?$' | grep -v security | head -n 1
    ) || true
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
fi
t=$(date +%s)
log "debootstrap --download-only bookworm from $MIRROR"
if ! timeout 600 debootstrap --variant=minbase --download-only bookworm "$WORK/debootstrap" "$MIRROR" \
    >"$WORK/debootstrap.log" 2>&1; then
    tail -n 20 "$WORK/debootstrap.log" >&2
    fail "debootstrap could not download Debian bookworm from $MIRROR"
fi
ROOTFS=$WORK/rootfs
mkdir -p "$ROOTFS"
for pkg in base-files libc6 libgcc-s1; do
    deb=$(ls "$WORK/debootstrap/var/cache/apt/archives/${pkg}_"*.deb)
    dpkg-deb -x "$deb" "$ROOTFS"
    log "base: $(basename "$deb")"
done
# What distroless also leaves out: docs, locales, the glibc helpers no container uses.
rm -rf "${ROOTFS:?}/usr/share/doc" "${ROOTFS:?}/usr/share/lintian" "${ROOTFS:?}/usr/share/locale" \
    "${ROOTFS:?}/usr/share/man" "${ROOTFS:?}/usr/share/info" "${ROOTFS:?}/usr/share/common-licenses" \
    "${ROOTFS:?}/usr/bin" "${ROOTFS:?}/sbin" "${ROOTFS:?}/usr/sbin" \
    "${ROOTFS:?}/usr/lib/x86_64-linux-gnu/gconv" "${ROOTFS:?}/usr/libexec"
cat >"$ROOTFS/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
grpcgate:x:10001:10001:grpcgate:/nonexistent:/sbin/nologin
EOF
cat >"$ROOTFS/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
nonroot:x:65532:
grpcgate:x:10001:
EOF
printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$ROOTFS/etc/nsswitch.conf"
mkdir -p "$ROOTFS/tmp" "$ROOTFS/root" "$ROOTFS/home/nonroot"
chmod 1777 "$ROOTFS/tmp"
if [[ -e $ROOTFS/bin/sh || -e $ROOTFS/usr/bin/sh ]]; then fail "the base has a shell"; fi
timeout 120 tar -C "$ROOTFS" --numeric-owner -cf - . |
    timeout 120 podman import --quiet - "$BASE_IMAGE" >/dev/null
log "base image $BASE_IMAGE made in $(($(date +%s) - t)) s"

# Can podman run a container here at all? The base has no shell; its dynamic loader runs as a program.
if ! out=$(timeout 60 podman run --rm --network host "$BASE_IMAGE" \
    /lib64/ld-linux-x86-64.so.2 --version 2>&1); then
    if [[ ${REQUIRE_PODMAN:-0} = 1 ]]; then
        fail "podman cannot run a container on this machine: $out"
    fi
    printf '\n%s\n%s\n%s\n\n' \
        '!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!' \
        "!!! SKIPPED: podman cannot run any container on this machine, so the image was not tested: $out" \
        '!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!' >&2
    exit 0
fi

# ---- image ----------------------------------------------------------------------------------------
t=$(date +%s)
log "podman build --target prebuilt"
timeout 600 podman build --quiet --format docker --pull=never --target prebuilt \
    --build-arg RUNTIME_IMAGE="$BASE_IMAGE" -t "$IMAGE" -f "$CTX/Dockerfile" "$CTX" >/dev/null
log "image built in $(($(date +%s) - t)) s"
size=$(podman image inspect -f '{{.Size}}' "$IMAGE")
base_size=$(podman image inspect -f '{{.Size}}' "$BASE_IMAGE")
bin_size=$(stat -c %s "$CTX/dist/grpcgate")
hc_size=$(stat -c %s "$CTX/dist/grpcgate-healthcheck")
mb() { awk -v b="$1" 'BEGIN { printf "%.1f MB", b / 1e6 }'; }
log "image size: $(mb "$size") (base $(mb "$base_size"), grpcgate $(mb "$bin_size"), healthcheck $(mb "$hc_size"))"

# 1. no shell
if timeout 30 podman run --rm --network host --entrypoint /bin/sh "$IMAGE" -c true >/dev/null 2>&1; then
    fail "the image has a shell (/bin/sh ran)"
fi
pass "no shell in the image (/bin/sh cannot run)"

user=$(podman image inspect -f '{{.Config.User}}' "$IMAGE")
[[ $user == 10001:10001 ]] || fail "image user is '$user', expected 10001:10001"
stopsignal=$(podman image inspect -f '{{.Config.StopSignal}}' "$IMAGE")
[[ $stopsignal == SIGTERM ]] || fail "image STOPSIGNAL is '$stopsignal', expected SIGTERM"
hc=$(podman image inspect -f '{{.Config.Healthcheck.Test}}' "$IMAGE")
[[ $hc == *grpcgate-healthcheck* ]] || fail "image HEALTHCHECK is '$hc'"

# ---- backend and container ------------------------------------------------------------------------
: >"$WORK/backend.log"
"$ECHO_SERVER" --ports "$BACKEND_PORT" >"$WORK/backend.log" 2>&1 &
BACKEND_PID=$!
for _ in $(seq 100); do
    grep -q READY "$WORK/backend.log" && break
    kill -0 "$BACKEND_PID" 2>/dev/null || fail "echo backend died: $(cat "$WORK/backend.log")"
    sleep 0.1
done
grep -q READY "$WORK/backend.log" || fail "echo backend not ready in 10 s"

cat >"$WORK/grpcgate.toml" <<EOF
# deploy/test-image.sh: the container shares the host's network; everything is on 127.0.0.1.
drain_timeout = "${DRAIN_TIMEOUT_S}s"
workers = 1

[admin]
listen = "127.0.0.1:$ADMIN_PORT"

[[listeners]]
name = "edge"
listen = "127.0.0.1:$LISTEN_PORT"

[[listeners.routes]]
cluster = "echo"

[[clusters]]
name = "echo"
endpoints = ["127.0.0.1:$BACKEND_PORT"]

[clusters.health_check]
interval = "1s"
timeout = "500ms"
EOF
chmod 0644 "$WORK/grpcgate.toml"
"$GRPCGATE_BIN" --config "$WORK/grpcgate.toml" --check >/dev/null || fail "test config does not pass --check"

log "podman run (host network, read-only root, no capabilities, config mounted read-only)"
# No systemd here for podman's HEALTHCHECK timer: the check is run below with `podman healthcheck run`,
# as the timer would.
podman_nosd timeout 60 podman run -d --name "$CTR" --network host --read-only --cap-drop ALL \
    --security-opt no-new-privileges \
    -v "$WORK/grpcgate.toml:/etc/grpcgate/grpcgate.toml:ro" \
    -e HEALTHCHECK_ADMIN_PORT="$ADMIN_PORT" \
    "$IMAGE" >/dev/null

http_get() { # URL -> "STATUS BODY" on stdout; never fails
    "$PY" - "$1" <<'EOF'
import sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
        print(r.status, r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode())
except Exception as e:
    print(0, e)
EOF
}

ready=""
for _ in $(seq 40); do
    state=$(podman inspect -f '{{.State.Status}}' "$CTR")
    [[ $state == running ]] || fail "container is $state"
    if [[ $(http_get "http://127.0.0.1:$ADMIN_PORT/ready") == 200* ]]; then
        ready=1
        break
    fi
    sleep 0.5
done
[[ -n $ready ]] || fail "/ready did not answer 200 within 20 s"
pass "container started; /ready is 200"

# 2. non-root, read-only, no capabilities
pid=$(podman inspect -f '{{.State.Pid}}' "$CTR")
uids=$(awk '/^Uid:/ {print $2, $3, $4, $5}' "/proc/$pid/status")
gids=$(awk '/^Gid:/ {print $2, $3, $4, $5}' "/proc/$pid/status")
[[ $uids == "10001 10001 10001 10001" ]] || fail "grpcgate runs with uids '$uids'"
[[ $gids == "10001 10001 10001 10001" ]] || fail "grpcgate runs with gids '$gids'"
capeff=$(awk '/^CapEff:/ {print $2}' "/proc/$pid/status")
[[ $capeff =~ ^0+$ ]] || fail "grpcgate has capabilities $capeff"
[[ $(podman inspect -f '{{.HostConfig.ReadonlyRootfs}}' "$CTR") == true ]] || fail "root filesystem is writable"
pass "runs as uid/gid 10001 (image USER $user), no capabilities, read-only root filesystem"

# 3. HEALTHCHECK. No systemd here, so podman does not run it on a timer: run it as the engine would.
healthy=""
for _ in $(seq 10); do
    if timeout 10 podman healthcheck run "$CTR" >/dev/null 2>&1; then
        healthy=1
        break
    fi
    sleep 1
done
[[ -n $healthy ]] || fail "podman healthcheck run never passed"
status=$(podman inspect -f '{{.State.Health.Status}}' "$CTR" 2>/dev/null ||
    podman inspect -f '{{.State.Healthcheck.Status}}' "$CTR")
[[ $status == healthy ]] || fail "health status is '$status', expected healthy"
if timeout 10 podman exec "$CTR" /usr/local/bin/grpcgate-healthcheck /no-such-path >/dev/null 2>&1; then
    fail "the healthcheck helper passed on a 404"
fi
timeout 10 podman exec "$CTR" /usr/local/bin/grpcgate-healthcheck /ready >/dev/null ||
    fail "the healthcheck helper failed on /ready"
pass "HEALTHCHECK: podman healthcheck run -> $status; the helper fails on a 404 and passes on /ready"

# 4. a gRPC call through the container
out=$(timeout 30 "$PY" deploy/grpc_call.py "127.0.0.1:$LISTEN_PORT" --timeout 10) ||
    fail "gRPC call through the container: $out"
[[ $out == "OK backend=b0 "* ]] || fail "unexpected answer: $out"
pass "gRPC call through the container to the host's echo backend: $out"

# 5. /metrics
metrics=$(http_get "http://127.0.0.1:$ADMIN_PORT/metrics")
[[ $metrics == 200* ]] || fail "/metrics: ${metrics:0:200}"
want="grpcgate_requests_total{cluster=\"echo\",endpoint=\"127.0.0.1:$BACKEND_PORT\",grpc_status=\"OK\",listener=\"edge\"} 1"
grep -qF "$want" <<<"$metrics" || fail "/metrics lacks: $want"
grep -qF "grpcgate_endpoint_healthy{cluster=\"echo\",endpoint=\"127.0.0.1:$BACKEND_PORT\"} 1" <<<"$metrics" ||
    fail "/metrics does not show the endpoint healthy"
pass "/metrics served ($(grep -c '^grpcgate_' <<<"$metrics") grpcgate_ samples) and counts the call"

# 6. podman stop drains a call in flight
timeout 30 "$PY" deploy/grpc_call.py "127.0.0.1:$LISTEN_PORT" --delay-ms 3000 --timeout 20 \
    >"$WORK/slow-call.out" 2>&1 &
CLIENT_PID=$!
inflight=""
for _ in $(seq 100); do
    # (into a variable first: `| grep -q` would make the writer's SIGPIPE fail the pipeline)
    metrics=$(http_get "http://127.0.0.1:$ADMIN_PORT/metrics")
    if grep -qF "grpcgate_endpoint_in_flight{cluster=\"echo\",endpoint=\"127.0.0.1:$BACKEND_PORT\"} 1" <<<"$metrics"; then
        inflight=1
        break
    fi
    sleep 0.05
done
[[ -n $inflight ]] || fail "the slow call never showed in flight"
t_stop=$(date +%s.%N)
# -t: podman's SIGKILL deadline, well above drain_timeout so that a hang shows as a failure here.
podman_nosd timeout 60 podman stop -t $((DRAIN_TIMEOUT_S + 20)) "$CTR" >/dev/null
stop_s=$(awk -v a="$t_stop" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
client_rc=0
wait "$CLIENT_PID" || client_rc=$?
CLIENT_PID=""
call=$(cat "$WORK/slow-call.out")
exit_code=$(podman inspect -f '{{.State.ExitCode}}' "$CTR")
log "podman stop took $stop_s s; exit code $exit_code; the call in flight: $call"
[[ $client_rc -eq 0 && $call == OK* ]] || fail "the call in flight did not finish OK: $call"
[[ $exit_code -eq 0 ]] || fail "container exited $exit_code, expected 0"
awk -v s="$stop_s" -v d="$DRAIN_TIMEOUT_S" 'BEGIN { exit !(s < d) }' ||
    fail "podman stop took $stop_s s, not less than drain_timeout ${DRAIN_TIMEOUT_S} s"
logs=$(timeout 10 podman logs "$CTR" 2>&1)
grep -q "shutting down: draining connections" <<<"$logs" || fail "the container's log does not show the drain"
grep -q "stopped drained=true" <<<"$logs" || fail "the container's log does not show a complete drain"
pass "podman stop drained the call in flight ($call) and exited 0 in $stop_s s (drain_timeout ${DRAIN_TIMEOUT_S} s)"

log "image size: $(mb "$size")"
printf '[test-image] all checks passed in %s s\n' "$(($(date +%s) - T0))"
