"""Interpolation baselines that sample on the grid the degradation produced.

:class:`GridUpsample` wraps :func:`~medsr_monai.transforms.grid.grid_interpolate` (nearest / linear / Keys cubic on the
``"corner"`` or ``"center"`` LR grid) and k-space zero-filling (``mode="zerofill"``, corner grid only). A MetaTensor's
affine is updated so that the output overlays the HR grid:

* spacing of each upsampled axis divided by ``s``;
* ``"corner"``: origin kept (LR voxel ``i`` is HR voxel ``s*i``);
* ``"center"``: origin moved by ``-(s-1)/(2s)`` LR voxels along each upsampled axis (HR voxel 0 lies at LR coordinate
  ``-(s-1)/(2s)`` under the pooling convention).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch  # noqa: F401  (used in the examples)
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends

from .degrade import apply_resampling
from .functional import kspace_zerofill, scale_factors
from .grid import GRID_CONVENTIONS, INTERP_MODES, grid_interpolate

__all__ = ["UPSAMPLE_MODES", "GridUpsample", "GridUpsampled"]

UPSAMPLE_MODES = INTERP_MODES + ("zerofill",)


class GridUpsample(Transform):
    """Upsample the last ``spatial_dims`` axes by ``scale`` on the stated LR grid convention.

    Args:
        scale: integer factor, or one per spatial axis.
        mode: ``"nearest"``, ``"linear"`` (``bilinear``/``trilinear``), ``"cubic"`` (``bicubic``/``tricubic``; Keys
            a=-0.5) or ``"zerofill"`` (k-space zero-filling; the exact baseline for k-space truncation).
        grid: ``"corner"`` (decimation / k-space truncation) or ``"center"`` (block averaging / area pooling).
        spatial_dims: number of trailing spatial axes (2 or 3).

    Example:
        >>> GridUpsample(2)(torch.rand(1, 8, 8)).shape
        torch.Size([1, 16, 16])
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self, scale: int | Sequence[int], mode: str = "cubic", grid: str = "corner", spatial_dims: int = 2
    ) -> None:
        mode = mode.lower()
        if mode not in UPSAMPLE_MODES:
            raise ValueError(f"mode must be one of {UPSAMPLE_MODES}, got {mode!r}")
        if grid not in GRID_CONVENTIONS:
            raise ValueError(f"grid must be one of {GRID_CONVENTIONS}, got {grid!r}")
        if mode == "zerofill" and grid != "corner":
            raise ValueError("mode='zerofill' inverts k-space truncation, whose grid is 'corner'; got grid='center'")
        self.scale = scale_factors(scale, spatial_dims)
        self.mode = mode
        self.grid = grid
        self.spatial_dims = spatial_dims

    def __call__(self, img):
        scales, sd = self.scale, self.spatial_dims
        if self.mode == "zerofill":
            fn = lambda x: kspace_zerofill(x, scales, sd)  # noqa: E731
        else:
            fn = lambda x: grid_interpolate(x, scales, self.mode, self.grid, sd)  # noqa: E731
        shift = [-(s - 1) / (2 * s) for s in scales] if self.grid == "center" else None
        return apply_resampling(img, fn, [1.0 / s for s in scales], sd, shift)


class GridUpsampled(MapTransform):
    """Dictionary form of :class:`GridUpsample`.

    Args:
        keys: keys of the LR images to upsample.
        scale, mode, grid, spatial_dims: see :class:`GridUpsample`.
        allow_missing_keys: do not raise if a key is missing.

    Example:
        >>> GridUpsampled("lr", 2, mode="zerofill")({"lr": torch.rand(1, 4, 4)})["lr"].shape
        torch.Size([1, 8, 8])
    """

    backend = GridUpsample.backend

    def __init__(
        self,
        keys: KeysCollection,
        scale: int | Sequence[int],
        mode: str = "cubic",
        grid: str = "corner",
        spatial_dims: int = 2,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.upsample = GridUpsample(scale, mode, grid, spatial_dims)
        self.grid = grid

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.upsample(d[key])
        return d
