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


def write_archive(bundle: Path, name: str, version: str, out: Path, provenance: dict | str,
                  onnx_sample: Path | None = None, log=print) -> Path:
    """Zip ``bundle`` to ``out/<name>_<version>.zip`` (written to a temporary name first, so that a failure
    never leaves a half archive that would count as published).

    Args:
        provenance: the training run's provenance dict, or ``"unknown"``.
        onnx_sample: a real NIfTI: export every inference config's network to ``models/<ckpt stem>.onnx`` and
            verify it with ONNX Runtime on it (:mod:`.onnx_export`); the result (files, tolerance, differences,
            or why a network was not exported) goes into the manifest's ``"onnx"`` entry. ``None``: no ONNX.
    """
    import tempfile

    from .onnx_export import export_bundle_variants

    # the ONNX files live in a temporary folder removed whatever happens (also when nothing exported, or the
    # archive fails half-way)
    with tempfile.TemporaryDirectory(prefix="medsr-onnx-") as tmp:
        files = bundle_files(bundle)
        sources = {f: bundle / f for f in files}
        onnx_record = None
        if onnx_sample is not None:
            # ONNX files are made from these weights now; any already in the bundle (e.g. a fetched archive) go
            extra, onnx_record = export_bundle_variants(bundle, Path(onnx_sample), log, workdir=Path(tmp))
            sources = {f: p for f, p in sources.items() if not (f.startswith("models/") and ".onnx" in f)}
            sources.update(extra)
        files = sorted(sources)
        # sizes let fetch-bundle compare every member's declared size before it extracts a byte (zip bombs)
        manifest = {"name": name, "version": version, "files": {f: sha256(sources[f]) for f in files},
                    "sizes": {f: sources[f].stat().st_size for f in files}, "provenance": provenance}
        if onnx_record is not None:
            manifest["onnx"] = onnx_record
        out.mkdir(parents=True, exist_ok=True)
        dest = out / f"{name}_{version}.zip"
        part = dest.with_suffix(".zip.part")
        try:
            with zipfile.ZipFile(part, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                for f in files:
                    zf.write(sources[f], f"{name}/{f}")
                zf.writestr(f"{name}/{MANIFEST}", json.dumps(manifest, indent=2, sort_keys=True))
            os.replace(part, dest)
        finally:
            part.unlink(missing_ok=True)
    return dest
