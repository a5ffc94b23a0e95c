"""ONNX export of a bundle's learned network for ``medsr publish`` (``models/model.onnx`` in the archive).

``torch.onnx.export`` (the ``torch.export``-based exporter, opset :data:`OPSET`) with the batch and every spatial
axis dynamic where the network allows it (``Dim.AUTO``: an axis the network fixes, e.g. the slice-sequence length of
the LSTM, which is unrolled, is kept at its exported size and recorded as fixed). What is exported, per bundle,
is the learned part (:func:`medsr_monai.workflows.onnx_backend.learned_parts`); the physics around it (complex
FFT k-space zero-fill and consistency, cubic baselines) does not export to ONNX and stays in PyTorch at inference
(``backend: onnx`` in ``inference.json``). Each export is verified with ONNX Runtime against the eager float32
model on a real slice of a sample scan, for the whole model (physics included) at the slice's size and at a
second size; the largest absolute difference and the tolerance (:data:`TOLERANCE`, on intensities normalised to
[0, 1]) are recorded in the archive's manifest and in ``models/<name>.onnx.json``.

A bundle whose network cannot be exported or fails the check gets no ONNX file: the reason is printed and
recorded (``"exported": false``), publishing goes on with the PyTorch weights.

Command line (export one config's network, e.g. for ``--onnx_path`` of an unpublished bundle)::

    python -m medsr_monai.publish.onnx_export bundles/edsr --out /tmp/edsr.onnx [--config inference]
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["OPSET", "TOLERANCE", "export_model", "export_bundle", "export_bundle_variants", "inference_variants"]

#: ONNX opset (ONNX Runtime >= 1.14 runs it; 18 is the exporter's lowest for the torch.export path)
OPSET = 18
#: max |ONNX Runtime - eager float32| accepted on outputs normalised to [0, 1]
TOLERANCE = 1e-4


def _batch2(x: torch.Tensor) -> torch.Tensor:
    """A batch of two (the example and its mirror), so the exporter does not specialise the batch axis to 1."""
    x = x.detach().float().contiguous()
    return torch.cat([x[:1], x[:1].flip(-1)]).contiguous()


def _capture_inputs(model: torch.nn.Module, parts, x: torch.Tensor, modality=None) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, i=i: seen.setdefault(i, args[0].detach().clone()))
             for i, (_, m) in enumerate(parts)]
    try:
        with torch.no_grad():
            _forward(model, x, modality)
    finally:
        for h in hooks:
            h.remove()
    return [seen[i] for i in range(len(parts))]


def _forward(model, x, modality=None):
    from medsr_monai.networks import PhysicsSR

    return model(x, modality) if isinstance(model, PhysicsSR) and modality is not None else model(x)


def _pad(x: torch.Tensor) -> torch.Tensor:
    """The same input at another in-plane size (replicate-padded by 6 and 4 voxels), so an export that silently
    fixed a size is caught (the slice-sequence axis of a through-plane network is exported fixed)."""
    return torch.nn.functional.pad(x, [0, 6, 0, 4] + ([0, 0] if x.ndim == 5 else []), mode="replicate")


def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    pads: list[int] = []
    for n in list(x.shape[2:])[::-1]:
        pads += [0, (multiple - n % multiple) % multiple]
    return torch.nn.functional.pad(x, pads, mode="replicate") if sum(pads) else x


def export_model(model: torch.nn.Module, x: torch.Tensor, onnx_path: str | os.PathLike,
                 checkpoint_sha256: str | None = None, modality: str | None = None, opset: int = OPSET,
                 tolerance: float = TOLERANCE, sample: str | None = None) -> dict[str, Any]:
    """Export the learned parts of ``model`` (eager, weights loaded) to ``onnx_path`` (and ``<stem>.<k>.onnx`` for
    further cascades) and verify them with ONNX Runtime on the real input ``x`` (what the model takes: LR slice,
    complex zero-filled image, thick slab).

    Returns the record (also stored in each file's metadata): files, opset, dynamic and fixed input axes,
    ``max_abs_diff`` of the whole model against eager float32 at two sizes, ``tolerance``, ``passed``. Raises
    whatever the exporter raises when a part cannot be exported.
    """
    import onnx

    from medsr_monai.networks.wrappers import RECORD_KEY, decode_record
    from medsr_monai.workflows.onnx_backend import ORT_META_KEY, learned_parts, part_file, use_onnx

    ref = copy.deepcopy(model).cpu().eval()
    amp = getattr(ref, "amp", None)
    if amp is not None:
        ref.amp = None  # the reference is float32; ONNX Runtime runs float32
    parts = learned_parts(ref)
    inputs = _capture_inputs(ref, parts, x, modality)
    record: dict[str, Any] = {
        "opset": opset, "exporter": f"torch.onnx.export (dynamo) torch {torch.__version__}",
        "checkpoint_sha256": checkpoint_sha256,
        "model_record": decode_record(getattr(ref, RECORD_KEY)) if hasattr(ref, RECORD_KEY) else None,
        "parts": len(parts), "exported_parts": [name or type(ref).__name__ for name, _ in parts],
        "in_pytorch": ("the physics (baseline, consistency) around the exported network" if parts[0][0] else "nothing"),
        "tolerance": tolerance, "reference": "eager PyTorch float32" + (f" (the bundle's amp={amp} is off)" if amp else ""),
        "sample": sample, "files": [], "inputs": [],
    }
    onnx_path = Path(onnx_path)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    for i, ((name, module), inp) in enumerate(zip(parts, inputs)):
        f = part_file(onnx_path, i)
        example = _batch2(inp)
        # a network that pads its input to a multiple of its strides in Python (U-Net, CycleGAN generator) is
        # exported for sizes that are multiples (the padding branch fixes the size it was traced at); the runtime
        # wrapper pads (replicate) and crops around the ONNX network exactly as the network itself does
        multiple = getattr(module, "multiple", None)
        if multiple:
            example = _pad_to(example, int(multiple))
        # batch and spatial axes dynamic; the sequence axis of a through-plane network (B, C, T, H, W) is fixed:
        # its recurrence is unrolled over T at export, so another T would silently run the wrong graph
        dims = {ax: torch.export.Dim.AUTO for ax in range(example.ndim) if ax != 1 and not (example.ndim == 5 and ax == 2)}
        module = module.eval()
        with torch.no_grad():
            program = torch.onnx.export(module, (example,), dynamo=True, opset_version=opset,
                                        input_names=["input"], output_names=["output"], dynamic_shapes=(dims,),
                                        verbose=False)
        program.save(str(f))
        proto = onnx.load(str(f))
        shape = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
        record["files"].append(f.name)
        record["inputs"].append({"part": name or type(ref).__name__, "shape": shape, "pad_multiple": multiple,
                                 "dynamic_axes": [a for a, d in enumerate(shape) if isinstance(d, str)],
                                 "fixed_axes": {str(a): d for a, d in enumerate(shape) if not isinstance(d, str)}})
    # metadata first (use_onnx reads it), then the check through the runtime path inference uses
    for f in record["files"]:
        _set_meta(onnx_path.parent / f, {ORT_META_KEY: json.dumps(record, sort_keys=True)})
    diffs = {}
    with torch.no_grad():
        ort_model = use_onnx(copy.deepcopy(ref), onnx_path, checkpoint_sha256, threads=1)
        for label, xi in (("sample", x), ("padded", _pad(x))):
            try:
                want, got = _forward(ref, xi, modality), _forward(ort_model, xi, modality)
                diffs[f"{label} {list(xi.shape)}"] = float((want - got).abs().max())
            except ValueError as e:  # a fixed axis (recorded): the second size does not fit
                diffs[f"{label} {list(xi.shape)}"] = f"not run: {e}"
        if amp is not None:
            amp_model = copy.deepcopy(model).cpu().eval()
            record["max_abs_diff_vs_eager_amp"] = float((_forward(amp_model, x, modality)
                                                          - _forward(ort_model, x, modality)).abs().max())
    record["max_abs_diff"] = diffs
    numeric = [d for d in diffs.values() if isinstance(d, float)]
    record["passed"] = bool(numeric) and max(numeric) <= tolerance
    for f in record["files"]:
        _set_meta(onnx_path.parent / f, {ORT_META_KEY: json.dumps(record, sort_keys=True)})
    return record


def _set_meta(path: Path, props: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(str(path))
    keep = [p for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for k, v in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(proto, str(path))


def inference_variants(bundle: Path) -> list[tuple[str, dict]]:
    """The inference configs of a bundle and their weight choices: ``(config, overrides)`` for every
    ``configs/inference*.json``, and both directions of a config with a ``direction`` (cyclegan)."""
    out = []
    for cfg in sorted((bundle / "configs").glob("inference*.json")):
        content = json.loads(cfg.read_text())
        if content.get("direction") in ("AB", "BA"):
            out += [(cfg.stem, {"direction": d}) for d in ("AB", "BA")]
        else:
            out.append((cfg.stem, {}))
    return out


def _slab_input(physics, sample: Path, window: int) -> torch.Tensor:
    """A thick slab of ``window`` slices made by the physics from ``window * scale`` thin slices of ``sample``
    (edge slices repeated when the scan has fewer): ``(1, 1, window, 48, 48)``."""
    import nibabel as nib
    import numpy as np

    vol = np.asarray(nib.load(str(sample)).dataobj, dtype=np.float32)
    n = window * int(max(physics.scale))
    c0, c1 = vol.shape[0] // 2, vol.shape[1] // 2
    z = np.clip(np.arange(n) + max(0, (vol.shape[2] - n) // 2), 0, vol.shape[2] - 1)
    slab = vol[c0 - 24:c0 + 24, c1 - 24:c1 + 24][..., z]
    lo, hi = np.percentile(slab, [0.5, 99.5])
    slab = np.clip((slab - lo) / max(hi - lo, 1e-6), 0, 1)
    return physics.A(torch.as_tensor(np.ascontiguousarray(np.moveaxis(slab, 2, 0)))[None, None]).float()


def export_bundle(bundle: str | os.PathLike, out: str | os.PathLike, config: str = "inference",
                  overrides: dict | None = None, sample: str | os.PathLike | None = None) -> dict[str, Any]:
    """Export and verify the network of one inference config of ``bundle`` (with its ``ckpt_path`` weights) to
    ``out``. Returns the record of :func:`export_model` plus ``config``, ``checkpoint``; never raises for a network
    that does not export: ``{"exported": false, "reason": ...}`` instead."""
    from monai.bundle import ConfigParser

    from medsr_monai.workflows.inference import load_checkpoint

    from .checks import physics_input

    bundle = Path(bundle)
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / f"{config}.json"))
    parser["bundle_root"] = str(bundle)
    for k, v in (overrides or {}).items():
        parser[k] = v
    ckpt = Path(str(parser.get_parsed_content("ckpt_path")))
    base = {"config": config, **({"overrides": overrides} if overrides else {}), "checkpoint": ckpt.name}
    if not ckpt.is_file():
        return {**base, "exported": False, "reason": f"no weights {ckpt.name}"}
    if sample is None:
        try:
            cand = Path(str(parser.get_parsed_content("input")))
            sample = cand if cand.is_file() else None
        except Exception:  # noqa: BLE001 - an input that needs other things: the caller's sample
            sample = None
    if sample is None:
        return {**base, "exported": False, "reason": "no sample scan to verify against"}
    net = parser.get_parsed_content("network_def", instantiate=True).cpu()
    sha = load_checkpoint(net, ckpt)
    net.eval()
    physics = getattr(net, "physics", None)
    modality = getattr(physics, "default", None) if hasattr(physics, "branches") else None
    x = physics_input(net, Path(sample))
    if x.ndim == 5 and "window" in parser.config:  # through-plane: the sequence length inference windows use
        x = _slab_input(physics, Path(sample), int(parser.get_parsed_content("window")))
    try:
        rec = export_model(net, x, out, sha, modality, sample=Path(sample).name)
    except Exception as e:  # noqa: BLE001 - recorded and printed: this bundle's network does not export
        msg = str(e).strip().splitlines()
        detail = next((ln for ln in msg if "Error" in ln and "No ONNX function" in ln), msg[-1] if msg else "")
        return {**base, "exported": False, "reason": f"{type(e).__name__}: {detail[:400]}"}
    return {**base, **rec, "exported": bool(rec["passed"]),
            **({} if rec["passed"] else {"reason": f"ONNX Runtime output differs from eager by more than "
                                                   f"{rec['tolerance']}: {rec['max_abs_diff']}"})}


def export_bundle_variants(bundle: Path, sample: Path | None, log=print, *, workdir: Path
                           ) -> tuple[dict[str, Path], dict[str, Any]]:
    """Export every inference config's weights of ``bundle`` (``models/<ckpt stem>.onnx``) into ``workdir`` (the
    caller's folder, which it removes). Returns ``({archive path: file}, manifest record)``; every variant that does
    not export is named on the console and in the record."""
    tmp = Path(workdir)
    tmp.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    records = []
    seen = set()
    for config, overrides in inference_variants(bundle):
        try:
            rec = _variant(bundle, tmp, config, overrides, sample, seen)
        except Exception as e:  # noqa: BLE001 - a config that cannot even be built: recorded, not fatal
            rec = {"config": config, "exported": False, "reason": f"{type(e).__name__}: {e}"}
        if rec is None:
            continue
        records.append(rec)
        tag = config + (f" {overrides}" if overrides else "")
        if rec["exported"]:
            for f in rec["files"]:
                files[f"models/{f}"] = tmp / f
            side = tmp / (rec["files"][0] + ".json")
            side.write_text(json.dumps(rec, indent=2, sort_keys=True))
            files[f"models/{side.name}"] = side
            log(f"ONNX: {tag}: models/{rec['files'][0]} exported ({', '.join(rec['exported_parts'])}), "
                f"max |ONNX Runtime - eager| {rec['max_abs_diff']} <= {rec['tolerance']}")
        else:
            log(f"WARNING: ONNX: {tag}: NOT EXPORTED ({rec['reason']}); the archive has no ONNX file for "
                f"{rec.get('checkpoint')}, use backend torch")
    return files, {"opset": OPSET, "tolerance": TOLERANCE, "variants": records}


def _variant(bundle, tmp, config, overrides, sample, seen):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / f"{config}.json"))
    parser["bundle_root"] = str(bundle)
    for k, v in overrides.items():
        parser[k] = v
    ckpt = Path(str(parser.get_parsed_content("ckpt_path")))
    if ckpt in seen:
        return None
    seen.add(ckpt)
    return export_bundle(bundle, tmp / f"{ckpt.stem}.onnx", config, overrides, sample)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m medsr_monai.publish.onnx_export",
                                description="Export a bundle's learned network to ONNX and verify it with ONNX Runtime")
    p.add_argument("bundle", type=Path)
    p.add_argument("--out", type=Path, required=True, help="ONNX file to write (further cascades: <stem>.<k>.onnx)")
    p.add_argument("--config", default="inference")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. direction=BA")
    p.add_argument("--sample", type=Path, default=None, help="real NIfTI to verify on (default: the config's input)")
    a = p.parse_args(argv)
    overrides = dict(s.split("=", 1) for s in a.set)
    rec = export_bundle(a.bundle, a.out, a.config, overrides, a.sample)
    print(json.dumps(rec, indent=2, sort_keys=True))
    return 0 if rec.get("exported") else 1


if __name__ == "__main__":
    raise SystemExit(main())
