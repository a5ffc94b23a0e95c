"""Small factories and checks the bundle configs call, so that a config value (a string a user or
Optuna sets on the command line) selects the optimizer and schedule, and bad values fail early with a
message that names the setting."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar

__all__ = ["OPTIMIZERS", "SCHEDULES", "DISCRIMINATORS", "make_discriminator", "unknown_direction", "make_optimizer", "make_scheduler", "check_training_config", "LossProgressBar",
           "count_parameters"]

OPTIMIZERS = ("Adam", "AdamW", "RMSprop", "SGD")
SCHEDULES = ("none", "cosine", "step", "exponential", "linear_decay")


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0,
                   momentum: float = 0.9, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """Build ``torch.optim.<name>``: ``Adam``, ``AdamW``, ``RMSprop`` or ``SGD`` (with momentum).

    Example:
        >>> opt = make_optimizer("SGD", [torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        >>> type(opt).__name__, opt.defaults["momentum"]
        ('SGD', 0.9)
    """
    key = {n.lower(): n for n in OPTIMIZERS}.get(str(name).lower())
    if key is None:
        raise ValueError(f"optimizer={name!r} is not supported; choose one of {OPTIMIZERS}")
    if lr <= 0:
        raise ValueError(f"learning_rate must be > 0, got {lr}")
    if key in ("Adam", "AdamW"):
        return getattr(torch.optim, key)(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas))
    return getattr(torch.optim, key)(params, lr=lr, weight_decay=weight_decay, momentum=momentum)


def make_scheduler(name: str, optimizer: torch.optim.Optimizer, max_epochs: int, step_size: int | None = None,
                   gamma: float = 0.5, decay_start: int | None = None) -> torch.optim.lr_scheduler.LRScheduler:
    """Epoch-level learning-rate schedule: ``none`` (constant), ``cosine`` (to 1 % of the start over
    ``max_epochs``), ``step`` (times ``gamma`` every ``step_size`` epochs, default max_epochs // 2;
    the EDSR paper halves the rate at fixed intervals), ``exponential`` (times ``gamma`` per epoch) or
    ``linear_decay`` (CycleGAN: constant for ``decay_start`` epochs, default max_epochs // 2, then linearly
    towards zero at ``max_epochs``).

    Example:
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> sched = make_scheduler("linear_decay", opt, max_epochs=4)
        >>> [round(sched.get_last_lr()[0], 2) for _ in range(4) if sched.step() is None]
        [1.0, 0.67, 0.33, 0.0]
    """
    key = str(name).lower()
    if key == "linear_decay":
        start = max_epochs // 2 if decay_start is None else int(decay_start)
        n_decay = max(1, max_epochs - start)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda e: 1.0 - max(0, e + 1 - start) / (n_decay + 1) if e + 1 > start else 1.0)
    if key == "none":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    if key == "cosine":
        base = optimizer.param_groups[0]["lr"]
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, max_epochs), eta_min=0.01 * base)
    if key == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size or max(1, max_epochs // 2), gamma=gamma)
    if key == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma)
    raise ValueError(f"lr_schedule={name!r} is not supported; choose one of {SCHEDULES}")


DISCRIMINATORS = ("vgg", "patch")


def make_discriminator(kind: str, spatial_dims: int = 2, in_channels: int = 1, features: int = 64,
                       norm: str = "batch") -> torch.nn.Module:
    """The adversarial bundles' discriminator by name: ``vgg`` (the SRGAN classifier,
    :class:`~medsr_monai.networks.SRGANDiscriminator`) or ``patch`` (70x70 PatchGAN,
    :class:`~medsr_monai.networks.PatchGANDiscriminator`)."""
    from medsr_monai.networks import PatchGANDiscriminator, SRGANDiscriminator

    key = str(kind).lower()
    if key == "vgg":
        return SRGANDiscriminator(spatial_dims=spatial_dims, in_channels=in_channels, features=features, norm=norm)
    if key == "patch":
        return PatchGANDiscriminator(spatial_dims=spatial_dims, in_channels=in_channels, channels=features,
                                     norm=norm.upper())
    raise ValueError(f"discriminator={kind!r} is not supported; choose one of {DISCRIMINATORS}")


def unknown_direction(direction: str) -> bool:
    """Raise for a translation direction other than ``AB`` / ``BA`` (called from inference configs)."""
    raise ValueError(f"direction={direction!r}: use 'AB' (domain A -> B, model.pt) or 'BA' (B -> A, model_BA.pt)")


def check_training_config(scale: int, patch_size: int, batch_size: int, max_epochs: int, patches_per_slice: int = 1,
                          allowed_scales: tuple[int, ...] = (2, 3, 4), **_: Any) -> bool:
    """Reject values that would fail later with an obscure message (called from ``initialize``).

    ``batch_size`` counts HR patches per optimizer step; each slice drawn gives ``patches_per_slice`` of them,
    so the data loader takes ``batch_size // patches_per_slice`` slices per step.
    """
    if int(scale) not in allowed_scales:
        raise ValueError(f"scale={scale}: supported in-plane factors are {', '.join(map(str, allowed_scales))}")
    if patch_size % scale:
        raise ValueError(
            f"patch_size={patch_size} is not divisible by scale={scale}: the HR patch must hold a whole number "
            f"of LR pixels; use e.g. patch_size={patch_size - patch_size % scale}"
        )
    if patches_per_slice < 1 or batch_size % patches_per_slice:
        raise ValueError(
            f"batch_size={batch_size} (patches per step) must be a multiple of patches_per_slice={patches_per_slice}"
        )
    if batch_size < 1 or max_epochs < 1:
        raise ValueError(f"batch_size ({batch_size}) and max_epochs ({max_epochs}) must be >= 1")
    return True


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class LossProgressBar(ProgressBar):
    """Ignite's tqdm ``ProgressBar`` showing the training loss; MONAI's handler lists call ``attach(engine)``
    with the engine only, so the loss transform is bound here."""

    def __init__(self, loss_key: str = "loss", **kwargs: Any):
        kwargs.setdefault("persist", False)
        super().__init__(**kwargs)
        self.loss_key = loss_key

    def attach(self, engine: Engine, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        key = self.loss_key

        def _loss(output: Any) -> dict[str, float]:
            out = output[0] if isinstance(output, list) else output
            return {key: float(out[key])}

        super().attach(engine, output_transform=_loss)


#: handlers that only the rank-0 process of a DDP run attaches (logging, progress, tracking); chosen by type
#: name, so adding a handler to a bundle never shifts which ones are dropped. Validation handlers stay on every
#: rank: Ignite's metrics synchronise across ranks, so a validation run on rank 0 alone would wait forever.
RANK0_ONLY_HANDLERS = ("StatsHandler", "LossProgressBar", "MLflowRunHandler", "MLFlowHandler",
                       "TensorBoardStatsHandler")


def handler_list(handlers: Mapping[str, Any] | Iterable[Any] | None) -> list[Any]:
    """The handlers to attach, in order, from a config's handler entry.

    Bundle configs keep their handlers in a dict keyed by name (``train#handlers#mlflow``), so an overlay
    or a command line changes, adds (``"train#handlers#my_handler": {...}``) or removes
    (``"train#handlers#grids": null``) one by name, never by position. Ignite engines take a list: this
    gives the dict's values in order, without the removed (``None``) ones. A list is passed through.

    Example:
        >>> handler_list({"stats": "S", "grids": None, "mlflow": "M"})
        ['S', 'M']
    """
    if handlers is None:
        return []
    values = handlers.values() if isinstance(handlers, Mapping) else handlers
    return [h for h in values if h is not None]


def process_rank() -> int:
    """This process's DDP rank (0 when ``torch.distributed`` is not initialised)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def rank_handlers(handlers: Mapping[str, Any] | Iterable[Any], rank: int | None = None) -> list[Any]:
    """The handlers a DDP process attaches: all of them on rank 0, the others without the rank-0-only ones
    (:data:`RANK0_ONLY_HANDLERS`, or any handler with ``rank0_only = True``), chosen by type, never by position.

    Args:
        handlers: a config's handler dict (see :func:`handler_list`) or a list.
        rank: the process rank (default: from ``torch.distributed``, 0 when not initialised).

    Example:
        >>> class StatsHandler: pass
        >>> len(rank_handlers({"stats": StatsHandler(), "other": object()}, rank=1))
        1
    """
    handlers = handler_list(handlers)
    if rank is None:
        from medsr_monai import workflows  # looked up at call time, so a test can stand in for the process rank

        rank = workflows.process_rank()
    if rank == 0:
        return handlers
    return [h for h in handlers
            if type(h).__name__ not in RANK0_ONLY_HANDLERS and not getattr(h, "rank0_only", False)]


class ValidateAtStart:
    """Run the validator once before the first training iteration.

    Models built on a physics start exactly at the physics baseline, so this first validation scores the floor and
    the best-checkpoint saver stores it: the selected checkpoint is then never worse (on validation) than the
    classical inverse. Put it at the end of ``train#handlers`` so the tracking handlers have opened their run before
    the evaluator logs into it.

    Runs only when training starts from epoch 0: a resumed run validated its floor when it first started.

    Args:
        validator: the evaluator (``@validate#evaluator``).
        enabled: switch it off (e.g. ``medsr tune`` trials, where the floor is the same for every trial).
    """

    def __init__(self, validator: Any, enabled: bool = True) -> None:
        from medsr_monai.utils import as_bool

        self.validator, self.enabled = validator, as_bool(enabled, "validate_at_start")  # CLI strings too

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        # a resumed run (the resume handler restored epoch > 0 at STARTED) validated its floor in its first start
        if engine.state.epoch == 0:
            self.validator.run(engine.state.epoch)
