"""The main job (``medsr demo``) end to end on the real samples: the shipped weights evaluated on the held-out
patients, the per-subject table it prints and the files it reads and writes."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess

import nibabel as nib
import numpy as np
import pytest
from helpers import PYTHON, REPO, bundle_env, mlflow_client, runs_of, sha256


@pytest.mark.slow
def test_demo_table_and_files(sample_dir, tmp_path):
    shipped = REPO / "bundles" / "srcnn" / "models" / "model.pt"
    before = sha256(shipped)
    proj = tmp_path / "proj"
    proj.mkdir()
    env = bundle_env(tmp_path)
    env.pop("MLFLOW_TRACKING_URI")  # the demo uses the project store
    proc = subprocess.run([PYTHON, "-m", "medsr_monai", "demo", "--bundles", "srcnn", "--finetune", "srcnn",
                           "--project-dir", str(proj), "--bundles-dir", str(REPO / "bundles"),
                           "--samples", str(sample_dir)], env=env, cwd=str(tmp_path), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:]
    demo = proj / "experiments" / "runs" / "demo"
    # the table is computed from the evaluation's per-slice file: per subject, then the mean over subjects
    rows = list(csv.DictReader(open(demo / "srcnn" / "evaluation" / "slices.csv")))
    results = json.loads((demo / "results.json").read_text())["srcnn"]
    assert set(results) == {"brain2", "robex_t1", "lung2", "cerr_lung4", "mean"}
    for subject in ("brain2", "robex_t1", "lung2", "cerr_lung4"):
        sr = [float(r["psnr"]) for r in rows if r["subject"] == subject and r["method"] == "sr"]
        base = [float(r["psnr"]) for r in rows if r["subject"] == subject and r["method"] == "baseline"]
        assert results[subject]["psnr"] == pytest.approx(statistics.mean(sr))
        assert results[subject]["gain_db"] == pytest.approx(statistics.mean(sr) - statistics.mean(base))
    assert results["mean"]["gain_db"] == pytest.approx(
        statistics.mean(results[s]["gain_db"] for s in ("brain2", "robex_t1", "lung2", "cerr_lung4")))
    printed = proc.stdout[proc.stdout.index("=== Shipped weights"):]
    assert "| srcnn | **mean over subjects** | all | " in printed
    assert f"{results['mean']['gain_db']:+.2f}" in printed and (demo / "results.md").read_text().strip() in printed
    # the shipped weights beat the matched baseline on the held-out patients (the point of shipping them)
    assert results["mean"]["gain_db"] > 0
    # fine-tuning ran from the shipped weights into the demo folder, tracked in the project store; the bundle's
    # own weights are untouched
    assert sha256(shipped) == before
    assert (demo / "srcnn_finetune" / "models" / "model.pt").is_file()
    client_uri = f"sqlite:///{proj / 'mlruns' / 'mlflow.db'}"
    (run,) = [r for r in runs_of(client_uri, "srcnn") if r.info.run_name == "srcnn-demo-finetune"]
    assert run.info.status == "FINISHED" and run.data.params["init_weights"].endswith("srcnn/models/model.pt")
    assert mlflow_client(client_uri).get_metric_history(run.info.run_id, "val_psnr")
    # one whole held-out volume, super-resolved on the x2 grid of brain2
    src, out = nib.load(sample_dir / "nifti" / "brain2.nii.gz"), nib.load(demo / "inference" / "brain2_sr.nii.gz")
    assert out.shape == (src.shape[0] * 2, src.shape[1] * 2, src.shape[2])
    np.testing.assert_allclose(np.linalg.norm(out.affine[:3, :2], axis=0), np.linalg.norm(src.affine[:3, :2], axis=0) / 2)
