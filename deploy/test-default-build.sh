#!/usr/bin/env bash
# Builds the Dockerfile's *default* target (the build stage compiles grpcgate inside the container) with
# podman, on a machine that cannot pull rust:1-bookworm or the distroless base:
#   bash deploy/test-default-build.sh                 # ~7 min on 2 cores (a full release build)
#   PGO=1 bash deploy/test-default-build.sh           # --build-arg PGO=1 (needs llvm-tools, see below)
#
# Not part of CI (deploy/test-image.sh is: it runs the image; this only proves the build stage builds).
# Stand-ins it makes locally:
#   - for rust:1-bookworm: debootstrap bookworm with gcc, make, libc6-dev, binutils, plus this machine's
#     rustup toolchain (the default one) copied in, RUSTUP_HOME/CARGO_HOME/PATH as in the rust image, and
#     this machine's CA bundle (where crates.io is reached through a TLS-intercepting proxy, the Debian
#     bundle alone fails with "self-signed certificate in certificate chain");
#   - for distroless: the base deploy/test-image.sh makes (libc6, libgcc-s1, base-files).
# The build runs with --network host so that cargo reaches crates.io. Like BuildKit, podman keeps the
# Dockerfile's cache mounts (cargo registry, target/) between builds: the first build took 590 s on the
# 2-core development machine, a rebuild 7 s (the whole script then ~8 min, mostly the toolchain copy). Checks the resulting image's user,
# HEALTHCHECK and that `grpcgate --version` runs in it, prints the build time and the image size, and
# removes everything it made. PGO=1 needs the toolchain's llvm-tools component (llvm-profdata); without
# it benches/load/pgo.sh tries `rustup component add llvm-tools`, which needs the Rust distribution
# server.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
T0=$(date +%s)
TAG="t$$"
RUST_IMAGE="localhost/grpcgate-rust-standin:$TAG"
BASE_IMAGE="localhost/grpcgate-base-standin:$TAG"
IMAGE="localhost/grpcgate-default:$TAG"

log() { printf '[test-default-build] %s\n' "$*" >&2; }
fail() {
    printf '[test-default-build] FAIL: %s\n' "$*" >&2
    exit 1
}
[[ $(id -u) -eq 0 ]] || fail "needs root (rootful podman, debootstrap)"

WORK=$(mktemp -d /tmp/grpcgate-default-build.XXXXXX)
DANGLING_BEFORE=""
cleanup() {
    set +e
    timeout 60 podman rmi -f "$IMAGE" "$RUST_IMAGE" "$BASE_IMAGE" >/dev/null 2>&1
    # The build stage's image (~1.8 GB) is left untagged: remove the untagged images this run made.
    for id in $(podman images -q -f dangling=true 2>/dev/null); do
        grep -qx "$id" <<<"$DANGLING_BEFORE" || timeout 60 podman rmi -f "$id" >/dev/null 2>&1
    done
    # An interrupted debootstrap leaves /proc (and /sys) mounted in its tree.
    umount "$WORK/rust-rootfs/proc" "$WORK/rust-rootfs/sys" >/dev/null 2>&1
    rm -rf --one-file-system "$WORK"
    log "finished in $(($(date +%s) - T0)) s"
}
trap cleanup EXIT

for cmd in podman runc debootstrap; do
    command -v "$cmd" >/dev/null || {
        timeout 600 apt-get update -qq
        DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq --no-install-recommends \
            podman runc conmon netavark containernetworking-plugins uidmap debootstrap >/dev/null
        break
    }
done
# As in deploy/test-image.sh: podman's defaults fail in this sandbox.
printf '[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n' \
    >"$WORK/containers.conf"
export CONTAINERS_CONF=$WORK/containers.conf
DANGLING_BEFORE=$(podman images -q -f dangling=true)
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

log "debootstrap bookworm with gcc make libc6-dev binutils (the rust image stand-in)"
ROOTFS=$WORK/rust-rootfs
timeout 900 debootstrap --variant=minbase --include=gcc,make,libc6-dev,binutils,ca-certificates \
    bookworm "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 || {
    tail -n 20 "$WORK/debootstrap.log" >&2
    fail "debootstrap"
}
RUSTUP_HOME_HOST=${RUSTUP_HOME:-$HOME/.rustup}
CARGO_HOME_HOST=${CARGO_HOME:-$HOME/.cargo}
toolchain=$(rustup show active-toolchain | awk '{print $1}')
log "copying toolchain $toolchain"
mkdir -p "$ROOTFS/usr/local/rustup/toolchains" "$ROOTFS/usr/local/cargo/bin"
cp -a "$RUSTUP_HOME_HOST/toolchains/$toolchain" "$ROOTFS/usr/local/rustup/toolchains/"
printf 'version = "12"\ndefault_toolchain = "%s"\nprofile = "minimal"\n' "$toolchain" \
    >"$ROOTFS/usr/local/rustup/settings.toml"
for b in rustup cargo rustc rustdoc; do cp -a "$CARGO_HOME_HOST/bin/$b" "$ROOTFS/usr/local/cargo/bin/"; done
# PGO=1: benches/load/pgo.sh wants llvm-profdata in the toolchain (the llvm-tools component). Where that
# component cannot be downloaded, LLVM_PROFDATA=/usr/lib/llvm-22/bin/llvm-profdata (Debian's llvm-22,
# matching rustc's LLVM 22) is copied to where the component would put it.
if [[ -n ${LLVM_PROFDATA:-} ]]; then
    host=$(rustc -vV | sed -n 's/^host: //p')
    install -D -m 0755 "$LLVM_PROFDATA" \
        "$ROOTFS/usr/local/rustup/toolchains/$toolchain/lib/rustlib/$host/bin/llvm-profdata"
    # Debian's llvm-profdata links libLLVM dynamically: bring its libraries along.
    ldd "$LLVM_PROFDATA" | awk '/=> \// {print $3}' | while read -r lib; do
        [[ -e $ROOTFS$lib ]] || install -D -m 0644 "$lib" "$ROOTFS$lib"
    done
fi
cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
rm -rf "${ROOTFS:?}"/var/cache/apt/archives/*.deb
timeout 600 tar -C "$ROOTFS" --numeric-owner -cf - . |
    timeout 600 podman import --quiet \
        --change 'ENV RUSTUP_HOME=/usr/local/rustup' --change 'ENV CARGO_HOME=/usr/local/cargo' \
        --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        - "$RUST_IMAGE" >/dev/null
rm -rf "$ROOTFS"

log "runtime base (as deploy/test-image.sh)"
BASE=$WORK/base
mkdir -p "$BASE/tmp"
timeout 600 debootstrap --variant=minbase --download-only bookworm "$WORK/dl" "$MIRROR" >/dev/null 2>&1 ||
    fail "debootstrap --download-only"
for pkg in base-files libc6 libgcc-s1; do
    dpkg-deb -x "$(ls "$WORK/dl/var/cache/apt/archives/${pkg}_"*.deb)" "$BASE"
done
rm -rf "${BASE:?}/usr/share/doc" "${BASE:?}/usr/bin" "${BASE:?}/sbin" "${BASE:?}/usr/sbin"
chmod 1777 "$BASE/tmp"
tar -C "$BASE" --numeric-owner -cf - . | timeout 300 podman import --quiet - "$BASE_IMAGE" >/dev/null

t=$(date +%s)
log "podman build (default target, PGO=${PGO:-0})"
timeout 3600 podman build --format docker --pull=never --network host \
    --build-arg RUST_IMAGE="$RUST_IMAGE" --build-arg RUNTIME_IMAGE="$BASE_IMAGE" \
    --build-arg PGO="${PGO:-0}" -t "$IMAGE" "$ROOT"
build_s=$(($(date +%s) - t))
user=$(podman image inspect -f '{{.Config.User}}' "$IMAGE")
hc=$(podman image inspect -f '{{.Config.Healthcheck.Test}}' "$IMAGE")
size=$(podman image inspect -f '{{.Size}}' "$IMAGE")
[[ $user == 10001:10001 ]] || fail "user $user"
[[ $hc == *grpcgate-healthcheck* ]] || fail "HEALTHCHECK $hc"
version=$(timeout 30 podman run --rm --network host "$IMAGE" --version)
log "built in $build_s s: $version, user $user, $(awk -v b="$size" 'BEGIN { printf "%.1f MB", b / 1e6 }')"
echo "[test-default-build] ok"
