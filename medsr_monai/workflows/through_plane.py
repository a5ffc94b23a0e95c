"""Through-plane (slice-sequence) super-resolution: training items, windowed inference, the runner's strategy.

Layout: volumes are handled as ``(C, S, A, B)`` with the slice axis ``S`` first (see
:class:`~medsr_monai.transforms.MoveSliceAxisd`), which is what :class:`~medsr_monai.networks.BiConvLSTMSR` reads.

Grid: the centre convention of :mod:`medsr_monai.transforms.thickness`: thick slice ``k`` covers thin slices
``k*f .. k*f+f-1`` and sits at thin position ``k*f + (f-1)/2``. The output affine is
:func:`~medsr_monai.transforms.thin_affine` of the input's, so a volume thickened with
:class:`~medsr_monai.transforms.SliceThickness` and super-resolved lands back on the original grid.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import Inferer, SlidingWindowInferer

# the metrics handler lives in medsr_monai.metrics; re-exported: configs name medsr_monai.workflows.ThroughPlane...
from medsr_monai.metrics.through_plane import VIEWS, ThroughPlaneMetricsHandler

from .inference import VolumeRunner

__all__ = ["ThroughPlaneInferer", "ThroughPlaneMetricsHandler", "ThroughPlaneStrategy", "ThroughPlaneSuperResolver",
           "volume_items", "repeat_items", "VIEWS"]


def _unwrap(net: torch.nn.Module) -> torch.nn.Module:
    return net.module if hasattr(net, "module") and isinstance(net.module, torch.nn.Module) else net


def volume_items(files: str | Sequence[str], axes: int | Sequence[int] = (2,), modality: str = "MR"
                 ) -> list[dict[str, Any]]:
    """``[{"image": path, "subject": stem, "modality": .., "slice_axis": a}]`` per file and axis (axes as augmentation:
    an isotropic volume thickened along x, y or z gives three different training views)."""
    files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    axes = [axes] if isinstance(axes, int) else list(axes)
    if not files:
        raise ValueError("no training/validation volumes given")
    for a in axes:
        if int(a) not in (0, 1, 2):
            raise ValueError(f"slice axes must be 0, 1 or 2, got {a}")
    items = []
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise FileNotFoundError(f"volume {p} does not exist")
        stem = p.name.split(".nii")[0]
        items += [{"image": str(p), "subject": stem, "modality": modality, "slice_axis": int(a)} for a in axes]
    return items


def repeat_items(items: Sequence[dict], n: int) -> list[dict]:
    """``n`` references to ``items`` in turn: one epoch of ``n`` random windows over a few cached volumes
    (use with ``CacheDataset(hash_as_key=True)`` so each volume is loaded and cached once)."""
    if n < 1:
        raise ValueError(f"windows_per_epoch must be >= 1, got {n}")
    return [items[i % len(items)] for i in range(int(n))]


class ThroughPlaneInferer(Inferer):
    """Windowed inference along the slice axis, bounded memory, seam-free interpolation base.

    MONAI's :class:`~monai.inferers.SlidingWindowInferer` runs the network on windows of ``window`` thick slices
    (x ``roi`` in-plane; ``-1`` = whole slices), overlapping by ``overlap``, blended with Gaussian weights, and
    handles the ``f``-times longer output. For a :class:`~medsr_monai.networks.PhysicsSR` (or a residual network with ``net.interpolate``) the
    physics baseline is computed once on the whole volume and only the learned correction is windowed, so no
    window edge re-extrapolates the base (the same reason as in :class:`~.inference.VolumeSuperResolver`).
    For networks with ``data_consistency`` (and ``project``) the blended volume is projected once more onto the
    thick slices (the blending weights differ within a group of thin slices), so the output is exactly consistent.

    Memory: input + base + output + blending buffers (about ``2 f + 2`` times the thick volume, float32) plus
    the activations of ``sw_batch_size`` windows (about ``(6 h + 4 F) x window x roi`` floats, ``h``/``F`` the
    network's hidden/feature channels): independent of the number of slices beyond the volumes themselves.
    """

    def __init__(self, window: int = 16, overlap: float = 0.25, roi: Sequence[int] = (-1, -1), sw_batch_size: int = 1,
                 progress: bool = False):
        super().__init__()
        if window < 2:
            raise ValueError(f"window must hold >= 2 thick slices, got {window}")
        self.window, self.overlap, self.roi = int(window), float(overlap), list(roi)
        self.sw_batch_size, self.progress = int(sw_batch_size), progress

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        net = _unwrap(network)
        window = min(self.window, inputs.shape[2])
        # windows go to the network's device one batch at a time; the volumes stay where the input is (host)
        param = next(net.parameters(), None)
        sw_device = param.device if param is not None else inputs.device
        sw = SlidingWindowInferer(roi_size=[window, *self.roi], sw_batch_size=self.sw_batch_size, overlap=self.overlap,
                                  mode="gaussian", padding_mode="replicate", progress=self.progress,
                                  sw_device=sw_device, device=inputs.device)
        if hasattr(net, "physics") and hasattr(net, "residual"):  # PhysicsSR: baseline once, window the rest
            base = net.baseline(inputs)
            out = base + sw(inputs, net.residual)
            # each window is consistent, but the Gaussian blending weights differ between the thin slices of one
            # group: apply the consistency step once more to the blended volume, so the output is exactly consistent
            return net.consistency(out, inputs.to(out.device, out.dtype))
        if getattr(net, "residual", False) and hasattr(net, "interpolate"):
            base = net.interpolate(inputs)
            out = base + sw(inputs, lambda t: net(t) - net.interpolate(t))
        else:
            out = sw(inputs, net)
        if getattr(net, "data_consistency", False) and hasattr(net, "project"):
            out = net.project(out, inputs.to(out.device, out.dtype))
        return out

    def memory(self, shape: Sequence[int], scale: int, features: int = 32, hidden: int = 32) -> dict[str, Any]:
        """The memory bound (MiB, float32) for a thick volume of spatial ``shape`` = ``(S, A, B)``."""
        mib = 4.0 / 2**20
        n_in = float(np.prod(shape))
        plane = [r if r > 0 else n for r, n in zip(self.roi, shape[1:])]
        n_win = min(self.window, shape[0]) * float(np.prod(plane)) * self.sw_batch_size
        return {
            "host_volumes_mib": round(n_in * (2 * scale + 2) * mib, 1),  # input, base, output, blend weights
            "window_activations_mib": round(n_win * (6 * hidden + 4 * features + 2 * scale) * mib, 1),
            "window": [min(self.window, shape[0]), *plane], "windows_per_pass": self.sw_batch_size,
            "bound": "host: input + interpolation + output + blending (~2*scale+2 float32 copies of the input); "
                     "network device: sw_batch_size windows of `window` thick slices x roi and their activations",
        }


class ThroughPlaneStrategy:
    """The :class:`~.inference.VolumeRunner` strategy for through-plane SR: the slice axis first, then
    :class:`ThroughPlaneInferer`; ``scale`` times as many slices, spacing / ``scale`` along the slice axis and the
    affine :func:`~medsr_monai.transforms.thin_affine` (centre convention: thick slice ``k`` at thin position
    ``k*f + (f-1)/2``).

    Memory bound: the thick input, its interpolation, the output and the blending buffers (together about
    ``2 * scale + 2`` float32 copies of the input) plus the activations of ``sw_batch_size`` windows of
    ``window`` thick slices x ``roi`` in-plane; the number of slices only scales the volumes themselves.
    """

    desc = "super-resolving volumes (through-plane)"
    single_slice = False  # needs >= 2 slices along every axis

    def __init__(self, scale: int, slice_axis: int | str = "auto", window: int = 16, overlap: float = 0.25,
                 roi: Sequence[int] = (-1, -1), sw_batch_size: int = 1, progress: bool = True):
        self.scale, self.slice_axis = int(scale), slice_axis
        self.inferer = ThroughPlaneInferer(window, overlap, roi, sw_batch_size, progress=progress)  # tqdm: windows

    def check(self, network: torch.nn.Module) -> None:
        pass

    @staticmethod
    def takes_complex(network: torch.nn.Module) -> bool:
        return False

    def axis(self, src: Path, shape: Sequence[int], spacing: Sequence[float]) -> int:
        from medsr_monai.data.slices import slice_axis_from_spacing

        if str(self.slice_axis).lower() == "auto":
            return slice_axis_from_spacing(spacing)
        axis = int(self.slice_axis)
        if axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 'auto', 0, 1 or 2, got {self.slice_axis!r}")
        if shape[axis] < 2:
            raise ValueError(f"{src}: {shape[axis]} slice(s) along slice_axis {axis}; need at least 2")
        return axis

    def zoom(self, axis: int) -> list[int]:
        return [self.scale if ax == axis else 1 for ax in range(3)]

    def memory(self, network: torch.nn.Module, shape: Sequence[int], axis: int) -> dict[str, Any]:
        inner = getattr(network, "net", network)
        moved = [shape[axis], *(n for ax, n in enumerate(shape) if ax != axis)]  # (S, A, B)
        return self.inferer.memory(moved, self.scale, getattr(inner, "features", 32),
                                   getattr(inner, "hidden_channels", 32))

    def describe(self, src: Path, shape: Sequence[int], axis: int, memory: dict) -> str:
        out_shape = [n * z for n, z in zip(shape, self.zoom(axis))]
        return (f"{src.name}: {list(shape)} -> {out_shape} along axis {axis}, host memory "
                f"~{memory['host_volumes_mib']:.0f} MiB, windows ~{memory['window_activations_mib']:.0f} MiB")

    def __call__(self, net: torch.nn.Module, x: torch.Tensor, axis: int, modality: str,
                 device: torch.device) -> torch.Tensor:
        """The output for a normalised ``(1, X, Y, Z)`` volume (slice axis moved first and back; host memory)."""
        return self.inferer(x.movedim(axis + 1, 1)[None], net)[0].movedim(1, axis + 1).cpu()

    def affine(self, network: torch.nn.Module, affine_in: np.ndarray, axis: int) -> np.ndarray:
        from medsr_monai.transforms import thin_affine

        return thin_affine(affine_in, self.scale, axis)

    def geometry(self, network: torch.nn.Module, axis: int) -> dict[str, Any]:
        return {"direction": "through-plane", "slice_axis": axis,
                "grid": "center: thick slice k at thin position k*scale + (scale-1)/2"}

    def settings(self) -> dict[str, Any]:
        i = self.inferer
        return {"window": i.window, "overlap": i.overlap, "roi": i.roi, "sw_batch_size": i.sw_batch_size}


class ThroughPlaneSuperResolver(VolumeRunner):
    """:class:`~.inference.VolumeRunner` with a :class:`ThroughPlaneStrategy`: super-resolve whole thick-slice
    volumes along their slice axis (the constructor the bundle configs use).

    Args:
        network: through-plane network ``(B, 1, T, A, B) -> (B, 1, T*scale, A, B)``.
        scale: through-plane factor.
        slice_axis: ``"auto"`` (the coarsest-spacing axis) or 0/1/2.
        window, overlap, roi, sw_batch_size: see :class:`ThroughPlaneInferer`.
        others: see :class:`~.inference.VolumeRunner`.

    Example::

        runner = ThroughPlaneSuperResolver(net, 4, "thick.nii.gz", "out/", checkpoint="models/model.pt")
        written = runner.run()  # [Path("out/thick_sr.nii.gz")]
    """

    def __init__(self, network: torch.nn.Module, scale: int, inputs: Any, output_dir: str, checkpoint: str | None = None,
                 slice_axis: int | str = "auto", modality: str = "auto", window: int = 16, overlap: float = 0.25,
                 roi: Sequence[int] = (-1, -1), sw_batch_size: int = 1, normalizer_kwargs: dict | None = None,
                 bundle_name: str = "", bundle_version: str = "", device: str | torch.device = "cpu",
                 output_postfix: str = "sr", progress: bool = True, overwrite: bool = False, backend: str = "torch",
                 onnx_path: str | None = None, dicom_output: bool = False):
        strategy = ThroughPlaneStrategy(scale, slice_axis, window, overlap, roi, sw_batch_size, progress)
        super().__init__(network, scale, inputs, output_dir, strategy, checkpoint, modality, normalizer_kwargs,
                         bundle_name, bundle_version, device, output_postfix, progress, overwrite, backend,
                         onnx_path, dicom_output)
        self.inferer = strategy.inferer
