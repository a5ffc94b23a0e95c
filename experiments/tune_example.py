#!/usr/bin/env python
"""Example Optuna study: tune SRCNN x2 on the sample scans with ``medsr tune``, check on the held-out patients
whether the validation objective ranks the trials the way the test patients do, and (when the study found a config
other than the bundle's defaults) train the default and the tuned config under the same budget and compare them.

Stages (all by default; ``--stages`` picks a subset):

1. ``study``  ``medsr tune --bundle bundles/srcnn --trials N`` with the per-bundle space
              ``experiments/spaces/srcnn.json`` (batch {16,32,64,128}, Adam/RMSprop/SGD, lr 1e-5..1e-2 log,
              schedule none/cosine/step/exponential; budget 3 epochs x 2 patches from <= 24 slices per training
              volume; median pruner; objective val_psnr on the validation patients of the sample split).
              Trial 0 is the bundle's own settings. Writes the study's best override
              ``experiments/best/srcnn/<study>.json`` (``experiments/best/srcnn/example-srcnn.json``; ``--best``
              for another file).
2. ``heldout`` ``evaluate.json`` of every complete trial's best checkpoint on the held-out test patients
              (``--heldout-slices`` per volume, two at a time, one thread each): does a better validation score
              mean a better test score?
3. ``final``  only when the best trial is not the bundle's defaults: ``python -m monai.bundle run`` of
              ``train.json`` (default) and ``['train.json', best]`` (tuned), from scratch, both with
              ``max_train_seconds=--final-seconds`` (the same wall budget, one thread each, in parallel) and seed
              0, then ``evaluate.json`` of each on the held-out test patients.
4. ``report`` ``experiments/results/tune_srcnn.md`` / ``.json``: the study's trials, the held-out score of each
              complete trial and the rank correlation of validation and test, and the default-vs-tuned table per
              held-out subject against the matched baseline (k-space zero-fill for MR, cubic for CT) when ``final``
              ran.

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
STAGES = ("study", "heldout", "final", "report")


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
    train = [PY, "-m", "monai.bundle", "run", "--config_file", cfg, *common, "--max_epochs", "1000",
             "--max_train_seconds", str(args.final_seconds), "--resume", "false"]
    ev_cfg = "[" + ",".join(f"'{c}'" for c in configs + ["bundles/srcnn/configs/evaluate.json"]) + "]"
    evaluate = [PY, "-m", "monai.bundle", "run", "--config_file", ev_cfg, *common]
    script = (f"import subprocess, sys, time\nt=time.monotonic()\n"
              f"rc=subprocess.run({train!r}).returncode\nopen({str(out / 'train_seconds')!r},'w').write(str(time.monotonic()-t))\n"
              f"sys.exit(rc or subprocess.run({evaluate!r}).returncode)\n")
    return subprocess.Popen([PY, "-c", script], cwd=REPO, env=env, stdout=open(out / "run.log", "w"),
                            stderr=subprocess.STDOUT)


def _tuned_and_default(args) -> tuple[dict, dict]:
    best = json.loads(args.best.read_text())
    tuned = {k: v for k, v in best.items() if k != "tuned_by"}
    defaults = json.loads((REPO / "bundles/srcnn/configs/train.json").read_text())
    return tuned, {k: defaults[k] for k in tuned}


def _complete_trials(args, runs: Path) -> list:
    import optuna

    st = optuna.load_study(study_name=args.study, storage=f"sqlite:///{(runs / 'optuna.db').as_posix()}")
    return [t for t in st.trials if t.state.name == "COMPLETE"]


def heldout(args, runs: Path, env: dict[str, str]) -> None:
    """Every complete trial's best checkpoint (by validation, within its budget) on the held-out test patients."""
    from concurrent.futures import ThreadPoolExecutor

    trials = _complete_trials(args, runs)
    log(f"heldout: {len(trials)} complete trials on the test patients, {args.heldout_slices} slices per volume")

    def evaluate(number: int) -> int:
        folder = runs / "tune" / args.study / f"trial_{number:04d}"
        (folder / "heldout").mkdir(exist_ok=True)
        cmd = [PY, "-m", "monai.bundle", "run", "--config_file",
               "['bundles/srcnn/configs/train.json','bundles/srcnn/configs/evaluate.json']",
               "--bundle_root", "bundles/srcnn", "--ckpt_path", expr_path(folder / "models" / "model.pt"),
               "--output_dir", expr_path(folder / "heldout"), "--eval_slices_per_volume", str(args.heldout_slices)]
        with open(folder / "heldout" / "run.log", "w") as out:
            return subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT).returncode

    with ThreadPoolExecutor(2) as pool:  # two evaluations at a time, one thread each
        failed = [t.number for t, rc in zip(trials, pool.map(evaluate, [t.number for t in trials])) if rc]
    if failed:
        raise RuntimeError(f"held-out evaluation failed for trials {failed}; "
                           f"see tune/{args.study}/trial_*/heldout/run.log")
    log("heldout evaluations finished")


def final(args, runs: Path, env: dict[str, str]) -> None:
    if not args.best.is_file():
        raise FileNotFoundError(f"{args.best} does not exist: run the study stage first")
    tuned, default = _tuned_and_default(args)
    if tuned == default:
        log("final: the study's best trial is the bundle's defaults; nothing to compare (skipped)")
        return
    train = "bundles/srcnn/configs/train.json"
    log(f"final: default and tuned configs, {args.final_seconds} s of training each, in parallel")
    procs = {"default": _train_eval("default", [train], args, runs, env),
             "tuned": _train_eval("tuned", [train, str(args.best)], args, runs, env)}
    for name, p in procs.items():
        if p.wait():
            raise RuntimeError(f"final {name} failed; see {runs / 'final' / name / 'run.log'}")
    log("final runs finished")


def _row(name: str, runs: Path, params: dict) -> dict:
    """One final run on the held-out test patients: per subject and the mean over subjects, SR against the matched
    baseline (``baseline`` in the evaluation's per-slice table: k-space zero-fill for MR, cubic for CT)."""
    from medsr_monai.demo import subject_gains

    out = runs / "final" / name
    return {"config": name, **params, "train_min": float((out / "train_seconds").read_text()) / 60,
            "subjects": subject_gains(out / "evaluation" / "slices.csv")}


def _spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (no ties expected: continuous scores)."""
    import numpy as np

    ra, rb = (np.argsort(np.argsort(np.asarray(x))) for x in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def report(args, runs: Path) -> None:
    import optuna

    from medsr_monai.demo import subject_gains
    from medsr_monai.tuning.study import trials_table

    best = json.loads(args.best.read_text())
    tuned_params, default_params = _tuned_and_default(args)
    st = optuna.load_study(study_name=args.study, storage=f"sqlite:///{(runs / 'optuna.db').as_posix()}")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{(runs / 'mlruns' / 'mlflow.db').as_posix()}")
    val = client.get_run(best["tuned_by"]["mlflow_run_id"]).data.metrics
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in st.trials if t.datetime_complete]
    states = {s: sum(t.state.name == s for t in st.trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
    keys = list(tuned_params)

    # held-out score of every complete trial
    held = []
    for t in _complete_trials(args, runs):
        csv_path = runs / "tune" / args.study / f"trial_{t.number:04d}" / "heldout" / "evaluation" / "slices.csv"
        if csv_path.is_file():
            held.append({"trial": t.number, "val_psnr": t.value, **t.params, "subjects": subject_gains(csv_path)})
    held.sort(key=lambda r: -r["val_psnr"])
    held_lines = []
    if held:
        subjects = [s for s in held[0]["subjects"] if s != "mean"] + ["mean"]
        head = ["trial", "val_psnr", *keys, *[f"{s} gain" for s in subjects]]
        held_lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in held:
            cells = [str(r["trial"]) + (" (defaults)" if r["trial"] == 0 else ""), f"{r['val_psnr']:.3f}",
                     *[f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys],
                     *[f"{r['subjects'][s]['gain_db']:+.2f}" for s in subjects]]
            held_lines.append("| " + " | ".join(cells) + " |")
        rho = _spearman([r["val_psnr"] for r in held], [r["subjects"]["mean"]["gain_db"] for r in held])
        top = held[0]
        best_test = max(held, key=lambda r: r["subjects"]["mean"]["gain_db"])
        held_lines += ["", f"Spearman rank correlation of val_psnr and the test mean gain over the {len(held)} "
                       f"complete trials: {rho:+.2f}. The trial validation ranks first (trial {top['trial']}) is "
                       + ("also the best on the test patients." if best_test is top else
                          f"{best_test['subjects']['mean']['gain_db'] - top['subjects']['mean']['gain_db']:.2f} dB "
                          f"behind the test's best (trial {best_test['trial']}).")]

    final_lines = []
    if (runs / "final" / "default" / "evaluation" / "slices.csv").is_file() and tuned_params != default_params:
        rows = [_row("default", runs, default_params), _row("tuned", runs, tuned_params)]
        subjects = [s for s in rows[0]["subjects"] if s != "mean"] + ["mean"]
        head = ["config", *keys, "train min", *[f"{s} PSNR (gain)" for s in subjects]]
        final_lines = [f"## Default vs tuned, both trained from scratch for {args.final_seconds} s, seed 0", "",
                       "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            cells = [r["config"], *[f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys],
                     f"{r['train_min']:.1f}"]
            cells += [f"{r['subjects'][s]['psnr']:.2f} ({r['subjects'][s]['gain_db']:+.2f})" for s in subjects]
            final_lines.append("| " + " | ".join(cells) + " |")
        final_lines.append("")
    elif tuned_params == default_params:
        final_lines = ["The study's best trial is the bundle's defaults (trial 0): the tuned override equals "
                       "`train.json`, so there is no default-vs-tuned training to run.", ""]
    space = json.load(open(REPO / "experiments/spaces/srcnn.json"))
    text = "\n".join([
        f"# Example study: SRCNN x2, {len(st.trials)} trials ({states['COMPLETE']} complete, {states['PRUNED']} pruned, "
        f"{states['FAIL']} failed)", "",
        f"Study `{args.study}`: space `experiments/spaces/srcnn.json` (budget per trial: {space['fixed']}), objective "
        f"val_psnr on the sample split's validation patients (one MR, three CT), median pruner "
        f"({space['pruner']}). Study wall time {sum(durations) / 60:.1f} min of trials on {os.cpu_count()} CPU cores "
        f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')}). Best trial {best['tuned_by']['trial']}: "
        f"val_psnr {best['tuned_by']['value']:.3f} dB, {val.get('val_baseline_gain_db', float('nan')):+.2f} dB over "
        f"the matched baseline on the same slices.", "",
        f"## Complete trials on the held-out test patients ({args.heldout_slices} slices per volume)", "",
        "Each trial's best checkpoint by validation, gain in dB over the matched baseline (k-space zero-fill for MR, "
        "cubic for CT) per subject and the mean over subjects; sorted by val_psnr.", "",
        *held_lines, "", *final_lines, "## Trials", "", trials_table(st), ""])
    out = REPO / "experiments" / "results"
    (out / "tune_srcnn.md").write_text(text)
    (out / "tune_srcnn.json").write_text(json.dumps({"heldout": held, "states": states, "best": best}, indent=2))
    print(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--study", default="example-srcnn")
    ap.add_argument("--final-seconds", type=int, default=900, help="training wall budget of each final run")
    ap.add_argument("--heldout-slices", type=int, default=24, help="slices per test volume in the heldout stage")
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
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per trial / evaluation (also named in the report)
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{(runs / 'mlruns' / 'mlflow.db').as_posix()}",
               PYTHONUNBUFFERED="1")
    t0 = time.monotonic()
    if "study" in args.stages:
        study(args, runs, env)
    if "heldout" in args.stages:
        heldout(args, runs, env)
    if "final" in args.stages:
        final(args, runs, env)
    if "report" in args.stages:
        report(args, runs)
    log(f"done in {(time.monotonic() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
