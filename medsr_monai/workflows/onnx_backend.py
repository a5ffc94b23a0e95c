"""Run a bundle's learned network with ONNX Runtime (``backend: onnx`` in ``inference.json``).

What is exported and run by ONNX Runtime is the *learned* part of a model, never the physics around it:

- :class:`~medsr_monai.networks.PhysicsSR` (srcnn, edsr, srgan, seqsr_lstm): its ``net``. The physics' baseline
  (k-space zero-fill, cubic interpolation) and consistency step use complex FFTs, which the ONNX exporter does not
  translate (``aten.new_zeros`` on complex tensors has no ONNX function), so they stay in PyTorch around the ONNX
  network, exactly as in eager inference (the same code, the same float32 maths).
- :class:`~medsr_monai.networks.PhysicsCascade` (unet): each cascade's network, one file per cascade
  (``model.onnx``, ``model.1.onnx``, ...); the k-space consistency between cascades stays in PyTorch.
- a plain network without physics (cyclegan's generator): the whole network.

Every ONNX file records, as metadata, the sha256 of the checkpoint it was exported from and the model's physics
record; :func:`use_onnx` refuses a file made from other weights or another physics, naming both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["OrtModule", "learned_parts", "part_file", "use_onnx", "onnx_path_for", "BACKENDS", "ORT_META_KEY"]

BACKENDS = ("torch", "onnx")
#: ONNX ``metadata_props`` key holding the export record (JSON)
ORT_META_KEY = "medsr"


def learned_parts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The learned modules of ``model`` that ONNX export covers, as ``(attribute path, module)``; ``""`` is the
    whole model (a network without physics)."""
    from medsr_monai.networks import PhysicsCascade, PhysicsSR

    if isinstance(model, PhysicsCascade):
        return [(f"nets.{i}", n) for i, n in enumerate(model.nets)]
    if isinstance(model, PhysicsSR):
        return [("net", model.net)]
    return [("", model)]


def part_file(onnx_path: str | os.PathLike, index: int) -> Path:
    """File of learned part ``index``: ``model.onnx`` for the first, ``model.<index>.onnx`` for further cascades."""
    p = Path(onnx_path)
    return p if index == 0 else p.with_name(f"{p.name[:-5] if p.name.endswith('.onnx') else p.name}.{index}.onnx")


def onnx_path_for(checkpoint: str | os.PathLike) -> Path:
    """The ONNX file that goes with a checkpoint: ``models/model.pt`` -> ``models/model.onnx``."""
    return Path(checkpoint).with_suffix(".onnx")


def _providers(device: torch.device | str | None) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = ["CPUExecutionProvider"]
    if device is not None and torch.device(device).type == "cuda" and "CUDAExecutionProvider" in available:
        wanted.insert(0, "CUDAExecutionProvider")
    return [p for p in wanted if p in available]


class OrtModule(nn.Module):
    """An ONNX file as a module: ``forward(x)`` runs it with ONNX Runtime (float32) and returns a tensor on
    ``x``'s device. ``threads`` caps ONNX Runtime's intra-op threads (default: ``torch.get_num_threads()``, so
    both backends use the same cores)."""

    def __init__(self, path: str | os.PathLike, device: torch.device | str | None = None, threads: int | None = None,
                 part: int = 0):
        super().__init__()
        import onnxruntime as ort

        self.path = Path(path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or torch.get_num_threads())
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=_providers(device))
        self.input_name = self.session.get_inputs()[0].name
        self.input_shape = list(self.session.get_inputs()[0].shape)  # ints are fixed axes, strings dynamic
        meta = self.session.get_modelmeta().custom_metadata_map.get(ORT_META_KEY)
        self.record = json.loads(meta) if meta else {}
        inputs = self.record.get("inputs") or [{}]
        #: the network pads to a multiple of its strides itself (in Python, which export fixes): done here instead
        self.pad_multiple = int((inputs[part] if part < len(inputs) else {}).get("pad_multiple") or 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sizes = list(x.shape[2:])
        if self.pad_multiple > 1:
            m, pads = self.pad_multiple, []
            for n in sizes[::-1]:  # F.pad lists the last axis first
                pads += [0, (m - n % m) % m]
            if sum(pads):
                x = torch.nn.functional.pad(x, pads, mode="replicate")
        fixed = {i: n for i, n in enumerate(self.input_shape) if isinstance(n, int)}
        bad = {i: (x.shape[i], n) for i, n in fixed.items() if i < x.ndim and x.shape[i] != n}
        if x.ndim != len(self.input_shape) or bad:
            raise ValueError(f"{self.path}: input of shape {tuple(x.shape)} does not fit the exported shape "
                             f"{self.input_shape} (fixed axes differ: {bad}); use backend torch for this input")
        out = torch.from_numpy(self.session.run(None, {self.input_name: x.detach().float().cpu().contiguous().numpy()})[0])
        if self.pad_multiple > 1:
            for d, n in enumerate(sizes):
                out = out.narrow(2 + d, 0, n)
        return out.to(x.device)

    def extra_repr(self) -> str:
        return f"path={self.path}, providers={self.session.get_providers()}"


def _set_part(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    if isinstance(owner, nn.ModuleList):
        owner[int(leaf)] = module
    else:
        setattr(owner, leaf, module)


def use_onnx(model: nn.Module, onnx_path: str | os.PathLike, checkpoint_sha256: str | None = None,
             device: torch.device | str | None = None, threads: int | None = None) -> nn.Module:
    """``model`` with its learned parts (:func:`learned_parts`) replaced by ONNX Runtime sessions of
    ``onnx_path`` (and ``model.<k>.onnx`` for further cascades); the physics stays in PyTorch. Returns the model
    (a network without physics is returned as the :class:`OrtModule` itself).

    Raises ``FileNotFoundError`` naming a missing file (and how to make one), ``ValueError`` when a file was
    exported from other weights than ``checkpoint_sha256`` or for another physics/network.
    """
    from medsr_monai.networks.wrappers import RECORD_KEY, decode_record

    parts = learned_parts(model)
    record = decode_record(getattr(model, RECORD_KEY)) if hasattr(model, RECORD_KEY) else None
    modules = []
    for i, (name, _) in enumerate(parts):
        f = part_file(onnx_path, i)
        if not f.is_file():
            raise FileNotFoundError(
                f"ONNX model {f} does not exist: backend 'onnx' needs the file that `medsr publish` puts in a "
                "published bundle's models/ (or export one: python -m medsr_monai.publish.onnx_export BUNDLE "
                "--out FILE, then --onnx_path FILE); or use --backend torch")
        m = OrtModule(f, device, threads, part=i)
        src = m.record.get("checkpoint_sha256")
        if checkpoint_sha256 and src and src != checkpoint_sha256:
            raise ValueError(f"{f} was exported from weights with sha256 {src[:12]}..., but the checkpoint in use "
                             f"has sha256 {checkpoint_sha256[:12]}...: export it again from these weights, or use "
                             "backend torch")
        theirs = m.record.get("model_record")
        if record is not None and theirs is not None and theirs != record:
            raise ValueError(f"{f} was exported for {theirs}, but this model is {record}")
        if m.record.get("parts", len(parts)) != len(parts):
            raise ValueError(f"{f} belongs to a model with {m.record.get('parts')} learned parts, this model has "
                             f"{len(parts)}")
        modules.append((name, m))
    for name, m in modules:
        if name == "":
            return m
        _set_part(model, name, m)
    return model
