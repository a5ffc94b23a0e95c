"""Training, evaluation and inference pieces the bundle configs point at."""

from .handlers import ResumeHandler, SRGridHandler, SRMetricsHandler, StopOnNonFiniteLoss, sr_items
from .inference import VolumeSuperResolver, ensure_writable_dir, resolve_inputs, sr_affine
from .training import (
    OPTIMIZERS, SCHEDULES, LossProgressBar, check_training_config, count_parameters, make_optimizer, make_scheduler,
)

__all__ = [
    "ResumeHandler", "SRGridHandler", "SRMetricsHandler", "StopOnNonFiniteLoss", "sr_items", "VolumeSuperResolver",
    "ensure_writable_dir", "resolve_inputs", "sr_affine", "OPTIMIZERS", "SCHEDULES", "LossProgressBar",
    "check_training_config", "count_parameters", "make_optimizer", "make_scheduler",
]
