#!/usr/bin/env bash
# The test suite on a fresh machine: set up .venv, then pytest (the fixtures fetch the sample scans once).
# Extra arguments go to pytest, e.g. -k bundles.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/setup_env.sh"
exec .venv/bin/python -m pytest -q --durations=25 "$@"
