#!/usr/bin/env python
"""What CycleGAN's discriminators can learn from the sample CT: the dose signal against the gap between patients.

CycleGAN learns denoising only if "look like domain B" means "less noise". Its discriminators see the high-pass
``x - G_sigma * x`` of a slice (frequency separation, ``frequency_sigma`` of ``bundles/cyclegan``). This script
measures, per CT patient of the sample split, inside the body (normalised intensity above the bundle's
``foreground_threshold``, i.e. > -400 HU):

* ``native``: the high-pass std of the slice as acquired (anatomy, reconstruction kernel, the scanner's own noise);
* ``low-dose``: the same after the bundle's projection-domain low-dose simulation (``dose_fraction``,
  ``incident_photons`` and ``noise_seed`` of ``train.json``);
* ``dose noise``: the std of the simulated noise alone (low-dose minus native, full band);

at the finest scale (sigma 0.5 px) and at the bundle's own sigma, in HU (x 2000: the [-1000, 1000] window).
Domain A is the simulated low-dose half of the training patients, domain B the other half as acquired; validation
and test patients get the same simulation. The summary compares how much the dose raises what the discriminators
see (low-dose / native, per A patient) with how far the domain B patients lie apart (max / min native over B).

No training: about 6 minutes on 2 CPU cores, most of it simulating the 512x512 slices of lung2. Results:
``<out>/cyclegan_domain_gap.json`` and ``.md`` (printed).

Example::

    .venv/bin/python experiments/cyclegan_domain_gap.py --out experiments/results
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from bench_common import REPO, log  # experiments/ is on sys.path when run as a script

HU_PER_UNIT = 2000.0  # the bundle's [-1000, 1000] HU window mapped to [0, 1]


def _parser():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "cyclegan" / "configs" / "train.json"))
    parser["bundle_root"] = str(REPO / "bundles" / "cyclegan")
    return parser


def high_pass_std(x: torch.Tensor, mask: torch.Tensor, lowpass: torch.nn.Module) -> float:
    """Std of ``x - lowpass(x)`` over ``mask`` (2D slice); ``lowpass``: MONAI's ``GaussianFilter``, as in the bundle."""
    x = x.reshape(1, 1, *x.shape[-2:]).float()
    return float((x - lowpass(x))[0, 0][mask].std())


def patient_stats(slices: list[dict], sigmas: tuple[float, ...], threshold: float, lowdose: bool) -> dict:
    """Mean over slices, per patient, of the high-pass stds (and of the dose noise) in HU."""
    from monai.networks.layers import GaussianFilter

    lowpass = {s: GaussianFilter(2, s) for s in sigmas}
    acc: dict[str, dict[str, list[float]]] = {}
    for d in slices:
        native = torch.as_tensor(np.asarray(d["label"]), dtype=torch.float32)
        native = native.reshape(native.shape[-2:])
        mask = native > threshold
        if int(mask.sum()) < 100:
            continue
        row = acc.setdefault(d["subject"], {})
        for s in sigmas:
            row.setdefault(f"native_s{s:g}", []).append(high_pass_std(native, mask, lowpass[s]))
        if lowdose:
            low = torch.as_tensor(np.asarray(d["lowdose"]), dtype=torch.float32).reshape(native.shape)
            for s in sigmas:
                row.setdefault(f"lowdose_s{s:g}", []).append(high_pass_std(low, mask, lowpass[s]))
            row.setdefault("dose_noise", []).append(float((low - native)[mask].std()))
    return {subj: {**{k: round(float(np.mean(v)) * HU_PER_UNIT, 1) for k, v in row.items()},
                   "slices": len(next(iter(row.values())))} for subj, row in acc.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "experiments" / "results", help="folder for the json / md")
    ap.add_argument("--dataset-dir", type=Path, default=REPO / "data" / "samples",
                    help="the sample split (datalist.json); default: data/samples")
    ap.add_argument("--max-slices", type=int, default=16, help="evenly spread slices per volume (0: all)")
    args = ap.parse_args(argv)

    from medsr_monai.data import load_datalist, select_items, volume_slices

    parser = _parser()
    parser["dataset_dir"] = str(args.dataset_dir.resolve())
    sigma = float(parser.get_parsed_content("frequency_sigma"))
    threshold = float(parser.get_parsed_content("foreground_threshold"))
    sigmas = (0.5, sigma)
    limit = args.max_slices or None
    paired = parser.get_parsed_content("volume_transforms_paired")
    plain = parser.get_parsed_content("volume_transforms_b")
    groups = {
        "A (low-dose, training)": (parser.get_parsed_content("domain_a#datalist"), paired, True),
        "B (normal-dose, training)": (parser.get_parsed_content("domain_b#datalist"), plain, False),
        "validation": (select_items(load_datalist(args.dataset_dir, "validation"), modality="CT"), paired, True),
        "test": (select_items(load_datalist(args.dataset_dir, "test"), modality="CT"), paired, True),
    }
    rows = []
    for role, (items, transforms, lowdose) in groups.items():
        log(f"{role}: {', '.join(it['subject'] for it in items)}")
        slices = volume_slices(items, transforms, extra_keys=["lowdose"] if lowdose else [],
                               foreground_threshold=threshold, max_slices_per_volume=limit)
        for subj, st in patient_stats(slices, sigmas, threshold, lowdose).items():
            rows.append({"role": role, "subject": subj, **st})

    a = [r for r in rows if r["role"].startswith("A")]
    b = [r for r in rows if r["role"].startswith("B")]
    summary = {}
    for s in sigmas:
        k = f"s{s:g}"
        summary[k] = {
            "dose_raises_A_by": [round(r[f"lowdose_{k}"] / r[f"native_{k}"], 3) for r in a],
            "B_spread_max_over_min": round(max(r[f"native_{k}"] for r in b) / min(r[f"native_{k}"] for r in b), 2),
            "A_lowdose_range_HU": [min(r[f"lowdose_{k}"] for r in a), max(r[f"lowdose_{k}"] for r in a)],
            "B_native_range_HU": [min(r[f"native_{k}"] for r in b), max(r[f"native_{k}"] for r in b)],
        }
    result = {"created": dt.datetime.now().isoformat(timespec="seconds"),
              "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                    text=True).stdout.strip(),
              "settings": {"frequency_sigma": sigma, "foreground_threshold": threshold,
                           "dose_fraction": parser.get_parsed_content("dose_fraction"),
                           "incident_photons": parser.get_parsed_content("incident_photons"),
                           "max_slices_per_volume": limit},
              "rows": rows, "summary": summary}
    md = to_markdown(result, sigmas)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cyclegan_domain_gap.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "cyclegan_domain_gap.md").write_text(md)
    print(md)
    return result


def to_markdown(result: dict, sigmas: tuple[float, ...]) -> str:
    cols = [f"native_s{s:g}" for s in sigmas] + [f"lowdose_s{s:g}" for s in sigmas] + ["dose_noise"]
    head = ([f"native, sigma {s:g}" for s in sigmas] + [f"low-dose, sigma {s:g}" for s in sigmas]
            + ["dose noise (full band)"])
    lines = ["# What CycleGAN's discriminators see on the sample CT (high-pass std inside the body, HU)", "",
             f"Settings: {json.dumps(result['settings'])}; git {result['git']}; {result['created']}.", "",
             "| role | patient | slices | " + " | ".join(head) + " |",
             "|---|---|---|" + "---|" * len(head)]
    for r in result["rows"]:
        lines.append(f"| {r['role']} | {r['subject']} | {r['slices']} | "
                     + " | ".join("-" if c not in r else f"{r[c]:.1f}" for c in cols) + " |")
    lines.append("")
    for k, s in result["summary"].items():
        lines.append(f"- sigma {k[1:]}: the dose raises what D sees on the A patients by x"
                     + ", x".join(f"{v:.2f}" for v in s["dose_raises_A_by"])
                     + f"; the B patients lie x{s['B_spread_max_over_min']:.2f} apart (native "
                     f"{s['B_native_range_HU'][0]:.1f}-{s['B_native_range_HU'][1]:.1f} HU against low-dose A "
                     f"{s['A_lowdose_range_HU'][0]:.1f}-{s['A_lowdose_range_HU'][1]:.1f} HU).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
