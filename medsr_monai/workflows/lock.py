"""One training per output folder: an exclusive lock on the output and checkpoint folders for the whole run.

Two trainings writing one folder corrupt each other silently (one run's ``executed_config.json`` beside the other
run's ``model.pt``, interleaved checkpoints, a resume from the other run's state). The lock is an OS file lock
(``filelock``: ``fcntl.flock`` / ``msvcrt``) on ``<folder>/.medsr.lock``: the OS releases it when the process
ends, however it ends (also ``kill -9``), so a crashed run never blocks the next one. A second process is refused
at once, with the holder (pid, host, start time, command) named from ``.medsr.lock.owner``.

The lock is held until the workflow's ``finalize`` (:func:`release_run_folders`) or the process exits; a process
that runs several trainings one after another on one folder (a notebook, the tests) takes it again without waiting
for itself.
"""

from __future__ import annotations

import datetime as _dt
import os
import socket
import sys
from pathlib import Path

__all__ = ["FolderLockedError", "lock_run_folders", "release_run_folders", "LOCK_NAME"]

LOCK_NAME = ".medsr.lock"
_HELD: dict[Path, object] = {}  # folder -> its FileLock, for the life of the process


class FolderLockedError(RuntimeError):
    """Another process holds the folder's lock; the message names the folder and the holder."""


def _rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return int(os.environ.get("RANK", "0") or 0)


def _lock(folder: Path, what: str) -> None:
    from filelock import FileLock, Timeout

    folder = folder.resolve()
    if folder in _HELD:
        return
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / LOCK_NAME), timeout=0)
    owner = folder / f"{LOCK_NAME}.owner"
    try:
        lock.acquire()
    except Timeout:
        try:
            holder = owner.read_text().strip()
        except OSError:
            holder = "another process (unknown)"
        raise FolderLockedError(
            f"{what} {folder} is in use by {holder}: two trainings in one folder overwrite each other's "
            "checkpoints and model.pt. Wait for it to finish, stop it, or choose another output_dir / ckpt_dir"
        ) from None
    _HELD[folder] = lock
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    owner.write_text(f"pid {os.getpid()} on {socket.gethostname()} since {started} "
                     f"({' '.join(sys.argv)[:300]})\n")


def lock_run_folders(output_dir: str | os.PathLike, ckpt_dir: str | os.PathLike | None = None) -> bool:
    """Lock ``output_dir`` and ``ckpt_dir`` for this process (rank 0 only under ``torchrun``: the ranks of one run
    share its folders). Raises :class:`FolderLockedError` naming the folder and the holder when another process has
    either; returns ``True`` (for use in a config's ``initialize`` list).

    Args:
        output_dir: the run's output folder (checkpoints, executed_config.json, metrics).
        ckpt_dir: the folder ``model.pt`` is written to (may be the same, or inside it).
    """
    if _rank() != 0:
        return True
    _lock(Path(output_dir), "output folder")
    if ckpt_dir is not None:
        _lock(Path(ckpt_dir), "checkpoint folder")
    return True


def release_run_folders(*folders: str | os.PathLike | None) -> bool:
    """Release this process's locks on ``folders`` (a config's ``finalize``); a folder not locked is ignored."""
    for f in folders:
        if f is None:
            continue
        lock = _HELD.pop(Path(f).resolve(), None)
        if lock is not None:
            (Path(f).resolve() / f"{LOCK_NAME}.owner").unlink(missing_ok=True)
            lock.release()
    return True
