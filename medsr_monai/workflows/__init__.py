"""Training, evaluation and inference pieces the bundle configs point at."""

from .gan import (
    AuxiliaryPrediction,
    CycleGANTrainer,
    CycleGridHandler,
    ImagePool,
    LatestWeights,
    SRGANCheckpoints,
    SRGANTrainer,
    UnpairedDataset,
    load_weights,
    loss_terms,
    save_weights,
)
from .handlers import ResumeHandler, SRGridHandler, SRMetricsHandler, StopOnNonFiniteLoss, sr_items
from .inference import VolumeSuperResolver, ensure_writable_dir, resolve_inputs, sr_affine
from .training import (
    DISCRIMINATORS,
    OPTIMIZERS,
    SCHEDULES,
    LossProgressBar,
    check_training_config,
    count_parameters,
    make_discriminator,
    make_optimizer,
    make_scheduler,
    unknown_direction,
)

__all__ = [
    "AuxiliaryPrediction", "CycleGANTrainer", "CycleGridHandler", "ImagePool", "LatestWeights", "SRGANCheckpoints",
    "SRGANTrainer", "UnpairedDataset", "load_weights", "loss_terms", "save_weights",
    "ResumeHandler", "SRGridHandler", "SRMetricsHandler", "StopOnNonFiniteLoss", "sr_items",
    "VolumeSuperResolver", "ensure_writable_dir", "resolve_inputs", "sr_affine",
    "DISCRIMINATORS", "OPTIMIZERS", "SCHEDULES", "LossProgressBar", "check_training_config", "count_parameters",
    "make_discriminator", "make_optimizer", "make_scheduler", "unknown_direction",
]
