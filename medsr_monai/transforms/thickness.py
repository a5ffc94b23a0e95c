"""Slice-thickness simulation ("physics" of thick-slice acquisitions), kept apart from any model.

A thick-slice scan is modelled from a near-isotropic thin-slice volume by integrating the slice profile over
``factor`` thin slices and keeping one thick slice per ``factor`` thin slices along ``slice_axis``.

Grid convention (``grid = "center"``, the block-averaging convention of ``shared/PROTOCOL.md``):
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

import math
from collections.abc import Hashable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_numpy, convert_to_tensor

__all__ = [
    "PROFILES", "SliceThickness", "SliceThicknessd", "CropToMultiple", "CropToMultipled", "MoveSliceAxisd",
    "slice_profile", "slice_thickness", "thick_affine", "thin_affine",
]

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


def _check(n: int, factor: int, where: str) -> None:
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
    _check(n, factor, f"tensor dim {dim}")
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
        _check(img.shape[self.slice_axis + 1], self.factor, f"slice_axis {self.slice_axis}")
        x = convert_to_tensor(img, track_meta=False)
        out = slice_thickness(x, self.factor, axis=self.slice_axis + 1, profile=self.profile)
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
