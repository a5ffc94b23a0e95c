"""MLflow as MLflow users expect it, checked through a real ``mlflow server`` (loopback, temporary sqlite store and
artifact root) on the session's tiny SRCNN training (the shared ``trained_bundle`` fixture: no extra training):
the experiment kind, the source tags, the dataset inputs, the logged pyfunc model (signature, predict equal to the
bundle's own inference, offline ``mlflow models predict``), the registry (``medsr register``, aliases, ``medsr
compare --registry``, ``medsr publish --model models:/...``), and ``medsr ui --optuna``."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest


from helpers import PYTHON, REPO, bundle_cmd, bundle_env, mlflow_server, run, tail

BUNDLE = "srcnn"


@pytest.fixture(scope="module")
def trained(trained_bundle):
    t = trained_bundle(BUNDLE)
    t.check()
    return t


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    """``mlflow server`` on 127.0.0.1 over the trained bundle's temporary sqlite store (its artifacts are in the
    same temporary folder; new artifacts go to a temporary artifact root). Yields the server URL."""
    tmp = tmp_path_factory.mktemp("mlflow_server")
    with mlflow_server(trained.uri, ["--default-artifact-root", (tmp / "artifacts").as_uri(), "--no-serve-artifacts"],
                       tmp / "server.log", timeout=90) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=server, registry_uri=server)


@pytest.fixture(scope="module")
def train_run(client):
    exp = client.get_experiment_by_name(BUNDLE)
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time ASC"])
    # the shared fixture's training: other tests add evaluation runs to the same store before this module runs
    runs = [r for r in runs if r.data.tags.get("medsr.stage") != "evaluate"]
    assert runs, "the tiny training recorded no finished run"
    return runs[0]


def _medsr(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return run([PYTHON, "-m", "medsr_monai.cli", *args], env=env or bundle_env(REPO), timeout=timeout)


@pytest.mark.slow
def test_experiment_kind_and_source_tags(client, train_run, trained):
    """The experiment opens on MLflow's model-training view; the run's Source is the bundle and its config, with the
    git commit; no absolute path or data file name in any tag."""
    exp = client.get_experiment_by_name(BUNDLE)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    tags = train_run.data.tags
    assert tags["mlflow.source.name"] == "srcnn:train.json"
    assert tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.git.commit"] == tags["medsr.git_commit"]
    assert len(tags["mlflow.source.git.commit"]) == 40
    for k, v in tags.items():
        if k.startswith("mlflow.source."):
            assert str(REPO) not in v and str(trained.root) not in v and ".nii" not in v, (k, v)
    assert "medsr.mlflow_warning" not in tags and "medsr.model_log_error" not in tags


@pytest.mark.slow
def test_dataset_inputs(client, train_run, trained):
    """training and validation splits are run inputs (MetaDataset: name, digest from the datalist sha256, context);
    nothing in them names a scan or a local path."""
    sha = train_run.data.tags["medsr.datalist_sha256"]
    inputs = client.get_run(train_run.info.run_id).inputs.dataset_inputs
    got = {}
    for di in inputs:
        tags = {t.key: t.value for t in di.tags}
        got[tags["mlflow.data.context"]] = di.dataset
        assert tags["medsr.datalist_sha256"] == sha
        text = json.dumps(di.dataset.to_dictionary() if hasattr(di.dataset, "to_dictionary") else vars(di.dataset))
        assert ".nii" not in text and str(trained.root) not in text and "brain1" not in text, text
    assert sorted(got) == ["training", "validation"]
    for ctx, ds in got.items():
        assert ds.name == f"medsr-tiny-{ctx}"
        assert ds.digest == sha[:36]
        assert ds.source_type == "code"
        assert json.loads(ds.source)["tags"]["datalist_sha256"] == sha


@pytest.mark.slow
def test_logged_model_signature_and_predict_matches_bundle_inference(client, train_run, trained, tiny_datalist,
                                                                     tmp_path):
    """The run logged a pyfunc model with a signature and an input example; loaded through the server, its predict
    on a real slice returns the x2 shape and the same values as the bundle's own inference.json on that slice."""
    import mlflow
    import nibabel as nib

    from medsr_monai.data.samples import write_nifti

    models = client.search_logged_models(experiment_ids=[train_run.info.experiment_id],
                                         filter_string=f"source_run_id = '{train_run.info.run_id}'")
    assert [m.name for m in models] == ["model"]
    mlflow.set_tracking_uri(client.tracking_uri)
    info = mlflow.models.get_model_info(f"models:/{models[0].model_id}")
    assert "python_function" in info.flavors
    sig = info.signature.to_dict()
    assert json.loads(sig["inputs"])[0]["tensor-spec"]["shape"] == [-1, -1]
    assert json.loads(sig["outputs"])[0]["tensor-spec"]["shape"] == [-1, -1]
    assert info.saved_input_example_info is not None
    assert float(train_run.data.tags.get("medsr.model_log_seconds", "0")) < 60

    # a real slice of a held-out scan
    vol = np.asarray(nib.load(str(tiny_datalist.parent / "nifti" / "brain2.nii.gz")).dataobj, dtype=np.float32)
    x = np.ascontiguousarray(vol[:, :, vol.shape[2] // 2])
    model = mlflow.pyfunc.load_model(f"models:/{models[0].model_id}")
    y = model.predict(x, params={"modality": "MR"})
    assert y.shape == (2 * x.shape[0], 2 * x.shape[1]) and y.dtype == np.float32 and np.isfinite(y).all()

    # the bundle's own inference, through the real CLI, on the same slice stored as a one-slice volume
    src = write_nifti(tmp_path / "slice.nii.gz", x[..., None], np.eye(4))
    env = bundle_env(tmp_path)
    proc = run(bundle_cmd("run", BUNDLE, ["inference"], input=str(src), output_dir=str(tmp_path / "out"),
                          ckpt_path=str(trained.model), modality="MR"), env)
    assert proc.returncode == 0, tail(proc.stdout)
    ref = np.asarray(nib.load(str(tmp_path / "out" / "slice_sr.nii.gz")).dataobj, dtype=np.float32)[..., 0]
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-4 * float(np.abs(ref).max()))


@pytest.mark.slow
def test_mlflow_models_predict_offline(client, train_run, tmp_path):
    """``mlflow models predict --env-manager local`` on the logged model (downloaded: offline), JSON in and out."""
    models = client.search_logged_models(experiment_ids=[train_run.info.experiment_id],
                                         filter_string=f"source_run_id = '{train_run.info.run_id}'")
    import mlflow

    mlflow.set_tracking_uri(client.tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{models[0].model_id}", dst_path=str(tmp_path / "m")))
    x = (np.arange(24 * 20, dtype=np.float32).reshape(24, 20) % 97) * 10.0
    (tmp_path / "in.json").write_text(json.dumps({"inputs": x.tolist(), "params": {"modality": "MR"}}))
    env = {**bundle_env(tmp_path), "MLFLOW_TRACKING_URI": ""}
    proc = run([PYTHON, "-m", "mlflow", "models", "predict", "-m", str(local), "-i", str(tmp_path / "in.json"),
                "-t", "json", "-o", str(tmp_path / "out.json"), "--env-manager", "local"], env, timeout=300)
    assert proc.returncode == 0, tail(proc.stdout)
    out = np.asarray(json.loads((tmp_path / "out.json").read_text())["predictions"], dtype=np.float32)
    assert out.shape == (48, 40)
    ref = mlflow.pyfunc.load_model(str(local)).predict(x, params={"modality": "MR"})
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-3)


@pytest.mark.slow
def test_register_alias_compare_and_publish_from_registry(client, server, train_run, tmp_path, tiny_datalist):
    """``medsr register`` makes version 1 of ``srcnn-x2`` with alias champion; ``medsr compare --registry`` lists
    it; ``medsr publish --model models:/srcnn-x2@champion`` writes the bundle archive with the run's provenance and
    the trained weights."""
    import zipfile

    rid = train_run.info.run_id
    env = {**bundle_env(tmp_path), "MLFLOW_TRACKING_URI": server}
    proc = _medsr("register", rid, "--alias", "champion", "--tracking-uri", server, env=env)
    assert proc.returncode == 0, tail(proc.stdout)
    mv = client.get_model_version_by_alias("srcnn-x2", "champion")
    assert mv.run_id == rid and mv.version == "1"
    assert client.get_registered_model("srcnn-x2").aliases == {"champion": "1"}

    proc = _medsr("compare", "--registry", "--format", "json", "--tracking-uri", server, env=env)
    assert proc.returncode == 0, tail(proc.stdout)
    lines = proc.stdout.splitlines()  # stdout and stderr together: the JSON table starts at a line "["
    start = lines.index("[")
    rows = json.loads("\n".join(lines[start:lines.index("]", start) + 1]))
    assert {"name": "srcnn-x2", "version": 1, "aliases": ["champion"], "run_id": rid} .items() <= rows[0].items()

    out = tmp_path / "dist"
    sample = tiny_datalist.parent / "nifti" / "brain2.nii.gz"  # a real crop: the TorchScript check stays quick
    proc = _medsr("publish", "--model", "models:/srcnn-x2@champion", "--tracking-uri", server, "--out", str(out),
                  "--sample", str(sample), env=env)
    assert proc.returncode == 0, tail(proc.stdout)
    archives = list(out.glob("srcnn_*.zip"))
    assert len(archives) == 1
    with zipfile.ZipFile(archives[0]) as zf:
        manifest = json.loads(zf.read("srcnn/manifest.json"))
        assert manifest["provenance"]["run_id"] == rid
        weights = zf.read("srcnn/models/model.pt")
    import hashlib

    assert hashlib.sha256(weights).hexdigest() == hashlib.sha256(
        Path(client.download_artifacts(rid, "model.pt", str(tmp_path))).read_bytes()).hexdigest()


@pytest.mark.slow
def test_ui_optuna_print_only(tmp_path):
    """``medsr ui --optuna --print-only`` prints the optuna-dashboard command on the study storage."""
    storage = f"sqlite:///{tmp_path}/optuna.db"
    proc = _medsr("ui", "--optuna", "--storage", storage, "--port", "8099", "--print-only")
    assert proc.returncode == 0, tail(proc.stdout)
    line = proc.stdout.strip().splitlines()[-1]
    assert "optuna-dashboard" in line or "optuna_dashboard" in line
    assert storage in line and "--port 8099" in line and "--host 127.0.0.1" in line


def test_ui_optuna_missing_dashboard_is_one_line(monkeypatch, capsys):
    """Without optuna-dashboard installed, ``medsr ui --optuna`` says so in one line (exit 2), naming the extra."""
    import argparse
    import importlib.util

    from medsr_monai import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "optuna_dashboard" else real(name, *a))
    monkeypatch.setattr(shutil, "which", lambda name, **k: None)
    rc = cli._cmd_ui(argparse.Namespace(optuna=True, storage="sqlite:///x.db", host="127.0.0.1", port=None,
                                        print_only=False, project_dir=None))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "optuna-dashboard" in err[0] and "pip install" in err[0]


def test_model_name_and_source_helpers():
    """Registered names follow method and task; source names carry no folder; remote URLs carry no credentials and
    local paths are never a repoURL."""
    from medsr_monai.tracking.models import _public_repo_url, config_source, model_name

    assert model_name("edsr", {"scale": "2"}) == "edsr-x2"
    assert model_name("unet", {"task": "mri_recon", "acceleration": "4"}) == "unet-mri_recon-R4"
    assert config_source("/data/x/bundles/edsr", argv=["m", "run", "--config_file",
                                                        "['/a/b/train.json','/c/best.json']"]) == "edsr:train.json+best.json"
    assert config_source("bundles/srcnn", argv=[]) == "srcnn:train.json"
    assert _public_repo_url("https://user:tok@github.com/o/r.git") == "https://github.com/o/r.git"
    assert _public_repo_url("/home/me/patient_123/repo") is None
    assert _public_repo_url("file:///srv/repo") is None
