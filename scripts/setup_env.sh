#!/usr/bin/env bash
# Create .venv if missing and install the project into it. Sourced by run_demo.sh and run_tests.sh.
# torch is installed FIRST and pinned: if pip resolved torch on its own it would pull several GB of
# CUDA packages. On a machine with a CUDA wheel of torch 2.13.0 available, the same pin takes that one.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PY --version)"
    "$PY" -m venv .venv
fi
pip_install() {
    # this machine's pip config prints a warning per package for its local index mirrors: hide only those,
    # and keep pip's own exit status (pipefail) so a failed install stops the script
    .venv/bin/python -m pip --disable-pip-version-check -q install "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
}
stamp=".venv/.medsr-installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "[setup] installing torch==2.13.0 first, then medsr-monai and its pinned dependencies (a few minutes)"
    pip_install "torch==2.13.0"
    # numpy/setuptools/wheel/versioneer: pip prepares the pyradiomics 3.0.1 sample-data sdist without build isolation
    pip_install "torch==2.13.0" setuptools wheel versioneer numpy
    pip_install "torch==2.13.0" -e ".[test]"
    .venv/bin/python -c "import torch, monai, ignite, mlflow, optuna, medsr_monai; print('[setup] torch', torch.__version__, '| monai', monai.__version__)"
    rm -f .venv/.medsr-installed-* && touch "$stamp"
fi
