"""Interpolation that samples on the grid a degradation actually produced.

Two low-resolution (LR) grid conventions occur in practice (see ``docs/PROTOCOL.md``):

``"corner"``
    LR voxel ``i`` sits at high-resolution (HR) voxel ``s * i``. This is what k-space truncation and
    plain decimation (``x[::s]``) produce. The LR affine keeps the HR origin.
``"center"``
    LR voxel ``i`` sits at the centre of HR voxels ``s*i .. s*i+s-1``, i.e. at ``s*i + (s-1)/2``.
    This is what block averaging / area pooling produce, and what
    ``torch.nn.functional.interpolate(..., align_corners=False)`` assumes.

Upsampling an LR image with the wrong convention shifts it by half an HR voxel, which costs several
dB of PSNR and inflates any learned method's apparent gain. ``torch.nn.functional.interpolate`` only
implements ``"center"`` (and bicubic only in 2D), so this module implements separable 1D kernels
(nearest, linear, Keys cubic with a=-0.5) that work for any number of spatial dimensions and either
convention, with replicated borders.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import List

import torch

__all__ = [
    "GRID_CONVENTIONS", "INTERP_MODES", "canonical_mode", "grid_interpolate", "interpolate_scaled", "lr_positions",
]

GRID_CONVENTIONS = ("corner", "center")
INTERP_MODES = ("nearest", "linear", "bilinear", "trilinear", "cubic", "bicubic", "tricubic")


def canonical_mode(mode: str) -> str:
    """``nearest``, ``linear`` or ``cubic`` for any accepted alias (``bilinear``, ``bicubic``, ...)."""
    m = mode.lower()
    if m not in INTERP_MODES:
        raise ValueError(f"mode must be one of {INTERP_MODES}, got {mode!r}")
    return {"bilinear": "linear", "trilinear": "linear", "bicubic": "cubic", "tricubic": "cubic"}.get(m, m)


def lr_positions(out_size: int, scale: float, grid: str = "corner") -> torch.Tensor:
    """Continuous LR coordinates of each HR sample ``j = 0 .. out_size-1``.

    Args:
        out_size: number of HR samples along the axis.
        scale: upsampling factor ``s`` (HR spacing = LR spacing / s).
        grid: ``"corner"`` (LR i at HR s*i) or ``"center"`` (LR i at HR s*i + (s-1)/2).

    Example:
        >>> lr_positions(4, 2, "corner").tolist()
        [0.0, 0.5, 1.0, 1.5]
    """
    j = torch.arange(out_size, dtype=torch.float64)
    if grid == "corner":
        return j / scale
    if grid == "center":
        return (j + 0.5) / scale - 0.5
    raise ValueError(f"grid must be one of {GRID_CONVENTIONS}, got {grid!r}")


def _round_half_even(v: float) -> int:
    """Python's ``round`` for floats, written so that TorchScript compiles it."""
    f = math.floor(v)
    r = v - f
    if r > 0.5 or (r == 0.5 and f % 2 == 1):
        f += 1
    return int(f)


def _cubic_weights(t: torch.Tensor) -> torch.Tensor:
    """Keys cubic convolution weights (a=-0.5) for the taps at offsets -1, 0, 1, 2 of fractional position t."""
    a = -0.5
    d = torch.stack([t + 1, t, 1 - t, 2 - t], dim=-1).abs()
    w_near = (a + 2) * d**3 - (a + 3) * d**2 + 1
    w_far = a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
    return torch.where(d <= 1, w_near, torch.where(d < 2, w_far, torch.zeros_like(d)))


def _interp_axis(x: torch.Tensor, axis: int, out_size: int, scale: float, mode: str, grid: str) -> torch.Tensor:
    n = x.shape[axis]
    j = torch.arange(out_size, dtype=torch.float64)
    if grid == "corner":
        u = j / scale
    else:
        u = (j + 0.5) / scale - 0.5
    if mode == "nearest":
        idx = torch.round(u).long().clamp(0, n - 1)
        return x.index_select(axis, idx.to(x.device))
    base = torch.floor(u)
    t = (u - base).to(x.dtype)
    base_i = base.long()
    if mode == "linear":
        offsets: List[int] = [0, 1]
        weights = torch.stack([1 - t, t], dim=-1)
    else:  # cubic
        offsets = [-1, 0, 1, 2]
        weights = _cubic_weights(t)
    weights = weights.to(x.device)
    shape: List[int] = [1] * x.dim()
    shape[axis] = out_size
    out = x.index_select(axis, (base_i + offsets[0]).clamp(0, n - 1).to(x.device)) * weights[:, 0].reshape(shape)
    for k in range(1, len(offsets)):
        idx = (base_i + offsets[k]).clamp(0, n - 1).to(x.device)
        out = out + x.index_select(axis, idx) * weights[:, k].reshape(shape)
    return out


def interpolate_scaled(x: torch.Tensor, scales: List[float], mode: str = "cubic", grid: str = "corner") -> torch.Tensor:
    """TorchScript-compatible core of :func:`grid_interpolate`: canonical ``mode`` (nearest/linear/cubic),
    one factor per trailing spatial axis, no argument checking. Networks call this so they can be exported."""
    if not torch.is_floating_point(x):
        x = x.float()
    out = x
    spatial_dims = len(scales)
    for k in range(spatial_dims):
        s = scales[k]
        if s == 1.0:
            continue
        axis = x.dim() - spatial_dims + k
        out = _interp_axis(out, axis, _round_half_even(out.shape[axis] * s), s, mode, grid)
    return out


def grid_interpolate(
    x: torch.Tensor,
    scale: int | float | Sequence[int | float],
    mode: str = "cubic",
    grid: str = "corner",
    spatial_dims: int | None = None,
) -> torch.Tensor:
    """Upsample the trailing spatial axes of ``x`` by ``scale`` on the stated LR grid convention.

    Args:
        x: tensor whose last ``spatial_dims`` axes are spatial, e.g. ``(B, C, H, W)`` or ``(C, H, W, D)``.
        scale: factor per spatial axis (an int applies to all of them; 1 leaves an axis alone).
        mode: ``"nearest"``, ``"linear"`` (alias ``bilinear``/``trilinear``) or ``"cubic"``
            (alias ``bicubic``/``tricubic``; Keys kernel, a=-0.5, as used by bicubic resizing).
        grid: ``"corner"`` or ``"center"``; see the module docstring.
        spatial_dims: number of trailing spatial axes; defaults to ``len(scale)`` or ``x.ndim - 2``.

    Returns:
        Tensor with each spatial axis ``n`` replaced by ``round(n * scale)``; dtype and device kept.

    Example:
        >>> lr = torch.arange(4.0).reshape(1, 1, 2, 2)
        >>> grid_interpolate(lr, 2, mode="linear").shape
        torch.Size([1, 1, 4, 4])
    """
    if grid not in GRID_CONVENTIONS:
        raise ValueError(f"grid must be one of {GRID_CONVENTIONS}, got {grid!r}")
    if spatial_dims is None:
        spatial_dims = len(scale) if isinstance(scale, Sequence) else x.ndim - 2
    scales = [float(v) for v in scale] if isinstance(scale, Sequence) else [float(scale)] * spatial_dims
    if len(scales) != spatial_dims:
        raise ValueError(f"got {len(scales)} scale factors for {spatial_dims} spatial dims")
    if any(v <= 0 for v in scales):
        raise ValueError(f"scale factors must be positive, got {scales}")
    return interpolate_scaled(x, scales, canonical_mode(mode), grid)
