"""``medsr demo``: the main job. Evaluate the shipped weights on the held-out patients next to the matched classical
inverse, fine-tune one bundle briefly from its shipped weights (the training loop and MLflow tracking at work),
super-resolve one whole held-out volume, and print one table and where to look.

Everything the demo writes goes to ``<project>/experiments/runs/demo/`` (a bundle's ``models/`` and ``eval/`` are not
touched); the runs go to the project's MLflow store.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["DEMO_BUNDLES", "MATCHED_BASELINE", "format_results_table", "run_demo", "subject_gains"]

#: the in-plane x2 bundles the demo evaluates by default
DEMO_BUNDLES = ("srcnn", "edsr")
#: per bundle: the method name of its matched classical inverse in the evaluation's slices.csv, and in words
MATCHED_BASELINE = {
    "srcnn": ("baseline", "MR: k-space zero-fill, CT: cubic (corner grid)"),
    "edsr": ("baseline", "MR: k-space zero-fill, CT: cubic (corner grid)"),
    "srgan": ("baseline", "MR: k-space zero-fill, CT: cubic (corner grid)"),
}


def _bundle_cmd(bundle: Path, configs: list[str], overrides: dict[str, object]) -> list[str]:
    files = [str(bundle / "configs" / c) for c in configs]
    config_arg = files[0] if len(files) == 1 else repr(files)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_arg, "--bundle_root", str(bundle)]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    return cmd


def _run(cmd: list[str], log: Path, title: str) -> None:
    """Run a bundle command, streaming its output to the terminal and to ``log``."""
    print(f"\n=== {title}\n$ {shlex.join(cmd)}", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:  # type: ignore[union-attr]
            f.write(line)
            if "WARNING" not in line and "warn" not in line.lower():
                sys.stdout.write(line)
        proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{title} failed (exit {proc.returncode}); full log: {log}")


def subject_gains(slices_csv: str | os.PathLike, method: str = "sr", baseline: str = "baseline") -> dict[str, dict]:
    """Per held-out subject: mean PSNR of ``method`` and of ``baseline`` over its evaluated slices, and the gain.

    Args:
        slices_csv: an evaluation's per-slice table (``subject, ..., method, psnr, ssim``).
        method, baseline: the two method names to compare.

    Returns:
        ``{subject: {"modality", "psnr", "baseline_psnr", "gain_db", "ssim", "slices"}}`` plus ``"mean"``, the mean
        over subjects (each subject weighs the same, whatever its number of slices).
    """
    rows: dict[str, dict[str, list]] = {}
    with open(slices_csv, newline="") as f:
        for r in csv.DictReader(f):
            d = rows.setdefault(r["subject"], {"group": r.get("group", ""), method: [], baseline: [], "ssim": []})
            if r["method"] in (method, baseline):
                d[r["method"]].append(float(r["psnr"]))
                if r["method"] == method:
                    d["ssim"].append(float(r["ssim"]))
    out = {}
    for subject, d in rows.items():
        if d[method] and d[baseline]:
            p, b = statistics.mean(d[method]), statistics.mean(d[baseline])
            out[subject] = {"modality": d["group"], "psnr": p, "baseline_psnr": b, "gain_db": p - b,
                            "ssim": statistics.mean(d["ssim"]), "slices": len(d[method])}
    if out:
        mean = {k: statistics.mean(v[k] for v in out.values()) for k in ("psnr", "baseline_psnr", "gain_db", "ssim")}
        out["mean"] = {**mean, "modality": "all", "slices": sum(v["slices"] for v in out.values())}
    return out


def format_results_table(results: dict[str, dict[str, dict]]) -> str:
    """Markdown table: one row per method and held-out subject (and the mean over subjects), the method's PSNR /
    SSIM next to its matched classical inverse's PSNR and the gain.

    Args:
        results: ``{bundle: subject_gains(...)}``.
    """
    lines = ["| method | subject | modality | slices | matched baseline | baseline PSNR dB | method PSNR dB | "
             "gain dB | SSIM |", "|---|---|---|---|---|---|---|---|---|"]
    for name, per in results.items():
        words = MATCHED_BASELINE.get(name, ("baseline", "matched baseline"))[1]
        for subject, r in sorted(per.items(), key=lambda kv: (kv[0] == "mean", kv[1]["modality"], kv[0])):
            label = "**mean over subjects**" if subject == "mean" else subject
            lines.append(f"| {name} | {label} | {r['modality']} | {r['slices']} | {words} | {r['baseline_psnr']:.2f} | "
                         f"{r['psnr']:.2f} | {r['gain_db']:+.2f} | {r['ssim']:.4f} |")
    return "\n".join(lines)


def run_demo(bundles: list[str] | tuple[str, ...] = DEMO_BUNDLES, finetune: str | None = "srcnn",
             finetune_epochs: int = 1, finetune_slices: int = 4, samples: Path | None = None, infer: bool = True,
             project: str | os.PathLike | None = None, bundles_dir: str | os.PathLike | None = None) -> int:
    """Evaluate the shipped weights, fine-tune one bundle briefly, super-resolve a volume, print the table.

    Args:
        bundles: bundle names (found in the bundles folder, :func:`medsr_monai.paths.find_bundle`); each must ship
            ``models/model.pt``. Checked before anything runs.
        finetune: the bundle fine-tuned from its shipped weights (``None``: skip), for ``finetune_epochs`` epochs
            on ``finetune_slices`` slices per training volume and orientation.
        samples: sample data folder (default ``<project>/data/samples``).
        infer: super-resolve one whole held-out volume (brain2) with the last bundle's shipped weights.
        project, bundles_dir: ``--project-dir`` / ``--bundles-dir`` (see :mod:`medsr_monai.paths`).
    """
    from medsr_monai.paths import experiments_dir, find_bundle, samples_dir

    found = {name: find_bundle(name, bundles_dir, project) for name in bundles}  # refuse before anything runs
    found_ft = (found.get(finetune) or find_bundle(finetune, bundles_dir, project)) if finetune else None
    for bundle in [*found.values(), *([found_ft] if found_ft else [])]:
        for need in ("configs/train.json", "configs/evaluate.json", "models/model.pt"):
            if not (bundle / need).is_file():
                raise FileNotFoundError(f"bundle {bundle} has no {need}" + (
                    " (no shipped weights: train them with its configs/train.json first)" if need.startswith("models")
                    else ""))
    from medsr_monai.data import fetch_samples
    from medsr_monai.tracking import resolve_tracking_uri

    t0 = time.time()
    samples = fetch_samples(Path(samples) if samples else samples_dir(project)).resolve()
    uri = resolve_tracking_uri(next(iter(found.values())), project=project)
    os.environ.setdefault("MLFLOW_TRACKING_URI", uri)
    logs = experiments_dir(project) / "runs" / "demo"
    results: dict[str, dict] = {}
    for name, bundle in found.items():
        out = logs / name
        _run(_bundle_cmd(bundle, ["train.json", "evaluate.json"],
                         {"dataset_dir": samples, "output_dir": out, "ckpt_path": bundle / "models" / "model.pt"}),
             logs / f"{name}_evaluate.log", f"evaluate {name}'s shipped weights on the held-out patients")
        results[name] = subject_gains(out / "evaluation" / "slices.csv", "sr",
                                      MATCHED_BASELINE.get(name, ("baseline",))[0])
    if found_ft:
        out = logs / f"{finetune}_finetune"
        _run(_bundle_cmd(found_ft, ["train.json"], {
            "dataset_dir": samples, "output_dir": out, "ckpt_dir": out / "models", "resume": False,
            "init_weights": found_ft / "models" / "model.pt", "max_epochs": finetune_epochs,
            "train_max_slices_per_volume": finetune_slices, "run_name": f"{finetune}-demo-finetune"}),
            logs / f"{finetune}_finetune.log",
            f"fine-tune {finetune} from its shipped weights ({finetune_epochs} epoch, {finetune_slices} slices per "
            "volume and orientation), tracked in MLflow")
    last = list(found)[-1]
    if infer:
        volume = samples / "nifti" / "brain2.nii.gz"
        _run(_bundle_cmd(found[last], ["inference.json"], {"input": volume, "output_dir": logs / "inference"}),
             logs / f"{last}_inference.log", f"super-resolve a whole held-out volume with {last}")
    table = format_results_table(results)
    (logs / "results.md").write_text(table + "\n")
    (logs / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    store = uri.split(":///", 1)[-1]
    print("\n=== Shipped weights on the held-out patients, x2 in-plane, against the matched classical inverse "
          "(PSNR over slices with >= 10 % foreground, then the mean over subjects)\n")
    print(table)
    print(f"\nfinished in {(time.time() - t0) / 60:.1f} min. Where to look:")
    print(f"  MLflow UI:        medsr ui   (or: mlflow ui --backend-store-uri sqlite:///{store} --port 5000)")
    for name in found:
        print(f"  {name:6s} outputs:   {logs / name}/evaluation/ (grids/, metrics.json, slices.csv)")
    if found_ft:
        print(f"  fine-tuned {finetune}: {logs / f'{finetune}_finetune'}/ (models/model.pt, grids/, val_metrics.json)")
    if infer:
        print(f"  SR volume:        {logs / 'inference' / 'brain2_sr.nii.gz'} (+ .json sidecar)")
    print(f"  logs and table:   {logs}/ (results.md, results.json)")
    return 0
