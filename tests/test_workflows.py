"""Workflow pieces on real scans: the evaluation metrics against scikit-image, and whole-volume inference
(NIfTI in, NIfTI out) with the trained tiny models and with a closed-form interpolation model."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from helpers import (
    BUNDLES,
    bundle_cmd,
    corner_cubic,
    kspace_zerofill_np,
    crop_nifti,
    expr,
    network_from_config,
    run,
    sha256,
    tail,
)
from medsr_monai.transforms import DecimateDownsample, GridUpsample, KSpaceDownsample, ModalityNormalize
from medsr_monai.workflows import SRMetricsHandler, VolumeSuperResolver, sr_affine


# ----------------------------------------------------------------------------------------------- metrics
def _slice_item(sample_dir, subject, modality, k):
    vol = nib.load(str(sample_dir / "nifti" / f"{subject}.nii.gz")).get_fdata(dtype=np.float32)
    hr = ModalityNormalize(modality)(torch.as_tensor(vol))[None, :, :, k]  # (1, H, W) in [0, 1]
    hr = hr[:, : hr.shape[1] // 2 * 2, : hr.shape[2] // 2 * 2]
    lr = (KSpaceDownsample(2) if modality == "MR" else DecimateDownsample(2))(hr)
    item = {"label": hr, "image": lr, "bicubic": GridUpsample(2, "cubic", "corner")(lr),
            "pred": GridUpsample(2, "linear", "corner")(lr),  # a stand-in prediction, different from both
            "modality": modality, "subject": subject, "slice_index": k}
    if modality == "MR":
        item["zerofill"] = GridUpsample(2, "zerofill", "corner")(lr)
    return item


def _skimage(img, ref):
    x = np.clip(np.asarray(img, dtype=np.float64)[0], 0, 1)
    y = np.asarray(ref, dtype=np.float64)[0]
    psnr = peak_signal_noise_ratio(y, x, data_range=1)
    # MONAI's SSIM: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, population covariance, mean over the
    # valid (unpadded) region; scikit-image with these arguments uses the same window (truncate 3.5 -> 11 taps)
    # and crops the same border. (scikit-image's default 7x7 uniform window gives different numbers.)
    ssim = structural_similarity(y, x, data_range=1, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False)
    return psnr, ssim


def test_sr_metrics_handler_matches_scikit_image(sample_dir):
    items = [_slice_item(sample_dir, "brain1", "MR", 12), _slice_item(sample_dir, "lung1", "CT", 24)]
    handler = SRMetricsHandler(baseline_keys=("bicubic", "zerofill"), prefix="test_")
    engine = Engine(lambda e, b: None)
    handler.reset(engine)
    engine.state.batch = [{k: v for k, v in it.items() if k != "pred"} for it in items]  # decollated, as MONAI
    engine.state.output = [{"pred": it["pred"], "label": it["label"]} for it in items]
    handler.iteration_completed(engine)
    handler.epoch_completed(engine)

    records = engine.state.sr_records
    assert len(records) == 2 + 2 + 1  # sr and bicubic for both, zerofill for MR only
    by_key = {(r["subject"], r["method"]): r for r in records}
    expected = {}
    for it in items:
        for method, key in (("sr", "pred"), ("bicubic", "bicubic"), ("zerofill", "zerofill")):
            if key not in it:
                continue
            psnr, ssim = _skimage(it[key], it["label"])
            rec = by_key[(it["subject"], method)]
            assert rec["psnr"] == pytest.approx(psnr, abs=1e-3), (it["subject"], method)
            assert rec["ssim"] == pytest.approx(ssim, abs=1e-4), (it["subject"], method)
            expected.setdefault(method, []).append(psnr)
    m = engine.state.metrics
    for method, values in expected.items():
        assert m[f"test_{method}_psnr"] == pytest.approx(np.mean(values), abs=1e-3)
    assert m["test_MR_zerofill_psnr"] == pytest.approx(expected["zerofill"][0], abs=1e-3)
    # real numbers, not degenerate ones: on the corner grid cubic beats linear, and for k-space truncation
    # zero-filling beats cubic
    assert m["test_bicubic_psnr"] > m["test_sr_psnr"]
    assert m["test_MR_zerofill_psnr"] > m["test_MR_bicubic_psnr"]


# ----------------------------------------------------------------------------------------------- inference
@pytest.fixture(scope="module")
def inference_inputs(sample_dir, tmp_path_factory):
    """Real CT (int16, HU) and MR (float32) volumes, cropped to keep inference fast, in one folder."""
    folder = tmp_path_factory.mktemp("inference_inputs")
    crop_nifti(sample_dir / "nifti" / "lung2.nii.gz", folder / "lung2.nii.gz", (64, 64, 4))
    crop_nifti(sample_dir / "nifti" / "brain2.nii.gz", folder / "brain2.nii.gz", (64, 64, 4))
    return folder


def _check_overlay(src, out, scale=2, slice_axis=2):
    a, b = nib.load(str(src)), nib.load(str(out))
    expect_shape = [n * (1 if ax == slice_axis else scale) for ax, n in enumerate(a.shape)]
    assert list(b.shape) == expect_shape
    za, zb = np.asarray(a.header.get_zooms()[:3]), np.asarray(b.header.get_zooms()[:3])
    expect_zooms = [z if ax == slice_axis else z / scale for ax, z in enumerate(za)]
    np.testing.assert_allclose(zb, expect_zooms, rtol=1e-5)
    np.testing.assert_allclose(b.affine[:3, 3], a.affine[:3, 3], atol=1e-4)  # corner grid: same origin
    assert nib.aff2axcodes(b.affine) == nib.aff2axcodes(a.affine)
    np.testing.assert_allclose(b.affine, sr_affine(a.affine, scale, slice_axis), atol=1e-4)
    return a, b


@pytest.mark.slow
@pytest.mark.parametrize("bundle", BUNDLES)
def test_inference_cli_round_trip(bundle, trained_bundle, inference_inputs, tmp_path):
    tb = trained_bundle(bundle)
    tb.check()
    out_dir = tmp_path / "sr"
    # roi_size = the slice size: one window per slice, no padding (keeps EDSR fast on two cores)
    proc = run(bundle_cmd("run", bundle, ["inference"], input=expr(inference_inputs), ckpt_path=expr(tb.model),
                          output_dir=expr(out_dir), roi_size=[64, 64]), tb.env)
    assert proc.returncode == 0, tail(proc.stdout)

    for subject, modality in (("lung2", "CT"), ("brain2", "MR")):
        a, b = _check_overlay(inference_inputs / f"{subject}.nii.gz", out_dir / f"{subject}_sr.nii.gz")
        x, y = np.asarray(a.dataobj, dtype=np.float64), np.asarray(b.dataobj, dtype=np.float64)
        span = x.max() - x.min()
        if modality == "CT":  # back in HU, in the input's voxel type
            assert b.get_data_dtype() == np.int16
            assert -1100 < y.min() < -900, y.min()  # air stays air, not 0..1
            assert y.max() > 100
        else:
            assert b.get_data_dtype() == np.float32
        assert x.min() - 0.15 * span <= y.min() and y.max() <= x.max() + 0.15 * span, (y.min(), y.max())
        # corner grid: output voxel (2i, 2j) overlays input voxel (i, j); a 1-epoch residual model stays close
        assert np.median(np.abs(y[::2, ::2] - x)) < 0.02 * span

        side = json.loads((out_dir / f"{subject}_sr.json").read_text())
        assert side["checkpoint_sha256"] == sha256(tb.model)
        assert side["scale"] == 2 and side["grid"] == "corner" and side["slice_axis"] == 2
        assert side["modality"] == modality and side["bundle"] == bundle
        assert side["output_shape"] == list(b.shape)


def _transposed(src, dest):
    """The same real scan stored with the thick-slice axis first: (z, x, y), affine columns permuted."""
    from medsr_monai.data import write_nifti

    img = nib.load(str(src))
    aff = img.affine.copy()
    aff[:, :3] = img.affine[:, [2, 0, 1]]
    return write_nifti(dest, np.transpose(np.asanyarray(img.dataobj), (2, 0, 1)), aff)


@pytest.mark.parametrize("bundle", BUNDLES)
@pytest.mark.slow
def test_volume_superresolver_untrained_model_is_the_physics_baseline(bundle, inference_inputs, tmp_path):
    """An untrained PhysicsSR (zero-initialised last layer) returns its physics baseline exactly, so the whole
    volume pipeline (normalise, SliceInferer, denormalise, write) must give, in the input's own units and along the
    in-plane axes only, corner-grid Keys cubic interpolation for CT (decimation) and k-space zero-filling for MR
    (k-space truncation; its consistency step leaves a zero-filled image unchanged), both computed independently
    here. The 64x64 slices are smaller than the default roi_size (128), so this also covers the padding of small
    slices (edge replicated)."""
    brain_t = _transposed(inference_inputs / "brain2.nii.gz", tmp_path / "brain2_zxy.nii.gz")
    cases = [(inference_inputs / "lung2.nii.gz", 2), (inference_inputs / "brain2.nii.gz", 2), (brain_t, 0)]
    net = network_from_config(bundle)
    out_dir = tmp_path / "out"
    written = VolumeSuperResolver(net, 2, [str(c) for c, _ in cases], str(out_dir), progress=False).run()
    assert [w.name for w in written] == ["lung2_sr.nii.gz", "brain2_sr.nii.gz", "brain2_zxy_sr.nii.gz"]

    for (src, axis), out in zip(cases, written):
        a, b = _check_overlay(src, out, slice_axis=axis)
        x = np.asarray(a.dataobj, dtype=np.float64)
        in_plane = [ax for ax in range(3) if ax != axis]
        upsample = corner_cubic if src.name.startswith("lung") else kspace_zerofill_np
        expected = upsample(upsample(x, in_plane[0], 2), in_plane[1], 2)
        y = np.asarray(b.dataobj, dtype=np.float64)
        if a.get_data_dtype() == np.int16:
            assert b.get_data_dtype() == np.int16
            assert np.abs(y - expected).max() <= 1.0  # rounded to whole HU
        else:
            np.testing.assert_allclose(y, expected, atol=1e-5 * (x.max() - x.min()) + 1e-4)
        side = json.loads(out.with_name(out.name.replace(".nii.gz", ".json")).read_text())
        assert side["slice_axis"] == axis and side["checkpoint_sha256"] is None


@pytest.mark.slow
def test_sliding_windows_smaller_than_the_slice_leave_no_seams(inference_inputs, tmp_path):
    """Windows of 24x24 LR pixels over 64x64 slices: the physics baseline is taken on whole slices and only the
    residual is blended, so a zero-residual model still returns exact whole-slice k-space zero-filling for this
    MR volume (no seams)."""
    src = inference_inputs / "brain2.nii.gz"
    net = network_from_config("edsr")
    out = VolumeSuperResolver(net, 2, str(src), str(tmp_path), roi_size=(24, 24), sw_batch_size=3, overlap=0.25,
                              progress=False).run()[0]
    a, b = _check_overlay(src, out, slice_axis=2)
    x = np.asarray(a.dataobj, dtype=np.float64)
    expected = kspace_zerofill_np(kspace_zerofill_np(x, 0, 2), 1, 2)
    np.testing.assert_allclose(np.asarray(b.dataobj, dtype=np.float64), expected,
                               atol=1e-5 * (x.max() - x.min()) + 1e-4)


@pytest.mark.slow
def test_inference_reads_a_dicom_series(tmp_path):
    """A real CT DICOM series folder (pydicom test data) goes in; a NIfTI in HU with the SR affine comes out."""
    pdd = pytest.importorskip("pydicom.data")
    from pathlib import Path

    from medsr_monai.data import load_volume

    series = Path(pdd.__file__).parent / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
    if not series.is_dir():
        pytest.skip(f"pydicom test series not installed at {series}")
    data, affine, meta = load_volume(series)
    net = network_from_config("srcnn")
    out = VolumeSuperResolver(net, 2, str(series), str(tmp_path), roi_size=(16, 16), progress=False).run()[0]
    assert out.name == "CT5N_sr.nii.gz"
    img = nib.load(str(out))
    axis = int(np.argmax(np.linalg.norm(affine[:3, :3], axis=0)))
    expected_shape = [n * (1 if ax == axis else 2) for ax, n in enumerate(data.shape[:3])]
    assert list(img.shape) == expected_shape
    np.testing.assert_allclose(img.affine, sr_affine(affine, 2, axis), atol=1e-6)
    side = json.loads(out.with_name("CT5N_sr.json").read_text())
    assert side["modality"] == "CT" and side["input_format"] == "dicom"
    y = np.asarray(img.dataobj, dtype=np.float64)
    assert y.min() >= float(data.min()) - 200 and y.max() <= float(data.max()) + 200  # HU, not [0, 1]


def test_cli_boolean_strings_are_parsed(tmp_path):
    """``monai.bundle run ... --resume false`` hands the string 'false' to the config (Python Fire only parses
    ``False``); the flags must read it as false, and refuse anything that is not a boolean, naming the flag."""
    from medsr_monai.networks import BiConvLSTMSR
    from medsr_monai.workflows import ResumeHandler

    (tmp_path / "checkpoint_epoch=1.pt").write_bytes(b"")
    assert ResumeHandler(str(tmp_path), {}, enabled="false").enabled is False
    assert ResumeHandler(str(tmp_path), {}, enabled="True").enabled is True
    with pytest.raises(ValueError, match="resume must be a boolean"):
        ResumeHandler(str(tmp_path), {}, enabled="maybe")
    assert BiConvLSTMSR(features=4, hidden_channels=4, data_consistency="false").data_consistency is False
