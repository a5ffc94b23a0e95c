"""Whole-volume NIfTI inference, the same way for every bundle: a real volume goes through the bundle's own
``inference.json`` with ``python -m monai.bundle run`` and comes back as a NIfTI that nibabel reloads with the
expected shape, spacing, orientation and voxel type, beside a JSON sidecar naming the bundle, its version,
the checkpoint's sha256 and the scale.

The weights are the network's initial weights saved to a file: this test is about geometry and bookkeeping,
not quality, so it needs no training and covers every bundle, including ones added later (a bundle without
an entry in ``ZOOM`` fails :func:`test_every_bundle_is_covered`).
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from helpers import REPO, bundle_cmd, bundle_env, crop_nifti, expr, network_from_config, run, sha256, tail

#: output/input size per axis for an input whose thick (slice) axis is the last one
ZOOM = {
    "srcnn": (2, 2, 1),
    "edsr": (2, 2, 1),
    "srgan": (4, 4, 1),
    "cyclegan": (1, 1, 1),
    "unet": (1, 1, 1),
    "seqsr_lstm": (1, 1, 2),
}
#: how the output grid sits on the input's: "corner" keeps the first voxel's centre (in-plane SR), "center"
#: keeps the field of view (thick slices averaged over their thin slices)
GRID = {"seqsr_lstm": "center"}
#: the inference config that takes these real-valued scans: unet's default task reconstructs from the *complex*
#: zero-filled image (tested with one in tests/test_unet.py), its CT task (its own config) takes real images
INFERENCE = {"unet": "inference_ct_denoise"}


def _bundles() -> list[str]:
    return sorted(p.parent.parent.name for p in (REPO / "bundles").glob("*/configs/inference.json"))


def test_every_bundle_is_covered():
    assert set(_bundles()) == set(ZOOM), "add the new bundle's expected zoom to ZOOM"


@pytest.fixture(scope="module")
def volumes(sample_dir, tmp_path_factory):
    """Real scans with thick last axes, cropped: MR brain (float32, 0.78x0.78x6.5 mm) and chest CT (int16 HU)."""
    folder = tmp_path_factory.mktemp("volumes")
    crop_nifti(sample_dir / "nifti" / "brain2.nii.gz", folder / "brain2.nii.gz", (48, 40, 8))
    crop_nifti(sample_dir / "nifti" / "lung2.nii.gz", folder / "lung2.nii.gz", (40, 48, 8))
    return folder


def _expected_affine(affine: np.ndarray, zoom, grid: str) -> np.ndarray:
    out = np.array(affine, dtype=np.float64)
    out[:3, :3] = affine[:3, :3] / np.asarray(zoom, dtype=np.float64)
    if grid == "center":  # the first output voxel sits (1 - 1/z)/2 input voxels before the first input voxel
        out[:3, 3] = affine[:3, 3] - affine[:3, :3] @ ((1 - 1 / np.asarray(zoom, dtype=np.float64)) / 2)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("bundle", _bundles())
def test_volume_round_trip(bundle, volumes, tmp_path):
    torch.manual_seed(0)
    net = network_from_config(bundle, INFERENCE.get(bundle, "inference"))
    ckpt = tmp_path / "init.pt"
    torch.save(net.state_dict(), ckpt)
    out_dir = tmp_path / "out"
    proc = run(bundle_cmd("run", bundle, [INFERENCE.get(bundle, "inference")], input=expr(volumes),
                          ckpt_path=expr(ckpt), output_dir=expr(out_dir)), bundle_env(tmp_path))
    assert proc.returncode == 0, tail(proc.stdout)
    meta = json.loads((REPO / "bundles" / bundle / "configs" / "metadata.json").read_text())

    outputs = sorted(out_dir.glob("*.nii.gz"))
    assert [o.name.split("_")[0] for o in outputs] == ["brain2", "lung2"], outputs
    zoom, grid = np.asarray(ZOOM[bundle]), GRID.get(bundle, "corner")
    for out in outputs:
        src = volumes / f"{out.name.split('_')[0]}.nii.gz"
        a, b = nib.load(str(src)), nib.load(str(out))  # reloads: a valid NIfTI
        assert b.shape == tuple(int(n) for n in np.asarray(a.shape) * zoom)
        np.testing.assert_allclose(b.header.get_zooms()[:3], np.asarray(a.header.get_zooms()[:3]) / zoom, rtol=1e-5)
        assert nib.aff2axcodes(b.affine) == nib.aff2axcodes(a.affine)
        np.testing.assert_allclose(b.affine, _expected_affine(a.affine, zoom, grid), atol=1e-4)
        np.testing.assert_allclose(b.get_qform(), b.affine, atol=1e-4)  # the viewer's transforms agree
        assert b.get_data_dtype() == a.get_data_dtype()
        y = np.asarray(b.dataobj, dtype=np.float64)
        assert np.isfinite(y).all() and y.std() > 0

        side = json.loads(out.with_name(out.name.replace(".nii.gz", ".json")).read_text())
        assert side["bundle"] == bundle and side["bundle_version"] == meta["version"]
        assert side["checkpoint_sha256"] == sha256(ckpt)
        assert side["output_shape"] == list(b.shape)
        assert side["scale"] == int(zoom.max())
