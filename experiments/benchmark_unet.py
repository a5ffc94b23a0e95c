#!/usr/bin/env python
"""Benchmark of the U-Net restoration bundle (``bundles/unet``) on the sample data, on this CPU.

Rows (``--rows``):

* ``mri4``: accelerated MRI reconstruction, 4x, 8 % fully sampled centre (equispaced mask unless ``--mask-type``);
  trained on brain1 + MNI152, validated on the pydeface mean head, tested on the held-out patient brain2 (every slice
  with >= 10 % foreground, the same seeded mask for every slice). Baseline: the zero-filled reconstruction.
  Target: >= +3 dB over zero-filled and SSIM >= 0.90.
* ``mri8``: the same at 8x with a 4 % centre.
* ``ct``: low-dose CT denoising (projection-domain simulated 25 % dose, ``incident_photons`` 1e6); trained on lung1,
  Gaussian sigma chosen on the CQ500 / Pancreas-CT validation slices, tested on the held-out patient lung2.
  Baselines: the low-dose input, Gaussian smoothing, non-local means. Target: >= +6 dB over the low-dose input.

Each row is ``python -m monai.bundle run`` with the bundle's own ``train.json`` (overrides: ``task``, the mask,
``max_epochs`` x ``train#trainer#epoch_length`` iterations: the fixed CPU budget), then ``train.json +
evaluate.json``. Wall times are recorded. Low-dose simulations are cached under ``<runs-dir>/lowdose_cache`` (the
first CT row simulates lung1 and lung2 once: a few minutes). Results: ``<out>/unet.json`` and ``unet.md`` (printed);
weights in ``<out>/weights/unet_<row>.pt`` (``--ship`` also copies the ``mri4`` and ``ct`` weights into
``bundles/unet/models/``); MLflow runs in ``<runs-dir>/mlruns``.

Example::

    OMP_NUM_THREADS=2 nohup .venv/bin/python experiments/benchmark_unet.py --ship > experiments/results/unet.log 2>&1 &
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench_common import REPO, expr_path, log, run_logged  # experiments/ is on sys.path when run as a script

#: row -> bundle overrides (besides the budget)
ROWS = {
    "mri4": {"task": "mri_recon", "acceleration": 4, "center_fraction": 0.08},
    "mri4_k2": {"task": "mri_recon", "acceleration": 4, "center_fraction": 0.08, "cascades": 2},
    "mri4_nodc": {"task": "mri_recon", "acceleration": 4, "center_fraction": 0.08, "consistency": False},
    "mri8": {"task": "mri_recon", "acceleration": 8, "center_fraction": 0.04},
    "ct": {"task": "ct_denoise"},
}
SHIP = {"mri4": "model.pt", "ct": "model_ct_denoise.pt"}


def bundle_cmd(configs: list[str], overrides: dict[str, Any]) -> list[str]:
    files = [str(REPO / "bundles" / "unet" / "configs" / c) for c in configs]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
           "[" + ",".join(f"'{f}'" for f in files) + "]", "--bundle_root", str(REPO / "bundles" / "unet")]
    for k, v in overrides.items():
        cmd += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
    return cmd


def bench(row: str, args, env: dict[str, str], previous: dict[str, Any] | None = None) -> dict[str, Any]:
    run_dir = args.runs_dir / row
    if args.eval_only:
        if previous is None or not any((run_dir / "models").glob("*.pt")):
            raise SystemExit(f"--eval-only: no earlier training of row {row} in {run_dir} / the results json")
    elif run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # each task has its own config (train.json: MRI reconstruction; train_ct_denoise.json: CT denoising)
    train_cfg = "train.json" if ROWS[row]["task"] == "mri_recon" else f"train_{ROWS[row]['task']}.json"
    settings = {**ROWS[row], "max_epochs": args.epochs, "train#trainer#epoch_length": args.epoch_length,
                "batch_size": args.batch_size, "patch_size": args.patch_size}
    if args.lr is not None:
        settings["learning_rate"] = args.lr
    if row.startswith("mri"):
        settings["mask_type"] = args.mask_type
    paths = {"output_dir": expr_path(run_dir / "out"), "ckpt_dir": expr_path(run_dir / "models"),
             "lowdose_cache_dir": expr_path(args.runs_dir / "lowdose_cache")}
    if args.eval_only:  # re-evaluate the trained weights (e.g. after a change of the baselines)
        train_s = previous["train_s"]
    else:
        log(f"{row}: training {settings}")
        train_s = run_logged(bundle_cmd([train_cfg], {**settings, **paths}), run_dir / "train.log", env)
    log(f"{row}: trained in {train_s / 60:.1f} min; evaluating on the held-out patient")
    eval_s = run_logged(bundle_cmd([train_cfg, "evaluate.json"], {**settings, **paths}), run_dir / "eval.log", env)
    metrics = json.loads((run_dir / "out" / "evaluation" / "metrics.json").read_text())
    val = json.loads((run_dir / "out" / "val_metrics.json").read_text())
    weights = next((run_dir / "models").glob("*.pt"))
    (args.out / "weights").mkdir(parents=True, exist_ok=True)
    shutil.copy2(weights, args.out / "weights" / f"unet_{row}.pt")
    grid = run_dir / "out" / "evaluation" / "grids" / "grid_latest.png"
    if grid.exists():
        shutil.copy2(grid, args.out / f"unet_{row}_test_grid.png")
    if args.ship and row in SHIP:
        shutil.copy2(weights, REPO / "bundles" / "unet" / "models" / SHIP[row])
    gaussian_sigma = tracked_param(env["MLFLOW_TRACKING_URI"], f"unet_{settings['task']}", "gaussian_sigma")
    return {"settings": settings, "train_s": train_s, "eval_s": eval_s, "metrics": metrics, "last_val": val,
            "created": dt.datetime.now().isoformat(timespec="seconds"),
            "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                  text=True).stdout.strip(),
            "gaussian_sigma": gaussian_sigma,
            "iterations": args.epochs * args.epoch_length,
            "patches_seen": args.epochs * args.epoch_length * args.batch_size}


def tracked_param(uri: str, experiment: str, key: str) -> str | None:
    """A parameter of the newest run of ``experiment`` (e.g. the Gaussian sigma the config chose on validation)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].data.params.get(key) if runs else None


def fmt(x: Any, nd: int = 2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def render(res: dict[str, Any]) -> str:
    lines = [f"# U-Net restoration on the sample data ({res['created']}, {res['machine']}, git {res['git']})", "",
             "PSNR (dB) / SSIM (MONAI, 11x11 Gaussian window) on the normalised [0, 1] scale (MR: 0.5-99.5 "
             "percentiles of the fully sampled volume; CT: HU window [-1000, 1000]), data range 1, whole slices "
             "with >= 10 % foreground, averaged over slices; held-out patients only.", ""]
    for row in [r for r in ROWS if r in res]:
        r = res[row]
        m, s = r["metrics"], r["settings"]
        budget = (f"{r['iterations']} iterations x batch {s['batch_size']} ({s['patch_size']}^2 patches), "
                  f"training {r['train_s'] / 60:.1f} min, evaluation {r['eval_s'] / 60:.1f} min; "
                  + (f"run {r['created']} at git {r['git']}" if "git" in r else
                     "an earlier run of the models before the physics wrappers (no data consistency; see "
                     "results/archive/unet_before_physics_b2ffc68.md)"))
        if row == "ct":
            budget += (" (a first run also simulates the low-dose scans once, 2-4 s per 512^2 slice: about 6 min "
                       "for lung1 in training, 4 min for lung2 in evaluation; cached for later runs)")
        if row.startswith("mri"):
            model = (f"{s.get('cascades', 1)} U-Net(s) from the complex zero-filled image, "
                     + ("k-space data consistency after each" if s.get("consistency", True) else
                        "no data consistency (ablation)"))
            lines += [f"## MRI reconstruction {s['acceleration']}x ({s['mask_type']} mask, centre "
                      f"{s['center_fraction']:.0%}), test patient brain2: {model}", "", f"Budget: {budget}.", "",
                      "| method | PSNR dB | SSIM | gain dB |", "|---|---|---|---|",
                      f"| zero-filled | {fmt(m['test_zerofill_psnr'])} | {fmt(m['test_zerofill_ssim'], 4)} | - |",
                      f"| U-Net | {fmt(m['test_sr_psnr'])} | {fmt(m['test_sr_ssim'], 4)} | "
                      f"{m['test_zerofill_gain_db']:+.2f} |", ""]
            if s["acceleration"] == 4:
                gain, ssim = m["test_zerofill_gain_db"], m["test_sr_ssim"]
                lines += [f"Targets: >= +4 dB over zero-filled: {gain:+.2f} dB ({'met' if gain >= 4 else 'NOT met'}); "
                          f"SSIM >= 0.85: {ssim:.4f} ({'met' if ssim >= 0.85 else 'NOT met'}).", ""]
        else:
            lines += ["## Low-dose CT denoising (simulated 25 % dose), test patient lung2", "", f"Budget: {budget}.",
                      "", "| method | PSNR dB | SSIM | U-Net gain over it, dB |", "|---|---|---|---|"]
            sigma = r.get("gaussian_sigma") or "?"
            for name, key in (("low-dose input", "lowdose"),
                              (f"Gaussian (sigma {sigma} px, chosen on validation)", "gaussian"),
                              ("non-local means (scikit-image)", "nlm")):
                if f"test_{key}_psnr" in m:
                    lines.append(f"| {name} | {fmt(m[f'test_{key}_psnr'])} | {fmt(m[f'test_{key}_ssim'], 4)} | "
                                 f"{m[f'test_{key}_gain_db']:+.2f} |")
            lines += [f"| U-Net | {fmt(m['test_sr_psnr'])} | {fmt(m['test_sr_ssim'], 4)} | - |", "",
                      f"Target (>= +6 dB over the low-dose input): "
                      f"{'met' if m['test_lowdose_gain_db'] >= 6 else 'NOT met'}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--rows", nargs="+", default=["mri4", "ct"], choices=list(ROWS))
    ap.add_argument("--epochs", type=int, default=10, help="epochs per row (validation after each)")
    ap.add_argument("--epoch-length", type=int, default=30, help="iterations per epoch")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--patch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=None, help="learning rate (default: the bundle's)")
    ap.add_argument("--mask-type", default="equispaced", choices=["equispaced", "random"])
    ap.add_argument("--eval-only", action="store_true", help="re-evaluate rows trained before (same runs-dir)")
    ap.add_argument("--ship", action="store_true", help="copy the mri4 / ct weights into bundles/unet/models/")
    ap.add_argument("--out", type=Path, default=REPO / "experiments" / "results")
    ap.add_argument("--runs-dir", type=Path, default=REPO / "experiments" / "runs" / "unet")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.runs_dir / "mlruns").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               MLFLOW_TRACKING_URI=f"sqlite:///{(args.runs_dir / 'mlruns').resolve()}/mlflow.db")
    result_path = args.out / "unet.json"
    res = json.loads(result_path.read_text()) if result_path.exists() else {}
    res.update(created=dt.datetime.now().isoformat(timespec="seconds"),
               machine=f"{os.cpu_count()} CPU cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'default')}",
               git=subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                  text=True).stdout.strip())
    for row in args.rows:
        res[row] = bench(row, args, env, res.get(row))
        result_path.write_text(json.dumps(res, indent=2))
    md = render(res)
    (args.out / "unet.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
