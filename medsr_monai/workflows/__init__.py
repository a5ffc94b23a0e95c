"""Training, evaluation and inference pieces the bundle configs point at."""

from .gan import (
    AuxiliaryPrediction,
    CycleGANTrainer,
    CycleGridHandler,
    ImagePool,
    BestWeights,
    LatestWeights,
    SRGANCheckpoints,
    SRGANTrainer,
    UnpairedDataset,
    load_weights,
    loss_terms,
    save_weights,
)
from medsr_monai.metrics import SRMetricsHandler, ThroughPlaneMetricsHandler, sr_items  # configs name them here
from .handlers import ResumeHandler, SRGridHandler, StopOnNonFiniteLoss, TrainTimeLimit
from .lock import FolderLockedError, lock_run_folders, release_run_folders
from .inference import (
    SliceStrategy, VolumeRunner, VolumeSuperResolver, ensure_writable_dir, memory_estimate, resolve_inputs, sr_affine,
)
from .training import (
    DISCRIMINATORS,
    OPTIMIZERS,
    SCHEDULES,
    RANK0_ONLY_HANDLERS,
    LossProgressBar,
    ValidateAtStart,
    check_training_config,
    count_parameters,
    make_discriminator,
    make_optimizer,
    make_scheduler,
    handler_list,
    process_rank,
    rank_handlers,
    unknown_direction,
)
from .restoration import (
    RESTORATION_TASKS, best_gaussian_sigma, check_task, restoration_channels, restoration_physics, task_file, unknown_loss,
)
from .through_plane import (
    ThroughPlaneInferer, ThroughPlaneStrategy, ThroughPlaneSuperResolver, repeat_items, volume_items,
)

__all__ = [
    "restoration_channels", "restoration_physics",
    "RANK0_ONLY_HANDLERS", "ValidateAtStart", "handler_list", "process_rank", "rank_handlers",
    "AuxiliaryPrediction", "BestWeights", "CycleGANTrainer", "CycleGridHandler", "ImagePool", "LatestWeights", "SRGANCheckpoints",
    "SRGANTrainer", "UnpairedDataset", "load_weights", "loss_terms", "save_weights",
    "FolderLockedError", "lock_run_folders", "release_run_folders",
    "ResumeHandler", "SRGridHandler", "SRMetricsHandler", "StopOnNonFiniteLoss", "TrainTimeLimit", "sr_items",
    "SliceStrategy", "VolumeRunner", "VolumeSuperResolver", "ensure_writable_dir", "memory_estimate", "resolve_inputs",
    "sr_affine",
    "DISCRIMINATORS", "OPTIMIZERS", "SCHEDULES", "LossProgressBar", "check_training_config", "count_parameters",
    "make_discriminator", "make_optimizer", "make_scheduler", "unknown_direction",
    "RESTORATION_TASKS", "best_gaussian_sigma", "check_task", "task_file", "unknown_loss",
    "ThroughPlaneInferer", "ThroughPlaneMetricsHandler", "ThroughPlaneStrategy", "ThroughPlaneSuperResolver",
    "repeat_items", "volume_items",
]
