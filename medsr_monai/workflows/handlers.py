"""Ignite handlers the SR bundles need beyond MONAI's own.

* :class:`SRMetricsHandler` — MONAI's metric handlers see only ``engine.state.output`` and average
  over everything; SR evaluation must also score the interpolation baselines carried in the batch
  (``bicubic``, ``zerofill``) on the *same* slices and report each modality separately.
* :class:`SRGridHandler` — an LR | baseline | SR | HR picture per validation, for people to look at.
* :class:`ResumeHandler` — MONAI's ``CheckpointLoader`` needs a file that exists; resuming after a kill
  needs "load the newest checkpoint if the previous run did not finish".
* :class:`StopOnNonFiniteLoss` — Ignite's ``TerminateOnNan`` ends training quietly as if it had
  completed; a NaN loss must fail the run with a message and keep the last good checkpoint.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointLoader
from monai.metrics import PSNRMetric, SSIMMetric

from medsr_monai.utils import as_bool

__all__ = ["SRMetricsHandler", "SRGridHandler", "ResumeHandler", "StopOnNonFiniteLoss", "sr_items"]

logger = logging.getLogger(__name__)


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


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
    items = []
    for b, o in zip(_as_list(batch), _as_list(output)):
        items.append({**b, **o})
    return items


class SRMetricsHandler:
    """PSNR and SSIM of the prediction and of each baseline, per slice, per modality and overall.

    Metric protocol: images are compared on the normalised [0, 1] intensity scale (CT: HU window,
    MR: volume percentiles), ``data_range=1``, over the whole slice (no border crop), predictions
    and baselines clipped to [0, 1]; slices were selected for >= 10 % foreground upstream. SSIM is
    MONAI's (11x11 Gaussian window, sigma 1.5, K1=0.01, K2=0.03). Averages are over slices.

    Results go into ``engine.state.metrics`` as ``{prefix}{method}_{psnr|ssim}`` and
    ``{prefix}{group}_{method}_{psnr|ssim}`` (``method`` is ``sr`` for the model), plus
    ``{prefix}balanced_{psnr|ssim}`` (the mean over groups of each group's mean, so that every modality
    counts equally in checkpoint selection), ``{prefix}{baseline}_gain_db`` and ``{prefix}{group}_{baseline}_gain_db``: the mean per-slice PSNR
    gain of the model over the baseline, on the slices that have that baseline (``zerofill`` exists for
    MR only); per-slice rows are kept in ``engine.state.sr_records`` and optionally written to
    ``csv_path`` / ``json_path``.

    Args:
        baseline_keys: batch keys holding baseline reconstructions at HR size (absent keys are skipped).
        group_key: batch key to group by (e.g. ``modality``).
        pred_key, label_key: output keys of the prediction and the HR reference.
        prefix: prefix of the metric names (``val_`` in training, ``test_`` in evaluation).
        csv_path, json_path: where to write per-slice rows and the summary at epoch end.
        sharpness: also score :func:`~medsr_monai.metrics.gmsd` (lower is better) and
            :func:`~medsr_monai.metrics.sharpness_ratio` (1 = as sharp as the reference), for methods that
            trade PSNR for texture (SRGAN, CycleGAN).
    """

    def __init__(self, baseline_keys=("bicubic", "zerofill"), group_key: str = "modality", pred_key: str = "pred",
                 label_key: str = "label", prefix: str = "val_", csv_path: str | None = None,
                 json_path: str | None = None, spatial_dims: int = 2, sharpness: bool = False):
        self.baseline_keys = tuple(baseline_keys)
        self.group_key, self.pred_key, self.label_key, self.prefix = group_key, pred_key, label_key, prefix
        self.csv_path, self.json_path = csv_path, json_path
        self.sharpness = sharpness
        self.psnr = PSNRMetric(max_val=1.0)
        self.ssim = SSIMMetric(spatial_dims=spatial_dims, data_range=1.0)
        self.records: list[dict[str, Any]] = []
        self._paired: list[tuple[str, dict[str, float]]] = []  # (group, {method: psnr}) per scored item

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def reset(self, engine: Engine | None = None) -> None:
        self.records = []
        self._paired = []

    def _score(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        x = x.detach().float().clamp(0, 1)[None]
        y = y.detach().float()[None]
        scores = {"psnr": float(self.psnr(x, y).mean()), "ssim": float(self.ssim(x, y).mean())}
        if self.sharpness:
            from medsr_monai.metrics import gmsd, sharpness_ratio

            scores["gmsd"] = float(gmsd(x, y).mean())
            scores["sharpness"] = float(sharpness_ratio(x, y).mean())
        return scores

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
                scores = self._score(torch.as_tensor(img), label)
                psnrs[method] = scores["psnr"]
                self.records.append({**base, "method": method, **scores})
            self._paired.append((base["group"], psnrs))

    def summary(self) -> dict[str, float]:
        acc: dict[str, list[float]] = defaultdict(list)
        for r in self.records:
            for metric in ("psnr", "ssim", "gmsd", "sharpness"):
                if metric not in r:
                    continue
                acc[f"{r['method']}_{metric}"].append(r[metric])
                acc[f"{r['group']}_{r['method']}_{metric}"].append(r[metric])
        out = {f"{self.prefix}{k}": float(np.mean(v)) for k, v in acc.items()}
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


class SRGridHandler:
    """Save a PNG grid LR | baseline | SR | HR of ``num_images`` items of each evaluation (round-robin over
    modalities, first items of each).

    Args:
        output_dir: folder for ``grid_epoch{N:04d}.png`` (N: the engine's epoch, which MONAI's
            ``ValidationHandler`` sets to the trainer's epoch) and ``grid_latest.png``.
        num_images: rows in the grid.
        baseline_key: batch key of the baseline column, or a list of keys (one column each).
        image_key: batch key of the LR input (shown with nearest-neighbour enlargement).
    """

    def __init__(self, output_dir: str, num_images: int = 4, baseline_key: str | list[str] = "bicubic",
                 image_key: str = "image",
                 pred_key: str = "pred", label_key: str = "label"):
        self.output_dir = Path(output_dir)
        self.num_images, self.image_key = num_images, image_key
        # one baseline column or several (e.g. bicubic and the pixel-loss SRResNet beside SRGAN)
        self.baseline_keys = [baseline_key] if isinstance(baseline_key, str) else list(baseline_key)
        self.pred_key, self.label_key = pred_key, label_key
        self.by_group: dict[str, list[dict[str, Any]]] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.by_group.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def collect(self, engine: Engine) -> None:
        for item in sr_items(engine):
            group = self.by_group.setdefault(str(item.get("modality", "")), [])
            if len(group) >= self.num_images:
                continue
            row = {"title": f"{item.get('subject', '')} {item.get('modality', '')} #{item.get('slice_index', '')}"}
            for name, key in (("LR", self.image_key), *((k, k) for k in self.baseline_keys), ("SR", self.pred_key),
                              ("HR", self.label_key)):
                if key in item:
                    row[name] = np.asarray(torch.as_tensor(item[key]).detach().float().cpu())[0]
            group.append(row)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """Up to ``num_images`` rows, taken round-robin from each modality so that every one is shown."""
        rows: list[dict[str, Any]] = []
        queues = [list(g) for g in self.by_group.values()]
        while len(rows) < self.num_images and any(queues):
            for q in queues:
                if q and len(rows) < self.num_images:
                    rows.append(q.pop(0))
        return rows

    def save(self, engine: Engine) -> Path | None:
        rows = self.rows
        if not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cols = [c for c in ("LR", *self.baseline_keys, "SR", "HR") if c in rows[0]]
        fig, axes = plt.subplots(len(rows), len(cols), figsize=(3 * len(cols), 3 * len(rows)), squeeze=False)
        for r, row in enumerate(rows):
            hr = row.get("HR")
            for c, name in enumerate(cols):
                ax = axes[r][c]
                ax.imshow(row[name], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                title = name
                if hr is not None and name not in ("HR", "LR") and row[name].shape == hr.shape:
                    mse = float(np.mean((np.clip(row[name], 0, 1) - hr) ** 2))
                    title += f"  {10 * math.log10(1 / max(mse, 1e-12)):.2f} dB"
                ax.set_title(title, fontsize=9)
                ax.axis("off")
            axes[r][0].text(0, -0.1, row["title"], transform=axes[r][0].transAxes, fontsize=8, va="top")
        return save_epoch_figure(fig, self.output_dir, "grid", engine.state.epoch)


class _AtomicDiskSaver(DiskSaver):
    """Ignite's atomic ``DiskSaver`` (temporary file, then rename) with the usual 0644 file mode."""

    def __init__(self, dirname: str) -> None:
        super().__init__(dirname=dirname, require_empty=False, atomic=True)

    def __call__(self, checkpoint, filename: str, metadata=None) -> None:
        super().__call__(checkpoint, filename, metadata)
        path = Path(self.dirname) / filename
        if path.exists():
            path.chmod(0o644)


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


class ResumeHandler:
    """Save resumable checkpoints every epoch and resume from the newest one if the last run was cut off.

    MONAI's ``CheckpointLoader`` needs a file that exists, and a config cannot hand the trainer to its own
    handlers (circular reference); this handler adds the engine it is attached to as ``"trainer"`` to the
    saved/loaded objects, loads the newest ``checkpoint_*.pt`` when the previous run there did not
    finish, and saves with MONAI's ``CheckpointSaver``. On completion it writes ``ckpt_dir/COMPLETED``;
    a later run with the same folder then starts fresh (and says so) instead of "resuming" a finished run.

    Args:
        ckpt_dir: folder for ``checkpoint_*.pt`` (network, optimizer, scheduler and trainer state).
        objects: what to save and restore besides the trainer, e.g. ``{"network": net, "optimizer": opt}``.
        enabled: resume when possible (False: always start fresh; checkpoints are still saved).
        save_interval: epochs between checkpoints; ``n_saved`` of them are kept.
    """

    def __init__(self, ckpt_dir: str, objects: dict, enabled: bool = True, save_interval: int = 1, n_saved: int = 1):
        self.ckpt_dir, self.objects = Path(ckpt_dir), dict(objects)
        self.enabled = as_bool(enabled, "resume")  # `--resume false` arrives as the string 'false'
        self.save_interval, self.n_saved = save_interval, n_saved
        self.resumed_from: Path | None = None

    def latest(self) -> Path | None:
        if not self.ckpt_dir.is_dir() or (self.ckpt_dir / "COMPLETED").exists():
            return None
        ckpts = sorted(self.ckpt_dir.glob("checkpoint_*.pt"), key=lambda p: p.stat().st_mtime)
        return ckpts[-1] if ckpts else None

    def attach(self, engine: Engine) -> None:
        from monai.handlers import CheckpointSaver

        objects = {**self.objects, "trainer": engine}
        marker = self.ckpt_dir / "COMPLETED"
        ckpt = self.latest() if self.enabled else None
        if ckpt is not None:
            logger.warning("resuming from %s", ckpt)
            CheckpointLoader(load_path=str(ckpt), load_dict=objects, map_location="cpu").attach(engine)
            self.resumed_from = ckpt
        elif self.ckpt_dir.is_dir():
            if marker.exists():
                logger.warning("previous run in %s completed; starting a new run", self.ckpt_dir)
            marker.unlink(missing_ok=True)
            for old in self.ckpt_dir.glob("checkpoint_*.pt"):
                old.unlink()
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            import ignite.distributed as idist

            # ignite's Checkpoint (built below on rank 0 only) sets up ignite's distributed context on first use,
            # which creates a process group: a collective call. Do it on every rank now, or rank 0 waits forever.
            idist.sync()
        if _rank() == 0:  # under DistributedDataParallel every rank resumes, only rank 0 writes
            saver = CheckpointSaver(save_dir=str(self.ckpt_dir), save_dict=objects, save_interval=self.save_interval,
                                    n_saved=self.n_saved, epoch_level=True)
            # MONAI writes checkpoints in place (atomic=False, for group-readable files): a kill during the write
            # would leave a truncated newest checkpoint that the next run cannot resume from; write to a temporary
            # file in the same folder and rename it instead, then make it group/other-readable like MONAI's
            saver._interval_checkpoint.save_handler = _AtomicDiskSaver(str(self.ckpt_dir))
            saver.attach(engine)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def completed(self, engine: Engine) -> None:
        if _rank() != 0:
            return
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        (self.ckpt_dir / "COMPLETED").write_text(f"epoch {engine.state.epoch}\n")


class StopOnNonFiniteLoss:
    """Fail the run with a clear error as soon as the training loss is NaN or Inf.

    Args:
        output_transform: maps ``engine.state.output`` to the loss (default: ``output[0]["loss"]``), or to a
            dict of loss terms (GAN workflows), each of which is checked.
        ckpt_dir: named in the message, where the last good checkpoint is.
    """

    def __init__(self, output_transform=None, ckpt_dir: str | None = None):
        self.output_transform = output_transform
        self.ckpt_dir = ckpt_dir

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        out = engine.state.output
        loss = self.output_transform(out) if self.output_transform else _as_list(out)[0]["loss"]
        # GAN workflows return every loss term; the first non-finite one is named
        terms = loss if isinstance(loss, dict) else {"loss": loss}
        bad = [(k, float(v)) for k, v in terms.items() if not math.isfinite(float(v))]
        if bad:
            name, value = bad[0]
            what = f"training loss term {name!r}" if isinstance(loss, dict) else "training loss"
            where = ""
            if self.ckpt_dir:
                saved = sorted(Path(self.ckpt_dir).glob("checkpoint_*.pt"), key=lambda p: p.stat().st_mtime)
                where = f"; the last good checkpoint is {saved[-1]}" if saved else "; no checkpoint was saved before it"
            raise FloatingPointError(
                f"{what} became {value} at epoch {engine.state.epoch}, iteration {engine.state.iteration}"
                f"{where}. Lower learning_rate, or check the data for NaN/Inf."
            )
