"""SRCNN: the three-layer super-resolution convolutional network.

Reference:
    C. Dong, C. C. Loy, K. He, X. Tang, "Learning a Deep Convolutional Network for Image Super-Resolution",
    ECCV 2014; and "Image Super-Resolution Using Deep Convolutional Networks", IEEE TPAMI 38(2), 2016.
    https://arxiv.org/abs/1501.00092
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.layers.factories import Act, Conv
from torch import nn

__all__ = ["SRCNN", "SRCNN_CONFIGS"]

#: Kernel sizes (f1, f2, f3) of the configurations studied in the TPAMI paper (Sec. 4.3.2).
SRCNN_CONFIGS: dict[str, tuple[int, int, int]] = {
    "9-1-5": (9, 1, 5),  # ECCV 2014 base network
    "9-3-5": (9, 3, 5),
    "9-5-5": (9, 5, 5),  # best trade-off reported in TPAMI 2016
}


def _parse_config(config: str) -> tuple[int, int, int]:
    if config in SRCNN_CONFIGS:
        return SRCNN_CONFIGS[config]
    parts = config.split("-")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"config must be one of {tuple(SRCNN_CONFIGS)} or 'f1-f2-f3', got {config!r}")
    return int(parts[0]), int(parts[1]), int(parts[2])


class SRCNN(nn.Module):
    """SRCNN (Dong et al. 2014/2016): patch extraction, non-linear mapping and reconstruction.

    ``conv(f1) -> ReLU -> conv(f2) -> ReLU -> conv(f3)``, with ``features = (n1, n2)`` filters in the first two
    layers. This is a *pre-upsampling* network: its input is the low-resolution image already interpolated onto
    the high-resolution grid (the paper used bicubic), and the output has the same spatial shape as the input.
    Wrap it in :class:`medsr_monai.networks.PhysicsSR` with ``pre_upsample=True`` to map LR to HR.

    Deviation from the paper: the paper trained with "valid" convolutions (no padding, output smaller than the
    input by ``f1 + f2 + f3 - 3`` voxels) and evaluated on the cropped centre. Here every convolution uses
    "same" zero padding (kernel sizes must be odd), so the output stays aligned voxel-for-voxel with the HR grid,
    which residual learning, full-image losses and metrics on the whole field of view require. Weights use
    PyTorch's default initialisation rather than the paper's Gaussian (std 0.001).

    Args:
        spatial_dims: number of spatial dimensions (2 or 3); 3 uses ``f x f x f`` kernels.
        in_channels: number of input channels (1 for single-channel medical images; the paper used the Y channel).
        out_channels: number of output channels.
        config: kernel sizes ``"f1-f2-f3"``; the paper's ``"9-1-5"``, ``"9-3-5"`` or ``"9-5-5"``
            (any odd ``"a-b-c"`` is accepted).
        features: numbers of filters ``(n1, n2)`` of the first two layers; the paper uses ``(64, 32)``.
        kernel_sizes: explicit ``(f1, f2, f3)``; overrides ``config`` when given.

    Example:
        >>> net = SRCNN(spatial_dims=2, config="9-1-5")
        >>> net(torch.zeros(1, 1, 33, 33)).shape
        torch.Size([1, 1, 33, 33])
        >>> sum(p.numel() for n, p in net.named_parameters() if n.endswith("weight"))
        8032
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        config: str = "9-5-5",
        features: Sequence[int] = (64, 32),
        kernel_sizes: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}")
        ks = tuple(int(k) for k in kernel_sizes) if kernel_sizes is not None else _parse_config(config)
        if len(ks) != 3:
            raise ValueError(f"kernel_sizes must have 3 entries, got {ks}")
        if any(k < 1 or k % 2 == 0 for k in ks):
            raise ValueError(f"kernel sizes must be positive and odd for 'same' padding, got {ks}")
        feats = tuple(int(f) for f in features)
        if len(feats) != 2:
            raise ValueError(f"features must have 2 entries (n1, n2), got {feats}")

        self.spatial_dims = spatial_dims
        self.kernel_sizes = ks
        self.features = feats
        conv_t = Conv[Conv.CONV, spatial_dims]
        chans = (in_channels, feats[0], feats[1], out_channels)
        # conv1: patch extraction, conv2: non-linear mapping, conv3: reconstruction
        self.conv1 = conv_t(chans[0], chans[1], kernel_size=ks[0], padding=ks[0] // 2)
        self.act1 = Act[Act.RELU](inplace=True)
        self.conv2 = conv_t(chans[1], chans[2], kernel_size=ks[1], padding=ks[1] // 2)
        self.act2 = Act[Act.RELU](inplace=True)
        self.conv3 = conv_t(chans[2], chans[3], kernel_size=ks[2], padding=ks[2] // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map an interpolated image ``(B, C_in, *spatial)`` to ``(B, C_out, *spatial)``."""
        x = self.act1(self.conv1(x))
        x = self.act2(self.conv2(x))
        return self.conv3(x)
