"""The ``medsr`` command line: sample data, user datalists, the end-to-end demo, and the MLflow UI.

Training, evaluation and inference themselves run through MONAI's bundle runner, as a user would::

    python -m monai.bundle run --config_file bundles/edsr/configs/train.json --bundle_root bundles/edsr

Default paths (MLflow store, ``experiments/``, ``data/samples``, the bundles named by ``medsr demo``) come from
:mod:`medsr_monai.paths`: flags, then ``MEDSR_PROJECT_DIR`` / ``MEDSR_BUNDLES_DIR``, then the working directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["main", "build_parser", "run_demo", "format_results_table"]


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


def format_results_table(results: dict[str, dict[str, float]], modalities=("MR", "CT")) -> str:
    """Markdown table of held-out PSNR/SSIM per method and modality from evaluate.json's metrics files, each
    method next to the matched classical inverse of its physics (MR: k-space zero-fill, CT: cubic on the corner
    grid) and the gain over it; cubic interpolation is listed for reference.

    Args:
        results: ``{bundle_name: metrics}`` where metrics has keys like ``test_MR_sr_psnr`` and
            ``test_MR_baseline_psnr`` (the physics baseline).
    """
    header = ["method"] + [f"{m} {k}" for m in modalities for k in ("PSNR dB", "SSIM", "gain dB")]
    rows = []
    first = next(iter(results.values()), {})
    for baseline, label in (("baseline", "matched baseline (MR: k-space zero-fill, CT: cubic)"),
                            ("bicubic", "cubic, corner grid (reference)")):
        row = [label]
        for m in modalities:
            p, s = first.get(f"test_{m}_{baseline}_psnr"), first.get(f"test_{m}_{baseline}_ssim")
            row += [f"{p:.2f}" if p is not None else "-", f"{s:.4f}" if s is not None else "-", "-"]
        rows.append(row)
    for name, metrics in results.items():
        row = [name]
        for m in modalities:
            p, s = metrics.get(f"test_{m}_sr_psnr"), metrics.get(f"test_{m}_sr_ssim")
            gain = metrics.get(f"test_{m}_baseline_gain_db")  # paired per slice, over the matched baseline
            row += [f"{p:.2f}" if p is not None else "-", f"{s:.4f}" if s is not None else "-",
                    f"{gain:+.2f}" if gain is not None else "-"]
        rows.append(row)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def run_demo(bundles: list[str], epochs: int, patches_per_slice: int, samples: Path | None = None,
             infer: bool = True, project: str | os.PathLike | None = None,
             bundles_dir: str | os.PathLike | None = None) -> int:
    """Fetch the samples, train and evaluate each bundle briefly, print the comparison and where to look.

    Args:
        bundles: bundle names, looked up in the bundles folder (:func:`medsr_monai.paths.find_bundle`) before
            anything runs.
        epochs, patches_per_slice: the short training budget.
        samples: sample data folder (default ``<project>/data/samples``).
        infer: also super-resolve one whole held-out volume with the last bundle.
        project, bundles_dir: ``--project-dir`` / ``--bundles-dir`` (see :mod:`medsr_monai.paths`); the logs and the
            table go to ``<project>/experiments/runs/demo``.
    """
    from medsr_monai.paths import experiments_dir, find_bundle, samples_dir

    found = {name: find_bundle(name, bundles_dir, project) for name in bundles}  # refuse before anything runs
    for bundle in found.values():
        if not (bundle / "configs" / "train.json").is_file():
            raise FileNotFoundError(f"bundle {bundle} has no configs/train.json")
    from medsr_monai.data import fetch_samples
    from medsr_monai.tracking import resolve_tracking_uri

    t0 = time.time()
    samples = fetch_samples(Path(samples) if samples else samples_dir(project)).resolve()
    uri = resolve_tracking_uri(found[bundles[0]], project=project)
    os.environ.setdefault("MLFLOW_TRACKING_URI", uri)
    results: dict[str, dict[str, float]] = {}
    logs = experiments_dir(project) / "runs" / "demo"
    for name, bundle in found.items():
        common = {"dataset_dir": samples}
        _run(_bundle_cmd(bundle, ["train.json"], {**common, "max_epochs": epochs, "patches_per_slice": patches_per_slice,
                                                  "resume": False}),
             logs / f"{name}_train.log", f"train {name} ({epochs} epochs)")
        _run(_bundle_cmd(bundle, ["train.json", "evaluate.json"], common), logs / f"{name}_evaluate.log",
             f"evaluate {name} on the held-out patients")
        results[name] = json.loads((bundle / "eval" / "evaluation" / "metrics.json").read_text())
    last = bundles[-1]
    if infer:
        volume = samples / "nifti" / "brain2.nii.gz"
        _run(_bundle_cmd(found[last], ["inference.json"], {"input": volume}),
             logs / f"{last}_inference.log", f"super-resolve a whole held-out volume with {last}")
    table = format_results_table(results)
    (logs / "results.md").write_text(table + "\n")
    store = uri.split(":///", 1)[-1]
    print("\n=== Held-out patients (brain2 MR, lung2 CT), x2 in-plane, PSNR over slices with >= 10 % foreground\n")
    print(table)
    print(f"\nfinished in {(time.time() - t0) / 60:.1f} min. Where to look:")
    print(f"  MLflow UI:        medsr ui   (or: mlflow ui --backend-store-uri sqlite:///{store} --port 5000)")
    for name, bundle in found.items():
        print(f"  {name:6s} outputs:   {bundle / 'eval'}/ (grids/, evaluation/metrics.json, slices.csv), "
              f"weights {bundle / 'models' / 'model.pt'}")
    if infer:
        print(f"  SR volume:        {found[last] / 'eval' / 'inference' / 'brain2_sr.nii.gz'} (+ .json sidecar)")
    print(f"  logs and table:   {logs}/")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(args.bundles, args.epochs, args.patches_per_slice, args.samples, infer=not args.no_inference,
                    project=args.project_dir, bundles_dir=args.bundles_dir)


def _cmd_ui(args: argparse.Namespace) -> int:
    from medsr_monai.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(project=args.project_dir)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port)]
    print(shlex.join(cmd))
    if args.print_only:
        return 0
    return subprocess.call(cmd)


def _cmd_compare(args: argparse.Namespace) -> int:
    from medsr_monai.compare import EmptyStoreError, compare
    from medsr_monai.tracking import resolve_tracking_uri

    uri = args.tracking_uri or resolve_tracking_uri(check=False, project=args.project_dir)
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
    from medsr_monai.data.cli import register as register_data
    from medsr_monai.paths import add_path_arguments
    from medsr_monai.publish.cli import register as register_publish
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

    demo = sub.add_parser(
        "demo", help="fetch the sample scans, train + evaluate the bundles briefly, print the comparison",
        description="The main job end to end: fetch the real sample scans, train each bundle briefly on them, "
        "evaluate on the held-out patients against the matched baseline (MR: k-space zero-fill, CT: cubic), super-resolve one "
        "whole volume, and print a comparison table plus where to look (MLflow UI, output folders).",
    )
    demo.add_argument("--bundles", nargs="+", default=["srcnn", "edsr"],
                      help="bundle names, found in the bundles folder (default: %(default)s)")
    demo.add_argument("--epochs", type=int, default=3, help="training epochs per bundle (default: %(default)s)")
    demo.add_argument("--patches-per-slice", type=int, default=2, help="training patches per slice and epoch (default: %(default)s)")
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
    add_path_arguments(cmp, bundles=False)
    cmp.set_defaults(func=_cmd_compare)

    ui = sub.add_parser("ui", help="open the MLflow UI on the project store (<project>/mlruns/)",
                        description="Start `mlflow ui` on the project store (MLFLOW_TRACKING_URI if set).")
    ui.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    ui.add_argument("--port", type=int, default=5000, help="port (default: %(default)s)")
    ui.add_argument("--print-only", action="store_true", help="print the command instead of running it")
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
    except (FileNotFoundError, PermissionError, ValueError, RuntimeError) as e:
        sys.stdout.flush()  # the error is the last line the user sees
        print(f"medsr {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
