"""``medsr fetch-bundle``: unpack a published bundle safely and prove it is the one that was published.

A bundle's configs are code: their ``$``-expressions run under ``monai.bundle run``. So the archive is treated as
untrusted and checked in this order, refusing on the first failure, with nothing left behind:

1. **Authenticity** (before anything is read from the archive): its sha256 must equal the one the publisher
   printed (``--sha256``), and/or its ``<archive>.sig`` must verify with a public key the collaborator trusts
   (``--public-key``; see :mod:`.signing`). Neither given: refused, unless ``--trust-unverified`` (warned loudly).
   The checksums in ``manifest.json`` cannot do this job: the manifest travels inside the archive it describes.
2. **Shape, from the zip's central directory, before extracting anything** (zip bombs, zip-slip): entry count,
   name lengths, absolute paths, ``..``, links and other non-regular entries, duplicate names (also differing only
   by case or a trailing ``/``), each member's declared size, compression ratio and the total against caps
   (:class:`Limits`), and every member against the manifest (listed, same declared size).
3. **Content**: extraction counts bytes (never more than declared) and every file must match the manifest's
   sha256; nothing unlisted; every weight-like file anywhere (:data:`WEIGHT_SUFFIXES`) must load with
   ``torch.load(weights_only=True)``.

The bundle is unpacked into a staging folder beside the destination and renamed into place only when all checks
pass, so a refused archive leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import tempfile
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .archive import MANIFEST
from .checks import PublishError, load_weights
from .provenance import sha256

__all__ = ["fetch_bundle", "check_entry_name", "verify_tree", "check_archive", "Limits", "WEIGHT_SUFFIXES"]

#: files that torch.load would unpickle: each one anywhere in a bundle must load with weights_only=True
WEIGHT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")
MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Caps checked against the zip's central directory before anything is extracted.

    The defaults are far above any bundle of this project (weights of a few MB, configs of a few kB) and far below
    what fills a disk.

    Args:
        max_entries: members in the archive.
        max_name: characters in one member's path.
        max_component: characters in one path component (most file systems stop at 255 bytes).
        max_file: declared uncompressed size of one member, bytes.
        max_total: declared uncompressed size of all members, bytes.
        max_ratio: uncompressed / compressed size of one member, checked for members over ``ratio_floor`` bytes
            (real weights barely compress; a bomb is zeros that compress ~1000:1).
        ratio_floor: members smaller than this are not ratio-checked (a small JSON file may compress well).
        max_manifest: size of ``manifest.json``, read before extraction.
    """

    max_entries: int = 2000
    max_name: int = 512
    max_component: int = 255
    max_file: int = 1024 * MiB
    max_total: int = 2048 * MiB
    max_ratio: float = 100.0
    ratio_floor: int = 1 * MiB
    max_manifest: int = 8 * MiB


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


def _name_key(name: str) -> str:
    """What a member name is on a case-insensitive, Unicode-normalising file system: two members with the same
    key would be written to one file (the later silently wins)."""
    return unicodedata.normalize("NFC", name.replace("\\", "/").rstrip("/")).casefold()


def _read_manifest(archive: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, limits: Limits) -> dict:
    if info.file_size > limits.max_manifest:
        raise PublishError(f"{archive}: {info.filename} declares {info.file_size} bytes (cap "
                           f"{limits.max_manifest}); refusing before extracting")
    try:
        with zf.open(info) as f:
            manifest = json.loads(f.read(limits.max_manifest + 1))
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, KeyError, TypeError) as e:
        raise PublishError(f"{archive}: {info.filename} is not a valid manifest: {e}") from e
    return manifest


def check_archive(archive: Path, zf: zipfile.ZipFile, limits: Limits = Limits()) -> str:
    """Every check that the central directory and the manifest allow, before a byte is extracted.

    Returns:
        the archive's single top folder name.
    """
    infos = zf.infolist()
    if len(infos) > limits.max_entries:
        raise PublishError(f"{archive}: {len(infos)} entries (cap {limits.max_entries}); refusing before extracting")
    tops, seen, total = set(), {}, 0
    for info in infos:
        name = info.filename
        if len(name) > limits.max_name or any(len(c) > limits.max_component for c in name.split("/")):
            raise PublishError(f"{archive}: refusing entry {name[:80]!r}...: name longer than {limits.max_name} "
                               f"characters or a component longer than {limits.max_component}")
        p = check_entry_name(archive, name)
        if _is_link(info):
            with zf.open(info) as f:  # at most 200 bytes: the entry has not passed the size caps yet
                target = f.read(200).decode(errors="replace")
            raise PublishError(f"{archive}: refusing entry {name!r}: a link (to {target!r}); "
                               "published bundles contain no links")
        kind = stat.S_IFMT(info.external_attr >> 16)
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise PublishError(f"{archive}: refusing entry {name!r}: not a regular file or folder "
                               f"(mode {oct(info.external_attr >> 16)})")
        key = _name_key(name)
        if key in seen:
            raise PublishError(f"{archive}: refusing duplicate entry {name!r} (same path as {seen[key]!r}): "
                               "only one of them could be unpacked, and which one is not defined")
        seen[key] = name
        if p.parts:
            tops.add(p.parts[0])
        if info.is_dir():
            continue
        if info.file_size > limits.max_file:
            raise PublishError(f"{archive}: entry {name!r} declares {info.file_size / MiB:.1f} MiB unpacked "
                               f"(cap {limits.max_file / MiB:.0f} MiB per file); refusing before extracting")
        if info.file_size > limits.ratio_floor and info.file_size > limits.max_ratio * max(info.compress_size, 1):
            raise PublishError(f"{archive}: entry {name!r} expands {info.file_size / max(info.compress_size, 1):.0f}x "
                               f"({info.compress_size} -> {info.file_size} bytes; cap {limits.max_ratio:.0f}x): "
                               "looks like a zip bomb; refusing before extracting")
        total += info.file_size
        if total > limits.max_total:
            raise PublishError(f"{archive}: members declare more than {limits.max_total / MiB:.0f} MiB unpacked "
                               "in total; refusing before extracting")
    if len(tops) != 1:
        raise PublishError(f"{archive}: expected one top folder <name>/, found {sorted(tops) or 'none'}")
    top = next(iter(tops))
    try:
        man_info = zf.getinfo(f"{top}/{MANIFEST}")
    except KeyError:
        raise PublishError(f"{archive}: no {top}/{MANIFEST}") from None
    manifest = _read_manifest(archive, zf, man_info, limits)
    listed, sizes = manifest["files"], manifest.get("sizes") or {}
    members = {info.filename[len(top) + 1:]: info for info in infos
               if not info.is_dir() and info.filename != man_info.filename}
    problems = [f"{rel}: not listed in {MANIFEST}" for rel in sorted(set(members) - set(listed))]
    problems += [f"{rel}: missing" for rel in sorted(set(listed) - set(members))]
    problems += [f"{rel}: declares {members[rel].file_size} bytes, the manifest says {sizes[rel]}"
                 for rel in sorted(set(members) & set(sizes)) if members[rel].file_size != sizes[rel]]
    if problems:
        raise PublishError(f"{archive}: does not match its {MANIFEST} (nothing extracted):\n  " + "\n  ".join(problems))
    return top


def _unzip(archive: Path, staging: Path, limits: Limits = Limits()) -> Path:
    """Check the whole archive first (:func:`check_archive`), then extract; returns the bundle folder inside
    ``staging``."""
    try:
        zf = zipfile.ZipFile(archive)
    except (OSError, zipfile.BadZipFile) as e:
        raise PublishError(f"{archive}: not a readable zip archive: {e}") from e
    with zf:
        top = check_archive(archive, zf, limits)
        for info in zf.infolist():
            dest = staging.joinpath(*PurePosixPath(info.filename.replace("\\", "/")).parts)
            if not dest.resolve().is_relative_to(staging.resolve()):  # belt and braces after the name checks
                raise PublishError(f"{archive}: refusing entry {info.filename!r}: escapes the destination")
            if info.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            written = 0
            try:
                with zf.open(info) as src, open(dest, "xb") as out:  # "x": a second write to one path is refused
                    for block in iter(lambda: src.read(MiB), b""):
                        written += len(block)
                        if written > info.file_size:  # never more than declared, whatever the stream says
                            raise PublishError(f"{archive}: entry {info.filename!r} unpacks to more than the "
                                               f"{info.file_size} bytes it declares; refusing")
                        out.write(block)
            except FileExistsError as e:
                raise PublishError(f"{archive}: refusing duplicate entry {info.filename!r}") from e
            except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # CRC mismatch, broken deflate stream
                raise PublishError(f"{archive}: entry {info.filename!r} is corrupt (archive tampered or "
                                   f"truncated): {e}") from e
    return staging / top


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
    # every file torch.load would unpickle, anywhere: weights_only=True refuses pickled objects (code run on
    # unpickling), and a config can point at any file, not only models/*.pt
    for weights in sorted(p for p in bundle.rglob("*") if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES):
        load_weights(weights)
    return manifest


def check_authentic(source: Path, sha256_expected: str | None = None, public_key: Path | None = None,
                    signature: Path | None = None, trust_unverified: bool = False, warn=None,
                    origin: Path | None = None) -> str | None:
    """The archive is the one the publisher made: its sha256 equals ``sha256_expected`` and/or its signature
    verifies with ``public_key``. With neither, refused unless ``trust_unverified`` (then ``warn`` is called with a
    loud warning). Checked before anything is read from the archive. Messages name ``origin`` (default
    ``source``: the file checked may be a private copy of it).

    Returns:
        the archive's sha256 when it was checked, else ``None``.
    """
    from .signing import archive_sha256, verify_signature

    origin = origin or source
    if sha256_expected is None and public_key is None:
        what = "folder" if source.is_dir() else "archive"
        if not trust_unverified:
            raise PublishError(f"{source}: refusing an unverified {what}: a bundle's configs are code that "
                               "`monai.bundle run` executes, and the checksums inside it only prove it is intact, "
                               "not who made it. Pass --sha256 <the sha256 `medsr publish` printed> or "
                               "--public-key <the publisher's key>.pub (or --trust-unverified, at your own risk)")
        (warn or _warn)(f"WARNING: {source} IS NOT VERIFIED (--trust-unverified): nothing proves who made this "
                        f"{what}. Its configs are code that runs with your permissions under `monai.bundle run`. "
                        "Read configs/*.json before running it.")
        return None
    if source.is_dir():
        raise PublishError(f"{source}: --sha256 / --public-key check a published archive (.zip); a folder cannot "
                           "be authenticated: fetch the archive, or pass --trust-unverified")
    digest = None
    if sha256_expected is not None:
        want = sha256_expected.strip().lower().removeprefix("sha256:")
        digest = archive_sha256(source)
        if digest != want:
            raise PublishError(f"{origin}: sha256 {digest} does not match the expected --sha256 {want}: not the "
                               "archive that was published (changed, or another one)")
    if public_key is not None:
        try:
            digest = verify_signature(source, public_key, signature)
        except PublishError as e:
            raise PublishError(str(e).replace(str(source), str(origin))) from e
    return digest


def _warn(msg: str) -> None:
    sys.stdout.flush()
    print(msg, file=sys.stderr)


def fetch_bundle(source: Path, to: Path, sha256: str | None = None, public_key: Path | None = None,
                 signature: Path | None = None, trust_unverified: bool = False, limits: Limits = Limits(),
                 warn=None) -> Path:
    """Verify and unpack ``source`` (a ``.zip`` from ``medsr publish`` or an unpacked bundle folder with its
    ``manifest.json``) to ``to/<name>`` (the layout ``monai.bundle.load(name=..., bundle_dir=to)`` reads).

    Args:
        sha256: the archive's sha256 as the publisher printed it.
        public_key: the publisher's Ed25519 public key (PEM); the signature is ``signature`` or ``<source>.sig``.
        trust_unverified: allow an archive with neither (a loud warning is given through ``warn``).
        limits: caps checked before extracting (see :class:`Limits`).

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
        if not source.is_dir():
            if source.stat().st_size > limits.max_total:
                raise PublishError(f"{source}: a {source.stat().st_size / MiB:.2f} MiB archive, more than the "
                                   f"{limits.max_total / MiB:.2f} MiB cap on a bundle (--max-unpacked-mb); refusing "
                                   "before reading it")
            # check and unpack one private copy: the file cannot change between the checks and the extraction
            copy = staging / "archive.zip"
            shutil.copyfile(source, copy)
            check_authentic(copy, sha256, public_key, signature or Path(f"{source}.sig"), trust_unverified, warn,
                            origin=source)
            unpacked = _unzip(copy, staging / "x", limits)
        else:
            check_authentic(source, sha256, public_key, signature, trust_unverified, warn)
            unpacked = _copy_dir(source, staging)
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
