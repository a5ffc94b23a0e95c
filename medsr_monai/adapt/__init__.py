"""Scan-specific self-supervised adaptation: fine-tune a copy of a bundle's model on the scan it is given.

With a handful of training subjects, the strongest prior a model can get is the scan in front of it. Each task
makes training pairs from the input scan alone with the bundle's own physics (:mod:`.objectives`), a bounded loop
fine-tunes a copy of the model and keeps it only when a held-back part of the scan says it helped
(:mod:`.loop`), and :func:`adapt_scan` records the run in MLflow and runs the bundle's own inference with the
adapted copy (:mod:`.scan`). The bundle's ``models/model.pt`` is never written.

Example::

    from medsr_monai.adapt import adapt_scan
    result = adapt_scan("bundles/edsr", "scan.nii.gz", seconds=180, output_dir="adapted/")
    result.outputs  # [Path("adapted/scan_sr.nii.gz")]
"""

from .loop import (FINETUNE_LEARNING_RATE, FINETUNE_PATIENCE, SCRATCH_LEARNING_RATE, SCRATCH_PATIENCE, AdaptResult,
                   adapt_network, start_settings)
from .objectives import (MAX_IN_PLANE_ADAPT_SCALE, InPlaneSRObjective, Neighbor2NeighborObjective, SSDUObjective,
                         ThroughPlaneObjective, neighbor_subsample, objective_for)
from .scan import ScanAdaptation, adapt_scan, adapt_volume, bundle_network, run_inference

__all__ = [
    "AdaptResult", "FINETUNE_LEARNING_RATE", "FINETUNE_PATIENCE", "SCRATCH_LEARNING_RATE", "SCRATCH_PATIENCE",
    "adapt_network", "start_settings", "InPlaneSRObjective", "Neighbor2NeighborObjective", "SSDUObjective",
    "ThroughPlaneObjective", "MAX_IN_PLANE_ADAPT_SCALE",
    "neighbor_subsample", "objective_for", "ScanAdaptation", "adapt_scan", "adapt_volume", "bundle_network", "run_inference",
]
