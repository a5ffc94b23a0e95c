"""Sharpness / perceptual measures that need no network weights.

PSNR and SSIM reward blur: the pixel-loss optimum is the conditional mean. Adversarial methods trade a
little PSNR for texture, so they are judged with measures of edges too:

* :func:`gmsd` — gradient magnitude similarity deviation (Xue et al., IEEE TIP 2014), a full-reference
  measure that correlates with human quality ratings as well as SSIM-family measures; 0 is perfect,
  higher is worse. Computed at full resolution (the paper first halves natural images; medical slices
  have no such viewing distance).
* :func:`sharpness_ratio` — mean gradient magnitude of the image over that of the reference: 1 is as
  sharp as the truth, below 1 blurrier (interpolation is typically 0.6–0.8 at x4), above 1 over-sharpened
  or noisy.

MONAI has neither (its perceptual metrics download networks), hence this module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["gradient_magnitude", "gmsd", "sharpness_ratio"]

#: GMSD's stability constant for [0, 1] images (170 for [0, 255] in the paper: 170 / 255^2)
GMSD_C = 170.0 / 255.0**2


def gradient_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Prewitt gradient magnitude of ``(B, C, H, W)`` images (or ``(C, H, W)``), replicate-padded."""
    x = x.float()
    squeeze = x.ndim == 3
    if squeeze:
        x = x[None]
    k = torch.tensor([[1.0, 0.0, -1.0]] * 3, device=x.device) / 3.0
    kx = k.view(1, 1, 3, 3).repeat(x.shape[1], 1, 1, 1)
    ky = k.t().contiguous().view(1, 1, 3, 3).repeat(x.shape[1], 1, 1, 1)
    xp = F.pad(x, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(xp, kx, groups=x.shape[1])
    gy = F.conv2d(xp, ky, groups=x.shape[1])
    g = torch.sqrt(gx**2 + gy**2)
    return g[0] if squeeze else g


def gmsd(pred: torch.Tensor, target: torch.Tensor, c: float = GMSD_C) -> torch.Tensor:
    """GMSD per image (batch dim kept): standard deviation of the gradient-magnitude similarity map.

    Example:
        >>> img = torch.rand(1, 1, 32, 32)
        >>> float(gmsd(img, img)[0])
        0.0
    """
    mp, mt = gradient_magnitude(pred), gradient_magnitude(target)
    gms = (2 * mp * mt + c) / (mp**2 + mt**2 + c)
    return gms.flatten(1).std(dim=1, unbiased=False) if gms.ndim == 4 else gms.std(unbiased=False)[None]


def sharpness_ratio(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean gradient magnitude of ``pred`` over that of ``target``, per image (1 = as sharp as the target)."""
    mp, mt = gradient_magnitude(pred), gradient_magnitude(target)
    if mp.ndim == 3:
        mp, mt = mp[None], mt[None]
    return mp.flatten(1).mean(1) / (mt.flatten(1).mean(1) + eps)
