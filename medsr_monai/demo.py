"""``medsr demo``: the main job. Evaluate the shipped weights on the held-out patients next to the matched classical
inverse, fine-tune one bundle briefly from its shipped weights (the training loop and MLflow tracking at work),
super-resolve one whole held-out volume, and print one table and where to look.

Everything the demo writes goes to ``<project>/experiments/runs/demo/`` (a bundle's ``models/`` and ``eval/`` are not
touched); the runs go to the project's MLflow store.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEMO_BUNDLES", "DEMO_METHODS", "DemoMethod", "MATCHED_BASELINE", "format_results_table", "run_demo",
           "subject_gains"]


@dataclass(frozen=True)
class DemoMethod:
    """One row group of the demo's table: a bundle's shipped weights for one task, and its matched classical inverse.

    Args:
        bundle: the bundle's folder name.
        task: the task, in words (the table's first column says it).
        baselines: the method names of the matched classical inverse in the evaluation's ``slices.csv``; with
            several (e.g. low-dose input and a tuned filter), the best of them per subject is the baseline.
        baseline_words: the matched baseline, in words.
        train_config: the bundle's training config the evaluation overlays.
        weights: the shipped weights, relative to the bundle.
        modality: the modality for rows whose per-slice table has no ``group`` column (through-plane).
        sliced: whether the evaluation takes ``eval_slices_per_volume`` (2D evaluations; through-plane evaluates
            whole volumes).
        overrides: further config overrides of the evaluation; ``{demo}`` in a value is the demo's output folder.
    """

    bundle: str
    task: str
    baselines: tuple[str, ...]
    baseline_words: str
    train_config: str = "train.json"
    weights: str = "models/model.pt"
    modality: str = ""
    sliced: bool = True
    overrides: tuple[tuple[str, object], ...] = ()


_IN_PLANE = "MR: k-space zero-fill, CT: cubic (corner grid)"
#: every method the demo knows, in table order; ``--bundles`` picks among these names
DEMO_METHODS = {
    "srcnn": DemoMethod("srcnn", "x2 in-plane SR", ("baseline",), _IN_PLANE),
    "edsr": DemoMethod("edsr", "x2 in-plane SR", ("baseline",), _IN_PLANE),
    "srgan": DemoMethod("srgan", "x4 in-plane SR", ("baseline",), _IN_PLANE),
    "seqsr_lstm": DemoMethod("seqsr_lstm", "x2 through-plane SR", ("cubic_dc",),
                             "cubic + slice-profile consistency", modality="MR", sliced=False),
    "unet": DemoMethod("unet", "4x MRI reconstruction", ("zerofill",), "zero-filled reconstruction"),
    # the two CT denoisers see the same simulated low-dose slices (same per-slice seeds): one shared cache
    "unet_ct_denoise": DemoMethod("unet", "CT denoising, 25 % dose", ("lowdose", "gaussian", "nlm"),
                                  "best of low-dose input, Gaussian (sigma tuned on validation), non-local means",
                                  train_config="train_ct_denoise.json", weights="models/model_ct_denoise.pt",
                                  overrides=(("lowdose_cache_dir", "{demo}/lowdose_cache"),)),
    "cyclegan": DemoMethod("cyclegan", "unpaired CT denoising, 25 % dose", ("lowdose",), "the low-dose input",
                           overrides=(("eval_low_dose#1#cache_dir", "{demo}/lowdose_cache"),)),
}
#: the methods the demo evaluates by default: all of them (those without shipped weights are listed as skipped)
DEMO_BUNDLES = tuple(DEMO_METHODS)
#: per method: (baseline method names, the baseline in words); kept for callers of the earlier two-bundle demo
MATCHED_BASELINE = {name: (m.baselines[0] if len(m.baselines) == 1 else m.baselines, m.baseline_words)
                    for name, m in DEMO_METHODS.items()}


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


def subject_gains(slices_csv: str | os.PathLike, method: str = "sr", baseline: str | tuple[str, ...] = "baseline",
                  modality: str = "") -> dict[str, dict]:
    """Per held-out subject: mean PSNR of ``method`` and of its matched baseline over its evaluated slices, and the
    gain.

    Args:
        slices_csv: an evaluation's per-slice table (``subject, ..., method, psnr, ssim``).
        method: the model's method name.
        baseline: the baseline's method name, or several: then, per subject, the one with the best mean PSNR (e.g.
            the better of the low-dose input and a filter), named in ``"baseline"``.
        modality: used where the table has no ``group`` column.

    Returns:
        ``{subject: {"modality", "psnr", "baseline_psnr", "baseline", "gain_db", "ssim", "slices"}}`` plus
        ``"mean"``, the mean over subjects (each subject weighs the same, whatever its number of slices).
    """
    names = (baseline,) if isinstance(baseline, str) else tuple(baseline)
    rows: dict[str, dict[str, list]] = {}
    with open(slices_csv, newline="") as f:
        for r in csv.DictReader(f):
            d = rows.setdefault(r["subject"], {"group": r.get("group") or modality, "ssim": [],
                                               **{k: [] for k in (method, *names)}})
            if r["method"] in d and r["method"] != "ssim":
                d[r["method"]].append(float(r["psnr"]))
                if r["method"] == method:
                    d["ssim"].append(float(r["ssim"]))
    out = {}
    for subject, d in rows.items():
        have = {k: statistics.mean(d[k]) for k in names if d[k]}
        if d[method] and have:
            best = max(have, key=have.get)
            p, b = statistics.mean(d[method]), have[best]
            out[subject] = {"modality": d["group"], "psnr": p, "baseline_psnr": b, "baseline": best,
                            "gain_db": p - b, "ssim": statistics.mean(d["ssim"]), "slices": len(d[method])}
    if out:
        mean = {k: statistics.mean(v[k] for v in out.values()) for k in ("psnr", "baseline_psnr", "gain_db", "ssim")}
        out["mean"] = {**mean, "modality": "all", "baseline": "", "slices": sum(v["slices"] for v in out.values())}
    return out


def format_results_table(results: dict[str, dict[str, dict]], skipped: dict[str, str] | None = None) -> str:
    """Markdown table: one row per method and held-out subject (and the mean over subjects), the method's PSNR /
    SSIM next to its matched classical inverse's PSNR and the gain.

    Args:
        results: ``{method name: subject_gains(...)}`` (names of :data:`DEMO_METHODS`, or bundle names).
        skipped: ``{method name: why}`` for methods that were not evaluated; they get one row saying why.
    """
    lines = ["| method | task | subject | modality | slices | matched baseline | baseline PSNR dB | method PSNR dB | "
             "gain dB | SSIM |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, per in results.items():
        spec = DEMO_METHODS.get(name)
        task, words = (spec.task, spec.baseline_words) if spec else ("", "matched baseline")
        for subject, r in sorted(per.items(), key=lambda kv: (kv[0] == "mean", kv[1]["modality"], kv[0])):
            label = "**mean over subjects**" if subject == "mean" else subject
            which = f" ({r['baseline']})" if spec and len(spec.baselines) > 1 and r.get("baseline") else ""
            lines.append(f"| {name} | {task} | {label} | {r['modality']} | {r['slices']} | {words}{which} | "
                         f"{r['baseline_psnr']:.2f} | {r['psnr']:.2f} | {r['gain_db']:+.2f} | {r['ssim']:.4f} |")
    for name, why in (skipped or {}).items():
        spec = DEMO_METHODS.get(name)
        lines.append(f"| {name} | {spec.task if spec else ''} | not evaluated: {why} | | | | | | | |")
    return "\n".join(lines)


def run_demo(bundles: list[str] | tuple[str, ...] = DEMO_BUNDLES, finetune: str | None = "srcnn",
             finetune_epochs: int = 1, finetune_slices: int = 4, samples: Path | None = None, infer: bool = True,
             project: str | os.PathLike | None = None, bundles_dir: str | os.PathLike | None = None,
             eval_slices: int | None = 20) -> int:
    """Evaluate the shipped weights, fine-tune one bundle briefly, super-resolve a volume, print the table.

    Args:
        bundles: method names of :data:`DEMO_METHODS` (or bundle names, evaluated as in-plane SR with their
            ``train.json``), their bundles found in the bundles folder (:func:`medsr_monai.paths.find_bundle`). A
            method whose bundle ships no weights gets a "not evaluated" row; when none does, nothing runs.
        finetune: the bundle fine-tuned from its shipped weights (``None``: skip), for ``finetune_epochs`` epochs
            on ``finetune_slices`` slices per training volume and orientation.
        samples: sample data folder (default ``<project>/data/samples``).
        infer: super-resolve one whole held-out volume (brain2) with the last evaluated x2 in-plane bundle.
        project, bundles_dir: ``--project-dir`` / ``--bundles-dir`` (see :mod:`medsr_monai.paths`).
        eval_slices: evenly spread slices per held-out volume in the 2D evaluations (``None``: every slice, as the
            bundles' own results tables); the through-plane evaluation always takes whole volumes.
    """
    from medsr_monai.paths import experiments_dir, find_bundle, samples_dir

    specs = {name: DEMO_METHODS.get(name) or DemoMethod(name, "", ("baseline",), _IN_PLANE) for name in bundles}
    found = {name: find_bundle(spec.bundle, bundles_dir, project) for name, spec in specs.items()}  # refuse early
    skipped: dict[str, str] = {}
    for name, bundle in found.items():
        for need in (f"configs/{specs[name].train_config}", "configs/evaluate.json", specs[name].weights):
            if not (bundle / need).is_file():
                skipped[name] = f"bundle {bundle} has no {need}" + (
                    " (no shipped weights yet: train them with its configs first)" if need.startswith("models")
                    else "")
                break
    found = {k: v for k, v in found.items() if k not in skipped}
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", flush=True)
    if not found:
        raise FileNotFoundError("none of the requested methods has shipped weights: " + "; ".join(skipped.values()))
    found_ft = find_bundle(finetune, bundles_dir, project) if finetune else None
    if found_ft:
        for need in ("configs/train.json", "models/model.pt"):
            if not (found_ft / need).is_file():
                raise FileNotFoundError(f"bundle {found_ft} has no {need}; it cannot be fine-tuned from shipped weights")
    from medsr_monai.data import fetch_samples
    from medsr_monai.tracking import resolve_tracking_uri

    t0 = time.time()
    samples = fetch_samples(Path(samples) if samples else samples_dir(project)).resolve()
    uri = resolve_tracking_uri(next(iter(found.values())), project=project)
    os.environ.setdefault("MLFLOW_TRACKING_URI", uri)
    logs = experiments_dir(project) / "runs" / "demo"
    results: dict[str, dict] = {}
    for name, bundle in found.items():
        spec, out = specs[name], logs / name
        overrides: dict[str, object] = {"dataset_dir": samples, "output_dir": out, "ckpt_path": bundle / spec.weights}
        if spec.sliced and eval_slices:
            overrides["eval_slices_per_volume"] = int(eval_slices)
        overrides.update({k: v.format(demo=logs) if isinstance(v, str) else v for k, v in spec.overrides})
        _run(_bundle_cmd(bundle, [spec.train_config, "evaluate.json"], overrides), logs / f"{name}_evaluate.log",
             f"evaluate {name}'s shipped weights ({spec.task or 'in-plane SR'}) on the held-out patients")
        results[name] = subject_gains(out / "evaluation" / "slices.csv", "sr", spec.baselines, spec.modality)
    if found_ft:
        out = logs / f"{finetune}_finetune"
        _run(_bundle_cmd(found_ft, ["train.json"], {
            # a rerun of the demo replaces the demo's own fine-tune (never the bundle's shipped weights)
            "dataset_dir": samples, "output_dir": out, "ckpt_dir": out / "models", "resume": False,
            "overwrite_weights": True,
            "init_weights": found_ft / "models" / "model.pt", "max_epochs": finetune_epochs,
            "train_max_slices_per_volume": finetune_slices, "run_name": f"{finetune}-demo-finetune"}),
            logs / f"{finetune}_finetune.log",
            f"fine-tune {finetune} from its shipped weights ({finetune_epochs} epoch, {finetune_slices} slices per "
            "volume and orientation), tracked in MLflow")
    in_plane = [n for n in found if specs[n].baselines == ("baseline",)]
    infer_with = ("edsr" if "edsr" in in_plane else in_plane[-1]) if infer and in_plane else None
    if infer_with:
        volume = samples / "nifti" / "brain2.nii.gz"
        _run(_bundle_cmd(found[infer_with], ["inference.json"], {"input": volume, "output_dir": logs / "inference",
                                                                  "overwrite": True}),
             logs / f"{infer_with}_inference.log", f"super-resolve a whole held-out volume with {infer_with}")
    table = format_results_table(results, skipped)
    (logs / "results.md").write_text(table + "\n")
    (logs / "results.json").write_text(json.dumps({**results, "_skipped": skipped,
                                                   "_eval_slices_per_volume": eval_slices}, indent=1) + "\n")
    store = uri.split(":///", 1)[-1]
    spread = f"{eval_slices} evenly spread slices per volume" if eval_slices else "every slice"
    print(f"\n=== Shipped weights on the held-out patients against the matched classical inverse (PSNR over "
          f"{spread} with >= 10 % foreground, whole volumes through-plane; then the mean over subjects)\n")
    print(table)
    print(f"\nfinished in {(time.time() - t0) / 60:.1f} min. Where to look:")
    print(f"  MLflow UI:        medsr ui   (or: mlflow ui --backend-store-uri sqlite:///{store} --port 5000)")
    for name in found:
        print(f"  {name + ' outputs:':17s} {logs / name}/evaluation/ (grids/, metrics.json, slices.csv)")
    if found_ft:
        print(f"  fine-tuned {finetune}: {logs / f'{finetune}_finetune'}/ (models/model.pt, grids/, val_metrics.json)")
    if infer_with:
        print(f"  SR volume:        {logs / 'inference' / 'brain2_sr.nii.gz'} (+ .json sidecar), by {infer_with}")
    print(f"  logs and table:   {logs}/ (results.md, results.json)")
    return 0
