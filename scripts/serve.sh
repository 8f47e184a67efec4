#!/usr/bin/env bash
# The serve command: sets everything up, then serves the bundled model (or --model DIR) over
# gRPC on 127.0.0.1:9000 until Ctrl-C. Extra args go to `exaone-cluster serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/exaone-cluster serve "$@"
