#!/usr/bin/env bash
# One-time setup of the Python interop suite (needs network access to PyPI the first time):
#   - creates ./venv (with $PYTHON, default python3; written against Python 3.11) if it is missing,
#   - installs the pinned requirements.txt into it (skipped when already satisfied),
#   - generates echo_pb2.py / echo_pb2_grpc.py from <repo>/proto/echo.proto (git-ignored, never committed).
# Usage: bash interop/python/setup.sh        (run_all.sh calls it)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
cd "$HERE"

if [ ! -x venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv venv
fi
# Install only when something pinned is missing or at another version (keeps reruns offline).
if ! venv/bin/python - requirements.txt <<'PYEOF' >/dev/null 2>&1
import sys
from importlib.metadata import version, PackageNotFoundError
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    name, want = line.split("==")
    try:
        if version(name) != want:
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
PYEOF
then
  venv/bin/python -m pip install --disable-pip-version-check -q -r requirements.txt
fi

# Regenerate the stubs whenever they are missing or older than the proto.
if [ ! -f echo_pb2.py ] || [ ! -f echo_pb2_grpc.py ] || [ "$REPO/proto/echo.proto" -nt echo_pb2.py ]; then
  venv/bin/python -m grpc_tools.protoc -I"$REPO/proto" --python_out=. --grpc_python_out=. "$REPO/proto/echo.proto"
fi
mkdir -p run
