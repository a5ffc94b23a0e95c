"""``medsr fetch-bundle``: unpack a published bundle safely and prove it is the one that was published.

The archive is treated as untrusted: entries with absolute paths, ``..`` components or links are refused
before anything is written (zip-slip), every file is checked against the manifest's sha256 (a changed byte,
a missing or an extra file is refused), and the weights must load with ``torch.load(weights_only=True)``.
The bundle is unpacked into a staging folder beside the destination and renamed into place only when all
checks pass, so a refused archive leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from .archive import MANIFEST
from .checks import PublishError, load_weights
from .provenance import sha256

__all__ = ["fetch_bundle", "check_entry_name", "verify_tree"]


def check_entry_name(archive: Path, name: str) -> PurePosixPath:
    """Refuse an archive member that would be written outside the destination."""
    norm = name.replace("\\", "/")
    p = PurePosixPath(norm)
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        raise PublishError(f"{archive}: refusing entry {name!r}: absolute path")
    if ".." in p.parts:
        raise PublishError(f"{archive}: refusing entry {name!r}: '..' component escapes the destination")
    return p


def _is_link(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _unzip(archive: Path, staging: Path) -> Path:
    """Check every member name first, then extract; returns the bundle folder inside ``staging``."""
    try:
        zf = zipfile.ZipFile(archive)
    except (OSError, zipfile.BadZipFile) as e:
        raise PublishError(f"{archive}: not a readable zip archive: {e}") from e
    with zf:
        infos = zf.infolist()
        tops = set()
        for info in infos:
            p = check_entry_name(archive, info.filename)
            if _is_link(info):
                target = zf.read(info).decode(errors="replace")
                raise PublishError(f"{archive}: refusing entry {info.filename!r}: a link (to {target!r}); "
                                   "published bundles contain no links")
            if p.parts:
                tops.add(p.parts[0])
        if len(tops) != 1:
            raise PublishError(f"{archive}: expected one top folder <name>/, found {sorted(tops) or 'none'}")
        for info in infos:
            dest = staging.joinpath(*PurePosixPath(info.filename.replace("\\", "/")).parts)
            if not dest.resolve().is_relative_to(staging.resolve()):  # belt and braces after the name checks
                raise PublishError(f"{archive}: refusing entry {info.filename!r}: escapes the destination")
            if info.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(info) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)
            except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # CRC mismatch, broken deflate stream
                raise PublishError(f"{archive}: entry {info.filename!r} is corrupt (archive tampered or "
                                   f"truncated): {e}") from e
    return staging / tops.pop()


def _copy_dir(src: Path, staging: Path) -> Path:
    """Copy an unpacked bundle folder, refusing links (a link can point anywhere on the sender's disk)."""
    for root, dirs, files in os.walk(src):
        for n in dirs + files:
            p = Path(root, n)
            if p.is_symlink():
                target = os.readlink(p)
                escapes = not (p.parent / target).resolve().is_relative_to(src.resolve())
                raise PublishError(f"{p}: refusing a link (to {target!r}{', outside the bundle' if escapes else ''}); "
                                   "published bundles contain no links")
    dest = staging / src.name
    shutil.copytree(src, dest)
    return dest


def verify_tree(bundle: Path, origin: Path) -> dict:
    """Every file listed in ``manifest.json`` present with its sha256, nothing unlisted, weights safe to load.

    Returns:
        the manifest.
    """
    try:
        manifest = json.loads((bundle / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PublishError(f"{origin}: no valid {MANIFEST}: {e}") from e
    problems = []
    for rel, digest in sorted(files.items()):
        check_entry_name(origin, rel)
        p = bundle / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif sha256(p) != digest:
            problems.append(f"{rel}: sha256 mismatch (file changed after publishing)")
    present = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} - {MANIFEST}
    problems += [f"{rel}: not listed in {MANIFEST}" for rel in sorted(present - set(files))]
    if problems:
        raise PublishError(f"{origin}: checksum verification failed:\n  " + "\n  ".join(problems))
    for weights in sorted((bundle / "models").glob("*.pt")):
        load_weights(weights)  # weights_only=True: refuses pickled objects (code run on unpickling)
    return manifest


def fetch_bundle(source: Path, to: Path) -> Path:
    """Verify and unpack ``source`` (a ``.zip`` from ``medsr publish`` or an unpacked bundle folder with its
    ``manifest.json``) to ``to/<name>`` (the layout ``monai.bundle.load(name=..., bundle_dir=to)`` reads).

    Returns:
        the unpacked bundle folder.
    """
    source = Path(source)
    if not source.exists():
        raise PublishError(f"{source}: no such archive or folder")
    to = Path(to)
    to.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=to))
    try:
        unpacked = _copy_dir(source, staging) if source.is_dir() else _unzip(source, staging)
        manifest = verify_tree(unpacked, source)
        name = str(manifest.get("name") or unpacked.name)
        check_entry_name(source, name)
        if "/" in name or name in ("", "."):
            raise PublishError(f"{source}: invalid bundle name {name!r} in {MANIFEST}")
        dest = to / name
        if dest.exists() and any(dest.iterdir()):
            raise PublishError(f"{dest}: already exists and is not empty; choose another --to")
        if dest.exists():
            dest.rmdir()
        os.replace(unpacked, dest)
        return dest
    finally:
        shutil.rmtree(staging, ignore_errors=True)
