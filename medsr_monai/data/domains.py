"""Image domains for unpaired translation (CycleGAN): which volumes form domain A and domain B."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .datalist import DatalistError, load_datalist, read_datalist_json

__all__ = ["select_items", "domain_items", "subject_part"]


def select_items(items: Sequence[dict[str, Any]], modality: str | None = None,
                 subjects: Sequence[str] | None = None, exclude_subjects: Sequence[str] = (),
                 what: str = "selection") -> list[dict[str, Any]]:
    """Datalist items of one ``modality`` and/or of the given ``subjects``, without ``exclude_subjects``.

    Raises :class:`~medsr_monai.data.DatalistError` (naming ``what``) when nothing is left.

    Example:
        >>> select_items([{"image": "a", "modality": "CT", "subject": "s1"},
        ...               {"image": "b", "modality": "MR", "subject": "s2"}], modality="CT")
        [{'image': 'a', 'modality': 'CT', 'subject': 's1'}]
    """
    out = [dict(it) for it in items
           if (modality is None or str(it.get("modality", "")).upper() == modality.upper())
           and (subjects is None or it.get("subject") in set(subjects))
           and it.get("subject") not in set(exclude_subjects)]
    if not out:
        have = sorted({f"{it.get('subject')} ({it.get('modality')})" for it in items})
        raise DatalistError(f"{what}: no volume with modality={modality}, subjects={subjects}, "
                            f"excluding {list(exclude_subjects)}; available: {have}")
    return out


def subject_part(items: Sequence[dict[str, Any]], part: int, parts: int = 2,
                 what: str = "selection") -> list[dict[str, Any]]:
    """The items of every ``parts``-th subject, starting at ``part`` in sorted subject order.

    CycleGAN learns from unpaired domains; drawing domain A (simulated low dose) and domain B (full dose) from
    disjoint halves of the training patients keeps the two domains unpaired in fact, not only in sampling,
    and leaves the validation and test patients out of both. Raises
    :class:`~medsr_monai.data.DatalistError` (naming ``what``) when the part is empty.

    Args:
        items: datalist items with a ``subject`` key.
        part: which part, ``0 <= part < parts``.
        parts: how many disjoint parts the subjects are dealt into.
        what: what the selection is for, named in the error.

    Example:
        >>> items = [{"subject": s} for s in ("c", "a", "b")]
        >>> [it["subject"] for it in subject_part(items, 0)], [it["subject"] for it in subject_part(items, 1)]
        (['c', 'a'], ['b'])
    """
    if not 0 <= int(part) < int(parts):
        raise ValueError(f"{what}: part must be in [0, {parts}), got {part}")
    subjects = sorted({str(it.get("subject")) for it in items})
    keep = set(subjects[int(part)::int(parts)])
    out = [dict(it) for it in items if str(it.get("subject")) in keep]
    if not out:
        raise DatalistError(f"{what}: part {part} of {parts} is empty; {len(subjects)} subject(s): {subjects}")
    return out


def domain_items(source: str | os.PathLike, index_dir: str | os.PathLike | None = None,
                 split: str | None = "training") -> list[dict[str, Any]]:
    """The volumes of one domain given as a datalist (file, or folder holding ``datalist.json``) or as a
    plain folder of NIfTI / NRRD files or DICOM series.

    A datalist contributes its ``split`` (all splits when the split is absent or ``split`` is None). A plain
    folder is indexed with :func:`~medsr_monai.data.index_folder` (every volume checked; rejected files are
    named) into ``index_dir`` (never into the user's folder) and all its volumes are used.
    """
    src = Path(source)
    if not src.exists():
        raise DatalistError(f"domain data {src}: no such file or folder")
    if src.is_file() or (src / "datalist.json").is_file():
        f, content = read_datalist_json(src)
        splits = [split] if split in content else [k for k, v in content.items() if isinstance(v, list)]
        items = [it for s in splits for it in load_datalist(f, s)]
        if not items:
            raise DatalistError(f"domain data {f}: the datalist holds no volume")
        return items
    from .index import index_folder

    out = Path(index_dir) if index_dir is not None else src / ".medsr_index"
    result = index_folder(src, out=out, verbose=True)
    return [dict(it) for it in result["items"]]
