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
    # fewer evaluated slices per volume and fine-tuning slices than the README's run: the same code paths, cheaper
    proc = subprocess.run([PYTHON, "-m", "medsr_monai", "demo", "--bundles", "srcnn", "--finetune", "srcnn",
                           "--project-dir", str(proj), "--bundles-dir", str(REPO / "bundles"),
                           "--samples", str(sample_dir), "--eval-slices", "6", "--finetune-slices", "2"],
                          env=env, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=900)
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
    assert "| srcnn | x2 in-plane SR | **mean over subjects** | all | " in printed
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


def test_matched_baseline_is_the_best_classical_method_per_subject(tmp_path):
    """With several classical baselines (CT denoising: the low-dose input and a tuned filter) each subject is
    compared with whichever of them is best on it; a table without a group column (through-plane) takes the
    method's modality; a method that was not evaluated gets a row saying why."""
    from medsr_monai.demo import format_results_table, subject_gains

    table = tmp_path / "slices.csv"
    rows = [("p1", 0, "sr", 40.0), ("p1", 0, "lowdose", 34.0), ("p1", 0, "gaussian", 37.0),
            ("p1", 1, "sr", 42.0), ("p1", 1, "lowdose", 36.0), ("p1", 1, "gaussian", 35.0),
            ("p2", 0, "sr", 30.0), ("p2", 0, "lowdose", 31.0), ("p2", 0, "gaussian", 29.0)]
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["subject", "slice_index", "view", "method", "psnr", "ssim"])
        for subject, i, method, psnr in rows:
            w.writerow([subject, i, "native", method, psnr, 0.9])
    res = subject_gains(table, "sr", ("lowdose", "gaussian"), modality="CT")
    # p1: low-dose mean 35.0, Gaussian mean 36.0 -> Gaussian; p2: low-dose 31 beats Gaussian 29
    assert (res["p1"]["baseline"], res["p1"]["baseline_psnr"], res["p1"]["gain_db"]) == ("gaussian", 36.0, 5.0)
    assert (res["p2"]["baseline"], res["p2"]["gain_db"]) == ("lowdose", -1.0)
    assert res["p1"]["modality"] == "CT" and res["p1"]["slices"] == 2
    assert res["mean"]["gain_db"] == pytest.approx(2.0)
    text = format_results_table({"unet_ct_denoise": res}, {"srgan": "bundle has no models/model.pt"})
    assert "| unet_ct_denoise | CT denoising, 25 % dose | p1 | CT | 2 |" in text and "(gaussian) | 36.00 | 41.00 | +5.00" in text
    assert "| srgan | x4 in-plane SR | not evaluated: bundle has no models/model.pt |" in text
