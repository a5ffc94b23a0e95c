"""Through-plane resolution loss: thick slices from thin ones (centre grid)."""

from __future__ import annotations

import torch

from .base import Physics
from .functional import _as_float_tensor
from .grid import interpolate_scaled
from .slices import PROFILES, check_slice_count, slice_thickness

__all__ = ["SliceThickness"]


class SliceThickness(Physics):
    """Thick slices: the slice profile integrated over ``factor`` thin slices, one thick slice per ``factor``.

    Thick slice ``k`` is centred on thin position ``k*f + (f-1)/2`` (``grid = "center"``): the LR affine multiplies
    the slice column by ``f`` and moves the origin by ``(f-1)/2`` thin voxels.

    * ``A``: :func:`~medsr_monai.physics.slices.slice_thickness` along ``axis`` (box or Gaussian profile);
    * ``baseline``: cubic interpolation along the slice axis on the centre grid;
    * ``consistency``: each group of ``f`` thin slices ``k*f .. k*f+f-1`` is shifted by ``y_k - A(x_hat)_k``. For
      the box profile that is the orthogonal projection onto ``{x: A(x) = y}`` (idempotent, exact). For the Gaussian
      profile a group's shift also reaches its neighbours' thick slices: then it is one back-projection step
      (reduces, does not zero, the residual).

    Args:
        factor: thin slices per thick slice (the through-plane SR factor).
        axis: which of the ``spatial_dims`` trailing axes is the slice axis (0-based among them; -1: the last).
        profile: ``"box"`` or ``"gaussian"`` (FWHM = ``factor`` thin slices).
        spatial_dims: trailing spatial axes (3 for a volume, or 3 for ``(B, C, S, H, W)`` slice sequences).
        dc: models apply the consistency step after their network.

    Example:
        >>> p = SliceThickness(2, axis=0, spatial_dims=3)
        >>> x = torch.rand(1, 1, 8, 4, 4); y = p.A(x)
        >>> torch.allclose(p.A(p.consistency(p.baseline(y), y)), y, atol=1e-6)
        True
    """

    name = "slice_thickness"
    grid = "center"
    has_consistency = True

    def __init__(self, factor: int = 2, axis: int = -1, profile: str = "box", spatial_dims: int = 3,
                 dc: bool = False) -> None:
        super().__init__(spatial_dims, dc)
        if int(factor) != factor or int(factor) < 1:
            raise ValueError(f"slice-thickness factor must be a positive integer, got {factor!r}")
        if profile not in PROFILES:
            raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
        if not -self.spatial_dims <= int(axis) < self.spatial_dims:
            raise ValueError(f"axis={axis} is not one of the {self.spatial_dims} spatial axes")
        self.factor, self.axis, self.profile = int(factor), int(axis) % self.spatial_dims, str(profile)

    @property
    def scale(self) -> tuple[int, ...]:
        return tuple(self.factor if k == self.axis else 1 for k in range(self.spatial_dims))

    def _dim(self, x: torch.Tensor) -> int:
        self._check_spatial(x, "A")
        return x.ndim - self.spatial_dims + self.axis

    def A(self, x):  # noqa: N802
        x = _as_float_tensor(x)
        return slice_thickness(x, self.factor, axis=self._dim(x), profile=self.profile)

    def baseline(self, y):
        y = _as_float_tensor(y)
        self._check_spatial(y, "baseline")
        return interpolate_scaled(y, [float(s) for s in self.scale], "cubic", "center")

    def consistency(self, x_hat, y):
        x_hat = _as_float_tensor(x_hat)
        dim = self._dim(x_hat)
        check_slice_count(x_hat.shape[dim], self.factor, f"tensor dim {dim}")
        residual = _as_float_tensor(y).to(x_hat.dtype) - self.A(x_hat)
        return x_hat + residual.repeat_interleave(self.factor, dim=dim)

    def _params(self):
        return {"factor": self.factor, "axis": self.axis, "profile": self.profile}
