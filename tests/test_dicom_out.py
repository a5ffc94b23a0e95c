"""DICOM out: a DICOM series input gets its result back as a DICOM series (a derived series of the same study).

A real sample volume (chest CT in HU, MR brain) is cropped and written as a DICOM series with pydicom (stored
values with a rescale, as scanners do: CT unsigned with intercept -1024, MR unsigned with a fractional slope),
the bundle's own ``inference.json`` runs on the series folder with its shipped weights (``models/model.pt``), and
the DICOM output is read back with pydicom and SimpleITK: its geometry (size, spacing, origin, direction) equals
the NIfTI output's, its values equal the NIfTI's within the rescale quantisation, its UIDs and descriptions are
those of a derived series, and no patient identifier is in any file name.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from helpers import REPO, bundle_cmd, bundle_env, expr, run, tail

PATIENT = {"PatientName": "Doe^Jane", "PatientID": "PAT-778899", "PatientBirthDate": "19700101"}


def write_series(src: Path, dest: Path, size, modality: str) -> dict:
    """Centre crop of ``src`` (RAS NIfTI) written as a DICOM series in ``dest`` (one file per slice of the last
    axis, LPS geometry as the standard has it). Returns the study / series UIDs."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    img = nib.load(str(src))
    starts = [(s - c) // 2 for s, c in zip(img.shape[:3], size)]
    crop = img.slicer[tuple(slice(a, a + c) for a, c in zip(starts, size))]
    vol = np.asarray(crop.dataobj, dtype=np.float64)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ crop.affine
    sp = np.linalg.norm(lps[:3, :3], axis=0)
    row_dir, col_dir = lps[:3, 0] / sp[0], lps[:3, 1] / sp[1]
    if modality == "CT":
        slope, intercept = 1.0, -1024.0
    else:
        slope, intercept = 0.25, 0.0
    stored = np.clip(np.rint((vol - intercept) / slope), 0, 65535).astype(np.uint16)
    uids = {"study": generate_uid(), "series": generate_uid(), "frame": generate_uid()}
    dest.mkdir(parents=True)
    for k in range(vol.shape[2]):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2" if modality == "CT" else "1.2.840.10008.5.1.4.1.1.4"
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
        for key, value in PATIENT.items():
            setattr(ds, key, value)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uids["study"], uids["series"], uids["frame"]
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 3, k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.Rows, ds.Columns = vol.shape[1], vol.shape[0]
        ds.PixelSpacing = [f"{sp[1]:.6f}", f"{sp[0]:.6f}"]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in lps[:3, 3] + k * lps[:3, 2]]
        ds.SliceThickness = f"{sp[2]:.4f}"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        ds.save_as(str(dest / f"slice{k:03d}.dcm"), enforce_file_format=True)
    return uids


def _sitk_geometry(img) -> dict:
    return {"size": list(img.GetSize()), "spacing": np.asarray(img.GetSpacing()),
            "origin": np.asarray(img.GetOrigin()), "direction": np.asarray(img.GetDirection())}


@pytest.mark.slow
@pytest.mark.parametrize("bundle, scan, modality, size", [
    ("srcnn", "lung2.nii.gz", "CT", (48, 40, 5)),
    ("edsr", "brain2.nii.gz", "MR", (40, 48, 4)),
])
def test_dicom_series_in_dicom_series_out(bundle, scan, modality, size, sample_dir, tmp_path):
    import pydicom
    import SimpleITK as sitk

    series = tmp_path / "in" / "ser01"
    uids = write_series(sample_dir / "nifti" / scan, series, size, modality)
    out_dir = tmp_path / "out"
    proc = run(bundle_cmd("run", bundle, ["inference"], input=expr(series), output_dir=expr(out_dir)),
               bundle_env(tmp_path))
    assert proc.returncode == 0, tail(proc.stdout)

    nifti = out_dir / "ser01_sr.nii.gz"
    dicom_dir = out_dir / "ser01_sr_dicom"
    assert nifti.is_file() and dicom_dir.is_dir(), sorted(p.name for p in out_dir.iterdir())
    side = json.loads((out_dir / "ser01_sr.json").read_text())
    assert side["dicom_output"] == str(dicom_dir) and side["backend"] == "torch"
    files = sorted(dicom_dir.iterdir())
    nii = nib.load(str(nifti))
    assert len(files) == nii.shape[2]
    # no patient identifier (nor any UID) in a file or folder name
    for p in [dicom_dir, *files]:
        for ident in (*PATIENT.values(), "Doe", "Jane"):
            assert ident not in p.name

    # headers: a derived series of the same study, new UIDs, named after the bundle and its version
    meta = json.loads((REPO / "bundles" / bundle / "configs" / "metadata.json").read_text())
    headers = [pydicom.dcmread(str(f)) for f in files]
    first = headers[0]
    assert first.StudyInstanceUID == uids["study"] and first.FrameOfReferenceUID == uids["frame"]
    assert first.SeriesInstanceUID != uids["series"]
    assert len({h.SeriesInstanceUID for h in headers}) == 1
    assert len({h.SOPInstanceUID for h in headers}) == len(headers)
    assert list(first.ImageType) == ["DERIVED", "SECONDARY"]
    assert bundle in first.SeriesDescription and meta["version"] in first.SeriesDescription
    assert first.Modality == modality and first.PatientID == PATIENT["PatientID"]
    assert (first.Rows, first.Columns) == (nii.shape[1], nii.shape[0])
    in_thick = float(pydicom.dcmread(str(sorted(series.iterdir())[0])).SliceThickness)
    assert float(first.SliceThickness) == pytest.approx(in_thick, rel=1e-4)  # in-plane SR: slices unchanged

    # geometry: SimpleITK reads the DICOM series onto exactly the NIfTI output's grid
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(dicom_dir)))
    from_dicom = reader.Execute()
    from_nifti = sitk.ReadImage(str(nifti))
    a, b = _sitk_geometry(from_dicom), _sitk_geometry(from_nifti)
    assert a["size"] == b["size"] == list(nii.shape)
    np.testing.assert_allclose(a["spacing"], b["spacing"], rtol=1e-5)
    np.testing.assert_allclose(a["origin"], b["origin"], atol=1e-3)
    np.testing.assert_allclose(a["direction"], b["direction"], atol=1e-5)
    in_sitk = sitk.ReadImage(reader.GetGDCMSeriesFileNames(str(series)))
    np.testing.assert_allclose(a["spacing"][:2], np.asarray(in_sitk.GetSpacing()[:2]) / 2, rtol=1e-4)  # x2 grid

    # values: the DICOM (stored * slope + intercept) equals the NIfTI within half a rescale step
    y = np.asarray(nii.dataobj, dtype=np.float64)
    from_files = np.stack([h.pixel_array.T.astype(np.float64) * float(h.RescaleSlope) + float(h.RescaleIntercept)
                           for h in sorted(headers, key=lambda h: int(h.InstanceNumber))], axis=-1)
    slope = float(first.RescaleSlope)
    assert np.abs(from_files - y).max() <= slope / 2 + 1e-6 * max(1.0, np.abs(y).max())
    np.testing.assert_allclose(sitk.GetArrayFromImage(from_dicom).transpose(2, 1, 0), y,
                               atol=slope / 2 + 1e-6 * max(1.0, np.abs(y).max()))
    if modality == "CT":  # HU stay integers: stored as they are, exactly
        assert slope == 1.0 and np.array_equal(from_files, y)
    else:
        assert slope < 1e-2 * (y.max() - y.min())  # the MR output's own range: quantisation well below its scale

    # the medsr reader reads it back onto the same grid as the NIfTI (the round trip of the package itself)
    from medsr_monai.data import load_volume

    data, affine, _ = load_volume(dicom_dir)
    np.testing.assert_allclose(affine, nii.affine, atol=1e-3)
    assert data.shape == nii.shape


def test_rescale_choice():
    """Integers that fit int16 are stored as they are; floats are mapped onto 0..65535 within half a step."""
    from medsr_monai.data.dicom_out import rescale_for

    assert rescale_for(np.array([-1024, 3000], dtype=np.int16)) == (1.0, 0.0, True)
    x = np.linspace(-3.7, 812.25, 1000).astype(np.float32)
    slope, intercept, signed = rescale_for(x)
    assert not signed and intercept == pytest.approx(-3.7, abs=1e-6)
    q = np.clip(np.rint((x - intercept) / slope), 0, 65535)
    assert np.abs(q * slope + intercept - x).max() <= slope / 2 + 1e-4
