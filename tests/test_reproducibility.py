"""Same config and seed on CPU -> the same weights and metrics; another seed -> different ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def _train(tmp: Path, datalist: Path, seed: int, tag: str) -> Path:
    out = tmp / tag
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", str(REPO / "bundles/srcnn/configs/train.json"),
        "--bundle_root", str(REPO / "bundles/srcnn"), "--dataset_dir", f"$'{datalist}'",
        "--output_dir", f"$'{out}'", "--ckpt_dir", f"$'{out / 'models'}'", "--seed", str(seed),
        "--patch_size", "32", "--patches_per_slice", "2", "--batch_size", "4", "--max_epochs", "2",
        "--val_slices_per_volume", "2",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_same_seed_same_weights_and_metrics(tmp_path, tiny_datalist):
    a = _train(tmp_path, Path(tiny_datalist), seed=7, tag="a")
    b = _train(tmp_path, Path(tiny_datalist), seed=7, tag="b")
    c = _train(tmp_path, Path(tiny_datalist), seed=8, tag="c")
    wa, wb, wc = (torch.load(x / "models" / "model.pt", weights_only=True) for x in (a, b, c))
    assert wa.keys() == wb.keys()
    tensors = list(wa)
    assert torch.equal(wa["physics_record"], wc["physics_record"])  # the same physics, whatever the seed
    for k in tensors:
        assert torch.equal(wa[k], wb[k]), f"weights differ between identical runs: {k}"
    assert any(not torch.equal(wa[k], wc[k]) for k in tensors), "a different seed should give different weights"
    ma, mb = (json.loads((x / "val_metrics.json").read_text()) for x in (a, b))
    assert ma == mb
    # the seed and the executed config (with the override) are recorded
    cfg = json.loads((a / "executed_config.json").read_text())
    assert cfg["seed"] == 7
