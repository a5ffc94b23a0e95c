"""Index a folder of the user's own scans into a checked, subject-split datalist.

:func:`index_folder` finds NIfTI files (``*.nii``, ``*.nii.gz``), NRRD files and DICOM
series (grouped by SeriesInstanceUID, anywhere below the folder), checks every volume
with :func:`~medsr_monai.data.checks.check_volume` rules, converts DICOM series and NRRD
files to NIfTI under ``<out>/nifti/`` (RAS affines), splits by subject with a fixed seed
and writes ``<out>/datalist.json`` and ``<out>/manifest.json``.

Privacy: a DICOM series' subject is its PatientID, which identifies a patient; the datalist, the manifest and
the file names travel (into MLflow through hashes and paths, into archives, to collaborators). So DICOM subjects
are pseudonymised (:class:`Pseudonyms`: ``sub-0001``, ..., stable when the folder is indexed again) and the
mapping back is kept only in ``<out>/.medsr-pseudonyms.json`` (owner-readable), which
nothing logs or publishes. No DICOM attribute of the basic de-identification profile (PS3.15: names, ids,
dates, UIDs, institution, accession number, ...) is copied into any output: the converted NIfTI has no
description, the series is named by its SeriesNumber or a counter.
"""

from __future__ import annotations

import json
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

__all__ = ["index_folder", "split_subjects", "guess_modality", "Pseudonyms", "PSEUDONYM_FILE"]

#: the local file that maps pseudonyms back to patient ids: never logged, published or copied by medsr
PSEUDONYM_FILE = ".medsr-pseudonyms.json"

_NIFTI_EXT = (".nii", ".nii.gz")
_NRRD_EXT = (".nrrd", ".nhdr")


def _stem(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii", ".nrrd", ".nhdr"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


def _subject_of(path: Path, folder: Path) -> str:
    """The subject of a NIfTI / NRRD file: its BIDS ``sub-<label>`` (from a folder or the file name: the scans of one
    subject must land in one split), else the file name without its suffix."""
    try:
        parts = path.relative_to(folder).parts
    except ValueError:
        parts = path.parts
    for part in parts:
        m = re.match(r"^(sub-[A-Za-z0-9]+)", part)
        if m:
            return m.group(1)
    return _stem(path)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "subject"


class Pseudonyms:
    """Sequential subject pseudonyms ``sub-0001``, ``sub-0002``, ... in the order the folder's series are met (sorted
    paths: the same folder gives the same pseudonyms). The mapping back is kept in ``<out>/.medsr-pseudonyms.json``
    (mode 600) and reused when the folder is indexed into the same ``out`` again, so a subject keeps its pseudonym
    and a new one gets the next number. The pseudonym carries nothing of the identifier.

    Args:
        out_dir: where the mapping file lives (the index's output folder).
    """

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / PSEUDONYM_FILE
        self.mapping: dict[str, str] = {}  # pseudonym -> identifier
        try:
            self.mapping = dict(json.loads(self.path.read_text())["subjects"])
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DatalistError(f"{self.path}: unreadable pseudonym file ({e}); restore it, or move it away to "
                                "start new pseudonyms (the old ones can then not be matched)") from e
        self._of = {ident: name for name, ident in self.mapping.items()}

    def __call__(self, identifier: str) -> str:
        if identifier not in self._of:
            n = len(self.mapping) + 1
            while f"sub-{n:04d}" in self.mapping:
                n += 1
            self._of[identifier] = f"sub-{n:04d}"
            self.mapping[f"sub-{n:04d}"] = identifier
        return self._of[identifier]

    def save(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"about": "medsr data index: pseudonym -> original subject identifier. PRIVATE: do not "
                       "share or publish this file.", "subjects": dict(sorted(self.mapping.items()))}, f, indent=2)
        os.chmod(tmp, 0o600)
        tmp.replace(self.path)
        return self.path


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


def _voxel_digest(image: str | os.PathLike) -> str:
    """sha256 of a volume's voxel data and shape (not of the file: the same scan compressed differently, or with
    another header description, is still the same scan)."""
    import hashlib

    import nibabel as nib

    img = nib.load(str(image))
    data = np.ascontiguousarray(np.asanyarray(img.dataobj))
    h = hashlib.sha256(str((data.shape, str(data.dtype))).encode())
    h.update(data.tobytes())
    return h.hexdigest()


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
        add(p, _subject_of(p, folder), info, [str(p)], None)

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
        add(dest, _subject_of(p, folder), info, [str(p)], None)

    pseudonyms = Pseudonyms(out_dir)
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
    for k, (uid, files) in enumerate(sorted(series.items(), key=lambda kv: str(kv[1][0])), start=1):
        where = Path(os.path.commonpath([str(f) for f in files]))  # folder, or the file itself
        try:
            data, affine, meta = read_dicom_series(files)
            info = check_array(where, data, affine)
        except VolumeError as err:
            # the series by its number here, not its SeriesInstanceUID (a UID can be traced back to the patient)
            reject(err.path, f"DICOM series {k}: {err.problem}")
            continue
        # the PatientID (or, without one, the folder name: often the patient's name) only as a keyed pseudonym
        subject = pseudonyms(meta["PatientID"].strip() or f"folder:{where.name}")
        number = re.sub(r"\D", "", meta["SeriesNumber"]) or str(k)
        dest = out_name(f"{subject}_series{number}")
        write_nifti(dest, data, affine)
        info["path"] = str(dest)
        add(dest, subject, info, [str(f) for f in meta["files"]], meta["Modality"].upper() or None)
    if series:
        pseudonyms.save()

    # one scan under two names (a copy, a series exported twice) would be split as two subjects: its copies
    # would then be trained on and scored on. Keep the first, reject the others naming it.
    first_of: dict[str, dict] = {}
    for it in list(items):
        digest = it["voxel_sha256"] = _voxel_digest(it["image"])
        if digest in first_of:
            kept = first_of[digest]
            items.remove(it)
            reject(it["source"][0] if len(it["source"]) == 1 else Path(it["source"][0]).parent,
                   f"same voxel data as {kept['source'][0] if len(kept['source']) == 1 else kept['image']} "
                   f"(subject {kept['subject']}): one scan under two names would leak between the splits")
        else:
            first_of[digest] = it

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
