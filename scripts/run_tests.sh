#!/usr/bin/env bash
# The test suite on a fresh machine: set up .venv, fetch the real sample scans once, then pytest in
# MEDSR_TEST_WORKERS processes (default 2, one per core of the reference machine; 0 = one process), each taking
# whole test files (their module fixtures are built once). Extra arguments go to pytest, e.g. -k bundles.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/setup_env.sh"
# before the workers start: they would otherwise fetch and convert the samples side by side
.venv/bin/medsr data samples >/dev/null
exec .venv/bin/python -m pytest -q -n "${MEDSR_TEST_WORKERS:-2}" --dist loadfile --durations=25 "$@"
