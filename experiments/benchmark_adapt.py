"""Scan-specific adaptation on the held-out subjects: baseline, pretrained, adapted, and from-scratch adapted.

For each task and each test subject of its modality (the sample split's ``test`` volumes):

- in-plane SR (``srcnn``, ``edsr`` x2, ``srgan``'s generator x4; MR: k-space truncation, CT: decimation): the subject's normalised slices
  are the truth; the bundle's physics makes the low-resolution scan from them; adaptation sees only that
  low-resolution scan (pairs ``(A(y), y)`` from its own slices) and is scored against the truth;
- through-plane SR x2 (``seqsr_lstm``): each near-isotropic test head is thickened along each axis in turn (box
  profile, the bundle's physics); adaptation sees only the thick volume (SMORE: the physics applied along its own
  in-plane axes) and is scored on the whole volume against the thin one; the baseline is cubic + consistency;
- MRI reconstruction (``unet`` ``mri_recon``, 4x equispaced Cartesian): the bundle's mask undersamples the
  subject's slices; adaptation sees only the complex zero-filled scan (SSDU: its measured lines split into an input
  and a loss set) and is scored on the magnitude against the fully sampled slices; the baseline is the zero-filled
  magnitude; ``unet_mri_recon_random`` undersamples with one seeded random line mask at the same rate and centre
  band instead (SSDU's setting; the bundle's own equispaced scans are refused by the objective);
- CT denoising (``unet`` ``ct_denoise``): the bundle's low-dose physics makes the noisy scan from the slices
  (HU, then the CT window); adaptation sees only the noisy scan (Neighbor2Neighbor) and is scored against the
  full-dose slices; the classical filters (Gaussian, non-local means) are reported beside it.

Scores: PSNR (data range 1 on the normalised intensities) per subject on ``--slices`` evenly spread slices, and the
mean over subjects; wall seconds of each adaptation. A run of some ``--tasks`` replaces those tasks' rows in ``--out``
and keeps the others (each row records its own budget, ``budget_seconds``). Targets (issue 15): in-plane MR x2 adapted >= +0.3 dB over the
pretrained model; through-plane x2 adapted >= +1 dB over cubic; CT denoising adapted >= pretrained; from-scratch
adapted >= the physics baseline.

Each run uses ``medsr adapt``'s own rate, patience and bf16 setting for the task unless ``--lr`` / ``--patience`` /
``--bf16`` say otherwise; choose such settings on ``--split validation`` (the validation subjects), not on the test
subjects, and report the test subjects once.

    .venv/bin/python experiments/benchmark_adapt.py --seconds 180 --tasks edsr srcnn unet_ct_denoise
    .venv/bin/python experiments/benchmark_adapt.py --split validation --tasks seqsr_lstm --starts adapted \
        --lr 3e-4 --out /tmp/val.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from medsr_monai.physics import modality_kwargs

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))

from bench_common import log  # noqa: E402

TASKS = {  # name: (bundle, inference config, modalities)
    "srcnn": ("srcnn", "inference", ("MR", "CT")),
    "edsr": ("edsr", "inference", ("MR", "CT")),
    "srgan": ("srgan", "inference", ("MR", "CT")),  # x4: its generator, adapted with the pixel loss only
    "unet_ct_denoise": ("unet", "inference_ct_denoise", ("CT",)),
    "seqsr_lstm": ("seqsr_lstm", "inference", ("MR",)),
    "unet_mri_recon": ("unet", "inference", ("MR",)),
    # the same model on a random-mask scan (SSDU's setting; the bundle trains on equispaced masks)
    "unet_mri_recon_random": ("unet", "inference", ("MR",)),
}


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    mse = float(torch.mean((x.float() - ref.float()) ** 2))
    return 10 * np.log10(1.0 / max(mse, 1e-12))


def bundle_model(bundle: str, config: str, shipped: bool) -> torch.nn.Module:
    from medsr_monai.adapt import bundle_network

    return bundle_network(REPO / "bundles" / bundle, config, shipped=shipped, device="cpu").eval()


def test_subjects(samples: Path, modality: str, split: str = "test") -> list[dict]:
    """The subjects of ``modality`` in ``split``: "test" (reported) or "validation" (where settings are chosen)."""
    from medsr_monai.data import load_datalist

    return [d for d in load_datalist(samples, split) if d.get("modality") == modality]


def truth_slices(item: dict, n_slices: int, multiple: int) -> tuple[torch.Tensor, list[float], int, np.ndarray]:
    """Evenly spread non-constant slices ``(S, 1, h, w)`` along the slice axis (normalised, clipped as in training),
    the spacing, the axis, and the raw (HU / MR units) slices."""
    from medsr_monai.data import load_volume
    from medsr_monai.data.slices import slice_axis
    from medsr_monai.transforms import ModalityNormalize

    data, affine, _ = load_volume(item["image"])
    data = np.asarray(data, dtype=np.float32).reshape(np.shape(data)[:3])
    spacing = [float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)]
    axis = slice_axis(data.shape, spacing)
    raw = np.moveaxis(data, axis, 0)
    h, w = (raw.shape[1] // multiple) * multiple, (raw.shape[2] // multiple) * multiple
    raw = raw[:, :h, :w]
    norm = ModalityNormalize(modality=item["modality"], clip=True)
    x = torch.as_tensor(norm(torch.as_tensor(data)[None])).float()[0]
    x = torch.movedim(x, axis, 0)[:, None, :h, :w]
    keep = [i for i in range(len(x)) if float(x[i].std()) > 1e-3]
    pick = [keep[int(round(j))] for j in np.linspace(0, len(keep) - 1, min(n_slices, len(keep)))]
    return x[pick].contiguous(), spacing, axis, raw[pick]


def as_volume(slices: torch.Tensor) -> torch.Tensor:
    """``(S, 1, h, w)`` slices -> a ``(1, h, w, S)`` volume with the slices along its last axis."""
    return slices[:, 0].permute(1, 2, 0)[None].contiguous()


@torch.no_grad()
def score(net, inputs: torch.Tensor, truth: torch.Tensor, modality: str) -> float:
    return float(np.mean([psnr(net(y[None], modality)[0], t) for y, t in zip(inputs, truth)]))


def adapt_both(row: dict, pre, bundle: str, config: str, objective_args: tuple, evaluate, args) -> None:
    """Adapt the shipped model and a fresh one to the degraded scan; add each one's score, time, steps, whether the
    guard kept it and its self-supervised validation before / after to ``row``."""
    from medsr_monai.adapt import adapt_network, objective_for, start_settings

    starts = {"adapted": lambda: pre, "scratch": lambda: bundle_model(bundle, config, False)}
    for label in args.starts:
        net = copy.deepcopy(starts[label]())
        t0 = time.monotonic()
        objective = objective_for(net, *objective_args, allow_large_scale=True)  # x4 is measured, not refused
        if args.n2n_pairs == "edge" and hasattr(objective, "diagonal_pairs"):
            objective.diagonal_pairs = False  # the ablation: Neighbor2Neighbor's own edge-adjacent pairs only
        lr, patience = start_settings(objective, from_scratch=label == "scratch")  # medsr adapt's defaults
        if label == "adapted":
            lr, patience = args.lr or lr, args.patience or patience
        elif args.scratch_lr:
            lr = args.scratch_lr
        result = adapt_network(net, objective, seconds=args.seconds, learning_rate=lr, seed=args.seed,
                               patience=patience, progress=False, bf16={"on": True, "off": False}.get(args.bf16))
        row[f"{label}_lr"], row[f"{label}_patience"], row[f"{label}_bf16"] = lr, patience, result.bf16_autocast
        row[f"{label}_seconds"] = round(time.monotonic() - t0, 1)
        with torch.no_grad():
            row[label] = evaluate(net.eval())
        row.update({f"{label}_steps": result.steps, f"{label}_kept": result.kept,
                    f"{label}_val_before": result.val_before, f"{label}_val_after": result.val_after})


def run_sr(task: str, samples: Path, args) -> list[dict]:
    bundle, config, modalities = TASKS[task]
    rows = []
    for modality in modalities:
        for item in test_subjects(samples, modality, args.split):
            pre = bundle_model(bundle, config, shipped=True)
            physics, s = pre.physics, int(max(pre.physics.scale))
            truth, spacing, axis, _ = truth_slices(item, args.slices, s)
            kw = modality_kwargs(physics, modality)
            lr_slices = torch.cat([physics.A(t[None], **kw).float() for t in truth])
            lr_spacing = [sp * (1 if a == axis else s) for a, sp in enumerate(spacing)]
            lr_volume = as_volume(lr_slices)  # slices along the last axis: that is the slice axis now
            spacing_v = [lr_spacing[a] for a in range(3) if a != axis] + [lr_spacing[axis]]
            row = {"task": task, "subject": item.get("subject", Path(item["image"]).name.split(".")[0]),
                   "modality": modality, "slices": len(truth)}
            row["baseline"] = float(np.mean([psnr(physics.apply_dc(physics.baseline(y[None], **kw), y[None], **kw)[0],
                                                  t) for y, t in zip(lr_slices, truth)]))
            row["pretrained"] = score(pre, lr_slices, truth, modality)
            adapt_both(row, pre, bundle, config, (lr_volume, modality, spacing_v, 2),
                       lambda net: score(net, lr_slices, truth, modality), args)
            rows.append(row)
            log(json.dumps(row))
    return rows


def run_through_plane(task: str, samples: Path, args) -> list[dict]:
    from medsr_monai.data import load_volume
    from medsr_monai.transforms import ModalityNormalize

    bundle, config, _ = TASKS[task]
    rows = []
    for item in test_subjects(samples, "MR", args.split):
        data, affine, _ = load_volume(item["image"])
        spacing = [float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)]
        if max(spacing) > 1.5 * min(spacing):
            continue  # SMORE needs in-plane axes finer than the slices it learns to recover: near-isotropic heads
        data = np.asarray(data, dtype=np.float32).reshape(np.shape(data)[:3])
        hr = torch.as_tensor(ModalityNormalize(modality="MR", clip=True)(torch.as_tensor(data)[None])).float()
        for view in args.views:
            pre = bundle_model(bundle, config, shipped=True)
            ph = pre.physics
            f = int(ph.factor)
            seq = hr.movedim(view + 1, 1)  # (1, S, A, B): the thickened axis first
            seq = seq[:, : seq.shape[1] // f * f][None]
            thick = ph.A(seq).float()
            row = {"task": task, "subject": item.get("subject"), "modality": "MR", "view": view,
                   "slices": int(seq.shape[2])}
            with torch.no_grad():
                row["baseline"] = psnr(ph.apply_dc(ph.baseline(thick), thick), seq)
                row["pretrained"] = psnr(pre(thick), seq)
            # the thick volume as a scan: (1, S/f, A, B) with the slice axis first
            vol, sp = thick[0], [spacing[view] * f] + [s for a, s in enumerate(spacing) if a != view]
            adapt_both(row, pre, bundle, config, (vol, "MR", sp, 0), lambda net: psnr(net(thick), seq), args)
            rows.append(row)
            log(json.dumps(row))
    return rows


def run_denoise(task: str, samples: Path, args) -> list[dict]:
    from medsr_monai.transforms.denoise import GaussianFilterd, NonLocalMeansd

    bundle, config, _ = TASKS[task]
    rows = []
    for item in test_subjects(samples, "CT", args.split):
        pre = bundle_model(bundle, config, shipped=True)
        truth, spacing, axis, raw = truth_slices(item, args.slices, 2)
        from medsr_monai.physics import LowDoseCT

        pix = [sp for a, sp in enumerate(spacing) if a != axis][0]
        phys = pre.physics  # the bundle's dose settings, at this subject's pixel size, one seeded noise stream
        low_dose = LowDoseCT(phys.dose_fraction, phys.incident_photons, phys.num_angles, pix, seed=args.seed)
        noisy_hu = np.stack([np.asarray(low_dose.A(torch.as_tensor(r)[None]))[0] for r in raw])
        noisy = torch.as_tensor(np.clip((noisy_hu + 1000.0) / 2000.0, 0, 1)).float()[:, None]
        row = {"task": task, "subject": item.get("subject"), "modality": "CT", "slices": len(truth),
               "low_dose_input": float(np.mean([psnr(y, t) for y, t in zip(noisy, truth)]))}
        for name, filt in (("gaussian", GaussianFilterd("img", sigma=1.0)), ("nlm", NonLocalMeansd("img"))):
            row[name] = float(np.mean([psnr(torch.as_tensor(np.asarray(filt({"img": y.numpy()})["img"])), t)
                                       for y, t in zip(noisy, truth)]))
        row["pretrained"] = score(pre, noisy, truth, "CT")
        volume = as_volume(noisy)
        adapt_both(row, pre, bundle, config, (volume, "CT", [pix, pix, spacing[axis]], 2),
                   lambda net: score(net, noisy, truth, "CT"), args)
        rows.append(row)
        log(json.dumps(row))
    return rows


def run_recon(task: str, samples: Path, args) -> list[dict]:
    from medsr_monai.physics import CartesianUndersampling

    bundle, config, _ = TASKS[task]
    rows = []
    for item in test_subjects(samples, "MR", args.split):
        pre = bundle_model(bundle, config, shipped=True)
        physics = pre.physics
        if task.endswith("_random"):  # one random line mask (seeded) for every slice, at the bundle's rate and band
            physics = CartesianUndersampling("random", physics.acceleration, physics.center_fraction, seed=args.seed)
        truth, spacing, axis, _ = truth_slices(item, args.slices, 1)
        measured = torch.cat([physics.A(t[None]).float() for t in truth])  # (S, 2, h, w) complex zero-filled
        volume = measured.permute(1, 2, 3, 0).contiguous()  # (2, h, w, S): the slices along the last axis
        spacing_v = [spacing[a] for a in range(3) if a != axis] + [spacing[axis]]
        row = {"task": task, "subject": item.get("subject"), "modality": "MR", "slices": len(truth),
               "baseline": float(np.mean([psnr(physics.baseline(y[None])[0], t) for y, t in zip(measured, truth)]))}
        row["pretrained"] = score(pre, measured, truth, "MR")
        adapt_both(row, pre, bundle, config, (volume, "MR", spacing_v, 2),
                   lambda net: score(net, measured, truth, "MR"), args)
        rows.append(row)
        log(json.dumps(row))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--seconds", type=float, default=180.0, help="adaptation budget per run (default: %(default)s)")
    ap.add_argument("--slices", type=int, default=24, help="evenly spread slices per subject (default: %(default)s)")
    ap.add_argument("--lr", type=float, default=None,
                    help="fine-tuning rate from the shipped weights (default: medsr adapt's for the task)")
    ap.add_argument("--scratch-lr", type=float, default=None, help="rate from scratch (default: medsr adapt's)")
    ap.add_argument("--patience", type=int, default=None,
                    help="validations without improvement before an adaptation from the shipped weights stops "
                         "(default: medsr adapt's for the task)")
    ap.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                    help="bf16 autocast of the training steps (default: medsr adapt's for the task)")
    ap.add_argument("--starts", nargs="+", choices=["adapted", "scratch"], default=["adapted", "scratch"],
                    help="which adaptations to run: from the shipped weights, from scratch (default: both)")
    ap.add_argument("--views", type=int, nargs="+", default=[0, 1, 2],
                    help="through-plane: axes to thicken in turn (default: all three)")
    ap.add_argument("--n2n-pairs", choices=["mixed", "edge"], default="mixed",
                    help="CT denoising: Neighbor2Neighbor pairs, edge and diagonal (the objective's default) or the "
                         "paper's edge-adjacent only (an ablation; give it its own --out)")
    ap.add_argument("--split", choices=["test", "validation"], default="test",
                    help="subjects: the held-out test ones (reported), or the validation ones, to choose settings "
                         "without looking at the test subjects (give it its own --out)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", default=str(REPO / "data" / "samples"))
    ap.add_argument("--out", default=str(REPO / "experiments" / "results" / "adapt.json"))
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    rows = []
    for task in args.tasks:
        log(f"{task}: {args.seconds:.0f} s per adaptation, {torch.get_num_threads()} thread(s)")
        run = {"unet_ct_denoise": run_denoise, "seqsr_lstm": run_through_plane, "unet_mri_recon": run_recon,
               "unet_mri_recon_random": run_recon}.get(task, run_sr)
        rows += [{**r, "budget_seconds": args.seconds, "threads": torch.get_num_threads(), "split": args.split}
                 for r in run(task, Path(args.samples), args)]
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    kept = [{"budget_seconds": old.get("seconds"), "threads": old.get("threads"), **r}
            for r in old["rows"] if r["task"] not in args.tasks]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": kept + rows}, indent=2))
    cols = ["task", "subject", "modality", "baseline", "low_dose_input", "gaussian", "nlm", "pretrained", "adapted",
            "scratch", "adapted_seconds", "scratch_seconds"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.2f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols)
              + " |")
    for task in args.tasks:
        sub = [r for r in rows if r["task"] == task]
        for mod in sorted({r["modality"] for r in sub}):
            rs = [r for r in sub if r["modality"] == mod]
            means = {k: float(np.mean([r[k] for r in rs])) for k in ("pretrained", "adapted", "scratch")
                     if k in rs[0]}
            ref = "baseline" if "baseline" in rs[0] else "low_dose_input"
            means[ref] = float(np.mean([r[ref] for r in rs]))
            gains = [f"{a} - {b} {means[a] - means[b]:+.2f} dB" for a, b in (("adapted", "pretrained"),
                                                                          ("adapted", ref), ("scratch", ref))
                     if a in means]
            print(f"{task} {mod} mean over {len(rs)} subjects: " + ", ".join(f"{k} {v:.2f}" for k, v in means.items())
                  + "; " + ", ".join(gains))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
