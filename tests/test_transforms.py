"""Closed-form tests of the degradation transforms (grid convention, exactness, noise statistics)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from medsr_monai.transforms import (
    DecimateDownsample,
    DecimateDownsampled,
    DenormalizeIntensityd,
    GridUpsample,
    GridUpsampled,
    KSpaceDownsample,
    KSpaceDownsampled,
    LowDoseCTNoise,
    LowDoseCTNoised,
    ModalityNormalize,
    ModalityNormalized,
    RandDecimateDownsample,
    RandDecimateDownsampled,
    RandKSpaceDownsample,
    RandKSpaceDownsampled,
    RandLowDoseCTNoise,
    RandLowDoseCTNoised,
    RandRicianNoise,
    RandRicianNoised,
    RicianNoise,
    RicianNoised,
    SelectByKeyd,
    decimate_downsample,
    denormalize,
    kspace_downsample,
    kspace_zerofill,
    normalization_range,
)
from medsr_monai.transforms.noise import pixel_size_from_affine



def band_limited(shape, scale, seed=0, n_terms=5, dtype=torch.float64):
    """(1, *shape) sum of cosines whose integer frequencies satisfy |k| < M/2 (M = N/scale) on every axis."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    x = np.full(shape, 0.3)
    for _ in range(n_terms):
        phase = rng.uniform(0, 2 * np.pi)
        for n, g in zip(shape, grids):
            m = n // scale
            kmax = (m - 1) // 2  # strictly below the LR Nyquist for even and odd M
            phase = phase + 2 * np.pi * rng.integers(-kmax, kmax + 1) * g / n
        x = x + rng.uniform(0.2, 1.0) * np.cos(phase)
    return torch.tensor(x[None], dtype=dtype)


def smooth_image(n=96):
    yy, xx = np.mgrid[:n, :n] / n
    x = np.cos(2 * np.pi * (2 * yy + xx) + 0.3) + 0.5 * np.sin(2 * np.pi * 3 * xx + 1.0) + 0.7 * np.cos(2 * np.pi * yy)
    return torch.tensor(x[None], dtype=torch.float32)


def affine_2d(spacing=(0.8, 0.9), origin=(10.0, -5.0)):
    a = torch.eye(4, dtype=torch.float64)
    a[0, 0], a[1, 1] = spacing
    a[0, 3], a[1, 3] = origin
    return a


# ----------------------------------------------------------------------------------------------------------- k-space
@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("shape", [(48, 60), (24, 36, 12)])
def test_kspace_truncation_exact_on_corner_grid(scale, shape):
    sd = len(shape)
    x = band_limited(shape, scale, seed=scale)
    lr = kspace_downsample(x, scale, spatial_dims=sd)
    samples = x[(slice(None),) + (slice(None, None, scale),) * sd]  # HR voxels s*i
    assert lr.shape == samples.shape
    assert (lr - samples).abs().max() < 1e-5
    assert torch.allclose(lr.mean(), x.mean(), atol=1e-12)
    hr = kspace_zerofill(lr, scale, spatial_dims=sd)
    assert hr.shape == x.shape
    assert (hr - x).abs().max() < 1e-5
    # float32 path and the array transform + zero-fill baseline agree as well
    x32 = x.float()
    lr32 = KSpaceDownsample(scale, spatial_dims=sd)(x32)
    assert lr32.dtype == torch.float32
    assert (lr32 - samples.float()).abs().max() < 1e-5
    up = GridUpsample(scale, mode="zerofill", spatial_dims=sd)(lr32)
    assert (up - x32).abs().max() < 1e-5


def test_kspace_batch_and_numpy_input():
    x = band_limited((32, 32), 2)
    batch = torch.cat([x, 2 * x])[:, None]  # (B, C, H, W)
    lr = kspace_downsample(batch, 2)
    assert lr.shape == (2, 1, 16, 16)
    assert torch.allclose(lr[1], 2 * lr[0])
    out = KSpaceDownsample(2)(x.numpy())
    assert isinstance(out, np.ndarray) and out.shape == (1, 16, 16)
    assert np.abs(out - x.numpy()[:, ::2, ::2]).max() < 1e-5


def test_gibbs_ringing_at_an_edge():
    step = torch.zeros(1, 64, 64)
    step[:, :, 16:48] = 1.0
    lr = KSpaceDownsample(2)(step)
    overshoot = lr.max().item() - 1.0
    undershoot = -lr.min().item()
    assert overshoot > 0.05 and undershoot > 0.05
    # the ringing sits next to the edges, not in the flat interior far from them
    assert (lr[..., 12:20].max() - 1.0) > 0.05 or (lr[..., 6:10] < -0.05).any()
    # decimation with anti-aliasing does not overshoot
    dec = DecimateDownsample(2)(step)
    assert dec.max() <= 1.0 + 1e-6 and dec.min() >= -1e-6


# ----------------------------------------------------------------------------------------------- baselines and grid
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_cubic_upsample_exact_on_corner_grid_and_worse_on_center(scale):
    x = smooth_image(96)
    lr = KSpaceDownsample(scale)(x)
    inner = (slice(None), slice(8, -8), slice(8, -8))
    err_corner = (GridUpsample(scale, mode="cubic", grid="corner")(lr) - x)[inner].abs().max().item()
    err_center = (GridUpsample(scale, mode="cubic", grid="center")(lr) - x)[inner].abs().max().item()
    assert err_corner < 0.01
    assert err_center > 20 * err_corner and err_center > 0.1


def test_decimation_with_cubic_upsample_on_corner_grid():
    x = smooth_image(96)
    lr = decimate_downsample(x, 2, sigma=0.0)
    assert torch.equal(lr, x[:, ::2, ::2])
    up = GridUpsampled("img", 2)({"img": lr})["img"]
    inner = (slice(None), slice(8, -8), slice(8, -8))
    assert (up - x)[inner].abs().max() < 1e-3


def test_decimate_default_blur_preserves_constants_and_uses_sigma():
    x = torch.full((1, 20, 20), 3.0)
    assert torch.allclose(decimate_downsample(x, 2), torch.full((1, 10, 10), 3.0))
    rng = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 64, 64, generator=rng)
    weak, strong = decimate_downsample(noise, 2, sigma=0.5), decimate_downsample(noise, 2, sigma=2.0)
    default = decimate_downsample(noise, 2)  # sigma = 1.0
    assert weak.std() > default.std() > strong.std()


@pytest.mark.parametrize(
    "transform, shape",
    [
        (KSpaceDownsample(2), (1, 32, 48)),
        (DecimateDownsample(4), (1, 32, 48)),
        (KSpaceDownsample(2, spatial_dims=3), (1, 16, 8, 12)),
        (KSpaceDownsample((1, 1, 4), spatial_dims=3), (1, 16, 8, 12)),
    ],
)
def test_shapes_and_affine(transform, shape):
    sd = transform.spatial_dims
    affine = torch.eye(4, dtype=torch.float64)
    affine[:3, :3] = torch.tensor([[0.0, -0.7, 0.0], [0.8, 0.0, 0.0], [0.0, 0.0, 2.5]])  # rotated axes
    affine[:3, 3] = torch.tensor([3.0, -4.0, 5.0])
    img = MetaTensor(torch.rand(shape), affine=affine)
    out = transform(img)
    scales = transform.scale
    assert isinstance(out, MetaTensor)
    assert transform.grid == "corner"
    assert out.shape[1:] == tuple(n // s for n, s in zip(shape[1:], scales))
    first = len(shape) - 1 - sd
    expected = affine.clone()
    for k, s in enumerate(scales):
        expected[:3, first + k] *= s
    assert torch.allclose(out.affine, expected)
    assert torch.allclose(out.affine[:3, 3], affine[:3, 3])  # origin kept (corner)
    # upsampling back on the corner grid restores the HR affine
    up = GridUpsample(scales, mode="zerofill" if isinstance(transform, KSpaceDownsample) else "cubic", spatial_dims=sd)
    back = up(out)
    assert back.shape == img.shape and torch.allclose(back.affine, affine)


def test_center_upsample_affine_shift():
    lr = MetaTensor(torch.rand(1, 8, 8), affine=affine_2d((2.0, 3.0), (10.0, 20.0)))
    up = GridUpsample(2, grid="center")(lr)
    assert up.shape == (1, 16, 16)
    assert torch.allclose(up.affine[[0, 1], [0, 1]], torch.tensor([1.0, 1.5], dtype=torch.float64))
    # HR voxel 0 at LR coordinate -(s-1)/(2s) = -0.25
    assert torch.allclose(up.affine[:2, 3], torch.tensor([10.0 - 0.5, 20.0 - 0.75], dtype=torch.float64))
    with pytest.raises(ValueError, match="zerofill"):
        GridUpsample(2, mode="zerofill", grid="center")


def test_non_divisible_shape_raises_with_shape():
    for t in (KSpaceDownsample(3), DecimateDownsample(2)):
        with pytest.raises(ValueError, match=r"\(31, 32\)"):
            t(torch.rand(1, 31, 32))
    with pytest.raises(ValueError, match="scale"):
        kspace_downsample(torch.rand(1, 30, 32), 4)


def test_dict_forms_and_missing_keys():
    x = torch.rand(1, 16, 16)
    d = KSpaceDownsampled(["a", "b"], 2, allow_missing_keys=True)({"a": x})
    assert d["a"].shape == (1, 8, 8) and "b" not in d
    d = DecimateDownsampled("a", 4)({"a": x, "b": x})
    assert d["a"].shape == (1, 4, 4) and d["b"] is x
    with pytest.raises(KeyError):
        KSpaceDownsampled("b", 2)({"a": x})


# ------------------------------------------------------------------------------------------------------ randomness
def _run(transform, seed, data):
    transform.set_random_state(seed)
    return [transform(data) for _ in range(3)]


def _flat(outs):
    res = []
    for o in outs:
        if isinstance(o, dict):
            res.extend(torch.as_tensor(o[k]).flatten() for k in sorted(o) if k != "modality")
        else:
            res.append(torch.as_tensor(o).flatten())
    return torch.cat([r.float() for r in res])


@pytest.mark.parametrize(
    "factory, data",
    [
        (lambda: RicianNoise(0.1), torch.rand(1, 16, 16)),
        (lambda: RandRicianNoise(prob=1.0, sigma_range=(0.01, 0.2)), torch.rand(1, 16, 16)),
        (lambda: RicianNoised(["a", "b"], 0.1), {"a": torch.rand(1, 8, 8), "b": torch.rand(1, 8, 8)}),
        (lambda: RandRicianNoised("a", prob=1.0), {"a": torch.rand(1, 8, 8)}),
        (lambda: LowDoseCTNoise(0.25), torch.zeros(1, 24, 24)),
        (lambda: RandLowDoseCTNoise(prob=1.0), torch.zeros(1, 24, 24)),
        (lambda: LowDoseCTNoised("a", 0.25), {"a": torch.zeros(1, 24, 24)}),
        (lambda: RandLowDoseCTNoised("a", prob=1.0), {"a": torch.zeros(1, 24, 24)}),
        (lambda: RandKSpaceDownsample(scales=(2, 4), prob=0.7), torch.rand(1, 16, 16)),
        (lambda: RandKSpaceDownsampled("a", scales=(2, 4), prob=0.7), {"a": torch.rand(1, 16, 16)}),
        (lambda: RandDecimateDownsample(2), torch.rand(1, 16, 16)),
        (lambda: RandDecimateDownsampled("a", 2), {"a": torch.rand(1, 16, 16)}),
    ],
)
def test_seeded_random_transforms_repeat(factory, data):
    a = _run(factory(), 1, data)
    b = _run(factory(), 1, data)
    c = _run(factory(), 2, data)
    assert [tuple(torch.as_tensor(o if not isinstance(o, dict) else o["a"]).shape) for o in a] == [
        tuple(torch.as_tensor(o if not isinstance(o, dict) else o["a"]).shape) for o in b
    ]
    fa, fb = _flat(a), _flat(b)
    assert torch.equal(fa, fb)
    # another seed differs (in shapes or values) over three draws
    fc = _flat(c)
    assert fa.shape != fc.shape or not torch.equal(fa, fc)


def test_compose_seed_repeats_pipeline():
    def pipeline():
        return Compose(
            [
                RandKSpaceDownsampled("lr", scales=(2, 4)),
                RandRicianNoised("lr", prob=1.0, sigma_range=(0.01, 0.1)),
            ]
        )

    data = {"lr": torch.rand(1, 32, 32)}
    a = pipeline().set_random_state(7)(data)["lr"]
    b = pipeline().set_random_state(7)(data)["lr"]
    assert torch.equal(a, b)


def test_rand_prob_zero_is_identity():
    x = torch.rand(1, 16, 16)
    assert RandKSpaceDownsample(prob=0.0)(x) is x
    assert RandRicianNoise(prob=0.0)(x) is x
    t = RandDecimateDownsample(4, prob=1.0).set_random_state(0)
    sigmas = []
    for _ in range(20):
        t.randomize()
        sigmas.append(t.sigma)
    assert 1.6 <= min(sigmas) and max(sigmas) <= 2.4 and np.std(sigmas) > 0


# ----------------------------------------------------------------------------------------------------------- noise
def test_rician_on_zero_image_is_rayleigh():
    sigma = 0.1
    t = RicianNoise(sigma, relative=False).set_random_state(0)
    out = t(torch.zeros(1, 256, 256))
    expected = sigma * math.sqrt(math.pi / 2)
    assert abs(out.mean().item() - expected) / expected < 0.02
    assert (out >= 0).all()
    # bright signal: Rician -> approximately Gaussian with std sigma and mean sqrt(A^2 + sigma^2)
    bright = t(torch.full((1, 256, 256), 2.0))
    assert abs(bright.std().item() - sigma) / sigma < 0.05
    assert abs(bright.mean().item() - math.sqrt(4 + sigma**2)) < 0.005


def test_rician_relative_sigma_and_numpy():
    x = np.full((1, 128, 128), 10.0, dtype=np.float32)
    out = RicianNoise(0.02).set_random_state(0)(x)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert abs(out.std() - 0.2) < 0.02


def water_phantom(n=128, radius=50):
    yy, xx = np.mgrid[:n, :n] - n / 2
    hu = np.full((1, n, n), -1000.0)
    hu[0][yy**2 + xx**2 < radius**2] = 0.0
    return hu, (yy**2 + xx**2 < (0.6 * radius) ** 2)


def test_low_dose_ct_noise_grows_as_dose_falls():
    hu, roi = water_phantom()
    stds, means = {}, {}
    for dose in (0.1, 0.5):
        t = LowDoseCTNoise(dose, pixel_size_mm=1.0).set_random_state(0)
        noise = (t(hu) - hu)[0][roi]
        stds[dose], means[dose] = noise.std(), noise.mean()
    assert stds[0.1] > 1.5 * stds[0.5]
    # variance ~ 1 / dose: ratio of stds ~ sqrt(5)
    assert 1.8 < stds[0.1] / stds[0.5] < 2.8
    for dose in stds:
        assert abs(means[dose]) < 0.2 * stds[dose]  # mean error near 0 in water


def test_low_dose_ct_3d_pixel_size_from_affine():
    hu2d, roi = water_phantom(64, 25)
    affine = torch.diag(torch.tensor([0.5, 0.5, 3.0, 1.0], dtype=torch.float64))
    vol = MetaTensor(torch.tensor(np.stack([hu2d[0]] * 2, -1)[None], dtype=torch.float32), affine=affine)
    out = LowDoseCTNoise(0.25, spatial_dims=3).set_random_state(0)(vol)
    assert isinstance(out, MetaTensor) and out.shape == vol.shape and out.dtype == torch.float32
    diff = (out - vol).as_tensor()
    assert not torch.equal(diff[..., 0], diff[..., 1])  # independent noise per slice
    assert pixel_size_from_affine(vol, spatial_dims=3) == pytest.approx(0.5)
    # non-square slice (circle=False path): noise of the right size, zero-mean in water
    rect = np.full((1, 48, 64), 0.0)
    noise = LowDoseCTNoise(0.25).set_random_state(0)(rect) - rect
    assert noise.shape == rect.shape and 0 < noise.std() and abs(noise.mean()) < 0.2 * noise.std()
    # a uniform air slice stays air plus noise (no ring or offset from the projection round trip)
    air = LowDoseCTNoise(0.25).set_random_state(0)(np.zeros((1, 256, 256)) - 1000.0)
    assert air.shape == (1, 256, 256) and np.isfinite(air).all() and abs(float(np.median(air)) + 1000.0) < 50.0


# ------------------------------------------------------------------------------------------------------- intensity
def test_ct_window_normalisation_and_inverse():
    hu = torch.tensor([[-2000.0, -1000.0, -200.0, 0.0, 600.0, 1000.0, 3000.0]])
    t = ModalityNormalize("CT")
    out = t(hu)
    assert t.last_range == (-1000.0, 1000.0)
    assert torch.allclose(out, torch.tensor([[0.0, 0.0, 0.4, 0.5, 0.8, 1.0, 1.0]]))
    back = denormalize(out, *t.last_range)
    inside = (hu >= -1000) & (hu <= 1000)
    assert torch.allclose(back[inside], hu[inside], atol=1e-4)
    assert not ModalityNormalize("CT", clip=False)(hu).max() <= 1.0


def test_mr_percentile_normalisation():
    rng = np.random.default_rng(0)
    img = rng.gamma(2.0, 100.0, size=(1, 64, 64)).astype(np.float32)
    t = ModalityNormalize("mri")
    out = t(img)
    assert isinstance(out, np.ndarray) and out.min() == 0.0 and out.max() == 1.0
    lo, hi = np.percentile(img, [0.5, 99.5])
    assert np.allclose(t.last_range, (lo, hi))
    assert normalization_range(img, "MR") == pytest.approx((lo, hi))
    inside = (img >= lo) & (img <= hi)
    assert np.allclose(denormalize(out, lo, hi)[inside], img[inside], rtol=1e-5)


def test_modality_normalized_dict_and_denormalize():
    hu = torch.tensor([[-1000.0, 0.0, 1000.0]])
    d = ModalityNormalized("image")({"image": hu, "modality": "Ct"})
    assert d["image"].tolist() == [[0.0, 0.5, 1.0]]
    assert d["image_norm_range"] == [-1000.0, 1000.0] and all(isinstance(v, float) for v in d["image_norm_range"])
    d["pred"] = d["image"].clone()
    d = DenormalizeIntensityd(["image", "pred"], ["image_norm_range", "image_norm_range"])(d)
    assert torch.allclose(d["image"], hu) and torch.allclose(d["pred"], hu)
    # batched ranges after collation: one (lo, hi) per item
    batch = {"pred": torch.full((2, 1, 2, 2), 0.5), "r": [torch.tensor([0.0, -1000.0]), torch.tensor([10.0, 1000.0])]}
    out = DenormalizeIntensityd("pred", "r")(batch)["pred"]
    assert torch.allclose(out[0], torch.full((1, 2, 2), 5.0)) and torch.allclose(out[1], torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="PET"):
        ModalityNormalized("image")({"image": hu, "modality": "PET"})


# -------------------------------------------------------------------------------------------------------- dispatch
def test_select_by_key_dispatches_and_errors():
    mr = torch.rand(1, 16, 16)
    t = SelectByKeyd(
        "modality", {"MR": KSpaceDownsampled("lr", 2), "CT": DecimateDownsampled("lr", 4)}
    )
    assert t({"lr": mr, "modality": "MR"})["lr"].shape == (1, 8, 8)
    assert t({"lr": mr, "modality": "mri"})["lr"].shape == (1, 8, 8)
    assert t({"lr": mr, "modality": "CT"})["lr"].shape == (1, 4, 4)
    with pytest.raises(ValueError, match=r"'US'.*MR.*CT"):
        t({"lr": mr, "modality": "US"})
    with_default = SelectByKeyd("modality", {"MR": KSpaceDownsampled("lr", 2)}, default=lambda d: d)
    assert with_default({"lr": mr, "modality": "US"})["lr"] is mr


def test_select_by_key_forwards_random_state():
    def make():
        return Compose(
            [
                SelectByKeyd(
                    "modality",
                    {
                        "MR": RandRicianNoised("img", prob=1.0, sigma_range=(0.05, 0.1)),
                        "CT": RandLowDoseCTNoised("img", prob=1.0),
                    },
                )
            ]
        )

    data = {"img": torch.rand(1, 16, 16), "modality": "MR"}
    a = make().set_random_state(3)(data)["img"]
    b = make().set_random_state(3)(data)["img"]
    c = make().set_random_state(4)(data)["img"]
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------------------------------------------- real data
def test_real_brain_slice_grid_matters(sample_dir):
    import nibabel as nib

    nii = nib.load(str(sample_dir / "nifti" / "brain1.nii.gz"))
    vol = np.asarray(nii.dataobj, dtype=np.float32)
    k = vol.shape[2] // 2
    sl = MetaTensor(torch.from_numpy(vol[None, :, :, k].copy()), affine=torch.as_tensor(nii.affine))
    hr = ModalityNormalize("MR")(sl)
    assert hr.min() == 0 and hr.max() == 1
    lr = KSpaceDownsample(2)(hr)
    assert lr.shape == (1, vol.shape[0] // 2, vol.shape[1] // 2)
    assert torch.allclose(lr.affine[:3, :2], sl.affine[:3, :2] * 2) and torch.allclose(lr.affine[:, 2:], sl.affine[:, 2:])

    def psnr(up):
        mse = ((up.as_tensor().clamp(0, 1) - hr.as_tensor()) ** 2).mean().item()
        return 10 * math.log10(1.0 / mse)

    p_zf = psnr(GridUpsample(2, mode="zerofill")(lr))
    p_corner = psnr(GridUpsample(2, mode="cubic", grid="corner")(lr))
    p_center = psnr(GridUpsample(2, mode="cubic", grid="center")(lr))
    assert p_zf > p_corner > p_center + 3.0, (p_zf, p_corner, p_center)


@pytest.mark.parametrize("bundle", ["srcnn", "edsr", "srgan"])
def test_training_pairs_are_cut_from_whole_degraded_slices(sample_dir, bundle):
    """The bundle's own training pipeline: each LR patch equals the crop of the whole-slice degradation of the
    (flipped / rotated) slice at the HR offset / scale, while degrading the HR patch alone would differ by more than
    1 % relative RMS for MR k-space truncation (wrap-around at the patch edges)."""
    from monai.bundle import ConfigParser

    from medsr_monai.data import load_datalist, volume_slices

    repo = Path(__file__).resolve().parents[1]
    p = ConfigParser()
    p.read_config(str(repo / "bundles" / bundle / "configs" / "train.json"))
    p["bundle_root"] = str(repo / "bundles" / bundle)
    s, size = int(p["scale"]), int(p["patch_size"])
    items = [it for it in load_datalist(sample_dir, "training") if it["subject"] in ("brain1", "lung1")]
    slices = volume_slices(items, p.get_parsed_content("volume_transforms"), crop_multiple=s,
                           max_slices_per_volume=2, progress=False)
    pre = p.get_parsed_content("train#preprocessing", lazy=False)
    pre.set_random_state(3)
    physics = p.get_parsed_content("physics")
    mismatch = {}
    for item in slices:
        whole = item["label"]
        variants = [torch.rot90(f, k, (1, 2)) for f in (whole, whole.flip(1)) for k in range(4)]
        pairs = pre(item)
        assert len(pairs) == int(p["patches_per_slice"])
        for pair in pairs:
            hr, lr = pair["label"], pair["image"]
            assert hr.shape[1:] == (size, size) and lr.shape[1:] == (size // s, size // s)
            found = None
            for v in variants:
                for y, x in np.argwhere(v[0].numpy() == hr[0, 0, 0].item()):
                    if y % s == 0 and x % s == 0 and torch.equal(v[:, y:y + size, x:x + size], hr):
                        found = (v, y, x)
                        break
                if found:
                    break
            assert found is not None, "HR patch is not a scale-aligned crop of a flipped / rotated slice"
            v, y, x = found
            branch = physics.select(item["modality"])
            whole_lr = branch.A(v[None])[0]
            expected = whole_lr[:, y // s:(y + size) // s, x // s:(x + size) // s]
            torch.testing.assert_close(lr, expected, atol=1e-5, rtol=0)
            patch_lr = branch.A(hr[None])[0]
            rel = (torch.linalg.norm(patch_lr - expected) / torch.linalg.norm(expected)).item()
            mismatch.setdefault(item["modality"], []).append(rel)
    assert np.median(mismatch["MR"]) > 0.01, mismatch  # per-patch k-space truncation is not the scan's physics
