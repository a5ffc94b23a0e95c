"""Where the project's files are: the one place that decides the project folder and the bundles folder.

The package may be installed anywhere (a virtual environment's ``site-packages``, a wheel on a cluster), so its
own location says nothing about where a user's bundles, data and results live. Every default path of the ``medsr``
commands comes from here instead:

- the **project folder**: ``--project-dir`` > ``$MEDSR_PROJECT_DIR`` > the project a given bundle sits in
  (``<root>/bundles/<name>`` with ``<root>/mlruns``) > the nearest folder from the working directory upwards
  that holds ``bundles/`` and ``mlruns/`` (a checkout, like git finds ``.git``) > the working directory.
  It holds ``mlruns/`` (the MLflow store), ``experiments/`` (Optuna storage ``experiments/optuna.db``, tuning
  trials, best overrides, demo logs, reproductions) and ``data/samples/`` (the sample scans).
- the **bundles folder**: ``--bundles-dir`` > ``$MEDSR_BUNDLES_DIR`` > ``<project folder>/bundles``. A bundle
  named by name (``medsr demo --bundles srcnn edsr``, ``medsr tune --bundle srcnn``) is looked up there.

Nothing here imports more than the standard library, so every command can use it before heavy imports.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "PROJECT_ENV", "BUNDLES_ENV", "PathError", "project_dir", "bundles_dir", "experiments_dir", "samples_dir",
    "find_bundle", "bundle_arg", "add_path_arguments",
]

PROJECT_ENV = "MEDSR_PROJECT_DIR"
BUNDLES_ENV = "MEDSR_BUNDLES_DIR"

PathLike = str | os.PathLike


class PathError(FileNotFoundError):
    """A folder named by a flag or an environment variable, or a bundle named by name, is not there.

    A :class:`FileNotFoundError`, so ``medsr`` reports it as ``medsr <command>: error: <message>`` (exit 2).
    """


def _given(value: PathLike, what: str) -> Path:
    path = Path(value).expanduser().resolve()
    if not path.is_dir():
        raise PathError(f"{what} {path}: no such folder")
    return path


def _is_project(folder: Path) -> bool:
    return (folder / "bundles").is_dir() and (folder / "mlruns").is_dir()


def project_dir(explicit: PathLike | None = None, bundle_root: PathLike | None = None) -> Path:
    """The project folder: where ``mlruns/``, ``experiments/`` and ``data/samples/`` are.

    Args:
        explicit: a folder given on the command line (``--project-dir``); wins over everything else.
        bundle_root: a bundle being run: when it sits in a project (``<root>/bundles/<name>`` with ``<root>/mlruns``),
            that project is used, so a bundle of a checkout records into the checkout's store from any working
            directory.

    Returns:
        ``explicit``, else ``$MEDSR_PROJECT_DIR``, else the bundle's project, else the nearest folder from the working
        directory upwards holding both ``bundles/`` and ``mlruns/``, else the working directory; never the package's
        own install location.

    Raises:
        PathError: ``explicit`` or ``$MEDSR_PROJECT_DIR`` is not an existing folder (a typo would otherwise create
            a new store and outputs in an unexpected place).
    """
    if explicit:
        return _given(explicit, "--project-dir")
    env = os.environ.get(PROJECT_ENV)
    if env:
        return _given(env, PROJECT_ENV)
    if bundle_root is not None:
        candidate = Path(bundle_root).resolve().parent.parent
        if _is_project(candidate):
            return candidate
    cwd = Path.cwd()
    for folder in (cwd, *cwd.parents):
        if _is_project(folder):
            return folder
    return cwd


def bundles_dir(explicit: PathLike | None = None, project: PathLike | None = None) -> Path:
    """The folder in which bundles named by name are looked up.

    Args:
        explicit: a folder given on the command line (``--bundles-dir``).
        project: ``--project-dir`` of the same command (see :func:`project_dir`).

    Returns:
        ``explicit``, else ``$MEDSR_BUNDLES_DIR``, else ``<project folder>/bundles``. The folder is not checked
        here: :func:`find_bundle` names it when a bundle is not in it.
    """
    if explicit:
        return Path(explicit).expanduser().resolve()
    env = os.environ.get(BUNDLES_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return project_dir(project) / "bundles"


def experiments_dir(project: PathLike | None = None) -> Path:
    """``<project folder>/experiments``: Optuna storage, tuning trials, best overrides, demo logs, reproductions."""
    return project_dir(project) / "experiments"


def samples_dir(project: PathLike | None = None) -> Path:
    """``<project folder>/data/samples``: where ``medsr demo`` fetches the sample scans by default."""
    return project_dir(project) / "data" / "samples"


def find_bundle(name: str, bundles: PathLike | None = None, project: PathLike | None = None) -> Path:
    """The bundle ``name`` in the bundles folder (see :func:`bundles_dir`).

    Args:
        name: the bundle's folder name, e.g. ``srcnn``.
        bundles: ``--bundles-dir`` of the command, if any.
        project: ``--project-dir`` of the command, if any.

    Raises:
        PathError: naming the folder searched, the bundles that are there, and how to point elsewhere.
    """
    folder = bundles_dir(bundles, project)
    bundle = folder / name
    if (bundle / "configs").is_dir():
        return bundle
    found = sorted(p.name for p in folder.iterdir() if (p / "configs").is_dir()) if folder.is_dir() else []
    there = f"bundles there: {', '.join(found)}" if found else (
        "that folder has no bundles" if folder.is_dir() else "that folder does not exist")
    raise PathError(f"no bundle {name!r} in the bundles folder {folder} ({there}); give the folder holding it with "
                    f"--bundles-dir or {BUNDLES_ENV}, or run from the project folder")


def bundle_arg(value: PathLike, bundles: PathLike | None = None, project: PathLike | None = None) -> Path:
    """A bundle given on the command line: an existing folder or a path as written, or a bare name (``srcnn``)
    looked up with :func:`find_bundle` when no such folder is here.

    Args:
        value: what the user wrote (``bundles/srcnn``, ``/abs/srcnn`` or ``srcnn``).
        bundles: ``--bundles-dir`` of the command, if any.
        project: ``--project-dir`` of the command, if any.
    """
    path = Path(value).expanduser()
    if path.exists() or len(path.parts) != 1 or str(value) in (".", ".."):
        return path
    return find_bundle(str(value), bundles, project)


def add_path_arguments(parser, bundles: bool = True) -> None:
    """Add ``--project-dir`` (and ``--bundles-dir``) to a ``medsr`` subcommand's parser.

    Args:
        parser: the subcommand's :class:`argparse.ArgumentParser`.
        bundles: also add ``--bundles-dir`` (commands that look up bundles by name).
    """
    parser.add_argument("--project-dir", default=None, metavar="DIR",
                        help=f"project folder holding mlruns/, experiments/ and data/samples/ (default: "
                        f"${PROJECT_ENV}, else the nearest folder from here upwards holding bundles/ and mlruns/, "
                        f"else the working directory)")
    if bundles:
        parser.add_argument("--bundles-dir", default=None, metavar="DIR",
                            help=f"folder in which bundles named by name are found (default: ${BUNDLES_ENV}, else "
                            f"<project folder>/bundles)")
