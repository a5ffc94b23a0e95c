"""The CycleGAN ResNet generator (pure architecture).

Reference:
    J.-Y. Zhu, T. Park, P. Isola, A. A. Efros, "Unpaired Image-to-Image Translation using Cycle-Consistent
    Adversarial Networks", ICCV 2017. https://arxiv.org/abs/1703.10593 (Appendix 7.2: c7s1-64, d128, d256,
    9 (6 for 128x128 images) residual blocks R256, u128, u64, c7s1-3; reflection padding, instance norm).
"""

from __future__ import annotations

import torch
from monai.networks.layers.factories import Act, Conv, Norm
from torch import nn

__all__ = ["ResnetGenerator"]


def _conv_in_relu(spatial_dims: int, c_in: int, c_out: int, kernel: int, stride: int = 1,
                  transpose: bool = False) -> nn.Sequential:
    if transpose:
        conv = Conv[Conv.CONVTRANS, spatial_dims](c_in, c_out, kernel, stride=stride, padding=1, output_padding=1)
    else:
        conv = Conv[Conv.CONV, spatial_dims](c_in, c_out, kernel, stride=stride, padding=kernel // 2,
                                             padding_mode="reflect")
    return nn.Sequential(conv, Norm[Norm.INSTANCE, spatial_dims](c_out), Act[Act.RELU](inplace=True))


class _ResBlock(nn.Module):
    def __init__(self, spatial_dims: int, features: int) -> None:
        super().__init__()
        conv_t, norm_t = Conv[Conv.CONV, spatial_dims], Norm[Norm.INSTANCE, spatial_dims]
        self.block = nn.Sequential(
            conv_t(features, features, 3, padding=1, padding_mode="reflect"), norm_t(features), Act[Act.RELU](),
            conv_t(features, features, 3, padding=1, padding_mode="reflect"), norm_t(features),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ResnetGenerator(nn.Module):
    """CycleGAN's ResNet generator: ``c7s1-F, d2F, d4F, num_blocks x R4F, u2F, uF, c7s1-out``.

    Convolutions pad by reflection (``padding_mode="reflect"``), as the paper does to reduce border
    artefacts. Output: the paper ends in ``tanh`` for images on [-1, 1]; images here are on [0, 1], so
    ``residual=False`` gives ``(tanh(y) + 1) / 2``. With ``residual=True`` (the default for enhancement,
    where input and output differ by noise or contrast, not anatomy) the output is ``x + y`` and the last
    convolution starts at zero, so an untrained generator is the identity and the cycle and identity losses
    start at zero.

    Inputs whose sizes are not multiples of 4 (two stride-2 stages) are edge-padded up to one and cropped
    back, so whole slices of any size translate. With 1 channel and 9 blocks the paper's RGB network has
    11.378 M parameters; this class gives the same for ``in_channels=out_channels=3``.

    Args:
        spatial_dims: 2 or 3.
        in_channels / out_channels: image channels (equal when ``residual``).
        features: F, the first layer's features (64 in the paper).
        num_blocks: residual blocks (9 for 256x256 images, 6 for 128x128).
        residual: output ``x + y`` instead of an absolute image.

    Example:
        >>> ResnetGenerator(features=8, num_blocks=2)(torch.zeros(1, 1, 30, 30)).shape
        torch.Size([1, 1, 30, 30])
    """

    #: inputs are padded to a multiple of this (two stride-2 stages) and cropped back (ONNX export reads it)
    multiple = 4

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 1, features: int = 64,
                 num_blocks: int = 9, residual: bool = True) -> None:
        super().__init__()
        if residual and in_channels != out_channels:
            raise ValueError(f"residual=True needs in_channels == out_channels, got {in_channels}, {out_channels}")
        f = features
        self.residual = residual
        self.model = nn.Sequential(
            _conv_in_relu(spatial_dims, in_channels, f, 7),
            _conv_in_relu(spatial_dims, f, 2 * f, 3, stride=2),
            _conv_in_relu(spatial_dims, 2 * f, 4 * f, 3, stride=2),
            *[_ResBlock(spatial_dims, 4 * f) for _ in range(num_blocks)],
            _conv_in_relu(spatial_dims, 4 * f, 2 * f, 3, stride=2, transpose=True),
            _conv_in_relu(spatial_dims, 2 * f, f, 3, stride=2, transpose=True),
        )
        self.out = Conv[Conv.CONV, spatial_dims](f, out_channels, 7, padding=3, padding_mode="reflect")
        if residual:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        pad: list[int] = []
        for i in range(len(size) - 1, -1, -1):  # F.pad order: last axis first
            pad += [0, (4 - size[i] % 4) % 4]
        xp = torch.nn.functional.pad(x, pad, mode="replicate") if sum(pad) > 0 else x
        y = self.out(self.model(xp))
        for i in range(len(size)):
            y = y.narrow(2 + i, 0, size[i])
        if self.residual:
            return x + y
        return (torch.tanh(y) + 1) / 2
