"""Resolution degradations (array, dictionary and random forms) on the ``"corner"`` grid: MONAI-transform forms
of :class:`~medsr_monai.physics.KSpaceTruncation` and :class:`~medsr_monai.physics.Decimation`.

Both degradations here put LR voxel ``i`` at HR voxel ``s * i`` (``grid = "corner"``): a ``MetaTensor`` output keeps
the HR origin and gets the spacing of each downsampled axis multiplied by ``s``. Interpolation baselines for these
LR images must use ``grid_interpolate(..., grid="corner")`` / :class:`~medsr_monai.transforms.upsample.GridUpsample`
(and k-space zero-filling for k-space truncation); see ``docs/PROTOCOL.md``.

Augment the HR image *before* degrading it (a flip of an LR/HR pair moves the corner grid by one HR voxel).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandomizableTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor

from medsr_monai.physics.resolution import Decimation, KSpaceTruncation

from .functional import rescale_affine, scale_factors

from .base import RandDictWrapper

__all__ = [
    "DecimateDownsample",
    "DecimateDownsampled",
    "KSpaceDownsample",
    "KSpaceDownsampled",
    "RandDecimateDownsample",
    "RandDecimateDownsampled",
    "RandKSpaceDownsample",
    "RandKSpaceDownsampled",
    "apply_resampling",
]


def apply_resampling(
    img,
    fn: Callable[[torch.Tensor], torch.Tensor],
    factors: Sequence[float],
    spatial_dims: int,
    origin_shift: Sequence[float] | None = None,
):
    """Run ``fn`` on ``img`` as a plain tensor and return the result in ``img``'s type with a matching affine.

    ``factors`` multiply the spacing of the last ``spatial_dims`` axes (``s`` when downsampling, ``1/s`` when
    upsampling) and ``origin_shift`` moves the origin in input voxels (see
    :func:`~medsr_monai.transforms.functional.rescale_affine`). Floating dtypes are kept; integer input becomes float32.
    """
    x = convert_to_tensor(img, track_meta=False)
    out = fn(x)
    dtype = x.dtype if torch.is_floating_point(x) else torch.float32
    res = convert_to_dst_type(out, img, dtype=dtype)[0]
    if isinstance(res, MetaTensor) and isinstance(img, MetaTensor):
        affine = rescale_affine(img, factors, spatial_dims, origin_shift)
        if affine is not None:
            res.affine = affine
    return res


class KSpaceDownsample(Transform):
    """Downsample by k-space truncation (keep the central ``N/s`` frequencies per axis), e.g. for MRI.

    Grid convention: ``"corner"`` (LR voxel ``i`` at HR voxel ``s*i``); a MetaTensor's affine keeps its origin and the
    spacing of the downsampled axes is multiplied by ``s``. Intensities (the mean) are preserved; Gibbs ringing appears
    at edges, as in a real low-resolution acquisition. Baseline: k-space zero-filling or cubic on the corner grid.

    Args:
        scale: integer factor, or one per spatial axis (e.g. ``(1, 1, 4)`` for through-plane).
        spatial_dims: number of trailing spatial axes the transform acts on (2 or 3).

    Example:
        >>> KSpaceDownsample(2)(torch.rand(1, 64, 64)).shape
        torch.Size([1, 32, 32])
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]
    grid = "corner"

    def __init__(self, scale: int | Sequence[int], spatial_dims: int = 2) -> None:
        self.spatial_dims = spatial_dims
        self.scale = scale_factors(scale, spatial_dims)

    def __call__(self, img, scale: int | Sequence[int] | None = None):
        scales = self.scale if scale is None else scale_factors(scale, self.spatial_dims)
        physics = KSpaceTruncation(scales, self.spatial_dims)  # the physics' forward model; this is its array form
        return apply_resampling(img, physics.A, scales, self.spatial_dims)


class KSpaceDownsampled(MapTransform):
    """Dictionary form of :class:`KSpaceDownsample` (``grid = "corner"``).

    Args:
        keys: keys of the images to downsample.
        scale: integer factor, or one per spatial axis.
        spatial_dims: number of trailing spatial axes (2 or 3).
        allow_missing_keys: do not raise if a key is missing.

    Example:
        >>> KSpaceDownsampled("lr", 2)({"lr": torch.rand(1, 8, 8)})["lr"].shape
        torch.Size([1, 4, 4])
    """

    backend = KSpaceDownsample.backend
    grid = "corner"

    def __init__(
        self, keys: KeysCollection, scale: int | Sequence[int], spatial_dims: int = 2, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.downsample = KSpaceDownsample(scale, spatial_dims)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.downsample(d[key])
        return d


class RandKSpaceDownsample(RandomizableTransform):
    """k-space truncation by a factor drawn at random from ``scales`` (``grid = "corner"``).

    With probability ``1 - prob`` the input is returned unchanged.

    Args:
        scales: candidate factors (each an int or a per-axis sequence).
        prob: probability of applying the transform.
        spatial_dims: number of trailing spatial axes (2 or 3).

    Example:
        >>> t = RandKSpaceDownsample(scales=(2, 4)).set_random_state(0)
        >>> t(torch.rand(1, 16, 16)).shape[-1] in (8, 4)
        True
    """

    backend = KSpaceDownsample.backend
    grid = "corner"

    def __init__(self, scales: Sequence = (2, 3, 4), prob: float = 1.0, spatial_dims: int = 2) -> None:
        RandomizableTransform.__init__(self, prob)
        self.scales = [scale_factors(s, spatial_dims) for s in scales]
        if not self.scales:
            raise ValueError("scales must not be empty")
        self.spatial_dims = spatial_dims
        self.scale = self.scales[0]
        self.downsample = KSpaceDownsample(self.scale, spatial_dims)

    def randomize(self, data=None) -> None:
        super().randomize(None)
        if self._do_transform:
            self.scale = self.scales[int(self.R.randint(len(self.scales)))]

    def __call__(self, img, randomize: bool = True):
        if randomize:
            self.randomize()
        if not self._do_transform:
            return img
        return self.downsample(img, self.scale)


class RandKSpaceDownsampled(RandDictWrapper):
    """Dictionary form of :class:`RandKSpaceDownsample`: one factor drawn per call, shared by all keys.

    Args:
        keys: keys of the images to downsample.
        scales: candidate factors.
        prob: probability of applying the transform.
        spatial_dims: number of trailing spatial axes (2 or 3).
        allow_missing_keys: do not raise if a key is missing.

    Example:
        >>> t = RandKSpaceDownsampled("lr", scales=(2,)).set_random_state(0)
        >>> t({"lr": torch.rand(1, 8, 8)})["lr"].shape
        torch.Size([1, 4, 4])
    """

    backend = KSpaceDownsample.backend
    grid = "corner"

    def __init__(
        self,
        keys: KeysCollection,
        scales: Sequence = (2, 3, 4),
        prob: float = 1.0,
        spatial_dims: int = 2,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, RandKSpaceDownsample(scales, prob=1.0, spatial_dims=spatial_dims), prob, allow_missing_keys)


class DecimateDownsample(Transform):
    """Gaussian anti-aliasing blur then decimation ``x[..., ::s, ::s]`` (e.g. CT in-plane).

    Grid convention: ``"corner"`` (LR voxel ``i`` at HR voxel ``s*i``); a MetaTensor's affine keeps its origin and the
    spacing of the downsampled axes is multiplied by ``s``. Baseline: cubic interpolation on the corner grid.

    Args:
        scale: integer factor, or one per spatial axis.
        sigma: blur standard deviation in HR voxels (one or per axis); default ``0.5 * s`` (``s = 2 -> 1.0``) on axes
            with ``s > 1``; ``0`` gives plain decimation. Reflect padding at the borders.
        spatial_dims: number of trailing spatial axes (2 or 3).

    Example:
        >>> DecimateDownsample(2)(torch.rand(1, 64, 64)).shape
        torch.Size([1, 32, 32])
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]
    grid = "corner"

    def __init__(
        self, scale: int | Sequence[int], sigma: float | Sequence[float] | None = None, spatial_dims: int = 2
    ) -> None:
        self.spatial_dims = spatial_dims
        self.scale = scale_factors(scale, spatial_dims)
        self.sigma = sigma

    def __call__(self, img, sigma: float | Sequence[float] | None = None):
        sg = self.sigma if sigma is None else sigma
        physics = Decimation(self.scale, sg, self.spatial_dims)  # the physics' forward model; this is its array form
        return apply_resampling(img, physics.A, self.scale, self.spatial_dims)


class DecimateDownsampled(MapTransform):
    """Dictionary form of :class:`DecimateDownsample` (``grid = "corner"``).

    Args:
        keys: keys of the images to downsample.
        scale: integer factor, or one per spatial axis.
        sigma: blur standard deviation in HR voxels; default ``0.5 * s``.
        spatial_dims: number of trailing spatial axes (2 or 3).
        allow_missing_keys: do not raise if a key is missing.

    Example:
        >>> DecimateDownsampled("lr", 2)({"lr": torch.rand(1, 8, 8)})["lr"].shape
        torch.Size([1, 4, 4])
    """

    backend = DecimateDownsample.backend
    grid = "corner"

    def __init__(
        self,
        keys: KeysCollection,
        scale: int | Sequence[int],
        sigma: float | Sequence[float] | None = None,
        spatial_dims: int = 2,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.downsample = DecimateDownsample(scale, sigma, spatial_dims)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.downsample(d[key])
        return d


class RandDecimateDownsample(RandomizableTransform):
    """Decimation with an anti-aliasing blur whose sigma is drawn uniformly from ``sigma_range`` (``grid = "corner"``).

    The drawn sigma (HR voxels) is used on every axis with ``s > 1``. With probability ``1 - prob`` the input is
    returned unchanged (not downsampled).

    Args:
        scale: integer factor, or one per spatial axis.
        sigma_range: ``(low, high)``; default ``(0.4 * s, 0.6 * s)`` with ``s`` the largest factor.
        prob: probability of applying the transform.
        spatial_dims: number of trailing spatial axes (2 or 3).

    Example:
        >>> t = RandDecimateDownsample(2).set_random_state(0)
        >>> t(torch.rand(1, 16, 16)).shape
        torch.Size([1, 8, 8])
    """

    backend = DecimateDownsample.backend
    grid = "corner"

    def __init__(
        self,
        scale: int | Sequence[int],
        sigma_range: tuple[float, float] | None = None,
        prob: float = 1.0,
        spatial_dims: int = 2,
    ) -> None:
        RandomizableTransform.__init__(self, prob)
        self.scale = scale_factors(scale, spatial_dims)
        smax = max(self.scale)
        self.sigma_range = tuple(sigma_range) if sigma_range is not None else (0.4 * smax, 0.6 * smax)
        self.spatial_dims = spatial_dims
        self.sigma = 0.5 * smax
        self.downsample = DecimateDownsample(self.scale, None, spatial_dims)

    def randomize(self, data=None) -> None:
        super().randomize(None)
        if self._do_transform:
            self.sigma = float(self.R.uniform(self.sigma_range[0], self.sigma_range[1]))

    def __call__(self, img, randomize: bool = True):
        if randomize:
            self.randomize()
        if not self._do_transform:
            return img
        return self.downsample(img, [self.sigma if s > 1 else 0.0 for s in self.scale])


class RandDecimateDownsampled(RandDictWrapper):
    """Dictionary form of :class:`RandDecimateDownsample`: one sigma drawn per call, shared by all keys.

    Args:
        keys: keys of the images to downsample.
        scale: integer factor, or one per spatial axis.
        sigma_range: ``(low, high)``; default ``(0.4 * s, 0.6 * s)``.
        prob: probability of applying the transform.
        spatial_dims: number of trailing spatial axes (2 or 3).
        allow_missing_keys: do not raise if a key is missing.

    Example:
        >>> t = RandDecimateDownsampled("lr", 2).set_random_state(0)
        >>> t({"lr": torch.rand(1, 8, 8)})["lr"].shape
        torch.Size([1, 4, 4])
    """

    backend = DecimateDownsample.backend
    grid = "corner"

    def __init__(
        self,
        keys: KeysCollection,
        scale: int | Sequence[int],
        sigma_range: tuple[float, float] | None = None,
        prob: float = 1.0,
        spatial_dims: int = 2,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, RandDecimateDownsample(scale, sigma_range, prob=1.0, spatial_dims=spatial_dims), prob, allow_missing_keys)
