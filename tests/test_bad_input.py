"""Bad input ends with a clear message that names the file or setting and the problem, and loses nothing
that an earlier run wrote. Most cases run the training workflow in-process (``monai.bundle.ConfigWorkflow``,
the same code path as ``python -m monai.bundle run``); a few go through the CLI to show what users see."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from helpers import (
    REPO,
    TINY_TRAIN,
    bundle_cmd,
    bundle_env,
    config,
    error_text,
    expr,
    run,
    runs_of,
    snapshot,
    tail,
    tracking_uri,
)

BUNDLE = "srcnn"


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A private MLflow store for in-process runs; yields its URI."""
    uri = tracking_uri(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def previous_run(tmp_path):
    """Output and checkpoint folders as a completed earlier run left them (what must not be lost)."""
    out, models = tmp_path / "out", tmp_path / "models"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint_epoch=4.pt").write_bytes(b"earlier resumable checkpoint")
    (out / "checkpoints" / "COMPLETED").write_text("epoch 4\n")
    (out / "val_metrics.json").write_text(json.dumps({"val_sr_psnr": 33.3}))
    (out / "executed_config.json").write_text("{}")
    models.mkdir()
    (models / "model.pt").write_bytes(b"earlier best model")
    return out, models, {**snapshot(out), **{f"models/{k}": v for k, v in snapshot(models).items()}}


def _assert_kept(previous_run):
    out, models, before = previous_run
    after = {**snapshot(out), **{f"models/{k}": v for k, v in snapshot(models).items()}}
    lost = {k for k, v in before.items() if after.get(k) != v}
    assert not lost, f"the failed run changed or removed {sorted(lost)}"


def _fail_in_process(previous_run, configs=("train",), **overrides) -> str:
    """Run the bundle workflow in-process with ``overrides``; it must fail; return the whole error chain."""
    from monai.bundle import ConfigWorkflow

    out, models, _ = previous_run
    settings = {"output_dir": expr(out), "ckpt_dir": expr(models), **TINY_TRAIN, **overrides}
    files = [str(config(BUNDLE, c)) for c in configs]
    wf = ConfigWorkflow(config_file=files if len(files) > 1 else files[0], logging_file=False, workflow_type=None,
                        bundle_root=str(REPO / "bundles" / BUNDLE), **settings)
    with pytest.raises(Exception) as err:
        wf.initialize()
        wf.run()
    _assert_kept(previous_run)
    return error_text(err.value)


def _no_open_runs(uri):
    assert all(r.info.status != "RUNNING" for r in runs_of(uri, BUNDLE))


def _dataset(root: Path, tiny_datalist: Path, training: list, validation=None) -> Path:
    """A dataset folder whose datalist lists ``training`` (absolute image paths) and the tiny validation item."""
    tiny = json.loads(tiny_datalist.read_text())
    val = validation if validation is not None else [
        {**it, "image": str(tiny_datalist.parent / it["image"])} for it in tiny["validation"]]
    root.mkdir(parents=True, exist_ok=True)
    (root / "datalist.json").write_text(json.dumps({"name": "bad", "training": training, "validation": val,
                                                   "test": val}, indent=2))
    return root


def _good_item(tiny_datalist, subject="brain1"):
    tiny = json.loads(tiny_datalist.read_text())
    it = next(i for i in tiny["training"] if i["subject"] == subject)
    return {**it, "image": str(tiny_datalist.parent / it["image"])}


# ----------------------------------------------------------------------------------------------- dataset
@pytest.mark.slow
def test_missing_dataset_dir(tmp_path, store, previous_run):
    missing = tmp_path / "no_such_dataset"
    msg = _fail_in_process(previous_run, dataset_dir=expr(missing))
    assert f"{missing}: datalist file or folder does not exist" in msg, msg
    _no_open_runs(store)


@pytest.mark.slow
def test_malformed_datalist_json(tmp_path, store, previous_run):
    root = tmp_path / "data"
    root.mkdir()
    (root / "datalist.json").write_text('{"training": [{"image": "a.nii.gz"},]\n')
    msg = _fail_in_process(previous_run, dataset_dir=expr(root))
    assert f"{root / 'datalist.json'}: invalid JSON at line 1" in msg, msg


@pytest.mark.slow
def test_empty_training_split(tmp_path, tiny_datalist, store, previous_run):
    root = _dataset(tmp_path / "data", tiny_datalist, training=[])
    msg = _fail_in_process(previous_run, dataset_dir=expr(root))
    assert f"{root / 'datalist.json'}: split 'training' is empty" in msg, msg
    _no_open_runs(store)


def _bad_volume(kind: str, tiny_datalist: Path, dest: Path) -> Path:
    src = Path(_good_item(tiny_datalist)["image"])
    img = nib.load(str(src))
    data = img.get_fdata(dtype=np.float32)
    if kind == "truncated":
        raw = src.read_bytes()
        dest.write_bytes(raw[: len(raw) // 2])
        return dest
    if kind == "2D":
        data = data[:, :, 3]
    elif kind == "4D":
        data = np.stack([data, data], axis=-1)
    elif kind == "NaN":
        data[20:30, 20:30, 2] = np.nan
    elif kind == "constant":
        data = np.full_like(data, 7.0)
    nib.save(nib.Nifti1Image(data, img.affine), str(dest))
    return dest


BAD_VOLUMES = {
    "truncated": "unreadable or corrupt file",
    "2D": "is 2D",
    "4D": "is 4D",
    "NaN": "contains non-finite voxels (100 NaN, 0 Inf)",
    "constant": "is a constant image",
}


@pytest.mark.parametrize("kind", list(BAD_VOLUMES))
@pytest.mark.slow
def test_bad_volume_in_datalist_is_named(kind, tmp_path, tiny_datalist, store, previous_run):
    bad = _bad_volume(kind, tiny_datalist, tmp_path / f"bad_{kind}.nii.gz")
    root = _dataset(tmp_path / "data", tiny_datalist,
                    training=[_good_item(tiny_datalist), {"image": str(bad), "subject": "bad", "modality": "MR"}])
    msg = _fail_in_process(previous_run, dataset_dir=expr(root))
    assert f"{bad}: {BAD_VOLUMES[kind]}" in msg, msg
    _no_open_runs(store)


@pytest.mark.slow
def test_truncated_volume_cli_message(tmp_path, tiny_datalist, previous_run):
    """What a user sees: the last error line names the file and the problem (not a MONAI LoadImage error)."""
    bad = _bad_volume("truncated", tiny_datalist, tmp_path / "lung_truncated.nii.gz")
    root = _dataset(tmp_path / "data", tiny_datalist,
                    training=[_good_item(tiny_datalist), {"image": str(bad), "subject": "x", "modality": "CT"}])
    out, models, _ = previous_run
    proc = run(bundle_cmd("run", BUNDLE, ["train"], dataset_dir=expr(root), output_dir=expr(out),
                          ckpt_dir=expr(models), **TINY_TRAIN), bundle_env(tmp_path))
    assert proc.returncode != 0
    assert f"VolumeError: {bad}: unreadable or corrupt file" in proc.stdout, tail(proc.stdout)
    _assert_kept(previous_run)


# ----------------------------------------------------------------------------------------------- settings
@pytest.mark.slow
def test_patch_size_not_divisible_by_scale(tmp_path, tiny_datalist, store, previous_run):
    msg = _fail_in_process(previous_run, dataset_dir=expr(tiny_datalist.parent), patch_size=33, scale=2)
    assert "patch_size=33 is not divisible by scale=2" in msg, msg
    assert "patch_size=32" in msg  # and says what would work
    assert not runs_of(store, BUNDLE)  # rejected before anything started


@pytest.mark.slow
def test_unwritable_output_dir(tmp_path, tiny_datalist, store, previous_run):
    # tests run as root, where chmod does not stop writes: a folder below a regular file can never be created
    blocker = tmp_path / "x" / "file.txt"
    blocker.parent.mkdir()
    blocker.write_text("a file, not a folder")
    target = blocker / "out"
    msg = _fail_in_process(previous_run, dataset_dir=expr(tiny_datalist.parent), output_dir=expr(target))
    assert f"output folder {target} is not writable" in msg, msg
    assert blocker.read_text() == "a file, not a folder"


@pytest.mark.slow
def test_unwritable_output_dir_cli_message(tmp_path, tiny_datalist, previous_run):
    blocker = tmp_path / "file.txt"
    blocker.write_text("keep me")
    target = blocker / "out"
    out, models, _ = previous_run
    proc = run(bundle_cmd("run", BUNDLE, ["train"], dataset_dir=expr(tiny_datalist.parent), output_dir=expr(target),
                          ckpt_dir=expr(models), **TINY_TRAIN), bundle_env(tmp_path))
    assert proc.returncode != 0
    assert f"PermissionError: output folder {target} is not writable" in proc.stdout, tail(proc.stdout)
    assert blocker.read_text() == "keep me"
    _assert_kept(previous_run)


@pytest.mark.slow
def test_unreachable_tracking_server_cli(tmp_path, tiny_datalist, previous_run):
    """MLflow's client would retry an unreachable server for minutes; the bundle fails at once, naming the URI,
    before reading any data (the subprocess timeout guards against a hang)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"
    out, models, _ = previous_run
    proc = run(bundle_cmd("run", BUNDLE, ["train"], dataset_dir=expr(tiny_datalist.parent), output_dir=expr(out),
                          ckpt_dir=expr(models), **TINY_TRAIN), bundle_env(tmp_path, MLFLOW_TRACKING_URI=uri),
               timeout=120)
    assert proc.returncode != 0
    assert f"TrackingError: MLflow tracking server '{uri}' cannot be reached" in proc.stdout, tail(proc.stdout)
    assert "slicing volumes" not in proc.stdout  # failed before loading data
    _assert_kept(previous_run)


@pytest.mark.slow
def test_evaluate_without_checkpoint(tmp_path, tiny_datalist, store, previous_run):
    out, models, _ = previous_run
    empty = tmp_path / "no_models"
    msg = _fail_in_process(previous_run, configs=("train", "evaluate"), dataset_dir=expr(tiny_datalist.parent),
                           ckpt_dir=expr(empty))
    assert str(empty / "model.pt") in msg, msg
    _no_open_runs(store)


# ----------------------------------------------------------------------------------------------- inference
@pytest.mark.slow
def test_inference_bad_inputs_are_named(tmp_path, tiny_datalist):
    from medsr_monai.networks import SRCNN, PhysicsSR
    from medsr_monai.physics import in_plane_sr_physics
    from medsr_monai.workflows import VolumeSuperResolver

    def net():
        return PhysicsSR(SRCNN(config="9-5-5"), in_plane_sr_physics(2), pre_upsample=True)

    good = Path(_good_item(tiny_datalist)["image"])
    (tmp_path / "in").mkdir()
    bad = _bad_volume("truncated", tiny_datalist, tmp_path / "in" / "zz_truncated.nii.gz")
    shutil.copy(good, tmp_path / "in" / "aa_good.nii.gz")
    out = tmp_path / "out"

    missing = tmp_path / "nope.nii.gz"
    with pytest.raises(FileNotFoundError, match=f"inference input {missing} does not exist"):
        VolumeSuperResolver(net(), 2, str(missing), str(out), progress=False).run()
    with pytest.raises(FileNotFoundError, match="checkpoint .*no_model.pt does not exist"):
        VolumeSuperResolver(net(), 2, str(good), str(out), checkpoint=str(tmp_path / "no_model.pt"),
                            progress=False).run()
    from medsr_monai.workflows.inference import InferenceError

    # every input is tried; the run then fails, its last line naming the bad file and the problem
    with pytest.raises(InferenceError) as err:
        VolumeSuperResolver(net(), 2, str(tmp_path / "in"), str(out), progress=False).run()
    assert str(err.value).splitlines()[-1].startswith(f"{bad}: unreadable or corrupt file")
    assert (out / "aa_good_sr.nii.gz").is_file()  # the good input is written
    nib.load(str(out / "aa_good_sr.nii.gz")).get_fdata()
