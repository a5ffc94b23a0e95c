"""What a run needs to record so that someone else can reproduce it.

Seed, git commit (and whether the tree was dirty), package versions, device and thread count, and
the hash of the data manifest / datalist. Kept free of MLflow so that benchmarks and tests can use
it too.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as _md
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from medsr_monai.data.datalist import file_sha256

__all__ = ["git_info", "package_versions", "runtime_info", "data_hashes", "collect_provenance", "new_run_name"]

TRACKED_PACKAGES = (
    "medsr-monai", "torch", "monai", "pytorch-ignite", "mlflow", "optuna", "numpy", "nibabel", "scikit-image",
)


def git_info(path: str | os.PathLike | None = None) -> dict[str, str]:
    """Commit hash and dirty flag of the git work tree containing ``path``.

    By default the tree of this package (a checkout, or an editable install), else, for a package installed
    from a wheel, the tree of the working directory (the user's project, whose bundles the run reads).
    Returns ``{"git_commit": "unknown", "git_dirty": "unknown"}`` outside a work tree or without git.
    """
    if path is None:
        info = git_info(Path(__file__).resolve().parent)
        return info if info["git_commit"] != "unknown" else git_info(Path.cwd())
    where = Path(path)
    if where.is_file():
        where = where.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        return {"git_commit": commit, "git_dirty": str(bool(status)).lower()}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}


def package_versions(packages: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str]:
    """Installed version of each distribution (``"absent"`` when not installed)."""
    versions = {}
    for name in packages:
        try:
            versions[name] = _md.version(name)
        except _md.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def runtime_info() -> dict[str, str]:
    """Device, thread count and platform, plus whether the run can claim bitwise determinism."""
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch_threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        # CPU kernels used here are deterministic for a fixed thread count; cuDNN is not unless forced.
        "deterministic": "true" if not cuda or torch.are_deterministic_algorithms_enabled() else "false",
    }


def data_hashes(dataset_dir: str | os.PathLike | None) -> dict[str, str]:
    """sha256 of ``datalist.json`` and ``manifest.json`` in (or at) ``dataset_dir`` when present."""
    if not dataset_dir:
        return {}
    p = Path(dataset_dir)
    datalist = p / "datalist.json" if p.is_dir() else p
    out: dict[str, str] = {}
    if datalist.is_file():
        out["datalist_sha256"] = file_sha256(datalist)
        manifest = datalist.parent / "manifest.json"
        if manifest.is_file():
            out["manifest_sha256"] = file_sha256(manifest)
    return out


def collect_provenance(seed: int | None = None, dataset_dir: str | os.PathLike | None = None, **extra: Any) -> dict:
    """Everything :class:`~medsr_monai.tracking.MLflowRunHandler` records as tags, in one flat dict.

    Args:
        seed: the run's random seed.
        dataset_dir: the samples folder or datalist the run reads.
        extra: more key/values to record (e.g. ``method="edsr"``).

    Example:
        >>> p = collect_provenance(seed=0)
        >>> sorted(k for k in p if k.startswith("git_"))
        ['git_commit', 'git_dirty']
    """
    prov: dict[str, str] = {"seed": str(seed)}
    prov.update(git_info())
    prov.update({f"version.{k}": v for k, v in package_versions().items()})
    prov.update(runtime_info())
    prov.update(data_hashes(dataset_dir))
    prov.update({k: str(v) for k, v in extra.items()})
    return prov


def new_run_name(prefix: str) -> str:
    """A unique, sortable run name such as ``edsr-20261121-101500-4242`` (prefix, UTC time, pid).

    Unique names matter: MONAI's MLFlowHandler takes over any unfinished run with the same name.
    """
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{prefix}-{stamp}-{os.getpid()}"
