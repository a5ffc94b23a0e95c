"""Data layer: real sample scans, volume checks, datalists, indexing of user folders.

Public API::

    fetch_samples(out_dir="data/samples", cache_dir=None, force=False, progress=True) -> Path
    check_volume(path, expect_ndim=3, allow_single_slice=False) -> dict  # raises VolumeError
    load_datalist(path_or_dir, split) -> list[dict]      # raises DatalistError
    file_sha256(path) -> str;  datalist_sha256(path_or_dir) -> str
    index_folder(folder, out=None, seed=0, val_fraction=0.2, test_fraction=0.2, modality=None) -> dict

CLI: ``medsr data samples`` / ``medsr data index DIR`` (see :mod:`medsr_monai.data.cli`).
"""

from .checks import VolumeError, check_volume, load_volume, read_dicom_series, read_nrrd
from .datalist import (
    DatalistError, check_split_overlap, datalist_sha256, file_sha256, load_datalist, near_isotropic_files, write_datalist,
)
from .index import index_folder, split_subjects
from .samples import SAMPLE_SPLITS, SAMPLES, SampleIntegrityError, fetch_samples, write_nifti

__all__ = [
    "fetch_samples",
    "check_volume",
    "load_volume",
    "read_nrrd",
    "read_dicom_series",
    "load_datalist",
    "check_split_overlap",
    "near_isotropic_files",
    "write_datalist",
    "file_sha256",
    "datalist_sha256",
    "index_folder",
    "split_subjects",
    "write_nifti",
    "VolumeError",
    "DatalistError",
    "SampleIntegrityError",
    "SAMPLES",
    "SAMPLE_SPLITS",
]

# in-plane slicing of volumes (owned by the training side; kept last so edits above don't collide)
from .slices import slice_axis, slice_axis_from_spacing, volume_slices  # noqa: E402

__all__ += ["slice_axis", "slice_axis_from_spacing", "volume_slices"]

from .domains import domain_items, select_items, subject_part  # noqa: E402

__all__ += ["domain_items", "select_items", "subject_part"]
