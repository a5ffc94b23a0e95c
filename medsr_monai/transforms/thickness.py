"""Slice-thickness simulation ("physics" of thick-slice acquisitions), kept apart from any model.

A thick-slice scan is modelled from a near-isotropic thin-slice volume by integrating the slice profile over
``factor`` thin slices and keeping one thick slice per ``factor`` thin slices along ``slice_axis``.

Grid convention (``grid = "center"``, the block-averaging convention of ``docs/PROTOCOL.md``):
thick slice ``k`` is centred on thin position ``k*f + (f-1)/2``. The thick affine therefore multiplies the
slice-axis column by ``f`` and moves the origin by ``(f-1)/2`` thin voxels along it; interpolation baselines
use ``grid_interpolate(..., grid="center")`` along the slice axis, and the super-resolved output gets the
inverse affine (:func:`thin_affine`), which lands exactly on the original thin grid.

Profiles (weights over the thin voxels ``k*f - r .. k*f + f - 1 + r``, replicated borders, normalised to 1):

* ``"box"``: the mean of the ``f`` thin slices ``k*f .. k*f+f-1`` (ideal rectangular slice profile).
* ``"gaussian"``: a Gaussian of FWHM ``f`` thin voxels centred on ``k*f + (f-1)/2``, integrated over each thin
  voxel (erf differences), support ``+-3 sigma``; closer to a real (smooth) excitation profile.

MONAI has no slice-profile degradation (its blur transforms keep the grid and cannot sample at the half-voxel
centres an even ``f`` needs), so the strided 1D convolution is written here.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor

from medsr_monai.physics.thickness import SliceThickness as SliceThicknessPhysics
from medsr_monai.physics.slices import PROFILES, check_slice_count, slice_profile, slice_thickness, thick_affine, thin_affine

__all__ = [
    "PROFILES", "SliceThickness", "SliceThicknessd", "CropToMultiple", "CropToMultipled", "MoveSliceAxisd",
    "slice_profile", "slice_thickness", "thick_affine", "thin_affine",
]

class SliceThickness(Transform):
    """Simulate thick slices along a spatial axis of a channel-first image (grid: ``"center"``).

    Args:
        factor: thin slices per thick slice (the through-plane SR factor).
        slice_axis: spatial axis (0-based, after the channel dim) along which slices are thickened.
        profile: ``"box"`` (mean) or ``"gaussian"`` (FWHM = ``factor``).
        on_remainder: ``"error"`` (a length that is not a multiple of ``factor`` is refused) or ``"crop"``
            (drop the trailing slices, origin kept).

    A MetaTensor's affine becomes :func:`thick_affine` of the input's.

    Example:
        >>> SliceThickness(2, slice_axis=2)(torch.rand(1, 8, 8, 6)).shape
        torch.Size([1, 8, 8, 3])
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]
    grid = "center"

    def __init__(self, factor: int, slice_axis: int = 2, profile: str = "box", on_remainder: str = "error"):
        if profile not in PROFILES:
            raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
        if on_remainder not in ("error", "crop"):
            raise ValueError(f"on_remainder must be 'error' or 'crop', got {on_remainder!r}")
        if int(factor) != factor or factor < 1:
            raise ValueError(f"slice-thickness factor must be a positive integer, got {factor!r}")
        self.factor, self.slice_axis, self.profile, self.on_remainder = int(factor), int(slice_axis), profile, on_remainder

    def __call__(self, img):
        if self.slice_axis >= img.ndim - 1:
            raise ValueError(f"slice_axis={self.slice_axis} but the image has {img.ndim - 1} spatial dims "
                             f"(shape {tuple(img.shape)})")
        if self.on_remainder == "crop":
            img = CropToMultiple(self.factor, self.slice_axis)(img)
        check_slice_count(img.shape[self.slice_axis + 1], self.factor, f"slice_axis {self.slice_axis}")
        x = convert_to_tensor(img, track_meta=False)
        physics = SliceThicknessPhysics(self.factor, axis=self.slice_axis, profile=self.profile,
                                        spatial_dims=img.ndim - 1)
        out = physics.A(x)  # the physics' forward model; this transform is its array form
        res = convert_to_dst_type(out, img, dtype=out.dtype)[0]
        if isinstance(res, MetaTensor) and isinstance(img, MetaTensor):
            res.affine = torch.as_tensor(thick_affine(img.affine, self.factor, self.slice_axis))
        return res


class SliceThicknessd(MapTransform):
    """Dictionary form of :class:`SliceThickness` (same args, plus ``keys`` / ``allow_missing_keys``)."""

    backend = SliceThickness.backend

    def __init__(self, keys: KeysCollection, factor: int, slice_axis: int = 2, profile: str = "box",
                 on_remainder: str = "error", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.t = SliceThickness(factor, slice_axis, profile, on_remainder)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.t(d[key])
        return d


class CropToMultiple(Transform):
    """Drop trailing slices so that ``slice_axis`` holds a multiple of ``factor`` (origin, hence grid, kept)."""

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, factor: int, slice_axis: int = 2):
        self.factor, self.slice_axis = int(factor), int(slice_axis)

    def __call__(self, img):
        n = img.shape[self.slice_axis + 1]
        keep = n - n % self.factor
        if keep == 0:
            raise ValueError(f"{n} slices along slice axis {self.slice_axis} is fewer than the factor {self.factor}")
        index = [slice(None)] * img.ndim
        index[self.slice_axis + 1] = slice(0, keep)
        return img[tuple(index)]  # MetaTensor slicing keeps the affine (the origin does not move)


class CropToMultipled(MapTransform):
    """Dictionary form of :class:`CropToMultiple`."""

    def __init__(self, keys: KeysCollection, factor: int, slice_axis: int = 2, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.t = CropToMultiple(factor, slice_axis)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.t(d[key])
        return d


class MoveSliceAxisd(MapTransform):
    """Move a spatial axis to the first spatial position (``(C, S, ...)``: the slice sequence first).

    The axis is ``slice_axis`` or, when ``axis_key`` is given and present, the item's own value, so that one
    dataset can hold views of the same volume along several axes (MONAI's ``Transposed`` has fixed indices).
    The result is a plain tensor (the network works on the sequence layout, not on world coordinates).
    """

    def __init__(self, keys: KeysCollection, slice_axis: int = 2, axis_key: str | None = None,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.slice_axis, self.axis_key = int(slice_axis), axis_key

    def __call__(self, data):
        d = dict(data)
        axis = int(d.get(self.axis_key, self.slice_axis)) if self.axis_key else self.slice_axis
        for key in self.key_iterator(d):
            x = convert_to_tensor(d[key], track_meta=False)
            d[key] = x.movedim(axis + 1, 1).contiguous()
        return d
