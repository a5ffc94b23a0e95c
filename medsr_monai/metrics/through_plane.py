"""Through-plane SR metrics: the model and its baselines on native and reformatted slices of whole volumes.

Volumes are ``(C, S, A, B)`` with the slice axis ``S`` first (see :class:`~medsr_monai.transforms.MoveSliceAxisd`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine

from .handlers import SliceMetrics, save_epoch_figure, sr_items

__all__ = ["ThroughPlaneMetricsHandler", "VIEWS"]

#: views of a ``(C, S, A, B)`` volume: ``native`` = the acquired slices (planes across S), ``reformat_a`` /
#: ``reformat_b`` = planes containing the slice axis (e.g. coronal / sagittal of an axial scan)
VIEWS = {"native": 1, "reformat_a": 2, "reformat_b": 3}

_NAMES = {"sr": "BiConvLSTM (sr)", "linear": "linear (centre grid)", "cubic": "cubic (centre grid)",
          "cubic_dc": "cubic+consistency (matched baseline)"}


def _slices(vol: torch.Tensor, dim: int) -> torch.Tensor:
    """2D slices of a ``(C, S, A, B)`` volume across spatial dim ``dim`` (1..3) as a batch ``(N, C, h, w)``."""
    return vol.movedim(dim, 0)


class ThroughPlaneMetricsHandler(SliceMetrics):
    """PSNR / SSIM of the model and the interpolation baselines on native and reformatted slices of whole volumes.

    Protocol (see :mod:`medsr_monai.metrics.handlers`): intensities normalised to [0, 1] (MR: 0.5-99.5
    percentiles of the HR volume); a 2D slice is scored when >= ``min_foreground`` of its reference voxels exceed
    ``foreground_threshold``; averages over the scored slices of each view. ``native`` = the slices across the
    slice axis (half of them at thick-slice centres for even factors, all interpolated), ``reformat_a`` /
    ``reformat_b`` = the two planes containing the slice axis, where through-plane blur shows.

    Results go into ``engine.state.metrics`` as ``{prefix}{view}_{method}_{psnr|ssim}``, ``{prefix}{method}_psnr``
    (mean over the three views), ``{prefix}{view}_{baseline}_gain_db``; ``json_path`` / ``md_path`` get the table,
    ``csv_path`` the per-slice rows and ``grid_dir`` a picture of a reformatted slice (thick input | baselines |
    SR | HR).

    Args:
        baseline_keys: batch keys of the baselines (HR-sized, ``(C, S, A, B)``).
        scale: the through-plane factor (for the nearest-neighbour thick column of the picture).
    """

    def __init__(self, baseline_keys: Sequence[str] = ("linear", "cubic"), scale: int = 2, prefix: str = "val_",
                 json_path: str | None = None, md_path: str | None = None, grid_dir: str | None = None,
                 min_foreground: float = 0.1, foreground_threshold: float = 0.05, title: str = "",
                 csv_path: str | None = None, sharpness: bool = False):
        super().__init__(prefix, csv_path, json_path, sharpness, spatial_dims=2)
        self.baseline_keys, self.scale = tuple(baseline_keys), int(scale)
        self.md_path, self.grid_dir = md_path, grid_dir
        self.min_foreground, self.foreground_threshold, self.title = min_foreground, foreground_threshold, title
        self.pictures: list[dict[str, np.ndarray]] = []

    def reset(self, engine: Engine | None = None) -> None:
        super().reset(engine)
        self.pictures = []

    def score_volume(self, methods: dict[str, torch.Tensor], label: torch.Tensor, subject: str = ""
                     ) -> list[dict]:
        """Per-slice rows ``{subject, view, slice_index, method, psnr, ssim}`` of ``(C, S, A, B)`` volumes against
        ``label`` (foreground slices of each view)."""
        rows = []
        label = label.detach().float().cpu()
        for view, dim in VIEWS.items():
            ref = _slices(label, dim)
            fg = (ref > self.foreground_threshold).float().flatten(1).mean(1) >= self.min_foreground
            if not bool(fg.any()):
                continue
            ref, index = ref[fg], torch.nonzero(fg).flatten().tolist()
            for method, vol in methods.items():
                scores = self.score(_slices(vol.detach().float().cpu(), dim)[fg], ref)
                rows += [{"subject": subject, "view": view, "slice_index": i, "method": method,
                          **{k: v[n] for k, v in scores.items()}} for n, i in enumerate(index)]
        return rows

    def iteration_completed(self, engine: Engine) -> None:
        for item in sr_items(engine):
            label = torch.as_tensor(item["label"])
            methods = {"sr": torch.as_tensor(item["pred"])}
            methods.update({k: torch.as_tensor(item[k]) for k in self.baseline_keys if k in item})
            self.records += self.score_volume(methods, label, str(item.get("subject", "")))
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
        out, p = self.means(("view", "method")), self.prefix
        for method in ("sr", *self.baseline_keys):
            for metric in ("psnr", "ssim"):
                vals = [out[f"{p}{v}_{method}_{metric}"] for v in VIEWS if f"{p}{v}_{method}_{metric}" in out]
                if vals:
                    out[f"{p}{method}_{metric}"] = float(np.mean(vals))
        for b in self.baseline_keys:
            for v in (*VIEWS, None):
                tag = f"{v}_" if v else ""
                if f"{p}{tag}sr_psnr" in out and f"{p}{tag}{b}_psnr" in out:
                    out[f"{p}{tag}{b}_gain_db"] = out[f"{p}{tag}sr_psnr"] - out[f"{p}{tag}{b}_psnr"]
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
            lines.append(f"| {_NAMES.get(method, method)} | " + " | ".join(cells)
                         + f" | {summary.get(f'{p}{method}_psnr', float('nan')):.2f} |")
        return "\n".join(line for line in lines if line) + "\n"

    def report(self, summary: dict[str, float], engine: Engine) -> None:
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
