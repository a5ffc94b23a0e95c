"""Slice-thickness forward model: profile-weighted thick slices, their grid and affines (centre convention).

A thick-slice scan is modelled from a near-isotropic thin-slice volume by integrating the slice profile over
``factor`` thin slices and keeping one thick slice per ``factor`` thin slices along the slice axis. Thick slice ``k``
is centred on thin position ``k*f + (f-1)/2`` (the block-averaging, ``"center"`` grid of ``docs/PROTOCOL.md``).

MONAI has no slice-profile degradation (its blur transforms keep the grid and cannot sample at the half-voxel
centres an even ``f`` needs), so the strided 1D convolution is written here.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from monai.utils import convert_to_numpy

__all__ = ["PROFILES", "slice_profile", "slice_thickness", "thick_affine", "thin_affine", "check_slice_count"]

PROFILES = ("box", "gaussian")
_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


def slice_profile(factor: int, profile: str = "box") -> tuple[torch.Tensor, int]:
    """Weights of one thick slice over thin voxels ``-r .. f-1+r`` (relative to ``k*f``) and the margin ``r``.

    Example:
        >>> w, r = slice_profile(2, "box"); w.tolist(), r
        ([0.5, 0.5], 0)
    """
    f = int(factor)
    if profile == "box":
        return torch.full((f,), 1.0 / f, dtype=torch.float64), 0
    if profile == "gaussian":
        sigma = f * _FWHM_TO_SIGMA
        r = int(math.ceil(3 * sigma))
        c = (f - 1) / 2.0
        m = np.arange(-r, f + r, dtype=np.float64)
        cdf = np.vectorize(lambda v: 0.5 * (1.0 + math.erf(v / (sigma * math.sqrt(2.0)))))
        w = torch.as_tensor(cdf(m + 0.5 - c) - cdf(m - 0.5 - c))
        return w / w.sum(), r
    raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")


def check_slice_count(n: int, factor: int, where: str) -> None:
    if int(factor) != factor or factor < 1:
        raise ValueError(f"slice-thickness factor must be a positive integer, got {factor!r}")
    if n % factor:
        raise ValueError(
            f"{n} slices along {where} is not a multiple of the slice-thickness factor {factor}; "
            f"crop to {n - n % factor} slices first (CropToMultiple / on_remainder='crop')"
        )


def slice_thickness(x: torch.Tensor, factor: int, axis: int = -1, profile: str = "box") -> torch.Tensor:
    """Thick slices along tensor dim ``axis`` of ``x``: profile-weighted sum over ``factor`` thin slices, then
    one slice per ``factor`` (see the module docstring for the grid). Raises if the length is not a multiple.

    Example:
        >>> slice_thickness(torch.arange(6.0), 3).tolist()
        [1.0, 4.0]
    """
    f = int(factor)
    dim = axis % x.ndim
    n = x.shape[dim]
    check_slice_count(n, factor, f"tensor dim {dim}")
    if f == 1:
        return x.clone()
    w, r = slice_profile(f, profile)
    dtype = x.dtype if torch.is_floating_point(x) else torch.float32
    y = x.to(dtype).movedim(dim, -1)
    lead = y.shape[:-1]
    y = y.reshape(-1, 1, n)
    if r:
        y = F.pad(y, (r, r), mode="replicate")
    y = F.conv1d(y, w.to(dtype=dtype, device=x.device).reshape(1, 1, -1), stride=f)
    return y.reshape(*lead, n // f).movedim(-1, dim)


def thick_affine(affine, factor: int, axis: int) -> np.ndarray:
    """Affine of the thick volume made from a thin one: slice column x ``f``, origin moved ``(f-1)/2`` thin voxels."""
    a = np.asarray(convert_to_numpy(affine), dtype=np.float64).copy()
    col = a[:3, axis].copy()
    a[:3, 3] += col * (factor - 1) / 2.0
    a[:3, axis] = col * factor
    return a


def thin_affine(affine, factor: int, axis: int) -> np.ndarray:
    """Inverse of :func:`thick_affine`: the thin grid a super-resolved thick volume lands on (centre convention).

    Example:
        >>> a = thick_affine(np.eye(4), 3, 2); np.allclose(thin_affine(a, 3, 2), np.eye(4))
        True
    """
    a = np.asarray(convert_to_numpy(affine), dtype=np.float64).copy()
    col = a[:3, axis] / factor
    a[:3, axis] = col
    a[:3, 3] -= col * (factor - 1) / 2.0
    return a


