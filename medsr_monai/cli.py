"""The ``medsr`` command line: sample data, user datalists, the end-to-end demo, the MLflow UI (and the Optuna
dashboard), and registering a run's MLflow model.

Training, evaluation and inference themselves run through MONAI's bundle runner, as a user would::

    python -m monai.bundle run --config_file bundles/edsr/configs/train.json --bundle_root bundles/edsr

Default paths (MLflow store, ``experiments/``, ``data/samples``, the bundles named by ``medsr demo``) come from
:mod:`medsr_monai.paths`: flags, then ``MEDSR_PROJECT_DIR`` / ``MEDSR_BUNDLES_DIR``, then the working directory.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from medsr_monai.demo import run_demo

    return run_demo(args.bundles, None if args.no_finetune else args.finetune, args.finetune_epochs,
                    args.finetune_slices, args.samples, infer=not args.no_inference, project=args.project_dir,
                    bundles_dir=args.bundles_dir, eval_slices=args.eval_slices or None)


def _optuna_dashboard_cmd(storage: str, host: str, port: int, check: bool = True) -> list[str]:
    """The ``optuna-dashboard`` command on ``storage``.

    Args:
        storage: Optuna storage URL.
        host: address to bind.
        port: port.
        check: raise :class:`RuntimeError` (one line, naming the extra to install) when it is not installed;
            without the check (``--print-only``) the command is still shown.
    """
    import importlib.util
    import shutil

    exe = shutil.which("optuna-dashboard") or shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent))
    if exe is None and importlib.util.find_spec("optuna_dashboard") is None:
        if check:
            raise RuntimeError("optuna-dashboard is not installed: pip install 'medsr-monai[dashboard]' "
                               "(or pip install optuna-dashboard)")
        exe = "optuna-dashboard"
    base = [exe] if exe else [sys.executable, "-m", "optuna_dashboard"]
    return [*base, storage, "--host", host, "--port", str(port)]


def _cmd_ui(args: argparse.Namespace) -> int:
    from medsr_monai.tracking import resolve_tracking_uri

    if args.optuna:
        from medsr_monai.paths import project_dir

        storage = args.storage or f"sqlite:///{(project_dir(args.project_dir) / 'experiments' / 'optuna.db').as_posix()}"
        try:
            cmd = _optuna_dashboard_cmd(storage, args.host, args.port or 8080, check=not args.print_only)
        except RuntimeError as e:
            print(f"medsr ui: error: {e}", file=sys.stderr)
            return 2
    else:
        uri = resolve_tracking_uri(project=args.project_dir)
        cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
               "--port", str(args.port or 5000)]
    print(shlex.join(cmd))
    if args.print_only:
        return 0
    return subprocess.call(cmd)


def _cmd_register(args: argparse.Namespace) -> int:
    from medsr_monai.tracking import resolve_tracking_uri
    from medsr_monai.tracking.models import register_run_model

    uri = args.tracking_uri or resolve_tracking_uri(check=False, project=args.project_dir)
    mv = register_run_model(args.run_id, uri, name=args.name, alias=args.alias)
    print(f"registered {mv.name} version {mv.version} (run {mv.run_id})"
          + (f", alias {args.alias}: models:/{mv.name}@{args.alias}" if args.alias else f": models:/{mv.name}/{mv.version}"))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from medsr_monai.compare import EmptyStoreError, compare
    from medsr_monai.tracking import resolve_tracking_uri

    uri = args.tracking_uri or resolve_tracking_uri(check=False, project=args.project_dir)
    if args.registry:
        from medsr_monai.tracking.models import format_versions, registered_versions

        text = format_versions(registered_versions(uri), args.format)
        if args.out:
            Path(args.out).write_text(text + "\n")
        print(text)
        return 0
    try:
        text, notes = compare(uri, select=args.select, fmt=args.format, out=args.out, plot=args.plot,
                              images=args.images, experiments=args.experiments)
    except EmptyStoreError as e:
        print(f"medsr compare: {e}", file=sys.stderr)
        return 1
    print(text)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    for label, path in (("table", args.out), ("plot", args.plot), ("side-by-side", args.images)):
        if path and Path(path).is_file():
            print(f"wrote {label}: {path}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from medsr_monai import __version__
    from medsr_monai.adapt.cli import register as register_adapt
    from medsr_monai.data.cli import register as register_data
    from medsr_monai.paths import add_path_arguments
    from medsr_monai.publish.cli import register as register_publish
    from medsr_monai.demo import DEMO_BUNDLES
    from medsr_monai.reproduce import register as register_reproduce
    from medsr_monai.tuning.cli import register as register_tune

    parser = argparse.ArgumentParser(
        prog="medsr",
        description="medsr-monai: reproducible medical image super-resolution with MONAI bundles. "
        "Train/evaluate/infer with `python -m monai.bundle run --config_file bundles/<name>/configs/<cfg>.json "
        "--bundle_root bundles/<name>`; this tool fetches data, runs the demo and opens the MLflow UI. "
        "Default paths: --project-dir / $MEDSR_PROJECT_DIR, else the nearest folder from the working directory "
        "upwards holding bundles/ and mlruns/, else the working directory (mlruns/, experiments/, data/samples/ "
        "are in it); bundles named by name are found in --bundles-dir / $MEDSR_BUNDLES_DIR, else <project>/bundles.",
    )
    parser.add_argument("--version", action="version", version=f"medsr-monai {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    register_data(sub)
    register_tune(sub)
    register_publish(sub)
    register_reproduce(sub)
    register_adapt(sub)

    demo = sub.add_parser(
        "demo", help="fetch the sample scans, evaluate the shipped weights, fine-tune one bundle, print the comparison",
        description="The main job end to end: fetch the real sample scans, evaluate each bundle's shipped weights on "
        "the held-out patients against the matched classical inverse (in-plane SR: k-space zero-fill for MR, cubic on "
        "the corner grid for CT; through-plane: cubic + consistency; MRI reconstruction: zero-filled; CT denoising: "
        "the best of the low-dose input and the classical filters), per subject and the mean over subjects; fine-tune one bundle briefly from its shipped weights "
        "(tracked in MLflow); super-resolve one whole held-out volume; print the table and where to look. Outputs "
        "go to <project>/experiments/runs/demo/.",
    )
    demo.add_argument("--bundles", nargs="+", default=list(DEMO_BUNDLES), metavar="METHOD",
                      help="methods to evaluate: " + ", ".join(DEMO_BUNDLES) + " (default: all; a method whose "
                      "bundle ships no weights gets a 'not evaluated' row)")
    demo.add_argument("--eval-slices", type=int, default=20, help="evenly spread slices per held-out volume in the "
                      "2D evaluations; 0: every slice, as the bundles' own results tables (default: %(default)s)")
    demo.add_argument("--finetune", default="srcnn", help="bundle fine-tuned from its shipped weights "
                      "(default: %(default)s)")
    demo.add_argument("--finetune-epochs", type=int, default=1, help="fine-tuning epochs (default: %(default)s)")
    demo.add_argument("--finetune-slices", type=int, default=4, help="fine-tuning slices per training volume and "
                      "orientation (default: %(default)s)")
    demo.add_argument("--no-finetune", action="store_true", help="skip the fine-tuning step")
    demo.add_argument("--samples", default=None, help="sample data folder (default: <project>/data/samples)")
    demo.add_argument("--no-inference", action="store_true", help="skip the whole-volume inference step")
    add_path_arguments(demo)
    demo.set_defaults(func=_cmd_demo)

    cmp = sub.add_parser(
        "compare", help="table + plots of the best (or latest) run of each method and task in an MLflow store",
        description="Read an MLflow store and print one row per method and task: PSNR/SSIM of the method and of its "
        "baseline (the matched inverse of each physics: zero-fill / cubic in-plane, cubic + consistency through-plane, zero-fill / low-dose for restoration; see "
        "medsr_monai/compare.py), gain in dB, training wall time, training images/s (~ = estimated), parameters. "
        "Test metrics of evaluation runs are used when there are any (source=test), else the training run's "
        "validation metrics (source=val). Also writes a quality-vs-speed plot and a side-by-side of each run's "
        "image grid (runs without a PNG artifact are skipped with a note).",
    )
    cmp.add_argument("--tracking-uri", default=None,
                     help="MLflow store: sqlite:///<abs>/mlflow.db or http(s)://server:port "
                     "(default: MLFLOW_TRACKING_URI, else the project store <project>/mlruns/mlflow.db)")
    cmp.add_argument("--select", choices=["best", "latest"], default="best",
                     help="per method and task: highest method PSNR, or most recent run (default: %(default)s)")
    cmp.add_argument("--format", choices=["markdown", "csv", "json"], default="markdown",
                     help="table format (default: %(default)s)")
    cmp.add_argument("--out", default=None, help="also write the table to this file")
    cmp.add_argument("--plot", default="compare_quality_speed.png",
                     help="PNG: bar of gain over baseline, scatter of gain vs images/s ('' to skip; default: %(default)s)")
    cmp.add_argument("--images", default="compare_images.png",
                     help="PNG of each selected run's image grid side by side ('' to skip; default: %(default)s)")
    cmp.add_argument("--experiments", nargs="+", default=None, help="only these MLflow experiments (bundle names)")
    cmp.add_argument("--registry", action="store_true", help="list the Model Registry instead: every version of "
                     "every registered model with its aliases and training run (no plots)")
    add_path_arguments(cmp, bundles=False)
    cmp.set_defaults(func=_cmd_compare)

    reg = sub.add_parser(
        "register", help="register the MLflow model a training run logged in the Model Registry (e.g. edsr-x2)",
        description="Register the pyfunc model that a training run logged (every bundle's train.json logs one at "
        "the end of training) as a new version of NAME (default <method>-<task>, e.g. edsr-x2, unet-mri_recon-R4), "
        "optionally pointing an alias at it; then `medsr publish --model models:/NAME@ALIAS` or `mlflow models "
        "predict -m models:/NAME@ALIAS --env-manager local`.")
    reg.add_argument("run_id", help="the training run (MLflow run id)")
    reg.add_argument("--name", default=None, help="registered model name (default: <method>-<task>)")
    reg.add_argument("--alias", default=None, help="alias to set on the new version, e.g. champion")
    reg.add_argument("--tracking-uri", default=None, help="MLflow store (default: MLFLOW_TRACKING_URI, else the "
                     "project store <project>/mlruns/mlflow.db)")
    add_path_arguments(reg, bundles=False)
    reg.set_defaults(func=_cmd_register)

    ui = sub.add_parser("ui", help="open the MLflow UI on the project store (<project>/mlruns/), or the Optuna "
                        "dashboard (--optuna)",
                        description="Start `mlflow ui` on the project store (MLFLOW_TRACKING_URI if set); with "
                        "--optuna, `optuna-dashboard` on the study storage (pip install 'medsr-monai[dashboard]').")
    ui.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    ui.add_argument("--port", type=int, default=None, help="port (default: 5000; 8080 with --optuna)")
    ui.add_argument("--print-only", action="store_true", help="print the command instead of running it")
    ui.add_argument("--optuna", action="store_true", help="start optuna-dashboard on the `medsr tune` studies instead")
    ui.add_argument("--storage", default=None, help="Optuna storage URL for --optuna (default: "
                    "sqlite:///<project>/experiments/optuna.db, the default of `medsr tune`)")
    add_path_arguments(ui, bundles=False)
    ui.set_defaults(func=_cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "argv") and args.argv is None:  # `medsr tune --workers K` restarts itself with these
        args.argv = list(argv) if argv is not None else sys.argv[1:]
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        sys.stdout.flush()
        print("interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, FileExistsError, PermissionError, ValueError, RuntimeError) as e:
        sys.stdout.flush()  # the error is the last line the user sees
        print(f"medsr {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
