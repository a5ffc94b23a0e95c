"""MONAI decathlon-style datalists: loading with clear errors, writing, hashing.

Format (paths relative to the datalist's folder)::

    {"name": "...", "description": "...", "manifest": "manifest.json",
     "manifest_sha256": "<sha256 of manifest.json>",
     "training": [{"image": "nifti/brain1.nii.gz", "subject": "brain1", "modality": "MR",
                   "spacing": [0.78125, 0.78125, 6.5]}, ...],
     "validation": [...], "test": [...]}
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Mapping, Sequence

__all__ = [
    "DatalistError",
    "DATALIST_NAME",
    "SPLITS",
    "load_datalist",
    "read_datalist_json",
    "resolve_datalist_path",
    "write_datalist",
    "write_json",
    "file_sha256",
    "datalist_sha256",
    "near_isotropic_files",
]

DATALIST_NAME = "datalist.json"
SPLITS = ("training", "validation", "test")


class DatalistError(ValueError):
    """A datalist that cannot be used; the message names the file and the problem."""


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def resolve_datalist_path(path_or_dir: str | os.PathLike) -> Path:
    """The datalist JSON for a file path or a folder holding ``datalist.json``."""
    p = Path(path_or_dir)
    if not p.exists():
        raise DatalistError(f"{p}: datalist file or folder does not exist")
    if p.is_dir():
        f = p / DATALIST_NAME
        if not f.is_file():
            raise DatalistError(f"{p}: folder has no {DATALIST_NAME}")
        return f
    return p


def datalist_sha256(path_or_dir: str | os.PathLike) -> str:
    """sha256 of the datalist file's bytes (record it with every experiment)."""
    return file_sha256(resolve_datalist_path(path_or_dir))


def read_datalist_json(path_or_dir: str | os.PathLike) -> tuple[Path, dict]:
    """Parse the datalist JSON; return ``(file, content)``; errors name file, line and column."""
    f = resolve_datalist_path(path_or_dir)
    try:
        text = f.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatalistError(f"{f}: cannot read datalist ({type(exc).__name__}: {exc})") from exc
    try:
        content = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatalistError(f"{f}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    if not isinstance(content, dict):
        raise DatalistError(f"{f}: top level must be a JSON object, got {type(content).__name__}")
    return f, content


def load_datalist(path_or_dir: str | os.PathLike, split: str) -> list[dict]:
    """Items of one split with ``image`` made absolute (other keys kept as they are).

    ``path_or_dir`` is the datalist JSON or a folder containing ``datalist.json``.
    Raises :class:`DatalistError` naming the file for: missing path, folder without
    datalist.json, invalid JSON (line/column), missing or empty split, items without
    ``image``, referenced files that do not exist (all of them listed).
    """
    f, content = read_datalist_json(path_or_dir)
    if split not in content:
        keys = [k for k, v in content.items() if isinstance(v, list)]
        raise DatalistError(f"{f}: no split {split!r} (splits present: {', '.join(keys) or 'none'})")
    items = content[split]
    if not isinstance(items, list):
        raise DatalistError(f"{f}: split {split!r} must be a list, got {type(items).__name__}")
    if not items:
        raise DatalistError(f"{f}: split {split!r} is empty")
    bad = [i for i, it in enumerate(items) if not isinstance(it, dict) or not isinstance(it.get("image"), str)]
    if bad:
        raise DatalistError(f"{f}: split {split!r} has items without an 'image' path (item indices {bad})")
    # monai.data.load_decathlon_datalist is not used here on purpose: it turns *any* string
    # value that happens to name an existing path (e.g. a subject id equal to a folder name)
    # into an absolute path. Only ``image`` is resolved, exactly as it would resolve it.
    out = []
    for it in items:
        it = dict(it)
        img = Path(it["image"])
        it["image"] = os.path.normpath(img if img.is_absolute() else f.parent.resolve() / img)
        out.append(it)
    missing = [it["image"] for it in out if not os.path.exists(it["image"])]
    if missing:
        raise DatalistError(
            f"{f}: split {split!r} references {len(missing)} missing file(s): " + ", ".join(missing)
        )
    return out


def write_json(path: str | os.PathLike, content: object) -> Path:
    """Write JSON deterministically (sorted-free, indent 2, trailing newline); return the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(content, indent=2) + "\n"
    if not p.exists() or p.read_text(encoding="utf-8") != text:  # keep mtime when unchanged
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, p)
    return p


def write_datalist(
    path: str | os.PathLike,
    splits: Mapping[str, Sequence[Mapping]],
    name: str,
    description: str = "",
    manifest: str | os.PathLike | None = None,
) -> Path:
    """Write a datalist JSON. ``image`` paths in ``splits`` may be absolute; they are
    stored relative to the datalist's folder. ``manifest`` (a file path) is referenced
    by its path relative to the datalist and its sha256."""
    p = Path(path)
    base = p.parent.resolve()
    content: dict = {"name": name, "description": description}
    if manifest is not None:
        m = Path(manifest)
        content["manifest"] = Path(os.path.relpath(m.resolve(), base)).as_posix()
        content["manifest_sha256"] = file_sha256(m)
    for split in SPLITS:
        items = []
        for it in splits.get(split, []):
            it = dict(it)
            img = Path(it["image"])
            if img.is_absolute():
                it["image"] = Path(os.path.relpath(img, base)).as_posix()
            items.append(it)
        content[split] = items
    return write_json(p, content)


def near_isotropic_files(path_or_dir: str | os.PathLike, split: str, modality: str | None = "MR",
                         max_ratio: float = 1.5) -> list[str]:
    """Images of one datalist split whose voxels are near-isotropic (largest / smallest spacing <= ``max_ratio``).

    Through-plane SR trains on volumes that can be thickened along any axis, so it takes the
    near-isotropic volumes of the same datalist every other bundle uses. Spacing comes from the
    item's ``spacing`` field, else from the image header.

    Args:
        path_or_dir: datalist JSON, or a folder holding ``datalist.json``.
        split: ``"training"``, ``"validation"`` or ``"test"``.
        modality: keep only items of this modality (``None``: all).
        max_ratio: largest allowed ratio of the coarsest to the finest voxel spacing.

    Raises:
        DatalistError: naming the datalist when the split has no such volume.

    Example::

        near_isotropic_files("data/samples", "training")  # ['/.../nifti/mni152.nii.gz']
    """
    f = resolve_datalist_path(path_or_dir)
    out, seen = [], []
    for it in load_datalist(f, split):
        if modality is not None and it.get("modality", modality) != modality:
            continue
        spacing = it.get("spacing")
        if not spacing:
            import nibabel as nib  # only for items without a recorded spacing

            spacing = nib.load(it["image"]).header.get_zooms()[:3]
        spacing = [float(s) for s in spacing]
        seen.append(f"{Path(it['image']).name} {'x'.join(f'{s:g}' for s in spacing)} mm")
        if max(spacing) / min(spacing) <= max_ratio:
            out.append(it["image"])
    if not out:
        raise DatalistError(
            f"{f}: split {split!r} has no near-isotropic {modality or ''} volume (spacing ratio <= {max_ratio:g}); "
            f"it has: {', '.join(seen) or 'none of that modality'}")
    return out


def check_split_overlap(path_or_dir: str | os.PathLike, allow: bool = False) -> bool:
    """Refuse a datalist whose training split shares a subject (its ``subject`` id) or an image file with the
    validation or test split: those scores would measure images the network trained on. Called at bundle start.

    A dataset folder without a datalist (e.g. plain folders of volumes) is not checked here.

    Args:
        path_or_dir: the datalist JSON or the folder holding ``datalist.json`` (a bundle's ``dataset_dir``).
        allow: accept the overlap (``--allow_subject_overlap true``), with a warning.

    Returns:
        ``True`` (for a config's ``initialize`` list). Raises :class:`DatalistError` naming the file, the splits and
        the subjects.
    """
    import logging

    from medsr_monai.utils import as_bool

    try:
        f, content = read_datalist_json(path_or_dir)
    except DatalistError:
        return True  # no datalist here: the loaders report a dataset problem themselves
    base = f.parent.resolve()

    def keys(split: str) -> tuple[dict[str, str], dict[str, str]]:
        items = [it for it in content.get(split) or [] if isinstance(it, dict)]
        subjects = {str(it["subject"]): str(it.get("image")) for it in items if it.get("subject") not in (None, "")}
        images = {os.path.normpath(base / str(it["image"])): str(it["image"]) for it in items
                  if isinstance(it.get("image"), str)}
        return subjects, images

    train_subjects, train_images = keys("training")
    problems = []
    for other in ("validation", "test"):
        subjects, images = keys(other)
        shared = sorted(set(train_subjects) & set(subjects))
        if shared:
            more = f" and {len(shared) - 5} more" if len(shared) > 5 else ""
            problems.append(f"subject(s) {', '.join(shared[:5])}{more} in both training and {other}")
        same = sorted(images[p] for p in set(train_images) & set(images))
        if same:
            problems.append(f"image(s) {', '.join(same[:3])} in both training and {other}")
    if not problems:
        return True
    msg = (f"{f}: {'; '.join(problems)}: {'validation' if 'validation' in problems[0] else 'test'} scores would "
           "measure images the network trained on")
    if as_bool(allow, "allow_subject_overlap"):
        logging.getLogger(__name__).warning("%s (allowed by allow_subject_overlap)", msg)
        return True
    raise DatalistError(f"{msg}; put each subject in one split, or pass --allow_subject_overlap true")
