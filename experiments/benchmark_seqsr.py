#!/usr/bin/env python
"""Benchmark of the through-plane bundle ``seqsr_lstm`` (bidirectional ConvLSTM) on the sample data, on this CPU.

For each factor (x2 and x4 by default): ``python -m monai.bundle run`` with the bundle's own ``train.json``
(training volume: MNI152 2009a, 1 mm, windows along all three axes) for a fixed number of optimiser steps
(the CPU budget: ``--epochs`` x ``--windows-per-epoch`` / batch 8; wall time is recorded), validated once, at the
end, so that no checkpoint is selected on the held-out volume; then ``train.json + evaluate.json`` on the whole
held-out pydeface mean head (176x256x256, ~1 mm): thick slices simulated along axis 2 (box profile), linear and
cubic interpolation on the centre grid, cubic + consistency and the network, PSNR/SSIM on native and reformatted
slices.

Results: ``<out>/seqsr_lstm.json`` and ``.md`` (printed); weights ``<out>/weights/seqsr_lstm_x<f>.pt``
(x2 also copied to ``bundles/seqsr_lstm/models/model.pt`` with ``--install``); MLflow runs in a separate store
under ``experiments/runs/seqsr/mlruns``.

Example::

    OMP_NUM_THREADS=1 nohup .venv/bin/python experiments/benchmark_seqsr.py --scales 2 4 --install \\
        > experiments/results/seqsr_lstm.log 2>&1 &

The model is the bundle's ``PhysicsSR``: cubic along the slice axis plus the slice-thickness consistency step
(box profile) is its starting point and the matched baseline every table reports ("cubic + consistency");
``--no-dc-train`` trains without the consistency step and ``--dc-eval`` then adds a row for those weights evaluated
with it.
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

from bench_common import REPO, expr_path, log, run_logged  # experiments/ is on sys.path when run as a script

BUNDLE = "seqsr_lstm"
VIEWS = ("native", "reformat_a", "reformat_b")
METHODS = (("linear", "linear (centre grid)"), ("cubic", "cubic (centre grid)"),
           ("cubic_dc", "cubic + consistency (the matched baseline)"), ("sr", "BiConvLSTM (PhysicsSR)"))


def bundle_cmd(configs: list[str], overrides: dict) -> list[str]:
    files = [str(REPO / "bundles" / BUNDLE / "configs" / f"{c}.json") for c in configs]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", repr(files) if len(files) > 1 else files[0],
           "--bundle_root", str(REPO / "bundles" / BUNDLE)]
    for k, v in overrides.items():
        cmd += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
    return cmd


def bench_scale(f: int, args, env: dict[str, str]) -> dict:
    run_dir = args.runs_dir / f"x{f}"
    if run_dir.exists() and not args.eval_only:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    common = {"output_dir": expr_path(run_dir / "out"), "ckpt_dir": expr_path(run_dir / "models"), "scale": f,
              "profile": args.profile, "data_consistency": args.dc_train}
    train = {**common, "max_epochs": args.epochs, "val_interval": args.epochs, "windows_per_epoch": args.windows_per_epoch,
             "resume": False, "run_name": f"bench-x{f}-{dt.datetime.now():%Y%m%d-%H%M%S}",
             # the validation volume is the held-out test head: validate once, at the end, and select nothing
             "validate_at_start": False}
    if args.eval_only and (run_dir / "models" / "model.pt").is_file():
        t_train = json.loads((run_dir / "train_wall_s.json").read_text())["train_wall_s"]
    else:
        log(f"[x{f}] training: {args.epochs} epochs x {args.windows_per_epoch} windows (batch 8)")
        t_train = run_logged(bundle_cmd(["train"], train), run_dir / "train.log", env)
        (run_dir / "train_wall_s.json").write_text(json.dumps({"train_wall_s": t_train}))
    log(f"[x{f}] trained in {t_train / 60:.1f} min; evaluating on the whole held-out volume")
    t_eval = run_logged(bundle_cmd(["train", "evaluate"], common), run_dir / "eval.log", env)
    metrics = json.loads((run_dir / "out" / "evaluation" / "metrics.json").read_text())
    extra = {}
    if args.dc_eval and not args.dc_train:  # the same weights, evaluated with the data-consistency projection
        log(f"[x{f}] evaluating the same weights with data consistency")
        dc = {**common, "data_consistency": True, "output_dir": expr_path(run_dir / "out_dc")}
        run_logged(bundle_cmd(["train", "evaluate"], {**dc, "ckpt_path": expr_path(run_dir / "models" / "model.pt")}),
                   run_dir / "eval_dc.log", env)
        extra["metrics_dc"] = json.loads((run_dir / "out_dc" / "evaluation" / "metrics.json").read_text())
    weights = args.out / "weights" / f"{BUNDLE}_x{f}.pt"
    weights.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(run_dir / "models" / "model.pt", weights)
    steps = args.epochs * -(-args.windows_per_epoch // 8)
    log(f"[x{f}] evaluated in {t_eval / 60:.1f} min: sr {metrics['test_sr_psnr']:.2f} dB, cubic "
        f"{metrics['test_cubic_psnr']:.2f} dB, linear {metrics['test_linear_psnr']:.2f} dB (mean of views)")
    return {"scale": f, "train_wall_s": round(t_train, 1), "eval_wall_s": round(t_eval, 1), "steps": steps,
            "epochs": args.epochs, "windows_per_epoch": args.windows_per_epoch, "weights": os.path.relpath(weights, REPO),
            "data_consistency": args.dc_train, "metrics": metrics, **extra}


def _row(scale: int, name: str, m: dict, key: str) -> str:
    cells = []
    for v in VIEWS:
        cells += [f"{m[f'test_{v}_{key}_psnr']:.2f}", f"{m[f'test_{v}_{key}_ssim']:.4f}"]
    gain = (f"{m['test_cubic_dc_gain_db']:+.2f} / {m['test_cubic_gain_db']:+.2f}"
            if key == "sr" and "test_cubic_dc_gain_db" in m else
            f"- / {m['test_cubic_gain_db']:+.2f}" if key == "sr" else "-")
    return f"| x{scale} | {name} | " + " | ".join(cells) + f" | {gain} |"


def render(res: dict) -> str:
    lines = [
        "# seqsr_lstm: through-plane super-resolution (bidirectional ConvLSTM)",
        "",
        f"- Date: {res['date']}; git commit: {res['git_commit']}; machine: {res['cpus']} CPU cores, "
        f"OMP_NUM_THREADS={res['threads']} (shared machine: timings are noisy)",
        f"- Training: MNI152 2009a (1 mm, 197x233x189), windows of 8 thick slices x 48x48 along all three axes, "
        f"batch 8, Adam 5e-4 cosine, MSE; budget: a fixed number of steps per factor (wall time below); "
        f"validated once at the end (no checkpoint selection on the held-out volume).",
        f"- Test: the whole pydeface mean head (176x256x256, ~1 mm, never trained on), thick slices simulated along "
        f"axis 2 ({res['profile']} profile over f thin slices, centre grid), trailing slices cropped to a multiple of f.",
        "- Metrics: MR 0.5-99.5 percentiles of the HR volume -> [0, 1], clipped; PSNR (data_range 1) and SSIM (MONAI, "
        "11x11 Gaussian) per 2D slice with >= 10 % foreground (> 0.05), whole slice, no border crop, averaged per view. "
        "native = slices across the slice axis; reformat_a / reformat_b = the two planes containing it.",
        "",
        "| factor | method | native PSNR | native SSIM | reformat_a PSNR | reformat_a SSIM | reformat_b PSNR | "
        "reformat_b SSIM | gain vs cubic + consistency / vs cubic (mean of views, dB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["results"]:
        m = r["metrics"]
        for key, name in METHODS:
            if f"test_native_{key}_psnr" not in m:  # results of an older run without that baseline
                continue
            name = name + " + DC (trained with it)" if key == "sr" and r.get("data_consistency") else name
            lines.append(_row(r["scale"], name, m, key))
        if "metrics_dc" in r:
            lines.append(_row(r["scale"], "BiConvLSTM + DC (at evaluation only)", r["metrics_dc"], "sr"))
        if "metrics_dc_trained" in r:  # merged from a separate --dc-train run (same budget, same seed)
            lines.append(_row(r["scale"], "BiConvLSTM trained with DC (separate run)", r["metrics_dc_trained"], "sr"))
        if "metrics_cubic_dc" in r:
            lines.append(_row(r["scale"], "cubic + DC (zero residual)", r["metrics_cubic_dc"], "sr"))
    lines += ["", "| factor | steps | train wall (min) | eval wall (min) | weights |", "|---|---|---|---|---|"]
    for r in res["results"]:
        lines.append(f"| x{r['scale']} | {r['steps']} | {r['train_wall_s'] / 60:.1f} | {r['eval_wall_s'] / 60:.1f} | "
                     f"`{r['weights']}` |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scales", type=int, nargs="+", default=[2, 4], help="through-plane factors (2, 3, 4)")
    p.add_argument("--epochs", type=int, default=8, help="training epochs per factor (default 8)")
    p.add_argument("--windows-per-epoch", type=int, default=320,
                   help="training windows per epoch (batch 8: 40 steps; default budget 320 steps per factor)")
    p.add_argument("--profile", default="box", choices=("box", "gaussian"), help="slice profile")
    p.add_argument("--out", type=Path, default=REPO / "experiments" / "results", help="where results go")
    p.add_argument("--runs-dir", type=Path, default=REPO / "experiments" / "runs" / "seqsr",
                   help="run folders and the MLflow store")
    p.add_argument("--eval-only", action="store_true",
                   help="re-evaluate the runs already trained in --runs-dir (train those that are missing)")
    p.add_argument("--dc-train", action=argparse.BooleanOptionalAction, default=True,
                   help="train (and evaluate) with the physics' consistency step (default, as the bundle does; box "
                        "profile); --no-dc-train trains without it")
    p.add_argument("--dc-eval", action="store_true",
                   help="with --no-dc-train: also evaluate those weights with the consistency step (extra row)")
    p.add_argument("--install", action="store_true", help="copy the x2 weights to bundles/seqsr_lstm/models/model.pt")
    args = p.parse_args(argv)
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{(args.runs_dir / 'mlruns').resolve()}/mlflow.db"
    (args.runs_dir / "mlruns").mkdir(exist_ok=True)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    res = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "git_commit": commit,
           "cpus": os.cpu_count(), "threads": env["OMP_NUM_THREADS"], "profile": args.profile, "results": []}
    old = json.loads((args.out / f"{BUNDLE}.json").read_text()) if args.eval_only and (args.out / f"{BUNDLE}.json").is_file() else {}
    for f in args.scales:
        res["results"] = [r for r in res["results"] if r["scale"] != f]
        res["results"].append(bench_scale(f, args, env))
        kept = [r for r in old.get("results", []) if r["scale"] not in {x["scale"] for x in res["results"]}]
        res["results"] = sorted(res["results"] + kept, key=lambda r: r["scale"])
        (args.out / f"{BUNDLE}.json").write_text(json.dumps(res, indent=2))  # partial results survive a later failure
        (args.out / f"{BUNDLE}.md").write_text(render(res))
        if args.install and f == 2:
            x2 = next(r for r in res["results"] if r["scale"] == 2)
            shutil.copy2(REPO / x2["weights"], REPO / "bundles" / BUNDLE / "models" / "model.pt")
    print(render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
