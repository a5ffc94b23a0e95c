"""Residual U-Net for same-size restoration (MRI reconstruction from zero-filled images, CT denoising).

MONAI's ``UNet`` is used as is; this wrapper only adds what restoration needs and MONAI's class lacks:

* any input size: ``UNet`` with stride-2 levels needs sizes divisible by the product of its strides; the input is
  padded (edge-replicated) to that multiple and the output cropped back, so whole slices of any size
  (e.g. 197x233 MNI slices) go through;
* residual output ``y = x + f(x)``: the network learns the correction (aliasing / noise), not the image;
* a zero-initialised 1x1 output convolution (``zero_init``), so an untrained model is the identity: training starts
  at the baseline (the zero-filled or low-dose input) instead of at a random image. ``UNet``'s own last layer cannot
  be zeroed for this (with residual units it ends in a skip connection), hence the separate head.

Pure architecture: no data or training logic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import List

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv
from monai.networks.nets import UNet
from torch import nn

__all__ = ["ResidualUNet"]


class ResidualUNet(nn.Module):
    """``y = x + head(UNet(pad(x)))`` cropped to the input size.

    Args:
        spatial_dims: 2 (slices) or 3.
        in_channels, out_channels: image channels (equal when ``residual``).
        channels: features per level of MONAI's ``UNet``; its length is the depth (levels), e.g. ``(32, 64, 128, 256)``.
        strides: down-sampling per level transition (``len(channels) - 1`` values, default all 2).
        num_res_units: residual units per level (MONAI ``UNet``; 0: plain conv blocks).
        norm, act, dropout: passed to ``UNet``.
        residual: add the input to the output.
        zero_init: zero the output convolution (identity at start when ``residual``).

    Example:
        >>> net = ResidualUNet(2, channels=(8, 16, 32))
        >>> x = torch.rand(1, 1, 37, 50)
        >>> bool(torch.equal(net(x), x))
        True
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 1,
                 channels: Sequence[int] = (32, 64, 128, 256), strides: Sequence[int] | None = None,
                 num_res_units: int = 1, norm: str | tuple = "instance", act: str | tuple = "PRELU",
                 dropout: float = 0.0, residual: bool = True, zero_init: bool = True):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) < 2:
            raise ValueError(f"channels={channels}: a U-Net needs at least 2 levels")
        strides = tuple(int(s) for s in (strides if strides is not None else [2] * (len(channels) - 1)))
        if len(strides) != len(channels) - 1:
            raise ValueError(f"strides={strides} needs len(channels) - 1 = {len(channels) - 1} values")
        if residual and in_channels != out_channels:
            raise ValueError(f"residual output needs in_channels == out_channels, got {in_channels}, {out_channels}")
        self.spatial_dims, self.residual = int(spatial_dims), bool(residual)
        multiple = 1
        for s in strides:
            multiple *= s
        self.multiple = int(multiple)
        # the body ends with channels[0] features (last_conv_only, no activation); the head maps them to the output
        self.body = UNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=channels[0],
                         channels=channels, strides=strides, num_res_units=num_res_units, norm=norm, act=act,
                         dropout=dropout)
        self.head = Conv[Conv.CONV, spatial_dims](channels[0], out_channels, kernel_size=1)
        if zero_init:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sizes: List[int] = list(x.shape[2:])  # not int(n): keeps sizes symbolic for torch.export / ONNX
        pads: List[int] = []
        for n in sizes[::-1]:  # F.pad lists the last axis first
            pads += [0, (self.multiple - n % self.multiple) % self.multiple]
        y = self.head(self.body(F.pad(x, pads, mode="replicate") if sum(pads) > 0 else x))
        for d in range(len(sizes)):
            y = y.narrow(2 + d, 0, sizes[d])
        return x + y if self.residual else y
