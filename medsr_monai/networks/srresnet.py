"""SRResNet: the generator of SRGAN.

Reference:
    C. Ledig et al., "Photo-Realistic Single Image Super-Resolution Using a Generative Adversarial Network",
    CVPR 2017. https://arxiv.org/abs/1609.04802 (Fig. 4: B = 16 residual blocks, 64 features, PReLU,
    batch normalisation, two x2 sub-pixel stages for x4).
"""

from __future__ import annotations

import torch
from monai.networks.blocks import SubpixelUpsample
from monai.networks.layers.factories import Act, Conv, Norm
from torch import nn

from .edsr import _upsample_stages

__all__ = ["SRResNet", "SRResBlock"]


class SRResBlock(nn.Module):
    """``x + BN(conv(PReLU(BN(conv(x)))))``, the SRResNet residual block.

    Args:
        spatial_dims: number of spatial dimensions.
        features: input and output channels.
        norm: MONAI norm name (``"batch"`` as in the paper, ``"instance"``, or ``None`` for none).

    Example:
        >>> SRResBlock(2, 8)(torch.zeros(2, 8, 10, 10)).shape
        torch.Size([2, 8, 10, 10])
    """

    def __init__(self, spatial_dims: int, features: int, norm: str | None = "batch") -> None:
        super().__init__()
        conv_t = Conv[Conv.CONV, spatial_dims]
        norm_t = (lambda: Norm[norm, spatial_dims](features)) if norm else nn.Identity
        self.block = nn.Sequential(
            conv_t(features, features, kernel_size=3, padding=1),
            norm_t(),
            Act[Act.PRELU](num_parameters=features),
            conv_t(features, features, kernel_size=3, padding=1),
            norm_t(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class SRResNet(nn.Module):
    """SRResNet (Ledig et al. 2017), the SRGAN generator; trained with a pixel loss alone it is "SRResNet".

    ``conv9 + PReLU -> num_blocks x SRResBlock -> conv3 + BN (+ skip from the head) ->
    sub-pixel x2 stages (conv, pixel shuffle, PReLU) -> conv9``. The paper's upsampling stages are MONAI's
    :class:`~monai.networks.blocks.SubpixelUpsample` (ICNR initialised) followed by PReLU. One class serves
    2D and 3D (``spatial_dims``).

    Differences from the paper: single-channel images on [0, 1] instead of RGB on [-1, 1] (no output tanh, so
    that a residual wrapper can add its output to an interpolation); ``norm`` can drop batch normalisation (as
    ESRGAN does) because BN statistics of small medical batches are noisy.

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).
        in_channels / out_channels: image channels.
        scale: 1, 3 or a power of two (x4 = two x2 stages, as in the paper).
        num_blocks: residual blocks (16 in the paper).
        features: feature channels (64 in the paper).
        norm: ``"batch"`` (paper), ``"instance"`` or ``None``.

    Example:
        >>> SRResNet(scale=4, num_blocks=2, features=8)(torch.zeros(1, 1, 12, 12)).shape
        torch.Size([1, 1, 48, 48])
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 1, scale: int = 4,
                 num_blocks: int = 16, features: int = 64, norm: str | None = "batch") -> None:
        super().__init__()
        conv_t = Conv[Conv.CONV, spatial_dims]
        self.scale = int(scale)
        self.head = nn.Sequential(conv_t(in_channels, features, kernel_size=9, padding=4),
                                  Act[Act.PRELU](num_parameters=features))
        self.body = nn.Sequential(
            *[SRResBlock(spatial_dims, features, norm) for _ in range(num_blocks)],
            conv_t(features, features, kernel_size=3, padding=1),
            Norm[norm, spatial_dims](features) if norm else nn.Identity(),
        )
        stages: list[nn.Module] = []
        for r in _upsample_stages(self.scale):
            stages += [SubpixelUpsample(spatial_dims, features, features, scale_factor=r, conv_block="default",
                                        apply_pad_pool=False),
                       Act[Act.PRELU](num_parameters=features)]
        self.upsample = nn.Sequential(*stages)
        self.tail = conv_t(features, out_channels, kernel_size=9, padding=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, C_in, *spatial)`` to ``(B, C_out, *(scale * spatial))``."""
        h = self.head(x)
        return self.tail(self.upsample(h + self.body(h)))
