#!/usr/bin/env python
"""x2 quality/speed benchmark of the medsr-monai bundles (SRCNN, EDSR) on the sample data, on this CPU.

Stages (all by default, in this order; ``--stages`` picks a subset):

1. ``throughput``  training images/s of the bundle's ``SupervisedTrainer`` (minimal and full handler list)
                   against a plain PyTorch loop on the same loader/network/loss/optimizer
                   (``experiments/throughput.py``). The framework's s/iteration also sizes the epochs of 2.
2. ``train``       ``python -m monai.bundle run`` with the bundle's own ``train.json`` plus a budget override
                   (JSON file, merged by MONAI): Ignite's ``TimeLimit`` appended to ``train#handlers``
                   (``+train#handlers``), ``max_epochs`` 100000, ``train#trainer#epoch_length`` so that an
                   epoch is about ``--epoch-target-s`` (validation and the best-by-val-PSNR checkpoint every
                   epoch), ``resume`` off, and one last validation when the time limit ends the run mid-epoch
                   (Ignite fires no EPOCH_COMPLETED then). Outputs under ``<runs>/<bundle>/``.
3. ``eval``        ``train.json`` + ``evaluate.json`` on the held-out test patients (brain2 MR, lung2 CT) with
                   ``ckpt_path`` = the run's ``models/model.pt``: PSNR/SSIM of the model, of corner-grid cubic
                   ("bicubic") and of k-space zero-filling (MR), per modality.
4. ``infer``       ``inference.json`` on ``data/samples/nifti/brain2.nii.gz`` and ``lung2.nii.gz`` (the
                   bundle's ``runner``; timed in this process, Python start-up excluded), s/volume.

Results: ``<out>/benchmark_x2.json``, ``<out>/benchmark_x2.md`` (table printed at the end), the test
metrics/slices of each bundle, and the best weights in ``<out>/weights/<bundle>_x2.pt``.
MLflow runs go to ``--tracking-uri`` (default: a separate sqlite store in ``experiments/runs/mlruns``,
outside git and apart from the project store ``mlruns/``).

Example::

    nohup .venv/bin/python experiments/benchmark_x2.py --budget-min 8 > experiments/results/benchmark_x2.log 2>&1 &
    # smoke test (tiny budget, few eval slices, cropped inference volumes, separate folders):
    .venv/bin/python experiments/benchmark_x2.py --budget-min 0.5 --quick \\
        --out experiments/runs/smoke/results --runs-dir experiments/runs/smoke
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

STAGES = ("throughput", "train", "eval", "infer")
PSEUDO_STAGES = ("report",)  # re-render benchmark_x2.json/.md from the stored results
TEST_VOLUMES = ("brain2", "lung2")
MODALITIES = ("MR", "CT")
# dB over the matched classical inverse: k-space zero-fill for MR (k-space truncation), cubic on the corner grid for
# CT (decimation); the issue-12 targets for MR, the earlier ones for CT
TARGETS = {("edsr", "MR"): ("zerofill", 0.5), ("edsr", "CT"): ("bicubic", 1.0),
           ("srcnn", "MR"): ("zerofill", 0.0), ("srcnn", "CT"): ("bicubic", 0.3)}
BASELINE_NAMES = {"zerofill": "k-space zero-fill", "bicubic": "cubic (corner grid)"}
RATIO_TARGET = 0.9
# iterations per ~90 s epoch measured by the throughput stage of the last full run (2026-11-21), used when that
# stage is skipped
FALLBACK_EPOCH_LENGTH = {"srcnn": 202, "edsr": 50}

# Ignite's TimeLimit has no ``attach``; MONAI attaches handler-list entries with ``attach(engine)``, so the
# override wraps it in a namespace whose ``attach`` registers it on ITERATION_COMPLETED and restarts its clock
# at STARTED (TimeLimit's clock starts when it is constructed, i.e. while the config is still being parsed).
TIME_LIMIT_HANDLER = (
    "$types.SimpleNamespace(attach=lambda e: ("
    "e.add_event_handler(ignite.engine.Events.STARTED, lambda _: setattr(@bench_time_limit, 'start_time', time.time())), "
    "e.add_event_handler(ignite.engine.Events.ITERATION_COMPLETED, @bench_time_limit)))"
)
# TimeLimit terminates mid-epoch: Ignite then fires TERMINATE (not EPOCH_COMPLETED), so the bundle's
# ValidationHandler would never see the last partial epoch. Validate once more so that it can become the best.
FINAL_VALIDATION_HANDLER = (
    "$types.SimpleNamespace(attach=lambda e: e.add_event_handler(ignite.engine.Events.TERMINATE, "
    "lambda eng: @validate#evaluator.run(eng.state.epoch)))"
)


# ------------------------------------------------------------------------------------------------ helpers
def log(msg: str) -> None:
    # leading newline: tqdm progress bars of the bundles share the log and end lines with '\r'
    print(f"\n[{dt.datetime.now():%H:%M:%S}] {msg}", flush=True)


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def expr_path(p: Path) -> str:
    """A path as a MONAI config expression (a plain-string output_dir breaks the saved-config artifact)."""
    return "$" + repr(str(p))


def git_info() -> dict[str, Any]:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=20).stdout.strip()

    try:
        commit = git("rev-parse", "--verify", "-q", "HEAD")
        status = git("status", "--porcelain")
        return {"commit": commit or "none (repository has no commits yet)",
                "dirty_or_untracked_entries": len([s for s in status.splitlines() if s])}
    except (OSError, subprocess.SubprocessError) as e:
        return {"commit": f"unknown ({e})"}


def machine_info() -> dict[str, Any]:
    import torch

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("torch", "monai", "pytorch-ignite", "mlflow", "numpy", "nibabel"):
        try:
            from importlib.metadata import version

            versions[pkg] = version(pkg)
        except Exception:  # noqa: BLE001
            versions[pkg] = "absent"
    return {
        "cpu_model": model, "os_cpu_count": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "device": "cpu", "python": platform.python_version(),
        "platform": platform.platform(), "versions": versions, "loadavg_at_start": loadavg(),
    }


def code_fingerprint(bundles: list[str]) -> dict[str, str]:
    """sha256 of the bundle configs and of the library sources used (other people edit them meanwhile)."""
    import hashlib

    out = {}
    for b in bundles:
        for f in sorted((REPO / "bundles" / b / "configs").glob("*.json")):
            out[str(f.relative_to(REPO))] = hashlib.sha256(f.read_bytes()).hexdigest()[:16]
    h = hashlib.sha256()
    for f in sorted((REPO / "medsr_monai").rglob("*.py")):
        h.update(str(f.relative_to(REPO)).encode())
        h.update(f.read_bytes())
    out["medsr_monai/**/*.py"] = h.hexdigest()[:16]
    return out


def run_logged(cmd: list[str], log_path: Path, env: dict[str, str]) -> float:
    """Run ``cmd`` from the repository root, output to ``log_path``; return the wall time; raise on failure."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log(f"$ {' '.join(cmd)}  (log: {log_path.relative_to(REPO) if log_path.is_relative_to(REPO) else log_path})")
    t0 = time.perf_counter()
    with open(log_path, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = "\n".join(log_path.read_text(errors="replace").replace("\r", "\n").splitlines()[-40:])
        raise RuntimeError(f"command failed with exit code {rc} after {wall:.0f} s; last lines of {log_path}:\n{tail}")
    return wall


# ------------------------------------------------------------------------------------------------ stages
def stage_throughput(bundle: str, args, res: dict) -> None:
    import throughput

    r = throughput.measure(bundle, seconds=args.tp_seconds, rounds=args.tp_rounds, warmup=args.tp_warmup,
                           iters=args.tp_iters, block_s=args.tp_block_s, work_dir=args.runs_dir / "throughput",
                           log=log)
    r["loadavg_after"] = loadavg()
    res["throughput"][bundle] = r
    v = r["variants"]
    log(f"[throughput {bundle}] plain {v['plain']['img_s_median']:.2f} img/s, trainer {v['trainer']['img_s_median']:.2f},"
        f" trainer_full {v['trainer_full']['img_s_median']:.2f} (median per iteration); ratio trainer/plain "
        f"{r['ratio_trainer_median']:.3f}, full/plain {r['ratio_trainer_full_median']:.3f} (CPU-time based "
        f"{r['ratio_trainer_cpu_median']:.3f} / {r['ratio_trainer_full_cpu_median']:.3f})")


def epoch_length_for(bundle: str, args, res: dict) -> tuple[int, str]:
    if args.epoch_length:
        return args.epoch_length, "--epoch-length"
    budget_s = args.budget_min * 60
    target = min(args.epoch_target_s, budget_s / 4)  # at least ~4 validations within the budget
    tp = res.get("throughput", {}).get(bundle)
    if tp:
        s_it = tp["s_per_iter_median_all"]
        return max(1, round(target / s_it)), f"auto: {target:.0f} s / {s_it:.2f} s per iteration (throughput stage)"
    n = FALLBACK_EPOCH_LENGTH.get(bundle, 10)
    return max(1, round(n * target / 90)), "fallback table (throughput stage not run)"


def stage_train(bundle: str, args, res: dict, env: dict[str, str], stamp: str) -> None:
    run_dir = args.runs_dir / bundle
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    budget_s = max(1, int(round(args.budget_min * 60)))
    epoch_length, why = epoch_length_for(bundle, args, res)
    run_name = f"bench-x2-{bundle}-{stamp}"
    iterations = dict(kv.split("=") for kv in args.iterations).get(bundle) if args.iterations else None
    max_epochs = 100000
    if iterations:  # a compute budget that does not depend on the machine's load: N iterations, no time limit
        max_epochs = max(1, math.ceil(int(iterations) / epoch_length))
        budget_s = 100 * budget_s
    override: dict[str, Any] = {
        "+imports": ["$import time", "$import types"],
        "bench_budget_sec": budget_s,
        "bench_time_limit": {"_target_": "ignite.handlers.TimeLimit", "limit_sec": "@bench_budget_sec"},
        "max_epochs": max_epochs,
        "resume": False,
        "run_name": run_name,
        "train#trainer#epoch_length": epoch_length,
        "+train#handlers": [TIME_LIMIT_HANDLER, FINAL_VALIDATION_HANDLER],
    }
    if args.patches_per_slice:
        override["patches_per_slice"] = args.patches_per_slice
    override_path = run_dir / "budget_override.json"
    override_path.write_text(json.dumps(override, indent=2))
    bdir = f"bundles/{bundle}"
    cmd = [sys.executable, "-m", "monai.bundle", "run",
           "--config_file", repr([f"{bdir}/configs/train.json", str(override_path)]),
           "--bundle_root", bdir, "--output_dir", expr_path(run_dir), "--ckpt_dir", expr_path(run_dir / "models")]
    info: dict[str, Any] = {"budget_s": budget_s, "iterations_budget": int(iterations) if iterations else None, "epoch_length": epoch_length, "epoch_length_from": why,
                            "run_name": run_name, "override": override, "run_dir": str(run_dir),
                            "loadavg_before": loadavg()}
    res["training"][bundle] = info
    info["process_wall_s"] = run_logged(cmd, run_dir / "train.log", env)
    info["loadavg_after"] = loadavg()
    model = run_dir / "models" / "model.pt"
    if not model.is_file():
        raise FileNotFoundError(f"training finished without a best checkpoint {model}")
    info["checkpoint"] = str(model)
    info.update(training_history(bundle, run_name, epoch_length, env["MLFLOW_TRACKING_URI"]))
    info["batch"] = batch_info(bundle, args.patches_per_slice)
    log(f"[train {bundle}] {info.get('iterations')} iterations / {info.get('epochs_validated')} validations in "
        f"{budget_s} s budget (process {info['process_wall_s']:.0f} s); best {info.get('checkpoint_metric')} "
        f"{info.get('best_val')} at epoch {info.get('best_epoch')}; loss trend: "
        f"{info.get('loss_trend', {}).get('verdict')}")


def batch_info(bundle: str, patches_per_slice: int = 0) -> dict[str, Any]:
    """Slices per loader batch (the loader's batch_size expression, evaluated) x patches per slice."""
    import throughput

    overrides = {"patches_per_slice": patches_per_slice} if patches_per_slice else {}
    parser = throughput.bundle_parser(bundle, overrides)
    slices = int(parser.get_parsed_content("train#dataloader#batch_size"))
    pps = int(parser.get_parsed_content("patches_per_slice"))
    patch, scale = int(parser.get_parsed_content("patch_size")), int(parser.get_parsed_content("scale"))
    return {"slices_per_batch": slices, "patches_per_slice": pps, "patches_per_iteration": slices * pps,
            "hr_patch": patch, "lr_patch": patch // scale, "config_batch_size": parser.get_parsed_content("batch_size")}


def measured_patches_per_iteration(res: dict, bundle: str) -> int | None:
    """The largest batch the throughput stage saw (the last batch of a loader pass can be smaller)."""
    recs = res.get("throughput", {}).get(bundle, {}).get("variants", {}).get("plain", {})
    recs = recs.get("per_iteration_wall_cpu_images") or []
    return max((int(r[2]) for r in recs), default=None)


def checkpoint_metric(bundle: str) -> str:
    """The validation metric the bundle's best-checkpoint saver ranks by (``key_metric_name``, else the key metric)."""
    cfg = json.loads((REPO / "bundles" / bundle / "configs" / "train.json").read_text())
    val = cfg.get("validate", {})
    for h in val.get("handlers", []):
        if isinstance(h, dict) and str(h.get("_target_", "")).endswith("CheckpointSaver") and h.get("save_key_metric"):
            return h.get("key_metric_name") or next(iter(val.get("key_metric", {"val_psnr": 0})))
    return next(iter(val.get("key_metric", {"val_psnr": 0})))


def training_history(bundle: str, run_name: str, epoch_length: int, uri: str) -> dict[str, Any]:
    """Loss and validation history of the run from MLflow (the bundle logs train_loss per iteration)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(bundle)
    if exp is None:
        return {"history_error": f"no MLflow experiment {bundle!r} in {uri}"}
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.runName = '{run_name}'")
    if not runs:
        return {"history_error": f"no MLflow run {run_name!r}"}
    run = runs[0]
    key = checkpoint_metric(bundle)
    out: dict[str, Any] = {"mlflow_run_id": run.info.run_id, "mlflow_status": run.info.status,
                           "checkpoint_metric": key}

    def hist(name: str) -> dict[int, float]:
        return dict(sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)))

    loss = list(hist("train_loss").values())
    out["iterations"] = len(loss)
    names = [key] + [k for k in ("val_psnr", "val_balanced_psnr", "val_MR_sr_psnr", "val_MR_bicubic_psnr",
                                 "val_CT_sr_psnr", "val_CT_bicubic_psnr", "val_ssim") if k != key]
    val = {k: h for k in names if (h := hist(k))}
    epochs = sorted(val.get(key, {}))
    out["epochs_validated"] = len(epochs)
    out["val_history"] = [{"epoch": e, **{k: round(v[e], 4) for k, v in val.items() if e in v}} for e in epochs]
    if epochs:
        best = max(epochs, key=lambda e: val[key][e])
        out["best_epoch"], out["best_val"] = best, round(val[key][best], 4)
        for g in MODALITIES:
            if f"val_{g}_sr_psnr" in val and best in val[f"val_{g}_sr_psnr"]:
                out[f"best_val_{g}_sr_psnr"] = round(val[f"val_{g}_sr_psnr"][best], 4)
            if f"val_{g}_bicubic_psnr" in val:
                out[f"val_{g}_bicubic_psnr"] = round(next(iter(val[f"val_{g}_bicubic_psnr"].values())), 4)
        out["best_is_last_validation"] = best == epochs[-1]
    if loss:
        out["loss_epoch_means"] = [round(statistics.fmean(loss[i:i + epoch_length]), 6)
                                   for i in range(0, len(loss), epoch_length)]
        out["loss_trend"] = loss_trend(loss)
    return out


def loss_trend(loss: list[float]) -> dict[str, Any]:
    """Least-squares slope of the training loss over the second half of the run, with its t-value."""
    n = len(loss)
    tail = loss[n // 2:]
    m = len(tail)
    res: dict[str, Any] = {"first_quarter_mean": statistics.fmean(loss[: max(1, n // 4)]),
                           "last_quarter_mean": statistics.fmean(loss[-max(1, n // 4):])}
    if m < 4:
        res["verdict"] = "too few iterations"
        return res
    xs = list(range(m))
    mx, my = statistics.fmean(xs), statistics.fmean(tail)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, tail)) / sxx
    resid = [y - (my + slope * (x - mx)) for x, y in zip(xs, tail)]
    se = math.sqrt(sum(r * r for r in resid) / max(1, m - 2) / sxx) if sxx else float("inf")
    t = slope / se if se > 0 else 0.0
    res.update({"second_half_slope_per_100_it": slope * 100, "second_half_slope_t": t,
                "second_half_relative_change": slope * (m - 1) / my if my else float("nan")})
    res["verdict"] = ("still falling" if t < -2 else "rising" if t > 2
                      else "no significant trend (noisy per-batch loss)")
    return res


def stage_eval(bundle: str, args, res: dict, env: dict[str, str], stamp: str) -> None:
    run_dir = args.runs_dir / bundle
    ckpt = run_dir / "models" / "model.pt"
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt} does not exist: run the train stage first")
    bdir = f"bundles/{bundle}"
    configs = [f"{bdir}/configs/train.json", f"{bdir}/configs/evaluate.json"]
    if args.eval_max_slices:
        quick = run_dir / "eval_subset_override.json"
        quick.write_text(json.dumps({"validate#slices": (
            "$medsr_monai.data.volume_slices(@validate#datalist, @volume_transforms, crop_multiple=@scale, "
            f"max_slices_per_volume={int(args.eval_max_slices)})")}, indent=2))
        configs.append(str(quick))
    eval_dir = run_dir / "evaluation"
    if eval_dir.exists():
        shutil.rmtree(eval_dir)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", repr(configs), "--bundle_root", bdir,
           "--output_dir", expr_path(run_dir), "--ckpt_path", expr_path(ckpt),
           "--run_name", f"bench-x2-{bundle}-eval-{stamp}"]
    wall = run_logged(cmd, run_dir / "eval.log", env)
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    counts: dict[str, int] = defaultdict(int)
    with open(eval_dir / "slices.csv") as f:
        for row in csv.DictReader(f):
            if row["method"] == "sr":
                counts[row["group"]] += 1
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copy(eval_dir / "metrics.json", args.out / f"{bundle}_x2_test_metrics.json")
    shutil.copy(eval_dir / "slices.csv", args.out / f"{bundle}_x2_test_slices.csv")
    res["evaluation"][bundle] = {"metrics": metrics, "slices_per_modality": dict(counts), "process_wall_s": wall,
                                 "checkpoint": str(ckpt), "eval_max_slices_per_volume": args.eval_max_slices or None}
    log(f"[eval {bundle}] " + ", ".join(
        f"{g}: SR {metrics.get(f'test_{g}_sr_psnr', float('nan')):.3f} dB vs bicubic "
        f"{metrics.get(f'test_{g}_bicubic_psnr', float('nan')):.3f}" for g in MODALITIES))


def subset_volume(src: Path, k: int, dst_dir: Path) -> Path:
    """The central ``k`` slices (along the thick-slice axis) of ``src`` as a new NIfTI (for quick runs only)."""
    import nibabel as nib
    import numpy as np

    from medsr_monai.data.slices import slice_axis_from_spacing

    img = nib.load(str(src))
    axis = slice_axis_from_spacing(img.header.get_zooms()[:3])
    n = img.shape[axis]
    start = max(0, n // 2 - k // 2)
    sl = [slice(None)] * 3
    sl[axis] = slice(start, min(n, start + k))
    data = np.asarray(img.dataobj)[tuple(sl)]
    affine = img.affine.copy()
    shift = np.zeros(4)
    shift[axis], shift[3] = start, 1
    affine[:3, 3] = (img.affine @ shift)[:3]
    out_img = nib.Nifti1Image(data, affine, img.header)
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / src.name.replace(".nii.gz", f"_c{k}.nii.gz")
    nib.save(out_img, str(dst))
    return dst


def stage_infer(bundle: str, args, res: dict) -> None:
    from monai.bundle import ConfigParser

    run_dir = args.runs_dir / bundle
    ckpt = run_dir / "models" / "model.pt"
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt} does not exist: run the train stage first")
    bdir = REPO / "bundles" / bundle
    out: dict[str, Any] = {"checkpoint": str(ckpt), "volumes": {}}
    res["inference"][bundle] = out
    for name in TEST_VOLUMES:
        src = REPO / "data" / "samples" / "nifti" / f"{name}.nii.gz"
        subset = None
        if args.infer_max_slices:
            src = subset_volume(src, args.infer_max_slices, args.runs_dir / "infer_inputs")
            subset = args.infer_max_slices
        parser = ConfigParser()
        parser.read_config(str(bdir / "configs" / "inference.json"))
        parser.read_meta(str(bdir / "configs" / "metadata.json"))
        parser.update({"bundle_root": str(bdir), "input": str(src), "ckpt_path": str(ckpt),
                       "output_dir": str(run_dir / "inference")})
        runner = parser.get_parsed_content("runner")  # builds the network (untimed)
        runner.progress = False
        la = loadavg()
        t0 = time.perf_counter()
        written = runner.run()  # what inference.json's "run" does: load weights, read, SR, write NIfTI + sidecar
        secs = time.perf_counter() - t0
        sidecar = json.loads(written[0].with_name(written[0].name.replace(".nii.gz", ".json")).read_text())
        out["volumes"][name] = {
            "seconds": secs, "input": str(src), "subset_slices": subset, "output": str(written[0]),
            "input_shape": sidecar["input_shape"], "output_shape": sidecar["output_shape"],
            "output_spacing_mm": sidecar["output_spacing_mm"], "modality": sidecar["modality"],
            "slices": sidecar["input_shape"][sidecar["slice_axis"]], "roi_size": sidecar["roi_size"],
            "sw_batch_size": sidecar["sw_batch_size"], "loadavg_before": la, "loadavg_after": loadavg(),
        }
        log(f"[infer {bundle}] {name}: {secs:.1f} s ({sidecar['input_shape']} -> {sidecar['output_shape']})")
        del runner, parser


# ------------------------------------------------------------------------------------------------ report
def quality_rows(res: dict) -> dict[str, dict[str, Any]]:
    ev = res.get("evaluation", {})
    rows: dict[str, dict[str, Any]] = {}
    if not ev:
        return rows
    for b in ev.values():  # the bundles' matched baseline ("baseline") is k-space zero-fill on the MR slices
        m = b["metrics"]
        for k in ("psnr", "ssim", "gain_db"):
            if f"test_MR_baseline_{k}" in m and f"test_MR_zerofill_{k}" not in m:
                m[f"test_MR_zerofill_{k}"] = m[f"test_MR_baseline_{k}"]
    ref = next(iter(ev.values()))["metrics"]
    base_diff = 0.0
    for b in ev.values():
        for k, v in b["metrics"].items():
            if ("bicubic" in k or "zerofill" in k) and "gain" not in k and k in ref:
                base_diff = max(base_diff, abs(v - ref[k]))
    res["baselines_max_abs_diff_between_bundle_evals"] = base_diff
    for base in ("bicubic", "zerofill"):
        row = {}
        for g in MODALITIES:
            for m in ("psnr", "ssim"):
                key = f"test_{g}_{base}_{m}"
                if key in ref:
                    row[f"{g}_{m}"] = ref[key]
        rows[base] = row
    for bundle, b in ev.items():
        m = b["metrics"]
        row = {}
        for g in MODALITIES:
            for k in ("psnr", "ssim"):
                if f"test_{g}_sr_{k}" in m:
                    row[f"{g}_{k}"] = m[f"test_{g}_sr_{k}"]
            for base in ("bicubic", "zerofill"):
                # the handler's paired per-slice gain when it writes one, else the difference of the means
                # (the same number when both are scored on the same slices)
                if f"test_{g}_{base}_gain_db" in m:
                    row[f"{g}_gain_vs_{base}_db"] = m[f"test_{g}_{base}_gain_db"]
                elif f"test_{g}_sr_psnr" in m and f"test_{g}_{base}_psnr" in m:
                    row[f"{g}_gain_vs_{base}_db"] = m[f"test_{g}_sr_psnr"] - m[f"test_{g}_{base}_psnr"]
        rows[bundle] = row
    return rows


def targets(res: dict) -> list[dict[str, Any]]:
    out = []
    rows = res.get("quality", {})
    for (bundle, g), (base, thr) in TARGETS.items():
        gain = rows.get(bundle, {}).get(f"{g}_gain_vs_{base}_db")
        out.append({"target": f"{bundle.upper()} >= {thr:+.1f} dB over {BASELINE_NAMES[base]}, {g}", "value": gain,
                    "reached": None if gain is None else bool(gain >= thr)})
    for bundle, tp in res.get("throughput", {}).items():
        for v, label in (("trainer", "minimal handlers"), ("trainer_full", "full handler list")):
            r = tp.get(f"ratio_{v}_paired_median")
            out.append({"target": f"{bundle.upper()} throughput framework/plain >= {RATIO_TARGET} ({label})",
                        "value": r, "value_per_iteration_median": tp.get(f"ratio_{v}_median"),
                        "value_mean_based": tp.get(f"ratio_{v}_mean"),
                        "value_cpu_time_based": tp.get(f"ratio_{v}_cpu_median"),
                        "reached": None if r is None else bool(r >= RATIO_TARGET)})
    return out


def fmt(x: Any, nd: int = 2, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:+.{nd}f}" if signed else f"{x:.{nd}f}"


def render_md(res: dict, args) -> str:
    q = res.get("quality", {})
    tp = res.get("throughput", {})
    inf = res.get("inference", {})
    tr = res.get("training", {})
    ev = res.get("evaluation", {})
    mach = res.get("machine", {})
    budget = f"{res.get('budget_min_per_bundle', args.budget_min):g} min"
    lines = [
        "# x2 in-plane SR benchmark: medsr-monai bundles on the sample data (CPU)",
        "",
        f"- Date: {res.get('date')}; git commit: {res.get('git', {}).get('commit')}",
        f"- Machine: {mach.get('cpu_model')}; {mach.get('cores_available')} cores available "
        f"(os.cpu_count {mach.get('os_cpu_count')}); torch threads {mach.get('torch_threads')} (default); "
        f"load average at start {mach.get('loadavg_at_start')} (shared machine: timings are noisy, compare ratios "
        "from one run)",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in mach.get("versions", {}).items()),
        (f"- Training budget: **a fixed number of iterations per bundle** ("
         + ", ".join(f"{b} {t['iterations_budget']}" for b, t in tr.items() if t.get("iterations_budget"))
         + "; about what the 8-minute wall-clock budget bought on quiet cores, so the comparison does not depend "
         "on the machine's load), bundle's own train.json otherwise (`max_epochs` x `epoch_length` iterations, the "
         "cosine schedule over those epochs; validation and the best-checkpoint rule every epoch, plus once "
         "before the first step)."
         if any(t.get("iterations_budget") for t in tr.values()) else
         f"- Training budget: **{budget} wall-clock per bundle** (Ignite `TimeLimit` from trainer start, periodic "
         "validation included; one last validation after the limit), bundle's own train.json otherwise "
         "(except `max_epochs` 100000, so the cosine LR schedule is effectively constant, and `epoch_length`)."),
    ]
    for b, t in tr.items():
        bt = dict(t.get("batch", {}))
        measured = measured_patches_per_iteration(res, b)
        if measured and bt.get("patches_per_slice") and measured != bt.get("patches_per_iteration"):
            # an older version of this script assumed batch_size slices per step; trust the measured batches
            bt.update(patches_per_iteration=measured, slices_per_batch=measured // bt["patches_per_slice"])
        lines.append(f"  - {b}: epoch_length {t.get('epoch_length')} iterations ({t.get('epoch_length_from')}); "
                     f"{bt.get('slices_per_batch')} slices x {bt.get('patches_per_slice')} patches = "
                     f"{bt.get('patches_per_iteration')} HR patches {bt.get('hr_patch')}^2 (LR {bt.get('lr_patch')}^2) "
                     f"per iteration; {t.get('iterations')} iterations "
                     f"({fmt((t.get('iterations') or 0) * (bt.get('patches_per_iteration') or 0), 0)} patches), "
                     f"{t.get('epochs_validated')} validations; "
                     f"best checkpoint: epoch {t.get('best_epoch')} by {t.get('checkpoint_metric', 'val_psnr')} "
                     f"{fmt(t.get('best_val', t.get('best_val_psnr')), 3)} dB ("
                     + ", ".join(f"val {g} SR {fmt(t.get(f'best_val_{g}_sr_psnr'), 3)} vs bicubic "
                                 f"{fmt(t.get(f'val_{g}_bicubic_psnr', t.get('val_bicubic_psnr') if g == 'MR' else None), 3)}"
                                 for g in MODALITIES if t.get(f"val_{g}_bicubic_psnr") or g == "MR")
                     + f"); train loss (L1) per epoch {fmt((t.get('loss_epoch_means') or [None])[0], 4)} -> "
                     f"{fmt((t.get('loss_epoch_means') or [None])[-1], 4)}, trend over the 2nd half: "
                     f"{t.get('loss_trend', {}).get('verdict')}")
    n_sl = next(iter(ev.values()), {}).get("slices_per_modality", {})
    sub = next(iter(ev.values()), {}).get("eval_max_slices_per_volume")
    lines += [
        f"- Test data: brain2 (MR, k-space truncation) {n_sl.get('MR', '?')} slices, lung2 (CT, Gaussian anti-alias "
        f"+ decimation) {n_sl.get('CT', '?')} slices{' (SUBSET: ' + str(sub) + ' per volume)' if sub else ''}; "
        "slices with >= 10 % foreground; intensities normalised (CT: HU window [-1000, 1000]; MR: 0.5-99.5 "
        "percentiles of the HR volume); PSNR/SSIM over the whole slice, data_range 1, no border crop, "
        "predictions clipped to [0, 1]; SSIM: MONAI (11x11 Gaussian, sigma 1.5); mean over slices. Baselines on "
        "the same slices and corner grid: cubic ('bicubic') and the matched inverse of each physics (MR: k-space "
        "zero-filling, the 'zero-fill' row and column; CT: cubic itself).",
        "",
        "| method | MR PSNR | MR SSIM | CT PSNR | CT SSIM | gain vs bicubic MR / CT (dB) | gain vs zero-fill MR (dB) "
        "| train img/s framework / plain | inference s/volume brain2 / lung2 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    names = {"bicubic": "bicubic (cubic, corner grid)", "zerofill": "k-space zero-fill", "srcnn": "SRCNN",
             "edsr": "EDSR"}
    bundles = list(dict.fromkeys([*res.get("bundles", []), *args.bundles]))
    for key in ("bicubic", "zerofill", *[b for b in bundles if b in q or b in tp or b in inf]):
        r = q.get(key, {})
        if key in ("bicubic", "zerofill"):
            gain = "-"
            zf = "-"
            speed = "-"
            infs = "-"
        else:
            gain = f"{fmt(r.get('MR_gain_vs_bicubic_db'), 2, True)} / {fmt(r.get('CT_gain_vs_bicubic_db'), 2, True)}"
            zf = fmt(r.get("MR_gain_vs_zerofill_db"), 2, True)
            t = tp.get(key, {}).get("variants", {})
            speed = (f"{fmt(t.get('trainer_full', {}).get('img_s_median'), 1)} / "
                     f"{fmt(t.get('plain', {}).get('img_s_median'), 1)}") if t else "-"
            vols = inf.get(key, {}).get("volumes", {})
            infs = " / ".join(fmt(vols.get(v, {}).get("seconds"), 1) for v in TEST_VOLUMES) if vols else "-"
            if any(vols.get(v, {}).get("subset_slices") for v in TEST_VOLUMES):
                infs += " (subset)"
        lines.append(f"| {names.get(key, key)} | {fmt(r.get('MR_psnr'))} | {fmt(r.get('MR_ssim'), 4)} | "
                     f"{fmt(r.get('CT_psnr'))} | {fmt(r.get('CT_ssim'), 4)} | {gain} | {zf} | {speed} | {infs} |")
    lines += ["", "Train img/s: HR training patches per second, median over iterations, framework = the bundle's "
              "SupervisedTrainer with its full handler list (see throughput below).", ""]
    lines += ["## Targets", ""]
    for t in res.get("targets", []):
        state = "n/a" if t["reached"] is None else ("REACHED" if t["reached"] else "NOT reached")
        extra = (f" (paired rounds; per-iteration median {fmt(t.get('value_per_iteration_median'), 3)}, "
                 f"total/total {fmt(t.get('value_mean_based'), 3)}, per CPU-second "
                 f"{fmt(t.get('value_cpu_time_based'), 3)})") if "value_mean_based" in t else ""
        val = fmt(t["value"], 3, signed="dB" in t["target"])
        lines.append(f"- {t['target']}: {val}{extra} -> **{state}**")
    if tp:
        lines += ["", "## Training throughput (images/s, HR patches; interleaved rounds)", "",
                  "| bundle | plain loop | SupervisedTrainer, no handlers | SupervisedTrainer, full handlers | "
                  "ratio no-handlers/plain: paired rounds (per-iteration median, total/total) | "
                  "ratio full/plain: paired rounds (per-iteration median, total/total) | "
                  "ratios per CPU-second (no-handlers / full) | timed it/variant (rounds x it) |",
                  "|---|---|---|---|---|---|---|---|"]
        for b, r in tp.items():
            v = r["variants"]
            cell = lambda k: f"{fmt(v[k].get('img_s_median'))} (mean {fmt(v[k].get('img_s_mean'))})"  # noqa: E731
            g = lambda k: fmt(r.get(k), 3)  # noqa: E731
            lines.append(f"| {b} | {cell('plain')} | {cell('trainer')} | {cell('trainer_full')} | "
                         f"**{g('ratio_trainer_paired_median')}** ({g('ratio_trainer_median')}, "
                         f"{g('ratio_trainer_mean')}) | **{g('ratio_trainer_full_paired_median')}** "
                         f"({g('ratio_trainer_full_median')}, {g('ratio_trainer_full_mean')}) | "
                         f"{g('ratio_trainer_cpu_median')} / {g('ratio_trainer_full_cpu_median')} | "
                         f"{v['plain']['iterations']} ({r.get('rounds')} x {r.get('iterations_per_block')}) |")
        lines += ["", "Images/s: median of per-iteration images/s (total images / total time in brackets). Paired "
                  "rounds: median over rounds of (framework block img/s) / (plain block img/s) of the same round, "
                  "blocks run back to back so both see about the same machine load (headline ratio). Per "
                  "CPU-second: process CPU time instead of wall time. Each "
                  "iteration timed from the batch request to the end of its last handler (data loading included, "
                  "epoch-level handlers and validation excluded); same loader, network, loss and optimizer built "
                  "from train.json for every variant."]
    if inf:
        lines += ["", "## Inference (inference.json runner, in-process, Python start-up excluded)", "",
                  "| bundle | volume | input shape | output shape | roi_size / sw_batch_size | seconds |",
                  "|---|---|---|---|---|---|"]
        for b, r in inf.items():
            for name, v in r.get("volumes", {}).items():
                sub = f" (central {v['subset_slices']} slices only)" if v.get("subset_slices") else ""
                lines.append(f"| {b} | {name}{sub} | {v['input_shape']} | {v['output_shape']} | "
                             f"{v.get('roi_size')} / {v.get('sw_batch_size')} | {v['seconds']:.1f} |")
    for u in res.get("updates", []):
        lines += ["", f"Updated {u['date']}: stages {u['stages']} for {u['bundles']} re-run (git {u['git'].get('commit')}, "
                  f"load at start {u['machine'].get('loadavg_at_start')})."]
    if res.get("code_changed_during_run"):
        lines += ["", "**Warning:** changed while this benchmark ran (stages may have used different versions): "
                  + ", ".join(res["code_changed_during_run"])]
    if res.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e['stage']} {e['bundle']}: {e['error'].splitlines()[0]}"
                                          for e in res["errors"]]
    return "\n".join(lines) + "\n"


def write_outputs(res: dict, args) -> str:
    import throughput

    for r in res.get("throughput", {}).values():
        throughput.add_paired_ratios(r)
    res["quality"] = quality_rows(res)
    res["targets"] = targets(res)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmark_x2.json").write_text(json.dumps(res, indent=2, default=str))
    md = render_md(res, args)
    (args.out / "benchmark_x2.md").write_text(md)
    return md


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-min", type=float, default=8.0,
                    help="wall-clock training budget per bundle in minutes (<= 15) (default: 8)")
    ap.add_argument("--bundles", nargs="+", default=["srcnn", "edsr"], help="bundles to run (default: srcnn edsr)")
    ap.add_argument("--out", type=Path, default=REPO / "experiments" / "results",
                    help="results folder (default: experiments/results)")
    ap.add_argument("--runs-dir", type=Path, default=REPO / "experiments" / "runs",
                    help="training outputs/checkpoints, one folder per bundle (default: experiments/runs; not in git)")
    ap.add_argument("--stages", nargs="+", choices=STAGES + PSEUDO_STAGES, default=list(STAGES),
                    help="stages to run; a subset updates an existing benchmark_x2.json; 'report' alone only "
                         "re-renders the stored results (default: all four)")
    ap.add_argument("--tracking-uri", default=None,
                    help="MLflow store for the benchmark runs (default: sqlite:///<runs-dir>/mlruns/mlflow.db)")
    ap.add_argument("--iterations", nargs="+", default=[], metavar="BUNDLE=N",
                    help="train for N iterations instead of --budget-min of wall-clock (e.g. srcnn=1029 edsr=247, the "
                         "iterations the 8-minute budget bought on quiet cores): the same compute on a busy machine")
    ap.add_argument("--epoch-length", type=int, default=0,
                    help="iterations per epoch (0: about --epoch-target-s from the measured s/iteration)")
    ap.add_argument("--epoch-target-s", type=float, default=90.0,
                    help="wanted training seconds per epoch, capped at budget/4 (default: 90)")
    ap.add_argument("--patches-per-slice", type=int, default=0, help="override the bundle's patches_per_slice")
    ap.add_argument("--tp-seconds", type=float, default=45.0, help="timed seconds per throughput variant (default: 45)")
    ap.add_argument("--tp-rounds", type=int, default=0,
                    help="interleaved throughput rounds (0: blocks of about --tp-block-s) (default: 0)")
    ap.add_argument("--tp-block-s", type=float, default=8.0, help="seconds per throughput block (default: 8)")
    ap.add_argument("--tp-warmup", type=int, default=0, help="throughput warm-up iterations (0: auto)")
    ap.add_argument("--tp-iters", type=int, default=0, help="timed throughput iterations per variant (0: auto)")
    ap.add_argument("--eval-max-slices", type=int, default=0, help="evaluate at most N slices per test volume (0: all)")
    ap.add_argument("--infer-max-slices", type=int, default=0,
                    help="infer on the central N slices of each test volume only (0: whole volumes)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: --eval-max-slices 3 --infer-max-slices 2 --tp-seconds 4 --tp-rounds 1 "
                         "--tp-warmup 1 (unless given)")
    args = ap.parse_args(argv)
    if args.quick:
        args.eval_max_slices = args.eval_max_slices or 3
        args.infer_max_slices = args.infer_max_slices or 2
        args.tp_seconds = 4.0 if args.tp_seconds == 45.0 else args.tp_seconds
        args.tp_rounds = args.tp_rounds or 1
        args.tp_warmup = args.tp_warmup or 1
    if not 0 < args.budget_min <= 15:
        ap.error("--budget-min must be in (0, 15]")
    args.out = args.out.resolve()
    args.runs_dir = args.runs_dir.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    if args.tracking_uri is None:
        (args.runs_dir / "mlruns").mkdir(parents=True, exist_ok=True)
        args.tracking_uri = f"sqlite:///{(args.runs_dir / 'mlruns' / 'mlflow.db').as_posix()}"
    os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri  # in-process (throughput) and child processes
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")

    res_path = args.out / "benchmark_x2.json"
    if set(args.stages) <= set(PSEUDO_STAGES):  # report only
        if not res_path.is_file():
            print(f"no results to report: {res_path} does not exist", file=sys.stderr)
            return 2
        res = json.loads(res_path.read_text())
        args.bundles = res.get("bundles", args.bundles)
        md = write_outputs(res, args)
        print(md, flush=True)
        return 0
    stages = [s for s in args.stages if s in STAGES]
    partial = set(stages) != set(STAGES)
    now = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    run_info = {"date": now, "git": git_info(), "machine": machine_info(), "code_sha256": code_fingerprint(args.bundles),
                "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    if partial and res_path.is_file():
        res = json.loads(res_path.read_text())
        res.setdefault("updates", []).append({**run_info, "stages": stages, "bundles": args.bundles})
        log(f"updating {res_path} (stages {stages}); date/machine/settings above the table stay those of the "
            "full run, this update is listed under 'updates'")
    else:
        res = dict(run_info)
        res.update({"budget_min_per_bundle": args.budget_min, "bundles": args.bundles})
    res.update({"tracking_uri": args.tracking_uri,
                "targets_definition": {**{f"{b}_{g}_gain_vs_{base}_db": thr for (b, g), (base, thr) in TARGETS.items()},
                                       "throughput_ratio": RATIO_TARGET}})
    for key in ("throughput", "training", "evaluation", "inference"):
        res.setdefault(key, {})
    res["errors"] = []
    res.setdefault("stage_times", {})
    res.setdefault("stage_dates", {})
    log(f"benchmark x2: bundles {args.bundles}, budget {args.budget_min:g} min, stages {args.stages}; "
        f"MLflow {args.tracking_uri}; machine {res['machine']['cores_available']} cores, "
        f"{res['machine']['torch_threads']} torch threads, load {loadavg()}")

    for stage in STAGES:
        if stage not in stages:
            continue
        for bundle in args.bundles:
            t0 = time.perf_counter()
            try:
                if stage == "throughput":
                    stage_throughput(bundle, args, res)
                elif stage == "train":
                    stage_train(bundle, args, res, env, stamp)
                elif stage == "eval":
                    stage_eval(bundle, args, res, env, stamp)
                elif stage == "infer":
                    stage_infer(bundle, args, res)
            except Exception as e:  # noqa: BLE001 - record, go on with the other bundles/stages
                log(f"[{stage} {bundle}] FAILED: {e}")
                traceback.print_exc()
                res["errors"].append({"stage": stage, "bundle": bundle, "error": f"{type(e).__name__}: {e}"})
            res["stage_times"][f"{stage}:{bundle}"] = round(time.perf_counter() - t0, 1)
            res["stage_dates"][f"{stage}:{bundle}"] = dt.datetime.now().astimezone().isoformat(timespec="seconds")
            write_outputs(res, args)

    weights = args.out / "weights"
    for bundle in args.bundles:
        ckpt = args.runs_dir / bundle / "models" / "model.pt"
        if ckpt.is_file() and "train" in stages:
            weights.mkdir(parents=True, exist_ok=True)
            shutil.copy(ckpt, weights / f"{bundle}_x2.pt")
            res.setdefault("weights", {})[bundle] = str((weights / f"{bundle}_x2.pt").relative_to(REPO)
                                                        if (weights / f"{bundle}_x2.pt").is_relative_to(REPO)
                                                        else weights / f"{bundle}_x2.pt")
    end_fp = code_fingerprint(args.bundles)
    changed = sorted(k for k in end_fp if end_fp[k] != run_info["code_sha256"].get(k))
    if partial and "updates" in res:
        res["updates"][-1]["loadavg_at_end"] = loadavg()
        res["updates"][-1]["code_changed_during_run"] = changed
    else:
        res["machine"]["loadavg_at_end"] = loadavg()
        res["code_changed_during_run"] = changed
    if changed:
        log(f"WARNING: these changed while the benchmark ran: {changed}")
    md = write_outputs(res, args)
    print("\n" + md, flush=True)
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
