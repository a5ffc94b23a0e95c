"""Authenticity of a published archive: its sha256, and an Ed25519 signature the publisher makes with a key only
they hold.

The checksums in ``manifest.json`` travel inside the archive they describe, so they only prove that nothing was
damaged by accident: whoever edits a file can recompute its checksum too. Authenticity needs something from
outside the archive: the archive's sha256 as the publisher printed it (``medsr fetch-bundle --sha256``), or a
signature checked with the publisher's public key that the collaborator already trusts
(``medsr fetch-bundle --public-key``). The signature lies beside the archive as ``<archive>.sig`` (base64 of the
Ed25519 signature of :func:`signed_message`). Everything here is offline (``cryptography``).
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from .checks import PublishError

__all__ = ["SIG_SUFFIX", "archive_sha256", "signed_message", "generate_key", "sign_archive", "verify_signature",
           "signature_path"]

SIG_SUFFIX = ".sig"
#: a fixed prefix, so that a signature made for an archive can never be replayed as a signature of anything else
_DOMAIN = b"medsr-monai bundle archive sha256 v1:"


def archive_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def signed_message(digest: str) -> bytes:
    """The bytes that are signed for an archive whose sha256 is ``digest``."""
    return _DOMAIN + digest.lower().encode()


def signature_path(archive: str | os.PathLike) -> Path:
    return Path(f"{archive}{SIG_SUFFIX}")


def generate_key(private: str | os.PathLike) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair: ``private`` (PEM, PKCS8, readable by the owner only) and ``<private>.pub``
    (PEM; give this one to collaborators). Refuses to overwrite an existing key.

    Returns:
        (private key path, public key path).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Path(private)
    public = Path(f"{private}.pub")
    for p in (private, public):
        if p.exists():
            raise PublishError(f"{p}: already exists; refusing to overwrite a key (choose another path)")
    private.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never world-readable, not even briefly
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _load_private(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise PublishError(f"{path}: not a readable unencrypted PEM private key: {e}") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise PublishError(f"{path}: not an Ed25519 private key (make one with `medsr keygen`)")
    return key


def _load_public(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as e:
        raise PublishError(f"{path}: not a readable PEM public key: {e}") from e
    if not isinstance(key, Ed25519PublicKey):
        raise PublishError(f"{path}: not an Ed25519 public key")
    return key


def sign_archive(archive: str | os.PathLike, private_key: str | os.PathLike) -> Path:
    """Sign ``archive`` with ``private_key``; writes and returns ``<archive>.sig``."""
    key = _load_private(Path(private_key))
    sig = key.sign(signed_message(archive_sha256(archive)))
    out = signature_path(archive)
    out.write_text(base64.b64encode(sig).decode() + "\n")
    return out


def verify_signature(archive: str | os.PathLike, public_key: str | os.PathLike,
                     signature: str | os.PathLike | None = None) -> str:
    """Check ``archive`` against its signature (default ``<archive>.sig``) with ``public_key``.

    Returns:
        the archive's sha256. Raises :class:`PublishError` naming the file when the signature is missing, malformed
        or does not match.
    """
    from cryptography.exceptions import InvalidSignature

    key = _load_public(Path(public_key))
    sig_file = Path(signature) if signature else signature_path(archive)
    try:
        sig = base64.b64decode(sig_file.read_text().strip(), validate=True)
    except FileNotFoundError as e:
        raise PublishError(f"{sig_file}: no signature beside the archive (the publisher signs with "
                           "`medsr publish --sign-key`); pass --signature or --sha256") from e
    except (OSError, ValueError) as e:
        raise PublishError(f"{sig_file}: not a base64 signature: {e}") from e
    digest = archive_sha256(archive)
    try:
        key.verify(sig, signed_message(digest))
    except InvalidSignature as e:
        raise PublishError(f"{archive}: signature {sig_file.name} does not match with public key {public_key} "
                           "(archive changed after signing, or signed by another key)") from e
    return digest
