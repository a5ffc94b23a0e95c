#!/usr/bin/env python
"""How far in-plane SR of a held-out MR patient gets with training data of that very patient: a ceiling, not a result.

The shipped EDSR x2 weights stay below the +1.0 dB target over k-space zero-fill on the held-out MR patients, and
the sample split has one clinical T1 patient for training (brain1). This asks whether more data *of the test
patient's kind* would close the gap, using the only such data there is: the test patient's own other slices. The
held-out volume's slices are split into even and odd (6.5 mm apart for brain2, so neighbours share no voxel); the
bundle's ``train.json`` fine-tunes the shipped weights (``init_weights``) on the even slices (``--train-on self``) or
on one other patient of the sample split (``--train-on brain1``: same collection and protocol, another person), and
``train.json + evaluate.json`` scores the shipped and the fine-tuned weights on the odd slices against the matched
baseline. The fine-tuned weights are those of the last epoch: the bundle's checkpoint choice on the validation
patients would
weigh the CT patients too, which an MR-only fine-tuning loses (its last validation is reported beside).

This is an upper bound for what more training patients from the same scanner and protocol could give, not a way to
train shipped weights: it uses the held-out patient's high-resolution slices, which a real user never has. The
results in ``experiments/results/same_patient_ceiling_*`` start from EDSR's 0.6.0 weights (``--init``); the 0.7.0
weights shipped since were fine-tuned with brain1 oversampled, after this analysis.

Results: ``<out>/same_patient_ceiling_<train-on>.json`` and ``.md`` (printed); runs in ``<runs-dir>/<train-on>``
(MLflow store inside).

Example::

    OMP_NUM_THREADS=2 .venv/bin/python experiments/same_patient_ceiling.py --train-on self --seconds 1200
    OMP_NUM_THREADS=2 .venv/bin/python experiments/same_patient_ceiling.py --train-on brain1 --epochs 48 --seconds 1200
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

import numpy as np

# experiments/ is on sys.path when run as a script
from bench_common import REPO, bundle_cmd, expr_path, log, run_logged


def split_volume(samples: Path, subject: str, dest: Path, train_on: str = "self") -> Path:
    """Write ``<subject>_even`` / ``_odd`` NIfTI volumes (alternate slices along the thickest axis, affine spacing
    doubled there) and a datalist: training = the even slices (``train_on="self"``) or the sample split's volume of
    subject ``train_on``, validation = the sample split's own, test = the odd slices."""
    import nibabel as nib

    from medsr_monai.data import load_datalist, write_datalist
    from medsr_monai.data.samples import write_nifti

    (item,) = [it for it in load_datalist(samples, "test") if it["subject"] == subject]
    img = nib.load(item["image"])
    axis = int(np.argmax(item["spacing"]))
    data = np.asanyarray(img.dataobj)
    splits: dict[str, list[dict]] = {"validation": load_datalist(samples, "validation")}
    if train_on != "self":
        every = [it for split in ("training", "validation", "test") for it in load_datalist(samples, split)]
        chosen = [it for it in every if it["subject"] == train_on]
        if not chosen or train_on == subject:
            raise SystemExit(f"--train-on {train_on}: not another subject of {samples / 'datalist.json'}")
        splits["training"] = chosen
    for part, start, split in (("even", 0, "training"), ("odd", 1, "test")):
        sub = np.take(data, np.arange(start, data.shape[axis], 2), axis=axis)
        affine = img.affine.copy()
        affine[:3, 3] += affine[:3, axis] * start
        affine[:3, axis] *= 2
        if split == "training" and train_on != "self":
            continue
        path = write_nifti(dest / "nifti" / f"{subject}_{part}.nii.gz", sub, affine)
        spacing = [float(s) for s in item["spacing"]]
        spacing[axis] *= 2
        splits[split] = [{"image": str(path), "subject": f"{subject}_{part}", "modality": item["modality"],
                          "spacing": spacing, "shape": list(sub.shape)}]
    return write_datalist(dest / "datalist.json", splits, name=f"{subject} even / odd slices",
                          description="same-patient ceiling (experiments/same_patient_ceiling.py)")


def last_weights(checkpoints: Path, dest: Path) -> Path:
    """The network of the newest training checkpoint (``checkpoint_epoch=N.pt``), as ``dest/model.pt``."""
    import torch

    found = list(checkpoints.glob("checkpoint_epoch=*.pt"))
    if not found:
        raise SystemExit(f"{checkpoints}: no epoch finished within the budget; raise --seconds")
    newest = max(found, key=lambda p: int(p.stem.split("=")[1]))
    dest.mkdir(parents=True, exist_ok=True)
    torch.save(torch.load(newest, map_location="cpu", weights_only=False)["network"], dest / "model.pt")
    return dest


def gains_by_subject(slices_csv: Path) -> dict[str, dict]:
    """Per subject of an evaluation's ``slices.csv``: slice count, mean PSNR of the model and of the matched baseline,
    and the gain."""
    import csv

    with open(slices_csv) as f:
        rows = list(csv.DictReader(f))
    out = {}
    for subj in dict.fromkeys(r["subject"] for r in rows):
        by = {m: [float(r["psnr"]) for r in rows if r["subject"] == subj and r["method"] == m]
              for m in ("sr", "baseline")}
        out[subj] = {"slices": len(by["sr"]), "sr_psnr": round(float(np.mean(by["sr"])), 3),
                     "baseline_psnr": round(float(np.mean(by["baseline"])), 3),
                     "gain_db": round(float(np.mean(by["sr"]) - np.mean(by["baseline"])), 3)}
    return out


def evaluate(bundle: str, ckpt_dir: Path, out_dir: Path, data: Path, env: dict, **overrides) -> dict[str, dict]:
    """``train.json + evaluate.json`` of the weights in ``ckpt_dir`` on the test split of ``data``; per subject
    as :func:`gains_by_subject`."""
    paths = {"dataset_dir": expr_path(data), "ckpt_dir": expr_path(ckpt_dir), "output_dir": expr_path(out_dir),
             **overrides}
    out_dir.mkdir(parents=True, exist_ok=True)
    run_logged(bundle_cmd(bundle, ["train.json", "evaluate.json"], paths), out_dir / "eval.log", env)
    return gains_by_subject(out_dir / "evaluation" / "slices.csv")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="edsr", help="an in-plane SR bundle with shipped weights (default edsr)")
    ap.add_argument("--subject", default="brain2", help="a held-out MR patient of the sample split")
    ap.add_argument("--train-on", default="self",
                    help="'self': the subject's even slices; or another subject of the sample split (e.g. brain1)")
    ap.add_argument("--seconds", type=int, default=1200, help="fine-tuning budget in seconds (max_train_seconds)")
    ap.add_argument("--epochs", type=int, default=100,
                    help="epochs of the cosine schedule (an epoch: slices x 16 patches / batch 16 iterations)")
    ap.add_argument("--learning-rate", type=float, default=1e-4)
    ap.add_argument("--init", type=Path, default=None,
                    help="weights to start from and to compare with (default: the bundle's models/model.pt)")
    ap.add_argument("--samples", type=Path, default=REPO / "data" / "samples")
    ap.add_argument("--runs-dir", type=Path, default=REPO / "experiments" / "runs" / "same_patient")
    ap.add_argument("--out", type=Path, default=REPO / "experiments" / "results")
    args = ap.parse_args(argv)

    runs = args.runs_dir.resolve() / args.train_on
    if runs.exists():
        shutil.rmtree(runs)
    data = split_volume(args.samples.resolve(), args.subject, runs / "data", args.train_on).parent
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{runs / 'mlruns.db'}"}
    shipped = REPO / "bundles" / args.bundle / "models"
    if args.init is not None:  # evaluate.json reads <ckpt_dir>/model.pt
        shipped = runs / "init"
        shipped.mkdir(parents=True)
        shutil.copy2(args.init, shipped / "model.pt")
    start_name = "the bundle's shipped weights" if args.init is None else args.init.name
    log(f"{args.bundle}: the starting weights on {args.subject}'s odd slices")
    (before,) = evaluate(args.bundle, shipped, runs / "shipped", data, env, allow_subject_overlap=True).values()
    log(f"starting weights: {before}")
    settings = {"init_weights": expr_path(shipped / "model.pt"), "learning_rate": args.learning_rate,
                "max_epochs": args.epochs, "max_train_seconds": args.seconds, "patches_per_slice": 16,
                "val_interval": 10, "seed": 0}
    paths = {"dataset_dir": expr_path(data), "ckpt_dir": expr_path(runs / "models"),
             "output_dir": expr_path(runs / "train"), "allow_subject_overlap": True}
    what = f"{args.subject}'s even slices" if args.train_on == "self" else args.train_on
    log(f"fine-tuning on {what}: {settings}")
    train_s = run_logged(bundle_cmd(args.bundle, ["train.json"], {**settings, **paths}), runs / "train.log", env)
    last = last_weights(runs / "train" / "checkpoints", runs / "last")
    (after,) = evaluate(args.bundle, last, runs / "finetuned", data, env, allow_subject_overlap=True).values()
    val = json.loads((runs / "train" / "val_metrics.json").read_text())
    log("the fine-tuned weights on every held-out patient of the sample split (20 slices each)")
    held_out = evaluate(args.bundle, last, runs / "heldout", args.samples.resolve(), env, eval_slices_per_volume=20)
    everyone = {subj: round(g["gain_db"], 2) for subj, g in held_out.items()}
    log(f"fine-tuned on {what} ({train_s / 60:.1f} min): {after}")
    result = {"created": dt.datetime.now().isoformat(timespec="seconds"),
              "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                    text=True).stdout.strip(),
              "bundle": args.bundle, "subject": args.subject, "settings": settings, "train_s": round(train_s, 1),
              "train_on": args.train_on, "threads": os.environ.get("OMP_NUM_THREADS"), "shipped": before,
              "finetuned_last_epoch": after,
              "validation_last_epoch": {k: v for k, v in val.items() if k.endswith("_baseline_gain_db")},
              "finetuned_on_sample_test_split": everyone}
    md = (f"# {args.bundle} x2 on {args.subject}'s odd slices: shipped weights vs fine-tuned on {what}\n\n"
          f"| weights | slices | PSNR | matched baseline | gain |\n|---|---|---|---|---|\n"
          f"| starting weights ({start_name}) | {before['slices']} | {before['sr_psnr']:.2f} | "
          f"{before['baseline_psnr']:.2f} | "
          f"{before['gain_db']:+.2f} |\n"
          f"| + fine-tuned on {what} ({train_s / 60:.1f} min, last epoch) | {after['slices']} | "
          f"{after['sr_psnr']:.2f} | "
          f"{after['baseline_psnr']:.2f} | {after['gain_db']:+.2f} |\n\n"
          f"The fine-tuned weights on the validation patients at the run's last validation (every "
          f"{settings['val_interval']} epochs and at the start), gain over the matched baseline: "
          + ", ".join(f"{k[4:-17] or 'all'} {v:+.2f}" for k, v in result["validation_last_epoch"].items())
          + " dB (the first validation, before fine-tuning, is in the run's MLflow record); on the "
          f"sample split's held-out patients (20 slices each, gain over the matched baseline): "
          + ", ".join(f"{k} {v:+.2f}" for k, v in everyone.items()) + " dB.\n\n"
          f"Settings: {json.dumps(settings)}; git {result['git']}; {result['created']}.\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"same_patient_ceiling_{args.train_on}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"same_patient_ceiling_{args.train_on}.md").write_text(md)
    print(md)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
