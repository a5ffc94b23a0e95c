"""The adversarial bundles (SRGAN, CycleGAN): networks against the papers, losses, the image pool and the
sharpness measures; one training iteration of each Ignite workflow on tiny real data; and the bundles through
the real ``python -m monai.bundle`` CLI (MLflow run, evaluation, NIfTI inference, MONAI bundle tools, NaN
stop, resume after SIGKILL, user-given domain folders)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import (
    REPO, artifact_paths, bundle_cmd, bundle_env, config, export_matches_eager, expr, kill_after_first_checkpoint,
    load_state, mlflow_client, run, runs_of, tail, torchrun_cmd,
)

#: tiny settings: 32x32 HR patches (8-pixel degradation margin, so the 48x48 crop fits the 64x64 slices)
SRGAN_TINY = {"patch_size": 32, "patches_per_slice": 1, "batch_size": 4, "val_slices_per_volume": 2,
              "pretrain_epochs": 1, "max_epochs": 2,
              # 8 of the tiny data's 37 batches per epoch and a 16-feature discriminator (1.5M parameters, not 23.5M):
              # the adversarial phase took 26 s of a 60 s training
              "train#trainer#epoch_length": 8, "discriminator_features": 16}
# the tiny split has one training CT patient, so domain B comes from the validation patients here
CYCLEGAN_TINY = {"patch_size": 32, "generator_features": 8, "generator_blocks": 2, "discriminator_features": 8,
                 "pool_size": 3, "val_slices_per_volume": 2, "max_epochs": 2,
                 "domain_b_split": "validation", "epoch_length": 8}
CYCLEGAN_NET = {k: CYCLEGAN_TINY[k] for k in ("generator_features", "generator_blocks")}


def _real_slice(datalist: Path, subject: str = "lung2", k: int = 3) -> torch.Tensor:
    import nibabel as nib

    from medsr_monai.transforms import ModalityNormalize

    vol = nib.load(str(datalist.parent / "nifti" / f"{subject}.nii.gz")).get_fdata(dtype=np.float32)
    modality = "CT" if subject.startswith(("lung", "cq500", "pancreas")) else "MR"
    return torch.as_tensor(ModalityNormalize(modality)(torch.as_tensor(vol)))[None, :, :, k]  # (1, H, W)


# ----------------------------------------------------------------------------------------------- architecture
def test_networks_have_the_papers_parameter_counts():
    from medsr_monai.networks import PatchGANDiscriminator, ResnetGenerator, SRGANDiscriminator, SRResNet

    def count(m):
        return sum(p.numel() for p in m.parameters())

    # CycleGAN's reference code prints 11.378 M (resnet_9blocks) and 2.765 M (basic 70x70 PatchGAN) for RGB
    assert count(ResnetGenerator(in_channels=3, out_channels=3, num_blocks=9, residual=False)) == 11_378_179
    assert count(PatchGANDiscriminator(in_channels=3)) == 2_764_737
    # SRResNet (16 blocks x 64, two x2 sub-pixel stages): about 1.55 M parameters for RGB x4
    assert 1.50e6 < count(SRResNet(in_channels=3, out_channels=3, scale=4)) < 1.60e6
    d = SRGANDiscriminator(in_channels=3)
    assert d(torch.zeros(2, 3, 96, 96)).shape == (2, 1)
    assert d(torch.zeros(1, 3, 64, 64)).shape == (1, 1)  # any patch size: adaptive pooling before the dense layer
    # 70x70 receptive field: an output logit depends on a 70x70 input window, not more (batch norm in eval mode:
    # instance norm would couple every pixel through its per-image statistics)
    p = PatchGANDiscriminator(channels=4, norm="BATCH").eval()
    x = torch.zeros(1, 1, 128, 128, requires_grad=True)
    p(x)[0, 0, 6, 6].backward()
    rows = torch.nonzero(x.grad[0, 0].abs().sum(1)).flatten()
    assert int(rows.max() - rows.min() + 1) == 70


def test_patchgan_without_norm_sees_the_noise_level_instance_norm_hides():
    """A dose difference is mostly a noise *level*. Behind instance norm the 1-layer PatchGAN sees that level only
    through its first layer's bias and the norm's eps: without the bias, and at an amplitude where eps is negligible,
    the logits are the same for noise and three times that noise (the first conv and LeakyReLU are positively
    homogeneous, the norm removes the scale). With ``norm=None`` (the CycleGAN bundle's ``discriminator_norm``
    null) the level reaches the logits, and every layer keeps a bias, since no norm provides the shift."""
    from medsr_monai.networks import PatchGANDiscriminator

    torch.manual_seed(0)
    noise = 10 * torch.randn(1, 1, 64, 64)
    for norm in ("INSTANCE", None):
        d = PatchGANDiscriminator(channels=4, num_layers_d=1, norm=norm).eval()
        with torch.no_grad():
            d.initial_conv.conv.bias.zero_()
            change = (d(3 * noise) - d(noise)).abs().mean() / d(noise).abs().mean()
        assert (change < 1e-2) if norm else (change > 0.5), (norm, float(change))
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 3 and all(c.bias is not None for c in convs)


def test_resnet_generator_is_identity_at_start_and_keeps_any_size():
    from medsr_monai.networks import ResnetGenerator

    g = ResnetGenerator(features=8, num_blocks=2)
    x = torch.rand(2, 1, 30, 42)
    torch.testing.assert_close(g(x), x)  # residual output with a zero last layer
    assert ResnetGenerator(features=8, num_blocks=1, residual=False)(x).shape == x.shape


# ----------------------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("kind", ["bce", "lsgan", "hinge", "ragan"])
def test_adversarial_losses_reward_the_right_side(kind):
    from medsr_monai.losses import AdversarialLoss

    loss = AdversarialLoss(kind)
    confident_real, confident_fake = torch.full((8, 1), 2.0), torch.full((8, 1), -2.0)
    # a discriminator that tells them apart has a lower loss than one that swaps them
    assert loss.discriminator(confident_real, confident_fake) < loss.discriminator(confident_fake, confident_real)
    # the generator's loss falls as its fakes are judged more real
    assert loss.generator(confident_real, torch.full((8, 1), 1.0)) < loss.generator(confident_real, confident_fake)
    assert math.isfinite(float(loss.generator(confident_real, confident_fake)))
    # closed-form values at fixed logits (a wrong formula with the right monotonicity fails here)
    r, f = [2.0, 1.0], [-1.0, 0.5]

    def sp(x):  # softplus: -log(sigmoid(-x)), the BCE-with-logits of target 0
        return math.log1p(math.exp(x))

    def mean(v):
        return sum(v) / len(v)

    expected = {
        "bce": (0.5 * (mean([sp(-x) for x in r]) + mean([sp(x) for x in f])), mean([sp(-x) for x in f])),
        "lsgan": (0.5 * (mean([(x - 1) ** 2 for x in r]) + mean([x ** 2 for x in f])), mean([(x - 1) ** 2 for x in f])),
        "hinge": (0.5 * (mean([max(0.0, 1 - x) for x in r]) + mean([max(0.0, 1 + x) for x in f])), -mean(f)),
        "ragan": (0.5 * (mean([sp(-(x - mean(f))) for x in r]) + mean([sp(x - mean(r)) for x in f])),
                  0.5 * (mean([sp(x - mean(f)) for x in r]) + mean([sp(-(x - mean(r))) for x in f]))),
    }[kind]
    real, fake = torch.tensor(r).view(2, 1), torch.tensor(f).view(2, 1)
    assert float(loss.discriminator(real, fake)) == pytest.approx(expected[0], rel=1e-5)
    assert float(loss.generator(real, fake)) == pytest.approx(expected[1], rel=1e-5)


def test_adversarial_loss_rejects_unknown_kind():
    from medsr_monai.losses import AdversarialLoss

    with pytest.raises(ValueError, match="wgan.*bce"):
        AdversarialLoss("wgan")


def test_vgg_feature_loss_loads_user_weights_without_download(tmp_path):
    from medsr_monai.losses import VGG19_LAYERS, FeatureLoss, VGGFeatureExtractor

    # a state dict in torchvision's vgg19 layout (random weights: nothing is downloaded here or in the code)
    shapes, c_in = {}, 3
    for name, idx in sorted(VGG19_LAYERS.items(), key=lambda kv: kv[1]):
        if name.startswith("conv"):
            c_out = int(64 * 2 ** min(int(name[4]) - 1, 3))
            shapes[f"features.{idx}.weight"] = (c_out, c_in, 3, 3)
            shapes[f"features.{idx}.bias"] = (c_out,)
            c_in = c_out
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(*s, generator=g) * 0.05 for k, s in shapes.items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)
    path = tmp_path / "vgg19.pth"
    torch.save(state, path)

    ext = VGGFeatureExtractor(path, layer="relu2_2")
    assert not any(p.requires_grad for p in ext.parameters())
    x = torch.rand(2, 1, 32, 32)
    assert ext(x).shape == (2, 128, 16, 16)
    loss = FeatureLoss(ext)
    assert float(loss(x, x)) == 0.0
    assert float(loss(x, torch.rand(2, 1, 32, 32))) > 0

    bad = tmp_path / "not_vgg.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        VGGFeatureExtractor(bad)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        VGGFeatureExtractor(tmp_path / "missing.pth")


# ----------------------------------------------------------------------------------------------- pool, schedule
def test_image_pool_mixes_history_and_resumes_identically():
    from medsr_monai.workflows import ImagePool

    pool = ImagePool(size=4, seed=0)
    first = torch.arange(4.0).view(4, 1, 1, 1)
    torch.testing.assert_close(pool.query(first), first)  # filling: returned as given
    later = torch.full((64, 1, 1, 1), 100.0)
    out = pool.query(later)
    from_history = int((out < 100).sum())
    assert 0 < from_history <= 4  # about half are swapped for stored older fakes, at most the 4 stored

    state = pool.state_dict()
    clone = ImagePool(size=4, seed=123)
    clone.load_state_dict(state)
    nxt = torch.full((16, 1, 1, 1), 7.0)
    torch.testing.assert_close(pool.query(nxt), clone.query(nxt.clone()))
    assert ImagePool(size=0).query(later) is later


def test_linear_decay_schedule_is_cyclegans():
    from medsr_monai.workflows import make_scheduler

    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
    sched = make_scheduler("linear_decay", opt, max_epochs=200, decay_start=100)
    lrs = []
    for _ in range(200):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # the reference: lr * (1 - max(0, epoch + 1 - n_epochs) / (n_epochs_decay + 1)), epochs counted from 0
    expected = [2e-4 * (1 - max(0, e + 1 - 100) / 101) for e in range(200)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-9)


# ----------------------------------------------------------------------------------------------- sharpness
def test_sharpness_measures_on_a_real_slice(tiny_datalist):
    from monai.transforms import GaussianSmooth

    from medsr_monai.metrics import gmsd, sharpness_ratio

    hr = _real_slice(tiny_datalist, "brain2")[None]  # (1, 1, 64, 64)
    blurred = torch.as_tensor(GaussianSmooth(sigma=1.5)(hr[0]))[None]
    noisy = (hr + 0.05 * torch.randn(hr.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert float(gmsd(hr, hr)[0]) == 0.0
    assert float(sharpness_ratio(hr, hr)[0]) == pytest.approx(1.0)
    assert float(sharpness_ratio(blurred, hr)[0]) < 0.8  # blur loses edges
    assert float(sharpness_ratio(noisy, hr)[0]) > 1.1  # noise adds gradient energy
    assert float(gmsd(blurred, hr)[0]) > 0.01


# ----------------------------------------------------------------------------------------------- one iteration
def _parse(bundle: str, datalist: Path, tmp_path: Path, **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(config(bundle, "train")))
    parser["bundle_root"] = str(REPO / "bundles" / bundle)
    parser["dataset_dir"] = str(datalist.parent)
    parser["output_dir"] = str(tmp_path / "out")
    parser["ckpt_dir"] = str(tmp_path / "models")
    parser["train#handlers"] = []  # the workflow alone: no tracking, no validation
    for k, v in overrides.items():
        parser[k] = v
    return parser


def test_default_domains_are_disjoint_training_ct_patients(sample_dir, tmp_path):
    """With the shipped defaults, domain A (simulated low dose) and domain B (full dose) are two disjoint halves of
    the training CT patients, and the paired validation is the validation CT patients: no patient is in two roles,
    and none of them is a test patient."""
    from medsr_monai.data.datalist import load_datalist

    parser = _parse("cyclegan", sample_dir / "datalist.json", tmp_path)
    subjects = {k: {it["subject"] for it in parser.get_parsed_content(f"{k}#datalist")}
                for k in ("domain_a", "domain_b", "validate")}
    split = {s: {it["subject"] for it in load_datalist(sample_dir, s) if it["modality"] == "CT"}
             for s in ("training", "validation", "test")}
    assert subjects["domain_a"] and subjects["domain_b"] and not subjects["domain_a"] & subjects["domain_b"]
    assert subjects["domain_a"] | subjects["domain_b"] == split["training"]
    assert abs(len(subjects["domain_a"]) - len(subjects["domain_b"])) <= 1
    assert subjects["validate"] == split["validation"]
    assert not (subjects["domain_a"] | subjects["domain_b"] | subjects["validate"]) & split["test"]


def _params(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.named_parameters()}


def _changed(before: dict[str, torch.Tensor], net: torch.nn.Module) -> float:
    after = dict(net.named_parameters())
    return sum(not torch.equal(before[k], after[k].detach()) for k in before) / len(before)


def _srgan_iterations(datalist: Path, tmp_path: Path, pretrain_epochs: int, iterations: int):
    """Run ``iterations`` of the SRGAN workflow in-process; returns (output, changed G fraction, changed D fraction)."""
    parser = _parse("srgan", datalist, tmp_path, **{**SRGAN_TINY, "pretrain_epochs": pretrain_epochs, "max_epochs": 1,
                                                    "train#trainer#epoch_length": iterations})
    trainer = parser.get_parsed_content("train#trainer")
    g, d = parser.get_parsed_content("network"), parser.get_parsed_content("discriminator_net")
    g0, d0 = _params(g), _params(d)
    trainer.run()
    return trainer.state.output, _changed(g0, g), _changed(d0, d)


# Two iterations: the generators' last layer starts at zero (the untrained model is the interpolation / the
# identity), so the first step moves only that layer and the second all of them.
@pytest.mark.slow
def test_srgan_adversarial_iterations_update_both_networks(tiny_datalist, tmp_path):
    out, g_changed, d_changed = _srgan_iterations(tiny_datalist, tmp_path, pretrain_epochs=0, iterations=2)
    losses = out["losses"]
    for term in ("g_loss", "g_pixel", "g_adversarial", "g_feature", "d_loss", "d_real", "d_fake"):
        assert math.isfinite(losses[term]), (term, losses)
    assert 0 <= losses["d_real"] <= 1 and 0 <= losses["d_fake"] <= 1  # BCE: mean sigmoid outputs
    assert losses["adversarial_phase"] == 1.0
    assert out["pred"].shape == out["label"].shape == (4, 1, 32, 32) and out["image"].shape == (4, 1, 8, 8)
    assert g_changed == 1.0, "some generator weights did not move"
    assert d_changed == 1.0, "some discriminator weights did not move"


@pytest.mark.slow
def test_srgan_pretraining_iteration_leaves_the_discriminator_alone(tiny_datalist, tmp_path):
    out, g_changed, d_changed = _srgan_iterations(tiny_datalist, tmp_path, pretrain_epochs=1, iterations=1)
    losses = out["losses"]
    assert set(losses) == {"adversarial_phase", "g_pixel", "g_loss"} and losses["adversarial_phase"] == 0.0
    assert losses["g_loss"] == pytest.approx(losses["g_pixel"])  # pixel loss alone: SRResNet
    assert g_changed > 0 and d_changed == 0.0


@pytest.mark.slow
def test_cyclegan_iterations_update_all_four_networks(tiny_datalist, tmp_path):
    parser = _parse("cyclegan", tiny_datalist, tmp_path, **{**CYCLEGAN_TINY, "max_epochs": 1,
                                                            "train#trainer#epoch_length": 2})
    trainer = parser.get_parsed_content("train#trainer")
    nets = {k: parser.get_parsed_content(k) for k in ("network", "g_ba", "d_a", "d_b")}
    before = {k: _params(n) for k, n in nets.items()}
    trainer.run()
    out = trainer.state.output
    for term, value in out["losses"].items():
        assert math.isfinite(value), (term, value)
    assert {"g_adv_ab", "g_adv_ba", "cycle_a", "cycle_b", "identity_a", "identity_b", "content_a", "content_b",
            "d_a_loss", "d_b_loss"} <= set(out["losses"])
    assert 0 < out["losses"]["cycle_a"] < 0.1  # residual generators start as the identity: small cycle error
    # frequency separation (the default): the discriminators see the high-pass, which a flat image does not have
    flat = torch.full((1, 1, 32, 32), 0.4)
    assert trainer.lowpass is not None and float(trainer.discriminator_view(flat)[..., 8:-8, 8:-8].abs().max()) < 1e-4
    assert float(trainer.discriminator_view(out["B"]).abs().mean()) > 0
    for k, n in nets.items():
        assert _changed(before[k], n) == 1.0, f"{k}: some weights did not move"
    # A (low-dose simulated lung1) and B (clean CT of other patients) are unpaired: different images
    assert not torch.equal(out["image"], out["B"])


# ----------------------------------------------------------------------------------------------- CLI
def _paths(tmp_path: Path, datalist: Path) -> dict[str, str]:
    return {"dataset_dir": expr(datalist.parent), "output_dir": expr(tmp_path / "out"),
            "ckpt_dir": expr(tmp_path / "models")}


def _train_cli(bundle: str, datalist: Path, tmp_path: Path, overrides: dict):
    """Train ``bundle`` through the CLI on the tiny data; returns (env, output paths, models folder)."""
    env = bundle_env(tmp_path)
    paths = _paths(tmp_path, datalist)
    proc = run(bundle_cmd("run", bundle, ["train"], **paths, **overrides), env)
    assert proc.returncode == 0, tail(proc.stdout)
    return env, paths, tmp_path / "models"


def _check_sidecar_and_geometry(src: Path, out: Path, scale: int) -> None:
    import nibabel as nib

    a, b = nib.load(str(src)), nib.load(str(out))
    assert b.shape == (a.shape[0] * scale, a.shape[1] * scale, a.shape[2])
    assert b.get_data_dtype() == a.get_data_dtype()
    np.testing.assert_allclose(b.header.get_zooms()[:3], np.array(a.header.get_zooms()[:3]) / [scale, scale, 1],
                               rtol=1e-5)
    assert nib.aff2axcodes(b.affine) == nib.aff2axcodes(a.affine)
    np.testing.assert_allclose(b.affine[:3, 3], a.affine[:3, 3])  # same origin (corner grid)
    side = json.loads(out.with_name(out.name.replace(".nii.gz", ".json")).read_text())
    assert side["scale"] == scale and len(side["checkpoint_sha256"]) == 64


@pytest.mark.slow
def test_srgan_bundle_train_evaluate_infer(tiny_datalist, tmp_path):
    env, paths, models = _train_cli("srgan", tiny_datalist, tmp_path, SRGAN_TINY)
    assert (models / "srresnet.pt").is_file() and (models / "model.pt").is_file()
    # the SRResNet phase and the adversarial phase left different generators
    sr_state, gan_state = load_state(models / "srresnet.pt"), load_state(models / "model.pt")
    assert any(not torch.equal(sr_state[k], gan_state[k]) for k in sr_state if k != "physics_record")
    assert torch.equal(sr_state["physics_record"], gan_state["physics_record"])  # both record the bundle's physics

    (r,) = runs_of(env["MLFLOW_TRACKING_URI"], "srgan")
    assert r.info.status == "FINISHED"
    p = r.data.params
    assert (p["scale"], p["pretrain_epochs"], p["max_epochs"], p["adversarial_loss"]) == ("4", "1", "2", "bce")
    assert p["feature_network"].startswith("discriminator")  # no perceptual weights given: nothing downloaded
    assert p["seed"] == "0" and "medsr.git_commit" in r.data.tags
    client = mlflow_client(env["MLFLOW_TRACKING_URI"])
    epoch_length = int(p["epoch_length"])
    hist = {k: client.get_metric_history(r.info.run_id, k) for k in ("g_pixel", "d_loss", "d_real", "d_fake",
                                                                     "g_adversarial", "val_sr_psnr", "val_sr_gmsd")}
    assert len(hist["g_pixel"]) == 2 * epoch_length  # every iteration of both phases
    for k in ("d_loss", "d_real", "d_fake", "g_adversarial"):  # adversarial phase only
        assert len(hist[k]) == epoch_length and all(math.isfinite(m.value) for m in hist[k]), k
    # validated before the first step (the untrained generator is the physics baseline) and after each epoch
    assert len(hist["val_sr_psnr"]) == 3 and len(hist["val_sr_gmsd"]) == 3
    arts = artifact_paths(env["MLFLOW_TRACKING_URI"], r.info.run_id)
    assert {"model.pt", "srresnet.pt", "executed_config.json", "grid_latest.png"} <= set(arts), arts

    # evaluation: SRGAN, its own SRResNet, the matched baseline and cubic on the same held-out slices, with sharpness
    proc = run(bundle_cmd("run", "srgan", ["train", "evaluate"], **paths, **SRGAN_TINY), env)
    assert proc.returncode == 0, tail(proc.stdout)
    m = json.loads((tmp_path / "out" / "evaluation" / "metrics.json").read_text())
    for method in ("sr", "srresnet", "baseline", "bicubic"):
        for metric in ("psnr", "ssim", "gmsd", "sharpness"):
            assert math.isfinite(m[f"test_{method}_{metric}"]), (method, metric)
    # the matched baseline (MR: k-space zero-fill) is reported beside cubic, and beats it on MR
    assert m["test_MR_baseline_psnr"] > m["test_MR_bicubic_psnr"] and "test_srresnet_gain_db" in m
    assert m["test_sr_psnr"] != m["test_srresnet_psnr"]

    # whole-volume inference: x4 in-plane, affine and dtype right
    src = tiny_datalist.parent / "nifti" / "lung2.nii.gz"
    proc = run(bundle_cmd("run", "srgan", ["inference"], input=expr(src), output_dir=expr(tmp_path / "inf"),
                          ckpt_path=expr(models / "model.pt")), env)
    assert proc.returncode == 0, tail(proc.stdout)
    _check_sidecar_and_geometry(src, tmp_path / "inf" / "lung2_sr.nii.gz", 4)

    from medsr_monai.transforms import DecimateDownsample

    lr = torch.as_tensor(DecimateDownsample(4)(_real_slice(tiny_datalist, "lung2")), dtype=torch.float32)[None]
    export_matches_eager("srgan", models / "model.pt", lr, tmp_path)


@pytest.mark.slow
def test_cyclegan_bundle_train_evaluate_infer_both_directions(tiny_datalist, tmp_path):
    env, paths, models = _train_cli("cyclegan", tiny_datalist, tmp_path, CYCLEGAN_TINY)
    assert (models / "model.pt").is_file() and (models / "model_BA.pt").is_file()

    (r,) = runs_of(env["MLFLOW_TRACKING_URI"], "cyclegan")
    assert r.info.status == "FINISHED"
    p = r.data.params
    assert (p["cycle_weight"], p["identity_weight"], p["adversarial_loss"], p["lr_schedule"]) == \
        ("0.1", "10.0", "lsgan", "linear_decay")
    assert p["frequency_separation"] == "sigma 1.5 px, content weight 100.0"
    assert p["checkpoint"].startswith("best val_psnr") and (models / "best_metric.json").is_file()
    # unpaired by construction: no patient is in both domains
    a_subjects, b_subjects = set(eval(p["domain_a_subjects"])), set(eval(p["domain_b_subjects"]))
    assert a_subjects == {"lung1"} and b_subjects == {"cq500_ct", "pancreas_ct"}
    client = mlflow_client(env["MLFLOW_TRACKING_URI"])
    epoch_length = int(p["epoch_length"])
    for k in ("g_adv_ab", "g_adv_ba", "cycle_a", "cycle_b", "identity_a", "identity_b", "d_a_loss", "d_b_loss"):
        h = client.get_metric_history(r.info.run_id, k)
        assert len(h) == 2 * epoch_length and all(math.isfinite(x.value) for x in h), k
    assert len(client.get_metric_history(r.info.run_id, "val_lowdose_gain_db")) == 2
    lr_hist = sorted(client.get_metric_history(r.info.run_id, "lr_group_0"), key=lambda x: x.step)
    assert lr_hist[0].value == pytest.approx(1e-4)
    arts = artifact_paths(env["MLFLOW_TRACKING_URI"], r.info.run_id)
    assert {"model.pt", "model_BA.pt", "cycle_latest.png", "grid_latest.png"} <= set(arts), arts

    proc = run(bundle_cmd("run", "cyclegan", ["train", "evaluate"], **paths, **CYCLEGAN_TINY), env)
    assert proc.returncode == 0, tail(proc.stdout)
    m = json.loads((tmp_path / "out" / "evaluation" / "metrics.json").read_text())
    assert math.isfinite(m["test_sr_psnr"]) and math.isfinite(m["test_lowdose_psnr"])
    # the input really is noisy (simulated 25 % dose): below a clean copy and with extra gradient energy
    assert m["test_lowdose_psnr"] < 50 and m["test_lowdose_sharpness"] > 1.05
    rows = (tmp_path / "out" / "evaluation" / "slices.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 6 and all("lung2" in row for row in rows[1:])  # held-out patient, every slice

    src = tiny_datalist.parent / "nifti" / "lung2.nii.gz"
    for direction, weights in (("AB", "model.pt"), ("BA", "model_BA.pt")):
        proc = run(bundle_cmd("run", "cyclegan", ["inference"], input=expr(src), output_dir=expr(tmp_path / "inf"),
                              ckpt_path=expr(models / weights), direction=direction, **CYCLEGAN_NET), env)
        assert proc.returncode == 0, tail(proc.stdout)
        out = tmp_path / "inf" / f"lung2_translated_{direction}.nii.gz"
        _check_sidecar_and_geometry(src, out, 1)
    import nibabel as nib

    ab = np.asarray(nib.load(str(tmp_path / "inf" / "lung2_translated_AB.nii.gz")).dataobj)
    ba = np.asarray(nib.load(str(tmp_path / "inf" / "lung2_translated_BA.nii.gz")).dataobj)
    assert not np.array_equal(ab, ba)  # two different generators
    proc = run(bundle_cmd("run", "cyclegan", ["inference"], input=expr(src), output_dir=expr(tmp_path / "inf"),
                          direction="CA"), env)
    assert proc.returncode != 0 and "direction='CA'" in proc.stdout

    x = _real_slice(tiny_datalist, "lung2")[None]
    export_matches_eager("cyclegan", models / "model.pt", x, tmp_path, **CYCLEGAN_NET)


@pytest.mark.slow
def test_gan_nan_loss_stops_with_message_and_keeps_last_checkpoint(tiny_datalist, tmp_path):
    env = bundle_env(tmp_path)
    # epoch 1 (SRResNet phase) trains the generator only; a huge discriminator learning rate then blows up
    # the discriminator in the adversarial epoch 2
    proc = run(bundle_cmd("run", "srgan", ["train"], **_paths(tmp_path, tiny_datalist),
                          **{**SRGAN_TINY, "max_epochs": 3, "d_learning_rate": 1e30}), env)
    assert proc.returncode != 0
    assert re.search(r"training loss term '\w+' became (nan|inf) at epoch 2", proc.stdout), tail(proc.stdout)
    assert "the last good checkpoint is" in proc.stdout and "checkpoint_epoch=1.pt" in proc.stdout
    ckpt = tmp_path / "out" / "checkpoints" / "checkpoint_epoch=1.pt"
    state = torch.load(str(ckpt), map_location="cpu", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["discriminator"].values() if v.is_floating_point())
    assert (tmp_path / "models" / "srresnet.pt").is_file()  # the pre-trained generator survives
    (r,) = runs_of(env["MLFLOW_TRACKING_URI"], "srgan")
    assert r.info.status == "FAILED" and "became" in r.data.tags["medsr.end_reason"]


@pytest.mark.slow
def test_cyclegan_resumes_after_sigkill(tiny_datalist, tmp_path):
    env = bundle_env(tmp_path)
    cmd = bundle_cmd("run", "cyclegan", ["train"], **_paths(tmp_path, tiny_datalist), **{**CYCLEGAN_TINY,
                                                                                            "max_epochs": 3})
    ckpt_dir = tmp_path / "out" / "checkpoints"
    kill_after_first_checkpoint(cmd, env, ckpt_dir, tmp_path / "first.log")
    ckpts = sorted(ckpt_dir.glob("checkpoint_*.pt"))
    assert ckpts, tail((tmp_path / "first.log").read_text())
    done = int(re.search(r"epoch=(\d+)", ckpts[-1].name).group(1))
    saved = torch.load(str(ckpts[-1]), map_location="cpu", weights_only=True)
    assert {"g_ab", "g_ba", "d_a", "d_b", "pool_a", "pool_b", "g_optimizer", "d_optimizer", "trainer"} <= set(saved)
    assert len(saved["pool_a"]["images"]) > 0  # the fake-image history is part of the checkpoint

    second = run(cmd, env)
    assert second.returncode == 0, tail(second.stdout)
    assert f"resuming from {ckpts[-1]}" in second.stdout
    completed = [int(e) for e in re.findall(r"CycleGANTrainer - INFO - Epoch\[(\d+)\] Complete", second.stdout)]
    assert completed == list(range(done + 1, 4)), completed
    statuses = sorted(r.info.status for r in runs_of(env["MLFLOW_TRACKING_URI"], "cyclegan"))
    assert statuses == ["FINISHED", "KILLED"]


@pytest.mark.slow
def test_cyclegan_trains_on_two_user_folders(tiny_datalist, tmp_path):
    """Any two folders of scans as domains (here MR brain crops as A, CT crops as B): indexed into the run's
    output folder (never into the user's), no simulated degradation, no paired validation."""
    import shutil

    nifti = tiny_datalist.parent / "nifti"
    for name, subjects in (("t_a", ("brain1", "mni152")), ("t_b", ("lung1", "lung2"))):
        (tmp_path / name).mkdir()
        for s in subjects:
            shutil.copy2(nifti / f"{s}.nii.gz", tmp_path / name / f"{s}.nii.gz")
    before = sorted(p.name for p in (tmp_path / "t_a").iterdir())
    env = bundle_env(tmp_path)
    proc = run(bundle_cmd("run", "cyclegan", ["train"], **_paths(tmp_path, tiny_datalist),
                          **{**CYCLEGAN_TINY, "max_epochs": 1, "modality": "MR"},
                          dataset_dir_a=expr(tmp_path / "t_a"), dataset_dir_b=expr(tmp_path / "t_b")), env)
    assert proc.returncode == 0, tail(proc.stdout)
    assert sorted(p.name for p in (tmp_path / "t_a").iterdir()) == before  # the user's folder is untouched
    (r,) = runs_of(env["MLFLOW_TRACKING_URI"], "cyclegan")
    assert set(eval(r.data.params["domain_a_subjects"])) == {"brain1", "mni152"}
    assert set(eval(r.data.params["domain_b_subjects"])) == {"lung1", "lung2"}
    assert r.data.params["task"] == "unpaired translation of two user domains"
    assert not any(k.startswith("val_") for k in r.data.metrics)
    assert (tmp_path / "models" / "model_BA.pt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("bundle, overrides, outputs", [
    ("srgan", {**SRGAN_TINY, "max_epochs": 2}, ("model.pt", "srresnet.pt")),
    ("cyclegan", {**CYCLEGAN_TINY, "max_epochs": 1}, ("model.pt", "model_BA.pt")),
])
def test_gan_multi_gpu_config_with_torchrun_gloo(bundle, overrides, outputs, tiny_datalist, tmp_path):
    """Two processes (gloo on CPU): DDP-wrapped generators and discriminators, rank-0 checkpoints and tracking."""
    from helpers import network_from_config

    cmd = torchrun_cmd(bundle, ["train", "multi_gpu_train"], **_paths(tmp_path, tiny_datalist), **overrides)
    env = bundle_env(tmp_path, OMP_NUM_THREADS="1")
    proc = run(cmd, env, timeout=400)
    assert proc.returncode == 0, tail(proc.stdout, 6000)
    net_overrides = CYCLEGAN_NET if bundle == "cyclegan" else {}
    for name in outputs:  # saved unwrapped (no "module." prefix): they load into the inference network
        network_from_config(bundle, **net_overrides).load_state_dict(load_state(tmp_path / "models" / name))
    runs = runs_of(env["MLFLOW_TRACKING_URI"], bundle)
    assert [r.info.status for r in runs] == ["FINISHED"]  # one run: rank 0 tracks


def test_best_weights_keep_both_generators_of_the_best_validated_epoch(tmp_path):
    """BestWeights writes G_AB and G_BA together when the validation metric improves, never for the untrained
    start (epoch 0), never for a worse or non-finite epoch, and remembers the best across a resume."""
    from types import SimpleNamespace

    from medsr_monai.workflows import BestWeights

    g_ab, g_ba = torch.nn.Conv2d(1, 1, 1), torch.nn.Conv2d(1, 1, 1)
    best = BestWeights({"model.pt": g_ab, "model_BA.pt": g_ba}, str(tmp_path), "val_psnr")
    engine = SimpleNamespace(state=SimpleNamespace(epoch=0, metrics={"val_psnr": 50.0}))

    def validate(epoch: int, psnr: float, weight: float) -> None:
        for net in (g_ab, g_ba):
            torch.nn.init.constant_(net.weight, weight)
        engine.state.epoch, engine.state.metrics = epoch, {"val_psnr": psnr}
        best(engine)

    def saved(name: str) -> float:
        return float(torch.load(tmp_path / name, weights_only=True)["weight"].flatten()[0])

    validate(0, 50.0, 0.0)  # the untrained start is never shipped
    assert not (tmp_path / "model.pt").exists()
    validate(1, 30.0, 1.0)
    validate(2, 33.0, 2.0)
    validate(3, 31.0, 3.0)
    validate(4, float("nan"), 4.0)
    assert saved("model.pt") == saved("model_BA.pt") == 2.0
    assert json.loads((tmp_path / "best_metric.json").read_text()) == {"metric": "val_psnr", "value": 33.0, "epoch": 2}
    resumed = BestWeights({"model.pt": g_ab, "model_BA.pt": g_ba}, str(tmp_path), "val_psnr")
    resumed.attach(SimpleNamespace(add_event_handler=lambda *a: None))
    engine.state.epoch, engine.state.metrics = 5, {"val_psnr": 32.0}
    resumed(engine)
    assert saved("model.pt") == 2.0 and resumed.best == 33.0
