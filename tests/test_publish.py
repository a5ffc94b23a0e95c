"""``medsr publish`` / ``medsr fetch-bundle`` on a real trained EDSR bundle.

The collaborator's path end to end: publish the bundle (with the provenance of the MLflow run that trained
it), unpack the archive into an empty folder outside the repository, run its ``inference.json`` on a real
NIfTI with ``python -m monai.bundle run`` and get what the original bundle folder produces; load the network
with ``monai.bundle.load``. And the refusals: tampered archives, zip-slip entries, unsafe pickles, wrong
versions, a missing licence, metadata that does not validate, weights without a training run.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from helpers import PYTHON, REPO, bundle_env, crop_nifti, expr, load_state, run, runs_of, sha256, tail

NAME = "edsr"
#: the bundle's current version (its metadata), which the archive is named after
VERSION = json.loads((REPO / "bundles" / NAME / "configs" / "metadata.json").read_text())["version"]


def _copy_bundle(dest: Path, model: Path) -> Path:
    """The repository's EDSR bundle with a trained ``models/model.pt`` (run outputs, the shipped weights and their
    provenance sidecar left out)."""
    shutil.copytree(REPO / "bundles" / NAME, dest,
                    ignore=shutil.ignore_patterns("eval", "*.pt", "*.provenance.json", "__pycache__"))
    (dest / "models").mkdir(exist_ok=True)
    shutil.copy2(model, dest / "models" / "model.pt")
    return dest


def _medsr(*args, env, cwd=REPO):
    return run([PYTHON, "-m", "medsr_monai", *map(str, args)], env, cwd=cwd)


@pytest.fixture(scope="module")
def published(trained_bundle, sample_dir, tmp_path_factory):
    """The trained EDSR bundle published through the real CLI (provenance searched in its MLflow store)."""
    tb = trained_bundle(NAME)
    tb.check()
    root = tmp_path_factory.mktemp("publish")
    src = _copy_bundle(root / "src" / NAME, tb.model)
    scan = crop_nifti(sample_dir / "nifti" / "brain2.nii.gz", root / "scan" / "brain2.nii.gz", (64, 64, 4))
    env = bundle_env(root, MLFLOW_TRACKING_URI=tb.uri)
    dist = root / "dist"
    scratch = root / "tmp"  # publish's own temporary folder (the ONNX export): checked empty afterwards
    scratch.mkdir()
    proc = _medsr("publish", src, "--out", dist, "--sample", scan, env={**env, "TMPDIR": str(scratch)})
    assert proc.returncode == 0, tail(proc.stdout)
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("medsr-")], "publish left its temporary files"
    return {"tb": tb, "root": root, "src": src, "scan": scan, "env": env, "dist": dist, "proc": proc,
            "zip": dist / f"{NAME}_{VERSION}.zip"}


def _manifest(archive: Path) -> dict:
    with zipfile.ZipFile(archive) as zf:
        return json.loads(zf.read(f"{NAME}/manifest.json"))


# ----------------------------------------------------------------------------------------------- publish
def _training_run(tb):
    """The run that trained the fixture's weights: the first of its private store (other tests of the session
    add evaluation and training runs to the same store later)."""
    first = runs_of(tb.uri, NAME)[0]
    assert first.info.status == "FINISHED" and first.data.tags.get("medsr.stage") != "evaluate"
    return first


@pytest.mark.slow
def test_publish_writes_checksums_and_training_provenance(published):
    archive, src, tb = published["zip"], published["src"], published["tb"]
    assert archive.is_file(), published["proc"].stdout
    manifest = _manifest(archive)
    assert manifest["name"] == NAME and manifest["version"] == VERSION
    expected = {p.relative_to(src).as_posix(): sha256(p) for p in src.rglob("*") if p.is_file()}
    # the overlays name shared bases outside the bundle: the archive carries the flat configs they render to
    assert any(f.startswith("overlays/") for f in expected)
    expected = {f: h for f, h in expected.items() if not f.startswith("overlays/")}
    # publish adds the ONNX export of the learned network and its verification record (tests/test_onnx.py)
    onnx = {f for f in manifest["files"] if f.endswith((".onnx", ".onnx.json"))}
    assert onnx == {"models/model.onnx", "models/model.onnx.json"}
    assert {f: h for f, h in manifest["files"].items() if f not in onnx} == expected  # every other file, its sha256
    for required in ("configs/metadata.json", "LICENSE", "models/model.pt", "docs/README.md", "docs/data_license.txt"):
        assert required in manifest["files"]

    trained = _training_run(tb)
    prov = manifest["provenance"]
    assert prov["run_id"] == trained.info.run_id  # found by the sha256 of model.pt among all the store's runs
    assert prov["metrics"]["val_psnr"] == pytest.approx(trained.data.metrics["val_psnr"])
    datalist = tb.dataset_dir / "datalist.json"
    assert prov["data_hash"]["datalist_sha256"] == sha256(datalist)
    assert "TorchScript export matches eager" in published["proc"].stdout


@pytest.mark.slow
def test_publish_refuses_the_same_version_twice(published):
    proc = _medsr("publish", published["src"], "--out", published["dist"], "--sample", published["scan"],
                  env=published["env"])
    assert proc.returncode == 2
    assert "medsr publish: error:" in proc.stdout and f"{VERSION} of edsr is already published" in proc.stdout


def _edit_meta(bundle: Path, edit) -> None:
    path = bundle / "configs" / "metadata.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta, indent=2))


def _remove_ndf(meta):
    del meta["network_data_format"]


def _version_without_changelog(meta):
    meta["version"] = "9.9.0"


def _lower_version(meta):
    meta["version"] = "0.0.9"
    meta["changelog"]["0.0.9"] = "older"


@pytest.mark.parametrize("case, edit, message", [
    ("missing licence", lambda b: (b / "LICENSE").unlink(), "required file(s) missing: LICENSE"),
    ("missing weights", lambda b: (b / "models" / "model.pt").unlink(), "models/model.pt"),
    ("invalid metadata", lambda b: _edit_meta(b, _remove_ndf), "'network_data_format' is a required property"),
    ("version not in changelog", lambda b: _edit_meta(b, _version_without_changelog),
     "version '9.9.0' has no entry in \"changelog\""),
    ("lower version", lambda b: _edit_meta(b, _lower_version), f"0.0.9 is lower than {VERSION}"),
])
@pytest.mark.slow
def test_publish_refuses_a_broken_bundle(published, tmp_path, capsys, monkeypatch, case, edit, message):
    from medsr_monai.cli import main

    bundle = _copy_bundle(tmp_path / NAME, published["tb"].model)
    edit(bundle)
    dist = tmp_path / "dist"
    dist.mkdir()
    shutil.copy2(published["zip"], dist)  # the current version already out
    monkeypatch.setenv("MLFLOW_TRACKING_URI", published["tb"].uri)
    assert main(["publish", str(bundle), "--out", str(dist), "--sample", str(published["scan"])]) == 2
    err = capsys.readouterr().err
    assert "medsr publish: error:" in err and message in err, err
    assert sorted(p.name for p in dist.iterdir()) == [f"{NAME}_{VERSION}.zip"]  # nothing new written


@pytest.mark.slow
def test_publish_without_a_training_run(published, tmp_path, capsys, monkeypatch):
    """Weights no run produced: refused by default; published as "unknown" with a loud warning on request."""
    from medsr_monai.cli import main

    bundle = _copy_bundle(tmp_path / NAME, published["tb"].model)
    state = load_state(bundle / "models" / "model.pt")
    torch.save({k: v + 1e-3 if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                for k, v in state.items()}, bundle / "models" / "model.pt")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", published["tb"].uri)
    args = ["publish", str(bundle), "--out", str(tmp_path / "dist"), "--sample", str(published["scan"])]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no FINISHED training run with this models/model.pt in experiment 'edsr'" in err, err
    assert not (tmp_path / "dist").exists()

    assert main(args + ["--allow-no-provenance"]) == 0
    assert "PUBLISHING WITH PROVENANCE 'unknown'" in capsys.readouterr().err
    assert _manifest(tmp_path / "dist" / f"{NAME}_{VERSION}.zip")["provenance"] == "unknown"


@pytest.mark.slow
def test_publish_with_an_explicit_run_id(published, tmp_path, capsys, monkeypatch):
    from medsr_monai.cli import main

    tb = published["tb"]
    finished = _training_run(tb)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tb.uri)
    args = ["publish", str(published["src"]), "--out", str(tmp_path / "dist"), "--sample", str(published["scan"])]
    assert main(args + ["--run-id", "0123456789abcdef"]) == 2
    assert "--run-id 0123456789abcdef: no such run" in capsys.readouterr().err
    assert main(args + ["--run-id", finished.info.run_id]) == 0
    prov = _manifest(tmp_path / "dist" / f"{NAME}_{VERSION}.zip")["provenance"]
    assert prov["run_id"] == finished.info.run_id and prov["status"] == "FINISHED"


@pytest.mark.slow
def test_publish_from_the_provenance_sidecar_without_a_store(published, tmp_path, capsys, monkeypatch):
    """A fresh clone has the shipped weights and their sidecar but not the store that trained them: publish takes
    the provenance from the sidecar; a sidecar of other weights is refused, naming it."""
    from medsr_monai.cli import main
    from medsr_monai.publish.provenance import find_provenance, sidecar_path, write_sidecar

    tb = published["tb"]
    bundle = _copy_bundle(tmp_path / NAME, tb.model)
    prov = find_provenance(bundle / "models" / "model.pt", "edsr", tb.uri)
    side = write_sidecar(bundle / "models" / "model.pt", prov, {"cpu_minutes": 1.0})
    assert side == sidecar_path(bundle / "models" / "model.pt") == bundle / "models" / "model.provenance.json"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # no project store here
    args = ["publish", str(bundle), "--out", str(tmp_path / "dist"), "--sample", str(published["scan"])]
    assert main(args) == 0
    manifest = _manifest(tmp_path / "dist" / f"{NAME}_{VERSION}.zip")
    assert manifest["provenance"]["run_id"] == _training_run(tb).info.run_id
    assert manifest["provenance"]["weights_sha256"] == sha256(bundle / "models" / "model.pt")
    assert manifest["provenance"]["training"] == {"cpu_minutes": 1.0}
    assert "models/model.provenance.json" in manifest["files"]  # the archive carries it too
    assert "from the sidecar model.provenance.json" in capsys.readouterr().out

    state = load_state(bundle / "models" / "model.pt")
    torch.save({k: v * 0.5 if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                for k, v in state.items()}, bundle / "models" / "model.pt")
    assert main(args[:2] + ["--out", str(tmp_path / "dist2")] + args[4:]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "model.provenance.json describes other weights" in err, err


# ----------------------------------------------------------------------------------------------- collaborator
def _infer(bundle: Path, scan: Path, out: Path, env, cwd: Path, **extra) -> tuple[np.ndarray, dict]:
    """The bundle's ``inference.json`` on ``scan``: the output volume and its JSON sidecar."""
    cmd = [PYTHON, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
           "--bundle_root", str(bundle), "--input", expr(scan), "--output_dir", expr(out)]
    for k, v in extra.items():
        cmd += [f"--{k}", str(v)]
    proc = run(cmd, env, cwd=cwd)
    assert proc.returncode == 0, tail(proc.stdout)
    (nii,) = out.glob("*.nii.gz")
    side = json.loads(nii.with_name(nii.name.replace(".nii.gz", ".json")).read_text())
    return np.asarray(nib.load(str(nii)).dataobj, dtype=np.float64), side


@pytest.mark.slow
def test_collaborator_unpacks_and_runs_inference(published, tmp_path, monkeypatch):
    env = bundle_env(tmp_path)  # a private store: nothing recorded into the collaborator's ./mlruns
    to = tmp_path / "downloads"
    to.mkdir()
    # pinned by the sha256 that publish printed (an archive nothing authenticates is refused)
    printed = [ln.split()[1] for ln in published["proc"].stdout.splitlines() if ln.startswith("sha256 ")]
    assert printed == [sha256(published["zip"])]
    proc = _medsr("fetch-bundle", published["zip"], "--to", to, "--sha256", printed[0], env=env, cwd=tmp_path)
    assert proc.returncode == 0, tail(proc.stdout)
    unpacked = to / NAME
    assert sorted(p.name for p in to.iterdir()) == [NAME]  # no staging leftovers

    # the weights are plain tensors: they load without unpickling objects, and are the published ones
    state = torch.load(str(unpacked / "models" / "model.pt"), map_location="cpu", weights_only=True)
    ref = load_state(published["src"] / "models" / "model.pt")
    assert state.keys() == ref.keys()
    assert all(torch.equal(state[k], ref[k]) if isinstance(ref[k], torch.Tensor) else state[k] == ref[k] for k in ref)

    collab = tmp_path / "collab"
    collab.mkdir()
    y_unpacked, s_torch = _infer(unpacked, published["scan"], tmp_path / "out_unpacked", env, cwd=collab)
    y_source, _ = _infer(published["src"], published["scan"], tmp_path / "out_source", env, cwd=collab)
    assert y_unpacked.shape == (128, 128, 4)
    np.testing.assert_array_equal(y_unpacked, y_source)
    assert not (collab / "mlruns").exists()

    # the archive's verified ONNX export runs the same inference with onnxruntime (backend: onnx), within the
    # tolerance publish verified it to (on [0, 1]-normalised intensities; the outputs are in the scan's units)
    from medsr_monai.publish.onnx_export import TOLERANCE

    manifest = _manifest(published["zip"])
    (variant,) = manifest["onnx"]["variants"]
    side = json.loads((unpacked / "models" / "model.onnx.json").read_text())
    assert variant["exported"] and variant["passed"] and variant["tolerance"] == TOLERANCE == side["tolerance"]
    assert variant["opset"] == manifest["onnx"]["opset"] and "physics" in variant["in_pytorch"]
    y_onnx, s_onnx = _infer(unpacked, published["scan"], tmp_path / "out_onnx", env, cwd=collab, backend="onnx")
    assert s_torch["backend"] == "torch" and s_onnx["backend"] == "onnx"
    assert s_onnx["onnx_path"].endswith("models/model.onnx") and len(s_onnx["onnx_sha256"]) == 64
    assert y_onnx.shape == y_unpacked.shape
    lo, hi = s_torch["normalization_range"]
    assert np.abs(y_onnx - y_unpacked).max() <= TOLERANCE * (hi - lo)

    # monai.bundle.load finds the bundle in bundle_dir and downloads nothing (source is used only if missing)
    import monai.bundle

    monkeypatch.chdir(collab)
    net = monai.bundle.load(name=NAME, bundle_dir=str(to), source="github", device="cpu")
    loaded = net.state_dict()
    assert all(torch.equal(loaded[k].cpu(), ref[k]) for k in ref if isinstance(ref[k], torch.Tensor))
    assert torch.equal(loaded["physics_record"].cpu(), ref["physics_record"])  # the physics record travels along


# ----------------------------------------------------------------------------------------------- fetch refusals
def _fetch_fails(source: Path, to: Path, capsys, message: str) -> None:
    from medsr_monai.cli import main

    # --trust-unverified: these checks hold even for an archive the user chose to trust (see test_faults.py)
    assert main(["fetch-bundle", str(source), "--to", str(to), "--trust-unverified"]) == 2
    err = capsys.readouterr().err
    assert "medsr fetch-bundle: error:" in err and message in err, err
    assert not to.exists() or list(to.iterdir()) == []  # nothing unpacked, no staging left


def _repack(src: Path, dest: Path, change: dict[str, bytes]) -> Path:
    """Copy of archive ``src`` with members replaced or added (``change``: member -> bytes)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, change.get(info.filename, zin.read(info.filename)))
        for name in sorted(set(change) - set(zin.namelist())):  # members added
            zout.writestr(name, change[name])
    return dest


@pytest.mark.slow
def test_fetch_refuses_a_changed_byte(published, tmp_path, capsys):
    # a file changed after publishing, archive rebuilt around it: the manifest's sha256 no longer matches
    with zipfile.ZipFile(published["zip"]) as zf:
        cfg = bytearray(zf.read(f"{NAME}/configs/inference.json"))
    cfg[cfg.index(b"16")] = ord("8")  # num_blocks 16 -> 86
    bad = _repack(published["zip"], tmp_path / "edited.zip", {f"{NAME}/configs/inference.json": bytes(cfg)})
    _fetch_fails(bad, tmp_path / "to1", capsys, "configs/inference.json: sha256 mismatch")

    # one byte flipped inside the compressed weights of the archive itself
    raw = bytearray(published["zip"].read_bytes())
    with zipfile.ZipFile(published["zip"]) as zf:
        info = zf.getinfo(f"{NAME}/models/model.pt")
    raw[info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size // 2] ^= 0xFF
    flipped = tmp_path / "flipped.zip"
    flipped.write_bytes(bytes(raw))
    _fetch_fails(flipped, tmp_path / "to2", capsys, "models/model.pt' is corrupt")


@pytest.mark.slow
def test_fetch_refuses_an_unlisted_file(published, tmp_path, capsys):
    bad = _repack(published["zip"], tmp_path / "extra.zip", {f"{NAME}/configs/extra.json": b"{}"})
    _fetch_fails(bad, tmp_path / "to", capsys, "configs/extra.json: not listed in manifest.json")


def _zip_with(path: Path, name: str, data: bytes = b"x", link: bool = False) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{NAME}/LICENSE", b"MIT")
        info = zipfile.ZipInfo(name)
        if link:
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, data)
    return path


@pytest.mark.parametrize("entry, link, message", [
    (f"{NAME}/../../evil.txt", False, "'..' component escapes the destination"),
    ("/{tmp}/evil_abs.txt", False, "absolute path"),
    (f"{NAME}/configs/escape", True, "a link (to '/etc/passwd')"),
])
def test_fetch_refuses_zip_slip(tmp_path, capsys, entry, link, message):
    entry = entry.format(tmp=str(tmp_path).strip("/"))
    bad = _zip_with(tmp_path / "slip.zip", entry, b"/etc/passwd" if link else b"x", link)
    _fetch_fails(bad, tmp_path / "to", capsys, message)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "evil_abs.txt").exists()


@pytest.mark.slow
def test_fetch_refuses_a_folder_with_an_escaping_link(published, tmp_path, capsys):
    with zipfile.ZipFile(published["zip"]) as zf:
        zf.extractall(tmp_path / "src")
    folder = tmp_path / "src" / NAME
    os.symlink("/etc", folder / "docs" / "etc")
    _fetch_fails(folder, tmp_path / "to", capsys, "outside the bundle")


class Payload:  # an arbitrary object: torch.load(weights_only=True) must refuse to rebuild it
    def __init__(self):
        self.note = "would run code on unpickling"


@pytest.mark.slow
def test_fetch_refuses_pickled_objects_in_weights(published, tmp_path, capsys):
    evil = tmp_path / "evil.pt"
    torch.save({"network": Payload()}, evil)
    data = evil.read_bytes()
    manifest = _manifest(published["zip"])
    manifest["files"]["models/model.pt"] = sha256(evil)  # checksums consistent: only the loader can catch it
    manifest["sizes"]["models/model.pt"] = len(data)
    bad = _repack(published["zip"], tmp_path / "pickle.zip", {
        f"{NAME}/models/model.pt": data, f"{NAME}/manifest.json": json.dumps(manifest).encode()})
    _fetch_fails(bad, tmp_path / "to", capsys, "cannot be loaded with torch.load(weights_only=True)")


@pytest.mark.slow
def test_fetch_from_an_unpacked_folder(published, tmp_path):
    with zipfile.ZipFile(published["zip"]) as zf:
        zf.extractall(tmp_path / "src")
    from medsr_monai.publish.fetch import fetch_bundle

    dest = fetch_bundle(tmp_path / "src" / NAME, tmp_path / "to", trust_unverified=True, warn=lambda m: None)
    assert dest == tmp_path / "to" / NAME and (dest / "models" / "model.pt").is_file()


def test_published_versions_ignores_other_bundles(tmp_path):
    from medsr_monai.publish.checks import published_versions

    for f in ("edsr_0.10.0.zip", "edsr_0.2.0.zip", "edsr_x2_1.0.0.zip", "edsr_0.3.0.zip.part"):
        (tmp_path / f).write_bytes(b"")
    assert published_versions(tmp_path, "edsr") == ["0.2.0", "0.10.0"]  # numeric order, not text order
