"""Adversarial losses with one interface for the generator and the discriminator step."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss

__all__ = ["AdversarialLoss", "ADVERSARIAL_KINDS"]

ADVERSARIAL_KINDS = ("bce", "lsgan", "hinge", "ragan")


class AdversarialLoss(torch.nn.Module):
    """``discriminator(real, fake)`` and ``generator(real, fake)`` losses from discriminator logits.

    * ``bce``: the original GAN / SRGAN loss (non-saturating for the generator);
    * ``lsgan``: least squares on the raw outputs (Mao et al. 2017; CycleGAN's choice);
    * ``hinge``;
    * ``ragan``: relativistic average BCE (Jolicoeur-Martineau 2018; used by ESRGAN), where each side is
      judged against the mean of the other, so the generator also gets gradient from the real images.

    ``lsgan`` is MONAI's :class:`~monai.losses.PatchAdversarialLoss` without its optional leaky-ReLU, i.e. the
    published LSGAN. ``hinge`` is computed here (``relu(1 - real) + relu(1 + fake)``, generator ``-fake``):
    MONAI's hinge always passes the logits through a LeakyReLU(0.05) first, so a confidently rejected fake
    (logit -1) still costs the discriminator 0.95 instead of 0 (measured with closed-form values in the tests).
    ``bce`` and ``ragan`` are computed here from logits with ``binary_cross_entropy_with_logits``: MONAI's BCE
    applies a sigmoid and then ``BCELoss``, which saturates (log clamped at -100) and raises on a NaN input
    instead of letting the non-finite-loss check name it; MONAI has no relativistic form.

    Args:
        kind: one of :data:`ADVERSARIAL_KINDS`.

    Example:
        >>> loss = AdversarialLoss("ragan")
        >>> real, fake = torch.full((4, 1), 3.0), torch.full((4, 1), -3.0)
        >>> bool(loss.discriminator(real, fake) < loss.generator(real, fake))
        True
    """

    def __init__(self, kind: str = "bce") -> None:
        super().__init__()
        kind = str(kind).lower()
        if kind not in ADVERSARIAL_KINDS:
            raise ValueError(f"adversarial loss {kind!r} is not supported; choose one of {ADVERSARIAL_KINDS}")
        self.kind = kind
        if kind == "lsgan":
            self.patch_loss = PatchAdversarialLoss(criterion="least_squares", no_activation_leastsq=True)

    def discriminator(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """Loss of the discriminator: ``real`` logits should say real, ``fake`` (detached) logits fake."""
        if self.kind == "ragan":
            return 0.5 * (_bce(real - fake.mean(), True) + _bce(fake - real.mean(), False))
        if self.kind == "bce":
            return 0.5 * (_bce(real, True) + _bce(fake, False))
        if self.kind == "hinge":
            return 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
        return 0.5 * (self.patch_loss(real, target_is_real=True, for_discriminator=True)
                      + self.patch_loss(fake, target_is_real=False, for_discriminator=True))

    def generator(self, real: torch.Tensor | None, fake: torch.Tensor) -> torch.Tensor:
        """Loss of the generator; ``real`` (detached) is needed by ``ragan`` only."""
        if self.kind == "ragan":
            if real is None:
                raise ValueError("the relativistic loss needs the discriminator's output on real images")
            return 0.5 * (_bce(real - fake.mean(), False) + _bce(fake - real.mean(), True))
        if self.kind == "bce":
            return _bce(fake, True)  # non-saturating generator loss
        if self.kind == "hinge":
            return -fake.mean()
        return self.patch_loss(fake, target_is_real=True, for_discriminator=False)

    @torch.no_grad()
    def real_score(self, logits: torch.Tensor) -> float:
        """Mean "probability of real" the discriminator gives (sigmoid for BCE-type losses, raw for LSGAN)."""
        return float(logits.float().mean() if self.kind in ("lsgan", "hinge") else torch.sigmoid(logits.float()).mean())


def _bce(logits: torch.Tensor, real: bool) -> torch.Tensor:
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits, target)
