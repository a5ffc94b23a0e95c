"""Where runs are recorded: the project's MLflow store, and a fast check that it can be reached."""

from __future__ import annotations

import functools
import os
import sqlite3
import urllib.error
import urllib.request
from pathlib import Path

from ..paths import project_dir

__all__ = ["TrackingError", "project_root", "resolve_tracking_uri", "check_tracking_uri", "init_tracking_store",
           "create_sqlite_store", "artifact_location"]


class TrackingError(RuntimeError):
    """The MLflow tracking store named by a setting cannot be used; the message names the setting."""


def project_root(bundle_root: str | os.PathLike | None = None, project: str | os.PathLike | None = None) -> Path:
    """The folder holding the project's ``mlruns/`` store: :func:`medsr_monai.paths.project_dir`.

    ``--project-dir`` (``project``) or ``MEDSR_PROJECT_DIR`` when given; else a bundle inside a project
    (``<root>/bundles/<name>`` with ``<root>/mlruns``) records into ``<root>/mlruns``; else the nearest such project
    from the working directory upwards; else a bundle elsewhere (e.g. unpacked by a collaborator, or the package
    installed from a wheel) records into ``./mlruns`` of the working directory. Never the package's own location.
    """
    return project_dir(project, bundle_root=bundle_root)


def resolve_tracking_uri(bundle_root: str | os.PathLike | None = None, tracking_uri: str | None = None,
                         check: bool = True, project: str | os.PathLike | None = None) -> str:
    """The tracking URI a run uses: ``MLFLOW_TRACKING_URI`` if set, else ``tracking_uri``, else the
    project store ``sqlite:///<root>/mlruns/mlflow.db`` (artifacts beside it in ``mlruns/``).

    MLflow gives the environment variable priority over a handler's URI; resolving it here makes the
    recorded URI and the one actually used agree.

    Args:
        bundle_root: the bundle folder (to find the project root).
        tracking_uri: an explicit URI from the config, used when the environment sets none.
        check: verify the store can be reached now (see :func:`check_tracking_uri`).
        project: ``--project-dir`` of a ``medsr`` command (see :func:`project_root`).
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri
    if not uri:
        store = project_root(bundle_root, project) / "mlruns"
        store.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{(store / 'mlflow.db').as_posix()}"
    if check:
        check_tracking_uri(uri)
    return uri


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, naming ``uri``, if the store cannot be used.

    MLflow's HTTP client retries an unreachable server for minutes before it gives up, and a sqlite
    store in an unwritable folder fails only at the first write, after training has started.

    Raises:
        TrackingError: with the URI, the problem, and how to change the setting.
    """
    hint = "set MLFLOW_TRACKING_URI (or the config's tracking_uri) to a reachable store"
    if uri.startswith("file:") or "://" not in uri and not uri.startswith("sqlite"):
        raise TrackingError(
            f"MLflow tracking URI {uri!r} is a file store, which MLflow 3 no longer supports; "
            f"use sqlite:///<abs path>/mlruns/mlflow.db. ({hint})"
        )
    if uri.startswith("sqlite:"):
        path = Path(uri.split(":///", 1)[-1])
        folder = path.parent
        if not folder.is_dir():
            raise TrackingError(f"MLflow tracking URI {uri!r}: folder {folder} does not exist ({hint})")
        if not os.access(folder, os.W_OK):
            raise TrackingError(f"MLflow tracking URI {uri!r}: folder {folder} is not writable ({hint})")
        try:
            sqlite3.connect(path, timeout=timeout).close()
        except sqlite3.Error as e:
            raise TrackingError(f"MLflow tracking URI {uri!r}: cannot open the database: {e} ({hint})") from e
        create_sqlite_store(uri)
        return
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:  # a user-named tracking server only
                if resp.status != 200:
                    raise TrackingError(f"MLflow tracking server {uri!r} answered {resp.status} on /health ({hint})")
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise TrackingError(f"MLflow tracking server {uri!r} cannot be reached: {e} ({hint})") from e


def init_tracking_store(uri: str) -> bool:
    """Open the store once so that MLflow creates its tables now.

    Under ``torchrun`` every rank builds the config's MLflow handlers, and each handler opens the store; on a
    new sqlite store the ranks then race on MLflow's schema migration (``duplicate column name``). Call this
    on rank 0, then ``dist.barrier()``, before the handlers are built (see ``multi_gpu_train.json``).
    """
    import mlflow

    mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    return True


@functools.lru_cache(maxsize=1)
def _head_revision() -> str:
    """The schema revision the installed MLflow expects (read from its migration scripts once per process)."""
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


def _schema_is_current(path: Path) -> bool:
    """Whether the sqlite file holds MLflow's *complete* schema: its alembic version table at MLflow's head revision.

    The version table alone is not enough: MLflow creates it early in its migration, so a process that saw it while
    another was still migrating went on to open the half-built store, found tables missing and migrated it a
    second time (``table ... already exists`` / ``expected to match one row``).
    """
    try:
        with sqlite3.connect(path, timeout=30) as con:
            row = con.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.Error:  # no version table yet, or not a database
        return False
    return row is not None and row[0] == _head_revision()


def create_sqlite_store(uri: str, timeout: float = 600.0) -> bool:
    """Create MLflow's tables in a new sqlite store, one process at a time.

    Two processes opening a fresh store at once (two trainings, two ``medsr tune`` workers) both run MLflow's
    schema migration, and one of them dies on an alembic error. An OS file lock beside the database
    (``<db>.lock``, released by the OS if the holder dies) makes the first create the tables while the others wait
    and then find them. A store that already has its tables is left alone without taking the lock.

    Returns:
        ``True`` when this call created the tables.
    """
    from filelock import FileLock, Timeout

    path = Path(uri.split(":///", 1)[-1])
    if _schema_is_current(path):
        return False
    try:
        with FileLock(f"{path}.lock", timeout=timeout):
            if _schema_is_current(path):  # another process created them while we waited
                return False
            try:
                init_tracking_store(uri)
            except Exception as e:  # an older MLflow's store: MLflow refuses it until `mlflow db upgrade`
                raise TrackingError(f"MLflow tracking URI {uri!r}: {e}") from e
            return True
    except Timeout as e:
        raise TrackingError(f"MLflow tracking URI {uri!r}: waited {timeout:.0f} s for another process to create the "
                            f"store (lock {path}.lock)") from e


def artifact_location(uri: str) -> str | None:
    """Where a new experiment of a sqlite store keeps its artifacts: ``<folder of the .db>/mlruns`` (the layout
    MONAI's ``MLFlowHandler`` gives the bundles' training runs), as a ``file://`` URI. ``None`` for other stores
    (a server decides). Without it MLflow puts them in ``./mlruns`` of whatever the working directory is.
    """
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlruns").as_uri()
