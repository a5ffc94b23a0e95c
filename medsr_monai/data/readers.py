"""Reading medical volumes (NIfTI, NRRD, DICOM series) with MONAI's ``LoadImage`` and one project reader.

:func:`load_volume` is the package's single image loader: MONAI's :class:`~monai.transforms.LoadImage` with
:class:`VolumeReader`, returning ``(data, ras_affine, meta)``. :class:`VolumeReader` is a MONAI
:class:`~monai.data.ImageReader`: NIfTI goes to MONAI's ``NibabelReader`` unchanged (what training's
``LoadImaged`` uses), NRRD and DICOM are read here, because MONAI's readers get their geometry or voxel type wrong
for this package (checked on the sample data and pydicom's CT5N series, MONAI 1.6):

* ``NrrdReader`` casts to float (``astype(dtype)``, float64 for ``dtype=None``), converts only LPS spaces to RAS
  (not LAS / scanner-xyz) and needs ``space directions``;
* ``PydicomReader`` returns float64 (not int16 HU), reads a single slice as 2D with a nominal 1 mm slice axis
  along +z (not the row x column normal, nor SliceThickness), and does not refuse mixed series, duplicate
  positions or uneven slice spacing.

Every problem is raised as :class:`VolumeError`, whose message names the file (or DICOM folder) and the
problem, e.g. ``/data/scan.nii.gz: unreadable or corrupt file (EOFError: Compressed file ended ...)``.
Arrays are indexed (i, j, k) with a 4x4 voxel-to-world affine in RAS+ millimetres (the NIfTI convention):
NRRD/DICOM LPS coordinates are converted by negating the first two rows of the affine.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from monai.data import ImageReader, NibabelReader
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

__all__ = [
    "LPS_TO_RAS", "VolumeError", "VolumeMemoryError", "VolumeReader", "check_claimed_size", "is_dicom_file",
    "load_volume", "read_dicom_series", "read_nrrd", "volume_format",
]

#: Multiply an LPS affine by this (from the left) to get the RAS affine.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# NRRD "space" values -> sign flips that turn that space into RAS.
_NRRD_SPACE_TO_RAS = {
    "right-anterior-superior": (1, 1, 1), "ras": (1, 1, 1), "left-anterior-superior": (-1, 1, 1),
    "las": (-1, 1, 1), "left-posterior-superior": (-1, -1, 1), "lps": (-1, -1, 1), "scanner-xyz": (1, 1, 1),
}
_UNKNOWN_TYPE = "unknown file type (expected .nii, .nii.gz, .nrrd, .nhdr or a DICOM series folder)"


class VolumeError(ValueError):
    """A volume that cannot be used; ``str(err)`` is ``"<path>: <problem>"``."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class VolumeMemoryError(VolumeError, MemoryError):
    """A volume too large for the memory at hand (also a ``MemoryError``, so that code treating out-of-memory
    apart, e.g. the tuner's pruning, still does)."""


#: deflate cannot compress more than ~1032:1; a .nii.gz claiming more than this many times its size is lying
_MAX_GZIP_RATIO = 1100


def _available_memory() -> int | None:
    """Bytes of memory available now (Linux ``MemAvailable``), else ``None`` (not checked)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_claimed_size(path: str | os.PathLike, shape: Sequence[int], dtype: np.dtype, offset: int = 0,
                       compressed: bool = False, in_file: bool = True) -> None:
    """Refuse a volume whose header claims more voxel data than the file can hold or the memory can take, before
    anything is allocated (a 118-byte file claiming 30000^3 voxels would otherwise end in a bare MemoryError).

    Args:
        shape, dtype: what the header claims.
        offset: bytes before the voxel data in an uncompressed file.
        compressed: the file is gzip (its size bounds the data only through deflate's maximum ratio).
        in_file: the voxel data is in ``path`` (``False``: a detached or text data file: memory checked only).

    Raises:
        VolumeError: the file is too small for the claim (truncated, or a corrupt header);
        VolumeMemoryError: loading it (stored type, plus the float32 copy the pipeline makes) would need more
            memory than is available.
    """
    p = Path(path)
    n = 1
    for s in shape:
        n *= max(int(s), 0)
    stored = n * np.dtype(dtype).itemsize
    size = p.stat().st_size
    claim = f"its header claims {'x'.join(str(int(s)) for s in shape)} voxels of {np.dtype(dtype)} ({_size(stored)})"
    if in_file and compressed and stored > size * _MAX_GZIP_RATIO:
        raise VolumeError(p, f"{claim}, more than a {_size(size)} compressed file can hold: a corrupt or forged "
                             "header")
    if in_file and not compressed and size < offset + stored:
        raise VolumeError(p, f"{claim}, but the file holds only {_size(size - offset)} of voxel data: truncated, "
                             "or a corrupt header")
    need = stored + n * 4  # the stored array and the float32 copy every bundle makes
    free = _available_memory()
    if free is not None and need > free:
        raise VolumeMemoryError(p, f"{claim}; loading it needs about {_size(need)} of memory, only {_size(free)} "
                                   "is available")


def _check_nrrd_claim(path: str) -> None:
    """The NRRD header's sizes and type against the file (raw or gzip data in the same file) and the memory."""
    import nrrd

    try:
        with open(path, "rb") as f:
            header = nrrd.read_header(f)
            offset = f.tell()
        dtype = nrrd.reader._determine_datatype(header)
        shape = [int(v) for v in header["sizes"]]
    except Exception:  # noqa: BLE001 - an unreadable header is reported by the reader itself, with the file named
        return
    encoding = str(header.get("encoding", "raw")).lower()
    in_file = not ("data file" in header or "datafile" in header) and encoding in ("raw", "gzip", "gz")
    check_claimed_size(path, shape, dtype, offset, compressed=encoding != "raw", in_file=in_file)


def _check_nifti_claim(path: str) -> None:
    import nibabel as nib

    try:
        img = nib.load(path)  # the header only: the voxel data is read lazily
    except Exception:  # noqa: BLE001 - an unreadable header is reported by the reader itself, with the file named
        return
    check_claimed_size(path, img.shape, img.get_data_dtype(), int(img.header.get("vox_offset", 0) or 0),
                       compressed=path.lower().endswith(".gz"))


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


def read_nrrd(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read an NRRD file with pynrrd; return ``(data, ras_affine, header)``, the file's voxel type kept.

    The affine is built from ``space directions`` (one row per axis; ``spacings`` when absent) and
    ``space origin`` and converted from the file's space (usually LPS) to RAS; non-spatial axes go last.
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


def _single_slice_spacing(ds) -> tuple[float, str]:
    """Slice-axis spacing of a one-slice series: SliceThickness (the extent of the one slice), else
    SpacingBetweenSlices, else a nominal 1.0 mm."""
    for tag in ("SliceThickness", "SpacingBetweenSlices"):
        value = float(getattr(ds, tag, 0) or 0)
        if value > 0:
            return value, tag
    return 1.0, "none in file: nominal 1.0 mm"


def read_dicom_series(
    folder_or_files: str | os.PathLike | Iterable[str | os.PathLike],
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read one DICOM series: a folder of its files, the list of files, or one file (a one-slice volume).

    Slices are sorted by their ImagePositionPatient projected on the slice normal; the slice axis is the step
    between the first and last slice, or for one slice the row x column normal times
    :func:`_single_slice_spacing`. Returns ``(data[i=column, j=row, k=slice], ras_affine, meta)``; values have
    RescaleSlope/Intercept applied (HU for CT), int16 when the rescale is integral and the range fits, else float32.
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
        step, source = (ipp_last - ipp0) / (len(headers) - 1), "ImagePositionPatient"
        thick = float(np.linalg.norm(step))
    else:
        thick, source = _single_slice_spacing(first)
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
    sbs = getattr(first, "SpacingBetweenSlices", None)
    meta = {
        "files": [f for f, _ in headers],
        **{tag: str(getattr(first, tag, "") or "") for tag in
           ("PatientID", "Modality", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription")},
        "TransferSyntaxUID": str(getattr(getattr(first, "file_meta", None), "TransferSyntaxUID", "") or ""),
        "RescaleSlope": float(getattr(first, "RescaleSlope", 1) or 1),
        "RescaleIntercept": float(getattr(first, "RescaleIntercept", 0) or 0),
        "slice_spacing_mm": thick,
        "slice_spacing_source": source,
        "SpacingBetweenSlices": float(sbs) if sbs not in (None, "") else None,
    }
    return vol, affine, meta


class VolumeReader(ImageReader):
    """MONAI ``ImageReader`` for one volume: a NIfTI / NRRD file, a DICOM series folder or one DICOM file.

    NIfTI is read by MONAI's ``NibabelReader`` (as in training); NRRD by :func:`read_nrrd` and DICOM by
    :func:`read_dicom_series`, where MONAI's readers differ (see the module docstring). Usable wherever MONAI
    takes a reader: ``LoadImage(reader=VolumeReader())`` or ``LoadImaged(keys, reader=
    "medsr_monai.data.readers.VolumeReader")``. The metadata has MONAI's keys (``affine``, ``spatial_shape``,
    ...) plus ``format`` and ``source_dtype`` (the stored voxel type: MONAI turns uint16 into int32).
    """

    def __init__(self, **nibabel_kwargs: Any):
        super().__init__()
        self.nifti = NibabelReader(**nibabel_kwargs)

    def verify_suffix(self, filename: Sequence[os.PathLike] | os.PathLike) -> bool:
        names = ensure_tuple(filename)
        return len(names) == 1 and volume_format(names[0]) is not None

    def read(self, data: Sequence[os.PathLike] | os.PathLike, **kwargs: Any) -> tuple[str, Any]:
        names = ensure_tuple(data)
        if len(names) != 1:
            raise ValueError(f"VolumeReader reads one volume at a time (a file or a DICOM folder), got {len(names)}")
        path = str(names[0])
        fmt = volume_format(path)
        if fmt == "nifti":
            _check_nifti_claim(path)  # before nibabel allocates what the header claims
            return fmt, self.nifti.read(path, **kwargs)
        if fmt == "nrrd":
            _check_nrrd_claim(path)
            data, affine, header = read_nrrd(path)
            return fmt, (data, affine, {"header": header})
        if fmt == "dicom":
            return fmt, read_dicom_series(path)
        raise VolumeError(path, _UNKNOWN_TYPE)

    def get_data(self, img: tuple[str, Any]) -> tuple[np.ndarray, dict]:
        fmt, obj = img
        if fmt == "nifti":
            data, meta = self.nifti.get_data(obj)
        else:
            data, affine, extra = obj
            meta = {**extra, MetaKeys.AFFINE: affine, MetaKeys.ORIGINAL_AFFINE: affine.copy(),
                    MetaKeys.SPATIAL_SHAPE: np.asarray(data.shape[:3]), MetaKeys.SPACE: SpaceKeys.RAS,
                    MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan") if data.ndim <= 3 else -1}
        meta.update(format=fmt, source_dtype=str(data.dtype))
        return data, meta


@functools.lru_cache(maxsize=1)
def _loader():
    import warnings

    from monai.transforms import LoadImage

    reader = VolumeReader()
    with warnings.catch_warnings():  # LoadImage also builds MONAI's default readers (unused here): no GPU-codec notes
        warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
        return LoadImage(reader=reader, image_only=False, dtype=None), reader


def load_volume(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict]:
    """Load a NIfTI / NRRD file or a DICOM series (folder or file): ``(data, ras_affine, meta)``.

    MONAI's ``LoadImage`` with :class:`VolumeReader`; the voxel type is the stored one. Raises
    :class:`VolumeError` (naming the file) when it is missing or cannot be read, including truncated or
    corrupt compressed files (which nibabel only notices when the voxel data is read).
    """
    from monai.data import MetaTensor

    p = Path(path)
    if not p.exists():
        raise VolumeError(p, "file does not exist")
    if volume_format(p) is None:
        raise VolumeError(p, _UNKNOWN_TYPE)
    loader, reader = _loader()
    try:
        img, meta = loader(str(p), reader=reader)  # the runtime reader: its errors come through unwrapped
    except VolumeError:
        raise
    except MemoryError as exc:  # a claim the checks above could not see (e.g. NRRD, DICOM): still name the file
        raise VolumeMemoryError(p, f"not enough memory to load it ({exc or 'MemoryError'})") from exc
    except Exception as exc:  # noqa: BLE001 - EOFError, zlib.error, OSError, ValueError, ...
        raise VolumeError(p, f"unreadable or corrupt file ({type(exc).__name__}: {exc})") from exc
    tensor = img.as_tensor() if isinstance(img, MetaTensor) else img
    # MONAI keeps uint16/uint32 as int32/int64 (torch lacks them): back to the stored type, losslessly
    data = tensor.numpy().astype(meta["source_dtype"], copy=False)
    affine = np.asarray(img.affine if isinstance(img, MetaTensor) else meta[MetaKeys.AFFINE], dtype=float)
    return data, affine, dict(meta)
