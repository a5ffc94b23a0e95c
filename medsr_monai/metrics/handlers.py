"""Ignite handlers that score a model and its baselines slice by slice.

MONAI's metric handlers see only ``engine.state.output`` and average over everything; SR evaluation must also
score the baselines carried in the batch (``bicubic``, the matched ``baseline``, ``zerofill``, ...) on the *same*
slices, and report each modality (in-plane) or each view (through-plane) separately. :class:`SliceMetrics` is
the shared core (events, scores, per-slice rows, CSV and JSON); :class:`SRMetricsHandler` (2D slices) and
:class:`~medsr_monai.metrics.through_plane.ThroughPlaneMetricsHandler` (native and reformatted slices of volumes)
say what a row is and how rows are summarised.

Protocol: images are compared on the normalised [0, 1] intensity scale, ``data_range=1``, over the whole slice
(no border crop), predictions and baselines clipped to [0, 1]. PSNR and SSIM are MONAI's (SSIM: 11x11 Gaussian
window, sigma 1.5, K1=0.01, K2=0.03); optional :func:`~medsr_monai.metrics.gmsd` and
:func:`~medsr_monai.metrics.sharpness_ratio`. Averages are over slices.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.metrics import PSNRMetric, SSIMMetric

from .sharpness import gmsd, sharpness_ratio

__all__ = ["SliceMetrics", "SRMetricsHandler", "save_epoch_figure", "sr_items"]

METRICS = ("psnr", "ssim", "gmsd", "sharpness")


def _as_list(x: Any) -> list:
    return x if isinstance(x, list) else [x]


def sr_items(engine: Engine) -> list[dict[str, Any]]:
    """Per-item dicts joining ``engine.state.batch`` (metadata, baselines) and ``output`` (pred, label).

    Works whether or not the engine decollated its batch and output.
    """
    batch, output = engine.state.batch, engine.state.output
    if isinstance(output, dict):  # not decollated: split along the batch dim
        n = len(output["pred"])
        output = [{k: v[i] for k, v in output.items() if isinstance(v, torch.Tensor)} for i in range(n)]
    if isinstance(batch, dict):
        n = len(output)
        batch = [{k: (v[i] if isinstance(v, (list, tuple, torch.Tensor)) and len(v) == n else v)
                  for k, v in batch.items()} for i in range(n)]
    return [{**b, **o} for b, o in zip(_as_list(batch), _as_list(output))]


def save_epoch_figure(fig, output_dir: str | Path, prefix: str, epoch: int) -> Path:
    """Save a matplotlib figure as ``{prefix}_epoch{NNNN}.png`` and ``{prefix}_latest.png``; close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"{prefix}_epoch{epoch:04d}.png"
    fig.savefig(path, dpi=80)
    fig.savefig(output_dir / f"{prefix}_latest.png", dpi=80)
    plt.close(fig)
    return path


class SliceMetrics:
    """Shared core of the SR metric handlers: Ignite events, per-slice scores, rows, CSV and JSON.

    Subclasses turn each item of ``sr_items(engine)`` into rows with :meth:`score` (``self.records``: one dict
    per slice and method, e.g. ``{subject, slice_index, group, method, psnr, ssim}``) and summarise them in
    :meth:`summary`, usually with :meth:`means`. At epoch end the summary goes into ``engine.state.metrics``,
    the rows into ``engine.state.sr_records`` and ``csv_path``, the summary into ``json_path``.

    Args:
        prefix: prefix of the metric names (``val_`` in training, ``test_`` in evaluation).
        csv_path, json_path: where to write per-slice rows and the summary at epoch end.
        sharpness: also score GMSD (lower is better) and the sharpness ratio (1 = as sharp as the reference).
        spatial_dims: of the slices (SSIM window).
    """

    def __init__(self, prefix: str = "val_", csv_path: str | None = None, json_path: str | None = None,
                 sharpness: bool = False, spatial_dims: int = 2):
        self.prefix, self.csv_path, self.json_path, self.sharpness = prefix, csv_path, json_path, sharpness
        self.psnr = PSNRMetric(max_val=1.0)
        self.ssim = SSIMMetric(spatial_dims=spatial_dims, data_range=1.0)
        self.records: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def reset(self, engine: Engine | None = None) -> None:
        self.records = []

    def iteration_completed(self, engine: Engine) -> None:
        raise NotImplementedError

    def summary(self) -> dict[str, float]:
        raise NotImplementedError

    def score(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, list[float]]:
        """Per-slice scores of a batch ``x`` (clipped to [0, 1]) against ``y``, both ``(N, C, *spatial)``."""
        x = x.detach().float().clamp(0, 1)
        y = y.detach().float().to(x.device)  # on a GPU the prediction is there and the baselines may not be
        scores = {"psnr": self.psnr(x, y).flatten().tolist(), "ssim": self.ssim(x, y).flatten().tolist()}
        if self.sharpness:
            scores["gmsd"] = gmsd(x, y).flatten().tolist()
            scores["sharpness"] = sharpness_ratio(x, y).flatten().tolist()
        return scores

    def means(self, *by: Sequence[str]) -> dict[str, float]:
        """``{prefix}{row[f1]}_{row[f2]}.._{metric}``: the mean over rows, for each field tuple in ``by``."""
        acc: dict[str, list[float]] = defaultdict(list)
        for r in self.records:
            for metric in METRICS:
                if metric in r:
                    for fields in by:
                        acc["_".join(str(r[f]) for f in fields) + f"_{metric}"].append(r[metric])
        return {f"{self.prefix}{k}": float(np.mean(v)) for k, v in acc.items()}

    def epoch_completed(self, engine: Engine) -> None:
        summary = self.summary()
        engine.state.metrics.update(summary)
        engine.state.sr_records = list(self.records)
        if self.csv_path and self.records:
            Path(self.csv_path).parent.mkdir(parents=True, exist_ok=True)
            with open(self.csv_path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(self.records[0]))
                writer.writeheader()
                writer.writerows(self.records)
        if self.json_path:
            Path(self.json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(self.json_path).write_text(json.dumps(summary, indent=2, sort_keys=True))
        self.report(summary, engine)

    def report(self, summary: dict[str, float], engine: Engine) -> None:
        """Further outputs at epoch end (tables, pictures); nothing by default."""


class SRMetricsHandler(SliceMetrics):
    """PSNR and SSIM (and optionally GMSD / sharpness) of the prediction and of each baseline, per 2D slice,
    per modality and overall; slices were selected for >= 10 % foreground upstream.

    Results go into ``engine.state.metrics`` as ``{prefix}{method}_{metric}`` and
    ``{prefix}{group}_{method}_{metric}`` (``method`` is ``sr`` for the model), plus
    ``{prefix}balanced_{psnr|ssim}`` (the mean over groups of each group's mean, so that every modality
    counts equally in checkpoint selection), ``{prefix}{baseline}_gain_db`` and ``{prefix}{group}_{baseline}_gain_db``:
    the mean per-slice PSNR gain of the model over the baseline, on the slices that have that baseline
    (``zerofill`` exists for MR only); per-slice rows (``subject, slice_index, group, method, psnr, ssim``) are kept
    in ``engine.state.sr_records`` and optionally written to ``csv_path`` / ``json_path``.

    Args:
        baseline_keys: batch keys holding baseline reconstructions at HR size (absent keys are skipped).
        group_key: batch key to group by (e.g. ``modality``).
        pred_key, label_key: output keys of the prediction and the HR reference.
        prefix, csv_path, json_path, spatial_dims, sharpness: see :class:`SliceMetrics`; ``sharpness`` is for
            methods that trade PSNR for texture (SRGAN, CycleGAN).
    """

    def __init__(self, baseline_keys=("bicubic", "zerofill"), group_key: str = "modality", pred_key: str = "pred",
                 label_key: str = "label", prefix: str = "val_", csv_path: str | None = None,
                 json_path: str | None = None, spatial_dims: int = 2, sharpness: bool = False):
        super().__init__(prefix, csv_path, json_path, sharpness, spatial_dims)
        self.baseline_keys = tuple(baseline_keys)
        self.group_key, self.pred_key, self.label_key = group_key, pred_key, label_key
        self._paired: list[tuple[str, dict[str, float]]] = []  # (group, {method: psnr}) per scored item

    def reset(self, engine: Engine | None = None) -> None:
        super().reset(engine)
        self._paired = []

    def iteration_completed(self, engine: Engine) -> None:
        for item in sr_items(engine):
            label = torch.as_tensor(item[self.label_key])
            base = {
                "subject": str(item.get("subject", "")),
                "slice_index": int(item["slice_index"]) if "slice_index" in item else -1,
                "group": str(item.get(self.group_key, "all")),
            }
            sources = {"sr": item.get(self.pred_key)}
            sources.update({k: item[k] for k in self.baseline_keys if k in item})
            psnrs: dict[str, float] = {}
            for method, img in sources.items():
                if img is None:
                    continue
                scores = {k: v[0] for k, v in self.score(torch.as_tensor(img)[None], label[None]).items()}
                psnrs[method] = scores["psnr"]
                self.records.append({**base, "method": method, **scores})
            self._paired.append((base["group"], psnrs))

    def summary(self) -> dict[str, float]:
        out = self.means(("method",), ("group", "method"))
        # modality-balanced score for checkpoint selection: each group (modality) counts equally, however
        # many slices it has (e.g. 24 MR slices vs 2 CT slices in the sample validation split)
        groups = sorted({r["group"] for r in self.records})
        for metric in ("psnr", "ssim"):
            means = [out[f"{self.prefix}{g}_sr_{metric}"] for g in groups if f"{self.prefix}{g}_sr_{metric}" in out]
            if means:
                out[f"{self.prefix}balanced_{metric}"] = float(np.mean(means))
        # gains are paired per slice: a baseline present on some slices only (zerofill: MR) is compared with the
        # model on those slices, not with the model's mean over every slice
        for k in self.baseline_keys:
            gains: dict[str, list[float]] = defaultdict(list)
            for group, psnrs in self._paired:
                if "sr" in psnrs and k in psnrs:
                    gains[""].append(psnrs["sr"] - psnrs[k])
                    gains[f"{group}_"].append(psnrs["sr"] - psnrs[k])
            for g, v in gains.items():
                out[f"{self.prefix}{g}{k}_gain_db"] = float(np.mean(v))
        return out
