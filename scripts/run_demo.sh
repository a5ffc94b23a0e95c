#!/usr/bin/env bash
# Main job, end to end on a fresh machine: set up .venv, fetch the real sample scans, train SRCNN and EDSR
# briefly, evaluate them against bicubic on the held-out patients, and print the comparison table.
# Extra arguments go to `medsr demo` (see `medsr demo --help`), e.g. --epochs 5.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/setup_env.sh"
exec .venv/bin/medsr demo "$@"
