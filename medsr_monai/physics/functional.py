"""Functional degradations (torch) on the trailing ``spatial_dims`` axes of a tensor.

All functions accept a batch ``(B, C, *spatial)`` or a channel-first ``(C, *spatial)`` tensor (numpy arrays are
converted to tensors) and operate on the last ``spatial_dims`` axes only. ``scale`` is an int (same factor on every
spatial axis) or a sequence with one factor per spatial axis (``1`` leaves an axis alone, e.g. ``(1, 1, 4)`` for
through-plane degradation of a 3D volume).

Grid convention of every downsampling here: ``"corner"`` -- LR voxel ``i`` sits at HR voxel ``s * i`` (see
``medsr_monai.physics.grid`` and ``docs/PROTOCOL.md``). The matching interpolation baseline is
``grid_interpolate(..., grid="corner")`` and, for k-space truncation, :func:`kspace_zerofill`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "check_divisible",
    "decimate_downsample",
    "gaussian_blur",
    "kspace_downsample",
    "kspace_zerofill",
    "rescale_affine",
    "scale_factors",
]


def scale_factors(scale: int | Sequence[int], spatial_dims: int) -> list[int]:
    """Expand ``scale`` into one positive integer factor per spatial axis.

    Example:
        >>> scale_factors(2, 3)
        [2, 2, 2]
    """
    if spatial_dims not in (1, 2, 3):
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}")
    if isinstance(scale, (Sequence, np.ndarray, torch.Tensor)) and not isinstance(scale, str):
        scales = [s for s in (scale.tolist() if hasattr(scale, "tolist") else scale)]
    else:
        scales = [scale] * spatial_dims
    if len(scales) != spatial_dims:
        raise ValueError(f"got {len(scales)} scale factors {scales} for spatial_dims={spatial_dims}")
    out = []
    for s in scales:
        if float(s) != int(round(float(s))) or int(round(float(s))) < 1:
            raise ValueError(f"scale factors must be positive integers, got {scales}")
        out.append(int(round(float(s))))
    return out


def check_divisible(shape: Sequence[int], scales: Sequence[int], spatial_dims: int) -> None:
    """Raise ``ValueError`` (naming the shape and scale) if a spatial axis is not divisible by its factor."""
    if len(shape) < spatial_dims:
        raise ValueError(f"input of shape {tuple(shape)} has fewer than spatial_dims={spatial_dims} axes")
    spatial = tuple(int(n) for n in shape[len(shape) - spatial_dims :])
    bad = [n for n, s in zip(spatial, scales) if n % s]
    if bad:
        raise ValueError(
            f"spatial shape {spatial} (input shape {tuple(shape)}) is not divisible by scale {tuple(scales)}; "
            "crop or pad the high-resolution image to a multiple of the scale first"
        )


def _as_float_tensor(x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    elif not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if hasattr(x, "as_tensor"):  # MetaTensor -> plain tensor for the maths
        x = x.as_tensor()
    if torch.is_complex(x):
        return x
    return x if torch.is_floating_point(x) else x.float()


def _complex_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype in (torch.float64, torch.complex128) else torch.complex64


def _truncate_axis(spec: torch.Tensor, dim: int, m: int) -> torch.Tensor:
    """Keep the ``m`` lowest frequencies of a (norm='forward') spectrum along ``dim``; fold the LR Nyquist bin."""
    n = spec.shape[dim]
    if m == n:
        return spec
    half = m // 2
    if m % 2:  # odd: k = -(m-1)/2 .. (m-1)/2
        idx = list(range(0, half + 1)) + list(range(n - half, n))
        return spec.index_select(dim, torch.tensor(idx, device=spec.device))
    # even: k = -m/2 .. m/2-1 in FFT order; the LR Nyquist bin (k = +-m/2 alias at the LR samples) gets both halves
    idx = list(range(0, half)) + list(range(n - half, n))
    out = spec.index_select(dim, torch.tensor(idx, device=spec.device))
    pos = spec.narrow(dim, half, 1)  # HR bin +m/2 (exists because n > m)
    nyq = out.narrow(dim, half, 1) + pos
    return torch.cat([out.narrow(dim, 0, half), nyq, out.narrow(dim, half + 1, m - half - 1)], dim=dim)


def _zeropad_axis(spec: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """Zero-pad a (norm='forward') spectrum of size ``m`` along ``dim`` to ``n``; split the Nyquist bin."""
    m = spec.shape[dim]
    if m == n:
        return spec
    half = m // 2
    shape = list(spec.shape)
    if m % 2:
        low, high = spec.narrow(dim, 0, half + 1), spec.narrow(dim, half + 1, half)
        shape[dim] = n - m
        return torch.cat([low, spec.new_zeros(shape), high], dim=dim)
    low = spec.narrow(dim, 0, half)
    nyq = spec.narrow(dim, half, 1) * 0.5
    high = spec.narrow(dim, half + 1, half - 1)
    shape[dim] = n - m - 1
    return torch.cat([low, nyq, spec.new_zeros(shape), nyq, high], dim=dim)


def kspace_downsample(x: torch.Tensor, scale: int | Sequence[int], spatial_dims: int = 2) -> torch.Tensor:
    """Downsample by k-space truncation: keep the central ``N/s`` frequencies of each spatial axis.

    The spectrum (FFT with ``norm="forward"``, i.e. mean-normalised coefficients) is cropped to its central ``N/s``
    frequencies (the same as ``fftshift`` + centre crop) and inverse-transformed at the smaller size, so intensities are
    preserved (the mean is kept exactly). For an even LR size ``M`` the LR Nyquist bin receives both HR bins
    ``+-M/2`` (they alias onto each other at the LR samples), which keeps the result real and makes a band-limited
    image (all frequencies ``|k| < M/2``) reproduced *exactly* at the LR sample points.

    Grid convention: ``"corner"`` -- LR voxel ``i`` sits at HR voxel ``s * i``; the LR affine keeps the HR origin and
    multiplies the spacing by ``s``.

    Args:
        x: ``(B, C, *spatial)`` or ``(C, *spatial)`` tensor (numpy accepted); complex input is allowed.
        scale: integer factor, or one per spatial axis.
        spatial_dims: number of trailing spatial axes (2 or 3).

    Returns:
        Real tensor (complex if ``x`` was complex) with each spatial axis ``N`` replaced by ``N // s``.

    Raises:
        ValueError: if a spatial axis is not divisible by its factor (the message names shape and scale).

    Example:
        >>> kspace_downsample(torch.ones(1, 8, 8), 2).shape
        torch.Size([1, 4, 4])
    """
    x = _as_float_tensor(x)
    scales = scale_factors(scale, spatial_dims)
    check_divisible(x.shape, scales, spatial_dims)
    is_complex = torch.is_complex(x)
    out = x.to(_complex_dtype(x.dtype))
    for k, s in enumerate(scales):
        if s == 1:
            continue
        dim = x.ndim - spatial_dims + k
        spec = torch.fft.fft(out, dim=dim, norm="forward")
        out = torch.fft.ifft(_truncate_axis(spec, dim, out.shape[dim] // s), dim=dim, norm="forward")
    return out if is_complex else out.real.to(x.dtype)


def kspace_zerofill(x: torch.Tensor, scale: int | Sequence[int], spatial_dims: int = 2) -> torch.Tensor:
    """Upsample by k-space zero-filling: the inverse of :func:`kspace_downsample`.

    The (mean-normalised) spectrum is zero-padded from ``M`` to ``M * s`` frequencies per axis (an even-size Nyquist
    bin is split equally between ``+-M/2``) and inverse-transformed; the amplitude correction keeps intensities (and
    the mean). For a band-limited HR image ``x`` (all ``|k| < M/2``), ``kspace_zerofill(kspace_downsample(x, s), s)``
    reproduces ``x`` to floating-point accuracy. Grid convention: ``"corner"`` (LR voxel ``i`` -> HR voxel ``s*i``).

    Args:
        x: ``(B, C, *spatial)`` or ``(C, *spatial)`` LR tensor (numpy accepted).
        scale: integer factor, or one per spatial axis.
        spatial_dims: number of trailing spatial axes (2 or 3).

    Example:
        >>> kspace_zerofill(torch.ones(1, 4, 4), 2).shape
        torch.Size([1, 8, 8])
    """
    x = _as_float_tensor(x)
    scales = scale_factors(scale, spatial_dims)
    if x.ndim < spatial_dims:
        raise ValueError(f"input of shape {tuple(x.shape)} has fewer than spatial_dims={spatial_dims} axes")
    is_complex = torch.is_complex(x)
    out = x.to(_complex_dtype(x.dtype))
    for k, s in enumerate(scales):
        if s == 1:
            continue
        dim = x.ndim - spatial_dims + k
        spec = torch.fft.fft(out, dim=dim, norm="forward")
        out = torch.fft.ifft(_zeropad_axis(spec, dim, out.shape[dim] * s), dim=dim, norm="forward")
    return out if is_complex else out.real.to(x.dtype)


def _reflect_index(n: int, radius: int) -> torch.Tensor:
    """Indices ``-radius .. n-1+radius`` mirrored into ``0 .. n-1`` (``d c b | a b c d``, like ``F.pad`` reflect)."""
    idx = np.arange(-radius, n + radius)
    if n == 1:
        return torch.zeros(len(idx), dtype=torch.long)
    period = 2 * (n - 1)
    idx = np.mod(idx, period)
    idx = np.where(idx >= n, period - idx, idx)
    return torch.from_numpy(idx.astype(np.int64))


def gaussian_blur(
    x: torch.Tensor, sigma: float | Sequence[float], spatial_dims: int = 2, truncate: float = 4.0
) -> torch.Tensor:
    """Separable Gaussian blur of the last ``spatial_dims`` axes with reflect padding (any image size).

    Args:
        x: tensor with at least ``spatial_dims`` axes.
        sigma: standard deviation in voxels, one value or one per spatial axis; ``0`` skips an axis.
        spatial_dims: number of trailing spatial axes.
        truncate: kernel radius in units of sigma.

    Example:
        >>> gaussian_blur(torch.ones(1, 6, 6), 1.0).allclose(torch.ones(1, 6, 6))
        True
    """
    x = _as_float_tensor(x)
    sigmas = list(sigma) if isinstance(sigma, Sequence) else [sigma] * spatial_dims
    if len(sigmas) != spatial_dims:
        raise ValueError(f"got {len(sigmas)} sigmas for spatial_dims={spatial_dims}")
    out = x
    for k, sg in enumerate(sigmas):
        sg = float(sg)
        if sg < 0:
            raise ValueError(f"sigma must be non-negative, got {sigmas}")
        if sg == 0:
            continue
        dim = x.ndim - spatial_dims + k
        n = out.shape[dim]
        radius = max(1, int(math.ceil(truncate * sg)))
        t = torch.arange(-radius, radius + 1, dtype=torch.float64)
        kernel = torch.exp(-0.5 * (t / sg) ** 2)
        kernel = (kernel / kernel.sum()).to(out.dtype).to(out.device)
        padded = out.index_select(dim, _reflect_index(n, radius).to(out.device))
        moved = padded.movedim(dim, -1)
        lead = moved.shape[:-1]
        res = F.conv1d(moved.reshape(-1, 1, moved.shape[-1]), kernel.view(1, 1, -1))
        out = res.reshape(*lead, n).movedim(-1, dim)
    return out.contiguous()


def decimate_downsample(
    x: torch.Tensor,
    scale: int | Sequence[int],
    sigma: float | Sequence[float] | None = None,
    spatial_dims: int = 2,
) -> torch.Tensor:
    """Anti-aliasing Gaussian blur followed by decimation ``x[..., ::s, ::s]`` (e.g. CT in-plane).

    Grid convention: ``"corner"`` -- LR voxel ``i`` is HR voxel ``s * i`` (after blurring); the LR affine keeps the HR
    origin and multiplies the spacing by ``s``.

    Args:
        x: ``(B, C, *spatial)`` or ``(C, *spatial)`` tensor (numpy accepted).
        scale: integer factor, or one per spatial axis.
        sigma: Gaussian standard deviation in HR voxels (one or per axis); default ``0.5 * s`` per axis
            (``s = 2 -> 1.0``); axes with ``s = 1`` are not blurred by default. ``0`` means plain decimation.
        spatial_dims: number of trailing spatial axes (2 or 3).

    Raises:
        ValueError: if a spatial axis is not divisible by its factor.

    Example:
        >>> decimate_downsample(torch.ones(1, 8, 8), 2).shape
        torch.Size([1, 4, 4])
    """
    x = _as_float_tensor(x)
    scales = scale_factors(scale, spatial_dims)
    check_divisible(x.shape, scales, spatial_dims)
    if sigma is None:
        sigma = [0.5 * s if s > 1 else 0.0 for s in scales]
    out = gaussian_blur(x, sigma, spatial_dims)
    index = [slice(None)] * (x.ndim - spatial_dims) + [slice(None, None, s) for s in scales]
    return out[tuple(index)].contiguous()


def rescale_affine(
    img,
    factors: Sequence[float],
    spatial_dims: int,
    origin_shift: Sequence[float] | None = None,
):
    """Return ``img.affine`` rescaled for a grid change of the last ``spatial_dims`` tensor axes (``None`` if no affine).

    The affine column of each operated axis is multiplied by its factor (``s`` for downsampling by ``s``, ``1/s`` for
    upsampling); the origin moves by ``origin_shift[k]`` voxels of the *input* grid along axis ``k`` (``0`` = origin
    kept, which is the ``"corner"`` convention). Works for channel-first and batched (``is_batch``) MetaTensors.

    Example:
        >>> from monai.data import MetaTensor
        >>> rescale_affine(MetaTensor(torch.zeros(1, 4, 4)), [2, 2], 2).diagonal().tolist()
        [2.0, 2.0, 1.0, 1.0]
    """
    affine = getattr(img, "affine", None)
    if affine is None:
        return None
    affine = torch.as_tensor(affine).clone().to(torch.float64)
    rank = affine.shape[-1] - 1
    n_img_spatial = img.ndim - (2 if getattr(img, "is_batch", False) else 1)
    first = img.ndim - spatial_dims
    old = affine.clone()
    shifts = list(origin_shift) if origin_shift is not None else [0.0] * spatial_dims
    for k in range(spatial_dims):
        col = first + k - (img.ndim - n_img_spatial)
        if col < 0 or col >= rank:
            continue
        affine[..., :rank, col] = old[..., :rank, col] * float(factors[k])
        if shifts[k]:
            affine[..., :rank, rank] = affine[..., :rank, rank] + old[..., :rank, col] * float(shifts[k])
    return affine
