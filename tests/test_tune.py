"""``medsr tune``: Optuna studies over a bundle's own train.json, on the tiny real crops.

Every study runs through the real CLI (``python -m medsr_monai tune``) with a private sqlite Optuna storage and a
private MLflow store, so states are checked where a user would look: the Optuna storage and the MLflow runs.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import (PYTHON, REPO, TINY_TRAIN, bundle_cmd, bundle_env, expr, mlflow_client, run, runs_of, tail,
                     artifact_paths, download_artifact)

optuna = pytest.importorskip("optuna")

GOOD_A = {"batch_size": 4, "optimizer": "Adam", "learning_rate": 3e-4, "lr_schedule": "cosine"}
GOOD_B = {"batch_size": 4, "optimizer": "Adam", "learning_rate": 1e-3, "lr_schedule": "cosine"}
BAD = {"batch_size": 4, "optimizer": "Adam", "learning_rate": 0.5, "lr_schedule": "cosine"}  # diverges: pruned
RAISES = {"batch_size": 4, "optimizer": "Adam", "learning_rate": 3e-4, "lr_schedule": "bogus"}  # bundle raises
RAISES_TOO = {**RAISES, "learning_rate": 1e-3}  # a second trial the bundle refuses: the fifth outcome is certain


def tiny_space(tmp: Path, **changes) -> Path:
    """A space over the tiny data: batch 4 (fits) or 64 (more than the 18 training slices), 2 epochs per trial."""
    fixed = {k: v for k, v in TINY_TRAIN.items() if k != "batch_size"}
    fixed["max_epochs"] = 2
    space = {
        "params": {
            "batch_size": {"type": "categorical", "choices": [4, 64]},
            "optimizer": {"type": "categorical", "choices": ["Adam", "SGD"]},
            "learning_rate": {"type": "float", "low": 1e-4, "high": 1.0, "log": True},
            "lr_schedule": {"type": "categorical", "choices": ["none", "cosine", "bogus"]},
        },
        "fixed": fixed,
        "pruner": {"type": "median", "n_startup_trials": 2, "n_warmup_steps": 0},
    }
    space.update(changes)
    path = tmp / "space.json"
    path.write_text(json.dumps(space))
    return path


def tune_cmd(tmp: Path, datalist: Path, study: str, trials: int, *extra: str) -> list[str]:
    return [PYTHON, "-m", "medsr_monai", "tune", "--bundle", str(REPO / "bundles" / "srcnn"), "--trials", str(trials),
            "--study", study, "--storage", storage(tmp), "--space", str(tmp / "space.json"),
            "--set", f"dataset_dir={datalist.parent}", "--output", str(tmp / "tune"),
            "--best-dir", str(tmp / "best"), *extra]


def storage(tmp: Path) -> str:
    return f"sqlite:///{(tmp / 'optuna.db').as_posix()}"


def load(tmp: Path, study: str):
    return optuna.load_study(study_name=study, storage=storage(tmp))


def study_runs(uri: str, study: str) -> tuple[object, list]:
    """(parent run, trial runs sorted by trial number) of a study in the MLflow store."""
    runs = [r for r in runs_of(uri, "srcnn-tune") if r.data.tags.get("medsr.tune_study") == study]
    parents = [r for r in runs if r.data.tags.get("medsr.tune_role") == "study"]
    assert len(parents) == 1, f"expected one parent run for study {study}, got {len(parents)}"
    trials = sorted((r for r in runs if r.data.tags.get("medsr.tune_role") == "trial"),
                    key=lambda r: int(r.data.tags["optuna.trial_number"]))
    return parents[0], trials


def assert_runs_match_trials(uri: str, study_name: str, tmp: Path):
    """Every trial has one nested MLflow run under the study's parent, none RUNNING, tagged with the Optuna state."""
    st = load(tmp, study_name)
    parent, trial_runs = study_runs(uri, study_name)
    assert [int(r.data.tags["optuna.trial_number"]) for r in trial_runs] == [t.number for t in st.trials]
    for t, r in zip(st.trials, trial_runs):
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.info.status != "RUNNING", f"trial {t.number} left RUNNING in MLflow"
        assert r.data.tags["optuna.trial_state"] == t.state.name, (t.number, t.state, r.data.tags)
        assert r.data.params["trial_number"] == str(t.number)
        assert t.user_attrs["mlflow_run_id"] == r.info.run_id
    return st, parent, trial_runs


# ---------------------------------------------------------------------------------------------------- spaces
def test_every_space_file_fits_its_bundle():
    """The per-bundle spaces a user edits name ids their bundle has, and values its factories accept."""
    from medsr_monai.tuning.space import load_space
    from medsr_monai.tuning.trial import bundle_parser
    from medsr_monai.workflows import OPTIMIZERS, SCHEDULES

    files = sorted((REPO / "experiments" / "spaces").glob("*.json"))
    bundles = sorted(p.parent.parent.name for p in (REPO / "bundles").glob("*/configs/train.json"))
    assert [f.stem for f in files] == bundles, "every bundle has a space file, and every space file a bundle"
    for f in files + [None]:
        space = load_space(f)
        for name in ([f.stem] if f else bundles):
            parser = bundle_parser(REPO / "bundles" / name)
            for key in list(space.params) + list(space.fixed):
                parser[key]  # raises KeyError when the bundle has no such id
            for key, allowed in (("optimizer", OPTIMIZERS), ("lr_schedule", SCHEDULES)):
                if key in space.params:
                    assert set(space.params[key]["choices"]) <= set(allowed), (f, key)
            per_slice = space.fixed.get("patches_per_slice", parser.get().get("patches_per_slice", 1))
            for b in space.params["batch_size"]["choices"]:
                assert b % per_slice == 0, f"{f}: batch_size {b} is not a multiple of patches_per_slice {per_slice}"


def test_bad_space_and_objective_are_named(tmp_path):
    from medsr_monai.tuning.space import Objective, SpaceError, load_space

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"params": {"learning_rate": {"type": "float", "low": 0.0, "high": 1.0, "log": True}}}))
    with pytest.raises(SpaceError, match=r"bad\.json.*learning_rate.*log scale needs low > 0"):
        load_space(bad)
    bad.write_text("{not json")
    with pytest.raises(SpaceError, match=r"bad\.json is not valid JSON"):
        load_space(bad)
    obj = Objective.parse("val_psnr + 20*val_ssim")
    assert obj.value({"val_psnr": 30.0, "val_ssim": 0.5}) == pytest.approx(40.0)
    with pytest.raises(SpaceError, match=r"no metric \['val_ssim'\].*val_psnr"):
        obj.value({"val_psnr": 30.0})


def _tune_in_process(cmd: list[str], capsys) -> tuple[int, str]:
    """``medsr tune`` called in this process (for refusals that come before any trial): exit code, stdout + stderr."""
    from medsr_monai.cli import main

    code = main(cmd[cmd.index("tune"):])
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.mark.slow
def test_cli_refuses_bad_storage_missing_ids_and_unknown_metric(tmp_path, tiny_datalist, capsys, monkeypatch):
    env = bundle_env(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    tiny_space(tmp_path)
    # a server storage that cannot be opened: named, password masked, nothing started
    cmd = tune_cmd(tmp_path, tiny_datalist, "s", 1)
    cmd[cmd.index("--storage") + 1] = "postgresql://alice:secret@127.0.0.1:9/optuna"
    code, out = _tune_in_process(cmd, capsys)
    assert code == 2, tail(out)
    assert "postgresql://alice:***@127.0.0.1:9/optuna" in out and "secret" not in out
    # a space naming an id the bundle does not have
    tiny_space(tmp_path, params={"no_such_setting": {"type": "int", "low": 1, "high": 2}})
    code, out = _tune_in_process(tune_cmd(tmp_path, tiny_datalist, "s", 1), capsys)
    assert code == 2 and "no_such_setting" in out and "space.json" in out, tail(out)
    assert not (tmp_path / "optuna.db").exists() or not optuna.get_all_study_summaries(storage(tmp_path))
    # --trials 0: refused before anything is created (no study, no WAITING trial, no parent run)
    tiny_space(tmp_path)
    code, out = _tune_in_process(tune_cmd(tmp_path, tiny_datalist, "zero", 0), capsys)
    assert code == 2 and "--trials 0" in out, tail(out)
    assert not (tmp_path / "optuna.db").exists() or not optuna.get_all_study_summaries(storage(tmp_path))
    assert runs_of(env["MLFLOW_TRACKING_URI"], "srcnn-tune") == []
    # an objective the evaluator does not report: the trial fails, the study stops and says what there is
    tiny_space(tmp_path)
    proc = run(tune_cmd(tmp_path, tiny_datalist, "m", 3, "--objective", "val_lpips", "--no-default-trial",
                        "--enqueue", json.dumps(GOOD_A)), env, timeout=300)
    assert proc.returncode == 2 and "val_lpips" in proc.stdout and "val_psnr" in proc.stdout, tail(proc.stdout)
    st = load(tmp_path, "m")
    assert [t.state.name for t in st.trials] == ["FAIL"]
    parent, runs = study_runs(env["MLFLOW_TRACKING_URI"], "m")
    assert parent.info.status == "FAILED" and runs[0].info.status == "FAILED"


def _last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


@pytest.mark.slow
def test_missing_dataset_stops_before_any_trial(tmp_path, tiny_datalist):
    """A checkout whose sample scans were never fetched: one clear error naming the path and the fix, as the last
    line, and nothing created (no study, no trial, no MLflow run)."""
    import shutil

    checkout = tmp_path / "checkout"  # bundles/srcnn of a checkout without data/samples
    shutil.copytree(REPO / "bundles" / "srcnn" / "configs", checkout / "bundles" / "srcnn" / "configs")
    env = bundle_env(tmp_path)
    tiny_space(tmp_path)
    cmd = tune_cmd(tmp_path, tiny_datalist, "nodata", 3)
    cmd[cmd.index("--bundle") + 1] = str(checkout / "bundles" / "srcnn")
    i = cmd.index("--set")
    del cmd[i:i + 2]  # the bundle's own dataset_dir: <checkout>/data/samples
    proc = run(cmd, env, timeout=300)
    assert proc.returncode == 2, tail(proc.stdout)
    last = _last_line(proc.stdout)
    assert last.startswith("medsr tune: error:") and str(checkout / "data" / "samples") in last, tail(proc.stdout)
    assert "medsr data samples" in last and "--set dataset_dir=" in last, last
    assert not (tmp_path / "optuna.db").exists() or not optuna.get_all_study_summaries(storage(tmp_path))
    assert runs_of(env["MLFLOW_TRACKING_URI"], "srcnn-tune") == []
    assert not (tmp_path / "tune").exists()

    # every bundle: a dataset_dir that does not exist, and a datalist naming a file that does not exist
    from medsr_monai.tuning.space import Objective, load_space
    from medsr_monai.tuning.study import TuneError, TuneSettings, check_data

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "datalist.json").write_text(json.dumps({s: [{"image": f"nifti/gone_{s}.nii.gz", "subject": "x",
                                                          "modality": "MR"}] for s in ("training", "validation")}))
    for bundle in sorted(p.parent.parent for p in (REPO / "bundles").glob("*/configs/train.json")):
        for data, named in ((tmp_path / "nowhere", str(tmp_path / "nowhere")), (broken, "gone_")):
            settings = TuneSettings(bundle=bundle, trials=1, study_name="x", storage=storage(tmp_path),
                                    space=load_space(None), objective=Objective.parse("val_psnr"), tracking_uri="",
                                    output_root=tmp_path / "tune", best_out=tmp_path / "best.json",
                                    fixed={"dataset_dir": str(data)})
            with pytest.raises(TuneError, match=r"has no data: .*no trial was started") as err:
                check_data(settings)
            assert named in str(err.value) and "\n" not in str(err.value), (bundle.name, str(err.value))
        tiny = tiny_datalist.parent  # every bundle reads a datalist (seqsr_lstm: its near-isotropic volumes)
        check_data(TuneSettings(  # the tiny data itself passes
            bundle=bundle, trials=1, study_name="x", storage=storage(tmp_path), space=load_space(None),
            objective=Objective.parse("val_psnr"), tracking_uri="", output_root=tmp_path / "tune",
            best_out=tmp_path / "best.json", fixed={"dataset_dir": str(tiny)}))


def test_best_file_is_per_study_and_the_example_result_is_in_place():
    """``experiments/best/<bundle>/<study>.json``; the committed example study's result is where its study name puts
    it, and says which study wrote it."""
    import argparse

    from medsr_monai.tuning.cli import register, settings_from_args
    from medsr_monai.tuning.study import best_file_owner

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())

    def best_of(*argv: str) -> Path:
        args = parser.parse_args(["tune", "--bundle", str(REPO / "bundles" / "srcnn"), "--trials", "1", *argv])
        return settings_from_args(args, []).best_out

    best = REPO / "experiments" / "best"
    assert best_of() == best / "srcnn" / "srcnn.json"
    assert best_of("--study", "mytest") == best / "srcnn" / "mytest.json"
    assert best_of("--study", "my test/1", "--best-dir", "/x") == Path("/x/srcnn/my_test_1.json")
    assert best_of("--best-out", "/x/b.json") == Path("/x/b.json")
    example = best_of("--study", "example-srcnn")
    assert example.is_file() and best_file_owner(example)["study"] == "example-srcnn"
    assert not list(best.glob("*.json")), "best files live in experiments/best/<bundle>/<study>.json"


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_separate_processes_on_one_storage_draw_different_trials(tmp_path):
    """Two ``medsr tune`` calls started separately on one storage (same --seed, both finding an empty study) do not
    run identical trials; one call re-run from the same state draws the same values."""
    from medsr_monai.tuning.space import Objective, load_space
    from medsr_monai.tuning.study import TuneSettings, _load_study, open_storage

    def draws(db: str) -> list[float]:
        settings = TuneSettings(bundle=REPO / "bundles" / "srcnn", trials=4, study_name="p",
                                storage=f"sqlite:///{(tmp_path / db).as_posix()}", space=load_space(None),
                                objective=Objective.parse("val_psnr"), tracking_uri="", output_root=tmp_path,
                                best_out=tmp_path / "b.json")
        st = open_storage(settings.storage)
        a, seed_a = _load_study(settings, st, worker=0)  # "process" A
        b, seed_b = _load_study(settings, st, worker=0)  # "process" B, started before A ran a trial
        assert seed_a == seed_b
        out = []
        for study in (a, b, a, b):
            t = study.ask()
            out.append(t.suggest_float("learning_rate", 1e-5, 1e-2, log=True))
            study.tell(t, 1.0)
        return out

    first = draws("one.db")
    assert len(set(first)) == 4, first
    assert draws("two.db") == first


# ---------------------------------------------------------------------------------------------------- studies
@pytest.mark.slow
def test_second_study_keeps_the_first_studys_best_file(tmp_path, tiny_datalist):
    """Each study writes its own best file; a study told to write another study's file is refused before its first
    trial unless --overwrite-best. The second study also checks --timeout and --epochs."""
    env = bundle_env(tmp_path, OMP_NUM_THREADS="1")
    tiny_space(tmp_path, params={"batch_size": {"type": "categorical", "choices": [4]},
                                 "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-3, "log": True}})
    base = ["--no-default-trial", "--pruner", "none"]
    first = run(tune_cmd(tmp_path, tiny_datalist, "first", 1, *base), env, timeout=600)
    assert first.returncode == 0, tail(first.stdout)
    first_file = tmp_path / "best" / "srcnn" / "first.json"
    before = first_file.read_bytes()
    assert json.loads(before)["tuned_by"]["study"] == "first"

    # --timeout: no trial starts after 1 s, so 1 of the 5 asked for runs; --epochs 1 beats the space's max_epochs 2
    second = run(tune_cmd(tmp_path, tiny_datalist, "second", 5, *base, "--timeout", "1", "--epochs", "1"), env,
                 timeout=600)
    assert second.returncode == 0, tail(second.stdout)
    (trial,) = load(tmp_path, "second").trials
    assert trial.state == optuna.trial.TrialState.COMPLETE and sorted(trial.intermediate_values) == [1]
    assert first_file.read_bytes() == before, "the second study rewrote the first study's best file"
    second_file = tmp_path / "best" / "srcnn" / "second.json"
    assert json.loads(second_file.read_text())["tuned_by"]["study"] == "second"
    assert str(second_file) in second.stdout

    # pointed at the first study's file: refused before any trial, the file unchanged
    refused = run(tune_cmd(tmp_path, tiny_datalist, "second", 2, *base, "--best-out", str(first_file)), env,
                  timeout=300)
    assert refused.returncode == 2, tail(refused.stdout)
    last = _last_line(refused.stdout)
    assert str(first_file) in last and "'first'" in last and "--overwrite-best" in last, last
    assert len(load(tmp_path, "second").trials) == 1 and first_file.read_bytes() == before
    # asked to: replaced, and tuned_by says by which study
    forced = run(tune_cmd(tmp_path, tiny_datalist, "second", 1, *base, "--best-out", str(first_file),
                          "--overwrite-best"), env, timeout=300)
    assert forced.returncode == 0, tail(forced.stdout)
    assert json.loads(first_file.read_text())["tuned_by"]["study"] == "second"


@pytest.mark.slow
def test_study_where_every_trial_fails_exits_non_zero(tmp_path, tiny_datalist):
    env = bundle_env(tmp_path, OMP_NUM_THREADS="1")
    tiny_space(tmp_path, params={"batch_size": {"type": "categorical", "choices": [4]},
                                 "lr_schedule": {"type": "categorical", "choices": ["bogus"]}})
    proc = run(tune_cmd(tmp_path, tiny_datalist, "f", 2, "--no-default-trial", "--pruner", "none"), env, timeout=600)
    assert proc.returncode == 1, tail(proc.stdout)
    assert "every trial failed" in proc.stdout
    last = _last_line(proc.stdout)
    assert last.startswith("medsr tune: error: every trial of study 'f' failed") and "bogus" in last, last
    assert [t.state.name for t in load(tmp_path, "f").trials] == ["FAIL", "FAIL"]
    parent, runs = study_runs(env["MLFLOW_TRACKING_URI"], "f")
    assert parent.info.status == "FAILED" and "every trial failed" in parent.data.tags["medsr.end_reason"]
    assert not (tmp_path / "best").exists()


@pytest.mark.slow
def test_study_resumes_prunes_survives_a_crash_and_writes_a_usable_best_override(tmp_path, tiny_datalist):
    env = bundle_env(tmp_path, OMP_NUM_THREADS="1")
    uri = env["MLFLOW_TRACKING_URI"]
    tiny_space(tmp_path)
    enq = [a for p in (GOOD_A, GOOD_B, BAD) for a in ("--enqueue", json.dumps(p))]
    first = run(tune_cmd(tmp_path, tiny_datalist, "s", 3, "--no-default-trial", *enq), env, timeout=600)
    assert first.returncode == 0, tail(first.stdout)
    st = load(tmp_path, "s")
    assert [t.state.name for t in st.trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    bad = st.trials[2]
    assert bad.params["learning_rate"] == 0.5 and list(bad.intermediate_values) == [1], "pruned after epoch 1 of 2"
    assert bad.intermediate_values[1] < min(t.intermediate_values[1] for t in st.trials[:2])
    assert "pruned at epoch 1" in bad.user_attrs["prune_reason"]

    # the same command again, with one more enqueued trial that makes the bundle raise, continues to 5 trials
    second = run(tune_cmd(tmp_path, tiny_datalist, "s", 5, "--no-default-trial", *enq,
                          "--enqueue", json.dumps(RAISES), "--enqueue", json.dumps(RAISES_TOO)), env, timeout=600)
    assert second.returncode == 0, tail(second.stdout)
    assert "resumed, 3 of 5 trials done" in second.stdout
    st = load(tmp_path, "s")
    assert len(st.trials) == 5 and st.trials[3].params == RAISES, "enqueued trials already run are not repeated"
    assert st.trials[3].state.name == "FAIL" and "bogus" in st.trials[3].user_attrs["error"]
    assert st.trials[4].params == RAISES_TOO and st.trials[4].state.name == "FAIL"

    st, parent, trial_runs = assert_runs_match_trials(uri, "s", tmp_path)
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_fail"] == 2
    for t, r in zip(st.trials, trial_runs):
        history = mlflow_client(uri).get_metric_history(r.info.run_id, "val_psnr")
        expected = {"COMPLETE": 2, "PRUNED": len(t.intermediate_values), "FAIL": 0}[t.state.name]
        assert len(history) == expected, (t.number, t.state, len(history))
        if t.state.name == "COMPLETE":
            assert history[-1].value == pytest.approx(t.value, abs=1e-4)
    assert trial_runs[3].info.status == "FAILED" and "bogus" in trial_runs[3].data.tags["medsr.end_reason"]
    arts = artifact_paths(uri, parent.info.run_id)
    for name in ("optimization_history", "param_importances", "parallel_coordinate", "intermediate_values"):
        assert f"optuna/{name}.png" in arts
    png = download_artifact(uri, parent.info.run_id, "optuna/optimization_history.png", tmp_path / "dl")
    import matplotlib.image as mpimg

    assert mpimg.imread(str(png)).shape[0] > 100

    # the best override: the best complete trial's params, accepted by monai.bundle run as a second config file
    best_file = tmp_path / "best" / "srcnn" / "s.json"
    best = json.loads(best_file.read_text())
    winner = max((t for t in st.trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert {k: v for k, v in best.items() if k != "tuned_by"} == winner.params
    assert best["tuned_by"]["trial"] == winner.number and best["tuned_by"]["study"] == "s"
    overrides = {"dataset_dir": expr(tiny_datalist.parent), "output_dir": expr(tmp_path / "final"),
                 "ckpt_dir": expr(tmp_path / "final" / "models"), "resume": False,
                 **{k: v for k, v in TINY_TRAIN.items() if k != "batch_size"}}
    cmd = bundle_cmd("run", "srcnn", ["train"], **overrides)
    cmd[cmd.index("--config_file") + 1] = f"['{REPO / 'bundles/srcnn/configs/train.json'}','{best_file}']"
    proc = run(cmd, env, timeout=600)
    assert proc.returncode == 0, tail(proc.stdout)
    final = runs_of(uri, "srcnn")[-1]
    assert final.info.status == "FINISHED"
    for k, v in winner.params.items():
        assert final.data.params[k] == str(v), k

    # medsr compare reads the store: the bundle run is a result, the tuning runs are not
    from medsr_monai.compare import collect_rows

    rows = collect_rows(uri)
    assert [r.run_id for r in rows] == [final.info.run_id]


@pytest.mark.slow
def test_two_workers_share_the_study_with_their_own_seeds(tmp_path, tiny_datalist):
    env = bundle_env(tmp_path, OMP_NUM_THREADS="1")
    tiny_space(tmp_path, params={
        "batch_size": {"type": "categorical", "choices": [4]},
        "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}})
    proc = run(tune_cmd(tmp_path, tiny_datalist, "w", 4, "--workers", "2", "--pruner", "none"), env, timeout=600)
    assert proc.returncode == 0, tail(proc.stdout)
    # searched anywhere in a line: the two workers write to one pipe, and their lines may interleave
    seeds = dict(re.findall(r"\[worker (\d+)\] sampler seed (\d+)", proc.stdout))
    assert set(seeds) == {"0", "1"} and len(set(seeds.values())) == 2, (seeds, tail(proc.stdout))
    st, parent, _ = assert_runs_match_trials(env["MLFLOW_TRACKING_URI"], "w", tmp_path)
    assert len(st.trials) == 4 and all(t.state.name == "COMPLETE" for t in st.trials)
    assert len({t.user_attrs["pid"] for t in st.trials}) == 2, "both workers ran trials"
    assert st.trials[0].user_attrs.get("enqueued") == "bundle defaults"
    assert parent.info.status == "FINISHED"


@pytest.mark.slow
def test_ctrl_c_keeps_finished_trials_and_a_killed_worker_is_failed_on_resume(tmp_path, tiny_datalist):
    env = bundle_env(tmp_path, OMP_NUM_THREADS="1")
    uri = env["MLFLOW_TRACKING_URI"]
    tiny_space(tmp_path, params={"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-3, "log": True}})
    base = ["--pruner", "none", "--no-default-trial"]
    assert run(tune_cmd(tmp_path, tiny_datalist, "k", 1, *base), env, timeout=300).returncode == 0

    def start_long(trials: int) -> subprocess.Popen:
        cmd = tune_cmd(tmp_path, tiny_datalist, "k", trials, *base, "--set", "max_epochs=200")
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait_running(number: int, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            trials = load(tmp_path, "k").trials
            if len(trials) > number and trials[number].state.name == "RUNNING" and \
                    list((tmp_path / "tune" / "k" / f"trial_{number:04d}").glob("val_metrics.json")):
                return
            time.sleep(0.3)
        raise AssertionError(f"trial {number} never ran:\n{tail(proc.communicate()[0])}")

    # Ctrl-C: the running trial stops after its iteration and is recorded; the finished one is kept
    proc = start_long(3)
    wait_running(1, proc)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, tail(out)
    st = load(tmp_path, "k")
    assert [t.state.name for t in st.trials] == ["COMPLETE", "FAIL"]
    assert "interrupted" in st.trials[1].user_attrs["error"]
    parent, runs = study_runs(uri, "k")
    assert parent.info.status == "KILLED" and [r.info.status for r in runs] == ["FINISHED", "KILLED"]

    # SIGKILL (no chance to clean up): the next call finds the dead worker's trial, fails it and goes on
    proc = start_long(3)
    wait_running(2, proc)
    proc.kill()
    proc.communicate()
    assert load(tmp_path, "k").trials[2].state.name == "RUNNING"
    again = run(tune_cmd(tmp_path, tiny_datalist, "k", 4, *base), env, timeout=300)
    assert again.returncode == 0, tail(again.stdout)
    assert "failed dead trials [2]" in again.stdout
    st, parent, runs = assert_runs_match_trials(uri, "k", tmp_path)
    assert [t.state.name for t in st.trials] == ["COMPLETE", "FAIL", "FAIL", "COMPLETE"]
    assert "killed" in st.trials[2].user_attrs["error"] and runs[2].info.status == "KILLED"
    assert parent.info.status == "FINISHED"


# ---------------------------------------------------------------------------------------------------- every bundle
def _every_bundle_tiny(bundle: str, tiny_datalist: Path, seq_data: Path) -> dict:
    """Fixed overrides that make one trial of ``bundle`` take seconds (the bundles' own tests use the same)."""
    from test_gan import CYCLEGAN_TINY, SRGAN_TINY
    from test_seqsr import TINY as SEQ_TINY
    from test_unet import TINY as UNET_TINY

    data = {"dataset_dir": str(seq_data if bundle == "seqsr_lstm" else tiny_datalist.parent)}
    tiny = {"srcnn": TINY_TRAIN, "edsr": TINY_TRAIN, "srgan": SRGAN_TINY, "cyclegan": CYCLEGAN_TINY,
            "seqsr_lstm": SEQ_TINY, "unet": UNET_TINY}
    assert bundle in tiny, f"new bundle {bundle}: add its tiny training settings here"
    # a space's fixed overrides must name ids the bundle's config has (a nested id such as srgan's
    # train#trainer#epoch_length is the bundle tests' shortcut, not a tunable)
    return {**{k: v for k, v in tiny[bundle].items() if "#" not in k}, **data}


@pytest.mark.slow
@pytest.mark.parametrize("bundle", sorted(p.parent.parent.name for p in (REPO / "bundles").glob("*/configs/train.json")))
def test_one_trial_of_every_bundle(bundle, tmp_path, tiny_datalist, seq_data):
    """Any bundle with a train.json can be tuned unchanged: its trial completes, reports every validation epoch to
    Optuna, logs into its nested MLflow run, and its best override is written."""
    fixed = _every_bundle_tiny(bundle, tiny_datalist, seq_data)
    batch = fixed.pop("batch_size", 1)
    space = {"params": {"batch_size": {"type": "categorical", "choices": [batch]},
                        "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-3, "log": True}},
             "fixed": {k: v for k, v in fixed.items() if k != "dataset_dir"}}
    (tmp_path / "space.json").write_text(json.dumps(space))
    env = bundle_env(tmp_path, OMP_NUM_THREADS="1")
    cmd = [PYTHON, "-m", "medsr_monai", "tune", "--bundle", str(REPO / "bundles" / bundle), "--trials", "1",
           "--study", bundle, "--storage", storage(tmp_path), "--space", str(tmp_path / "space.json"),
           "--set", f"dataset_dir={fixed['dataset_dir']}", "--output", str(tmp_path / "tune"),
           "--best-out", str(tmp_path / "best.json"), "--no-default-trial"]
    proc = run(cmd, env, timeout=600)
    assert proc.returncode == 0, tail(proc.stdout)
    (trial,) = load(tmp_path, bundle).trials
    assert trial.state.name == "COMPLETE", trial.user_attrs
    assert sorted(trial.intermediate_values) == list(range(1, fixed["max_epochs"] + 1))
    client = mlflow_client(env["MLFLOW_TRACKING_URI"])
    run_ = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert run_.info.status == "FINISHED" and run_.data.tags["optuna.trial_state"] == "COMPLETE"
    assert len(client.get_metric_history(run_.info.run_id, "val_psnr")) == fixed["max_epochs"]
    assert json.loads((tmp_path / "best.json").read_text())["learning_rate"] == trial.params["learning_rate"]


#: run ``medsr tune`` with its address space capped 3 GiB above what its imports take: a real allocation failure
#: from torch's CPU allocator that can never use the machine's memory (mmap fails at the cap, whatever the
#: kernel's overcommit policy)
CAPPED_TUNE = (
    "import resource, sys\n"
    "import mlflow, monai, optuna, torch\n"
    "from medsr_monai.cli import main\n"
    "vm = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize')).split()[1]) * 1024\n"
    "resource.setrlimit(resource.RLIMIT_AS, (vm + (3 << 30), resource.RLIM_INFINITY))\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@pytest.mark.slow
def test_a_real_allocation_failure_prunes_the_trial_and_the_study_goes_on(tmp_path, tiny_datalist):
    """Through the real workflow: SRCNN widened to 65536 features on whole 64x64 slices needs a 4 GiB activation,
    more than the 3 GiB the capped process has left, so torch raises inside the trainer; the trial is pruned as
    out of memory with the allocator's message, and the next trial (normal width) completes."""
    env = bundle_env(tmp_path, OMP_NUM_THREADS="1")
    width = "network_def#net#features#0"  # SRCNN's first layer (64 by default)
    tiny_space(tmp_path, params={"batch_size": {"type": "categorical", "choices": [4]},
                                 "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-3, "log": True},
                                 width: {"type": "categorical", "choices": [65536, 64]}},
               fixed={**{k: v for k, v in TINY_TRAIN.items() if k != "batch_size"}, "patch_size": 64})
    wide = {"batch_size": 4, "learning_rate": 3e-4, width: 65536}
    normal = {"batch_size": 4, "learning_rate": 3e-4, width: 64}
    tune = tune_cmd(tmp_path, tiny_datalist, "oom", 2, "--no-default-trial", "--pruner", "none",
                    "--enqueue", json.dumps(wide), "--enqueue", json.dumps(normal))
    assert tune[1:4] == ["-m", "medsr_monai", "tune"]
    proc = run([PYTHON, "-c", CAPPED_TUNE, *tune[3:]], env, timeout=600)
    oom, ok = load(tmp_path, "oom").trials
    assert oom.state == optuna.trial.TrialState.PRUNED, (oom.state, oom.user_attrs, tail(proc.stdout))
    reason = oom.user_attrs["prune_reason"]
    assert "does not fit memory" in reason and "can't allocate memory" in reason, reason
    assert ok.state == optuna.trial.TrialState.COMPLETE, (ok.user_attrs, tail(proc.stdout))
    assert proc.returncode == 0, tail(proc.stdout)


def test_out_of_memory_prunes_the_trial_with_its_reason(tmp_path, monkeypatch):
    """A batch that does not fit memory is pruned, not failed: the allocator's error arrives wrapped by MONAI's config
    evaluation (as in a real run), and the trial records why. (A real OOM would take the test machine with it.)"""
    import torch

    from medsr_monai.tuning import trial as trial_mod
    from medsr_monai.tuning.space import Objective, load_space

    def wrapped(err: BaseException) -> RuntimeError:
        try:
            raise err
        except BaseException as inner:
            try:
                raise RuntimeError("Failed to evaluate ConfigExpression: $@train#trainer.run()") from inner
            except RuntimeError as outer:
                return outer

    cpu = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 bytes")
    gpu = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    assert trial_mod.is_out_of_memory(wrapped(cpu)) is cpu
    assert trial_mod.is_out_of_memory(wrapped(gpu)) is gpu
    assert trial_mod.is_out_of_memory(wrapped(ValueError("lr_schedule='bogus' is not supported"))) is None

    errors = iter([wrapped(cpu), wrapped(ValueError("lr_schedule='bogus' is not supported"))])

    def failing_train(*args, **kwargs):
        raise next(errors)

    monkeypatch.setattr(trial_mod, "_train", failing_train)
    setup = trial_mod.TrialSetup(bundle=REPO / "bundles" / "srcnn", space=load_space(None),
                                 objective=Objective.parse("val_psnr"), fixed={}, output_root=tmp_path,
                                 experiment_name="unused")
    study = optuna.create_study(direction="maximize")
    study.optimize(lambda t: trial_mod.run_trial(t, setup), n_trials=2, catch=(Exception,))
    oom, bad = study.trials
    assert oom.state.name == "PRUNED" and "does not fit memory" in oom.user_attrs["prune_reason"]
    assert f"batch_size={oom.params['batch_size']}" in oom.user_attrs["prune_reason"]
    assert bad.state.name == "FAIL" and "bogus" in bad.user_attrs["error"]
