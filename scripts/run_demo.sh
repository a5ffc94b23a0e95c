#!/usr/bin/env bash
# Main job, end to end on a fresh machine: set up .venv, fetch the real sample scans, evaluate every bundle's
# shipped weights on the held-out patients against the matched classical inverse, fine-tune SRCNN briefly, super-
# resolve one whole volume, and print the table. Extra arguments go to `medsr demo` (see `medsr demo --help`),
# e.g. --bundles srcnn edsr, or --eval-slices 0 for every slice.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/setup_env.sh"
exec .venv/bin/medsr demo "$@"
