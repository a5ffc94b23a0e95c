#!/usr/bin/env python
"""Ship the weights of a training run in a bundle, with their provenance next to them.

Copies ``<run_dir>/models/<weights>`` (trained by ``experiments/train_shipped.sh``) to
``bundles/<bundle>/models/<weights>`` and writes ``bundles/<bundle>/models/<stem>.provenance.json`` from the
FINISHED MLflow run in ``<run_dir>/mlflow.db`` whose ``model.pt`` artifact is these weights: run id, metrics,
params, seed, git commit, package versions, data hashes, and how long it trained on what. ``medsr publish`` reads
that sidecar when the original store is not at hand (a fresh clone).

Usage::

    .venv/bin/python experiments/ship_weights.py edsr experiments/runs/shipped/edsr
    .venv/bin/python experiments/ship_weights.py unet experiments/runs/shipped/unet_ct --weights model_ct_denoise.pt
    .venv/bin/python experiments/ship_weights.py cyclegan experiments/runs/shipped/cyclegan --with model_BA.pt
"""

from __future__ import annotations

import argparse
import platform
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--weights", default="model.pt", help="file name in <run_dir>/models and in the bundle")
    ap.add_argument("--experiment", default=None, help="MLflow experiment (default: the bundle's experiment_name)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads the run used (recorded)")
    ap.add_argument("--cpu-seconds", type=float, default=None,
                    help="measured process CPU time of the run (default: wall time x threads)")
    ap.add_argument("--note", default="", help="a sentence on the budget or anything unusual (recorded)")
    ap.add_argument("--git-commit", default=None,
                    help="the commit whose tree the run trained from, where the run could not read it itself (a copy of "
                    "the tree without its .git, or with a stale one, e.g. on a lent GPU machine)")
    ap.add_argument("--with", dest="companions", nargs="*", default=[], metavar="FILE",
                    help="more files of the same run's <run_dir>/models shipped beside the weights (e.g. CycleGAN's "
                    "model_BA.pt); their sha256 is recorded in the sidecar")
    args = ap.parse_args()

    from mlflow.tracking import MlflowClient

    from medsr_monai.publish.cli import _train_experiment
    from medsr_monai.publish.provenance import find_provenance, write_sidecar

    bundle = REPO / "bundles" / args.bundle
    src = args.run_dir / "models" / args.weights
    uri = f"sqlite:///{args.run_dir.resolve() / 'mlflow.db'}"
    experiment = args.experiment or _train_experiment(bundle)
    # the run's model.pt artifact is the best checkpoint, whatever name the bundle ships it under
    prov = find_provenance(src, experiment, uri)
    if prov is None:
        raise SystemExit(f"no FINISHED run in {uri} (experiment {experiment}) logged {src}")
    run = MlflowClient(uri).get_run(prov["run_id"])
    wall = (run.info.end_time - run.info.start_time) / 1000.0
    prov.pop("tracking_uri", None)  # a path on the training machine; the run id is what identifies it
    tags = prov.setdefault("tags", {})
    if args.git_commit and args.git_commit != tags.get("git_commit"):
        # a copied tree: the run saw no .git, or a stale one (then it also said "dirty"); keep what it saw
        tags["git_commit_seen_by_run"], tags["git_dirty_seen_by_run"] = tags.get("git_commit"), tags.get("git_dirty")
        tags["git_commit"], tags["git_dirty"] = args.git_commit, "false"
        tags["git_commit_source"] = "ship_weights.py --git-commit: the commit whose tree was copied to the machine"
    device = tags.get("device", "cpu")  # the run's own record: "cpu" or the CUDA device's name
    training = {"wall_seconds": round(wall), "device": device, "python": tags.get("python", platform.python_version()),
                "note": args.note}
    if device == "cpu":
        training.update(machine=cpu_name(), cpu_threads=args.threads,
                        cpu_minutes=round((args.cpu_seconds or wall * args.threads) / 60, 1))
    else:  # the GPU's minutes (the run's start to end), not the loader processes' CPU time
        training.update(machine=device, gpu_minutes=round(wall / 60, 1))
    dest = bundle / "models" / args.weights
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    if args.companions:
        import hashlib

        training["companions"] = {}
        for name in args.companions:
            shutil.copyfile(args.run_dir / "models" / name, bundle / "models" / name)
            training["companions"][name] = hashlib.sha256((bundle / "models" / name).read_bytes()).hexdigest()
    side = write_sidecar(dest, prov, training)
    budget = f"{training['cpu_minutes']} CPU-min" if device == "cpu" else f"{training['gpu_minutes']} min on {device}"
    print(f"shipped {dest} ({dest.stat().st_size / 1e6:.1f} MB) with {side}; run {prov['run_id']}, {budget}")


if __name__ == "__main__":
    main()
