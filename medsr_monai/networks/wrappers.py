"""Wrappers that make every super-resolution network map the LR image to the HR image."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import List

import torch
from torch import nn

from medsr_monai.transforms.grid import GRID_CONVENTIONS, canonical_mode, interpolate_scaled

__all__ = ["InterpolationSR", "find_last_conv"]



def find_last_conv(net: nn.Module) -> nn.Module:
    """Return the last ``nn.Conv*`` / ``nn.ConvTranspose*`` module of ``net`` in registration order.

    Args:
        net: any module.

    Example:
        >>> find_last_conv(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 1, 3))).in_channels
        4
    """
    last = None
    for m in net.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            last = m
    if last is None:
        raise ValueError(f"{type(net).__name__} has no convolution layer to zero-initialise")
    return last


# --- TorchScript twin of medsr_monai.transforms.grid.grid_interpolate ------------------------------------------
class InterpolationSR(nn.Module):
    """Make any network map a low-resolution (LR) image to the high-resolution (HR) image.

    ``up = grid_interpolate(x, scale, mode, grid)``; then ``y = net(up)`` for pre-upsampling networks
    (``pre_upsample=True``, e.g. :class:`SRCNN`) or ``y = net(x)`` for networks that upsample themselves
    (``pre_upsample=False``, e.g. :class:`EDSR`); with ``residual=True`` the output is ``y + up``, so the
    network only learns the correction to the interpolation. With ``zero_init_last=True`` (and ``residual``) the
    weights and bias of the network's last convolution are zeroed, so at initialisation the model returns
    exactly the interpolation baseline and training can only start from there.

    The LR grid convention matters: ``grid="corner"`` (LR voxel ``i`` at HR voxel ``s*i``) is what k-space
    truncation and decimation produce, ``grid="center"`` what block averaging produces. It must match the
    degradation that created the LR data; the network never sees how its input was degraded, and a mismatched
    interpolation shifts ``up`` by half an HR voxel, which the network then has to learn to undo (and which makes
    the interpolation baseline look worse than it is). See :mod:`medsr_monai.transforms.grid`.

    The interpolation is :func:`medsr_monai.transforms.grid.interpolate_scaled`, the TorchScript-compatible core
    of ``grid_interpolate``, so the wrapper can be exported with MONAI's ``ckpt_export``.

    Args:
        net: the network; must accept the interpolated image (``pre_upsample=True``) or the LR image and
            return the HR shape. With ``residual``, its output channels must equal the input channels.
        scale: upsampling factor, one for all spatial axes or one per axis (per-axis only for pre-upsampling).
        mode: ``"nearest"``, ``"linear"`` or ``"cubic"`` (aliases ``bilinear``, ``bicubic``, ... accepted).
        grid: LR grid convention, ``"corner"`` or ``"center"``.
        pre_upsample: feed ``net`` the interpolated image instead of the LR image.
        residual: add the interpolated image to the network output.
        spatial_dims: number of spatial dimensions (trailing axes of ``x``).
        zero_init_last: zero the last convolution of ``net`` when ``residual`` is on.

    Example:
        >>> from medsr_monai.networks import EDSR, SRCNN
        >>> model = InterpolationSR(EDSR(scale=2, num_blocks=2, features=16), scale=2)
        >>> model(torch.rand(1, 1, 8, 8)).shape
        torch.Size([1, 1, 16, 16])
        >>> model = InterpolationSR(SRCNN(config="9-1-5"), scale=3, pre_upsample=True)
        >>> model(torch.rand(1, 1, 8, 8)).shape
        torch.Size([1, 1, 24, 24])
    """

    def __init__(
        self,
        net: nn.Module,
        scale: int | float | Sequence[int | float] = 2,
        mode: str = "cubic",
        grid: str = "corner",
        pre_upsample: bool = False,
        residual: bool = True,
        spatial_dims: int = 2,
        zero_init_last: bool = True,
    ) -> None:
        super().__init__()
        mode = canonical_mode(mode)
        if grid not in GRID_CONVENTIONS:
            raise ValueError(f"grid must be one of {GRID_CONVENTIONS}, got {grid!r}")
        scales = [float(s) for s in scale] if isinstance(scale, Sequence) else [float(scale)] * spatial_dims
        if len(scales) != spatial_dims:
            raise ValueError(f"got {len(scales)} scale factors for spatial_dims={spatial_dims}")
        if any(s <= 0 for s in scales):
            raise ValueError(f"scale factors must be positive, got {scales}")
        net_scale = getattr(net, "scale", None)
        if isinstance(net_scale, int):
            expected = 1 if pre_upsample else net_scale
            if any(s != expected for s in scales):
                raise ValueError(
                    f"{type(net).__name__} upsamples by {net_scale}; with pre_upsample={pre_upsample} the wrapper "
                    f"scale must be {expected if pre_upsample else net_scale}, got {scales}"
                )
        if residual and float(getattr(net, "input_offset", 0.0)) != 0.0:
            warnings.warn(
                f"{type(net).__name__}.input_offset is non-zero with residual=True: the network output is then "
                "offset from the interpolation baseline; use input_offset=0 for residual learning.",
                stacklevel=2,
            )

        self.net = net
        self.scales: List[float] = scales
        self.mode: str = mode
        self.grid: str = grid
        self.pre_upsample: bool = bool(pre_upsample)
        self.residual: bool = bool(residual)
        self.spatial_dims: int = spatial_dims
        if residual and zero_init_last:
            last = find_last_conv(net)
            with torch.no_grad():
                last.weight.zero_()
                if last.bias is not None:
                    last.bias.zero_()

    def interpolate(self, x: torch.Tensor) -> torch.Tensor:
        """The interpolation baseline ``grid_interpolate(x, scale, mode, grid)`` that the wrapper uses."""
        return interpolate_scaled(x, self.scales, self.mode, self.grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map the LR image ``(B, C, *spatial)`` to the HR image ``(B, C_out, *(scale * spatial))``."""
        up = interpolate_scaled(x, self.scales, self.mode, self.grid)
        if self.pre_upsample:
            y = self.net(up)
        else:
            y = self.net(x)
        if self.residual:
            y = y + up
        return y
