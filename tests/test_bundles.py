"""The SRCNN and EDSR bundles through the real ``python -m monai.bundle`` CLI on real (tiny) data:
training with MLflow tracking, evaluation, MONAI's bundle tools, and multi-process training (gloo)."""

from __future__ import annotations

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch

from helpers import (
    BUNDLES,
    PYTHON,
    REPO,
    SCHEMA,
    TINY_TRAIN,
    artifact_paths,
    bundle_cmd,
    bundle_env,
    bundle_tools,
    config,
    download_artifact,
    expr,
    load_state,
    mlflow_client,
    network_from_config,
    run,
    runs_of,
    sha256,
    tail,
    torchrun_cmd,
)

pytestmark = pytest.mark.slow


def _metric_history(uri: str, run_id: str, key: str) -> list:
    return sorted(mlflow_client(uri).get_metric_history(run_id, key), key=lambda m: m.step)


# ----------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("bundle", BUNDLES)
def test_train_cli_writes_model_and_mlflow_run(bundle, trained_bundle, tiny_datalist, tmp_path):
    tb = trained_bundle(bundle)
    tb.check()
    train_cfg = json.loads(config(bundle, "train").read_text())

    # the checkpoint is the bundle's network, trained: the zero-initialised last layer has moved
    assert tb.model.is_file()
    net = network_from_config(bundle)
    state = load_state(tb.model)
    net.load_state_dict(state)  # strict: same architecture as inference.json
    last_conv = [k for k in state if k.endswith("weight") and state[k].ndim == 4][-1]
    # the best checkpoint by validation: the floor (the untrained model = the physics baseline, validated before the
    # first step) unless the trained epoch scored higher
    train_run = next(r for r in runs_of(tb.uri, bundle) if not r.info.run_name.startswith(f"{bundle}-eval"))
    val = [h.value for h in _metric_history(tb.uri, train_run.info.run_id, "val_balanced_psnr")]
    trained_won = val[1] > val[0]
    assert (float(state[last_conv].abs().max()) > 0) == trained_won, (val, "model.pt is not the best by validation")
    assert (tb.output_dir / "checkpoints" / "COMPLETED").read_text().strip() == "epoch 1"
    assert (tb.output_dir / "val_metrics.json").is_file()

    # exactly one run, in the experiment named after the method, that finished
    runs = runs_of(tb.uri, bundle)
    assert len(runs) == 1, [r.info.run_name for r in runs]
    r = runs[0]
    assert r.info.status == "FINISHED"
    assert r.info.run_name.startswith(f"{bundle}-")

    p = r.data.params
    assert p["method"] == bundle
    assert p["scale"] == "2"
    assert p["batch_size"] == str(TINY_TRAIN["batch_size"])  # the command-line override, not the default
    assert p["max_epochs"] == "1" and p["patch_size"] == "32"
    assert float(p["learning_rate"]) == pytest.approx(train_cfg["learning_rate"])
    assert p["optimizer"] == train_cfg["optimizer"]
    assert p["seed"] == str(train_cfg["seed"])
    assert int(p["num_params"]) == sum(t.numel() for t in net.parameters())
    n_slices = int(p["train_slices"])
    assert n_slices > 0
    epoch_length = int(p["epoch_length"])
    assert epoch_length == math.ceil(n_slices * TINY_TRAIN["patches_per_slice"] / TINY_TRAIN["batch_size"])

    # train_loss: one finite value per iteration; validation metrics once per epoch
    losses = _metric_history(tb.uri, r.info.run_id, "train_loss")
    assert [m.step for m in losses] == list(range(1, epoch_length + 1))
    assert all(math.isfinite(m.value) and m.value > 0 for m in losses)
    m = r.data.metrics
    for key in ("val_psnr", "val_ssim", "val_bicubic_psnr", "val_baseline_psnr", "val_sr_psnr"):
        assert key in m, sorted(m)
        # validated before the first step (the untrained model is the physics baseline) and after the epoch
        assert [h.step for h in _metric_history(tb.uri, r.info.run_id, key)] == [0, 1], key
    first = _metric_history(tb.uri, r.info.run_id, "val_sr_psnr")[0].value
    assert first == pytest.approx(_metric_history(tb.uri, r.info.run_id, "val_baseline_psnr")[0].value, abs=1e-4)
    assert 15 < m["val_psnr"] < 60 and 15 < m["val_bicubic_psnr"] < 60
    assert 0 < m["val_ssim"] <= 1
    # MONAI's PSNR handler (key metric) and SRMetricsHandler score the same slices the same way
    assert m["val_psnr"] == pytest.approx(m["val_sr_psnr"], abs=1e-3)
    val_json = json.loads((tb.output_dir / "val_metrics.json").read_text())
    assert val_json["val_sr_psnr"] == pytest.approx(m["val_sr_psnr"], abs=1e-6)

    # provenance tags
    from medsr_monai.tracking import git_info

    t = r.data.tags
    assert t["medsr.git_commit"] == git_info()["git_commit"]
    assert t["medsr.datalist_sha256"] == sha256(tiny_datalist)
    assert t["medsr.version.torch"] == torch.__version__
    assert t["medsr.seed"] == "0" and t["medsr.method"] == bundle

    # artifacts: the executed config (with the overrides), the best model, a grid picture
    arts = artifact_paths(tb.uri, r.info.run_id)
    assert "executed_config.json" in arts and "model.pt" in arts, arts
    pngs = [a for a in arts if a.endswith(".png")]
    assert pngs, arts
    executed = json.loads(download_artifact(tb.uri, r.info.run_id, "executed_config.json", tmp_path).read_text())
    assert executed["batch_size"] == TINY_TRAIN["batch_size"]
    assert executed["patch_size"] == 32 and executed["max_epochs"] == 1
    assert executed["dataset_dir"] == expr(tiny_datalist.parent)
    assert sha256(download_artifact(tb.uri, r.info.run_id, "model.pt", tmp_path)) == sha256(tb.model)
    assert download_artifact(tb.uri, r.info.run_id, pngs[0], tmp_path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------- shipped defaults
def test_shipped_default_paths_from_inside_the_bundle(sample_dir, tmp_path):
    """What a user types first, from inside a bundle (bundle_root "."), with no path given: inference reads
    data/samples/nifti/brain2.nii.gz with models/model.pt and writes into eval/inference; evaluation reads the
    test split of data/samples and writes into eval/evaluation. Run on a copy of the bundle beside a link to the
    samples, so the repository is not written to."""
    import shutil

    proj = tmp_path / "proj"
    bundle = proj / "bundles" / "srcnn"
    shutil.copytree(REPO / "bundles" / "srcnn", bundle, ignore=shutil.ignore_patterns("eval"))
    (proj / "data").mkdir()
    (proj / "data" / "samples").symlink_to(sample_dir, target_is_directory=True)
    env = bundle_env(tmp_path)
    meta = ["--meta_file", "configs/metadata.json"]

    inf = run([PYTHON, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", *meta], env, cwd=bundle)
    assert inf.returncode == 0, tail(inf.stdout)
    (out,) = (bundle / "eval" / "inference").glob("brain2*.nii.gz")
    sidecar = json.loads(next((bundle / "eval" / "inference").glob("brain2*.json")).read_text())
    assert sha256(bundle / "models" / "model.pt") in json.dumps(sidecar)
    src = nib.load(str(sample_dir / "nifti" / "brain2.nii.gz"))
    assert nib.load(str(out)).shape[:2] == tuple(2 * n for n in src.shape[:2])

    ev = run([PYTHON, "-m", "monai.bundle", "run", "--config_file", "['configs/train.json','configs/evaluate.json']",
              *meta, "--eval_slices_per_volume", "2"], env, cwd=bundle)
    assert ev.returncode == 0, tail(ev.stdout)
    rows = list(csv.DictReader(open(bundle / "eval" / "evaluation" / "slices.csv")))
    test_subjects = {i["subject"] for i in json.loads((sample_dir / "datalist.json").read_text())["test"]}
    assert {r["subject"] for r in rows} == test_subjects


# ----------------------------------------------------------------------------------------------- evaluation
@pytest.mark.parametrize("bundle", BUNDLES)
def test_evaluate_cli_on_test_split(bundle, trained_bundle):
    tb = trained_bundle(bundle)
    tb.check()
    proc = run(bundle_cmd("run", bundle, ["train", "evaluate"], dataset_dir=tb.overrides["dataset_dir"],
                          output_dir=tb.overrides["output_dir"], ckpt_dir=tb.overrides["ckpt_dir"]), tb.env)
    assert proc.returncode == 0, tail(proc.stdout)
    assert f"Restored all variables from {tb.model}" in proc.stdout  # the trained weights were evaluated

    eval_dir = tb.output_dir / "evaluation"
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    for key in ("test_MR_sr_psnr", "test_MR_bicubic_psnr", "test_MR_baseline_psnr", "test_CT_sr_psnr",
                "test_CT_bicubic_psnr", "test_CT_baseline_psnr", "test_sr_ssim", "test_bicubic_gain_db",
                "test_baseline_gain_db"):
        assert key in metrics, sorted(metrics)
        assert math.isfinite(metrics[key])
    for key in ("test_MR_sr_psnr", "test_MR_bicubic_psnr", "test_CT_sr_psnr", "test_CT_bicubic_psnr"):
        assert 15 < metrics[key] < 60, (key, metrics[key])
    # the matched baseline: k-space zero-filling for MR, the exact band-limited inverse, which beats cubic
    # (docs/PROTOCOL.md); cubic on the corner grid for CT, i.e. the bicubic column itself
    assert metrics["test_MR_baseline_psnr"] > metrics["test_MR_bicubic_psnr"] + 0.5
    assert metrics["test_CT_baseline_psnr"] == pytest.approx(metrics["test_CT_bicubic_psnr"], abs=1e-9)
    # gains are paired per slice over the matched baseline, per modality and overall
    for g in ("MR", "CT"):
        assert metrics[f"test_{g}_baseline_gain_db"] == pytest.approx(
            metrics[f"test_{g}_sr_psnr"] - metrics[f"test_{g}_baseline_psnr"], abs=1e-6)
    assert metrics["test_bicubic_gain_db"] == pytest.approx(
        metrics["test_sr_psnr"] - metrics["test_bicubic_psnr"], abs=1e-6)

    # per-slice rows: both test subjects, the same slices for every method
    with open(eval_dir / "slices.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["subject"] for r in rows} == {"brain2", "lung2"}
    by_method = {}
    for r in rows:
        by_method.setdefault(r["method"], set()).add((r["subject"], r["slice_index"]))
    assert by_method["sr"] == by_method["bicubic"] == by_method["baseline"]
    assert np.mean([float(r["psnr"]) for r in rows if r["method"] == "sr"]) == pytest.approx(
        metrics["test_sr_psnr"], abs=1e-6)

    # a second, finished MLflow run for the evaluation, beside the training run
    runs = runs_of(tb.uri, bundle)
    evals = [r for r in runs if r.info.run_name.startswith(f"{bundle}-eval")]
    assert len(evals) == 1, [r.info.run_name for r in runs]
    ev = evals[0]
    assert ev.info.status == "FINISHED"
    assert ev.data.tags["medsr.stage"] == "evaluate"
    assert ev.data.params["eval_split"] == "test"
    assert ev.data.metrics["test_MR_sr_psnr"] == pytest.approx(metrics["test_MR_sr_psnr"], abs=1e-6)
    arts = artifact_paths(tb.uri, ev.info.run_id)
    assert {"metrics.json", "slices.csv", "executed_config.json"} <= set(arts), arts
    assert all(r.info.status == "FINISHED" for r in runs)


# ----------------------------------------------------------------------------------------------- bundle tools
def _offline_env(tmp):
    # a download attempt (e.g. of the metadata schema) would fail instead of silently using the network
    return bundle_env(tmp, HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9",
                      http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")




def _tool(tool: str, *args: str) -> list[str]:
    return [PYTHON, "-m", "monai.bundle", tool, *args]


@pytest.mark.parametrize("bundle", BUNDLES)
def test_bundle_tools(bundle, trained_bundle, tiny_datalist, tmp_path):
    """MONAI's bundle tools on the trained bundle: through ``python -m monai.bundle`` for srcnn (offline: nothing is
    downloaded, the schema file is not changed), in-process (the same functions) for edsr."""
    tb = trained_bundle(bundle)
    tb.check()
    ts_file = tmp_path / f"{bundle}.ts"
    if bundle != BUNDLES[0]:
        # physics models are exported by tracing (for one input size): their physics is a plain Python object
        bundle_tools(bundle, tb.model, ts_file, [1, 1, 32, 32])
    else:
        env = _offline_env(tmp_path)
        meta = config(bundle, "metadata")
        schema_before = sha256(SCHEMA)
        proc = run(_tool("verify_metadata", "--meta_file", str(meta), "--filepath", str(SCHEMA)), env)
        assert proc.returncode == 0, tail(proc.stdout)
        assert "metadata is verified with no error" in proc.stdout
        assert sha256(SCHEMA) == schema_before
        proc = run(_tool("verify_net_in_out", "network_def", "--config_file", str(config(bundle, "inference")),
                         "--meta_file", str(meta)), env)
        assert proc.returncode == 0, tail(proc.stdout)
        assert "data shape of network is verified with no error" in proc.stdout
        proc = run(_tool("ckpt_export", "network_def", "--filepath", str(ts_file), "--ckpt_file", str(tb.model),
                         "--config_file", str(config(bundle, "inference")), "--meta_file", str(meta),
                         "--use_trace", "True", "--input_shape", "[1, 1, 32, 32]"), env)
        assert proc.returncode == 0, tail(proc.stdout)
        assert ts_file.is_file()

    # the TorchScript model computes what the eager trained model computes, on a real LR slice
    import nibabel as nib

    from medsr_monai.transforms import KSpaceDownsample, ModalityNormalize

    vol = nib.load(str(tiny_datalist.parent / "nifti" / "brain2.nii.gz")).get_fdata(dtype=np.float32)
    hr = ModalityNormalize("MR")(torch.as_tensor(vol))[None, :, :, 3]
    lr = torch.as_tensor(KSpaceDownsample(2)(hr), dtype=torch.float32)[None]  # (1, 1, 32, 32)
    eager = network_from_config(bundle)
    eager.load_state_dict(load_state(tb.model))
    eager.eval()
    scripted = torch.jit.load(str(ts_file))
    with torch.no_grad():
        y_eager, y_ts, base = eager(lr), scripted(lr), eager.baseline(lr, "MR")
    assert y_ts.shape == (1, 1, 64, 64)
    torch.testing.assert_close(y_ts, y_eager, atol=1e-5, rtol=1e-5)
    # the trained network was exported, not a zero residual (on MR the k-space consistency step keeps the measured
    # band, so after a tiny training the output may stay within float error of the baseline: check the network)
    with torch.no_grad():
        residual = float(eager.net(base if eager.pre_upsample else lr).abs().max())
    last = [v for k, v in load_state(tb.model).items() if k.endswith("weight") and v.ndim == 4][-1]
    assert (residual > 1e-6) == bool(last.abs().max() > 0)  # zero only when the floor checkpoint was selected


def test_verify_metadata_rejects_missing_network_data_format(tmp_path):
    meta = json.loads(config("srcnn", "metadata").read_text())
    del meta["network_data_format"]
    bad = tmp_path / "metadata.json"
    bad.write_text(json.dumps(meta))
    proc = run(_tool("verify_metadata", "--meta_file", str(bad), "--filepath", str(SCHEMA)), _offline_env(tmp_path))
    assert proc.returncode != 0
    assert "'network_data_format' is a required property" in proc.stdout, tail(proc.stdout)


# ----------------------------------------------------------------------------------------------- multi-process
def test_supervised_bundles_share_one_multi_gpu_config():
    """srcnn, edsr, seqsr_lstm and unet's multi_gpu_train.json differ only in the line naming their overlay (one
    base over MONAI's SupervisedTrainer), so the torchrun runs of edsr (below) and of seqsr_lstm (its volume
    windows, tests/test_seqsr.py) cover all four; srgan's and cyclegan's GAN trainers have their own torchrun
    tests."""
    rendered = {b: json.loads(config(b, "multi_gpu_train").read_text()) for b in ("srcnn", "edsr", "seqsr_lstm",
                                                                                     "unet")}
    for cfg in rendered.values():
        cfg.pop("_generated_")
    assert all(cfg == rendered["edsr"] for cfg in rendered.values())


@pytest.mark.parametrize("bundle", ["srcnn", "seqsr_lstm", "unet"])
def test_multi_gpu_config_starts_from_init_weights(bundle):
    """``--init_weights`` (fine-tuning from shipped weights) holds under torchrun too: the module the
    multi-GPU config wraps is loaded from it."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(config(bundle, "train")), str(config(bundle, "multi_gpu_train"))])
    parser["bundle_root"] = str(REPO / "bundles" / bundle)
    shipped = REPO / "bundles" / bundle / "models" / "model.pt"
    parser["init_weights"] = str(shipped)
    module = parser.get_parsed_content("network#module", instantiate=True)
    want = load_state(shipped)
    got = module.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_multi_gpu_config_with_torchrun_gloo(tiny_datalist, tmp_path):
    bundle = "edsr"
    out, models = tmp_path / "out", tmp_path / "models"
    cmd = torchrun_cmd(bundle, ["train", "multi_gpu_train"], dataset_dir=expr(tiny_datalist.parent),
                       output_dir=expr(out), ckpt_dir=expr(models), **TINY_TRAIN)
    env = bundle_env(tmp_path, fresh_store=True)  # both ranks create and migrate the new sqlite store at start
    proc = run(cmd, env)
    assert proc.returncode == 0, tail(proc.stdout, 6000)

    net = network_from_config(bundle)
    net.load_state_dict(load_state(models / "model.pt"))  # saved unwrapped (no "module." prefix)
    assert (out / "checkpoints" / "COMPLETED").is_file()

    runs = runs_of(env["MLFLOW_TRACKING_URI"], bundle)
    assert len(runs) == 1, [(r.info.run_name, r.data.tags.get("medsr.pid")) for r in runs]  # rank 0 only
    r = runs[0]
    assert r.info.status == "FINISHED"
    assert "val_psnr" in r.data.metrics and "val_bicubic_psnr" in r.data.metrics
    # the DistributedSampler split the slices over the 2 ranks: rank 0 ran half the iterations
    n_slices, epoch_length = int(r.data.params["train_slices"]), int(r.data.params["epoch_length"])
    assert epoch_length == math.ceil(math.ceil(n_slices / 2) / TINY_TRAIN["batch_size"])
    losses = mlflow_client(env["MLFLOW_TRACKING_URI"]).get_metric_history(r.info.run_id, "train_loss")
    assert len(losses) == epoch_length
