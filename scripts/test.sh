#!/usr/bin/env bash
# The test command: set up everything on a fresh machine, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec python3 -m pytest -q "$@" tests
