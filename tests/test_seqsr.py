"""The through-plane slice-sequence bundle (``bundles/seqsr_lstm``): slice-thickness physics and its grid, the
bidirectional ConvLSTM, and the bundle through the real ``python -m monai.bundle`` CLI on tiny real crops
(MNI152 for training, the pydeface mean head held out): MLflow run, evaluation table, inference geometry,
bundle tools, resume after SIGKILL and two-process (gloo) training."""

from __future__ import annotations

import csv
import json
import math
import re
import signal

import nibabel as nib
import numpy as np
import pytest
import torch

from helpers import (
    REPO, artifact_paths, bundle_cmd, bundle_env, config, download_artifact, export_matches_eager, expr,
    kill_after_first_checkpoint, load_state, mlflow_client, network_from_config, run, runs_of, sha256, tail,
    torchrun_cmd,
)

from medsr_monai.transforms import GridUpsample, SliceThickness, slice_thickness, thick_affine, thin_affine

BUNDLE = "seqsr_lstm"
#: small network and windows so that the CLI runs take seconds on two cores
NET = {"features": 8, "hidden_channels": 8}
TINY = {**NET, "window": 4, "patch_size": 24, "batch_size": 4, "windows_per_epoch": 8, "max_epochs": 2}


# ----------------------------------------------------------------------------------------------- fixtures
# seq_data: the shared fixture in conftest.py (48^3 crops of the isotropic heads, in a datalist)


def _paths(root, data):
    return {"dataset_dir": expr(data), "output_dir": expr(root / "out"), "ckpt_dir": expr(root / "models")}


@pytest.fixture(scope="session")
def trained(seq_data, tmp_path_factory):
    """The bundle trained once (2 epochs) through the CLI with a private MLflow store."""
    root = tmp_path_factory.mktemp("seqsr_trained")
    env = bundle_env(root, OMP_NUM_THREADS="1")
    proc = run(bundle_cmd("run", BUNDLE, ["train"], **_paths(root, seq_data), **TINY), env)
    return root, env, proc


def _check(proc):
    assert proc.returncode == 0, tail(proc.stdout)


# ----------------------------------------------------------------------------------------------- physics
def test_slice_thickness_shape_affine_and_box_mean():
    from monai.data import MetaTensor

    x = torch.rand(1, 12, 10, 9, dtype=torch.float64)
    aff = torch.tensor([[0.9, 0, 0, -10.0], [0, 1.1, 0, 5.0], [0, 0, 1.3, 2.0], [0, 0, 0, 1]], dtype=torch.float64)
    for axis, f in ((0, 3), (1, 2), (2, 3), (0, 4)):
        y = SliceThickness(f, slice_axis=axis)(MetaTensor(x, affine=aff))
        shape = list(x.shape)
        shape[axis + 1] //= f
        assert list(y.shape) == shape
        # box profile: each thick slice is the mean of the f thin slices it covers
        ref = x.movedim(axis + 1, -1).reshape(*x.movedim(axis + 1, -1).shape[:-1], -1, f).mean(-1).movedim(-1, axis + 1)
        torch.testing.assert_close(y.as_tensor(), ref, rtol=0, atol=1e-12)
        # affine: thick slice k lies at thin voxel k*f + (f-1)/2 in world coordinates
        a_thick, a_thin = y.affine.numpy(), aff.numpy()
        np.testing.assert_allclose(a_thick, thick_affine(a_thin, f, axis))
        for k in (0, 1, shape[axis + 1] - 1):
            v_thick, v_thin = np.zeros(4), np.zeros(4)
            v_thick[3] = v_thin[3] = 1
            v_thick[axis], v_thin[axis] = k, k * f + (f - 1) / 2
            np.testing.assert_allclose(a_thick @ v_thick, a_thin @ v_thin, atol=1e-12)
        np.testing.assert_allclose(thin_affine(a_thick, f, axis), a_thin, atol=1e-12)


@pytest.mark.parametrize("profile", ["box", "gaussian"])
@pytest.mark.parametrize("f", [2, 3, 4])
def test_linear_baseline_reproduces_a_ramp_on_the_centre_grid(f, profile):
    """PROTOCOL.md alignment check: a linear ramp along the slice axis, thickened, is reproduced exactly by
    linear interpolation on the centre grid (away from the replicated borders), and not on the corner grid."""
    n = 24 * f
    ramp = torch.arange(n, dtype=torch.float64).reshape(1, 1, 1, n).expand(1, 5, 4, n).clone()
    thick = SliceThickness(f, slice_axis=2, profile=profile)(ramp)
    up = GridUpsample([1, 1, f], mode="linear", grid="center", spatial_dims=3)(thick)
    assert up.shape == ramp.shape
    margin = f if profile == "box" else 4 * f  # border slices see replicated padding
    err = (up - ramp)[..., margin:n - margin].abs().max()
    assert float(err) < 1e-9, float(err)
    # the same interpolation on the corner (decimation) grid is off by (f-1)/2 thin voxels: the check can fail
    wrong = GridUpsample([1, 1, f], mode="linear", grid="corner", spatial_dims=3)(thick)
    assert float((wrong - ramp)[..., margin:n - margin].abs().mean()) == pytest.approx((f - 1) / 2, rel=1e-6)


def test_thickness_rejects_a_length_that_is_not_a_multiple():
    with pytest.raises(ValueError, match=r"50 slices along slice_axis 1 is not a multiple of the slice-thickness "
                                         r"factor 4; crop to 48"):
        SliceThickness(4, slice_axis=1)(torch.rand(1, 8, 50, 8))
    with pytest.raises(ValueError, match="profile must be one of"):
        SliceThickness(2, profile="triangle")
    # on_remainder="crop" drops the trailing slices (origin, hence grid, kept)
    assert SliceThickness(4, slice_axis=1, on_remainder="crop")(torch.rand(1, 8, 50, 8)).shape == (1, 8, 12, 8)
    # the Gaussian profile (FWHM = f) keeps a constant image constant, like the box profile
    torch.testing.assert_close(slice_thickness(torch.full((1, 9), 3.0), 3, profile="gaussian"), torch.full((1, 3), 3.0))


# ----------------------------------------------------------------------------------------------- network
@pytest.mark.parametrize("f", [2, 3, 4])
def test_network_shapes_and_residual_start(f):
    from medsr_monai.networks import BiConvLSTMSR

    torch.manual_seed(0)
    net = BiConvLSTMSR(spatial_dims=2, scale=f, features=8, hidden_channels=8, mode="cubic")
    x = torch.rand(2, 1, 5, 12, 16)
    y = net(x)
    assert y.shape == (2, 1, 5 * f, 12, 16)
    # the zero-initialised head: the untrained model is exactly cubic interpolation on the centre grid
    base = GridUpsample([f, 1, 1], mode="cubic", grid="center", spatial_dims=3)(x[0])
    torch.testing.assert_close(y[0], base, rtol=0, atol=1e-6)
    # one optimiser step moves it off the baseline, and the output depends on neighbouring slices
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    loss = (net(x) - torch.rand_like(y)).abs().mean()
    loss.backward()
    opt.step()
    with torch.no_grad():
        y1 = net(x)
        x2 = x.clone()
        x2[:, :, -1] += 1.0  # change the last thick slice only
        y2 = net(x2)
    assert float((y1 - net.interpolate(x)).abs().max()) > 1e-4
    assert float((y2 - y1)[:, :, :f].abs().max()) > 0  # the first thin slices see the last thick one (bwd LSTM)


@pytest.mark.parametrize("f", [2, 3])
def test_data_consistency_output_rethickens_to_the_input(f):
    """With ``data_consistency`` the output, thickened again (box profile), is the input thick slices, also through
    TorchScript and the windowed inferer (Gaussian blending, then one more projection); other profiles refused."""
    from medsr_monai.networks import BiConvLSTMSR
    from medsr_monai.workflows import ThroughPlaneInferer

    torch.manual_seed(0)
    net = BiConvLSTMSR(spatial_dims=2, scale=f, features=8, hidden_channels=8, mode="cubic", data_consistency=True)
    torch.nn.init.normal_(net.head[-1].weight, std=0.1)  # a non-zero residual, as after training
    x = torch.rand(2, 1, 7, 12, 16)
    with torch.no_grad():
        outs = [net(x), torch.jit.script(net)(x), ThroughPlaneInferer(window=4, overlap=0.5)(x, net)]
    for y in outs:
        back = SliceThickness(f, slice_axis=0, profile="box")(y.flatten(0, 1))  # (B*C, T*f, H, W) -> (B*C, T, H, W)
        torch.testing.assert_close(back, x.flatten(0, 1), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="box"):
        BiConvLSTMSR(scale=f, data_consistency=True, profile="gaussian")


# ----------------------------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_train_cli_mlflow_run(trained, tmp_path):
    root, env, proc = trained
    _check(proc)
    uri = env["MLFLOW_TRACKING_URI"]
    runs = runs_of(uri, BUNDLE)
    assert len(runs) == 1, [r.info.run_name for r in runs]
    r = runs[0]
    assert r.info.status == "FINISHED" and r.info.run_name.startswith(f"{BUNDLE}-")
    p = r.data.params
    assert p["scale"] == "2" and p["window"] == "4" and p["profile"] == "box"
    assert json.loads(p["physics_config"]) == {"physics": "slice_thickness", "spatial_dims": 3, "dc": True, "factor": 2,
                                               "axis": 0, "profile": "box"}
    assert p["train_axes"] == "[0, 1, 2]" and p["batch_size"] == "4" and p["max_epochs"] == "2"
    net = network_from_config(BUNDLE, **NET)
    assert int(p["num_params"]) == sum(t.numel() for t in net.parameters())
    epoch_length = int(p["epoch_length"])
    assert epoch_length == math.ceil(TINY["windows_per_epoch"] / TINY["batch_size"])
    losses = sorted(mlflow_client(uri).get_metric_history(r.info.run_id, "train_loss"), key=lambda m: m.step)
    assert [m.step for m in losses] == list(range(1, 2 * epoch_length + 1))
    assert all(math.isfinite(m.value) and m.value > 0 for m in losses)
    m = r.data.metrics
    for key in ("val_psnr", "val_sr_psnr", "val_linear_psnr", "val_cubic_psnr", "val_reformat_a_sr_ssim",
                "val_native_cubic_gain_db"):
        assert key in m, sorted(m)
    # validated before the first step (the untrained model is the physics baseline: the floor) and once per epoch
    sr = sorted(mlflow_client(uri).get_metric_history(r.info.run_id, "val_sr_psnr"), key=lambda m: m.step)
    base = sorted(mlflow_client(uri).get_metric_history(r.info.run_id, "val_cubic_dc_psnr"), key=lambda m: m.step)
    assert len(sr) == 3 and [m.step for m in sr] == [0, 1, 2]
    assert sr[0].value == pytest.approx(base[0].value, abs=1e-4)  # untrained = cubic + consistency
    assert 20 < m["val_cubic_psnr"] < 60 and 20 < m["val_sr_psnr"] < 60
    assert m["val_cubic_psnr"] > m["val_linear_psnr"]  # cubic beats linear on a real 1 mm brain
    t = r.data.tags
    assert t["medsr.seed"] == "0" and t["medsr.method"] == BUNDLE and t["medsr.git_commit"]
    arts = artifact_paths(uri, r.info.run_id)
    assert {"executed_config.json", "model.pt", "val_metrics.json", "val_metrics.md"} <= set(arts), arts
    png = [a for a in arts if a.endswith(".png")]
    assert png and download_artifact(uri, r.info.run_id, png[0], tmp_path).read_bytes()[:4] == b"\x89PNG"
    executed = json.loads(download_artifact(uri, r.info.run_id, "executed_config.json", tmp_path).read_text())
    assert executed["window"] == 4 and executed["features"] == 8
    model = root / "models" / "model.pt"
    assert sha256(download_artifact(uri, r.info.run_id, "model.pt", tmp_path)) == sha256(model)
    state = load_state(model)
    net.load_state_dict(state)  # strict: the inference network
    # the best checkpoint by validation: the trained head if a trained epoch beat the untrained model (the physics
    # baseline, validated before the first step), else the floor with its zero head
    val = [m.value for m in sorted(mlflow_client(uri).get_metric_history(r.info.run_id, "val_psnr"),
                                   key=lambda m: m.step)]
    trained_won = max(val[1:]) > val[0]
    assert (float(state["net.head.2.weight"].abs().max()) > 0) == trained_won, val
    assert (root / "out" / "checkpoints" / "COMPLETED").read_text().strip() == "epoch 2"


@pytest.mark.slow
def test_evaluate_cli_table(trained, seq_data):
    root, env, proc = trained
    _check(proc)
    ev = run(bundle_cmd("run", BUNDLE, ["train", "evaluate"], **_paths(root, seq_data), **NET), env)
    _check(ev)
    assert f"Restored all variables from {root / 'models' / 'model.pt'}" in ev.stdout
    eval_dir = root / "out" / "evaluation"
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    for method in ("sr", "linear", "cubic", "cubic_dc"):
        for view in ("native", "reformat_a", "reformat_b"):
            for metric in ("psnr", "ssim"):
                assert math.isfinite(metrics[f"test_{view}_{method}_{metric}"])
    assert metrics["test_cubic_gain_db"] == pytest.approx(metrics["test_sr_psnr"] - metrics["test_cubic_psnr"])
    table = (eval_dir / "metrics.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "PSNR" not in line]
    assert [r.split("|")[1].strip().split()[0] for r in rows] == ["linear", "cubic", "cubic+consistency", "BiConvLSTM"]
    # the matched baseline: cubic + slice-thickness consistency beats cubic on a real head
    assert metrics["test_cubic_dc_psnr"] > metrics["test_cubic_psnr"]
    assert f"{metrics['test_reformat_a_cubic_psnr']:.2f}" in rows[1]
    # evaluation is on the held-out test patient, with a per-slice table the demo reads
    slices = list(csv.DictReader(open(eval_dir / "slices.csv")))
    assert {r["subject"] for r in slices} == {"robex_t1"} and {"sr", "cubic_dc"} <= {r["method"] for r in slices}
    runs = runs_of(env["MLFLOW_TRACKING_URI"], BUNDLE)
    evals = [r for r in runs if r.info.run_name.startswith(f"{BUNDLE}-eval")]
    assert len(evals) == 1 and evals[0].info.status == "FINISHED"
    assert evals[0].data.tags["medsr.stage"] == "evaluate"
    assert evals[0].data.metrics["test_sr_psnr"] == pytest.approx(metrics["test_sr_psnr"], abs=1e-6)
    assert {"metrics.json", "metrics.md"} <= set(artifact_paths(env["MLFLOW_TRACKING_URI"], evals[0].info.run_id))


@pytest.mark.slow
def test_inference_lands_on_the_original_grid(seq_data, tmp_path):
    """Thicken a real isotropic volume (our degradation, our thick affine), super-resolve it with the CLI: the
    output must have the original shape, zooms and affine, the input dtype, and a complete sidecar. x2: the held-out
    patient (ROBEX T1 crop) with the bundle's shipped weights at their default path; x4: untrained weights."""
    from monai.transforms import LoadImage

    env = bundle_env(tmp_path, OMP_NUM_THREADS="1")
    shipped = REPO / "bundles" / BUNDLE / "models" / "model.pt"
    for axis, f, name in ((2, 2, "robex_t1"), (0, 4, "mni152")):
        src = seq_data / f"{name}.nii.gz"
        orig = nib.load(str(src))
        img = LoadImage(image_only=True, ensure_channel_first=True)(str(src))
        thick = SliceThickness(f, slice_axis=axis)(img)
        thick_file = tmp_path / f"thick_ax{axis}_x{f}.nii.gz"
        data = np.rint(thick.numpy()[0]).astype(np.int16)  # an integer scan: dtype must survive
        nib.save(nib.Nifti1Image(data, thick_affine(orig.affine, f, axis)), str(thick_file))
        out_dir = tmp_path / f"out_{axis}_{f}"
        # x2: the shipped model at the config's own ckpt_path; x4: untrained weights, no data-consistency
        # projection, so that the untrained model is exactly cubic interpolation (geometry only)
        extra = {} if f == 2 else {"ckpt_path": "$None", "data_consistency": False, **NET}
        inf = run(bundle_cmd("run", BUNDLE, ["inference"], input=expr(thick_file), output_dir=expr(out_dir),
                             scale=f, slice_axis=axis, window=6, **extra), env)
        _check(inf)
        out = out_dir / f"thick_ax{axis}_x{f}_sr.nii.gz"
        res = nib.load(str(out))
        assert res.shape == orig.shape
        np.testing.assert_allclose(res.affine, orig.affine, atol=1e-5)
        np.testing.assert_allclose(res.get_qform(), orig.affine, atol=1e-4)  # qform and sform agree
        np.testing.assert_allclose(res.header.get_zooms()[:3], orig.header.get_zooms()[:3], atol=1e-5)
        assert res.get_data_dtype() == np.int16
        side = json.loads(out.with_name(out.name.replace(".nii.gz", ".json")).read_text())
        assert side["bundle"] == BUNDLE and side["scale"] == f and side["slice_axis"] == axis
        assert side["input_shape"][axis] == 48 // f and side["output_shape"] == list(orig.shape)
        assert side["output_spacing_mm"][axis] == pytest.approx(side["input_spacing_mm"][axis] / f, rel=1e-5)
        assert side["bundle_version"] == json.loads(config(BUNDLE, "metadata").read_text())["version"]
        if f == 2:
            assert side["checkpoint_sha256"] == sha256(shipped)
            # not worse than an independent cubic interpolation of the same thick slices (scipy's cubic spline on
            # the centre grid: thick slice k at thin position k*f + (f-1)/2), against the original thin volume
            from scipy.ndimage import map_coordinates

            ref = orig.get_fdata()
            grid = list(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in ref.shape], indexing="ij"))
            grid[axis] = (grid[axis] - (f - 1) / 2) / f
            cubic = map_coordinates(data.astype(np.float64), grid, order=3, mode="nearest")
            rng = np.percentile(ref, 99.5) - np.percentile(ref, 0.5)

            def psnr(x):
                return 10 * np.log10(rng ** 2 / np.mean((x - ref) ** 2))

            assert psnr(cubic) > 25  # the reference itself is sound (the grid convention holds)
            assert psnr(res.get_fdata()) >= psnr(cubic) - 0.05
        else:
            assert side["checkpoint_sha256"] is None
            # the untrained model is cubic interpolation on the centre grid: the windowed inference (windows of 6
            # of the 12 thick slices) adds no seams, and the units survive normalisation and back
            cubic = GridUpsample([f if a == axis else 1 for a in range(3)], mode="cubic", grid="center",
                                 spatial_dims=3)(torch.as_tensor(data, dtype=torch.float64)[None])[0].numpy()
            np.testing.assert_allclose(res.get_fdata(), np.clip(np.rint(cubic), -32768, 32767), atol=1.0)


@pytest.mark.slow
def test_bundle_tools(trained, seq_data, tmp_path, monkeypatch):
    root, _, proc = trained
    _check(proc)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):  # nothing may be downloaded
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    # TorchScript equals eager on a real thick window
    vol = nib.load(str(seq_data / "pydeface_mean.nii.gz")).get_fdata(dtype=np.float32)
    hr = torch.as_tensor(vol / np.percentile(vol, 99.5))[None, :, :, 8:40]  # (1, 48, 48, 32)
    x = SliceThickness(2, slice_axis=2)(hr).movedim(3, 1)[None].float()  # (1, 1, 16, 48, 48)
    eager, y_e = export_matches_eager(BUNDLE, root / "models" / "model.pt", x, tmp_path, verify_n=2, **NET)
    assert y_e.shape == (1, 1, 32, 48, 48)
    assert float((y_e - eager.baseline(x)).abs().max()) > 1e-6  # the trained residual was exported


@pytest.mark.slow
def test_resume_after_sigkill(seq_data, tmp_path):
    env = bundle_env(tmp_path, OMP_NUM_THREADS="1")
    cmd = bundle_cmd("run", BUNDLE, ["train"], **_paths(tmp_path, seq_data),
                     **{**TINY, "max_epochs": 5, "windows_per_epoch": 16})
    ckpt_dir = tmp_path / "out" / "checkpoints"
    proc = kill_after_first_checkpoint(cmd, env, ckpt_dir, tmp_path / "first.log")
    assert proc.returncode == -signal.SIGKILL, tail((tmp_path / "first.log").read_text())
    ckpts = sorted(ckpt_dir.glob("checkpoint_*.pt"))
    assert ckpts, tail((tmp_path / "first.log").read_text())
    done = int(re.search(r"epoch=(\d+)", ckpts[-1].name).group(1))
    assert done < 5
    second = run(cmd, env)
    _check(second)
    assert f"resuming from {ckpts[-1]}" in second.stdout
    completed = [int(e) for e in re.findall(r"SupervisedTrainer - INFO - Epoch\[(\d+)\] Complete", second.stdout)]
    assert completed == list(range(done + 1, 6)), completed
    assert sorted(r.info.status for r in runs_of(env["MLFLOW_TRACKING_URI"], BUNDLE)) == ["FINISHED", "KILLED"]


@pytest.mark.slow
def test_multi_gpu_config_with_torchrun_gloo(seq_data, tmp_path):
    overrides = {**TINY, "max_epochs": 1}
    cmd = torchrun_cmd(BUNDLE, ["train", "multi_gpu_train"], **_paths(tmp_path, seq_data), **overrides)
    env = bundle_env(tmp_path, OMP_NUM_THREADS="1")
    proc = run(cmd, env, timeout=400)
    assert proc.returncode == 0, tail(proc.stdout, 6000)
    network_from_config(BUNDLE, **NET).load_state_dict(load_state(tmp_path / "models" / "model.pt"))  # unwrapped
    runs = runs_of(env["MLFLOW_TRACKING_URI"], BUNDLE)
    assert [r.info.status for r in runs] == ["FINISHED"]  # rank 0 tracks
    epoch_length = int(runs[0].data.params["epoch_length"])
    assert epoch_length == math.ceil(math.ceil(TINY["windows_per_epoch"] / 2) / TINY["batch_size"])  # sampler split
    assert len(mlflow_client(env["MLFLOW_TRACKING_URI"]).get_metric_history(runs[0].info.run_id, "train_loss")) \
        == epoch_length
