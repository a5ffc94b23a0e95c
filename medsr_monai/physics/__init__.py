"""Degradation physics: how each low-quality image arises, its classical inverse and its data-consistency step.

One class per way a low-quality image arises (see :mod:`medsr_monai.physics.base` for the interface):

==========================  ===========================  ===============================  =========================
physics                     forward model ``A``          ``baseline`` (matched inverse)   ``consistency``
==========================  ===========================  ===============================  =========================
``KSpaceTruncation``        central ``N/s`` of k-space   k-space zero-fill                measured band replaced
``Decimation``              Gaussian blur + ``[::s]``    cubic, corner grid               back-projection step
``SliceThickness``          slice profile + ``[::f]``    cubic, centre grid (slice axis)  group shift (box: exact)
``CartesianUndersampling``  line mask in k-space         zero-filled magnitude            sampled lines replaced
``LowDoseCT``               Poisson noise, FBP           the input                        -
``RicianNoise``             complex Gaussian, magnitude  the input                        -
``ModalitySwitch``          one of the above per sample  the branch's                     the branch's
==========================  ===========================  ===============================  =========================

Grids (``docs/PROTOCOL.md``): ``"corner"`` LR voxel ``i`` at HR voxel ``s*i``; ``"center"`` at ``s*i + (s-1)/2``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from .base import ComposedPhysics, Physics, apply_affine_grid_change
from .grid import GRID_CONVENTIONS, INTERP_MODES, grid_interpolate, interpolate_scaled, lr_positions
from .noise import LowDoseCT, RicianNoise
from .resolution import Decimation, KSpaceTruncation, ResolutionPhysics
from .switch import ModalitySwitch, canonical_modality_name, modality_kwargs
from .thickness import SliceThickness
from .undersampling import CartesianUndersampling

__all__ = [
    "modality_kwargs",
    "CartesianUndersampling", "ComposedPhysics", "Decimation", "GRID_CONVENTIONS", "INTERP_MODES", "KSpaceTruncation",
    "LowDoseCT", "ModalitySwitch", "PHYSICS", "Physics", "ResolutionPhysics", "RicianNoise", "SliceThickness",
    "apply_affine_grid_change", "canonical_modality_name", "grid_interpolate", "in_plane_sr_physics",
    "interpolate_scaled", "lr_positions", "physics_from_config",
]

PHYSICS: dict[str, type[Physics]] = {
    cls.name: cls for cls in (Physics, KSpaceTruncation, Decimation, SliceThickness, CartesianUndersampling,
                              LowDoseCT, RicianNoise)
}


def physics_from_config(config: Mapping[str, Any] | Physics) -> Physics:
    """Rebuild a physics from its :meth:`~Physics.config` dict (a physics object is returned as it is).

    Example:
        >>> p = KSpaceTruncation(3, dc=True)
        >>> physics_from_config(p.config()) == p
        True
    """
    if isinstance(config, Physics):
        return config
    cfg = dict(config)
    name = cfg.pop("physics", None)
    if name == ModalitySwitch.name:
        return ModalitySwitch({k: physics_from_config(v) for k, v in cfg["branches"].items()})
    if name == ComposedPhysics.name:
        return ComposedPhysics(physics_from_config(cfg["first"]), physics_from_config(cfg["second"]))
    if name not in PHYSICS:
        raise ValueError(f"unknown physics {name!r}; known: {sorted(PHYSICS) + [ModalitySwitch.name]}")
    cls = PHYSICS[name]
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in cfg.items() if k in accepted})


def in_plane_sr_physics(scale: int = 2, mr_dc: bool = True, ct_dc: bool = False, ct_sigma: float | None = None,
                        modalities: tuple[str, ...] = ("MR", "CT"), default: str | None = None) -> ModalitySwitch:
    """The in-plane SR bundles' physics: k-space truncation for MR, anti-aliased decimation for CT.

    Args:
        scale: in-plane factor.
        mr_dc: apply the k-space consistency step (measured band kept exactly) in the model for MR.
        ct_dc: apply the back-projection step for CT.
        ct_sigma: CT blur sigma in HR voxels (default ``0.5 * scale``).
        modalities: which branches to build.
        default: branch for calls without a modality (see :class:`ModalitySwitch`).

    Example:
        >>> in_plane_sr_physics(2).describe().split(";")[0]
        'CT: decimation(scale=[2, 2], sigma=None, steps=1, step=1.0'
    """
    branches: dict[str, Physics] = {}
    if "MR" in modalities:
        branches["MR"] = KSpaceTruncation(scale, dc=mr_dc)
    if "CT" in modalities:
        branches["CT"] = Decimation(scale, sigma=ct_sigma, dc=ct_dc)
    return ModalitySwitch(branches, default=default)
