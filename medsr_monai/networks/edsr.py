"""EDSR: enhanced deep residual network for single-image super-resolution.

Reference:
    B. Lim, S. Son, H. Kim, S. Nah, K. M. Lee, "Enhanced Deep Residual Networks for Single Image
    Super-Resolution", CVPR Workshops (NTIRE) 2017. https://arxiv.org/abs/1707.02921
"""

from __future__ import annotations

import torch
from monai.networks.blocks import SubpixelUpsample
from monai.networks.layers.factories import Act, Conv
from torch import nn

__all__ = ["EDSR", "EDSRResBlock", "EDSR_VARIANTS"]

#: ``(num_blocks, features, res_scale)`` of the paper's two single-scale models (Sec. 3.1, Table 1).
EDSR_VARIANTS: dict[str, tuple[int, int, float]] = {
    "baseline": (16, 64, 1.0),
    "large": (32, 256, 0.1),
}


class EDSRResBlock(nn.Module):
    """EDSR residual block: ``x + res_scale * conv(ReLU(conv(x)))``, no batch normalisation.

    Args:
        spatial_dims: number of spatial dimensions.
        features: number of input and output channels.
        kernel_size: odd convolution kernel size ("same" padding).
        res_scale: residual scaling (0.1 in the large EDSR to stabilise training).

    Example:
        >>> blk = EDSRResBlock(spatial_dims=2, features=8)
        >>> blk(torch.zeros(1, 8, 16, 16)).shape
        torch.Size([1, 8, 16, 16])
    """

    def __init__(self, spatial_dims: int, features: int, kernel_size: int = 3, res_scale: float = 1.0) -> None:
        super().__init__()
        conv_t = Conv[Conv.CONV, spatial_dims]
        self.conv1 = conv_t(features, features, kernel_size=kernel_size, padding=kernel_size // 2)
        self.act = Act[Act.RELU](inplace=True)
        self.conv2 = conv_t(features, features, kernel_size=kernel_size, padding=kernel_size // 2)
        self.res_scale = float(res_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act(self.conv1(x))) * self.res_scale


def _upsample_stages(scale: int) -> list[int]:
    """Pixel-shuffle factors per stage: x2/x3 in one stage, powers of two as repeated x2 stages (x4 = 2 x2)."""
    if scale == 1:
        return []
    if scale == 3:
        return [3]
    if scale >= 2 and scale & (scale - 1) == 0:
        return [2] * (scale.bit_length() - 1)
    raise ValueError(f"EDSR supports scale 1, 3 or a power of two, got {scale}")


class EDSR(nn.Module):
    """EDSR (Lim et al. 2017), a post-upsampling network: it takes the LR image and upsamples it itself.

    ``head conv -> num_blocks x EDSRResBlock -> body conv (+ global skip from the head) -> upsampler -> tail conv``.
    The upsampler is MONAI's :class:`~monai.networks.blocks.SubpixelUpsample` without pad-pool, i.e. exactly the
    paper's ``conv(features -> features * r^d) -> pixel shuffle``; x2 and x3 use one stage, x4 two x2 stages (as in
    the paper; x8 three). MONAI's ``pixelshuffle`` is N-dimensional, so ``spatial_dims=3`` works too (a x2 stage
    convolves to ``8 * features`` channels). The sub-pixel convolutions start from ICNR initialisation
    (MONAI's default), which avoids checkerboard artefacts at initialisation.

    Differences from the paper's code: no RGB mean shift (single-channel images normalised to [0, 1]); instead
    ``input_offset`` is subtracted from the input and added back to the output (e.g. 0.5 centres [0, 1] data).
    When the network is used as a residual predictor (:class:`PhysicsSR`), keep
    ``input_offset=0`` so that a zero output means "no correction". In 2D MONAI's ``pixelshuffle`` orders channels
    like ``torch.nn.PixelShuffle``, so official EDSR weights map onto this layout by renaming keys only.

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).
        in_channels: number of input channels.
        out_channels: number of output channels.
        scale: upsampling factor: 1 (no upsampling, e.g. denoising), 3, or a power of two.
        num_blocks: number of residual blocks (16 baseline, 32 large).
        features: number of feature channels (64 baseline, 256 large).
        res_scale: residual scaling inside each block (1.0 baseline, 0.1 large).
        kernel_size: odd kernel size of all convolutions (3 in the paper).
        input_offset: constant subtracted from the input and added to the output.

    Example:
        >>> net = EDSR(spatial_dims=2, scale=4, num_blocks=2, features=16)
        >>> net(torch.zeros(1, 1, 12, 12)).shape
        torch.Size([1, 1, 48, 48])
        >>> EDSR.large(scale=2, in_channels=3, out_channels=3).num_blocks
        32
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        scale: int = 2,
        num_blocks: int = 16,
        features: int = 64,
        res_scale: float = 1.0,
        kernel_size: int = 3,
        input_offset: float = 0.0,
    ) -> None:
        super().__init__()
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be positive and odd, got {kernel_size}")
        if num_blocks < 0 or features < 1:
            raise ValueError(f"need num_blocks >= 0 and features >= 1, got {num_blocks}, {features}")
        stages = _upsample_stages(int(scale))

        self.spatial_dims = spatial_dims
        self.scale = int(scale)
        self.num_blocks = num_blocks
        self.features = features
        self.res_scale = float(res_scale)
        self.input_offset = float(input_offset)

        conv_t = Conv[Conv.CONV, spatial_dims]
        pad = kernel_size // 2
        self.head = conv_t(in_channels, features, kernel_size=kernel_size, padding=pad)
        blocks: list[nn.Module] = [
            EDSRResBlock(spatial_dims, features, kernel_size=kernel_size, res_scale=res_scale)
            for _ in range(num_blocks)
        ]
        blocks.append(conv_t(features, features, kernel_size=kernel_size, padding=pad))
        self.body = nn.Sequential(*blocks)
        # The paper's upsampler uses 3x3 convolutions regardless of the body's kernel size.
        self.upsample = nn.Sequential(
            *[
                SubpixelUpsample(
                    spatial_dims, features, features, scale_factor=r, conv_block="default", apply_pad_pool=False
                )
                for r in stages
            ]
        )
        self.tail = conv_t(features, out_channels, kernel_size=kernel_size, padding=pad)

    @classmethod
    def from_variant(cls, variant: str, scale: int = 2, **kwargs) -> EDSR:
        """Build one of :data:`EDSR_VARIANTS` (``"baseline"`` or ``"large"``); ``kwargs`` go to the constructor."""
        if variant not in EDSR_VARIANTS:
            raise ValueError(f"variant must be one of {tuple(EDSR_VARIANTS)}, got {variant!r}")
        num_blocks, features, res_scale = EDSR_VARIANTS[variant]
        return cls(scale=scale, num_blocks=num_blocks, features=features, res_scale=res_scale, **kwargs)

    @classmethod
    def baseline(cls, scale: int = 2, **kwargs) -> EDSR:
        """EDSR baseline: 16 blocks x 64 features, res_scale 1 (1.5 M parameters at x4 with RGB in the paper).

        Example:
            >>> EDSR.baseline(scale=2, spatial_dims=2).features
            64
        """
        return cls.from_variant("baseline", scale=scale, **kwargs)

    @classmethod
    def large(cls, scale: int = 2, **kwargs) -> EDSR:
        """EDSR: 32 blocks x 256 features, res_scale 0.1 (43 M parameters at x4 with RGB in the paper).

        Example:
            >>> EDSR.large(scale=4).res_scale
            0.1
        """
        return cls.from_variant("large", scale=scale, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, C_in, *spatial)`` to ``(B, C_out, *(scale * spatial))``."""
        x = self.head(x - self.input_offset)
        x = x + self.body(x)
        x = self.tail(self.upsample(x))
        return x + self.input_offset
