"""Discriminators for the adversarial bundles (pure architecture)."""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Act, Pool
from monai.networks.nets import PatchDiscriminator
from torch import nn

__all__ = ["SRGANDiscriminator", "PatchGANDiscriminator"]

_LRELU = (Act.LEAKYRELU, {"negative_slope": 0.2})


class SRGANDiscriminator(nn.Module):
    """The SRGAN discriminator (Ledig et al. 2017, Fig. 4): eight 3x3 convolutions, 64 -> 512 features, with
    stride 2 in every second one, LeakyReLU(0.2), batch norm after the first; then dense 1024, LeakyReLU,
    dense 1 (a logit: the sigmoid lives in the loss).

    The paper flattens a fixed 96x96 input into its dense layer; here an adaptive average pool to
    ``pool_size`` comes first, so any patch size works and the dense layer stays the paper's shape for
    96x96 patches (``pool_size=6``).

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        features: first-layer features (doubled every two layers, 4 times).
        pool_size: spatial size fed to the dense layer.
        norm: MONAI norm name for layers 2..8 (``"batch"`` as in the paper).

    Example:
        >>> SRGANDiscriminator(features=8)(torch.zeros(2, 1, 40, 40)).shape
        torch.Size([2, 1])
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, features: int = 64, pool_size: int = 6,
                 norm: str | None = "batch") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for i in range(8):
            c_out = features * 2 ** (i // 2)
            layers.append(Convolution(spatial_dims, c_in, c_out, strides=1 + i % 2, kernel_size=3, act=_LRELU,
                                      norm=None if i == 0 else norm, bias=i == 0))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](pool_size)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c_in * pool_size ** spatial_dims, 1024),
                                        Act[Act.LEAKYRELU](negative_slope=0.2), nn.Linear(1024, 1))

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Activations after every stride-2 convolution (for a feature-matching loss)."""
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i % 2:
                out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


class PatchGANDiscriminator(PatchDiscriminator):
    """The pix2pix / CycleGAN "70x70 PatchGAN": MONAI's :class:`~monai.networks.nets.PatchDiscriminator` with
    the published settings (C64-C128-C256-C512, 4x4 kernels, stride 2 except the last two, LeakyReLU 0.2,
    instance norm, no norm on the first layer); its receptive field is 70x70 pixels in 2D.

    MONAI's class returns every intermediate feature map (for feature-matching losses); ``forward`` here
    returns only the last one, the per-patch logits, and :meth:`feature_maps` the full list.

    Args:
        norm: the normalisation of the inner layers (a MONAI ``Norm`` name or ``(name, args)``); ``None`` for none,
            which keeps the noise level of the input visible (instance norm rescales every feature map per image).
        bias: whether the normalised layers have a bias; ``None`` follows pix2pix (only with instance norm) and
            gives them one when there is no norm.

    Example:
        >>> PatchGANDiscriminator(channels=8)(torch.zeros(1, 1, 64, 64)).shape
        torch.Size([1, 1, 6, 6])
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, channels: int = 64, num_layers_d: int = 3,
                 norm: str | tuple | None = "INSTANCE", bias: bool | None = None, **kwargs) -> None:
        # pix2pix gives the normalised layers a bias exactly when the norm is instance norm (no affine shift);
        # without a norm nothing else can shift them, so they keep theirs too
        if bias is None:
            bias = norm is None or str(norm[0] if isinstance(norm, tuple) else norm).upper() == "INSTANCE"
        super().__init__(spatial_dims=spatial_dims, channels=channels, in_channels=in_channels, out_channels=1,
                         num_layers_d=num_layers_d, kernel_size=4, norm=norm, bias=bias, **kwargs)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every intermediate feature map, the logits last (MONAI's ``PatchDiscriminator.forward``)."""
        return super().forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x)[-1]
