"""Cartesian k-space undersampling (accelerated MRI), single coil, retrospective from magnitude images.

The measurement is represented in the image domain: the *complex* zero-filled image ``y = F^-1(M F x)`` as two
channels ``(real, imaginary)``. The unitary centred FFT ``F`` makes that equivalent to the sampled k-space lines,
it keeps the measurement image-shaped (so MONAI transforms, patches and sliding windows work on it) and it keeps
the phase that exact data consistency needs; its magnitude is the usual zero-filled reconstruction.

Masks are MONAI's fastMRI masks (``EquispacedKspaceMask`` / ``RandomKspaceMask``): lines along the last axis
(phase encoding), a fully sampled centre band plus equispaced or random lines.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.utils import convert_to_tensor

from .base import Physics
from .functional import _as_float_tensor

__all__ = ["CartesianUndersampling", "centered_fft2", "centered_ifft2", "to_complex", "from_complex"]


def centered_fft2(x: torch.Tensor) -> torch.Tensor:
    """Unitary 2D FFT over the last two axes with the zero frequency in the centre (as ``monai.data.fftn_centered``)."""
    x = torch.fft.ifftshift(x, dim=(-2, -1))
    return torch.fft.fftshift(torch.fft.fft2(x, norm="ortho"), dim=(-2, -1))


def centered_ifft2(k: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`centered_fft2`."""
    k = torch.fft.ifftshift(k, dim=(-2, -1))
    return torch.fft.fftshift(torch.fft.ifft2(k, norm="ortho"), dim=(-2, -1))


def to_complex(y: torch.Tensor) -> torch.Tensor:
    """``(..., 2C, H, W)`` real/imaginary channel pairs -> ``(..., C, H, W)`` complex."""
    c = y.shape[-3]
    if c % 2:
        raise ValueError(f"a complex image needs (real, imaginary) channel pairs, got {c} channels "
                         f"(shape {tuple(y.shape)})")
    y = y.reshape(*y.shape[:-3], c // 2, 2, *y.shape[-2:])
    return torch.complex(y[..., 0, :, :].contiguous(), y[..., 1, :, :].contiguous())


def from_complex(z: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_complex`."""
    out = torch.stack([z.real, z.imag], dim=-3)
    return out.reshape(*z.shape[:-3], 2 * z.shape[-3], *z.shape[-2:])


class CartesianUndersampling(Physics):
    """Cartesian undersampling of the phase-encoding lines (last axis) of a 2D slice.

    * ``A(x)``: ``x`` real ``(B, C, H, W)`` -> complex zero-filled image ``(B, 2C, H, W)`` (real, imaginary);
    * ``baseline(y)``: the zero-filled reconstruction, the magnitude ``|y|`` ``(B, C, H, W)``;
    * ``consistency(z, y)``: replace the sampled lines of ``F z`` by those of ``F y``; ``z`` real ``(B, C, H, W)`` or
      complex ``(B, 2C, H, W)``, result complex ``(B, 2C, H, W)``. A projection: idempotent, ``A``-consistent.
      Take :meth:`magnitude` for the image.

    The sampled lines are read from the measurement itself (the unsampled lines of ``F y`` are zero up to
    floating-point rounding, ``tol`` relative to the strongest line), so training with a fresh random mask per
    sample needs no side channel.

    Args:
        mask_type: ``"equispaced"`` or ``"random"`` (MONAI's fastMRI masks).
        acceleration: ``R``; about ``1/R`` of the lines are sampled.
        center_fraction: fraction of lines in the fully sampled centre band.
        seed: seed of the mask: every call of ``A`` uses the same mask (for a given width).
        random: draw a new mask on every call of ``A`` (training augmentation); ``seed`` seeds that stream.
        dc: models apply the consistency step.
        tol: relative line energy below which a line counts as not sampled.

    Example:
        >>> p = CartesianUndersampling("equispaced", 4, 0.08, seed=0)
        >>> y = p.A(torch.rand(1, 1, 32, 32)); y.shape, p.baseline(y).shape
        (torch.Size([1, 2, 32, 32]), torch.Size([1, 1, 32, 32]))
    """

    name = "cartesian_undersampling"
    grid = "same"
    has_consistency = True

    def __init__(self, mask_type: str = "equispaced", acceleration: float = 4, center_fraction: float = 0.08,
                 seed: int = 0, random: bool = False, dc: bool = True, tol: float = 1e-10) -> None:
        super().__init__(2, dc)
        from medsr_monai.transforms.undersample import make_kspace_mask

        self.mask_type, self.acceleration, self.center_fraction = str(mask_type), float(acceleration), float(
            center_fraction)
        self.seed, self.random, self.tol = int(seed), bool(random), float(tol)
        self._mask_fn = make_kspace_mask(self.mask_type, self.acceleration, self.center_fraction)
        self._rng = np.random.RandomState(self.seed)
        self.last_mask: torch.Tensor | None = None

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        """MONAI-style seeding of the random-mask stream."""
        self._rng = state if state is not None else np.random.RandomState(seed)
        return self

    def mask(self, width: int) -> torch.Tensor:
        """The line mask ``(width,)`` (1 = sampled) of the next ``A`` call."""
        if self.random:
            self._mask_fn.set_random_state(state=self._rng)
        else:
            self._mask_fn.set_random_state(self.seed)
        probe = torch.zeros(1, 1, width, 2)
        self._mask_fn(probe)
        return torch.as_tensor(np.asarray(self._mask_fn.mask), dtype=torch.float32).reshape(-1)[:width]

    def A(self, x):  # noqa: N802
        x = _as_float_tensor(convert_to_tensor(x, track_meta=False))
        self._check_spatial(x, "A")
        m = self.mask(x.shape[-1]).to(x.device)
        self.last_mask = m
        k = centered_fft2(x.to(torch.complex64 if x.dtype != torch.float64 else torch.complex128))
        return from_complex(centered_ifft2(k * m)).to(x.dtype)

    def sampled_lines(self, y: torch.Tensor) -> torch.Tensor:
        """``(..., C, 1, W)`` boolean mask of the lines present in the measurement ``y``."""
        k = centered_fft2(to_complex(y))
        energy = k.abs().pow(2).sum(dim=-2, keepdim=True)
        return energy > self.tol * energy.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(energy.dtype).tiny)

    def baseline(self, y):
        return self.magnitude(_as_float_tensor(y))

    def init_estimate(self, y):
        return _as_float_tensor(y)

    def to_image(self, z):
        return self.magnitude(z)

    @staticmethod
    def magnitude(z: torch.Tensor) -> torch.Tensor:
        """``|z|`` of a ``(..., 2C, H, W)`` complex image: ``(..., C, H, W)``."""
        return to_complex(z).abs()

    def consistency(self, x_hat, y):
        y = _as_float_tensor(y)
        x_hat = _as_float_tensor(x_hat).to(y.dtype)
        z = to_complex(x_hat) if x_hat.shape[-3] == y.shape[-3] else x_hat.to(torch.complex64 if y.dtype != torch.float64 else torch.complex128)
        k_hat, k_y = centered_fft2(z), centered_fft2(to_complex(y))
        k = torch.where(self.sampled_lines(y), k_y, k_hat)
        return from_complex(centered_ifft2(k)).to(y.dtype)

    def _params(self):
        return {"mask_type": self.mask_type, "acceleration": self.acceleration,
                "center_fraction": self.center_fraction, "seed": self.seed, "random": self.random}
