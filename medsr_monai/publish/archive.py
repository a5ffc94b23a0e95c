"""Writing a bundle archive: ``<name>_<version>.zip`` holding ``<name>/...`` and ``<name>/manifest.json`` with
the sha256 of every other file and the training run's provenance."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

from .provenance import sha256

__all__ = ["MANIFEST", "EXCLUDED_DIRS", "bundle_files", "write_archive"]

MANIFEST = "manifest.json"
#: run outputs and caches, never part of a published bundle; nor the overlays, which name shared bases outside
#: the bundle: a published bundle carries the flat configs they render to (see :mod:`medsr_monai.overlays`)
EXCLUDED_DIRS = {"eval", "__pycache__", "mlruns", ".ipynb_checkpoints", "overlays"}


def bundle_files(bundle: Path) -> list[str]:
    """Relative POSIX paths of the files to publish (sorted); links and excluded folders are left out
    (a link would point outside the archive on the collaborator's machine)."""
    out = []
    for root, dirs, files in os.walk(bundle):
        dirs[:] = sorted(d for d in dirs if d not in EXCLUDED_DIRS and not Path(root, d).is_symlink())
        for f in files:
            p = Path(root, f)
            rel = p.relative_to(bundle).as_posix()
            if p.is_file() and not p.is_symlink() and rel != MANIFEST and not f.endswith(".pyc"):
                out.append(rel)
    return sorted(out)


def write_archive(bundle: Path, name: str, version: str, out: Path, provenance: dict | str) -> Path:
    """Zip ``bundle`` to ``out/<name>_<version>.zip`` (written to a temporary name first, so that a failure
    never leaves a half archive that would count as published).

    Args:
        provenance: the training run's provenance dict, or ``"unknown"``.
    """
    files = bundle_files(bundle)
    # sizes let fetch-bundle compare every member's declared size before it extracts a byte (zip bombs)
    manifest = {"name": name, "version": version, "files": {f: sha256(bundle / f) for f in files},
                "sizes": {f: (bundle / f).stat().st_size for f in files}, "provenance": provenance}
    out.mkdir(parents=True, exist_ok=True)
    dest = out / f"{name}_{version}.zip"
    part = dest.with_suffix(".zip.part")
    with zipfile.ZipFile(part, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for f in files:
            zf.write(bundle / f, f"{name}/{f}")
        zf.writestr(f"{name}/{MANIFEST}", json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(part, dest)
    return dest
