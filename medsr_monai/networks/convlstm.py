"""Bidirectional convolutional LSTM for through-plane (slice-sequence) super-resolution; pure architecture.

MONAI has no recurrent convolutional cell, so :class:`ConvLSTMCell` is written here (Shi et al. 2015) from
MONAI's ``Conv`` / ``Act`` factories; the interpolation is the project's TorchScript-compatible
:func:`~medsr_monai.transforms.grid.interpolate_scaled` on the ``"center"`` grid of
:mod:`medsr_monai.transforms.thickness`, so the model exports with ``ckpt_export``.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from monai.networks.layers.factories import Act, Conv
from monai.networks.layers.utils import get_act_layer
from torch import nn

from medsr_monai.transforms.grid import canonical_mode, interpolate_scaled
from medsr_monai.utils import as_bool

__all__ = ["ConvLSTMCell", "BiConvLSTMSR"]


class ConvLSTMCell(nn.Module):
    """One ConvLSTM step: the four gates from one convolution of ``[x, h]``; forget-gate bias starts at 1.

    Args:
        spatial_dims: dimensions of each sequence element (2 for slices).
        in_channels: channels of ``x``.
        hidden_channels: channels of ``h`` and ``c``.
        kernel_size: odd kernel size ('same' padding).

    Example:
        >>> cell = ConvLSTMCell(2, 4, 8)
        >>> h, c = cell(torch.zeros(1, 4, 16, 16), torch.zeros(1, 8, 16, 16), torch.zeros(1, 8, 16, 16))
        >>> h.shape
        torch.Size([1, 8, 16, 16])
    """

    def __init__(self, spatial_dims: int, in_channels: int, hidden_channels: int, kernel_size: int = 3):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd ('same' padding), got {kernel_size}")
        self.hidden_channels = hidden_channels
        self.conv = Conv[Conv.CONV, spatial_dims](in_channels + hidden_channels, 4 * hidden_channels, kernel_size,
                                                  padding=kernel_size // 2)
        with torch.no_grad():  # remember by default at the start (Jozefowicz et al. 2015)
            self.conv.bias.zero_()
            self.conv.bias[hidden_channels:2 * hidden_channels].fill_(1.0)
        self.sigmoid = Act[Act.SIGMOID]()
        self.tanh = Act[Act.TANH]()

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        i, f, o, g = torch.chunk(self.conv(torch.cat([x, h], dim=1)), 4, dim=1)
        c = self.sigmoid(f) * c + self.sigmoid(i) * self.tanh(g)
        h = self.sigmoid(o) * self.tanh(c)
        return h, c


class BiConvLSTMSR(nn.Module):
    """Through-plane SR: a window of ``T`` thick slices in, the ``T * scale`` thin slices they cover out.

    Input ``(B, C, T, *plane)`` (the slice sequence is the first spatial axis, ``plane`` has ``spatial_dims``
    axes), output ``(B, C, T * scale, *plane)``. Each thick slice is encoded by a small CNN; a forward and a
    backward ConvLSTM run along the sequence; a head maps ``[h_fwd, h_bwd, features]`` of thick slice ``k`` to the
    ``scale`` thin slices ``k*s .. k*s+s-1`` it covers (centre convention of
    :mod:`medsr_monai.transforms.thickness`). With ``residual=True`` the head predicts the correction to
    interpolation along the sequence on that same grid, and its last convolution starts at zero, so the
    untrained model returns exactly the interpolation baseline.

    Args:
        spatial_dims: in-plane dimensions (2: slices).
        in_channels: image channels (in = out).
        scale: through-plane factor ``s``.
        features: channels of the slice encoder and of the head.
        hidden_channels: ConvLSTM state channels per direction.
        kernel_size: in-plane kernel size of every convolution.
        act: MONAI activation (name or ``(name, args)``) of encoder and head; leaky by default: with plain ReLU
            and the zero-initialised last layer, training on this data pushed every ReLU of the head negative
            (the residual is ~0 on most voxels), after which the model stayed exactly at the baseline.
        residual: add interpolation along the sequence (``mode``, centre grid).
        mode: ``"linear"`` or ``"cubic"`` interpolation for the residual base.
        data_consistency: project the output onto the measurement: each group of ``scale`` thin slices
            ``k*s .. k*s+s-1`` gets ``x_k - mean(group)`` added, so that re-thickening the output with the box
            profile (:class:`~medsr_monai.transforms.SliceThickness`, ``profile="box"``) returns the input
            exactly. Box profile only (the projection for a box profile is this shift of each group's mean).
        profile: slice profile of the degradation the input comes from; with ``data_consistency`` only
            ``"box"`` is accepted (a Gaussian profile mixes neighbouring groups, this projection does not apply).

    Example:
        >>> net = BiConvLSTMSR(spatial_dims=2, scale=3, features=8, hidden_channels=8)
        >>> net(torch.rand(2, 1, 5, 16, 16)).shape
        torch.Size([2, 1, 15, 16, 16])
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, scale: int = 2, features: int = 32,
                 hidden_channels: int = 32, kernel_size: int = 3, act: str | tuple = ("leakyrelu", {"negative_slope": 0.2}), residual: bool = True,
                 mode: str = "linear", data_consistency: bool | str = False, profile: str = "box"):
        super().__init__()
        data_consistency = as_bool(data_consistency, "data_consistency")  # a CLI override arrives as a string
        if int(scale) < 1:
            raise ValueError(f"scale must be a positive integer, got {scale}")
        if data_consistency and profile != "box":
            raise ValueError(f"data_consistency projects onto the box-profile measurement (thick slice = mean of its "
                             f"thin slices) and does not apply to profile={profile!r}; set data_consistency=False")
        self.data_consistency, self.profile = bool(data_consistency), str(profile)
        self.spatial_dims, self.in_channels, self.scale = int(spatial_dims), int(in_channels), int(scale)
        self.residual, self.mode = bool(residual), canonical_mode(mode)
        conv = Conv[Conv.CONV, spatial_dims]
        pad = kernel_size // 2
        self.encoder = nn.Sequential(
            conv(in_channels, features, kernel_size, padding=pad), get_act_layer(act),
            conv(features, features, kernel_size, padding=pad), get_act_layer(act),
        )
        self.forward_cell = ConvLSTMCell(spatial_dims, features, hidden_channels, kernel_size)
        self.backward_cell = ConvLSTMCell(spatial_dims, features, hidden_channels, kernel_size)
        self.head = nn.Sequential(
            conv(2 * hidden_channels + features, features, kernel_size, padding=pad), get_act_layer(act),
            conv(features, in_channels * self.scale, kernel_size, padding=pad),
        )
        if self.residual:
            last = self.head[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        self.features, self.hidden_channels = features, hidden_channels

    def interpolate(self, x: torch.Tensor) -> torch.Tensor:
        """Interpolation along the sequence axis by ``scale`` on the centre grid (the baseline)."""
        scales: List[float] = [float(self.scale)] + [1.0] * self.spatial_dims
        return interpolate_scaled(x, scales, self.mode, "center")

    @torch.jit.export
    def project(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Data-consistency projection (box profile): ``y`` ``(B, C, T*s, *plane)`` shifted per group of ``s`` thin
        slices so that each group's mean equals the thick slice of ``x`` ``(B, C, T, *plane)`` it lies in."""
        b, ch, t = x.shape[0], x.shape[1], x.shape[2]
        plane: List[int] = list(x.shape[3:])
        groups = y.reshape([b, ch, t, self.scale] + plane)
        groups = groups + (x - groups.mean(dim=3)).unsqueeze(3)
        return groups.reshape([b, ch, t * self.scale] + plane)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, ch, t = x.shape[0], x.shape[1], x.shape[2]
        plane: List[int] = list(x.shape[3:])
        frames = x.movedim(2, 1).reshape([b * t, ch] + plane)
        feats = self.encoder(frames)
        nf = feats.shape[1]
        feats = feats.reshape([b, t, nf] + plane)
        zeros = torch.zeros([b, self.hidden_channels] + plane, dtype=x.dtype, device=x.device)
        h, c = zeros, zeros
        fwd: List[torch.Tensor] = []
        for i in range(t):
            h, c = self.forward_cell(feats[:, i], h, c)
            fwd.append(h)
        h, c = zeros, zeros
        bwd: List[torch.Tensor] = []
        for i in range(t - 1, -1, -1):
            h, c = self.backward_cell(feats[:, i], h, c)
            bwd.append(h)
        bwd.reverse()
        z = torch.cat([torch.stack(fwd, 1), torch.stack(bwd, 1), feats], dim=2)
        y = self.head(z.reshape([b * t, z.shape[2]] + plane))
        # (b*t, ch*s, *plane) -> (b, t, ch, s, *plane) -> (b, ch, t, s, *plane) -> (b, ch, t*s, *plane)
        y = y.reshape([b, t, ch, self.scale] + plane).movedim(1, 2).reshape([b, ch, t * self.scale] + plane)
        if self.residual:
            y = y + self.interpolate(x)
        if self.data_consistency:
            y = self.project(y, x)
        return y
