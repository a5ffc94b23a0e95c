"""2D in-plane slices from 3D volumes, the unit every in-plane SR bundle trains and evaluates on.

Volumes are loaded and normalised once; their in-plane slices with enough foreground are kept in
memory as small dicts, so random patch sampling and degradation (MONAI transforms applied per item)
never re-read a volume. The sample data fits easily (< 300 MB); for large cohorts use
``max_slices_per_volume`` or a stride.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .checks import check_volume

__all__ = ["slice_axis", "slice_axis_from_spacing", "volume_slices"]


def slice_axis_from_spacing(spacing: Sequence[float], rtol: float = 0.05) -> int:
    """The axis to slice along for in-plane SR: the coarsest spacing (thick-slice axis); ties -> last axis.

    Spacings within ``rtol`` of the coarsest count as ties, so a near-isotropic volume (e.g. 1.0 x 0.977 x
    0.977 mm) is sliced along its last axis rather than along an axis that is only 2 % coarser.

    Example:
        >>> slice_axis_from_spacing([0.78, 0.78, 6.5])
        2
        >>> slice_axis_from_spacing([1.0, 0.9765625, 0.9765625])
        2
    """
    spacing = [float(s) for s in spacing]
    coarsest = max(spacing)
    return max(i for i, s in enumerate(spacing) if np.isclose(s, coarsest, rtol=rtol))


def slice_axis(shape: Sequence[int], spacing: Sequence[float]) -> int:
    """The slice axis of a volume: its singleton axis if it is a single slice stored as a volume (e.g.
    ``(512, 512, 1)``, whatever its often nominal spacing says), else :func:`slice_axis_from_spacing`.

    Example:
        >>> slice_axis((512, 512, 1), [0.5, 0.5, 0.4])
        2
    """
    singleton = [i for i, n in enumerate(shape) if n == 1]
    return singleton[0] if len(singleton) == 1 else slice_axis_from_spacing(spacing)


def volume_slices(
    items: Sequence[dict[str, Any]],
    volume_transform: Callable[[dict], dict],
    key: str = "image",
    out_key: str = "label",
    min_foreground: float = 0.1,
    foreground_threshold: float = 0.05,
    crop_multiple: int = 1,
    stride: int = 1,
    max_slices_per_volume: int | None = None,
    progress: bool = True,
    check: bool = True,
    extra_keys: Sequence[str] = (),
    all_axes_max_ratio: float | None = None,
) -> list[dict[str, Any]]:
    """Load, normalise and cut each volume into in-plane 2D slices.

    Args:
        items: datalist items (``{"image": path, "modality": "MR", "subject": ...}``).
        volume_transform: applied to each item; must return ``d[key]`` as a channel-first 3D array
            (e.g. ``LoadImaged -> EnsureChannelFirstd -> ModalityNormalized``) with an affine.
        key: the volume key after ``volume_transform``.
        out_key: the key each 2D slice is stored under (``label``: the HR target).
        min_foreground: keep a slice only if at least this fraction of its pixels is foreground
            (mostly-background slices inflate PSNR; the metric protocol excludes them).
        foreground_threshold: normalised intensity above which a pixel counts as foreground.
        crop_multiple: crop each slice (from its far edges, keeping the origin) to a multiple of this,
            e.g. the SR scale, so that whole slices can be downsampled.
        stride: keep every ``stride``-th slice.
        max_slices_per_volume: keep at most this many (evenly spread) slices per volume.
        progress: show a progress bar.
        check: first run :func:`~medsr_monai.data.check_volume` on each file, so that a truncated or corrupt
            file, a 2D or 4D image, NaN/Inf voxels or a constant image fail with a message naming the file
            (:class:`~medsr_monai.data.VolumeError`) instead of an obscure loader error or "no slice with
            foreground". Reads each file twice; set False for data already checked. A single slice stored
            as a 3D volume (one singleton axis, e.g. ``(512, 512, 1)``) is accepted.
        extra_keys: further volume keys of the transformed item with the same shape as ``key`` (e.g. a
            low-dose copy made by ``volume_transform``), cut into the same slices and stored under their own
            names; foreground and slice selection come from ``key``, and a slice with NaN/Inf in an extra key
            (one the extra's transform did not compute) is not kept.
        all_axes_max_ratio: cut a near-isotropic volume (coarsest / finest spacing <= this, e.g. 1.5) along all
            three axes (axial, coronal and sagittal slices: three times the training images from one scan, and
            in-plane structure in every orientation); ``None``: only along the slice axis.
            ``max_slices_per_volume`` and ``stride`` apply per axis.

    The slice axis is the coarsest-spacing axis (:func:`slice_axis_from_spacing`), except for a volume with
    exactly one singleton axis: that axis is the slice axis and the volume gives (at most) one slice.

    Returns:
        One dict per slice: ``out_key`` (float32 tensor ``(C, H, W)``), ``fg`` (uint8 foreground mask,
        same shape), the item's other fields, ``slice_index``, ``slice_axis`` and ``pixdim`` (in-plane mm).
    """
    slices: list[dict[str, Any]] = []
    for item in tqdm(items, desc="slicing volumes", disable=not progress, leave=False):
        if check and isinstance(item.get(key), (str, os.PathLike)):
            check_volume(item[key], allow_single_slice=True)
        d = volume_transform(dict(item))
        vol = d[key]
        spacing = [float(s) for s in getattr(vol, "pixdim", [1.0, 1.0, 1.0])]
        if vol.ndim != 4:
            raise ValueError(f"{item.get(key, item)}: expected a channel-first 3D volume, got shape {tuple(vol.shape)}")
        axes = [slice_axis(vol.shape[1:], spacing)]
        if (all_axes_max_ratio and min(vol.shape[1:]) > 1
                and max(spacing) <= all_axes_max_ratio * min(spacing)):
            axes = [2, 0, 1]
        extra = {k: v for k, v in d.items() if k != key and not isinstance(v, (torch.Tensor, np.ndarray, dict))}
        for axis in axes:
            slices.extend(_cut(vol, d, item, key, out_key, axis, spacing, crop_multiple, extra_keys,
                               foreground_threshold, min_foreground, stride, max_slices_per_volume, extra))
    if not slices:
        raise ValueError(
            f"no slice with >= {min_foreground:.0%} foreground in {len(items)} volume(s): "
            f"{[i.get(key) for i in items][:5]}"
        )
    return slices


def _cut(vol, d, item, key, out_key, axis, spacing, crop_multiple, extra_keys, foreground_threshold,
         min_foreground, stride, max_slices_per_volume, extra) -> list[dict[str, Any]]:
    """The kept slices of one volume along one axis (see :func:`volume_slices`)."""
    arr = torch.as_tensor(np.asarray(vol), dtype=torch.float32).movedim(axis + 1, -1)
    in_plane = [s for i, s in enumerate(spacing) if i != axis]
    h, w = arr.shape[1] - arr.shape[1] % crop_multiple, arr.shape[2] - arr.shape[2] % crop_multiple
    arr = arr[:, :h, :w]
    extras = {}
    for ek in extra_keys:
        if tuple(d[ek].shape) != tuple(vol.shape):
            raise ValueError(f"{item.get(key, item)}: {ek!r} has shape {tuple(d[ek].shape)}, "
                             f"{key!r} has {tuple(vol.shape)}")
        extras[ek] = torch.as_tensor(np.asarray(d[ek]), dtype=torch.float32).movedim(axis + 1, -1)[:, :h, :w]
    fg = arr > foreground_threshold
    frac = fg.flatten(0, 2).float().mean(0)
    # an extra key may leave slices it did not compute as NaN (e.g. a low-dose simulation of a few slices)
    finite = torch.ones(arr.shape[-1], dtype=torch.bool)
    for ev in extras.values():
        finite &= torch.isfinite(ev).flatten(0, 2).all(0)
    keep = [k for k in range(0, arr.shape[-1], stride) if frac[k] >= min_foreground and finite[k]]
    if max_slices_per_volume and len(keep) > max_slices_per_volume:
        keep = [keep[i] for i in np.linspace(0, len(keep) - 1, max_slices_per_volume).round().astype(int)]
    return [{
        **extra,
        **{ek: ev[..., k].contiguous() for ek, ev in extras.items()},
        out_key: arr[..., k].contiguous(),
        "fg": fg[..., k].to(torch.uint8).contiguous(),
        "slice_index": k,
        "slice_axis": axis,
        "pixdim": in_plane,
    } for k in keep]
