#!/usr/bin/env bash
# The h2 fork (vendor/h2) as a patch series over the published h2 release (vendor/h2-patches/).
#
#   bash vendor/h2-patches.sh check      # apply the series to the published crate, compare with vendor/h2
#   bash vendor/h2-patches.sh generate   # rewrite the series from the git history of vendor/h2
#   bash vendor/h2-patches.sh apply DIR  # apply the series to a copy of the release in DIR (for a rebase)
#
# The release comes from crates.io: `cargo fetch` of a scratch crate that depends on h2 = "=VERSION"
# (VERSION from vendor/h2/Cargo.toml) puts it in cargo's registry source directory. `generate` makes
# one patch for the difference between the release and vendor/h2 as first committed, then one per later
# commit that changed vendor/h2 (first-parent history, so a merge is one patch), named after the
# commit; uncommitted changes are refused. To move to a newer h2: `apply` the series to the new release
# one patch at a time (`git apply --3way` or `patch -p1`), fixing each, then copy the result over
# vendor/h2 and re-run `generate` and `check`.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
series="$root/vendor/h2-patches"
target="${CARGO_TARGET_DIR:-$root/target}"
# H2_VERSION overrides the release (for a rebase: H2_VERSION=0.4.21 bash vendor/h2-patches.sh apply DIR).
version="${H2_VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/vendor/h2/Cargo.toml" | head -1)}"

# Prints the directory of the published h2 $version, fetching it when needed.
release_dir() {
    local scratch="$target/h2-release-$version"
    mkdir -p "$scratch/src"
    cat >"$scratch/Cargo.toml" <<EOF
[package]
name = "h2-release"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
h2 = "=$version"

[workspace]
EOF
    : >"$scratch/src/lib.rs"
    (cd "$scratch" && cargo fetch -q >&2)
    (cd "$scratch" && cargo metadata --format-version 1) | python3 -c '
import json, os, sys
meta = json.load(sys.stdin)
[p] = [p for p in meta["packages"] if p["name"] == "h2"]
print(os.path.dirname(p["manifest_path"]))'
}

# Copies the release into $1 (a fresh directory), without cargo's own marker files.
copy_release() {
    local src dst=$1
    src="$(release_dir)"
    rm -rf "$dst"
    mkdir -p "$dst"
    (cd "$src" && tar --exclude=.cargo-ok --exclude=.cargo_vcs_info.json -cf - .) | tar -xf - -C "$dst"
}

apply_series() {
    local dst=$1 p
    for p in "$series"/*.patch; do
        # GIT_CEILING_DIRECTORIES: $dst may be inside this repository (target/), where git apply
        # would take the paths as relative to the repository's top and skip them.
        if ! (cd "$dst" && GIT_CEILING_DIRECTORIES="$(dirname "$dst")" git apply --whitespace=nowarn -p1 "$p"); then
            echo "error: $(basename "$p") does not apply" >&2
            return 1
        fi
    done
}

case "${1:-check}" in
check)
    work="$target/h2-patches-check"
    copy_release "$work"
    apply_series "$work"
    if diff -r "$work" "$root/vendor/h2" >"$target/h2-patches-check.diff"; then
        echo "h2 patch series: $(ls "$series"/*.patch | wc -l) patches on h2 $version reproduce vendor/h2"
    else
        echo "error: the series applied to h2 $version differs from vendor/h2:" >&2
        head -50 "$target/h2-patches-check.diff" >&2
        echo "(whole diff: $target/h2-patches-check.diff; bash vendor/h2-patches.sh generate)" >&2
        exit 1
    fi
    ;;
apply)
    [[ -n ${2:-} ]] || { echo "usage: $0 apply DIR" >&2; exit 2; }
    copy_release "$2"
    apply_series "$2"
    ;;
generate)
    cd "$root"
    if [[ -n "$(git status --porcelain -- vendor/h2)" ]]; then
        echo "error: vendor/h2 has uncommitted changes; commit them first" >&2
        exit 1
    fi
    commits=()
    while read -r c; do commits+=("$c"); done < <(git rev-list --reverse --first-parent HEAD -- vendor/h2)
    mkdir -p "$series"
    rm -f "$series"/*.patch
    base="$target/h2-patches-base"
    copy_release "$base/a"
    rm -rf "$base/b"
    mkdir -p "$base/b"
    git archive "${commits[0]}" vendor/h2 | tar -xf - -C "$base/b" --strip-components=2
    slug() { git log -1 --format=%s "$1" | tr -c 'A-Za-z0-9\n' '-' | tr -s '-' | cut -c1-60 | sed 's/-$//'; }
    n=0
    out="$series/$(printf %04d $n)-$(git rev-parse --short "${commits[0]}")-$(slug "${commits[0]}").patch"
    {
        git log -1 --format='From: %H%nSubject: %s%n' "${commits[0]}"
        echo "h2 $version (crates.io) -> vendor/h2 as first committed"
        echo
        # run from $base, the directories a and b give the a/FILE b/FILE paths of a -p1 patch
        (cd "$base" && git diff --no-index --no-prefix --binary a b) || true
    } >"$out"
    for c in "${commits[@]:1}"; do
        n=$((n + 1))
        out="$series/$(printf %04d $n)-$(git rev-parse --short "$c")-$(slug "$c").patch"
        {
            git log -1 --format='From: %H%nSubject: %s%n' "$c"
            git diff --binary --relative=vendor/h2 "$c^" "$c" -- vendor/h2
        } >"$out"
    done
    echo "wrote $((n + 1)) patches to vendor/h2-patches/"
    ;;
*)
    echo "usage: $0 check|generate|apply DIR" >&2
    exit 2
    ;;
esac
