"""Pieces every bundle benchmark script uses: timestamped log lines, path overrides as config expressions,
and bundle subprocesses with their output in a log file."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"\n[{dt.datetime.now():%H:%M:%S}] {msg}", flush=True)


def expr_path(p: Path) -> str:
    return f"$'{p.resolve()}'"  # a config expression: a plain string breaks MONAI's saved config


def run_logged(cmd: list[str], log_path: Path, env: dict[str, str]) -> float:
    """Run ``cmd`` from the repository root with its output in ``log_path``; wall seconds, or raise naming the log."""
    t0 = time.monotonic()
    with open(log_path, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({rc}); see {log_path}")
    return time.monotonic() - t0


def bundle_cmd(bundle: str, configs: list[str], overrides: dict) -> list[str]:
    """``python -m monai.bundle run`` of ``bundles/<bundle>/configs/<configs...>`` with ``--key value`` overrides
    (non-strings as JSON)."""
    files = [str(REPO / "bundles" / bundle / "configs" / c) for c in configs]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
           "[" + ",".join(f"'{f}'" for f in files) + "]", "--bundle_root", str(REPO / "bundles" / bundle)]
    for k, v in overrides.items():
        cmd += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
    return cmd
