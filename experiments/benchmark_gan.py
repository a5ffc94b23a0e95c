#!/usr/bin/env python
"""Benchmark of the adversarial bundles (SRGAN x4, CycleGAN low-dose CT) on the sample data, on this CPU.

For each method: ``python -m monai.bundle run`` with the bundle's own ``train.json`` plus a CPU-scale
override file (``experiments/configs/<method>_cpu.json``: fewer iterations, the published losses), then
``train.json + evaluate.json`` on the held-out test patients. Wall times are recorded; the budget is the
fixed iteration count of the override file (on an idle 2-core CPU about 10-20 min per method).

* SRGAN: PSNR/SSIM/GMSD/sharpness of SRGAN (``models/model.pt``), of its own pixel-loss SRResNet phase
  (``models/srresnet.pt``) and of corner-grid cubic; target: SRGAN within 1.5 dB of SRResNet and sharper.
* CycleGAN: PSNR/SSIM of the translated low-dose slice and of the low-dose input against the clean slice
  (test patient lung2, simulated at the bundle's dose fraction); target: at least +2 dB.

Results: ``<out>/benchmark_gan.json`` and ``.md`` (printed), MLflow runs in a separate store under
``experiments/runs/gan/mlruns``.

Example::

    nohup .venv/bin/python experiments/benchmark_gan.py > experiments/results/benchmark_gan.log 2>&1 &
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

METHODS = ("srgan", "cyclegan")
#: a method is ``bundle`` or ``bundle:variant``; its override file is ``configs/<bundle>_cpu[_<variant>].json``


def bundle_cmd(method: str, configs: list[str], overrides: dict[str, str]) -> list[str]:
    files = [str(REPO / "bundles" / method / "configs" / c) for c in configs]
    cfg = files[0] if len(files) == 1 else "[" + ",".join(f"'{f}'" for f in files) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", cfg, "--bundle_root",
           str(REPO / "bundles" / method)]
    for k, v in overrides.items():
        cmd += [f"--{k}", v]
    return cmd


def bench(spec: str, args, env: dict[str, str]) -> dict[str, Any]:
    method, _, variant = spec.partition(":")
    run_dir = args.runs_dir / spec.replace(":", "_")
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    override = REPO / "experiments" / "configs" / f"{method}_cpu{'_' + variant if variant else ''}.json"
    paths = {"output_dir": expr_path(run_dir / "out"), "ckpt_dir": expr_path(run_dir / "models")}
    settings = json.loads(override.read_text())
    if method == "srgan" and args.srgan_pretrained:
        # adversarial phase only, from an SRResNet phase trained before (same override file, e.g. an interrupted run)
        adv_epochs = settings["max_epochs"] - settings["pretrain_epochs"]
        paths.update(pretrained_generator=expr_path(args.srgan_pretrained), pretrain_epochs="0",
                     max_epochs=str(adv_epochs))
    log(f"{method}: training with {override.relative_to(REPO)}")
    train_s = run_logged(bundle_cmd(method, ["train.json", str(override)], paths), run_dir / "train.log", env)
    log(f"{method}: trained in {train_s / 60:.1f} min; evaluating on the test patients")
    eval_s = run_logged(bundle_cmd(method, ["train.json", str(override), "evaluate.json"], paths),
                        run_dir / "eval.log", env)
    metrics = json.loads((run_dir / "out" / "evaluation" / "metrics.json").read_text())
    weights = args.out / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    for f in (run_dir / "models").glob("*.pt"):
        shutil.copy2(f, weights / f"{run_dir.name}_{f.name}")
    grids = sorted((run_dir / "out" / "evaluation" / "grids").glob("grid_latest.png"))
    for g in grids:
        shutil.copy2(g, args.out / f"{run_dir.name}_test_grid.png")
    cycle = run_dir / "out" / "grids" / "cycle_latest.png"
    if cycle.exists():
        shutil.copy2(cycle, args.out / f"{run_dir.name}_train_cycles.png")
    return {"train_s": train_s, "eval_s": eval_s, "override": settings, "metrics": metrics,
            "extra_overrides": {k: v for k, v in paths.items() if k not in ("output_dir", "ckpt_dir")}}


def fmt(x: Any, nd: int = 2, signed: bool = False) -> str:
    return "-" if x is None else (f"{x:+.{nd}f}" if signed else f"{x:.{nd}f}")


def _section(title: str, run: dict[str, Any], extra: str = "") -> list[str]:
    """Heading, settings and timings of one benchmarked run."""
    settings = ", ".join(f"{k}={v}" for k, v in run["override"].items() if not k.startswith("_"))
    return [f"## {title}", "", f"Settings: {settings}{extra}.", "",
            f"Training {run['train_s'] / 60:.1f} min, evaluation {run['eval_s'] / 60:.1f} min.", ""]


def render(res: dict[str, Any]) -> str:
    lines = [f"# Adversarial bundles on the sample data ({res['created']}, {res['machine']})", ""]
    for key in sorted(k for k in res if k.startswith("srgan")):
        sg = res[key]
        m = sg["metrics"]
        lines += _section(f"SRGAN x4, `{key}` (test patients brain2 MR, lung2 CT)", sg,
                          f"; extra: {sg.get('extra_overrides', {})}")
        lines += ["| method | modality | PSNR dB | SSIM | GMSD (lower better) | sharpness (1 = HR) |",
                  "|---|---|---|---|---|---|"]
        for mod in ("MR", "CT"):
            for name, col in (("cubic", "bicubic"), ("k-space zero-fill", "zerofill"), ("SRResNet", "srresnet"),
                              ("SRGAN", "sr")):
                if f"test_{mod}_{col}_psnr" in m:
                    lines.append(f"| {name} | {mod} | {fmt(m[f'test_{mod}_{col}_psnr'])} | "
                                 f"{fmt(m[f'test_{mod}_{col}_ssim'], 4)} | {fmt(m.get(f'test_{mod}_{col}_gmsd'), 4)} | "
                                 f"{fmt(m.get(f'test_{mod}_{col}_sharpness'), 3)} |")
        gap = m["test_sr_psnr"] - m["test_srresnet_psnr"]
        sharper = m["test_sr_sharpness"] > m["test_srresnet_sharpness"]
        lines += ["", f"Target: SRGAN within 1.5 dB of SRResNet: {gap:+.2f} dB "
                  f"({'met' if gap >= -1.5 else 'NOT met'}); sharper: sharpness {m['test_sr_sharpness']:.3f} vs "
                  f"{m['test_srresnet_sharpness']:.3f}, GMSD {m['test_sr_gmsd']:.4f} vs {m['test_srresnet_gmsd']:.4f} "
                  f"({'met' if sharper else 'NOT met'}).", ""]
    for key in sorted(k for k in res if k.startswith("cyclegan")):
        cg = res[key]
        m = cg["metrics"]
        lines += _section(f"CycleGAN low-dose -> normal-dose CT, `{key}` (test patient lung2, simulated 25 % dose)", cg)
        lines += ["| image vs clean slice | PSNR dB | SSIM | GMSD | sharpness |", "|---|---|---|---|---|"]
        for name, col in (("low-dose input", "lowdose"), ("CycleGAN output", "sr")):
            lines.append(f"| {name} | {fmt(m[f'test_{col}_psnr'])} | {fmt(m[f'test_{col}_ssim'], 4)} | "
                         f"{fmt(m.get(f'test_{col}_gmsd'), 4)} | {fmt(m.get(f'test_{col}_sharpness'), 3)} |")
        gain = m["test_lowdose_gain_db"]
        lines += ["", f"Target: >= +2 dB over the low-dose input: {gain:+.2f} dB ({'met' if gain >= 2 else 'NOT met'}).",
                  ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS),
                    help="bundles to run: srgan, cyclegan, or bundle:variant for configs/<bundle>_cpu_<variant>.json")
    ap.add_argument("--out", type=Path, default=REPO / "experiments" / "results")
    ap.add_argument("--runs-dir", type=Path, default=REPO / "experiments" / "runs" / "gan")
    ap.add_argument("--srgan-pretrained", type=Path, default=None,
                    help="SRResNet weights from an earlier SRResNet phase: train only the adversarial phase")
    ap.add_argument("--tracking-uri", default=None, help="MLflow store (default: <runs-dir>/mlruns/mlflow.db)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    uri = args.tracking_uri or f"sqlite:///{(args.runs_dir / 'mlruns').resolve()}/mlflow.db"
    (args.runs_dir / "mlruns").mkdir(exist_ok=True)
    env["MLFLOW_TRACKING_URI"] = uri
    result_path = args.out / "benchmark_gan.json"
    res = json.loads(result_path.read_text()) if result_path.exists() else {}
    res.update(created=dt.datetime.now().isoformat(timespec="seconds"),
               machine=f"{os.cpu_count()} CPU cores, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}",
               git=subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                  text=True).stdout.strip())
    for method in args.methods:
        res[method] = bench(method, args, env)
        result_path.write_text(json.dumps(res, indent=2))
    md = render(res)
    (args.out / "benchmark_gan.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
