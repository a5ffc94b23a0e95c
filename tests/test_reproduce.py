"""``medsr reproduce RUN_ID``: re-run a recorded run, compare metrics, refuse when the data changed.

One tiny srcnn training (1 epoch, real crops, private sqlite store) is reproduced through the real CLI; the
refusals run against the same store and must not create runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import PYTHON, mlflow_client, run, runs_of, tail, train_tiny


def _reproduce(uri: str, env: dict, *args: str):
    return run([PYTHON, "-m", "medsr_monai", "reproduce", *args, "--tracking-uri", uri], env)


def _refuse(capsys, uri: str, *args: str) -> str:
    """Run ``medsr reproduce`` in-process (the same argparse CLI, without a 5 s interpreter start per refusal);
    assert it refused with exit 2; return its stderr."""
    from medsr_monai.cli import main

    capsys.readouterr()
    rc = main(["reproduce", *args, "--tracking-uri", uri])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "medsr reproduce: error:" in err
    return err


def _json(text: str) -> dict:
    """The JSON report (stdout and stderr are interleaved in ``run``'s output)."""
    return json.JSONDecoder().raw_decode(text[text.index('{\n  "run_id"'):])[0]


@pytest.fixture(scope="module")
def original(tiny_datalist, tmp_path_factory):
    """A trained run whose datalist.json lives in a private copy (tests may change it)."""
    root = tmp_path_factory.mktemp("reproduce")
    data = root / "data"
    shutil.copytree(Path(tiny_datalist).parent, data)
    tb = train_tiny("srcnn", data / "datalist.json", root / "orig")
    tb.check()
    (run_,) = runs_of(tb.uri, "srcnn")
    return tb, run_


@pytest.mark.slow
def test_reproduce_gives_identical_metrics_and_weights(original, tmp_path):
    tb, orig = original
    out = tmp_path / "repro"
    n_runs = len(runs_of(tb.uri, "srcnn"))
    proc = _reproduce(tb.uri, tb.env, orig.info.run_id, "--output", str(out), "--format", "json", "--tolerance", "0")
    assert proc.returncode == 0, tail(proc.stdout)
    result = _json(proc.stdout)
    assert len(runs_of(tb.uri, "srcnn")) == n_runs + 1
    new = mlflow_client(tb.uri).get_run(result["new_run_id"])
    assert new.info.status == "FINISHED"
    assert new.data.tags["medsr.reproduces"] == orig.info.run_id
    assert new.data.tags["medsr.datalist_sha256"] == orig.data.tags["medsr.datalist_sha256"]
    rows = {r["metric"]: r for r in result["metrics"]["rows"]}
    val = [k for k in orig.data.metrics if k.startswith("val_")]
    assert val and set(rows) == set(orig.data.metrics)
    for k in val:
        assert rows[k]["diff"] == 0.0, rows[k]
        assert new.data.metrics[k] == orig.data.metrics[k]
    assert result["metrics"]["verdict"] == "identical"
    assert result["weights"] == "identical"
    assert (out / "models" / "model.pt").is_file() and (out / "reproduce.log").is_file()

    # markdown report: table and verdict
    from medsr_monai.reproduce import format_markdown

    md = format_markdown(result)
    assert "| val_psnr |" in md and "verdict: identical" in md


@pytest.mark.slow
def test_refusals_name_the_problem_and_run_nothing(original, tmp_path, capsys):
    tb, orig = original
    uri, rid = tb.uri, orig.info.run_id
    n_runs = len(runs_of(uri, "srcnn"))

    # unknown run id
    err = _refuse(capsys, uri, "0123456789abcdef0123456789abcdef", "--output", str(tmp_path / "a"))
    assert "0123456789abcdef0123456789abcdef" in err and uri in err

    # unreachable stores (a sqlite folder that does not exist, an HTTP server nobody runs)
    for bad in (f"sqlite:///{tmp_path}/nowhere/mlflow.db", "http://127.0.0.1:9"):
        assert bad in _refuse(capsys, bad, rid)

    # a run without executed_config.json, and one without a recorded datalist hash
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name("srcnn").experiment_id
    bare = client.create_run(exp, run_name="bare").info.run_id
    client.set_terminated(bare)
    err = _refuse(capsys, uri, bare)
    assert bare in err and "executed_config.json" in err
    nohash = client.create_run(exp, run_name="nohash").info.run_id
    cfg = json.loads(Path(tb.output_dir / "executed_config.json").read_text())
    cfg_file = tmp_path / "executed_config.json"
    cfg_file.write_text(json.dumps(cfg))
    client.log_artifact(nohash, str(cfg_file))
    client.set_terminated(nohash)
    err = _refuse(capsys, uri, nohash)
    assert nohash in err and "no datalist hash" in err and "--no-data-check" in err

    # the data changed: one byte of whitespace in datalist.json
    datalist = tb.dataset_dir / "datalist.json"
    before = datalist.read_bytes()
    recorded = orig.data.tags["medsr.datalist_sha256"]
    try:
        datalist.write_bytes(before + b"\n")
        from medsr_monai.tracking import data_hashes

        current = data_hashes(tb.dataset_dir)["datalist_sha256"]
        assert current != recorded
        err = _refuse(capsys, uri, rid, "--output", str(tmp_path / "b"))
        assert str(datalist) in err and recorded in err and current in err
        assert not (tmp_path / "b").exists()
    finally:
        datalist.write_bytes(before)
    assert len(runs_of(uri, "srcnn")) == n_runs + 2  # only the two hand-made runs above


@pytest.mark.slow
def test_reproduce_evaluation_run(original, tmp_path, capsys):
    """An evaluation run (train.json + evaluate.json) re-evaluates the same checkpoint to the same test metrics;
    with the checkpoint gone it is refused."""
    from helpers import bundle_cmd, expr

    tb, _ = original
    env = tb.env
    proc = run(bundle_cmd("run", "srcnn", ["train", "evaluate"], dataset_dir=expr(tb.dataset_dir),
                          output_dir=expr(tb.output_dir), ckpt_dir=expr(tb.ckpt_dir)), env)
    assert proc.returncode == 0, tail(proc.stdout)
    ev = [r for r in runs_of(tb.uri, "srcnn") if r.data.tags.get("medsr.stage") == "evaluate"][-1]
    proc = _reproduce(tb.uri, env, ev.info.run_id, "--output", str(tmp_path / "e"), "--format", "json")
    assert proc.returncode == 0, tail(proc.stdout)
    result = _json(proc.stdout)
    assert result["metrics"]["verdict"] == "identical"
    assert any(r["metric"].startswith("test_") for r in result["metrics"]["rows"])
    assert (tmp_path / "e" / "evaluation" / "metrics.json").is_file()

    moved = tb.model.with_suffix(".moved")
    tb.model.rename(moved)
    try:
        err = _refuse(capsys, tb.uri, ev.info.run_id, "--output", str(tmp_path / "f"))
        assert ev.info.run_id in err and str(tb.model) in err and "no longer exists" in err
    finally:
        moved.rename(tb.model)


@pytest.mark.slow
def test_changed_data_with_no_data_check_reruns_and_tolerance_exits_1(original, tmp_path):
    """``--no-data-check`` re-runs on data that changed since the run (one training subject dropped from the
    datalist): the metrics then differ, and ``--tolerance 0`` turns that into exit 1 with the verdict named."""
    tb, orig = original
    datalist = tb.dataset_dir / "datalist.json"
    before = datalist.read_bytes()
    data = json.loads(before)
    assert len(data["training"]) > 1
    try:
        datalist.write_text(json.dumps({**data, "training": data["training"][:-1]}))
        proc = _reproduce(tb.uri, tb.env, orig.info.run_id, "--output", str(tmp_path / "nd"), "--format", "json",
                          "--no-data-check", "--tolerance", "0")
    finally:
        datalist.write_bytes(before)
    assert proc.returncode == 1, tail(proc.stdout)
    result = _json(proc.stdout)
    assert result["metrics"]["verdict"] != "identical" and result["metrics"]["max_abs_diff"] > 0
    assert "metrics differ by more than --tolerance 0" in proc.stdout.strip().splitlines()[-1]
    new = mlflow_client(tb.uri).get_run(result["new_run_id"])
    assert new.data.tags["medsr.datalist_sha256"] != orig.data.tags["medsr.datalist_sha256"]


def test_compare_metrics_verdict():
    from medsr_monai.reproduce import compare_metrics

    same = compare_metrics({"val_psnr": 30.0, "train_loss": 0.1}, {"val_psnr": 30.0, "train_loss": 0.1})
    assert same["identical"] and same["verdict"] == "identical" and same["max_abs_diff"] == 0.0
    diff = compare_metrics({"val_psnr": 30.0, "val_ssim": 0.9}, {"val_psnr": 30.25})
    assert not diff["identical"] and diff["max_abs_diff"] == 0.25 and diff["missing"] == ["val_ssim"]
    assert diff["verdict"].startswith("max |diff| = 0.25") and "val_ssim" in diff["verdict"]
