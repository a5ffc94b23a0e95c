"""Through-plane (slice-sequence) super-resolution: windowed inference, per-view metrics, NIfTI runner.

Layout: volumes are handled as ``(C, S, A, B)`` with the slice axis ``S`` first (see
:class:`~medsr_monai.transforms.MoveSliceAxisd`), which is what :class:`~medsr_monai.networks.BiConvLSTMSR` reads.

Grid: the centre convention of :mod:`medsr_monai.transforms.thickness`: thick slice ``k`` covers thin slices
``k*f .. k*f+f-1`` and sits at thin position ``k*f + (f-1)/2``. The output affine is
:func:`~medsr_monai.transforms.thin_affine` of the input's, so a volume thickened with
:class:`~medsr_monai.transforms.SliceThickness` and super-resolved lands back on the original grid.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.inferers import Inferer, SlidingWindowInferer
from monai.metrics import PSNRMetric, SSIMMetric
from tqdm.auto import tqdm

from .handlers import save_epoch_figure, sr_items
from .inference import ensure_writable_dir, load_checkpoint, resolve_inputs, volume_stem, write_output_volume

__all__ = ["ThroughPlaneInferer", "ThroughPlaneMetricsHandler", "ThroughPlaneSuperResolver", "volume_items",
           "repeat_items", "VIEWS"]

logger = logging.getLogger(__name__)

#: views of a ``(C, S, A, B)`` volume: ``native`` = the acquired slices (planes across S), ``reformat_a`` /
#: ``reformat_b`` = planes containing the slice axis (e.g. coronal / sagittal of an axial scan)
VIEWS = {"native": 1, "reformat_a": 2, "reformat_b": 3}


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


def _slices(vol: torch.Tensor, dim: int) -> torch.Tensor:
    """2D slices of a ``(C, S, A, B)`` volume across spatial dim ``dim`` (1..3) as a batch ``(N, C, h, w)``."""
    return vol.movedim(dim, 0)


class ThroughPlaneMetricsHandler:
    """PSNR / SSIM of the model and the interpolation baselines on native and reformatted slices of whole volumes.

    Protocol: intensities normalised to [0, 1] (MR: 0.5-99.5 percentiles of the HR volume), predictions and
    baselines clipped to [0, 1], ``data_range`` 1; a 2D slice is scored when >= ``min_foreground`` of its
    reference voxels exceed ``foreground_threshold``; PSNR over the whole slice, SSIM = MONAI's ``SSIMMetric``
    (11x11 Gaussian window, sigma 1.5); averages over the scored slices of each view. ``native`` = the slices
    across the slice axis (half of them at thick-slice centres for even factors, all interpolated), ``reformat_a``
    / ``reformat_b`` = the two planes containing the slice axis, where through-plane blur shows.

    Results go into ``engine.state.metrics`` as ``{prefix}{view}_{method}_{psnr|ssim}``, ``{prefix}{method}_psnr``
    (mean over the three views), ``{prefix}{view}_{baseline}_gain_db``; ``json_path`` / ``md_path`` get the table
    and ``grid_dir`` a picture of a reformatted slice (thick input | baselines | SR | HR).

    Args:
        baseline_keys: batch keys of the baselines (HR-sized, ``(C, S, A, B)``).
        scale: the through-plane factor (for the nearest-neighbour thick column of the picture).
    """

    def __init__(self, baseline_keys: Sequence[str] = ("linear", "cubic"), scale: int = 2, prefix: str = "val_",
                 json_path: str | None = None, md_path: str | None = None, grid_dir: str | None = None,
                 min_foreground: float = 0.1, foreground_threshold: float = 0.05, title: str = ""):
        self.baseline_keys, self.scale, self.prefix = tuple(baseline_keys), int(scale), prefix
        self.json_path, self.md_path, self.grid_dir = json_path, md_path, grid_dir
        self.min_foreground, self.foreground_threshold, self.title = min_foreground, foreground_threshold, title
        self.psnr, self.ssim = PSNRMetric(max_val=1.0), SSIMMetric(spatial_dims=2, data_range=1.0)
        self.scores: dict[str, list[float]] = defaultdict(list)
        self.pictures: list[dict[str, np.ndarray]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def reset(self, engine: Engine | None = None) -> None:
        self.scores = defaultdict(list)
        self.pictures = []

    def score_volume(self, methods: dict[str, torch.Tensor], label: torch.Tensor) -> dict[str, list[float]]:
        """Per-slice scores ``{"{view}_{method}_{metric}": [...]}`` of ``(C, S, A, B)`` volumes against ``label``."""
        out: dict[str, list[float]] = defaultdict(list)
        label = label.detach().float().cpu()
        for view, dim in VIEWS.items():
            ref = _slices(label, dim)
            fg = (ref > self.foreground_threshold).float().flatten(1).mean(1) >= self.min_foreground
            if not bool(fg.any()):
                continue
            ref = ref[fg]
            for method, vol in methods.items():
                x = _slices(vol.detach().float().cpu().clamp(0, 1), dim)[fg]
                out[f"{view}_{method}_psnr"] += self.psnr(x, ref).flatten().tolist()
                out[f"{view}_{method}_ssim"] += self.ssim(x, ref).flatten().tolist()
        return out

    def iteration_completed(self, engine: Engine) -> None:
        for item in sr_items(engine):
            label = torch.as_tensor(item["label"])
            methods = {"sr": torch.as_tensor(item["pred"])}
            methods.update({k: torch.as_tensor(item[k]) for k in self.baseline_keys if k in item})
            for k, v in self.score_volume(methods, label).items():
                self.scores[k] += v
            if len(self.pictures) < 2:
                self.pictures.append(self._picture(item, methods, label))

    def _picture(self, item: dict, methods: dict[str, torch.Tensor], label: torch.Tensor) -> dict[str, np.ndarray]:
        mid = label.shape[2] // 2  # a reformatted plane (S x B) through the middle of the volume
        pic = {}
        if "image" in item:
            thick = torch.as_tensor(item["image"]).float().cpu()
            pic["thick"] = thick.repeat_interleave(self.scale, dim=1)[0, :, mid].numpy()
        for k in (*self.baseline_keys, "sr"):
            if k in methods:
                pic[k] = methods[k].float().cpu().clamp(0, 1)[0, :, mid].numpy()
        pic["HR"] = label.float().cpu()[0, :, mid].numpy()
        return pic

    def summary(self) -> dict[str, float]:
        out = {f"{self.prefix}{k}": float(np.mean(v)) for k, v in self.scores.items() if v}
        for method in ("sr", *self.baseline_keys):
            for metric in ("psnr", "ssim"):
                vals = [out[f"{self.prefix}{v}_{method}_{metric}"] for v in VIEWS
                        if f"{self.prefix}{v}_{method}_{metric}" in out]
                if vals:
                    out[f"{self.prefix}{method}_{metric}"] = float(np.mean(vals))
        for b in self.baseline_keys:
            for v in (*VIEWS, None):
                tag = f"{v}_" if v else ""
                if f"{self.prefix}{tag}sr_psnr" in out and f"{self.prefix}{tag}{b}_psnr" in out:
                    out[f"{self.prefix}{tag}{b}_gain_db"] = out[f"{self.prefix}{tag}sr_psnr"] - out[f"{self.prefix}{tag}{b}_psnr"]
        return out

    def table(self, summary: dict[str, float]) -> str:
        p = self.prefix
        lines = [f"{self.title}\n" if self.title else "",
                 "| method | " + " | ".join(f"{v} PSNR | {v} SSIM" for v in VIEWS) + " | mean PSNR |",
                 "|---|" + "---|---|" * len(VIEWS) + "---|"]
        for method in (*self.baseline_keys, "sr"):
            cells = []
            for v in VIEWS:
                cells += [f"{summary.get(f'{p}{v}_{method}_psnr', float('nan')):.2f}",
                          f"{summary.get(f'{p}{v}_{method}_ssim', float('nan')):.4f}"]
            name = {"sr": "BiConvLSTM (sr)", "linear": "linear (centre grid)", "cubic": "cubic (centre grid)",
                    "cubic_dc": "cubic+consistency (matched baseline)"}.get(method, method)
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {summary.get(f'{p}{method}_psnr', float('nan')):.2f} |")
        return "\n".join(line for line in lines if line) + "\n"

    def epoch_completed(self, engine: Engine) -> None:
        summary = self.summary()
        engine.state.metrics.update(summary)
        if self.json_path:
            Path(self.json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(self.json_path).write_text(json.dumps(summary, indent=2, sort_keys=True))
        if self.md_path:
            Path(self.md_path).parent.mkdir(parents=True, exist_ok=True)
            Path(self.md_path).write_text(self.table(summary))
        if self.grid_dir and self.pictures:
            self._save_grid(engine.state.epoch)

    def _save_grid(self, epoch: int) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cols = list(self.pictures[0])
        fig, axes = plt.subplots(len(self.pictures), len(cols), figsize=(3 * len(cols), 3 * len(self.pictures)),
                                 squeeze=False)
        for r, pic in enumerate(self.pictures):
            for c, name in enumerate(cols):
                ax = axes[r][c]
                ax.imshow(pic[name], cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
                title = name
                if name not in ("HR", "thick"):
                    mse = float(np.mean((np.clip(pic[name], 0, 1) - pic["HR"]) ** 2))
                    title += f"  {10 * np.log10(1 / max(mse, 1e-12)):.2f} dB"
                ax.set_title(title, fontsize=9)
                ax.axis("off")
        save_epoch_figure(fig, self.grid_dir, "grid", epoch)


class ThroughPlaneSuperResolver:
    """Super-resolve whole thick-slice volumes along their slice axis and write NIfTI + JSON sidecar.

    For each input: load (NIfTI / NRRD / DICOM series, errors name the file), check, normalise (MR: 0.5-99.5
    percentiles of the input; CT: HU window; no clipping, so the round trip keeps the units), move the slice axis
    first, run :class:`ThroughPlaneInferer`, map back to the input's units and dtype, and write
    ``<stem>_<postfix>.nii.gz`` with ``scale`` times as many slices, spacing / ``scale`` along the slice axis and
    the affine :func:`~medsr_monai.transforms.thin_affine` (centre convention: thick slice ``k`` at thin position
    ``k*f + (f-1)/2``), plus ``<stem>_<postfix>.json``.

    Memory bound: the thick input, its interpolation, the output and the blending buffers (together about
    ``2 * scale + 2`` float32 copies of the input) plus the activations of ``sw_batch_size`` windows of
    ``window`` thick slices x ``roi`` in-plane; the number of slices only scales the volumes themselves.

    Args:
        network: through-plane network ``(B, 1, T, A, B) -> (B, 1, T*scale, A, B)``.
        scale: through-plane factor.
        inputs: file, folder or datalist (see :func:`~.inference.resolve_inputs`).
        output_dir: where outputs go (created; must be writable).
        checkpoint: weights (state dict) to load, ``None`` to use the network as it is.
        slice_axis: ``"auto"`` (the coarsest-spacing axis) or 0/1/2.
        window, overlap, roi, sw_batch_size: see :class:`ThroughPlaneInferer`.

    Example::

        runner = ThroughPlaneSuperResolver(net, 4, "thick.nii.gz", "out/", checkpoint="models/model.pt")
        written = runner.run()  # [Path("out/thick_sr.nii.gz")]
    """

    def __init__(self, network: torch.nn.Module, scale: int, inputs: Any, output_dir: str, checkpoint: str | None = None,
                 slice_axis: int | str = "auto", modality: str = "auto", window: int = 16, overlap: float = 0.25,
                 roi: Sequence[int] = (-1, -1), sw_batch_size: int = 1, normalizer_kwargs: dict | None = None,
                 bundle_name: str = "", bundle_version: str = "", device: str | torch.device = "cpu",
                 output_postfix: str = "sr", progress: bool = True):
        self.network, self.scale, self.inputs, self.output_dir = network, int(scale), inputs, output_dir
        self.checkpoint, self.slice_axis, self.modality = checkpoint, slice_axis, modality
        self.inferer = ThroughPlaneInferer(window, overlap, roi, sw_batch_size, progress=progress)  # tqdm over windows
        self.normalizer_kwargs = dict(normalizer_kwargs or {})
        self.bundle_name, self.bundle_version = bundle_name, bundle_version
        self.device, self.output_postfix, self.progress = torch.device(device), output_postfix, progress

    def _axis(self, src: Path, shape: Sequence[int], spacing: Sequence[float]) -> int:
        from medsr_monai.data.slices import slice_axis_from_spacing

        if str(self.slice_axis).lower() == "auto":
            return slice_axis_from_spacing(spacing)
        axis = int(self.slice_axis)
        if axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 'auto', 0, 1 or 2, got {self.slice_axis!r}")
        if shape[axis] < 2:
            raise ValueError(f"{src}: {shape[axis]} slice(s) along slice_axis {axis}; need at least 2")
        return axis

    def run(self) -> list[Path]:
        from medsr_monai.data import load_volume
        from medsr_monai.data.checks import check_array
        from medsr_monai.transforms import ModalityNormalize, denormalize, thin_affine

        items = resolve_inputs(self.inputs)
        out_dir = ensure_writable_dir(self.output_dir)
        ckpt_hash = load_checkpoint(self.network, self.checkpoint)
        self.network.to(self.device).eval()
        written = []
        for item in tqdm(items, desc="super-resolving volumes (through-plane)", disable=not self.progress):
            src = Path(item["image"])
            data, affine_in, meta = load_volume(src)
            check_array(src, data, affine_in)
            data = np.asarray(data)
            data = data.reshape(data.shape[:3])
            spacing = [float(v) for v in np.linalg.norm(np.asarray(affine_in)[:3, :3], axis=0)]
            axis = self._axis(src, data.shape, spacing)
            vol = torch.as_tensor(data.astype(np.float32))[None]
            modality = str(item.get("modality") or self.modality).upper()
            if modality == "AUTO":
                modality = "CT" if float(vol.min()) < -500 else "MR"
            normalizer = ModalityNormalize(modality=modality, clip=False, **self.normalizer_kwargs)
            x = torch.as_tensor(normalizer(vol)).movedim(axis + 1, 1)[None]  # (1, 1, S, A, B), stays on the host
            net = self.network
            memory = self.inferer.memory(x.shape[2:], self.scale, getattr(getattr(net, "net", net), "features", 32),
                                         getattr(getattr(net, "net", net), "hidden_channels", 32))
            if self.progress:
                out_shape = [n * (self.scale if ax == axis else 1) for ax, n in enumerate(data.shape)]
                tqdm.write(f"{src.name}: {list(data.shape)} -> {out_shape} along axis {axis}, host memory "
                           f"~{memory['host_volumes_mib']:.0f} MiB, windows ~{memory['window_activations_mib']:.0f} MiB")
            with torch.no_grad():
                y = self.inferer(x, net)[0].movedim(1, axis + 1).cpu()
            lo, hi = normalizer.last_range
            y = denormalize(y, lo, hi).numpy()[0]
            out = out_dir / f"{volume_stem(src)}_{self.output_postfix}.nii.gz"
            write_output_volume(y, thin_affine(np.asarray(affine_in), self.scale, axis), data.dtype, out, {
                "bundle": self.bundle_name, "bundle_version": self.bundle_version,
                "checkpoint": str(self.checkpoint) if self.checkpoint else None, "checkpoint_sha256": ckpt_hash,
                "scale": self.scale, "zoom": [self.scale if ax == axis else 1 for ax in range(3)],
                "direction": "through-plane", "slice_axis": axis,
                "grid": "center: thick slice k at thin position k*scale + (scale-1)/2",
                "modality": modality, "input": str(src), "input_format": meta.get("format"),
                "input_shape": list(data.shape), "input_spacing_mm": spacing,
                "normalization_range": [float(lo), float(hi)], "window": self.inferer.window,
                "overlap": self.inferer.overlap, "roi": self.inferer.roi, "sw_batch_size": self.inferer.sw_batch_size,
                "memory": memory,
            })
            written.append(out)
        return written
