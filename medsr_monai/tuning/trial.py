"""One Optuna trial = one run of the bundle's own ``configs/train.json`` with overrides, through MONAI's
:class:`~monai.bundle.ConfigWorkflow` (the same parser and workflow ``python -m monai.bundle run`` uses)."""

from __future__ import annotations

import functools
import gc
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from medsr_monai.tuning.reporter import OptunaReporter
from medsr_monai.tuning.space import Objective, SearchSpace, SpaceError

__all__ = ["TrialSetup", "BatchDoesNotFit", "TrialInterrupted", "StopRequest", "run_trial", "bundle_parser", "as_override", "error_chain", "is_out_of_memory"]


class BatchDoesNotFit(optuna.TrialPruned):
    """The sampled batch size does not fit the data or the memory: the trial is pruned with this reason."""


class TrialInterrupted(Exception):
    """The user asked the study to stop (Ctrl-C) while this trial ran; it is recorded FAIL and the study stops."""


class StopRequest:
    """Ctrl-C handling for a study: the first SIGINT asks the running trainer to stop after its current iteration
    (``Engine.terminate()``), so the bundle closes its MLflow run and checkpoint normally and the trial is recorded;
    a second SIGINT interrupts at once.

    Raising ``KeyboardInterrupt`` at an arbitrary point is not enough: code inside transforms and I/O libraries
    catches it and re-raises unrelated errors (seen: ``ValueError: Invalid affine transformation matrix``).
    """

    def __init__(self) -> None:
        self.requested = False
        self.trainer = None
        self._previous = None

    def __enter__(self) -> StopRequest:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        import signal
        import sys

        self.requested = True
        print("\nCtrl-C: stopping after the current iteration and recording the trial (Ctrl-C again to abort)",
              file=sys.stderr, flush=True)
        if self.trainer is not None:
            self.trainer.terminate()
        signal.signal(signal.SIGINT, signal.default_int_handler)


@dataclass
class TrialSetup:
    """What every trial of a study shares.

    Args:
        bundle: the bundle folder (``configs/train.json`` inside).
        config: the training config's name in ``configs/`` (``train``; e.g. ``train_ct_denoise`` for a bundle
            whose tasks have their own configs).
        space: the search space.
        objective: what the trial returns (maximised).
        fixed: overrides applied to every trial (budget, data), config ids -> values.
        output_root: trial folders are ``<output_root>/trial_<n>`` (checkpoints, grids, executed config).
        experiment_name: MLflow experiment of the trial runs.
        tracker: a :class:`~medsr_monai.tuning.tracking.StudyTracker` (parent run and nested trial runs) or ``None``.
    """

    bundle: Path
    space: SearchSpace
    objective: Objective
    fixed: dict[str, Any]
    output_root: Path
    experiment_name: str
    tracker: Any = None
    fatal: list[BaseException] = field(default_factory=list)
    stop: StopRequest = field(default_factory=StopRequest)
    config: str = "train"

    @property
    def train_json(self) -> Path:
        return self.bundle / "configs" / f"{self.config}.json"

    @functools.cached_property
    def config_keys(self) -> set[str]:
        """Top-level ids of the bundle's training config (read once per study, not per trial)."""
        return set(bundle_parser(self.bundle, config=self.config).get().keys())


def as_override(value: Any) -> Any:
    """A value as a config override. Strings holding a path become expressions (``$'/a/b'``): MONAI turns a plain
    path string into a broken expression in the saved config (MONAI builds a string expression from a plain path)."""
    if isinstance(value, str) and "/" in value and not value.startswith(("$", "@", "%")):
        return "$" + repr(value)
    return value


def bundle_parser(bundle: Path, overrides: dict[str, Any] | None = None, config: str = "train"):
    """The bundle's training config (``configs/<config>.json``) in a :class:`~monai.bundle.ConfigParser` with
    ``bundle_root`` and overrides set."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / f"{config}.json"))
    parser["bundle_root"] = str(bundle)
    for k, v in (overrides or {}).items():
        parser[k] = v
    return parser


def error_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception it was raised from (MONAI wraps errors raised inside config expressions)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_out_of_memory(exc: BaseException) -> BaseException | None:
    import torch

    for e in error_chain(exc):
        if isinstance(e, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
            return e
        text = str(e).lower()
        if isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text):
            return e
    return None


def _root_message(exc: BaseException) -> str:
    """The innermost error's type and message (the one that names the real problem), plus the outer one."""
    chain = list(error_chain(exc))
    inner, outer = chain[-1], chain[0]
    msg = f"{type(inner).__name__}: {inner}"
    if inner is not outer:
        msg += f" (raised as {type(outer).__name__})"
    return msg[:2000]


def _check_batch_fits_data(parser, params: dict[str, Any]) -> None:
    """Prune a batch larger than the training set: the loader would silently give smaller batches than sampled."""
    try:
        loader = parser.get_parsed_content("train#dataloader")
        n, per_step = len(loader.dataset), int(loader.batch_size or 1)
    except (KeyError, TypeError, AttributeError):  # a bundle without a sized map-style loader: nothing to check
        return
    if per_step > n:
        raise BatchDoesNotFit(
            f"batch_size={params.get('batch_size', '?')} does not fit the data: the training loader takes {per_step} "
            f"items per step but the training set has {n}"
        )


def _train(setup: TrialSetup, trial: optuna.Trial, overrides: dict[str, Any], params: dict[str, Any]) -> OptunaReporter:
    from monai.bundle import ConfigWorkflow

    meta = setup.bundle / "configs" / "metadata.json"
    workflow = ConfigWorkflow(config_file=str(setup.train_json), meta_file=str(meta) if meta.is_file() else None,
                              logging_file=False, workflow_type="train", bundle_root=str(setup.bundle), **overrides)
    workflow.initialize()
    try:
        parser = workflow.parser
        _check_batch_fits_data(parser, params)
        trainer = parser.get_parsed_content("train#trainer")
        evaluator = parser.get_parsed_content("validate#evaluator")
        reporter = OptunaReporter(trial, setup.objective, trainer)
        reporter.attach(evaluator)
        setup.stop.trainer = trainer
        if not setup.stop.requested:
            workflow.run()
    finally:
        setup.stop.trainer = None
        workflow.finalize()
        del workflow
    return reporter


def run_trial(trial: optuna.Trial, setup: TrialSetup) -> float:
    """Sample the trial's parameters, train the bundle with them, return the objective at the last validation.

    Pruned (``TrialPruned``): the pruner stopped it, or the batch does not fit the data or the memory. Failed (any
    other exception, re-raised for Optuna to record): a bad config value, a non-finite loss, a missing metric. The
    nested MLflow run is ended in every case, with ``optuna.trial_state`` and the reason as tags.
    """
    import socket

    params = setup.space.sample(trial)
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    folder = setup.output_root / f"trial_{trial.number:04d}"
    run_id, run_name = (setup.tracker.start_trial_run(trial.number, params) if setup.tracker
                        else (None, f"trial-{trial.number}"))
    if run_id:
        trial.set_user_attr("mlflow_run_id", run_id)
    overrides = {k: as_override(v) for k, v in setup.fixed.items()}
    overrides.update(params)
    overrides.update({"output_dir": as_override(str(folder)), "ckpt_dir": as_override(str(folder / "models")),
                      "run_name": run_name, "experiment_name": setup.experiment_name})
    if "resume" in setup.config_keys:
        overrides["resume"] = False  # a trial never continues another trial's checkpoint
    if "validate_at_start" in setup.config_keys and "validate_at_start" not in setup.fixed:
        # the pre-training validation scores the physics floor, the same for every trial: it tells the study
        # nothing, costs a validation per trial, and would be reported to Optuna as a step 0
        overrides["validate_at_start"] = False
    if "log_model" not in setup.fixed:
        # a trial's weights are a search step, not a model to serve: no MLflow pyfunc model per trial (the best
        # trial's override file trains the model that is logged); `--set log_model=true` turns it back on
        overrides["log_model"] = False
    state, reason, reporter = "FAIL", "", None
    try:
        reporter = _train(setup, trial, overrides, params)
        if setup.stop.requested:
            raise TrialInterrupted(f"interrupted by the user (Ctrl-C) after {len(reporter.history)} validation(s)")
        if reporter.pruned:
            raise optuna.TrialPruned(reporter.reason)
        if reporter.last is None:
            raise SpaceError("the trial finished without a validation (val_interval > max_epochs?): nothing to report")
        state = "COMPLETE"
        return reporter.last
    except optuna.TrialPruned as e:
        state, reason = "PRUNED", str(e)
        raise
    except (KeyboardInterrupt, TrialInterrupted) as e:
        state, reason = "KILLED", str(e) or "interrupted (Ctrl-C / SIGTERM)"
        raise
    except Exception as e:  # noqa: BLE001 - every failure is recorded, then re-raised for Optuna
        oom = is_out_of_memory(e)
        if oom is not None:
            state = "PRUNED"
            reason = (f"out of memory with batch_size={params.get('batch_size', '?')} (does not fit memory): "
                      f"{type(oom).__name__}: {str(oom)[:300]}")
            _free_accelerator_memory()
            raise BatchDoesNotFit(reason) from e
        reason = _root_message(e)
        if any(isinstance(x, SpaceError) for x in error_chain(e)):
            setup.fatal.append(e)  # a wrong objective fails every trial alike: stop the study
        raise
    finally:
        trial.set_user_attr("folder", str(folder))
        if reason:
            trial.set_user_attr("prune_reason" if state == "PRUNED" else "error", reason)
        if setup.tracker and run_id:
            history = reporter.history if reporter else []
            setup.tracker.end_trial_run(run_id, state, reason, history)
        gc.collect()


def _free_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
