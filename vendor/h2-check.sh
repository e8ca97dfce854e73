#!/usr/bin/env bash
# Runs h2's own tests against grpcgate's fork (vendor/h2): h2's unit and doc tests, and upstream's
# integration suite (tests/h2-support, tests/h2-tests), as upstream's CI runs them.
#
#   bash vendor/h2-check.sh            # everything
#   bash vendor/h2-check.sh -- ARGS    # extra arguments for every `cargo test` (e.g. a test name filter)
#
# The upstream test crates and the HPACK fixtures are committed under vendor/h2-tests/ (see its
# README.md for the upstream commit); the published h2 crate ships neither. This script assembles a
# scratch workspace in $CARGO_TARGET_DIR/h2-suite (default target/h2-suite): a manifest made of
# vendor/h2/Cargo.toml plus h2's dev-dependencies and a [workspace], a symlink to vendor/h2/src, a copy
# of the upstream tests/ and the unpacked fixtures. Dependencies come from crates.io, pinned by
# vendor/h2-tests/Cargo.lock (`--locked`); set H2_CHECK_UPDATE_LOCK=1 to re-resolve it
# (starting from grpcgate's Cargo.lock) and write it back.
# Exits non-zero when a test fails. Nothing of this is part of the proxy's own `cargo test`.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
up="$root/vendor/h2-tests"
target="${CARGO_TARGET_DIR:-$root/target}"
# H2_CHECK_CRATE=DIR runs the same tests against another h2 source tree, e.g. the published release
# (~/.cargo/registry/src/*/h2-0.4.20), to tell the fork's failures from the test snapshot's.
if [[ -n ${H2_CHECK_CRATE:-} ]]; then
    h2="$(cd "$H2_CHECK_CRATE" && pwd)"
    ws="$target/h2-suite-$(basename "$h2")"
    locked=() # its dependencies differ from the fork's (fnv): the lock file may change
else
    h2="$root/vendor/h2"
    ws="$target/h2-suite"
    locked=(--locked)
fi
extra=()
if [[ ${1:-} == -- ]]; then
    shift
    extra=("$@")
fi

mkdir -p "$ws"
# --- the h2 package: the fork's manifest, plus the dev-dependencies the published crate dropped --------
{
    # (a published manifest's examples, benches and dev-dependencies are left out: they are replaced)
    awk '/^\[/ { skip = ($0 ~ /^\[\[(example|bench)\]\]/ || $0 ~ /^\[dev-dependencies/) } !skip' \
        "$h2/Cargo.toml"
    cat <<'EOF'

# ---- added by vendor/h2-check.sh: upstream h2's dev-dependencies (examples' only left out) ----
[dev-dependencies]
quickcheck = { version = "1.0.3", default-features = false }
rand = "0.8.4"
hex = "0.4.3"
walkdir = "2.3.2"
serde = "1.0.0"
serde_json = "1.0.0"
tokio = { version = "1", features = ["rt-multi-thread", "macros", "sync", "net"] }
env_logger = { version = "0.10", default-features = false }

[workspace]
members = ["tests/h2-support", "tests/h2-tests"]
EOF
} >"$ws/Cargo.toml.new"
if ! cmp -s "$ws/Cargo.toml.new" "$ws/Cargo.toml" 2>/dev/null; then
    mv "$ws/Cargo.toml.new" "$ws/Cargo.toml"
else
    rm "$ws/Cargo.toml.new"
fi
ln -sfn "$h2/src" "$ws/src"
# The tests are copied (not linked) so that their relative path to h2 (`../..`) resolves in $ws;
# `cp -p` keeps the modification times, so an unchanged copy does not rebuild.
rm -rf "$ws/tests"
cp -Rp "$up/tests" "$ws/tests"
# grpcgate's own tests of what the fork adds, run with upstream's helpers (vendor/h2-tests/grpcgate/).
for f in "$up"/grpcgate/*.rs; do
    [[ -e $f ]] && cp -p "$f" "$ws/tests/h2-tests/tests/"
done
# The HPACK fixtures (60 MB of JSON, 1.4 MB packed): unpacked once per archive version.
stamp="$(cksum <"$up/hpack-fixtures.tar.xz")"
if [[ ! -d $ws/fixtures/hpack || "$(cat "$ws/fixtures/.stamp" 2>/dev/null)" != "$stamp" ]]; then
    rm -rf "$ws/fixtures"
    if command -v xz >/dev/null 2>&1; then
        tar -xJf "$up/hpack-fixtures.tar.xz" -C "$ws"
    else
        python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
            "$up/hpack-fixtures.tar.xz" "$ws"
    fi
    printf '%s\n' "$stamp" >"$ws/fixtures/.stamp"
fi

if [[ ${H2_CHECK_UPDATE_LOCK:-0} == 1 ]]; then
    # Start from the proxy's lock file, so h2 is tested with the versions grpcgate ships (tokio,
    # http, bytes, ...); cargo drops what the suite does not use and adds what it lacks.
    cp "$root/Cargo.lock" "$ws/Cargo.lock"
    (cd "$ws" && cargo metadata --format-version 1 >/dev/null)
    cp "$ws/Cargo.lock" "$up/Cargo.lock"
else
    cp "$up/Cargo.lock" "$ws/Cargo.lock"
fi

export CARGO_TARGET_DIR="$target"
cd "$ws"
status=0
run() {
    printf '\n==== h2 suite: %s ====\n' "$*"
    if ! "$@"; then
        status=1
    fi
}
# h2's unit and doc tests, as upstream's CI runs them (`cargo test`: no features).
run cargo test "${locked[@]}" --no-fail-fast -p h2 "${extra[@]}"
# upstream's integration suite.
run cargo test "${locked[@]}" --no-fail-fast -p h2-tests "${extra[@]}"
# The fork as a patch series over the published release (vendor/h2-patches.sh). Not fatal: a branch
# that changes vendor/h2 regenerates the series after committing (`bash vendor/h2-patches.sh generate`);
# H2_CHECK_SERIES=strict makes a stale series fail this script.
printf '\n==== h2 suite: bash vendor/h2-patches.sh check ====\n'
if ! bash "$root/vendor/h2-patches.sh" check; then
    if [[ ${H2_CHECK_SERIES:-} == strict ]]; then
        status=1
    else
        echo "warning: vendor/h2-patches/ does not reproduce vendor/h2 (bash vendor/h2-patches.sh generate)" >&2
    fi
fi
if [[ $status -ne 0 ]]; then
    echo "h2 suite: FAILED (see above)" >&2
fi
exit "$status"
