"""The bounded adaptation loop: a time budget, a progress bar, early stopping, and no harm by construction.

A few hundred steps on one scan do not need an engine with handlers, data loaders and checkpoints; Ignite's
``Engine`` would add an epoch notion the loop does not have (it runs against the clock). The loop validates on
the kept-back slices before it starts and every ``val_every`` steps, keeps the best weights, stops when
validation has not improved for ``patience`` checks, and restores the original weights when the best validation
is not better than the starting one: adaptation can only keep a model its own scan says is better.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

__all__ = ["AdaptResult", "FINETUNE_LEARNING_RATE", "FINETUNE_PATIENCE", "SCRATCH_LEARNING_RATE", "SCRATCH_PATIENCE",
           "adapt_network", "start_settings"]


@dataclass
class AdaptResult:
    """What one adaptation did.

    ``kept`` is True when the adapted weights are in the network, False when the original ones were restored
    (validation did not improve by at least ``min_improvement``).
    """

    steps: int
    seconds: float
    val_before: float
    val_best: float
    best_step: int
    kept: bool
    stopped: str
    bf16_autocast: bool = False
    train_losses: list[float] = field(default_factory=list)
    val_history: list[tuple[int, float]] = field(default_factory=list)

    @property
    def val_after(self) -> float:
        return self.val_best if self.kept else self.val_before

    def summary(self) -> dict[str, Any]:
        return {"steps": self.steps, "seconds": round(self.seconds, 1), "val_before": self.val_before,
                "val_after": self.val_after, "val_best": self.val_best, "best_step": self.best_step,
                "kept": self.kept, "stopped": self.stopped, "bf16_autocast": self.bf16_autocast,
                "train_loss_first": self.train_losses[0] if self.train_losses else None,
                "train_loss_last": self.train_losses[-1] if self.train_losses else None}


#: validations without improvement before an adaptation from the shipped weights stops
FINETUNE_PATIENCE = 5
#: validations without improvement before a from-scratch adaptation stops: a fresh model starts at the physics
#: baseline and its first hundred steps often leave the kept-back loss flat (EDSR on brain2 and the LSTM stopped
#: after 5 checks of 20 steps, at the baseline, in the issue-15 benchmark), so it gets three times the fine-tuning
#: patience; a fine-tuned model that does not improve within 5 checks is usually already at its best
SCRATCH_PATIENCE = 15
#: Adam's step size from the shipped weights (10x below the bundles' training rates) and from scratch
FINETUNE_LEARNING_RATE = 1e-4
SCRATCH_LEARNING_RATE = 1e-3


def start_settings(objective, from_scratch: bool) -> tuple[float, int]:
    """``(learning_rate, patience)`` for an adaptation of ``objective`` from the shipped weights or from scratch.

    An objective may set its own fine-tuning values (``finetune_learning_rate``, ``finetune_patience``) where they
    were measured to differ (:class:`~medsr_monai.adapt.objectives.ThroughPlaneObjective`); from scratch is the same
    for every task.
    """
    if from_scratch:
        return SCRATCH_LEARNING_RATE, SCRATCH_PATIENCE
    return (float(getattr(objective, "finetune_learning_rate", FINETUNE_LEARNING_RATE)),
            int(getattr(objective, "finetune_patience", FINETUNE_PATIENCE)))


def _freeze_norm_statistics(network: torch.nn.Module) -> None:
    """Keep batch-norm layers in eval mode while the rest trains: their running statistics stay those of the
    bundle's training data. Adaptation batches are a few small patches of one scan, at a coarser scale than the
    scan itself, and statistics updated from them are wrong for the whole-slice inference that follows (SRGAN's
    SRResNet generator, the one bundle network with batch norm, lost 1.0 dB on MR against its shipped weights and
    collapsed from scratch on cerr_lung4 before this)."""
    for m in network.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def adapt_network(network: torch.nn.Module, objective, seconds: float = 180.0, max_steps: int | None = None,
                  learning_rate: float = FINETUNE_LEARNING_RATE, val_every: int = 20,
                  patience: int = FINETUNE_PATIENCE, min_improvement: float = 1e-3, seed: int = 0,
                  progress: bool = True, bf16: bool | None = None) -> AdaptResult:
    """Fine-tune ``network`` in place on ``objective`` for at most ``seconds`` (and ``max_steps``).

    Args:
        network: the model (its weights are replaced by the best adapted ones, or left as they were).
        objective: gives ``loss(network, generator)`` and ``validation_loss(network)``
            (see :mod:`medsr_monai.adapt.objectives`).
        seconds: wall-clock budget for the training steps (validation included).
        max_steps: optional step cap (e.g. for tests).
        learning_rate: Adam's step size (a fine-tuning rate: 10x below the bundles' training rates).
        val_every: steps between validations on the kept-back slices.
        patience: validations without improvement before stopping early.
        min_improvement: relative improvement of the validation loss the adapted weights must reach to be kept.
        seed: seeds the pair sampling (the same scan, seed and step count give the same weights on CPU).
        progress: show a progress bar (seconds of the budget, with the current losses).
        bf16: run the training steps' forward pass in bfloat16 autocast (more steps in the same budget); the
            validation that decides what is kept stays float32. ``None``: the objective's ``bf16_autocast``
            (default off; on where it was measured to help).

    Example::

        result = adapt_network(model, InPlaneSRObjective(volume, model.physics, "MR", [2]), seconds=60)
        result.kept, result.val_before, result.val_after
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout etc. inside the model, if any
    bf16 = bool(getattr(objective, "bf16_autocast", False)) if bf16 is None else bool(bf16)
    device_type = next(network.parameters()).device.type
    was_training = network.training
    network.eval()
    val_before = objective.validation_loss(network)
    original = copy.deepcopy(network.state_dict())
    best_state, best_val, best_step = original, val_before, 0
    optimizer = torch.optim.Adam([p for p in network.parameters() if p.requires_grad], lr=learning_rate)
    losses: list[float] = []
    history = [(0, val_before)]
    t0, step, stale, stopped = time.monotonic(), 0, 0, "time budget"
    bar = tqdm(total=round(seconds), unit="s", desc="adapting", disable=not progress,
               bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s [{postfix}]")
    try:
        while True:
            elapsed = time.monotonic() - t0
            if elapsed >= seconds:
                break
            if max_steps is not None and step >= max_steps:
                stopped = "step limit"
                break
            network.train()
            _freeze_norm_statistics(network)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
                loss = objective.loss(network, g).float()
            if not torch.isfinite(loss):
                stopped = f"non-finite loss at step {step + 1}"
                break
            loss.backward()
            optimizer.step()
            step += 1
            losses.append(float(loss.detach()))
            if step % val_every == 0 or (max_steps is not None and step == max_steps):
                network.eval()
                val = objective.validation_loss(network)
                history.append((step, val))
                if val < best_val:
                    best_state, best_val, best_step, stale = copy.deepcopy(network.state_dict()), val, step, 0
                else:
                    stale += 1
                if stale >= patience:
                    stopped = f"no validation improvement in {patience} checks"
                    break
            bar.n = min(round(time.monotonic() - t0), round(seconds))
            bar.set_postfix_str(f"step {step}, loss {losses[-1]:.4g}, val {best_val:.4g} (start {val_before:.4g})",
                                refresh=False)
            bar.refresh()
    finally:
        bar.close()
    kept = best_val < val_before * (1.0 - min_improvement)
    network.load_state_dict(best_state if kept else original)
    network.train(was_training)
    return AdaptResult(steps=step, seconds=time.monotonic() - t0, val_before=val_before, val_best=best_val,
                       best_step=best_step, kept=kept, stopped=stopped, bf16_autocast=bf16, train_losses=losses,
                       val_history=history)
