#!/usr/bin/env python
"""bf16 autocast at inference: the error it adds and the time it saves, per bundle, side by side in one run.

For each bundle's shipped weights, the test subjects of the sample split are degraded with the bundle's physics
(evenly spread whole slices, the demo's protocol) and super-resolved three ways in one process: fp32, bf16 autocast
(``amp: "bf16"``), bf16 + channels_last. Printed: held-out PSNR per setting (mean over subjects), the PSNR change
against fp32, the largest absolute output difference (normalised intensities), and milliseconds per slice (median
of ``--repeats``). The rule of issue 14: adopt a setting for inference only where it loses <= 0.05 dB.

    .venv/bin/python experiments/amp_inference.py --bundles srcnn edsr
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from medsr_monai.physics import modality_kwargs

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))

from benchmark_adapt import bundle_model, psnr, test_subjects, truth_slices  # noqa: E402

SETTINGS = {"fp32": (None, False), "bf16": ("bf16", False), "bf16+channels_last": ("bf16", True)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundles", nargs="+", default=["srcnn", "edsr"])
    ap.add_argument("--slices", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "experiments" / "results" / "amp_inference.json"))
    args = ap.parse_args()
    results = {}
    for bundle in args.bundles:
        net = bundle_model(bundle, "inference", shipped=True)
        s = int(max(net.physics.scale))
        rows = {k: {"psnr": [], "ms_per_slice": [], "max_abs_diff": 0.0} for k in SETTINGS}
        for modality in ("MR", "CT"):
            for item in test_subjects(REPO / "data" / "samples", modality):
                truth, *_ = truth_slices(item, args.slices, s)
                kw = modality_kwargs(net.physics, modality)
                lr = torch.cat([net.physics.A(t[None], **kw).float() for t in truth])
                ref = None
                for name, (amp, cl) in SETTINGS.items():
                    net.amp, net.channels_last = amp, cl
                    net.net.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
                    times = []
                    with torch.no_grad():
                        for _ in range(args.repeats):
                            t0 = time.perf_counter()
                            out = torch.cat([net(y[None], modality) for y in lr])
                            times.append((time.perf_counter() - t0) * 1000 / len(lr))
                    ref = out if ref is None else ref
                    rows[name]["psnr"].append(float(np.mean([psnr(o, t) for o, t in zip(out, truth)])))
                    rows[name]["ms_per_slice"].append(statistics.median(times))
                    rows[name]["max_abs_diff"] = max(rows[name]["max_abs_diff"], float((out - ref).abs().max()))
        results[bundle] = {k: {"psnr_mean": float(np.mean(v["psnr"])), "ms_per_slice": float(np.mean(v["ms_per_slice"])),
                               "max_abs_diff": v["max_abs_diff"]} for k, v in rows.items()}
        base = results[bundle]["fp32"]
        print(f"\n{bundle} (mean over test subjects, {torch.get_num_threads()} thread(s))")
        print("| setting | PSNR | change vs fp32 (dB) | max abs diff | ms/slice | speed-up |\n|---|---|---|---|---|---|")
        for k, v in results[bundle].items():
            print(f"| {k} | {v['psnr_mean']:.3f} | {v['psnr_mean'] - base['psnr_mean']:+.3f} | {v['max_abs_diff']:.2e} | "
                  f"{v['ms_per_slice']:.1f} | {base['ms_per_slice'] / v['ms_per_slice']:.2f}x |")
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
