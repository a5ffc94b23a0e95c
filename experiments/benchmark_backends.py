"""Inference time per volume: PyTorch float32, PyTorch with the bundle's ``amp`` setting, and ONNX Runtime, side by side.

One held-out test volume of the sample split (default ``brain2.nii.gz``, MR, 256x256x23) goes through the bundle's
own ``inference.json`` runner (load, normalise, slice windows, physics, network, write NIfTI) once per backend per
repeat, the backends interleaved so that machine load hits them alike; the median wall time per volume is printed
with the largest difference of each output from the float32 PyTorch output. ONNX Runtime runs the network exported
by :mod:`medsr_monai.publish.onnx_export` (the physics stays in PyTorch) with as many threads as PyTorch.

    .venv/bin/python experiments/benchmark_backends.py --bundles edsr srcnn --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def _runner(bundle: Path, scan: Path, out: Path, **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser["bundle_root"] = str(bundle)
    parser["input"], parser["output_dir"], parser["overwrite"] = str(scan), str(out), True
    parser["device"] = "$torch.device('cpu')"
    for k, v in overrides.items():
        parser[k] = v
    runner = parser.get_parsed_content("runner")
    runner.progress = runner.strategy.progress = False
    return runner, parser.get_parsed_content("amp")


def bench(bundle_name: str, scan: Path, repeats: int) -> list[dict]:
    from medsr_monai.publish.onnx_export import export_bundle

    bundle = REPO / "bundles" / bundle_name
    tmp = Path(tempfile.mkdtemp(prefix="medsr-bench-"))
    onnx = tmp / "model.onnx"
    rec = export_bundle(bundle, onnx, sample=scan)
    if not rec.get("exported"):
        raise SystemExit(f"{bundle_name}: ONNX export failed: {rec.get('reason')}")
    shipped_amp = _runner(bundle, scan, tmp / "probe")[1]
    settings = {"torch fp32": {"amp": None}, f"torch amp={shipped_amp}": {"amp": shipped_amp},
                "onnxruntime": {"amp": None, "backend": "onnx", "onnx_path": str(onnx)}}
    runners = {name: _runner(bundle, scan, tmp / name.replace(" ", "_").replace("=", "_"), **kw)[0]
               for name, kw in settings.items()}
    times: dict[str, list[float]] = {name: [] for name in runners}
    outputs: dict[str, np.ndarray] = {}
    for r in range(repeats + 1):  # the first round warms caches (file reads, allocator, ORT session) and is dropped
        for name, runner in runners.items():
            t0 = time.perf_counter()
            (out,) = runner.run()
            dt = time.perf_counter() - t0
            if r:
                times[name].append(dt)
            outputs[name] = np.asarray(nib.load(str(out)).dataobj, dtype=np.float64)
    ref = outputs["torch fp32"]
    rows = []
    for name in runners:
        rows.append({"bundle": bundle_name, "backend": name, "median_s": statistics.median(times[name]),
                     "min_s": min(times[name]), "max_abs_diff_vs_fp32": float(np.abs(outputs[name] - ref).max()),
                     "output_range": float(ref.max() - ref.min())})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundles", nargs="+", default=["edsr"])
    ap.add_argument("--scan", type=Path, default=REPO / "data" / "samples" / "nifti" / "brain2.nii.gz",
                    help="held-out volume (default: brain2.nii.gz, a test subject of the sample split)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads for PyTorch and ONNX Runtime alike")
    ap.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    shape = nib.load(str(a.scan)).shape
    rows = [row for b in a.bundles for row in bench(b, a.scan, a.repeats)]
    print(f"\ninference time per volume: {a.scan.name} {list(shape)}, CPU, {a.threads} threads, "
          f"median of {a.repeats} (torch {torch.__version__})")
    print("| bundle | backend | median s/volume | min s | max abs diff vs torch fp32 (output range) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['bundle']} | {r['backend']} | {r['median_s']:.2f} | {r['min_s']:.2f} | "
              f"{r['max_abs_diff_vs_fp32']:.3g} ({r['output_range']:.4g}) |")
    if a.out:
        a.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
