"""The degradation physics: closed-form facts on real slices, independent references, model wrappers, records."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch

from medsr_monai.networks import EDSR, SRCNN, BiConvLSTMSR, PhysicsCascade, PhysicsSR, ResidualUNet
from medsr_monai.physics import (
    CartesianUndersampling,
    Decimation,
    KSpaceTruncation,
    LowDoseCT,
    ModalitySwitch,
    SliceThickness,
    in_plane_sr_physics,
    physics_from_config,
)
from medsr_monai.physics.undersampling import centered_fft2, to_complex

from helpers import REPO


def _normalised(vol: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(vol, [0.5, 99.5])
    return np.clip((vol - lo) / (hi - lo), 0, 1).astype(np.float64)


@pytest.fixture(scope="module")
def brain_slice(sample_dir) -> torch.Tensor:
    """A real T1 slice (brain1), normalised, cropped to 240x240 (divisible by 2, 3, 4), float64, (1, 1, H, W)."""
    vol = np.asarray(nib.load(str(sample_dir / "nifti" / "brain1.nii.gz")).dataobj, dtype=np.float32)
    sl = _normalised(vol[:, :, vol.shape[2] // 2])[:240, :240]
    return torch.from_numpy(sl.copy())[None, None]


@pytest.fixture(scope="module")
def ct_slice(sample_dir) -> torch.Tensor:
    vol = np.asarray(nib.load(str(sample_dir / "nifti" / "lung1.nii.gz")).dataobj, dtype=np.float32)
    sl = np.clip((vol[:, :, vol.shape[2] // 2] + 1000) / 2000, 0, 1)[:480, :480]
    return torch.from_numpy(sl.astype(np.float64).copy())[None, None]


@pytest.fixture(scope="module")
def head_volume(sample_dir) -> torch.Tensor:
    """A near-isotropic real head (MNI152 1 mm), a 24-slice slab, (1, 1, S, H, W) with the slice axis first."""
    vol = np.asarray(nib.load(str(sample_dir / "nifti" / "mni152.nii.gz")).dataobj, dtype=np.float32)
    slab = _normalised(vol)[40:160, 60:180, 60:84]
    return torch.from_numpy(np.moveaxis(slab, 2, 0).copy())[None, None]


# ------------------------------------------------------------------------------------------------ k-space truncation
@pytest.mark.parametrize("s", [2, 3, 4])
def test_kspace_zerofill_is_a_right_inverse_of_truncation(brain_slice, s):
    p = KSpaceTruncation(s)
    y = p.A(brain_slice)
    assert y.shape[-2:] == (240 // s, 240 // s)
    torch.testing.assert_close(p.A(p.baseline(y)), y, atol=1e-10, rtol=0)


@pytest.mark.parametrize("s", [2, 3, 4])
def test_band_limited_image_is_recovered_exactly(brain_slice, s):
    p = KSpaceTruncation(s)
    band_limited = p.baseline(p.A(brain_slice))  # the real slice with everything above the LR band removed
    torch.testing.assert_close(p.baseline(p.A(band_limited)), band_limited, atol=1e-10, rtol=0)
    assert float((band_limited - brain_slice).abs().max()) > 0.05  # the slice itself is not band-limited


def test_kspace_consistency_keeps_the_measured_band_and_is_idempotent(brain_slice):
    p = KSpaceTruncation(2)
    y = p.A(brain_slice)
    x_hat = brain_slice + 0.1 * torch.randn_like(brain_slice, generator=torch.Generator().manual_seed(0))
    dc = p.consistency(x_hat, y)
    torch.testing.assert_close(p.A(dc), y, atol=1e-10, rtol=0)
    torch.testing.assert_close(p.consistency(dc, y), dc, atol=1e-10, rtol=0)
    # only the measured band changed: the rest of x_hat's spectrum is untouched
    torch.testing.assert_close(dc - p.baseline(p.A(dc)), x_hat - p.baseline(p.A(x_hat)), atol=1e-10, rtol=0)
    # and on real data the step moves x_hat towards the truth
    assert float(((dc - brain_slice) ** 2).mean()) < float(((x_hat - brain_slice) ** 2).mean())


# ------------------------------------------------------------------------------------------------ decimation
@pytest.mark.parametrize("s", [2, 3, 4])
def test_decimation_matches_scipy_gaussian_then_stride(ct_slice, s):
    from scipy.ndimage import gaussian_filter

    x = ct_slice[0, 0].numpy()
    # 'mirror' is the d c b | a b c d reflection used here; truncate 4 sigma as here
    ref = gaussian_filter(x, sigma=0.5 * s, mode="mirror", truncate=4.0)[::s, ::s]
    out = Decimation(s).A(ct_slice)[0, 0].numpy()
    np.testing.assert_allclose(out, ref, atol=1e-10)


def _keys_cubic_reference(lr: np.ndarray, s: int, grid: str, axes=(0, 1)) -> np.ndarray:
    """Independent Keys cubic (a=-0.5), per axis, clamped borders, in plain numpy loops over taps."""
    def kernel(d):
        d = abs(d)
        if d <= 1:
            return 1.5 * d**3 - 2.5 * d**2 + 1
        if d < 2:
            return -0.5 * d**3 + 2.5 * d**2 - 4 * d + 2
        return 0.0

    out = lr
    for ax in axes:
        n = out.shape[ax]
        m = n * s
        res = np.zeros(out.shape[:ax] + (m,) + out.shape[ax + 1:])
        for j in range(m):
            u = j / s if grid == "corner" else (j + 0.5) / s - 0.5
            base = math.floor(u)
            acc = 0.0
            for k in range(base - 1, base + 3):
                acc = acc + kernel(u - k) * np.take(out, min(max(k, 0), n - 1), axis=ax)
            idx = [slice(None)] * out.ndim
            idx[ax] = j
            res[tuple(idx)] = acc
        out = res
    return out


@pytest.mark.parametrize("s", [2, 3, 4])
def test_decimation_baseline_is_cubic_on_the_corner_grid(ct_slice, s):
    p = Decimation(s)
    lr = p.A(ct_slice)
    ref = _keys_cubic_reference(lr[0, 0].numpy(), s, "corner")
    np.testing.assert_allclose(p.baseline(lr)[0, 0].numpy(), ref, atol=1e-10)


@pytest.mark.parametrize("s", [2, 3, 4])
def test_centre_grid_cubic_matches_pillow_bicubic(brain_slice, s):
    """Pillow's BICUBIC upsampling is Keys a=-0.5 on pixel centres (the "center" grid); compare away from the
    border, where Pillow renormalises its kernel instead of replicating edge pixels."""
    from PIL import Image

    from medsr_monai.physics import grid_interpolate

    lr = brain_slice[0, 0, ::4, ::4].float().numpy()  # any real LR image
    ours = grid_interpolate(torch.from_numpy(lr)[None, None], s, "cubic", "center")[0, 0].numpy()
    pil = np.asarray(Image.fromarray(lr, mode="F").resize((lr.shape[1] * s, lr.shape[0] * s), Image.BICUBIC))
    inner = (slice(3 * s, -3 * s), slice(3 * s, -3 * s))
    np.testing.assert_allclose(ours[inner], pil[inner], atol=2e-5)


@pytest.mark.parametrize("f", [2, 3, 4])
def test_slice_thickness_baseline_is_cubic_on_the_centre_grid(head_volume, f):
    p = SliceThickness(f, axis=0, spatial_dims=3)
    y = p.A(head_volume)
    ref = _keys_cubic_reference(y[0, 0].numpy(), f, "center", axes=(0,))
    np.testing.assert_allclose(p.baseline(y)[0, 0].numpy(), ref, atol=1e-10)


def test_decimation_back_projection_reduces_the_residual(ct_slice):
    p = Decimation(2)
    y = p.A(ct_slice)
    base = p.baseline(y)
    step = p.consistency(base, y)
    r0 = float((p.A(base) - y).abs().mean())
    r1 = float((p.A(step) - y).abs().mean())
    assert r1 < 0.7 * r0, (r0, r1)  # not a projection: the residual shrinks, it does not vanish
    assert r1 > 0


# ------------------------------------------------------------------------------------------------ slice thickness
@pytest.mark.parametrize("f", [2, 3, 4])
def test_box_thickness_consistency_is_an_exact_projection(head_volume, f):
    p = SliceThickness(f, axis=0, profile="box", spatial_dims=3)
    y = p.A(head_volume)
    assert y.shape[2] == head_volume.shape[2] // f
    torch.testing.assert_close(y[0, 0, 1], head_volume[0, 0, f:2 * f].mean(0), atol=1e-12, rtol=0)
    dc = p.consistency(p.baseline(y), y)
    torch.testing.assert_close(p.A(dc), y, atol=1e-10, rtol=0)
    torch.testing.assert_close(p.consistency(dc, y), dc, atol=1e-10, rtol=0)
    # on a real head, cubic + consistency is closer to the truth than cubic alone
    err = lambda v: float(((v - head_volume) ** 2).mean())  # noqa: E731
    assert err(dc) < err(p.baseline(y))


def test_thickness_grid_and_affines_round_trip():
    p = SliceThickness(3, axis=2, spatial_dims=3)
    hr = np.diag([0.9, 0.9, 1.0, 1.0])
    hr[:3, 3] = [10.0, -5.0, 2.0]
    lr = p.lr_affine(hr)
    # thick slice k is centred on thin position 3k + 1
    np.testing.assert_allclose(lr[:3, 3], [10.0, -5.0, 3.0])
    np.testing.assert_allclose(np.diag(lr)[:3], [0.9, 0.9, 3.0])
    np.testing.assert_allclose(p.hr_affine(lr), hr)
    k = KSpaceTruncation(2)
    np.testing.assert_allclose(k.lr_affine(hr, axes=[0, 1])[:3, 3], hr[:3, 3])  # corner grid keeps the origin
    np.testing.assert_allclose(k.hr_affine(k.lr_affine(hr, axes=[0, 1]), axes=[0, 1]), hr)


# ------------------------------------------------------------------------------------------------ undersampling
def test_undersampling_consistency_keeps_sampled_lines_and_is_idempotent(brain_slice):
    p = CartesianUndersampling("equispaced", 4, 0.08, seed=42)
    x = brain_slice.float()
    y = p.A(x)
    mask = p.last_mask.bool()
    assert 0.2 < float(mask.float().mean()) < 0.35  # about 1/R of the lines
    k_y = centered_fft2(to_complex(y))
    assert float(k_y[..., ~mask].abs().max()) < 1e-4 * float(k_y.abs().max())  # unsampled lines are empty
    torch.testing.assert_close(p.sampled_lines(y)[0, 0, 0], mask)  # read back from the measurement alone
    # the zero-filled magnitude is the baseline, and the measurement is exactly consistent with itself
    torch.testing.assert_close(p.baseline(y), to_complex(y).abs())
    torch.testing.assert_close(p.consistency(y, y), y, atol=1e-5, rtol=0)
    x_hat = x + 0.05 * torch.randn_like(x, generator=torch.Generator().manual_seed(1))
    dc = p.consistency(x_hat, y)
    k_dc = centered_fft2(to_complex(dc))
    torch.testing.assert_close(k_dc[..., mask], k_y[..., mask], atol=1e-4, rtol=0)
    torch.testing.assert_close(k_dc[..., ~mask], centered_fft2(x_hat.to(torch.complex64))[..., ~mask], atol=1e-4,
                               rtol=0)
    torch.testing.assert_close(p.consistency(dc, y), dc, atol=1e-5, rtol=0)


def test_random_masks_differ_and_repeat_with_the_seed(brain_slice):
    a = CartesianUndersampling("random", 4, 0.08, random=True).set_random_state(3)
    b = CartesianUndersampling("random", 4, 0.08, random=True).set_random_state(3)
    masks_a = [a.mask(240) for _ in range(3)]
    masks_b = [b.mask(240) for _ in range(3)]
    assert all(torch.equal(u, v) for u, v in zip(masks_a, masks_b))
    assert not torch.equal(masks_a[0], masks_a[1])


# ------------------------------------------------------------------------------------------------ low-dose CT
def test_low_dose_noise_level_on_a_water_disk_matches_the_documented_level():
    """Documented (transforms.noise.LowDoseCTNoise): a 200 mm water disk on a 256^2 grid of 0.8 mm pixels gets a
    noise std of about 92 HU within 90 mm of the centre at dose fraction 0.25 with 1e5 incident photons (+-20 %),
    and the std scales like 1/sqrt(dose)."""
    n, px = 256, 0.8
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    disk = np.where(np.hypot(yy, xx) * px <= 100.0, 0.0, -1000.0).astype(np.float32)
    p = LowDoseCT(0.25, incident_photons=1e5, pixel_size_mm=px, seed=0)
    noisy = np.asarray(p.A(torch.from_numpy(disk)[None]))[0]
    centre = np.hypot(yy, xx) * px <= 90.0
    std = float((noisy - disk)[centre].std())
    assert 92.0 * 0.8 <= std <= 92.0 * 1.2, std
    assert abs(float((noisy - disk)[centre].mean())) < 5.0
    full = LowDoseCT(1.0, incident_photons=1e5, pixel_size_mm=px, seed=1).A(torch.from_numpy(disk)[None])
    std_full = float((np.asarray(full)[0] - disk)[centre].std())
    assert 1.7 < std / std_full < 2.3  # sqrt(1 / 0.25) = 2
    torch.testing.assert_close(p.baseline(torch.from_numpy(noisy)), torch.from_numpy(noisy))  # the input itself


# ------------------------------------------------------------------------------------------------ models
def test_untrained_models_return_the_physics_baseline(brain_slice, ct_slice, head_volume):
    torch.manual_seed(0)
    phys = in_plane_sr_physics(2)
    mr = KSpaceTruncation(2).A(brain_slice[..., :96, :96]).float()
    ct = Decimation(2).A(ct_slice[..., :96, :96]).float()
    batch = torch.cat([mr, ct])
    for net, pre in ((EDSR(scale=2, num_blocks=2, features=16), False), (SRCNN(config="9-1-5"), True)):
        model = PhysicsSR(net, phys, pre_upsample=pre)
        out = model(batch, modality=["MR", "CT"])
        torch.testing.assert_close(out[0:1], KSpaceTruncation(2).baseline(mr), atol=1e-5, rtol=0)
        torch.testing.assert_close(out[1:2], Decimation(2).baseline(ct), atol=1e-5, rtol=0)
    thick = SliceThickness(2, axis=0, spatial_dims=3, dc=True)
    y = thick.A(head_volume[..., :32, :32]).float()
    lstm = PhysicsSR(BiConvLSTMSR(2, 1, 2, features=8, hidden_channels=8, residual=False), thick)
    torch.testing.assert_close(lstm(y), thick.consistency(thick.baseline(y), y), atol=1e-5, rtol=0)
    us = CartesianUndersampling("equispaced", 4, 0.08, seed=0)
    y = us.A(brain_slice[..., :64, :64].float())
    cascade = PhysicsCascade(ResidualUNet(2, 2, 2, channels=(8, 16), residual=False), us, cascades=3)
    torch.testing.assert_close(cascade(y), us.baseline(y), atol=1e-5, rtol=0)


def test_a_switch_needs_the_modality_and_names_unknown_ones():
    phys = in_plane_sr_physics(2)
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="modality"):
        phys.A(x)
    with pytest.raises(ValueError, match="'PET'.*CT.*MR"):
        phys.A(x, modality=["MR", "PET"])
    with pytest.raises(ValueError, match="same scale"):
        ModalitySwitch({"MR": KSpaceTruncation(2), "CT": Decimation(4)})


def test_a_checkpoint_of_another_physics_is_refused_by_name(tmp_path):
    from medsr_monai.workflows import load_weights

    x4 = PhysicsSR(SRCNN(config="9-1-5"), in_plane_sr_physics(4), pre_upsample=True)
    ckpt = tmp_path / "srcnn_x4.pt"
    torch.save(x4.state_dict(), ckpt)
    x2 = PhysicsSR(SRCNN(config="9-1-5"), in_plane_sr_physics(2), pre_upsample=True)
    with pytest.raises(ValueError) as err:
        load_weights(x2, ckpt, what="checkpoint")
    msg = str(err.value)
    assert str(ckpt) in msg and "scale=[4, 4]" in msg and "scale=[2, 2]" in msg
    # the same physics with the consistency step switched off at use is the same model: accepted
    x4_no_dc = PhysicsSR(SRCNN(config="9-1-5"), in_plane_sr_physics(4, mr_dc=False), pre_upsample=True)
    load_weights(x4_no_dc, ckpt)
    # another network class is refused too
    other = PhysicsSR(EDSR(scale=4, num_blocks=1, features=8), in_plane_sr_physics(4))
    with pytest.raises(ValueError, match="SRCNN"):
        other.load_state_dict({**other.state_dict(), "physics_record": x4.state_dict()["physics_record"]})


def test_weights_without_a_physics_record_load_with_a_warning(tmp_path):
    from medsr_monai.workflows import load_weights

    model = PhysicsSR(SRCNN(config="9-1-5"), in_plane_sr_physics(2), pre_upsample=True)
    old = {k: v for k, v in model.state_dict().items() if k != "physics_record"}
    torch.save(old, tmp_path / "old.pt")
    with pytest.warns(UserWarning, match="records no physics"):
        load_weights(model, tmp_path / "old.pt")


# ------------------------------------------------------------------------------------------------ records
@pytest.mark.parametrize("bundle", ["srcnn", "edsr", "srgan", "seqsr_lstm", "unet"])
def test_every_bundle_declares_one_physics_that_round_trips_through_config(bundle):
    from monai.bundle import ConfigParser

    seen = {}
    for name in ("train", "inference"):
        parser = ConfigParser()
        parser.read_config(str(REPO / "bundles" / bundle / "configs" / f"{name}.json"))
        parser["bundle_root"] = str(REPO / "bundles" / bundle)
        phys = parser.get_parsed_content("physics")
        cfg = json.loads(json.dumps(phys.config()))  # plain JSON
        assert physics_from_config(cfg) == phys
        net = parser.get_parsed_content("network_def")
        assert net.physics == phys  # the model uses the bundle's one physics entry
        seen[name] = cfg
    assert seen["train"] == seen["inference"], bundle


def test_physics_transforms_write_the_grid_into_the_affine(sample_dir):
    from monai.data import MetaTensor

    from medsr_monai.transforms import PhysicsBaselined, PhysicsDegraded

    nii = nib.load(str(sample_dir / "nifti" / "brain1.nii.gz"))
    sl = np.asarray(nii.dataobj, dtype=np.float32)[None, :240, :240, 10]
    img = MetaTensor(torch.from_numpy(sl.copy()), affine=torch.as_tensor(nii.affine))
    d = PhysicsDegraded("image", in_plane_sr_physics(2))({"image": img, "modality": "MR"})
    np.testing.assert_allclose(np.asarray(d["image"].affine)[:3, :2], nii.affine[:3, :2] * 2)
    np.testing.assert_allclose(np.asarray(d["image"].affine)[:3, 3], nii.affine[:3, 3])
    d = PhysicsBaselined("image", in_plane_sr_physics(2))(d)
    np.testing.assert_allclose(np.asarray(d["baseline"].affine), nii.affine, atol=1e-6)
    assert d["baseline"].shape == (1, 240, 240)


def test_composition_applies_the_forward_models_in_order_and_inverts_in_reverse(head_volume):
    """deepinv-style composition: a thick-slice scan that is also k-space truncated in-plane."""
    thick = SliceThickness(2, axis=0, spatial_dims=3)
    trunc = KSpaceTruncation([1, 2, 2], spatial_dims=3)
    both = trunc * thick  # thick first, then truncation
    x = head_volume[..., :48, :48]
    y = both.A(x)
    torch.testing.assert_close(y, trunc.A(thick.A(x)))
    assert y.shape == (1, 1, 12, 24, 24) and both.scale == (2, 2, 2)
    torch.testing.assert_close(both.baseline(y), thick.baseline(trunc.baseline(y)))
    assert physics_from_config(both.config()).A(x).allclose(y)
    # LR voxel 0 sits at thin slice 0.5 (centre grid along the slices), at voxel 0 in-plane (corner grid)
    assert both.origin_shift() == (0.5, 0.0, 0.0)


@pytest.mark.slow
def test_inference_slice_axis_override_and_physics_in_the_sidecar(tiny_datalist, tmp_path):
    """``slice_axis`` overrides the coarsest-spacing guess (thin-slice volumes with coarse in-plane spacing); the
    output sidecar records the physics; the output affine comes from the physics (corner grid: origin kept)."""
    from medsr_monai.workflows import VolumeSuperResolver

    src = tiny_datalist.parent / "nifti" / "brain2.nii.gz"
    img = nib.load(str(src))
    assert int(np.argmax(img.header.get_zooms()[:3])) == 2  # the guess would slice along axis 2
    net = PhysicsSR(SRCNN(config="9-1-5"), in_plane_sr_physics(2), pre_upsample=True)
    out = VolumeSuperResolver(net, 2, str(src), str(tmp_path), slice_axis=0, progress=False).run()[0]
    res = nib.load(str(out))
    assert res.shape == (img.shape[0], 2 * img.shape[1], 2 * img.shape[2])
    np.testing.assert_allclose(res.affine[:3, 3], img.affine[:3, 3], atol=1e-6)
    np.testing.assert_allclose(res.affine[:3, 1:3], img.affine[:3, 1:3] / 2, atol=1e-6)
    side = json.loads(out.with_name(out.name.replace(".nii.gz", ".json")).read_text())
    assert side["slice_axis"] == 0 and physics_from_config(side["physics"]) == in_plane_sr_physics(2)
    with pytest.raises(ValueError, match="slice_axis"):
        VolumeSuperResolver(net, 2, str(src), str(tmp_path), slice_axis=3)
    with pytest.raises(ValueError, match="scale"):
        VolumeSuperResolver(net, 4, str(src), str(tmp_path))  # the network's physics is x2
