#!/usr/bin/env python
"""Example Optuna study: tune SRCNN x2 on the sample scans with ``medsr tune``, then train the bundle's default
config and the tuned one under the same final budget and compare them on the held-out patients.

Stages (all by default; ``--stages`` picks a subset):

1. ``study``  ``medsr tune --bundle bundles/srcnn --trials N`` with the per-bundle space
              ``experiments/spaces/srcnn.json`` (batch {16,32,64,128}, Adam/RMSprop/SGD, lr 1e-5..1e-2 log,
              schedule none/cosine/step/exponential; budget 3 epochs x 2 patches per slice; median pruner).
              Trial 0 is the bundle's own settings. Writes the study's best override
              ``experiments/best/srcnn/<study>.json`` (``experiments/best/srcnn/example-srcnn.json``; ``--best``
              for another file).
2. ``final``  ``python -m monai.bundle run`` of ``train.json`` (default) and ``['train.json', best]`` (tuned),
              both with ``max_epochs=--final-epochs`` and seed 0, in parallel (one thread each), then
              ``evaluate.json`` of each on the held-out test patients (brain2 MR, lung2 CT).
3. ``report`` ``experiments/results/tune_srcnn.md`` / ``.json``: the study's trials and the default-vs-tuned table.

Everything but the best-override file goes to ``experiments/runs/tune_example/`` (its own Optuna sqlite and MLflow
store, outside git). Example::

    nohup .venv/bin/python experiments/tune_example.py > experiments/results/tune_srcnn.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import REPO, expr_path, log, run_logged  # noqa: E402

PY = sys.executable
STAGES = ("study", "final", "report")


def study(args, runs: Path, env: dict[str, str]) -> None:
    cmd = [PY, "-m", "medsr_monai", "tune", "--bundle", "bundles/srcnn", "--trials", str(args.trials),
           "--study", args.study, "--storage", f"sqlite:///{(runs / 'optuna.db').as_posix()}",
           "--tracking-uri", env["MLFLOW_TRACKING_URI"], "--output", str(runs / "tune"),
           "--best-out", str(args.best)] + (["--overwrite-best"] if args.overwrite_best else [])
    log(f"study: {' '.join(cmd[3:])}")
    t = run_logged(cmd, runs / "study.log", env)
    log(f"study finished in {t / 60:.1f} min; log {runs / 'study.log'}")


def _train_eval(name: str, configs: list[str], args, runs: Path, env: dict[str, str]) -> subprocess.Popen:
    out = runs / "final" / name
    out.mkdir(parents=True, exist_ok=True)
    common = ["--bundle_root", "bundles/srcnn", "--output_dir", expr_path(out), "--ckpt_dir", expr_path(out / "models")]
    cfg = "[" + ",".join(f"'{c}'" for c in configs) + "]"
    train = [PY, "-m", "monai.bundle", "run", "--config_file", cfg, *common, "--max_epochs", str(args.final_epochs),
             "--resume", "false"]
    ev_cfg = "[" + ",".join(f"'{c}'" for c in configs + ["bundles/srcnn/configs/evaluate.json"]) + "]"
    evaluate = [PY, "-m", "monai.bundle", "run", "--config_file", ev_cfg, *common]
    script = (f"import subprocess, sys, time\nt=time.monotonic()\n"
              f"rc=subprocess.run({train!r}).returncode\nopen({str(out / 'train_seconds')!r},'w').write(str(time.monotonic()-t))\n"
              f"sys.exit(rc or subprocess.run({evaluate!r}).returncode)\n")
    return subprocess.Popen([PY, "-c", script], cwd=REPO, env=env, stdout=open(out / "run.log", "w"),
                            stderr=subprocess.STDOUT)


def final(args, runs: Path, env: dict[str, str]) -> None:
    if not args.best.is_file():
        raise FileNotFoundError(f"{args.best} does not exist: run the study stage first")
    train = "bundles/srcnn/configs/train.json"
    log(f"final: default and tuned configs, {args.final_epochs} epochs each, in parallel")
    procs = {"default": _train_eval("default", [train], args, runs, env),
             "tuned": _train_eval("tuned", [train, str(args.best)], args, runs, env)}
    for name, p in procs.items():
        if p.wait():
            raise RuntimeError(f"final {name} failed; see {runs / 'final' / name / 'run.log'}")
    log("final runs finished")


def _row(name: str, runs: Path, params: dict) -> dict:
    out = runs / "final" / name
    m = json.loads((out / "evaluation" / "metrics.json").read_text())
    row = {"config": name, **params, "train_min": float((out / "train_seconds").read_text()) / 60}
    for mod in ("MR", "CT"):
        row[f"{mod}_psnr"] = m.get(f"test_{mod}_sr_psnr")
        row[f"{mod}_ssim"] = m.get(f"test_{mod}_sr_ssim")
        row[f"{mod}_bicubic_psnr"] = m.get(f"test_{mod}_bicubic_psnr")
    return row


def report(args, runs: Path) -> None:
    import optuna

    best = json.loads(args.best.read_text())
    tuned_params = {k: v for k, v in best.items() if k != "tuned_by"}
    defaults = json.loads((REPO / "bundles/srcnn/configs/train.json").read_text())
    default_params = {k: defaults[k] for k in tuned_params}
    st = optuna.load_study(study_name=args.study, storage=f"sqlite:///{(runs / 'optuna.db').as_posix()}")
    from medsr_monai.tuning.study import trials_table

    rows = [_row("default", runs, default_params), _row("tuned", runs, tuned_params)]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{(runs / 'mlruns' / 'mlflow.db').as_posix()}")
    val_bicubic = client.get_run(best["tuned_by"]["mlflow_run_id"]).data.metrics.get("val_bicubic_psnr", float("nan"))
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in st.trials if t.datetime_complete]
    states = {s: sum(t.state.name == s for t in st.trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
    keys = list(tuned_params)
    head = ["config", *keys, "MR PSNR", "MR SSIM", "MR gain", "CT PSNR", "CT SSIM", "CT gain", "train min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["config"], *[f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys]]
        for mod in ("MR", "CT"):
            cells += [f"{r[f'{mod}_psnr']:.2f}", f"{r[f'{mod}_ssim']:.4f}",
                      f"{r[f'{mod}_psnr'] - r[f'{mod}_bicubic_psnr']:+.2f}"]
        cells.append(f"{r['train_min']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    bic = rows[0]
    lines.append(f"| bicubic | {' | '.join('-' for _ in keys)} | {bic['MR_bicubic_psnr']:.2f} | - | - | "
                 f"{bic['CT_bicubic_psnr']:.2f} | - | - | - |")
    text = "\n".join([
        f"# Example study: SRCNN x2, {len(st.trials)} trials ({states['COMPLETE']} complete, {states['PRUNED']} pruned, "
        f"{states['FAIL']} failed)", "",
        f"Study `{args.study}`: space `experiments/spaces/srcnn.json`, objective val_psnr (validation: pydeface MR + "
        f"CQ500/pancreas CT), budget 3 epochs x 2 patches/slice per trial, median pruner. Study wall time "
        f"{sum(durations) / 60:.1f} min of trials on {os.cpu_count()} CPU cores (OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', '?')}). Best trial {best['tuned_by']['trial']}, val_psnr "
        f"{best['tuned_by']['value']:.3f} dB; bicubic on the same validation slices {val_bicubic:.3f} dB.", "",
        f"## Held-out test patients (brain2 MR, lung2 CT), both configs trained {args.final_epochs} epochs, seed 0", "",
        *lines, "", "## Trials", "", trials_table(st), ""])
    out = REPO / "experiments" / "results"
    (out / "tune_srcnn.md").write_text(text)
    (out / "tune_srcnn.json").write_text(json.dumps({"rows": rows, "states": states, "best": best}, indent=2))
    print(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--study", default="example-srcnn")
    ap.add_argument("--final-epochs", type=int, default=10)
    ap.add_argument("--best", type=Path, default=None,
                    help="best-override file (default: experiments/best/srcnn/<study>.json, as medsr tune writes it)")
    ap.add_argument("--runs", type=Path, default=REPO / "experiments" / "runs" / "tune_example")
    ap.add_argument("--overwrite-best", action="store_true",
                    help="replace a best file written by another study (e.g. the committed one, from another checkout)")
    args = ap.parse_args()
    if args.best is None:
        from medsr_monai.tuning.study import default_best_file

        args.best = default_best_file(REPO / "experiments" / "best", REPO / "bundles" / "srcnn", args.study)
    runs = args.runs.resolve()
    (runs / "mlruns").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{(runs / 'mlruns' / 'mlflow.db').as_posix()}",
               PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.monotonic()
    if "study" in args.stages:
        study(args, runs, env)
    if "final" in args.stages:
        final(args, runs, env)
    if "report" in args.stages:
        report(args, runs)
    log(f"done in {(time.monotonic() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
