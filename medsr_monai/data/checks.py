"""Reading and sanity checks of medical volumes (NIfTI, NRRD, DICOM series).

Every problem found is raised as :class:`VolumeError`, whose message always names the
file (or DICOM folder) and the problem, e.g.::

    VolumeError: /data/scan.nii.gz: unreadable or corrupt file (EOFError: Compressed file ended ...)

All readers return image arrays indexed (i, j, k) together with a 4x4 voxel-to-world
affine in RAS+ millimetres (the NIfTI convention): NRRD/DICOM LPS coordinates are
converted by negating the first two rows of the affine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

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

#: Multiply an LPS affine by this (from the left) to get the RAS affine.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# NRRD "space" values -> sign flips that turn that space into RAS.
_NRRD_SPACE_TO_RAS = {
    "right-anterior-superior": (1, 1, 1),
    "ras": (1, 1, 1),
    "left-anterior-superior": (-1, 1, 1),
    "las": (-1, 1, 1),
    "left-posterior-superior": (-1, -1, 1),
    "lps": (-1, -1, 1),
    "scanner-xyz": (1, 1, 1),
}


class VolumeError(ValueError):
    """A volume that cannot be used; ``str(err)`` is ``"<path>: <problem>"``."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def volume_format(path: str | os.PathLike) -> str | None:
    """Return ``"nifti"``, ``"nrrd"``, ``"dicom"`` (a folder or a DICOM file) or None."""
    p = Path(path)
    name = p.name.lower()
    if p.is_dir():
        return "dicom"
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith((".nrrd", ".nhdr")):
        return "nrrd"
    if name.endswith(".dcm") or (p.is_file() and is_dicom_file(p)):
        return "dicom"
    return None


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True if the file carries the DICOM Part 10 preamble (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


# --------------------------------------------------------------------------- readers
def read_nrrd(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read an NRRD file with pynrrd; return ``(data, ras_affine, header)``.

    The affine is built from ``space directions`` (one row per axis) and ``space origin``
    and converted from the file's space (usually LPS) to RAS.
    """
    import nrrd

    data, header = nrrd.read(str(path))  # index order 'F': data[i, j, k] follows 'sizes'
    ndim = data.ndim
    dirs = header.get("space directions")
    if dirs is None:
        spacings = header.get("spacings", [1.0] * ndim)
        dirs = np.diag([float(s) if np.isfinite(s) else 1.0 for s in spacings])
        space = "right-anterior-superior"
        origin = np.zeros(3)
    else:
        dirs = np.asarray(dirs, dtype=float)
        space = str(header.get("space", "left-posterior-superior")).lower()
        origin = np.asarray(header.get("space origin", np.zeros(dirs.shape[1])), dtype=float)
    # keep only the spatial axes (rows that are not NaN, e.g. a 'list' axis is all NaN)
    spatial = [i for i in range(dirs.shape[0]) if np.all(np.isfinite(dirs[i]))]
    if space not in _NRRD_SPACE_TO_RAS:
        raise VolumeError(path, f"unsupported NRRD space {space!r}")
    if len(spatial) != 3 or dirs.shape[1] != 3:
        raise VolumeError(path, f"NRRD has {len(spatial)} spatial axes in a {dirs.shape[1]}D space, expected 3")
    if spatial != [0, 1, 2]:
        # move spatial axes first, non-spatial (e.g. components) last
        rest = [i for i in range(ndim) if i not in spatial]
        data = np.transpose(data, spatial + rest)
    affine = np.eye(4)
    affine[:3, :3] = dirs[spatial].T  # column i = direction * spacing of array axis i
    affine[:3, 3] = origin
    affine = np.diag(list(_NRRD_SPACE_TO_RAS[space]) + [1]) @ affine
    return data, affine, dict(header)


def _sorted_dicom_headers(files: Sequence[str | os.PathLike], where: str):
    import pydicom

    headers = []
    for f in files:
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - any parser failure means unreadable
            raise VolumeError(f, f"unreadable DICOM file ({type(exc).__name__}: {exc})") from exc
        headers.append((str(f), ds))
    if not headers:
        raise VolumeError(where, "no DICOM files found")
    uids = {getattr(ds, "SeriesInstanceUID", None) for _, ds in headers}
    if len(uids) > 1:
        raise VolumeError(where, f"contains {len(uids)} DICOM series (SeriesInstanceUID); pass one series")
    for f, ds in headers:
        for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
            if tag not in ds:
                raise VolumeError(f, f"DICOM file lacks {tag}; cannot place it in space")
    if any(int(getattr(ds, "NumberOfFrames", 1) or 1) > 1 for _, ds in headers):
        raise VolumeError(where, "multi-frame DICOM is not supported; convert it to NIfTI first")
    iop = np.asarray(headers[0][1].ImageOrientationPatient, dtype=float)
    for f, ds in headers[1:]:
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=float), iop, atol=1e-4):
            raise VolumeError(where, "slices have different ImageOrientationPatient (not one volume)")
        if (ds.Rows, ds.Columns) != (headers[0][1].Rows, headers[0][1].Columns):
            raise VolumeError(where, "slices have different Rows/Columns (not one volume)")
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    pos = np.array([np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float)) for _, ds in headers])
    order = np.argsort(pos, kind="stable")
    headers = [headers[i] for i in order]
    pos = pos[order]
    if len(pos) > 1:
        gaps = np.diff(pos)
        if np.any(gaps < 1e-3):
            raise VolumeError(where, "duplicate slice positions (ImagePositionPatient) in one series")
        if np.max(gaps) - np.min(gaps) > 0.01 * np.median(gaps) + 1e-3:
            raise VolumeError(
                where, f"non-uniform slice spacing ({np.min(gaps):.3f} to {np.max(gaps):.3f} mm)"
            )
    return headers, row_dir, col_dir, normal


def read_dicom_series(
    folder_or_files: str | os.PathLike | Iterable[str | os.PathLike],
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read one DICOM series (a folder of its files, or the list of files).

    Slices are sorted by their ImagePositionPatient projected on the slice normal.
    Returns ``(data[i=column, j=row, k=slice], ras_affine, meta)``; CT values have
    RescaleSlope/Intercept applied (HU).
    """
    import pydicom

    if isinstance(folder_or_files, (str, os.PathLike)):
        folder = Path(folder_or_files)
        if not folder.exists():
            raise VolumeError(folder, "file or folder does not exist")
        if folder.is_dir():
            files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
            files = [p for p in files if p.suffix.lower() == ".dcm" or is_dicom_file(p)]
        else:
            files = [folder]
        where = str(folder)
    else:
        files = [Path(f) for f in folder_or_files]
        where = str(Path(os.path.commonpath([str(f) for f in files]))) if files else "<no files>"
    headers, row_dir, col_dir, normal = _sorted_dicom_headers(files, where)
    first = headers[0][1]
    ps_row, ps_col = (float(v) for v in first.PixelSpacing)  # between rows, between columns
    slices = []
    float_needed = False
    for f, _ in headers:
        try:
            ds = pydicom.dcmread(f)
            arr = np.asarray(ds.pixel_array)
        except Exception as exc:  # noqa: BLE001
            raise VolumeError(f, f"cannot decode DICOM pixel data ({type(exc).__name__}: {exc})") from exc
        if arr.ndim != 2:
            raise VolumeError(f, f"unsupported pixel array shape {arr.shape} (colour or multi-frame)")
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
        if slope != 1 or intercept != round(intercept):
            float_needed = True
        slices.append(arr.astype(np.float64) * slope + intercept)
    vol = np.stack([s.T for s in slices], axis=-1)  # (columns, rows, slices)
    ipp0 = np.asarray(first.ImagePositionPatient, dtype=float)
    if len(headers) > 1:
        ipp_last = np.asarray(headers[-1][1].ImagePositionPatient, dtype=float)
        step = (ipp_last - ipp0) / (len(headers) - 1)
    else:
        thick = float(getattr(first, "SpacingBetweenSlices", 0) or getattr(first, "SliceThickness", 1) or 1)
        step = normal * thick
    lps = np.eye(4)
    lps[:3, 0] = row_dir * ps_col
    lps[:3, 1] = col_dir * ps_row
    lps[:3, 2] = step
    lps[:3, 3] = ipp0
    affine = LPS_TO_RAS @ lps
    lo, hi = vol.min(), vol.max()
    if not float_needed and lo >= np.iinfo(np.int16).min and hi <= np.iinfo(np.int16).max:
        vol = vol.astype(np.int16)
    else:
        vol = vol.astype(np.float32)
    meta = {
        "files": [f for f, _ in headers],
        "PatientID": str(getattr(first, "PatientID", "") or ""),
        "Modality": str(getattr(first, "Modality", "") or ""),
        "SeriesInstanceUID": str(getattr(first, "SeriesInstanceUID", "") or ""),
        "SeriesNumber": str(getattr(first, "SeriesNumber", "") or ""),
        "SeriesDescription": str(getattr(first, "SeriesDescription", "") or ""),
    }
    return vol, affine, meta


def load_volume(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict]:
    """Load a NIfTI / NRRD file or a DICOM series folder: ``(data, ras_affine, meta)``.

    Raises :class:`VolumeError` (naming the file) when it is missing or cannot be read,
    including truncated or corrupt compressed files (which nibabel only notices when
    the voxel data is accessed).
    """
    p = Path(path)
    if not p.exists():
        raise VolumeError(p, "file does not exist")
    fmt = volume_format(p)
    if fmt is None:
        raise VolumeError(p, "unknown file type (expected .nii, .nii.gz, .nrrd, .nhdr or a DICOM series folder)")
    try:
        if fmt == "nifti":
            import nibabel as nib

            img = nib.load(str(p))
            data = np.asanyarray(img.dataobj)  # forces reading: truncation shows up here
            return np.asarray(data), np.asarray(img.affine, dtype=float), {"format": "nifti"}
        if fmt == "nrrd":
            data, affine, header = read_nrrd(p)
            return data, affine, {"format": "nrrd", "header": header}
        data, affine, meta = read_dicom_series(p)
        meta["format"] = "dicom"
        return data, affine, meta
    except VolumeError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - EOFError, zlib.error, OSError, ValueError, ...
        raise VolumeError(p, f"unreadable or corrupt file ({type(exc).__name__}: {exc})") from exc


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
