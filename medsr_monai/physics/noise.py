"""Noise physics (same grid): low-dose CT and Rician MR noise. The classical inverse is the noisy input itself."""

from __future__ import annotations

import numpy as np
import torch  # noqa: F401  (used in the examples)

from .base import Physics

__all__ = ["LowDoseCT", "RicianNoise"]


class _NoisePhysics(Physics):
    """Same-grid physics whose forward model draws noise; ``baseline`` is the input; no consistency step (the
    measurement *is* the image, a consistency step would return the noise)."""

    grid = "same"

    def __init__(self, spatial_dims: int = 2, seed: int | None = None) -> None:
        super().__init__(spatial_dims, dc=False)
        self.seed = seed
        self._transform = self._make_transform()
        if seed is not None:
            self._transform.set_random_state(int(seed))

    def _make_transform(self):
        raise NotImplementedError

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        self._transform.set_random_state(seed=seed, state=state)
        return self

    def A(self, x):  # noqa: N802
        return self._transform(x)


class LowDoseCT(_NoisePhysics):
    """Projection-domain low-dose CT noise on HU slices
    (:class:`~medsr_monai.transforms.noise.LowDoseCTNoise`: Poisson counts at ``dose_fraction`` of
    ``incident_photons`` per ray, ramp-filtered back-projection of the noise only).

    Args:
        dose_fraction: fraction of the full dose (0 < f <= 1).
        incident_photons: full-dose photons per ray and view.
        num_angles: views; default the larger side of the slice.
        pixel_size_mm: in-plane pixel size; default from a MetaTensor's affine, else 1 mm.
        spatial_dims: 2 (slices) or 3 (volume, slice by slice along the last axis).
        seed: seed of the noise stream.

    Example:
        >>> LowDoseCT(0.25, seed=0).A(torch.zeros(1, 32, 32)).shape
        torch.Size([1, 32, 32])
    """

    name = "low_dose_ct"

    def __init__(self, dose_fraction: float = 0.25, incident_photons: float = 1e5, num_angles: int | None = None,
                 pixel_size_mm: float | None = None, spatial_dims: int = 2, seed: int | None = None) -> None:
        self.dose_fraction, self.incident_photons = float(dose_fraction), float(incident_photons)
        self.num_angles, self.pixel_size_mm = num_angles, pixel_size_mm
        super().__init__(spatial_dims, seed)

    def _make_transform(self):
        from medsr_monai.transforms.noise import LowDoseCTNoise

        return LowDoseCTNoise(self.dose_fraction, self.incident_photons, self.num_angles, self.pixel_size_mm,
                              self.spatial_dims)

    def _params(self):
        return {"dose_fraction": self.dose_fraction, "incident_photons": self.incident_photons,
                "num_angles": self.num_angles, "pixel_size_mm": self.pixel_size_mm, "seed": self.seed}


class RicianNoise(_NoisePhysics):
    """Rician noise of a magnitude MR image (:class:`~medsr_monai.transforms.noise.RicianNoise`).

    Args:
        sigma: noise level (relative to the image's robust maximum when ``relative``).
        relative: interpret ``sigma`` relative to the image intensity range.
        spatial_dims: trailing spatial axes.
        seed: seed of the noise stream.

    Example:
        >>> RicianNoise(0.05, seed=0).A(torch.ones(1, 8, 8)).shape
        torch.Size([1, 8, 8])
    """

    name = "rician_noise"

    def __init__(self, sigma: float = 0.05, relative: bool = True, spatial_dims: int = 2,
                 seed: int | None = None) -> None:
        self.sigma, self.relative = float(sigma), bool(relative)
        super().__init__(spatial_dims, seed)

    def _make_transform(self):
        from medsr_monai.transforms.noise import RicianNoise as _Rician

        return _Rician(self.sigma, self.relative)

    def _params(self):
        return {"sigma": self.sigma, "relative": self.relative, "seed": self.seed}
