"""MLflow run lifecycle of real bundle training runs: resume after SIGKILL (and the killed run marked
KILLED), SIGTERM, a diverging run failing loudly; and the tracking-store checks."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import time

import pytest

from helpers import REPO, TINY_TRAIN, bundle_cmd, bundle_env, error_text, expr, run, runs_of, tail, tracking_uri

BUNDLE = "srcnn"  # the fast one; both bundles share train.json's handlers


def _train_cmd(datalist, tmp_path, **extra):
    overrides = {"dataset_dir": expr(datalist.parent), "output_dir": expr(tmp_path / "out"),
                 "ckpt_dir": expr(tmp_path / "models"), **TINY_TRAIN, **extra}
    return bundle_cmd("run", BUNDLE, ["train"], **overrides)


def _start_and_wait_for_checkpoint(cmd, env, ckpt_dir, log_path, timeout=300):
    """Start training; return (process, newest checkpoint) as soon as the first epoch checkpoint exists."""
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, env=env, cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            found = sorted(ckpt_dir.glob("checkpoint_*.pt")) if ckpt_dir.is_dir() else []
            if found:
                return proc, found[-1]
            time.sleep(0.05)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        log.close()
    proc.kill()
    proc.wait()
    pytest.fail(f"no checkpoint appeared (rc={proc.returncode}):\n{tail(open(log_path).read())}")


@pytest.mark.slow
def test_resume_after_sigkill(tiny_datalist, tmp_path):
    env = bundle_env(tmp_path)
    cmd = _train_cmd(tiny_datalist, tmp_path, max_epochs=3)
    proc, ckpt = _start_and_wait_for_checkpoint(cmd, env, tmp_path / "out" / "checkpoints", tmp_path / "first.log")
    proc.send_signal(signal.SIGKILL)
    proc.wait()  # reaped: its pid no longer exists
    assert proc.returncode == -signal.SIGKILL
    ckpts = sorted((tmp_path / "out" / "checkpoints").glob("checkpoint_*.pt"))
    assert ckpts, "the checkpoint disappeared"
    done_epoch = int(re.search(r"epoch=(\d+)", ckpts[-1].name).group(1))
    assert done_epoch < 3
    assert not (tmp_path / "out" / "checkpoints" / "COMPLETED").exists()
    runs = runs_of(env["MLFLOW_TRACKING_URI"], BUNDLE)
    assert [r.info.status for r in runs] == ["RUNNING"]  # SIGKILL leaves no chance to close it
    killed_id = runs[0].info.run_id
    assert runs[0].data.tags["medsr.pid"] == str(proc.pid)

    second = run(cmd, env)
    assert second.returncode == 0, tail(second.stdout)
    assert re.search(r"resuming from \S*checkpoint_epoch=%d\.pt" % done_epoch, second.stdout), tail(second.stdout)
    assert f"Restored all variables from {ckpts[-1]}" in second.stdout
    completed = [int(e) for e in re.findall(r"SupervisedTrainer - INFO - Epoch\[(\d+)\] Complete", second.stdout)]
    assert completed == list(range(done_epoch + 1, 4)), completed  # went on from the checkpoint to epoch 3
    assert (tmp_path / "out" / "checkpoints" / "COMPLETED").read_text().strip() == "epoch 3"
    assert (tmp_path / "out" / "checkpoints" / "checkpoint_epoch=3.pt").is_file()
    assert (tmp_path / "models" / "model.pt").is_file()

    runs = {r.info.run_id: r for r in runs_of(env["MLFLOW_TRACKING_URI"], BUNDLE)}
    assert len(runs) == 2
    killed = runs.pop(killed_id)
    assert killed.info.status == "KILLED"  # found stale by the next start: its process is gone
    assert f"process {proc.pid} ended" in killed.data.tags["medsr.end_reason"]
    (resumed,) = runs.values()
    assert resumed.info.status == "FINISHED"
    epoch_length = int(resumed.data.params["epoch_length"])
    from helpers import mlflow_client

    steps = [m.step for m in mlflow_client(env["MLFLOW_TRACKING_URI"]).get_metric_history(resumed.info.run_id,
                                                                                          "train_loss")]
    assert sorted(steps) == list(range(done_epoch * epoch_length + 1, 3 * epoch_length + 1))  # continued
    assert len(mlflow_client(env["MLFLOW_TRACKING_URI"]).get_metric_history(resumed.info.run_id, "val_psnr")) \
        == 3 - done_epoch
    # the two runs of one training find each other, and the killed run's superseded checkpoints are gone
    assert resumed.data.tags["medsr.resumed_from_run_id"] == killed_id
    assert resumed.data.tags["medsr.resumed_from_epoch"] == str(done_epoch)
    assert mlflow_client(env["MLFLOW_TRACKING_URI"]).get_run(killed_id).data.tags["medsr.resumed_by_run_id"] \
        == resumed.info.run_id
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").glob("checkpoint_*.pt")) == [
        "checkpoint_epoch=2.pt", "checkpoint_epoch=3.pt"]  # the newest two


@pytest.mark.slow
def test_sigterm_ends_run_killed(tiny_datalist, tmp_path):
    env = bundle_env(tmp_path)
    cmd = _train_cmd(tiny_datalist, tmp_path, max_epochs=6)
    proc, _ = _start_and_wait_for_checkpoint(cmd, env, tmp_path / "out" / "checkpoints", tmp_path / "train.log")
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert not (tmp_path / "out" / "checkpoints" / "COMPLETED").exists()
    runs = runs_of(env["MLFLOW_TRACKING_URI"], BUNDLE)
    assert [r.info.status for r in runs] == ["KILLED"], tail((tmp_path / "train.log").read_text())
    assert "SIGTERM" in runs[0].data.tags["medsr.end_reason"]


@pytest.mark.slow
def test_diverging_run_fails_with_message(tiny_datalist, tmp_path):
    env = bundle_env(tmp_path)
    proc = run(_train_cmd(tiny_datalist, tmp_path, max_epochs=2, learning_rate=1e12), env)
    assert proc.returncode != 0
    assert "training loss became nan" in proc.stdout or "training loss became inf" in proc.stdout, tail(proc.stdout)
    assert "Lower learning_rate" in proc.stdout
    runs = runs_of(env["MLFLOW_TRACKING_URI"], BUNDLE)
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "loss became" in runs[0].data.tags["medsr.end_reason"]
    assert not (tmp_path / "out" / "checkpoints" / "COMPLETED").exists()


def test_sigterm_is_not_raised_inside_a_store_call(tmp_path):
    """SIGTERM arriving while MLflow writes to sqlite must wait until the call returns: interrupting the write
    left the store locked by the process itself, and the run could not be marked KILLED (seen in the test
    above). Outside store calls it is raised at once."""
    import sys

    from medsr_monai.tracking import MLflowRunHandler

    handler = MLflowRunHandler(tracking_uri=tracking_uri(tmp_path), experiment_name="sigterm")
    ns = {"__name__": "mlflow.store.tracking.fake", "handler": handler, "signal": signal, "sys": sys}
    exec("def store_call():\n    handler._on_sigterm(signal.SIGTERM, sys._getframe())\n    return 'done'\n", ns)
    previous = signal.getsignal(signal.SIGALRM)
    try:
        try:
            result = ns["store_call"]()
        except KeyboardInterrupt:
            pytest.fail("SIGTERM was raised inside the store call")
        assert result == "done"
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                time.sleep(0.01)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        handler._on_sigterm(signal.SIGTERM, sys._getframe())


# ----------------------------------------------------------------------------------------------- store checks
def test_tracking_uri_checks(tmp_path, monkeypatch):
    from medsr_monai.tracking import TrackingError, check_tracking_uri, resolve_tracking_uri

    good = tracking_uri(tmp_path)
    check_tracking_uri(good)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", good)
    assert resolve_tracking_uri(REPO / "bundles" / BUNDLE, tracking_uri="sqlite:////elsewhere/x.db") == good

    with pytest.raises(TrackingError, match="file store"):
        check_tracking_uri(f"file://{tmp_path}/mlruns")
    missing = f"sqlite:///{tmp_path}/no/such/folder/mlflow.db"
    with pytest.raises(TrackingError) as err:
        check_tracking_uri(missing)
    assert missing in str(err.value) and "does not exist" in str(err.value)

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    with pytest.raises(TrackingError) as err:
        check_tracking_uri(uri, timeout=5)
    assert uri in error_text(err.value) and "cannot be reached" in str(err.value)
