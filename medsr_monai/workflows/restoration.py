"""Small helpers of the same-size restoration bundle (``bundles/unet``): task names and the Gaussian baseline's
sigma, chosen on validation data (never on the test patient) so that the classical baseline is a fair one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["RESTORATION_TASKS", "check_task", "best_gaussian_sigma", "restoration_channels", "restoration_physics",
           "task_file", "unknown_loss"]

#: task -> (modality, output postfix of inference)
RESTORATION_TASKS = {"mri_recon": ("MR", "recon"), "ct_denoise": ("CT", "denoised")}


def check_task(task: str, config_task: str | None = None) -> bool:
    """Raise a ``ValueError`` naming the choices for an unknown ``task`` (called from ``initialize``).

    Each task has its own config (``train.json`` reconstructs MRI, ``train_ct_denoise.json`` denoises CT); with
    ``config_task`` given, a ``--task`` override that asks one config for the other task is refused, naming
    the config to use.
    """
    if task not in RESTORATION_TASKS:
        raise ValueError(f"task={task!r} is not supported; choose one of {tuple(RESTORATION_TASKS)}")
    if config_task is not None and task != config_task:
        wanted = "train.json" if task == "mri_recon" else f"train_{task}.json"
        raise ValueError(f"task={task!r}: this config is the {config_task!r} task's; each task has its own config, "
                         f"use configs/{wanted} (with evaluate.json / inference{wanted[5:]} as usual)")
    return True


def unknown_loss(name: str):
    """Raise for a ``loss_type`` other than ``mse`` / ``l1`` (called from the train config)."""
    raise ValueError(f"loss_type={name!r} is not supported; choose 'mse' (optimises PSNR) or 'l1'")


def task_file(task: str, default_task: str = "mri_recon") -> str:
    """Weights file of a task: ``model.pt`` for the default task, ``model_<task>.pt`` for the others."""
    check_task(task)
    return "model.pt" if task == default_task else f"model_{task}.pt"


def best_gaussian_sigma(slices: Sequence[dict[str, Any]], sigmas: Sequence[float], noisy_key: str = "lowdose",
                        clean_key: str = "label") -> float:
    """The Gaussian smoothing sigma (pixels) of ``sigmas`` with the highest mean PSNR (data range 1, normalised
    images clipped to [0, 1]) of ``smooth(noisy)`` against ``clean`` over ``slices``. Uses
    :class:`~medsr_monai.transforms.GaussianFilterd`, the same filter as the evaluation baseline."""
    from monai.metrics import PSNRMetric

    from medsr_monai.transforms import GaussianFilterd

    if not slices:
        raise ValueError("no validation slices to choose the Gaussian baseline's sigma on")
    psnr = PSNRMetric(max_val=1.0)
    scores = {}
    for s in sigmas:
        vals = []
        for item in slices:
            x = torch.as_tensor(item[noisy_key], dtype=torch.float32)
            y = torch.as_tensor(item[clean_key], dtype=torch.float32)
            out = torch.as_tensor(GaussianFilterd("x", float(s))({"x": x})["x"]).clamp(0, 1)
            vals.append(float(psnr(out[None], y[None]).mean()))
        scores[float(s)] = float(np.mean(vals))
    return max(scores, key=scores.get)


def restoration_physics(task: str, mask_type: str = "equispaced", acceleration: float = 4,
                        center_fraction: float = 0.08, mask_seed: int = 0, dose_fraction: float = 0.25,
                        incident_photons: float = 1e6, noise_seed: int = 0, consistency: bool = True,
                        random: bool = False):
    """The physics of a restoration task: Cartesian undersampling (``mri_recon``; ``random``: a fresh mask per
    call, for training) or low-dose CT (``ct_denoise``).

    Example:
        >>> restoration_physics("mri_recon", acceleration=8).describe()[:23]
        'cartesian_undersampling'
    """
    from medsr_monai.physics import CartesianUndersampling, LowDoseCT

    check_task(task)
    if task == "mri_recon":
        return CartesianUndersampling(mask_type, acceleration, center_fraction, seed=mask_seed, random=random,
                                      dc=consistency)
    return LowDoseCT(dose_fraction, incident_photons, seed=noise_seed)


def restoration_channels(task: str) -> int:
    """Network channels of a task: 2 (real, imaginary) for the complex measurement of ``mri_recon``, else 1."""
    check_task(task)
    return 2 if task == "mri_recon" else 1
