"""ONNX: ``medsr publish`` ships ``models/model.onnx`` verified against the eager model, and ``inference.json`` runs it
with ONNX Runtime (``--backend onnx``).

- every bundle's learned network (and each inference config's weights: unet's two tasks, cyclegan's two
  directions) exports with dynamic batch and in-plane axes and matches the eager float32 model within
  :data:`~medsr_monai.publish.onnx_export.TOLERANCE` on a real slice at two sizes (physics included, in PyTorch);
- the published EDSR archive holds ``models/model.onnx`` and its record (tolerance, differences) in the manifest;
  the collaborator's unpacked bundle infers with ``--backend onnx`` and gets the PyTorch output within tolerance
  (in tests/test_publish.py, on the archive published there once);
- an ONNX file made from other weights is refused, a missing one is named, and a network that does not export
  (the FFT physics itself) is reported, not silently dropped.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from helpers import REPO

pytest.importorskip("onnxruntime")


def _variants():
    from medsr_monai.publish.onnx_export import inference_variants

    out = []
    for b in sorted(p.parent.parent.name for p in (REPO / "bundles").glob("*/configs/inference.json")):
        out += [pytest.param(b, c, o, id=f"{b}-{c}" + "".join(f"-{v}" for v in o.values()))
                for c, o in inference_variants(REPO / "bundles" / b)]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("bundle, config, overrides", _variants())
def test_every_bundle_exports_and_matches_eager(bundle, config, overrides, sample_dir, tmp_path):
    from medsr_monai.publish.onnx_export import TOLERANCE, export_bundle

    torch.set_num_threads(1)
    rec = export_bundle(REPO / "bundles" / bundle, tmp_path / "model.onnx", config, overrides,
                        sample_dir / "nifti" / "brain2.nii.gz")
    assert rec["exported"] and rec["passed"], rec.get("reason")
    assert rec["tolerance"] == TOLERANCE
    diffs = rec["max_abs_diff"]
    assert len(diffs) == 2 and all(isinstance(d, float) and d <= TOLERANCE for d in diffs.values()), diffs
    for inp in rec["inputs"]:
        assert 0 in inp["dynamic_axes"]  # the batch (sw_batch_size windows)
        assert isinstance(inp["shape"][-1], str) and isinstance(inp["shape"][-2], str)  # in-plane axes dynamic
    assert all((tmp_path / f).is_file() for f in rec["files"])


@pytest.mark.slow
def test_onnx_from_other_weights_is_refused_and_a_missing_file_named(sample_dir, tmp_path):
    from medsr_monai.adapt.scan import bundle_network
    from medsr_monai.publish.onnx_export import export_bundle
    from medsr_monai.workflows.onnx_backend import use_onnx

    torch.set_num_threads(1)
    rec = export_bundle(REPO / "bundles" / "srcnn", tmp_path / "model.onnx", sample=sample_dir / "nifti" / "brain2.nii.gz")
    assert rec["exported"]
    net = bundle_network(REPO / "bundles" / "srcnn", device="cpu")
    with pytest.raises(ValueError, match="exported from weights with sha256"):
        use_onnx(net, tmp_path / "model.onnx", checkpoint_sha256="0" * 64)
    with pytest.raises(FileNotFoundError, match="nothere.onnx does not exist"):
        use_onnx(net, tmp_path / "nothere.onnx")


@pytest.mark.slow
def test_a_network_that_does_not_export_is_reported(sample_dir, tmp_path, monkeypatch):
    """The whole physics model (complex FFT k-space zero-fill around the network) does not export: publishing
    records and prints why instead of failing or shipping nothing silently."""
    import medsr_monai.workflows.onnx_backend as backend
    from medsr_monai.publish.onnx_export import export_bundle_variants

    torch.set_num_threads(1)
    monkeypatch.setattr(backend, "learned_parts", lambda model: [("", model)])  # export the physics as well
    bundle = tmp_path / "srcnn"
    shutil.copytree(REPO / "bundles" / "srcnn", bundle, ignore=shutil.ignore_patterns("eval", "overlays"))
    lines = []
    files, record = export_bundle_variants(bundle, sample_dir / "nifti" / "brain2.nii.gz", log=lines.append,
                                           workdir=tmp_path / "onnx")
    assert files == {}
    (variant,) = record["variants"]
    assert variant["exported"] is False and "No ONNX function" in variant["reason"], variant
    assert any(ln.startswith("WARNING: ONNX: inference: NOT EXPORTED") for ln in lines), lines


# The published archive's ONNX model running under onnxruntime after fetch-bundle (backend: onnx) is checked in
# tests/test_publish.py::test_collaborator_unpacks_and_runs_inference, on the archive that file publishes once.
