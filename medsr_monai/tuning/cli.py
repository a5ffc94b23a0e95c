"""``medsr tune``: command-line front end of :mod:`medsr_monai.tuning.study`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["register", "parse_set", "settings_from_args"]


def parse_set(items: list[str]) -> dict[str, object]:
    """``["max_epochs=4", "optimizer=SGD", "ct_window=[-1000, 1000]"]`` -> overrides; values are JSON where they
    parse as JSON, else strings."""
    out: dict[str, object] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: write config_id=value, e.g. --set max_epochs=4")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def settings_from_args(args: argparse.Namespace, argv: list[str]):
    from medsr_monai.paths import bundle_arg, project_dir
    from medsr_monai.tracking import resolve_tracking_uri
    from medsr_monai.tuning.space import Objective, find_space, load_space
    from medsr_monai.tuning.study import TuneSettings, default_best_file, default_study_name

    flag = getattr(args, "project_dir", None)
    bundle = bundle_arg(args.bundle, getattr(args, "bundles_dir", None), flag).resolve()
    project = project_dir(flag, bundle_root=bundle)  # the bundle's project, else here; never the package's folder
    experiments = project / "experiments"
    space_path = args.space or find_space(bundle, experiments / "spaces")
    space = load_space(space_path)
    fixed = dict(space.fixed)
    if args.epochs is not None:
        fixed["max_epochs"] = args.epochs
    fixed.update(parse_set(args.set))
    config = args.config[:-5] if args.config.endswith(".json") else args.config
    # a task config of its own (unet's train_ct_denoise) gets a study of its own: unet_ct_denoise
    study = args.study or default_study_name(bundle) + ("" if config == "train" else "_" + config.removeprefix("train_"))
    storage = args.storage or f"sqlite:///{(experiments / 'optuna.db').as_posix()}"
    uri = args.tracking_uri or resolve_tracking_uri(bundle, check=False, project=project)
    output = Path(args.output or experiments / "tune") / study
    best_dir = Path(args.best_dir or experiments / "best")
    best = Path(args.best_out) if args.best_out else default_best_file(best_dir, bundle, study)
    enqueue = []
    for text in args.enqueue or []:
        try:
            enqueue.append(json.loads(text))
        except json.JSONDecodeError as e:
            raise ValueError(f"--enqueue {text!r} is not a JSON object of config id -> value: {e}") from e
    return TuneSettings(bundle=bundle, trials=args.trials, study_name=study, storage=storage, space=space,
                        objective=Objective.parse(args.objective or space.objective), tracking_uri=uri,
                        output_root=output.resolve(), best_out=best.resolve(), fixed=fixed, workers=args.workers,
                        timeout=args.timeout, seed=args.seed, enqueue=enqueue, default_trial=not args.no_default_trial,
                        pruner=args.pruner, argv=argv, overwrite_best=args.overwrite_best, config=config)


def _cmd_tune(args: argparse.Namespace) -> int:
    from medsr_monai.tuning.space import SpaceError
    from medsr_monai.tuning.study import TuneError, run_worker, tune

    argv = list(args.argv or sys.argv[1:])
    try:
        settings = settings_from_args(args, argv)
        if args.worker_index is not None:
            return run_worker(settings, args.worker_index, args.parent_run_id)
        summary = tune(settings)
    except (TuneError, SpaceError) as e:
        sys.stdout.flush()  # the error is the last line the user sees
        print(f"medsr tune: error: {e}", file=sys.stderr)
        return 2
    print("\n" + summary["table"] + "\n")
    counts = summary["counts"]
    print(f"study {summary['study']}: {counts['complete']} complete, {counts['pruned']} pruned, {counts['fail']} failed "
          f"({summary['storage']})")
    if summary["best_trial"] is not None:
        print(f"best: trial {summary['best_trial']}, {settings.objective} = {summary['best_value']:.4f}, "
              f"params {summary['best_params']}")
        if summary["best_override"]:
            print(f"best override: {summary['best_override']}\n  use it: python -m monai.bundle run --config_file "
                  f"\"['{settings.bundle / 'configs' / (settings.config + '.json')}','{summary['best_override']}']\" "
                  f"--bundle_root {settings.bundle}")
        else:
            print("best override: not written (see the note below)")
    elif summary.get("all_failed"):
        print("every trial failed: no best override written (each trial's error is in the table above)")
    else:
        print("no trial completed yet: no best override written")
    print(f"MLflow: experiment {summary['experiment']!r}, parent run {summary['parent_run_id']} "
          f"(plots under its optuna/ artifacts; `medsr ui` to browse)")
    for note in summary["notes"]:
        print(f"note: {note}", file=sys.stderr)
    if summary["status"] == "KILLED":
        print("interrupted: every finished trial is kept; run the same command to continue the study")
        return 130
    if summary.get("all_failed"):
        sys.stdout.flush()
        print(f"medsr tune: error: every trial of study {summary['study']!r} failed ({counts['fail']} trial(s)), so "
              f"no best override was written; first error: {summary['first_error']}", file=sys.stderr)
        return 1
    print("to continue the study, run the same command again (with a larger --trials to add trials)")
    return 0


def register(sub) -> None:
    from medsr_monai.paths import add_path_arguments

    p = sub.add_parser(
        "tune", help="Optuna search over a bundle's own train.json (batch size, optimizer, learning rate, schedule)",
        description="Run (or continue) an Optuna study whose every trial is a run of BUNDLE/configs/train.json with "
        "sampled overrides, through MONAI's bundle workflow. The validation objective is reported every epoch and "
        "a median pruner stops weak trials; batch sizes that do not fit the data or memory are pruned with the "
        "reason; crashing trials are recorded FAIL and the study goes on. MLflow gets one parent run per study "
        "(experiment '<bundle experiment>-tune') with one nested run per trial, and Optuna's plots. The best "
        "trial is written as an override file, one per study (<project>/experiments/best/<bundle>/<study>.json), "
        "for `python -m monai.bundle run --config_file \"['train.json','best.json']\"`. Before the first trial the "
        "bundle's data is checked with the study's overrides. Re-running the same command continues the study; "
        "Ctrl-C stops it keeping every finished trial. Exit status: 0 done, 1 every trial failed, 2 refused, "
        "130 interrupted.",
        epilog="Many machines: give every machine the same --study, a PostgreSQL/MySQL --storage URL and a shared "
        "MLflow server, e.g. --storage postgresql://user:pw@db/optuna --tracking-uri http://mlflow:5000 "
        "(see README).",
    )
    p.add_argument("--bundle", required=True,
                   help="bundle folder, e.g. bundles/edsr, or a bundle name found in the bundles folder, e.g. edsr")
    p.add_argument("--config", default="train",
                   help="the training config in BUNDLE/configs/ to tune (default: %(default)s; e.g. train_ct_denoise "
                        "for the U-Net's CT task, which has its own config)")
    p.add_argument("--trials", type=int, required=True,
                   help="total trials the study should hold (any state); a second call with a larger N adds trials")
    p.add_argument("--study", default=None,
                   help="study name (default: the bundle's folder name, e.g. srcnn); names the best-override file")
    p.add_argument("--storage", default=None,
                   help="Optuna storage URL (default: sqlite:///<project>/experiments/optuna.db; "
                   "postgresql://... or mysql+pymysql://... for many machines)")
    p.add_argument("--workers", type=int, default=1, help="processes on this machine sharing the study (default: 1)")
    p.add_argument("--timeout", type=float, default=None, help="start no new trial after this many seconds")
    p.add_argument("--space", default=None,
                   help="search space JSON (default: <project>/experiments/spaces/<bundle>.json if present, else "
                   "the built-in space: batch {16,32,64,128}, Adam/RMSprop/SGD, lr log-uniform 1e-5..1e-2, schedule)")
    p.add_argument("--objective", default=None,
                   help="validation metric to maximise, or a weighted sum: 'val_psnr' (default), 'val_ssim', "
                   "'val_psnr + 20*val_ssim'")
    p.add_argument("--epochs", type=int, default=None, help="training epochs per trial (overrides max_epochs)")
    p.add_argument("--set", action="append", default=[], metavar="ID=VALUE",
                   help="fixed override for every trial, e.g. --set patch_size=64 (repeatable; JSON values)")
    p.add_argument("--enqueue", action="append", default=[], metavar="JSON",
                   help="parameters to try first, e.g. '{\"learning_rate\": 0.001}' (repeatable; skipped if the study already has them)")
    p.add_argument("--no-default-trial", action="store_true",
                   help="do not start a new study with the bundle's own values as trial 0")
    p.add_argument("--pruner", choices=["median", "none"], default="median", help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="base sampler seed; worker i of a call that finds n trials uses seed + 1000*i + n")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store (default: MLFLOW_TRACKING_URI, else the project store "
                   "<project>/mlruns/mlflow.db)")
    p.add_argument("--output", default=None,
                   help="trial folders go to OUTPUT/<study>/ (default: <project>/experiments/tune)")
    p.add_argument("--best-dir", default=None,
                   help="best-trial override files go to BEST_DIR/<bundle>/<study>.json "
                   "(default: <project>/experiments/best)")
    p.add_argument("--best-out", default=None,
                   help="best-trial override file, instead of BEST_DIR/<bundle>/<study>.json")
    p.add_argument("--overwrite-best", action="store_true",
                   help="let this study replace a best-override file written by another study (refused otherwise)")
    add_path_arguments(p)
    p.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--parent-run-id", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_tune, argv=None)
