"""Writing an inference output as a DICOM series (a derived series of the input's study), with pydicom.

:func:`write_dicom_series` is the inverse of :func:`~medsr_monai.data.readers.read_dicom_series` for a volume on a
new grid: ``data[i=column, j=row, k=slice]`` with a RAS affine becomes one single-frame image per ``k``, with

- the study and patient of the source series (same ``StudyInstanceUID``, ``FrameOfReferenceUID``: the output lies
  in the same patient space), a new ``SeriesInstanceUID`` and new ``SOPInstanceUID``\\ s;
- ``ImageType`` ``DERIVED\\SECONDARY``, ``SeriesDescription`` naming the bundle and its version,
  ``DerivationDescription`` what was done;
- the new grid: ``Rows``/``Columns``, ``PixelSpacing``, ``ImageOrientationPatient``, ``ImagePositionPatient`` per
  slice, ``SliceThickness`` (the source's divided by the zoom along the slice axis), ``SpacingBetweenSlices``,
  ``SliceLocation``;
- pixel values stored as 16-bit integers with ``RescaleSlope``/``RescaleIntercept`` chosen for the output's own
  range: integer volumes (CT in HU) that fit int16 are stored as they are (slope 1, intercept 0); anything else
  is mapped linearly onto 0..65535, so a value comes back within ``RescaleSlope / 2``.

File names are ``IM00001.dcm``... in slice order: never a patient identifier or UID.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["write_dicom_series", "rescale_for", "describe", "dicom_output_dir", "STUDY_TAGS", "PATIENT_TAGS"]

#: copied from the source so the derived series sits in the same study (and patient) in any archive
STUDY_TAGS = ("StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
              "StudyDescription")
PATIENT_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge")
#: acquisition context copied when present (not geometry, not pixel encoding)
CONTEXT_TAGS = ("Modality", "FrameOfReferenceUID", "PositionReferenceIndicator", "BodyPartExamined",
                "PatientPosition", "KVP", "MagneticFieldStrength", "ScanningSequence", "SequenceVariant",
                "ScanOptions", "MRAcquisitionType", "RepetitionTime", "EchoTime", "WindowCenter", "WindowWidth")
_SOP_CLASS = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def rescale_for(data: np.ndarray) -> tuple[float, float, bool]:
    """``(slope, intercept, signed)`` to store ``data`` as 16-bit integers: integers that fit int16 as they are,
    anything else linearly onto 0..65535 (``value = stored * slope + intercept``)."""
    lo, hi = float(np.min(data)), float(np.max(data))
    if np.issubdtype(data.dtype, np.integer) and lo >= -32768 and hi <= 32767:
        return 1.0, 0.0, True
    slope = (hi - lo) / 65535.0 if hi > lo else 1.0
    # DS values hold 16 characters: round slope/intercept to what the header keeps, then quantise with those
    return float(f"{slope:.10g}"), float(f"{lo:.10g}"), False


def _ds(v: float) -> str:
    """A decimal string (DS, at most 16 characters)."""
    s = f"{v:.10g}"
    return s if len(s) <= 16 else f"{v:.6g}"


def write_dicom_series(data: np.ndarray, ras_affine: np.ndarray, source_files: Sequence[str | os.PathLike],
                       out_dir: str | os.PathLike, series_description: str, derivation: str = "",
                       zoom: Sequence[float] = (1, 1, 1), software_version: str = "", overwrite: bool = False
                       ) -> Path:
    """Write ``data`` (``(i=column, j=row, k=slice)``, on the grid of ``ras_affine``) as a DICOM series in
    ``out_dir`` (created; written under a temporary name and moved into place when complete).

    Args:
        source_files: the input series' files (their first header gives study, patient and context).
        series_description: e.g. ``"edsr 0.3.0 sr"`` (bundle name and version).
        derivation: ``DerivationDescription`` (what was done, e.g. "super-resolution x2 in-plane").
        zoom: output/input size per axis, for ``SliceThickness``.
        overwrite: replace an existing ``out_dir`` (otherwise ``FileExistsError``).

    Returns:
        ``out_dir``.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    from .readers import LPS_TO_RAS

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir}: already exists; set overwrite=true to replace it")
    data = np.asarray(data)
    if data.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {data.shape}")
    src = pydicom.dcmread(str(source_files[0]), stop_before_pixels=True)
    lps = LPS_TO_RAS @ np.asarray(ras_affine, dtype=np.float64)
    col_step, row_step, slice_step, origin = lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3]
    ps_col, ps_row, spacing = (float(np.linalg.norm(v)) for v in (col_step, row_step, slice_step))
    row_dir, col_dir = col_step / ps_col, row_step / ps_row  # i runs along a row (row direction cosines)
    normal = np.cross(row_dir, col_dir)
    src_thick = float(getattr(src, "SliceThickness", 0) or 0)
    thickness = src_thick / float(zoom[2]) if src_thick > 0 else spacing
    slope, intercept, signed = rescale_for(data)
    if signed:
        stored = data.astype(np.int16)
    else:
        stored = np.clip(np.rint((data.astype(np.float64) - intercept) / slope), 0, 65535).astype(np.uint16)
    modality = str(getattr(src, "Modality", "") or "OT")
    sop_class = str(getattr(src, "SOPClassUID", "")) if str(getattr(src, "SOPClassUID", "")) in _SOP_CLASS.values() \
        else _SOP_CLASS.get(modality, _SECONDARY_CAPTURE)
    series_uid = generate_uid()
    now = _dt.datetime.now()
    try:
        series_number = int(getattr(src, "SeriesNumber", 0) or 0) + 1000
    except (TypeError, ValueError):
        series_number = 1000
    part = out_dir.with_name(out_dir.name + f".part-{os.getpid()}")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    try:
        for k in range(data.shape[2]):
            ds = pydicom.Dataset()
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = sop_class
            meta.MediaStorageSOPInstanceUID = generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            ds.file_meta = meta
            for tag in PATIENT_TAGS + STUDY_TAGS + CONTEXT_TAGS:
                if tag in src:
                    setattr(ds, tag, getattr(src, tag))
            ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
            ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = series_uid, series_number, k + 1
            if "FrameOfReferenceUID" not in ds:
                ds.FrameOfReferenceUID = generate_uid()
            ds.Modality = modality
            ds.ImageType = ["DERIVED", "SECONDARY"]
            ds.SeriesDescription = series_description[:64]
            ds.DerivationDescription = (derivation or series_description)[:1024]
            ds.Manufacturer = "medsr-monai"
            if software_version:
                ds.SoftwareVersions = str(software_version)[:64]
            ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
            ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
            ds.Rows, ds.Columns = int(data.shape[1]), int(data.shape[0])
            ds.PixelSpacing = [_ds(ps_row), _ds(ps_col)]  # between rows, between columns
            ds.ImageOrientationPatient = [_ds(v) for v in (*row_dir, *col_dir)]
            ipp = origin + k * slice_step
            ds.ImagePositionPatient = [_ds(v) for v in ipp]
            ds.SliceLocation = _ds(float(np.dot(normal, ipp)))
            ds.SliceThickness = _ds(thickness)
            ds.SpacingBetweenSlices = _ds(spacing)
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
            ds.PixelRepresentation = 1 if signed else 0
            ds.RescaleSlope, ds.RescaleIntercept = _ds(slope), _ds(intercept)
            ds.RescaleType = "HU" if modality == "CT" else "US"
            ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # rows x columns
            ds.save_as(str(part / f"IM{k + 1:05d}.dcm"), enforce_file_format=True)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(part, out_dir)
    finally:
        shutil.rmtree(part, ignore_errors=True)
    return out_dir


def describe(bundle: str, version: str, postfix: str) -> str:
    """The SeriesDescription of a bundle's output: ``"<bundle> <version> <postfix>"``."""
    return " ".join(p for p in (bundle or "medsr", version, postfix) if p)


def dicom_output_dir(nifti_out: str | os.PathLike) -> Path:
    """Where the DICOM series of an output goes: beside ``<name>.nii.gz`` as folder ``<name>_dicom``."""
    p = Path(nifti_out)
    return p.with_name(p.name[:-7] + "_dicom" if p.name.endswith(".nii.gz") else p.stem + "_dicom")
