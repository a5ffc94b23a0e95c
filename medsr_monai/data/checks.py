"""Sanity checks of medical volumes (NIfTI, NRRD, DICOM series), read with :func:`~.readers.load_volume`.

Every problem found is raised as :class:`~.readers.VolumeError`, whose message always names the
file (or DICOM folder) and the problem, e.g.::

    VolumeError: /data/scan.nii.gz: unreadable or corrupt file (EOFError: Compressed file ended ...)

The readers (and their names, kept importable from here) live in :mod:`medsr_monai.data.readers`.
"""

from __future__ import annotations

import os

import numpy as np

from .readers import LPS_TO_RAS, VolumeError, is_dicom_file, load_volume, read_dicom_series, read_nrrd, volume_format

__all__ = [
    "VolumeError",
    "check_volume",
    "check_array",
    "load_volume",
    "read_nrrd",
    "read_dicom_series",
    "is_dicom_file",
    "volume_format",
    "LPS_TO_RAS",
]


def check_array(
    path: str | os.PathLike,
    data: np.ndarray,
    affine: np.ndarray,
    expect_ndim: int = 3,
    allow_single_slice: bool = False,
    allow_complex: bool = False,
) -> dict:
    """Check an already loaded array; return the info dict of :func:`check_volume`.

    With ``allow_single_slice`` a 3D volume with exactly one singleton axis (one 2D slice stored
    as a volume, e.g. shape ``(512, 512, 1)``) passes; by default every axis needs >= 2 voxels.
    With ``allow_complex`` a complex array passes (finite parts; min/max/constant of its magnitude).
    """
    data = np.asarray(data)
    shape = tuple(int(s) for s in data.shape)
    # drop trailing singleton dims beyond the expected ones (e.g. NIfTI (X, Y, Z, 1))
    while data.ndim > expect_ndim and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim < expect_ndim:
        raise VolumeError(path, f"is {data.ndim}D (shape {shape}), expected a {expect_ndim}D volume")
    if data.ndim > expect_ndim:
        raise VolumeError(
            path, f"is {data.ndim}D (shape {shape}), expected a {expect_ndim}D volume (extra dims must be singleton)"
        )
    if expect_ndim == 3 and min(data.shape) < 2:
        n_single = sum(1 for s in data.shape if s < 2)
        if not (allow_single_slice and n_single == 1 and min(data.shape) == 1):
            raise VolumeError(path, f"is effectively 2D (shape {shape}): a 3D volume needs >= 2 voxels on every axis")
    if data.dtype.kind == "c" and allow_complex:  # a complex image (e.g. zero-filled MR with its phase)
        if not (np.isfinite(data.real).all() and np.isfinite(data.imag).all()):
            raise VolumeError(path, "contains non-finite voxels (NaN or Inf in the real or imaginary part)")
        data = np.abs(data)
    if data.dtype.kind not in "biuf":
        raise VolumeError(path, f"unsupported voxel type {data.dtype}"
                          + (" (complex images are read only where a bundle takes them: unet mri_recon)"
                             if data.dtype.kind == "c" else ""))
    if data.dtype.kind == "f":
        finite = np.isfinite(data)
        if not finite.all():
            n_nan = int(np.isnan(data).sum())
            n_inf = int(data.size - finite.sum() - n_nan)
            raise VolumeError(path, f"contains non-finite voxels ({n_nan} NaN, {n_inf} Inf)")
    lo, hi = data.min(), data.max()
    if lo == hi:
        raise VolumeError(path, f"is a constant image (every voxel = {float(lo):g})")
    affine = np.asarray(affine, dtype=float)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise VolumeError(path, "has a singular or non-finite affine (no usable voxel spacing)")
    spacing = [float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)]
    return {
        "path": str(path),
        "shape": [int(s) for s in data.shape],
        "spacing": [round(s, 9) for s in spacing],
        "dtype": str(data.dtype),
        "min": float(lo),
        "max": float(hi),
        "affine": [[float(v) for v in row] for row in affine],
    }


def check_volume(path: str | os.PathLike, expect_ndim: int = 3, allow_single_slice: bool = False) -> dict:
    """Load and check a volume; return ``{path, format, shape, spacing, dtype, min, max, affine}``.

    Raises :class:`VolumeError` (message names the file and the problem) for: missing
    file, unreadable / corrupt / truncated file, wrong dimensionality (2D; 4D unless the
    extra trailing dims are singleton), NaN/Inf voxels, a constant image.
    A 3D volume with a singleton axis (a single slice, e.g. ``(512, 512, 1)``) is rejected
    as effectively 2D unless ``allow_single_slice`` (then exactly one singleton axis is allowed).
    Accepts ``.nii``, ``.nii.gz``, ``.nrrd``/``.nhdr`` and DICOM series folders.
    """
    data, affine, meta = load_volume(path)
    info = check_array(path, data, affine, expect_ndim=expect_ndim, allow_single_slice=allow_single_slice)
    info["format"] = meta["format"]
    return info
