"""Accelerated MRI physics: Cartesian k-space undersampling of a magnitude image and its zero-filled reconstruction.

The masks and FFTs are MONAI's (``monai.apps.reconstruction``: ``EquispacedKspaceMask`` / ``RandomKspaceMask``, the
fastMRI masks, and the centred FFTs of ``monai.data.fft_utils``). These wrappers only turn a real magnitude slice into
the zero-filled image the model sees, which MONAI's mask transforms (k-space in, k-space out) do not:

    image (C, H, W) -> centred 2D FFT -> line mask along the last axis (phase encoding; a fully sampled centre band of
    ``center_fraction`` of the lines plus equispaced or random lines, about ``1 / acceleration`` of them in total)
    -> inverse FFT -> magnitude (C, H, W) = the zero-filled reconstruction.

Single coil, no noise, no phase: the source images are magnitude scans, so this is a retrospective simulation (as in
most fastMRI-style studies on magnitude data). The grid is unchanged (``grid = "corner"``, affine kept).

* :class:`KspaceUndersample` / :class:`KspaceUndersampled`: a *fixed* mask (drawn from ``seed`` on every call, so all
  slices of the same width share it): validation, test and inference inputs, comparable between runs.
* :class:`RandKspaceUndersample` / :class:`RandKspaceUndersampled`: a fresh mask per call (training augmentation).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.apps.reconstruction.transforms.array import EquispacedKspaceMask, KspaceMask, RandomKspaceMask
from monai.config import KeysCollection
from monai.data.fft_utils import fftn_centered
from monai.transforms import MapTransform, Randomizable, Transform
from monai.utils import convert_to_dst_type, convert_to_tensor

__all__ = [
    "KSPACE_MASKS",
    "KspaceUndersample",
    "KspaceUndersampled",
    "RandKspaceUndersample",
    "RandKspaceUndersampled",
    "make_kspace_mask",
    "zero_filled_volume",
]

KSPACE_MASKS = {"equispaced": EquispacedKspaceMask, "random": RandomKspaceMask}


def make_kspace_mask(mask_type: str, acceleration: float, center_fraction: float) -> KspaceMask:
    """MONAI's fastMRI mask by name (``equispaced`` or ``random``), one acceleration and centre fraction."""
    key = str(mask_type).lower()
    if key not in KSPACE_MASKS:
        raise ValueError(f"mask_type={mask_type!r} is not supported; choose one of {tuple(KSPACE_MASKS)}")
    if not acceleration >= 1:
        raise ValueError(f"acceleration must be >= 1, got {acceleration}")
    if not 0 < center_fraction < 1:
        raise ValueError(f"center_fraction must be in (0, 1), got {center_fraction}")
    if center_fraction > 1.0 / acceleration:
        raise ValueError(f"center_fraction={center_fraction} samples more lines than acceleration={acceleration} "
                         "allows")
    return KSPACE_MASKS[key](center_fractions=[float(center_fraction)], accelerations=[float(acceleration)],
                             spatial_dims=2, is_complex=True)


def _zero_filled(img, mask: KspaceMask) -> tuple[torch.Tensor, np.ndarray]:
    """Zero-filled magnitude of ``img`` (C, H, W) under one draw of ``mask`` (same draw for every channel)."""
    x = convert_to_tensor(img, dtype=torch.float32, track_meta=False)
    if x.ndim != 3:
        raise ValueError(f"k-space undersampling expects a channel-first 2D image (C, H, W), got shape "
                         f"{tuple(x.shape)}")
    kspace = fftn_centered(torch.stack([x, torch.zeros_like(x)], dim=-1), spatial_dims=2, is_complex=True)
    state = mask.R.get_state()
    out = []
    for c in range(x.shape[0]):
        mask.R.set_state(state)  # coils/channels share the acquisition's mask
        _, zf = mask(kspace[c : c + 1])  # MONAI returns (masked k-space, root-sum-of-squares magnitude)
        out.append(zf.reshape(x.shape[1:]))
    lines = np.asarray(mask.mask).reshape(-1)
    return torch.stack(out), lines


class KspaceUndersample(Transform):
    """Zero-filled reconstruction under a fixed (seeded) Cartesian mask; see the module docstring.

    Args:
        mask_type: ``equispaced`` or ``random`` (MONAI's ``EquispacedKspaceMask`` / ``RandomKspaceMask``).
        acceleration: undersampling factor ``R`` (about ``1 / R`` of the phase-encoding lines are kept).
        center_fraction: fraction of lines in the fully sampled k-space centre.
        seed: seed of the mask; every call draws the same mask (for a given width).

    ``self.mask`` holds the last mask (1 per sampled line, along the last axis).

    Example:
        >>> t = KspaceUndersample("equispaced", 4, 0.08, seed=0)
        >>> t(torch.ones(1, 32, 64)).shape
        torch.Size([1, 32, 64])
    """

    grid = "corner"

    def __init__(self, mask_type: str = "equispaced", acceleration: float = 4, center_fraction: float = 0.08,
                 seed: int = 0):
        self.mask_fn = make_kspace_mask(mask_type, acceleration, center_fraction)
        self.seed = int(seed)
        self.mask: np.ndarray | None = None

    def __call__(self, img):
        self.mask_fn.set_random_state(self.seed)
        out, self.mask = _zero_filled(img, self.mask_fn)
        return convert_to_dst_type(out, img, dtype=torch.float32)[0]


class RandKspaceUndersample(Randomizable, Transform):
    """Like :class:`KspaceUndersample` with a new mask (and equispaced offset) on every call."""

    grid = "corner"

    def __init__(self, mask_type: str = "equispaced", acceleration: float = 4, center_fraction: float = 0.08):
        self.mask_fn = make_kspace_mask(mask_type, acceleration, center_fraction)
        self.mask: np.ndarray | None = None

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.mask_fn.set_random_state(state=self.R)  # one stream: a seeded Compose repeats exactly
        return self

    def randomize(self, data=None) -> None:  # the mask is drawn inside MONAI's mask transform
        pass

    def __call__(self, img):
        self.mask_fn.R = self.R
        out, self.mask = _zero_filled(img, self.mask_fn)
        return convert_to_dst_type(out, img, dtype=torch.float32)[0]


class KspaceUndersampled(MapTransform):
    """Dictionary form of :class:`KspaceUndersample` (the same fixed mask for every key)."""

    def __init__(self, keys: KeysCollection, mask_type: str = "equispaced", acceleration: float = 4,
                 center_fraction: float = 0.08, seed: int = 0, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.t = KspaceUndersample(mask_type, acceleration, center_fraction, seed)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.t(d[key])
        return d


class RandKspaceUndersampled(Randomizable, MapTransform):
    """Dictionary form of :class:`RandKspaceUndersample` (a new mask per call and key)."""

    def __init__(self, keys: KeysCollection, mask_type: str = "equispaced", acceleration: float = 4,
                 center_fraction: float = 0.08, allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.t = RandKspaceUndersample(mask_type, acceleration, center_fraction)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.t.set_random_state(state=self.R)
        return self

    def randomize(self, data=None) -> None:
        pass

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        self.t.R = self.R
        for key in self.key_iterator(d):
            d[key] = self.t(d[key])
        return d


def zero_filled_volume(src: str, dest: str, mask_type: str = "equispaced", acceleration: float = 4,
                       center_fraction: float = 0.08, seed: int = 42, magnitude: bool = False) -> str:
    """Write the zero-filled reconstruction of every in-plane slice of a NIfTI volume (same mask for all slices,
    same affine and intensity units): a retrospectively accelerated scan, the input ``inference.json`` expects
    for ``task = "mri_recon"``.

    The output is the *complex* zero-filled image (complex64 NIfTI), as a scanner's zero-filled reconstruction of
    the sampled lines would be: it keeps the phase that data consistency needs. ``magnitude=True`` writes its
    magnitude instead (what a viewer shows; a model with data consistency refuses it). The default ``seed`` is
    the unet bundle's ``mask_seed``.
    """
    import nibabel as nib

    from medsr_monai.data import slice_axis, write_nifti
    from medsr_monai.physics import CartesianUndersampling
    from medsr_monai.physics.undersampling import to_complex

    img = nib.load(str(src))
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"{src}: expected a 3D volume, got shape {data.shape}")
    axis = slice_axis(data.shape, [float(v) for v in np.linalg.norm(img.affine[:3, :3], axis=0)])
    slices = torch.as_tensor(np.moveaxis(data, axis, 0))[:, None]  # (S, 1, h, w)
    physics = CartesianUndersampling(mask_type, acceleration, center_fraction, seed=seed)
    z = to_complex(torch.cat([physics.A(s[None]) for s in slices]))[:, 0]  # (S, h, w) complex
    out = z.abs().numpy().astype(np.float32) if magnitude else z.numpy().astype(np.complex64)
    write_nifti(dest, np.moveaxis(out, 0, axis), img.affine)
    return str(dest)
