"""Scan-specific self-supervised adaptation (``medsr adapt``) on real sample crops."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _scan(tiny_datalist, subject: str) -> Path:
    return tiny_datalist.parent / "nifti" / f"{subject}.nii.gz"


def _normalised(path: Path, modality: str) -> tuple[torch.Tensor, list[float]]:
    from medsr_monai.transforms import ModalityNormalize

    img = nib.load(str(path))
    vol = torch.as_tensor(np.asarray(img.dataobj, dtype=np.float32))[None]
    return torch.as_tensor(ModalityNormalize(modality=modality, clip=False)(vol)).float(), \
        [float(v) for v in img.header.get_zooms()[:3]]


def _bundle_net(bundle: str, config: str = "inference", shipped: bool = True):
    from medsr_monai.adapt import bundle_network

    return bundle_network(REPO / "bundles" / bundle, config, shipped=shipped, device="cpu")


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_held_back_slices_are_spread_and_disjoint():
    from medsr_monai.adapt.objectives import held_back

    train, val = held_back(23, 0.15)
    assert len(val) == 3 and set(train).isdisjoint(val) and sorted(train + val) == list(range(23))
    assert val[0] > 0 and val[-1] < 22  # spread inside the scan, not its first or last slices
    with pytest.raises(ValueError, match="at least 2"):
        held_back(1)


def test_neighbor_subsample_takes_two_adjacent_pixels_of_each_cell():
    from medsr_monai.adapt import neighbor_subsample

    h, w = 8, 10
    x = torch.arange(h * w, dtype=torch.float).reshape(1, 1, h, w)
    a, b = neighbor_subsample(x, torch.Generator().manual_seed(3))
    assert a.shape == b.shape == (1, 1, h // 2, w // 2)
    ra, ca = a // w, a % w
    rb, cb = b // w, b % w
    assert torch.all((ra // 2 == torch.arange(h // 2)[:, None]) & (ca // 2 == torch.arange(w // 2)))  # own cell
    assert torch.all((rb // 2 == ra // 2) & (cb // 2 == ca // 2))
    assert torch.all((ra - rb).abs() + (ca - cb).abs() == 1)  # edge neighbours, never the same pixel
    # the same generator state gives the same cells (the regulariser relies on it)
    a2, _ = neighbor_subsample(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, a2)
    # with diagonal pairs (CT): still two different pixels of the own cell, edge and diagonal kinds about equally often
    x = torch.arange(64 * 64, dtype=torch.float).reshape(1, 1, 64, 64)
    a, b = neighbor_subsample(x, torch.Generator().manual_seed(0), diagonal=True)
    dr, dc = (a // 64 - b // 64).abs(), (a % 64 - b % 64).abs()
    assert torch.all((a // 64 // 2 == b // 64 // 2) & (a % 64 // 2 == b % 64 // 2))
    diag, edge = (dr == 1) & (dc == 1), (dr + dc) == 1
    assert torch.all(diag | edge) and 0.4 < diag.float().mean() < 0.6


def test_in_plane_pairs_are_whole_slice_degradations_on_the_corner_grid(tiny_datalist):
    """Pairs from a real MR crop: LR patch s times smaller and on the corner grid of its HR patch (away from the
    patch border, degrading the HR patch gives the LR patch; one HR voxel off, it does not), slices held back."""
    from medsr_monai.adapt import InPlaneSRObjective
    from medsr_monai.physics import Decimation

    vol, _ = _normalised(_scan(tiny_datalist, "brain2"), "MR")
    physics = Decimation(2)
    obj = InPlaneSRObjective(vol, physics, "MR", axes=[2], batch_size=4, patch=32)
    assert obj.num_slices == {"training": 5, "validation": 1}
    g = torch.Generator().manual_seed(0)
    m = 4  # LR voxels of border where the anti-aliasing filter reaches outside the patch
    for _ in range(5):
        lr, hr = obj.sample(g)
        assert lr.shape == (4, 1, 16, 16) and hr.shape == (4, 1, 32, 32)
        again = physics.A(hr)[..., m:-m, m:-m]
        moved = physics.A(torch.roll(hr, 1, dims=-1))[..., m:-m, m:-m]
        assert torch.allclose(again, lr[..., m:-m, m:-m], atol=1e-3)
        assert (moved - lr[..., m:-m, m:-m]).abs().max() > 10 * (again - lr[..., m:-m, m:-m]).abs().max()


def test_near_isotropic_scan_gives_all_orientations():
    from medsr_monai.adapt.objectives import orientation_axes

    assert orientation_axes([1.5, 1.5, 1.5], 2) == [0, 1, 2]
    assert orientation_axes([0.78, 0.78, 6.5], 2) == [2]


def test_tiny_adaptation_lowers_the_self_supervised_loss(tiny_datalist):
    from medsr_monai.adapt import adapt_network, objective_for

    vol, spacing = _normalised(_scan(tiny_datalist, "brain2"), "MR")
    net = _bundle_net("srcnn", shipped=False)  # starts at the physics baseline
    obj = objective_for(net, vol, "MR", spacing, 2, batch_size=4, patch=32)
    result = adapt_network(net, obj, seconds=120, max_steps=40, learning_rate=1e-3, val_every=10, progress=False)
    assert result.kept and result.val_after < result.val_before
    assert result.val_after == pytest.approx(obj.validation_loss(net.eval()), rel=1e-5)  # the kept weights


def test_no_harm_guard_restores_the_original_weights(tiny_datalist):
    """A step size that wrecks the model: validation worsens, so the original weights come back, bit for bit."""
    from medsr_monai.adapt import adapt_network, objective_for

    vol, spacing = _normalised(_scan(tiny_datalist, "brain2"), "MR")
    net = _bundle_net("srcnn")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    obj = objective_for(net, vol, "MR", spacing, 2, batch_size=4, patch=32)
    result = adapt_network(net, obj, seconds=120, max_steps=10, learning_rate=10.0, val_every=5, progress=False)
    assert not result.kept and min(v for _, v in result.val_history[1:]) >= result.val_before
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_neighbor2neighbor_pairs_for_ct_denoising(tiny_datalist):
    from medsr_monai.adapt import Neighbor2NeighborObjective, objective_for

    vol, spacing = _normalised(_scan(tiny_datalist, "lung2"), "CT")
    net = _bundle_net("unet", "inference_ct_denoise")
    obj = objective_for(net, vol, "CT", spacing, 2, batch_size=2, patch=32)
    assert isinstance(obj, Neighbor2NeighborObjective) and obj.diagonal_pairs  # reconstructed CT noise
    loss = obj.loss(net, torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    assert obj.validation_loss(net.eval()) == obj.validation_loss(net)  # fixed sub-sampling: comparable


def _zero_filled_scan(tiny_datalist, tmp_path: Path, mask_type: str = "random"):
    """A real MR crop undersampled 4x (``mask_type`` lines), as inference reads it: the complex zero-filled NIfTI,
    loaded and normalised by :func:`load_scan` into ``(2, X, Y, Z)``."""
    from medsr_monai.adapt.scan import load_scan
    from medsr_monai.transforms import zero_filled_volume

    zf = Path(zero_filled_volume(str(_scan(tiny_datalist, "brain2")), str(tmp_path / f"brain2_{mask_type}.nii.gz"),
                                 mask_type=mask_type))
    return zf, load_scan(zf, "MR", complex_input=True)


def test_ssdu_refuses_an_equispaced_scan_with_the_reason(tiny_datalist, tmp_path):
    """Measured on held-out heads: with equispaced lines SSDU's loss improves while the image gets worse, past the
    guard; so the objective refuses such a scan (the unet bundle's default mask), naming the spacing."""
    from medsr_monai.adapt import objective_for

    _, info = _zero_filled_scan(tiny_datalist, tmp_path, "equispaced")
    with pytest.raises(ValueError, match=r"equispaced \(every [0-9]+th line.*random"):
        objective_for(_bundle_net("unet"), info["volume"], "MR", info["spacing"], info["slice_axis"])


def test_ssdu_splits_the_measured_lines_of_a_real_undersampled_scan(tiny_datalist, tmp_path):
    """SSDU for the unet mri_recon task (a random-mask scan): the complex scan loads as (real, imaginary) under the
    runner's linear map;
    each slice's measured lines split into two disjoint sets whose union is all of them, the centre band in the
    input set and 40 % of the other lines in the loss set; the input set's zero-filled image has nothing outside
    its lines."""
    from medsr_monai.adapt import SSDUObjective, objective_for
    from medsr_monai.physics.undersampling import centered_fft2, to_complex

    zf, info = _zero_filled_scan(tiny_datalist, tmp_path)
    data = np.asarray(nib.load(str(zf)).dataobj)
    assert np.iscomplexobj(data) and info["volume"].shape == (2, *data.shape)
    # the runner's map (z - lo) / (hi - lo): one scale for both parts, the offset on the real part only
    from medsr_monai.transforms import ModalityNormalize

    norm = ModalityNormalize(modality="MR", clip=False)
    norm(torch.as_tensor(np.abs(data))[None])
    lo, hi = norm.last_range
    re, im = (torch.as_tensor(part.copy()).float() for part in (data.real, data.imag))
    assert torch.allclose(info["volume"][0], (re - lo) / (hi - lo), atol=1e-5)
    assert torch.allclose(info["volume"][1], im / (hi - lo), atol=1e-5)

    net = _bundle_net("unet")
    obj = objective_for(net, info["volume"], "MR", info["spacing"], info["slice_axis"], batch_size=4)
    assert isinstance(obj, SSDUObjective) and obj.num_slices["validation"] >= 1
    y = obj._batch(4, torch.Generator().manual_seed(0))
    theta, lam = obj.split(y, torch.Generator().manual_seed(1))
    omega = net.physics.sampled_lines(y)
    w = y.shape[-1]
    assert not (theta & lam).any() and torch.equal(theta | lam, omega)
    assert theta[..., w // 2].all()  # the centre (DC) line stays in the input
    for b in range(len(y)):
        line = omega[b, 0, 0]
        centre = [i for i in range(w) if all(line[min(i, w // 2):max(i, w // 2) + 1])]
        outer = int(line.sum()) - len(centre)
        assert int(lam[b].sum()) == round(0.4 * outer) and not lam[b, 0, 0, centre].any()
    k = centered_fft2(to_complex(y))
    from medsr_monai.physics.undersampling import centered_ifft2, from_complex

    y_theta = from_complex(centered_ifft2(k * theta))
    assert torch.equal(net.physics.sampled_lines(y_theta), theta)


def test_ssdu_adaptation_of_the_shipped_weights_lowers_its_loss(tiny_datalist, tmp_path):
    """30 steps from the shipped weights lower the kept-back SSDU loss (on these 64 x 64 crops a fresh model has
    only ~4 loss lines per slice and does not move in 30 steps; the benchmark covers from-scratch adaptation)."""
    from medsr_monai.adapt import adapt_network, objective_for

    _, info = _zero_filled_scan(tiny_datalist, tmp_path)
    net = _bundle_net("unet")
    obj = objective_for(net, info["volume"], "MR", info["spacing"], info["slice_axis"], batch_size=4)
    result = adapt_network(net, obj, seconds=120, max_steps=30, learning_rate=1e-4, val_every=10, seed=0,
                           progress=False)
    assert result.kept and result.val_after < result.val_before


def test_cyclegan_says_why_it_cannot_adapt(tiny_datalist):
    from medsr_monai.adapt import objective_for

    vol, spacing = _normalised(_scan(tiny_datalist, "lung2"), "CT")
    from medsr_monai.networks import ResnetGenerator

    with pytest.raises(ValueError, match="no physics"):
        objective_for(ResnetGenerator(), vol, "CT", spacing, 2)


def test_x4_in_plane_adaptation_is_refused_with_the_reason_before_any_output(tiny_datalist, tmp_path, capsys):
    """SRGAN's x4: the scan's own pairs are a quarter of the inference scale and adaptation measured harmful on the
    held-out subjects, which the kept-back slices cannot see: ``medsr adapt`` says so and writes nothing (no weights,
    no sidecar, no output, no MLflow run); ``--allow-large-scale`` (the benchmark's way in) builds the x4 ZSSR pairs."""
    from medsr_monai.adapt import MAX_IN_PLANE_ADAPT_SCALE, objective_for
    from medsr_monai.cli import main

    assert MAX_IN_PLANE_ADAPT_SCALE == 2
    scan, out = _scan(tiny_datalist, "lung2"), tmp_path / "out"
    store = tmp_path / "mlruns.db"
    code = main(["adapt", "--bundle", str(REPO / "bundles" / "srgan"), "--input", str(scan), "--output_dir", str(out),
                 "--tracking-uri", f"sqlite:///{store}", "--seconds", "5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and "x4 is not adapted" in err[-1] and "--allow-large-scale" in err[-1], err[-3:]
    assert not any(out.glob("*"))
    if store.exists():  # the store may have been opened, but it holds no run
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{store}")
        assert not client.search_runs([e.experiment_id for e in client.search_experiments()])
    vol, spacing = _normalised(scan, "CT")
    obj = objective_for(_bundle_net("srgan"), vol, "CT", spacing, 2, batch_size=2, patch=32, allow_large_scale=True)
    lr, hr = obj.sample(torch.Generator().manual_seed(0))
    assert hr.shape[-2:] == (32, 32) and lr.shape[-2:] == (8, 8)  # x4 pairs from the scan itself


@pytest.mark.slow
def test_medsr_adapt_end_to_end_records_and_leaves_the_bundle_alone(tiny_datalist, tmp_path):
    """The CLI on a real crop: adapted weights + sidecar next to the output, the output on the same grid as the
    bundle's own inference, models/model.pt unchanged, and an MLflow run with the figures and no file name."""
    import mlflow

    from medsr_monai.cli import main

    scan = _scan(tiny_datalist, "brain2")
    shipped = REPO / "bundles" / "srcnn" / "models" / "model.pt"
    sha_before = _sha(shipped)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    rc = main(["adapt", "--bundle", str(REPO / "bundles" / "srcnn"), "--input", str(scan), "--seconds", "60",
               "--max-steps", "20", "--output_dir", str(out), "--tracking-uri", uri])
    assert rc == 0
    assert _sha(shipped) == sha_before
    side = json.loads((out / "brain2_adapted.json").read_text())
    assert side["adapted_weights_sha256"] == _sha(out / "brain2_adapted.pt")
    assert side["input_sha256"] == _sha(scan) and side["steps"] == 20 and side["patience"] == 5
    sr = nib.load(str(out / "brain2_sr.nii.gz"))
    lr = nib.load(str(scan))
    assert sr.shape == (128, 128, 6)
    expect = lr.affine.copy()
    expect[:3, :2] /= 2  # corner grid: in-plane voxel vectors halved, origin kept
    np.testing.assert_allclose(sr.affine, expect, atol=1e-5)
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("adapt-srcnn")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.params["input_sha256"] == side["input_sha256"]
    assert run.data.params["adapted_weights_sha256"] == side["adapted_weights_sha256"]
    assert run.data.metrics["val_before"] == pytest.approx(side["val_before"])
    assert run.data.metrics["val_after"] == pytest.approx(side["val_after"])
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 20
    recorded = json.dumps({**run.data.params, **run.data.tags})
    assert "brain2" not in recorded and str(scan.parent) not in recorded  # the file name never leaves
    # a second adaptation into the same folder refuses before doing any work, and loses nothing
    weights_sha = _sha(out / "brain2_adapted.pt")
    rc = main(["adapt", "--bundle", str(REPO / "bundles" / "srcnn"), "--input", str(scan), "--max-steps", "2",
               "--output_dir", str(out), "--tracking-uri", uri])
    assert rc == 2 and _sha(out / "brain2_adapted.pt") == weights_sha
    assert len(client.search_runs([exp.experiment_id])) == 1
    # from scratch: a fresh model at the physics baseline gets the longer patience, and says so
    from medsr_monai.adapt import SCRATCH_PATIENCE

    rc = main(["adapt", "--bundle", str(REPO / "bundles" / "srcnn"), "--input", str(scan), "--max-steps", "2",
               "--from-scratch", "--output_dir", str(tmp_path / "scratch"), "--tracking-uri", uri])
    scratch = json.loads((tmp_path / "scratch" / "brain2_adapted.json").read_text())
    assert rc == 0 and scratch["start"] == "from scratch" and scratch["patience"] == SCRATCH_PATIENCE > 5
    assert _sha(shipped) == sha_before


def test_smore_pairs_thicken_an_in_plane_axis_and_adaptation_helps(seq_data):
    """Through-plane: a real head crop thickened x2 along z is the scan; SMORE windows come from its in-plane axes
    (thin along S), the thick side is the physics of the thin side, and a short adaptation of the shipped LSTM lowers
    the self-supervised loss on the kept-back band."""
    from medsr_monai.adapt import (FINETUNE_LEARNING_RATE, FINETUNE_PATIENCE, SCRATCH_LEARNING_RATE, SCRATCH_PATIENCE,
                                   ThroughPlaneObjective, adapt_network, objective_for, start_settings)

    thin, _ = _normalised(seq_data / "robex_t1.nii.gz", "MR")
    net = _bundle_net("seqsr_lstm")
    ph = net.physics
    thick = ph.A(thin.permute(0, 3, 1, 2)[None])[0].permute(0, 2, 3, 1)  # (1, 48, 48, 24): thick along z
    obj = objective_for(net, thick, "MR", [1.5, 1.5, 3.0], 2, batch_size=8, patch=24)
    assert isinstance(obj, ThroughPlaneObjective)
    lr, hr = obj.sample(torch.Generator().manual_seed(0))
    assert hr.shape[:3] == (2, 1, 16) and max(hr.shape[3:]) <= 24  # the patch, within one side of the band
    assert lr.shape == (2, 1, 8, *hr.shape[3:])
    torch.testing.assert_close(lr, ph.A(hr))
    assert obj.num_slices["validation"] >= 2 * 2  # a band of each in-plane view
    # from the shipped weights, through-plane takes the from-scratch rate and patience (in-plane SR keeps its own)
    lr_rate, patience = start_settings(obj, from_scratch=False)
    assert (lr_rate, patience) == start_settings(obj, from_scratch=True) == (SCRATCH_LEARNING_RATE, SCRATCH_PATIENCE)
    in_plane = objective_for(_bundle_net("srcnn"), thin, "MR", [1.5, 1.5, 1.5], 2, batch_size=2, patch=16)
    assert start_settings(in_plane, from_scratch=False) == (FINETUNE_LEARNING_RATE, FINETUNE_PATIENCE)
    assert lr_rate > FINETUNE_LEARNING_RATE and patience > FINETUNE_PATIENCE
    # a short run at the fine-tuning rate (at 1e-3 the first checks rise before the loss falls: 30 steps are too few)
    result = adapt_network(net, obj, seconds=120, max_steps=30, val_every=10, learning_rate=1e-4, progress=False)
    assert result.val_best < result.val_before


@pytest.mark.slow
def test_inference_config_adapts_each_input_with_adapt_seconds(tiny_datalist, tmp_path):
    """`--adapt_seconds` of a bundle's inference.json (unet ct_denoise, through monai.bundle run): the input gets its
    own adapted weights and sidecar next to its output, which was made with them; the shipped weights are unchanged."""
    import os
    import subprocess
    import sys

    scan = _scan(tiny_datalist, "lung2")
    root = REPO / "bundles" / "unet"
    shipped = root / "models" / "model_ct_denoise.pt"
    sha_before = _sha(shipped)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                           str(root / "configs" / "inference_ct_denoise.json"), "--meta_file",
                           str(root / "configs" / "metadata.json"), "--bundle_root", str(root), "--input", str(scan),
                           "--output_dir", str(out), "--adapt_seconds", "5"], env=env, capture_output=True, text=True,
                          cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    side = json.loads((out / "lung2_adapted.json").read_text())
    assert side["bundle"] == "unet" and side["pairs_objective"].startswith("Neighbor2Neighbor")
    assert side["start_weights_sha256"] == sha_before == _sha(shipped)
    (output_side,) = [p for p in out.glob("lung2_*.json") if p.name != "lung2_adapted.json"]
    assert json.loads(output_side.read_text())["checkpoint_sha256"] == side["adapted_weights_sha256"]


def test_adaptation_keeps_batch_norm_statistics(tiny_datalist):
    """SRGAN's generator has batch norm: the steps on one scan's small patches train its weights but leave the
    running statistics of the bundle's training data as they were (updating them from the adaptation batches cost
    1 dB on held-out MR and wrecked a from-scratch model). Checked at every training step, since the guard may
    restore the original buffers at the end anyway."""
    from medsr_monai.adapt import adapt_network, objective_for

    vol, spacing = _normalised(_scan(tiny_datalist, "brain2"), "MR")
    net = _bundle_net("srgan")
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns, "srgan's generator has batch norm"
    stats = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]
    weights = [m.weight.detach().clone() for m in bns]
    obj = objective_for(net, vol, "MR", spacing, 2, batch_size=2, patch=32, allow_large_scale=True)
    seen = []

    class Spy:
        def loss(self, network, g):
            value = obj.loss(network, g)  # the forward pass in training mode
            seen.append(([(m.running_mean.clone(), m.running_var.clone()) for m in bns],
                         [m.weight.detach().clone() for m in bns]))
            return value

        def validation_loss(self, network):
            return obj.validation_loss(network)

    result = adapt_network(net, Spy(), seconds=120, max_steps=3, learning_rate=1e-3, val_every=3, progress=False)
    assert result.steps == 3 and len(seen) == 3
    for step_stats, _ in seen:
        assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(step_stats, stats))
    assert any(not torch.equal(w, w0) for w, w0 in zip(seen[-1][1], weights))  # the affine parameters did train
