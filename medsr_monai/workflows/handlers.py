"""Ignite handlers the SR bundles need beyond MONAI's own.

* :class:`SRMetricsHandler` and :func:`sr_items` live in :mod:`medsr_monai.metrics.handlers` (re-exported here:
  the bundle configs name ``medsr_monai.workflows.SRMetricsHandler``).
* :class:`SRGridHandler` — an LR | baseline | SR | HR picture per validation, for people to look at.
* :class:`ResumeHandler` — MONAI's ``CheckpointLoader`` needs a file that exists; resuming after a kill
  needs "load the newest good checkpoint if the previous run did not finish", and a new run must not overwrite
  an earlier run's weights unasked.
* :class:`StopOnNonFiniteLoss` — Ignite's ``TerminateOnNan`` ends training quietly as if it had
  completed; a NaN loss must fail the run with a message and keep the last good checkpoint.
"""

from __future__ import annotations

import logging
import math
import re
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointLoader

from medsr_monai.metrics.handlers import SRMetricsHandler, save_epoch_figure, sr_items
from medsr_monai.utils import as_bool

__all__ = ["SRMetricsHandler", "SRGridHandler", "ResumeHandler", "StopOnNonFiniteLoss", "save_epoch_figure",
           "sr_items"]

logger = logging.getLogger(__name__)


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _as_list(x: Any) -> list:
    return x if isinstance(x, list) else [x]


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


def _epoch_of(path: Path) -> tuple[int, float]:
    """Sort key of a checkpoint: its epoch from the name (``checkpoint_epoch=3.pt``), then its mtime."""
    m = re.search(r"=(\d+)\.pt$", path.name)
    return (int(m.group(1)) if m else -1, path.stat().st_mtime)


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from (truncated, CRC error), or ``None`` when it is intact.

    ``torch.save`` writes a zip archive: a file cut short by a kill, a full disk or a copy has no central
    directory, and a damaged one fails its CRC check; both are found without unpickling anything.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"truncated or not a torch checkpoint ({e})"
    return f"corrupt member {bad!r} (CRC mismatch)" if bad else None


class KeyMetricRecord:
    """The best-score record of a MONAI key-metric ``CheckpointSaver`` as a ``state_dict`` pair, so that it can
    be saved in and restored from a resumable checkpoint.

    MONAI's saver has ``load_state_dict`` but no ``state_dict``; its record lives in the Ignite ``Checkpoint``
    it builds for the key metric (saving the record *in* ``model.pt`` with ``key_metric_save_state`` would change
    the shipped weight files' contents).
    """

    def __init__(self, saver):
        self.saver = saver

    def state_dict(self) -> dict:
        ckpt = self.saver._key_metric_checkpoint  # private: the only holder of the record
        return ckpt.state_dict() if ckpt is not None else {"_saved": []}

    def load_state_dict(self, state: dict) -> None:
        if self.saver._key_metric_checkpoint is not None:
            self.saver.load_state_dict(state)


class ResumeHandler:
    """Save resumable checkpoints every epoch and resume from the newest good one if the last run was cut off.

    MONAI's ``CheckpointLoader`` needs a file that exists, and a config cannot hand the trainer to its own
    handlers (circular reference); this handler adds the engine it is attached to as ``"trainer"`` to the
    saved/loaded objects, loads the newest intact ``checkpoint_*.pt`` when the previous run there did not
    finish, and saves with MONAI's ``CheckpointSaver``. On completion it writes ``ckpt_dir/COMPLETED``;
    a later run with the same folder then starts fresh (and says so) instead of "resuming" a finished run.
    A run stopped before ``max_epochs`` (``max_train_seconds``, Ctrl-C handled as a stop, a pruner) is not
    completed: it writes ``ckpt_dir/STOPPED`` instead, and the same command resumes it.

    Safety of what is already there:

    * a truncated or corrupt newest checkpoint is named and set aside (``*.pt.corrupt``) and the previous one is
      used (``n_saved=2`` keeps two); with none left the error names the file and says to pass ``--resume false``;
    * a new (not resumed) run refuses to start when ``weights_dir`` already holds weights (``*.pt``): its first
      validation would overwrite them. ``overwrite_weights=True`` allows it;
    * checkpoints a resumed run supersedes are removed once it has saved its own.

    Args:
        ckpt_dir: folder for ``checkpoint_*.pt`` (network, optimizer, scheduler and trainer state).
        objects: what to save and restore besides the trainer, e.g. ``{"network": net, "optimizer": opt}``.
        enabled: resume when possible (False: always start fresh; checkpoints are still saved).
        save_interval: epochs between checkpoints; ``n_saved`` of them are kept.
        weights_dir: the run's ``ckpt_dir`` (where ``model.pt`` goes), protected as above; ``None``: not checked.
        overwrite_weights: let a new run replace the weights in ``weights_dir``.
        best_savers: the validation's key-metric ``CheckpointSaver`` (s) that write the best ``model.pt``, by name:
            their record of the best score so far travels in the checkpoint, so that a resumed run replaces
            ``model.pt`` only with a better epoch (MONAI's saver starts a resumed run with an empty record, and
            its first validation would overwrite the best weights of the killed run with worse ones).

    Example::

        "resume": {"_target_": "medsr_monai.workflows.ResumeHandler", "ckpt_dir": "$@output_dir + '/checkpoints'",
                   "objects": {"network": "@network", "optimizer": "@optimizer"},
                   "best_savers": {"best_checkpoint": "@validate#handlers#best_checkpoint"}}
    """

    def __init__(self, ckpt_dir: str, objects: dict, enabled: bool = True, save_interval: int = 1, n_saved: int = 2,
                 weights_dir: str | None = None, overwrite_weights: bool = False, best_savers: dict | None = None):
        self.ckpt_dir, self.objects = Path(ckpt_dir), dict(objects)
        # (a saver an overlay removed, ``null``, is skipped)
        self.objects.update({f"best_saver_{k}": KeyMetricRecord(s) for k, s in (best_savers or {}).items() if s})
        self.enabled = as_bool(enabled, "resume")  # `--resume false` arrives as the string 'false'
        self.save_interval, self.n_saved = save_interval, max(1, int(n_saved))
        self.weights_dir = Path(weights_dir) if weights_dir else None
        self.overwrite_weights = as_bool(overwrite_weights, "overwrite_weights")
        self.resumed_from: Path | None = None
        self._saver_attached = False
        self.set_aside: list[tuple[Path, str]] = []  # (corrupt checkpoint, why)

    def latest(self) -> Path | None:
        """The newest intact checkpoint of an unfinished run (corrupt ones are set aside, with a warning)."""
        if not self.ckpt_dir.is_dir() or (self.ckpt_dir / "COMPLETED").exists():
            return None
        for ckpt in sorted(self.ckpt_dir.glob("checkpoint_*.pt"), key=_epoch_of, reverse=True):
            problem = checkpoint_problem(ckpt)
            if problem is None:
                return ckpt
            aside = ckpt.with_name(ckpt.name + ".corrupt")
            try:
                ckpt.replace(aside)  # kept for inspection, out of the saver's and the next run's way
            except FileNotFoundError:  # another rank of this run set it aside first
                pass
            self.set_aside.append((ckpt, problem))
            logger.warning("checkpoint %s is %s; set aside as %s, falling back to the previous one", ckpt, problem,
                           aside.name)
        if self.set_aside:
            bad, problem = self.set_aside[0]
            raise RuntimeError(f"{bad}: checkpoint is {problem}, and no earlier intact checkpoint is in "
                               f"{self.ckpt_dir}; pass --resume false to start the run over")
        return None

    def _check_weights(self) -> None:
        if self.weights_dir is None or self.overwrite_weights or not self.weights_dir.is_dir():
            return
        existing = sorted(p.name for p in self.weights_dir.glob("*.pt"))
        if existing:
            raise FileExistsError(
                f"{self.weights_dir / existing[0]}: weights of an earlier run are in {self.weights_dir} "
                f"({', '.join(existing)}), and this new run would overwrite them at its first validation. "
                "Pass --ckpt_dir <another folder>, or --overwrite_weights true to replace them"
                + ("" if self.enabled else ", or --resume true to continue a run that was stopped"))

    def attach(self, engine: Engine) -> None:
        objects = {**self.objects, "trainer": engine}
        marker = self.ckpt_dir / "COMPLETED"
        ckpt = self.latest() if self.enabled else None
        if ckpt is not None:
            logger.warning("resuming from %s", ckpt)
            saved = torch.load(str(ckpt), map_location="cpu", weights_only=True).keys()
            for name in [k for k in objects if k.startswith("best_saver_") and k not in saved]:
                # a checkpoint written before the record was saved: that saver starts with an empty record
                logger.warning("%s holds no %s record: the best-score record restarts with this run", ckpt, name)
                objects.pop(name)
            CheckpointLoader(load_path=str(ckpt), load_dict=objects, map_location="cpu").attach(engine)
            self.resumed_from = ckpt
        else:
            self._check_weights()  # before anything is removed or written
        if ckpt is None and self.ckpt_dir.is_dir():
            if marker.exists():
                logger.warning("previous run in %s completed; starting a new run", self.ckpt_dir)
            marker.unlink(missing_ok=True)
            (self.ckpt_dir / "STOPPED").unlink(missing_ok=True)
            for old in self.ckpt_dir.glob("checkpoint_*.pt"):
                old.unlink()
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            import ignite.distributed as idist

            # ignite's Checkpoint (built below on rank 0 only) sets up ignite's distributed context on first use,
            # which creates a process group: a collective call. Do it on every rank now, or rank 0 waits forever.
            idist.sync()
        if _rank() == 0:  # under DistributedDataParallel every rank resumes, only rank 0 writes
            # attached when the run starts, i.e. after every handler of the config: each epoch's checkpoint is then
            # written after that epoch's validation and holds its best-score record
            engine.add_event_handler(Events.STARTED, self._attach_saver, objects)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def _attach_saver(self, engine: Engine, objects: dict) -> None:
        from monai.handlers import CheckpointSaver

        if self._saver_attached:  # a second run() of the same engine
            return
        self._saver_attached = True
        saver = CheckpointSaver(save_dir=str(self.ckpt_dir), save_dict=objects, save_interval=self.save_interval,
                                n_saved=self.n_saved, epoch_level=True)
        # MONAI writes checkpoints in place (atomic=False, for group-readable files): a kill during the write
        # would leave a truncated newest checkpoint that the next run cannot resume from; write to a temporary
        # file in the same folder and rename it instead, then make it group/other-readable like MONAI's
        saver._interval_checkpoint.save_handler = _AtomicDiskSaver(str(self.ckpt_dir))
        saver.attach(engine)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._prune)  # after the saver (attached first)

    def _prune(self, engine: Engine) -> None:
        """Keep the newest ``n_saved`` checkpoints: the saver only rotates its own, so the ones a resumed run
        started from (written by the killed process) would otherwise stay forever."""
        ckpts = sorted(self.ckpt_dir.glob("checkpoint_*.pt"), key=_epoch_of, reverse=True)
        for old in ckpts[self.n_saved:]:
            old.unlink(missing_ok=True)

    def completed(self, engine: Engine) -> None:
        if _rank() != 0:
            return
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        max_epochs = engine.state.max_epochs
        if engine.should_terminate and max_epochs is not None and engine.state.epoch < max_epochs:
            # stopped early (time limit, pruner, stop request): not a finished run, so that the same command
            # resumes it from the last checkpoint instead of starting over and overwriting its weights
            why = getattr(engine.state, "stop_reason", None) or "terminated"
            (self.ckpt_dir / "STOPPED").write_text(f"epoch {engine.state.epoch} of {max_epochs}: {why}\n")
            logger.warning("training stopped at epoch %d of %d (%s); run the same command again to continue it",
                           engine.state.epoch, max_epochs, why)
            return
        (self.ckpt_dir / "STOPPED").unlink(missing_ok=True)
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


class TrainTimeLimit:
    """Stop training after ``seconds`` of wall time of this process (what Ignite's ``TimeLimit`` does, attached
    like every MONAI handler). The engine ends after the iteration that crosses the limit and the MLflow run closes
    as at the end of ``max_epochs``, but the run is not *completed*: ``engine.state.stop_reason`` says why, and
    :class:`ResumeHandler` marks it ``STOPPED`` so that the same command resumes it (from the last checkpoint)
    rather than starting over; ``None`` or 0 disables it.

    Args:
        seconds: the wall-time budget of this process.
        clock: seconds counter (``time.monotonic``; tests pass their own).

    Example:
        >>> TrainTimeLimit(None).seconds is None
        True
    """

    def __init__(self, seconds: float | None, clock=time.monotonic) -> None:
        self.seconds = float(seconds) if seconds else None
        self.clock = clock
        self._start: float | None = None

    def attach(self, engine) -> None:
        if self.seconds:
            engine.add_event_handler(Events.STARTED, self._started)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._check)

    def _started(self, engine) -> None:
        self._start = self.clock()

    def _check(self, engine) -> None:
        if self._start is not None and self.clock() - self._start > self.seconds:
            engine.state.stop_reason = f"max_train_seconds={self.seconds:g} reached"
            logger.warning("max_train_seconds=%g reached at epoch %d, iteration %d: stopping", self.seconds,
                           engine.state.epoch, engine.state.iteration)
            engine.terminate()
