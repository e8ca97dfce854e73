#!/usr/bin/env bash
# Makes (once) the Python venv of the deploy checks and prints its path on stdout:
#   VENV=$(bash deploy/venv.sh)
# Location: $DEPLOY_VENV, default target/deploy-venv (git-ignored). Reinstalls when
# deploy/requirements.txt changes. Needs python3 with the venv module (apt-get python3-venv if missing)
# and PyPI.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${DEPLOY_VENV:-$PWD/target/deploy-venv}
REQ=$PWD/deploy/requirements.txt
PY=${PYTHON:-python3}

if ! "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    echo "[venv.sh] python3 venv/ensurepip missing; installing python3-venv with apt-get" >&2
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2
fi
if [[ ! -x $VENV/bin/python ]] || ! cmp -s "$REQ" "$VENV/.requirements.txt"; then
    echo "[venv.sh] installing deploy/requirements.txt into $VENV" >&2
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    timeout 600 "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQ" >&2
    cp "$REQ" "$VENV/.requirements.txt"
fi
echo "$VENV"
