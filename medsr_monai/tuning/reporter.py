"""Report each validation to Optuna and stop weak trials early."""

from __future__ import annotations

import math
from typing import Any

from ignite.engine import Engine, Events

from medsr_monai.tuning.space import Objective

__all__ = ["OptunaReporter"]


class OptunaReporter:
    """Ignite handler on the bundle's validation evaluator: after every validation it computes the objective from
    ``evaluator.state.metrics``, reports it to the Optuna trial at step = training epoch, and asks the pruner.

    Written here rather than using ``optuna_integration.PyTorchIgnitePruningHandler`` because that handler (1) reads
    one metric, where the objective may be a weighted sum, and (2) raises ``TrialPruned`` inside the evaluator, which
    unwinds through the bundle's own exception handlers (the MLflow handler then records the run as FAILED and
    MONAI re-wraps the error). This one calls ``trainer.terminate()`` instead: the bundle finishes its epoch, saves
    its checkpoint and closes its MLflow run normally, and the caller raises ``TrialPruned`` afterwards.

    Args:
        trial: the ``optuna.Trial``.
        objective: what to maximise.
        trainer: the training engine to stop when the trial is pruned.

    Example::

        reporter = OptunaReporter(trial, Objective.parse("val_psnr"), trainer)
        reporter.attach(evaluator)
        trainer.run()
        if reporter.pruned:
            raise optuna.TrialPruned(reporter.reason)
    """

    def __init__(self, trial: Any, objective: Objective, trainer: Engine):
        self.trial = trial
        self.objective = objective
        self.trainer = trainer
        self.history: list[tuple[int, float]] = []
        self.pruned = False
        self.reason = ""

    def attach(self, evaluator: Engine) -> None:
        evaluator.add_event_handler(Events.COMPLETED, self)

    @property
    def last(self) -> float | None:
        return self.history[-1][1] if self.history else None

    def __call__(self, evaluator: Engine) -> None:
        step = int(self.trainer.state.epoch)
        value = self.objective.value(evaluator.state.metrics)
        self.history.append((step, value))
        if not math.isfinite(value):
            self.pruned, self.reason = True, f"objective {self.objective} is {value} at epoch {step}"
            self.trainer.terminate()
            return
        self.trial.report(value, step)
        if self.trial.should_prune():
            self.pruned = True
            self.reason = f"pruned at epoch {step}: {self.objective} = {value:.4f} is below the pruner's threshold"
            self.trainer.terminate()
