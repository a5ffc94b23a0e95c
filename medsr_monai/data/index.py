"""Index a folder of the user's own scans into a checked, subject-split datalist.

:func:`index_folder` finds NIfTI files (``*.nii``, ``*.nii.gz``), NRRD files and DICOM
series (grouped by SeriesInstanceUID, anywhere below the folder), checks every volume
with :func:`~medsr_monai.data.checks.check_volume` rules, converts DICOM series and NRRD
files to NIfTI under ``<out>/nifti/`` (RAS affines), splits by subject with a fixed seed
and writes ``<out>/datalist.json`` and ``<out>/manifest.json``.
"""

from __future__ import annotations

import os
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from .checks import check_array, check_volume
from .datalist import DatalistError, SPLITS, file_sha256, write_datalist, write_json
from .modality import guess_modality
from .readers import VolumeError, is_dicom_file, load_volume, read_dicom_series

__all__ = ["index_folder", "split_subjects", "guess_modality"]

_NIFTI_EXT = (".nii", ".nii.gz")
_NRRD_EXT = (".nrrd", ".nhdr")


def _stem(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii", ".nrrd", ".nhdr"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "subject"


def split_subjects(
    subjects: Sequence[str], seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2
) -> dict[str, list[str]]:
    """Deterministic subject split with a numpy Generator seeded by ``seed``.

    Subjects are sorted before shuffling, so the result depends only on the set of
    subject ids and the seed. With >= 3 subjects and both fractions > 0 every split gets
    at least one subject; training always keeps at least one.
    """
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= f < 1:
            raise DatalistError(f"{name} must be in [0, 1), got {f}")
    if val_fraction + test_fraction >= 1:
        raise DatalistError(f"val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction}")
    subs = sorted(set(subjects))
    n = len(subs)
    rng = np.random.default_rng(seed)
    order = [subs[i] for i in rng.permutation(n)]
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    if n >= 3:
        n_test = max(n_test, 1 if test_fraction > 0 else 0)
        n_val = max(n_val, 1 if val_fraction > 0 else 0)
        while n_test + n_val > n - 1:
            if n_test >= n_val and n_test > 1:
                n_test -= 1
            elif n_val > 1:
                n_val -= 1
            else:
                break
    elif n == 2:
        n_test = 1 if test_fraction > 0 else 0
        n_val = 1 if (val_fraction > 0 and n_test == 0) else 0
    else:
        n_test = n_val = 0
    return {
        "training": sorted(order[n_test + n_val:]),
        "validation": sorted(order[n_test:n_test + n_val]),
        "test": sorted(order[:n_test]),
    }


def _scan(folder: Path, skip: set[Path]) -> tuple[list[Path], list[Path], list[Path]]:
    nifti, nrrd, dicom = [], [], []
    for root, dirs, files in os.walk(folder):
        rootp = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (rootp / d).resolve() not in skip)
        for name in sorted(files):
            if name.startswith("."):
                continue
            p = rootp / name
            low = name.lower()
            if low.endswith(_NIFTI_EXT):
                nifti.append(p)
            elif low.endswith(_NRRD_EXT):
                nrrd.append(p)
            elif low.endswith(".dcm") or is_dicom_file(p):
                dicom.append(p)
    return nifti, nrrd, dicom


def index_folder(
    folder: str | os.PathLike,
    out: str | os.PathLike | None = None,
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    modality: str | None = None,
    verbose: bool = True,
) -> dict:
    """Index ``folder``; write ``datalist.json`` + ``manifest.json`` to ``out`` (default: folder).

    Returns ``{"folder", "out", "datalist", "manifest", "items", "splits", "rejected"}``
    where ``rejected`` is ``[{"path": ..., "reason": ...}]`` (also printed to stderr when
    ``verbose``) and ``splits`` maps split -> subject ids. Raises :class:`DatalistError`
    naming the folder when it is missing, empty or holds no valid volume.
    """
    import pydicom

    folder = Path(folder)
    if not folder.is_dir():
        raise DatalistError(f"{folder}: folder does not exist" if not folder.exists() else f"{folder}: not a folder")
    out_dir = Path(out) if out is not None else folder
    nifti_out = out_dir / "nifti"
    if modality is not None:
        modality = modality.upper()
        if modality not in ("MR", "CT"):
            raise DatalistError(f"modality must be MR or CT, got {modality!r}")
    # validate fractions before doing any work
    split_subjects([], seed, val_fraction, test_fraction)

    nifti_files, nrrd_files, dicom_files = _scan(folder, skip={nifti_out.resolve()})
    if not (nifti_files or nrrd_files or dicom_files):
        raise DatalistError(f"{folder}: no NIfTI (.nii, .nii.gz), NRRD or DICOM files found")

    rejected: list[dict] = []
    items: list[dict] = []  # image (absolute), subject, modality, ...

    def reject(path, reason):
        rejected.append({"path": str(path), "reason": reason})
        if verbose:
            print(f"[medsr data] rejected {path}: {reason}", file=sys.stderr, flush=True)

    def add(image: Path, subject: str, info: dict, source: list[str], dicom_modality: str | None):
        if dicom_modality in ("CT", "MR"):
            mod, guessed = dicom_modality, False
        elif modality is not None:
            mod, guessed = modality, False
        else:
            mod, guessed = guess_modality(info["min"]), True
        items.append({
            "image": str(image.resolve()),
            "subject": subject,
            "modality": mod,
            "modality_guessed": guessed,
            "spacing": info["spacing"],
            "shape": info["shape"],
            "dtype": info["dtype"],
            "source": source,
        })

    for p in nifti_files:
        try:
            info = check_volume(p)
        except VolumeError as err:
            reject(p, err.problem)
            continue
        add(p, _stem(p), info, [str(p)], None)

    used_names: set[str] = set()

    def out_name(base: str) -> Path:
        name, i = base, 1
        while name in used_names:
            i += 1
            name = f"{base}_{i}"
        used_names.add(name)
        return nifti_out / f"{name}.nii.gz"

    from .samples import write_nifti

    for p in nrrd_files:
        try:
            data, affine, _ = load_volume(p)
            info = check_array(p, data, affine)
        except VolumeError as err:
            reject(p, err.problem)
            continue
        dest = out_name(_safe(_stem(p)))
        write_nifti(dest, data, affine)
        add(dest, _stem(p), info, [str(p)], None)

    series: dict[str, list[Path]] = defaultdict(list)
    for p in dicom_files:
        try:
            ds = pydicom.dcmread(str(p), stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001
            reject(p, f"unreadable DICOM file ({type(exc).__name__}: {exc})")
            continue
        sop_class = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
        if sop_class == "1.2.840.10008.1.3.10":  # a DICOMDIR (media index), not an image
            continue
        uid = getattr(ds, "SeriesInstanceUID", None)
        if not uid:
            reject(p, "DICOM file has no SeriesInstanceUID (not part of an image series)")
            continue
        series[str(uid)].append(p)
    for uid, files in sorted(series.items(), key=lambda kv: str(kv[1][0])):
        where = Path(os.path.commonpath([str(f) for f in files]))  # folder, or the file itself
        try:
            data, affine, meta = read_dicom_series(files)
            info = check_array(where, data, affine)
        except VolumeError as err:
            reject(err.path, f"DICOM series {uid}: {err.problem}")
            continue
        subject = meta["PatientID"].strip() or where.name
        dest = out_name(_safe(f"{subject}_series{meta['SeriesNumber'] or uid[-8:]}"))
        write_nifti(dest, data, affine)
        info["path"] = str(dest)
        add(dest, _safe(subject), info, [str(f) for f in meta["files"]], meta["Modality"].upper() or None)

    if not items:
        raise DatalistError(
            f"{folder}: no valid volume found ({len(rejected)} rejected: "
            + "; ".join(f"{r['path']}: {r['reason']}" for r in rejected[:5])
            + (" ..." if len(rejected) > 5 else "")
            + ")"
        )

    splits = split_subjects([it["subject"] for it in items], seed, val_fraction, test_fraction)
    split_of = {s: split for split, subs in splits.items() for s in subs}
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir.resolve()
    files = []
    for it in items:
        it["split"] = split_of[it["subject"]]
        files.append({
            "image": Path(os.path.relpath(it["image"], base)).as_posix(),
            "subject": it["subject"],
            "modality": it["modality"],
            "modality_guessed": it["modality_guessed"],
            "split": it["split"],
            "sha256": file_sha256(it["image"]),
            "shape": it["shape"],
            "spacing": it["spacing"],
            "dtype": it["dtype"],
            "source": [Path(os.path.relpath(Path(s).resolve(), base)).as_posix() for s in it["source"]],
        })
    manifest = {
        "name": f"medsr-index-{folder.resolve().name}",
        "folder": str(folder.resolve()),
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "files": files,
        "rejected": rejected,
    }
    man_path = write_json(out_dir / "manifest.json", manifest)
    dl_items = {
        split: [
            {k: it[k] for k in ("image", "subject", "modality", "spacing", "shape")}
            | ({"modality_guessed": True} if it["modality_guessed"] else {})
            for it in sorted(items, key=lambda x: (x["subject"], x["image"]))
            if it["split"] == split
        ]
        for split in SPLITS
    }
    dl_path = write_datalist(
        out_dir / "datalist.json",
        dl_items,
        name=manifest["name"],
        description=f"Volumes indexed from {folder.resolve()} (split by subject, seed {seed}).",
        manifest=man_path,
    )
    return {
        "folder": str(folder),
        "out": str(out_dir),
        "datalist": str(dl_path),
        "manifest": str(man_path),
        "items": items,
        "splits": splits,
        "rejected": rejected,
    }
