#!/usr/bin/env bash
# The test command: sets everything up, then runs the whole suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check --quiet .
.venv/bin/ruff format --check --quiet .
.venv/bin/mypy  # the packages, as configured in pyproject.toml
# Ray Serve's gRPC proxy and replicas could listen on every interface (we rebind them to
# 127.0.0.1, and a test checks it). As root, also run the suite in a private network namespace
# where only loopback exists, as platform.md recommends.
if [ "$(id -u)" = 0 ] && command -v unshare >/dev/null && command -v ip >/dev/null \
    && unshare -n true 2>/dev/null; then
  exec unshare -n bash -c 'ip link set lo up && exec .venv/bin/python -m pytest "$@"' bash "$@"
fi
exec .venv/bin/python -m pytest "$@"
