"""In-plane resolution loss on the ``"corner"`` grid: k-space truncation (MR) and anti-aliased decimation (CT).

Both put LR voxel ``i`` at HR voxel ``s*i`` (``docs/PROTOCOL.md``): the LR affine keeps the HR origin. Their
matched classical inverses differ: k-space zero-filling is the exact right inverse of truncation (it is what an MR
scanner's own reconstruction of a low-resolution acquisition would interpolate to), cubic interpolation on the
corner grid is the usual inverse of decimation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch  # noqa: F401  (used in the examples)

from .base import Physics
from .functional import _as_float_tensor, check_divisible, decimate_downsample, kspace_downsample, kspace_zerofill, scale_factors
from .grid import interpolate_scaled

__all__ = ["KSpaceTruncation", "Decimation", "ResolutionPhysics"]


class ResolutionPhysics(Physics):
    """Common part of the grid-changing in-plane physics: integer ``scale`` per spatial axis, corner grid."""

    grid = "corner"

    def __init__(self, scale: int | Sequence[int] = 2, spatial_dims: int = 2, dc: bool = False) -> None:
        super().__init__(spatial_dims, dc)
        self._scale = tuple(scale_factors(scale, self.spatial_dims))

    @property
    def scale(self) -> tuple[int, ...]:
        return self._scale

    def _params(self):
        return {"scale": list(self._scale)}

    def check_hr_shape(self, shape: Sequence[int]) -> None:
        """Raise ``ValueError`` naming shape and scale when the HR shape is not a multiple of the scale."""
        check_divisible(shape, self._scale, self.spatial_dims)


class KSpaceTruncation(ResolutionPhysics):
    """MR in-plane resolution loss: keep the central ``N/s`` frequencies of each axis.

    * ``A``: :func:`~medsr_monai.physics.functional.kspace_downsample` (mean-normalised spectrum, LR Nyquist bin
      folded so the result is real and a band-limited image is sampled exactly);
    * ``baseline``: k-space zero-filling, the exact right inverse: ``A(baseline(y)) == y``;
    * ``consistency(x_hat, y) = x_hat - P x_hat + baseline(y)`` with ``P = baseline o A`` the projection onto the
      measured band: the measured frequencies are replaced by the measurement, the rest of ``x_hat`` is kept. It is
      a projection (idempotent) and ``A(consistency(x_hat, y)) == y``. Computed as ``x_hat + baseline(y - A(x_hat))``
      (zero-filling is linear): one truncation and one zero-fill.

    Args:
        scale: integer factor, or one per spatial axis.
        spatial_dims: trailing spatial axes (2 for slices, 3 for volumes).
        dc: models apply the consistency step after their network.

    Example:
        >>> p = KSpaceTruncation(2)
        >>> y = p.A(torch.rand(1, 1, 16, 16)); torch.allclose(p.A(p.baseline(y)), y, atol=1e-5)
        True
    """

    name = "kspace_truncation"
    has_consistency = True

    def A(self, x):  # noqa: N802
        return kspace_downsample(x, list(self.scale), self.spatial_dims)

    def baseline(self, y):
        return kspace_zerofill(y, list(self.scale), self.spatial_dims)

    def consistency(self, x_hat, y):
        x_hat = _as_float_tensor(x_hat)
        return x_hat + self.baseline(_as_float_tensor(y).to(x_hat.dtype) - self.A(x_hat))


class Decimation(ResolutionPhysics):
    """CT in-plane resolution loss: Gaussian anti-aliasing blur (sigma ``0.5 s`` HR voxels by default), then
    ``x[::s]``.

    * ``A``: :func:`~medsr_monai.physics.functional.decimate_downsample`;
    * ``baseline``: Keys cubic interpolation (a=-0.5) on the corner grid;
    * ``consistency(x_hat, y) = x_hat + step * cubic(y - A(x_hat))``, ``steps`` times: iterative back-projection
      (Irani & Peleg). It is **not** a projection: cubic is not the adjoint of ``A`` and the blur removes
      frequencies no step can restore, so each step moves ``A(x_hat)`` toward ``y`` without reaching it.

    Args:
        scale: integer factor, or one per spatial axis.
        sigma: blur standard deviation in HR voxels (one or per axis); ``None``: ``0.5 * s``; ``0``: plain decimation.
        spatial_dims: trailing spatial axes.
        dc: models apply the back-projection after their network.
        steps: back-projection steps per consistency call.
        step: step size of each.

    Example:
        >>> Decimation(2).A(torch.rand(1, 1, 16, 16)).shape
        torch.Size([1, 1, 8, 8])
    """

    name = "decimation"
    has_consistency = True

    def __init__(self, scale: int | Sequence[int] = 2, sigma: float | Sequence[float] | None = None,
                 spatial_dims: int = 2, dc: bool = False, steps: int = 1, step: float = 1.0) -> None:
        super().__init__(scale, spatial_dims, dc)
        self.sigma = None if sigma is None else (float(sigma) if not isinstance(sigma, Sequence) else
                                                 [float(s) for s in sigma])
        self.steps, self.step = int(steps), float(step)

    def A(self, x):  # noqa: N802
        return decimate_downsample(x, list(self.scale), self.sigma, self.spatial_dims)

    def baseline(self, y):
        return interpolate_scaled(_as_float_tensor(y), [float(s) for s in self.scale], "cubic", "corner")

    def consistency(self, x_hat, y):
        x_hat = _as_float_tensor(x_hat)
        y = _as_float_tensor(y).to(x_hat.dtype)
        for _ in range(self.steps):
            x_hat = x_hat + self.step * self.baseline(y - self.A(x_hat))
        return x_hat

    def _params(self):
        return {**super()._params(), "sigma": self.sigma, "steps": self.steps, "step": self.step}

