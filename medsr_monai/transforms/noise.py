"""Acquisition noise models: Rician (magnitude MRI) and projection-domain low-dose CT.

Neither transform changes the grid (``grid = "corner"`` is stated only for uniformity: the output sits on the
input's grid, affine unchanged). Apply noise to the LR image *after* the resolution degradation if it should model
noise of the low-resolution acquisition.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_numpy

from .base import RandDictWrapper

__all__ = [
    "MU_WATER_PER_MM",
    "LowDoseCTNoise",
    "LowDoseCTNoised",
    "RandLowDoseCTNoise",
    "RandLowDoseCTNoised",
    "RandRicianNoise",
    "RandRicianNoised",
    "RicianNoise",
    "RicianNoised",
    "pixel_size_from_affine",
]

#: Linear attenuation coefficient of water at an effective energy of about 70 keV (0.192 /cm; NIST XCOM gives
#: 0.1929 /cm at 70 keV), the usual value for a 120 kVp polychromatic CT beam.
MU_WATER_PER_MM = 0.0192


def _float_dtype(img) -> np.dtype:
    dt = np.dtype(getattr(img, "dtype", np.float32)) if isinstance(img, np.ndarray) else None
    if isinstance(img, torch.Tensor):
        return np.float64 if img.dtype == torch.float64 else np.float32
    return np.float64 if dt == np.float64 else np.float32


class RicianNoise(RandomizableTransform):
    """Rician noise of fixed level: ``|x + n1 + i n2|`` with ``n1, n2 ~ N(0, sigma^2)`` drawn fresh on every call.

    This is the noise of a magnitude MR image reconstructed from a single coil with complex Gaussian k-space noise
    (a Rician distribution; on a zero background the magnitude is Rayleigh with mean ``sigma * sqrt(pi / 2)``).
    Output is non-negative whatever the sign of the input. The grid is unchanged (``grid = "corner"``).

    Args:
        sigma: noise standard deviation of each of the real and imaginary parts.
        relative: if True, ``sigma`` is a fraction of the image's 99th percentile (of the whole image);
            else it is in image units.

    Example:
        >>> t = RicianNoise(0.05).set_random_state(0)
        >>> t(torch.ones(1, 8, 8)).shape
        torch.Size([1, 8, 8])
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]
    grid = "corner"

    def __init__(self, sigma: float, relative: bool = True) -> None:
        RandomizableTransform.__init__(self, prob=1.0)
        if sigma < 0:
            raise ValueError(f"sigma must be non-negative, got {sigma}")
        self.sigma = float(sigma)
        self.relative = relative

    def randomize(self, data=None) -> None:  # noise is drawn in __call__; nothing else is random
        self._do_transform = True

    def __call__(self, img, sigma: float | None = None):
        sigma = self.sigma if sigma is None else float(sigma)
        x = convert_to_numpy(img).astype(_float_dtype(img), copy=False)
        if self.relative:
            sigma = sigma * float(np.percentile(x, 99))
        n1 = self.R.standard_normal(x.shape) * sigma
        n2 = self.R.standard_normal(x.shape) * sigma
        out = np.sqrt((x + n1) ** 2 + n2**2).astype(x.dtype, copy=False)
        return convert_to_dst_type(out, img, dtype=x.dtype)[0]


class RandRicianNoise(RandomizableTransform):
    """Rician noise applied with probability ``prob`` at a level drawn uniformly from ``sigma_range``.

    Args:
        prob: probability of adding noise.
        sigma_range: ``(low, high)`` for sigma (fraction of the 99th percentile if ``relative``).
        relative: see :class:`RicianNoise`.

    Example:
        >>> t = RandRicianNoise(prob=1.0, sigma_range=(0.01, 0.05)).set_random_state(0)
        >>> bool((t(torch.ones(1, 8, 8)) != 1).any())
        True
    """

    backend = RicianNoise.backend
    grid = "corner"

    def __init__(self, prob: float = 0.1, sigma_range: tuple[float, float] = (0.0, 0.05), relative: bool = True):
        RandomizableTransform.__init__(self, prob)
        self.sigma_range = tuple(float(v) for v in sigma_range)
        self.sigma = self.sigma_range[0]
        self.noise = RicianNoise(self.sigma, relative)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.noise.set_random_state(state=self.R)  # share one stream
        return self

    def randomize(self, data=None) -> None:
        super().randomize(None)
        if self._do_transform:
            self.sigma = float(self.R.uniform(*self.sigma_range))

    def __call__(self, img, randomize: bool = True):
        if randomize:
            self.randomize()
        if not self._do_transform:
            return img
        self.noise.R = self.R
        return self.noise(img, self.sigma)


class RicianNoised(RandomizableTransform, MapTransform):
    """Dictionary form of :class:`RicianNoise` (independent noise for each key).

    Args:
        keys: keys of the images.
        sigma: noise level; see :class:`RicianNoise`.
        relative: sigma relative to each image's 99th percentile.
        allow_missing_keys: do not raise if a key is missing.

    Example:
        >>> t = RicianNoised("lr", 0.05).set_random_state(0)
        >>> t({"lr": torch.ones(1, 4, 4)})["lr"].shape
        torch.Size([1, 4, 4])
    """

    backend = RicianNoise.backend
    grid = "corner"

    def __init__(self, keys: KeysCollection, sigma: float, relative: bool = True, allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, 1.0)
        self.noise = RicianNoise(sigma, relative)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.noise.set_random_state(state=self.R)
        return self

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        self.noise.R = self.R
        for key in self.key_iterator(d):
            d[key] = self.noise(d[key])
        return d


class RandRicianNoised(RandDictWrapper):
    """Dictionary form of :class:`RandRicianNoise`: one decision and sigma per call, fresh noise per key.

    Args:
        keys: keys of the images.
        prob: probability of adding noise.
        sigma_range: ``(low, high)`` for sigma.
        relative: sigma relative to each image's 99th percentile.
        allow_missing_keys: do not raise if a key is missing.

    Example:
        >>> t = RandRicianNoised("lr", prob=1.0).set_random_state(0)
        >>> t({"lr": torch.ones(1, 4, 4)})["lr"].shape
        torch.Size([1, 4, 4])
    """

    backend = RicianNoise.backend
    grid = "corner"

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.1,
        sigma_range: tuple[float, float] = (0.0, 0.05),
        relative: bool = True,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, RandRicianNoise(1.0, sigma_range, relative), prob, allow_missing_keys)




def pixel_size_from_affine(img, spatial_dims: int = 2, default: float = 1.0) -> float:
    """Mean in-plane voxel size (mm) of the slice axes (the last ``spatial_dims`` axes, first two of them for 3D).

    Returns ``default`` when ``img`` carries no affine.
    """
    affine = getattr(img, "affine", None)
    if affine is None:
        return float(default)
    affine = np.asarray(convert_to_numpy(affine), dtype=np.float64)
    if affine.ndim == 3:  # batched
        affine = affine[0]
    rank = affine.shape[-1] - 1
    n_img_spatial = img.ndim - (2 if getattr(img, "is_batch", False) else 1)
    first = n_img_spatial - spatial_dims
    cols = [c for c in (first, first + 1) if 0 <= c < rank]
    if not cols:
        return float(default)
    return float(np.mean([np.linalg.norm(affine[:rank, c]) for c in cols]))


class LowDoseCTNoise(RandomizableTransform):
    """Projection-domain low-dose CT noise for slices in Hounsfield units.

    Model (per 2D slice, parallel-beam, monochromatic):

    1. ``mu = MU_WATER_PER_MM * (1 + HU / 1000)``, clipped at 0 (air), in 1/mm.
    2. Line integrals ``p = radon(mu) * pixel_size_mm`` over ``num_angles`` views in ``[0, 180)`` degrees
       (``skimage.transform.radon``, ``circle=False``; detector bin = one pixel).
    3. Transmission counts ``I = Poisson(I0 * f * exp(-p))`` with ``I0 = incident_photons`` (full-dose photons per
       ray and view) and ``f = dose_fraction``; zero counts are set to 0.5 before ``p' = -log(I / (I0 f))``.
    4. Filtered back-projection (``iradon``, ramp filter) of ``p' - p`` gives the noise image; since FBP is linear
       this equals ``FBP(p') - FBP(p)``, so only the noise comes from FBP and the original image (its resolution
       and any detail FBP would blur) is kept: ``out = HU + 1000 * FBP(p' - p) / (MU_WATER_PER_MM * pixel_size)``.

    Limits: no beam hardening, scatter, electronic noise, bowtie filter, tube-current modulation or fan-beam geometry;
    noise texture follows the ramp filter (real scanners use softer kernels, so the noise here is somewhat finer
    grained). FBP noise variance scales like ``1 / (I0 * f * num_angles)``: to mimic a scanner with ``V`` views at
    ``I0`` photons per ray while simulating ``num_angles`` views, pass ``incident_photons = I0 * V / num_angles``.
    Measured (ramp filter, default views, ``incident_photons = 1e5``): a 200 mm water disk on a 256^2 grid of 0.8 mm
    pixels gets a noise std (within 90 mm of the centre) of about 46 HU at full dose, 65 HU at ``f = 0.5``, 92 HU at
    ``f = 0.25`` and 145 HU at ``f = 0.1``, mean error < 5 HU; the noise grows towards the centre, where every ray
    crosses the most water (about 100 HU within 60 mm at ``f = 0.25``; the Ram-Lak estimate
    ``sigma^2 = pi^2 var(p) / (12 N_views d^2)`` gives 159 HU for the centre ray before the interpolation of the
    back-projection smooths it). Smaller pixels give noisier voxels. Higher
    than a clinical reconstruction with a soft kernel and ~1000 views: raise ``incident_photons`` to calibrate.
    Cost on one CPU core: about 0.3 s for a 256^2 slice and 2.4 s for 512^2 (``circle=True`` path, used when the
    slice is square and air outside the inscribed circle; about 2x more otherwise). The grid is unchanged
    (``grid = "corner"``).

    Input: HU, channel-first. The last ``spatial_dims`` axes are spatial; with ``spatial_dims=2`` the last two axes form
    the slice, with ``spatial_dims=3`` the transform runs slice by slice along the last axis (slices are the first two
    spatial axes). All leading (channel / batch) axes are looped over. Noise is fresh on every call.

    Args:
        dose_fraction: fraction ``f`` of the full dose (0 < f <= 1).
        incident_photons: full-dose photons per ray per view ``I0``.
        num_angles: number of views; default: the larger side of the slice.
        pixel_size_mm: in-plane pixel size; default: from a MetaTensor's affine, else 1.0 mm.
        spatial_dims: 2 (slices) or 3 (volume, sliced along the last axis).

    Example:
        >>> t = LowDoseCTNoise(0.25).set_random_state(0)
        >>> t(torch.zeros(1, 32, 32)).shape
        torch.Size([1, 32, 32])
    """

    backend = [TransformBackends.NUMPY]
    grid = "corner"

    def __init__(
        self,
        dose_fraction: float = 0.25,
        incident_photons: float = 1e5,
        num_angles: int | None = None,
        pixel_size_mm: float | None = None,
        spatial_dims: int = 2,
    ) -> None:
        RandomizableTransform.__init__(self, prob=1.0)
        if not 0 < dose_fraction <= 1:
            raise ValueError(f"dose_fraction must be in (0, 1], got {dose_fraction}")
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.dose_fraction = float(dose_fraction)
        self.incident_photons = float(incident_photons)
        self.num_angles = num_angles
        self.pixel_size_mm = pixel_size_mm
        self.spatial_dims = spatial_dims

    def randomize(self, data=None) -> None:
        self._do_transform = True

    def noise_slice(self, hu: np.ndarray, dose_fraction: float, pixel_size: float) -> np.ndarray:
        """Noise image (HU) for one 2D slice ``hu``."""
        from skimage.transform import iradon, radon

        n_angles = self.num_angles or max(hu.shape)
        theta = np.linspace(0.0, 180.0, int(n_angles), endpoint=False)
        mu = np.clip(MU_WATER_PER_MM * (1.0 + hu.astype(np.float64) / 1000.0), 0.0, None)
        h, w = hu.shape
        # circle=True (about 2x faster) needs a square slice with nothing attenuating outside the inscribed circle
        # (typical for CT slices, whose corners are air or padding); otherwise circle=False pads to the diagonal
        circle = False
        if h == w:
            yy, xx = np.mgrid[:h, :w] - (h - 1) / 2.0
            circle = not np.any(mu[yy**2 + xx**2 > (h // 2 - 1) ** 2] > 0)
        p = radon(mu, theta=theta, circle=circle) * pixel_size
        lam = self.incident_photons * dose_fraction
        counts = self.R.poisson(lam * np.exp(-p)).astype(np.float64)
        counts = np.maximum(counts, 0.5)
        dp = -np.log(counts / lam) - p
        noise_mu = iradon(dp / pixel_size, theta=theta, output_size=max(h, w), filter_name="ramp", circle=circle)
        big = noise_mu.shape[0]
        r0, c0 = (big - h) // 2, (big - w) // 2
        noise_mu = noise_mu[r0 : r0 + h, c0 : c0 + w]
        return 1000.0 * noise_mu / MU_WATER_PER_MM

    def __call__(self, img, dose_fraction: float | None = None):
        f = self.dose_fraction if dose_fraction is None else float(dose_fraction)
        x = convert_to_numpy(img).astype(np.float64)
        pixel = self.pixel_size_mm or pixel_size_from_affine(img, self.spatial_dims)
        if x.ndim < self.spatial_dims:
            raise ValueError(f"input of shape {x.shape} has fewer than spatial_dims={self.spatial_dims} axes")
        # bring to (..., H, W) slices
        if self.spatial_dims == 3:
            x_sl = np.moveaxis(x, -1, 0)  # (D, ..., H, W)
        else:
            x_sl = x
        flat = x_sl.reshape(-1, *x_sl.shape[-2:])
        out = np.empty_like(flat)
        for i in range(flat.shape[0]):
            out[i] = flat[i] + self.noise_slice(flat[i], f, pixel)
        out = out.reshape(x_sl.shape)
        if self.spatial_dims == 3:
            out = np.moveaxis(out, 0, -1)
        return convert_to_dst_type(out.astype(_float_dtype(img)), img, dtype=_float_dtype(img))[0]


class RandLowDoseCTNoise(RandomizableTransform):
    """Low-dose CT noise (see :class:`LowDoseCTNoise`) with probability ``prob`` and a dose fraction drawn uniformly
    from ``dose_range``.

    Args:
        prob: probability of adding noise.
        dose_range: ``(low, high)`` dose fraction.
        incident_photons, num_angles, pixel_size_mm, spatial_dims: see :class:`LowDoseCTNoise`.

    Example:
        >>> t = RandLowDoseCTNoise(prob=1.0).set_random_state(0)
        >>> t(torch.zeros(1, 16, 16)).shape
        torch.Size([1, 16, 16])
    """

    backend = LowDoseCTNoise.backend
    grid = "corner"

    def __init__(
        self,
        prob: float = 0.1,
        dose_range: tuple[float, float] = (0.1, 0.5),
        incident_photons: float = 1e5,
        num_angles: int | None = None,
        pixel_size_mm: float | None = None,
        spatial_dims: int = 2,
    ) -> None:
        RandomizableTransform.__init__(self, prob)
        self.dose_range = tuple(float(v) for v in dose_range)
        self.dose_fraction = self.dose_range[1]
        self.noise = LowDoseCTNoise(self.dose_fraction, incident_photons, num_angles, pixel_size_mm, spatial_dims)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.noise.set_random_state(state=self.R)
        return self

    def randomize(self, data=None) -> None:
        super().randomize(None)
        if self._do_transform:
            self.dose_fraction = float(self.R.uniform(*self.dose_range))

    def __call__(self, img, randomize: bool = True):
        if randomize:
            self.randomize()
        if not self._do_transform:
            return img
        self.noise.R = self.R
        return self.noise(img, self.dose_fraction)


class LowDoseCTNoised(RandomizableTransform, MapTransform):
    """Dictionary form of :class:`LowDoseCTNoise` (independent noise per key).

    Example:
        >>> t = LowDoseCTNoised("img", 0.25).set_random_state(0)
        >>> t({"img": torch.zeros(1, 16, 16)})["img"].shape
        torch.Size([1, 16, 16])
    """

    backend = LowDoseCTNoise.backend
    grid = "corner"

    def __init__(
        self,
        keys: KeysCollection,
        dose_fraction: float = 0.25,
        incident_photons: float = 1e5,
        num_angles: int | None = None,
        pixel_size_mm: float | None = None,
        spatial_dims: int = 2,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, 1.0)
        self.noise = LowDoseCTNoise(dose_fraction, incident_photons, num_angles, pixel_size_mm, spatial_dims)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.noise.set_random_state(state=self.R)
        return self

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        self.noise.R = self.R
        for key in self.key_iterator(d):
            d[key] = self.noise(d[key])
        return d


class RandLowDoseCTNoised(RandDictWrapper):
    """Dictionary form of :class:`RandLowDoseCTNoise`: one decision and dose per call, fresh noise per key.

    Example:
        >>> t = RandLowDoseCTNoised("img", prob=1.0).set_random_state(0)
        >>> t({"img": torch.zeros(1, 16, 16)})["img"].shape
        torch.Size([1, 16, 16])
    """

    backend = LowDoseCTNoise.backend
    grid = "corner"

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.1,
        dose_range: tuple[float, float] = (0.1, 0.5),
        incident_photons: float = 1e5,
        num_angles: int | None = None,
        pixel_size_mm: float | None = None,
        spatial_dims: int = 2,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, RandLowDoseCTNoise(1.0, dose_range, incident_photons, num_angles, pixel_size_mm, spatial_dims), prob, allow_missing_keys)
