"""Many machines, for real: ``medsr tune`` with two worker processes against a real PostgreSQL (Optuna storage) and a
real ``mlflow server`` (tracking in PostgreSQL too, artifacts uploaded over HTTP), both on loopback.

A throwaway PostgreSQL cluster is made with ``initdb`` and started with ``pg_ctl`` on 127.0.0.1 (PostgreSQL refuses
to run as root: as root, the cluster belongs to the ``postgres`` system user, else ``nobody``, and its commands run
through ``runuser``). The test checks where everything lands: the trials in the ``optuna`` database (read with
Optuna and with plain SQL), one parent MLflow run per study and one nested run per trial in the ``mlflow`` database,
and the runs' artifacts as files under the server's artifact destination (the workers send them over HTTP, as
workers on other machines would). Skipped, with the reason, only where PostgreSQL's server binaries are not
installed (``.ci/run`` installs Debian's ``postgresql`` when it runs as root).
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from helpers import PYTHON, REPO, TINY_TRAIN, bundle_env, free_port, mlflow_server, run, tail

optuna = pytest.importorskip("optuna")
psycopg2 = pytest.importorskip("psycopg2", reason="psycopg2-binary (the test extra) is not installed")


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    which = shutil.which("initdb") or shutil.which("pg_ctl")
    return Path(which).parent if which else None


class Postgres:
    """A temporary PostgreSQL cluster on 127.0.0.1 (trust authentication: loopback only, removed afterwards)."""

    def __init__(self, bindir: Path, root: Path):
        self.bindir, self.port, self.user = bindir, free_port(), "medsr"
        self.owner = None
        if os.geteuid() == 0:  # postgres refuses root: the cluster belongs to an unprivileged system user
            for name in ("postgres", "nobody"):
                try:
                    self.owner = pwd.getpwnam(name)
                    break
                except KeyError:
                    continue
            if self.owner is None or shutil.which("runuser") is None:
                pytest.skip("running as root without a 'postgres'/'nobody' user or runuser: cannot start PostgreSQL")
            # pytest's tmp_path lies under a root-only (0700) folder the server's user cannot enter
            root = Path(tempfile.mkdtemp(prefix="medsr-pg-"))
            os.chown(root, self.owner.pw_uid, self.owner.pw_gid)
        self.root, self.data, self.log = root, root / "data", root / "server.log"

    def _cmd(self, *args: str) -> list[str]:
        return (["runuser", "-u", self.owner.pw_name, "--"] if self.owner else []) + list(args)

    def start(self) -> None:
        env = {**os.environ, "LC_ALL": "C"}
        subprocess.run(self._cmd(str(self.bindir / "initdb"), "-D", str(self.data), "-U", self.user, "-A", "trust",
                                 "-E", "UTF8", "--no-sync"), check=True, capture_output=True, env=env, cwd=self.root)
        opts = f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c max_connections=50"
        proc = subprocess.run(self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                                        "-o", opts, "-w", "-t", "60", "start"),
                              capture_output=True, text=True, env=env, cwd=self.root)
        if proc.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {proc.stdout}{proc.stderr}\n{self.log.read_text()[-2000:]}")
        for db in ("optuna", "mlflow"):
            with self.connect("postgres") as conn:
                conn.autocommit = True
                conn.cursor().execute(f"CREATE DATABASE {db}")

    def url(self, db: str) -> str:
        # the driver named: SQLAlchemy 2.1 takes plain postgresql:// to mean psycopg 3
        return f"postgresql+psycopg2://{self.user}@127.0.0.1:{self.port}/{db}"

    def connect(self, db: str):
        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, dbname=db)
        return _Closing(conn)

    def stop(self) -> None:
        subprocess.run(self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"),
                       capture_output=True, cwd=self.root)
        if self.owner:
            shutil.rmtree(self.root, ignore_errors=True)


class _Closing:
    def __init__(self, conn):
        self.conn = conn

    def __enter__(self):
        return self.conn

    def __exit__(self, *exc):
        self.conn.close()


@pytest.fixture
def postgres(tmp_path):
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed: `apt-get install postgresql` "
                    "(.ci/run does it when it runs as root)")
    pg = Postgres(bindir, tmp_path / "pg")
    (tmp_path / "pg").mkdir(exist_ok=True)
    try:
        pg.start()
        yield pg
    finally:
        pg.stop()


@pytest.fixture
def server(postgres, tmp_path):
    """``mlflow server`` on 127.0.0.1: runs in PostgreSQL, artifacts served (uploaded over HTTP) into a folder."""
    artifacts = tmp_path / "mlflow-artifacts"
    with mlflow_server(postgres.url("mlflow"), ["--artifacts-destination", artifacts.as_uri(), "--serve-artifacts"],
                       tmp_path / "mlflow-server.log", timeout=180) as url:
        yield {"url": url, "artifacts": artifacts}


@pytest.mark.slow
def test_tune_with_two_workers_on_postgres_and_an_mlflow_server(postgres, server, tiny_datalist, tmp_path):
    from mlflow import MlflowClient

    fixed = {k: v for k, v in TINY_TRAIN.items() if k != "batch_size"}
    fixed["max_epochs"] = 1
    space = tmp_path / "space.json"
    space.write_text(json.dumps({
        "params": {"batch_size": {"type": "categorical", "choices": [4]},
                   "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
        "fixed": fixed}))
    trials, study = 4, "pg"
    storage = postgres.url("optuna")
    env = bundle_env(tmp_path, OMP_NUM_THREADS="1", MLFLOW_TRACKING_URI=server["url"])
    t0 = time.monotonic()
    proc = run([PYTHON, "-m", "medsr_monai", "tune", "--bundle", str(REPO / "bundles" / "srcnn"), "--trials",
                str(trials), "--study", study, "--workers", "2", "--pruner", "none", "--storage", storage,
                "--tracking-uri", server["url"], "--space", str(space),
                "--set", f"dataset_dir={tiny_datalist.parent}", "--output", str(tmp_path / "tune"),
                "--best-dir", str(tmp_path / "best")], env, timeout=900)
    assert proc.returncode == 0, tail(proc.stdout)
    print(f"study of {trials} trials, 2 workers: {time.monotonic() - t0:.0f} s")

    # the trials are in PostgreSQL: through Optuna, and as rows of Optuna's own tables
    st = optuna.load_study(study_name=study, storage=storage)
    assert len(st.trials) == trials and all(t.state.name == "COMPLETE" for t in st.trials)
    assert len({t.user_attrs["pid"] for t in st.trials}) == 2, "both workers ran trials"
    with postgres.connect("optuna") as conn:
        cur = conn.cursor()
        cur.execute("SELECT count(*) FROM trials t JOIN studies s ON s.study_id = t.study_id "
                    "WHERE s.study_name = %s AND t.state = 'COMPLETE'", (study,))
        assert cur.fetchone()[0] == trials
    assert not (tmp_path / "tune" / "optuna.db").exists() and not list(tmp_path.rglob("optuna.db"))

    # the runs are on the MLflow server (in its PostgreSQL database): one parent, one nested run per trial
    client = MlflowClient(server["url"])
    exp = client.get_experiment_by_name("srcnn-tune")
    assert exp is not None
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("medsr.tune_study") == study]
    parents = [r for r in runs if r.data.tags.get("medsr.tune_role") == "study"]
    children = sorted((r for r in runs if r.data.tags.get("medsr.tune_role") == "trial"),
                      key=lambda r: int(r.data.tags["optuna.trial_number"]))
    assert len(parents) == 1 and len(children) == trials
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert [int(r.data.tags["optuna.trial_number"]) for r in children] == [t.number for t in st.trials]
    for t, r in zip(st.trials, children):
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.info.status == "FINISHED" and r.data.tags["optuna.trial_state"] == "COMPLETE"
        assert t.user_attrs["mlflow_run_id"] == r.info.run_id
        assert "val_psnr" in r.data.metrics
    with postgres.connect("mlflow") as conn:
        cur = conn.cursor()
        cur.execute("SELECT count(*) FROM runs WHERE experiment_id = %s", (int(exp.experiment_id),))
        assert cur.fetchone()[0] >= trials + 1

    # the artifacts went over HTTP into the server's artifact destination, one folder per run
    dest = server["artifacts"]
    for r in [parent, *children]:
        listed = client.list_artifacts(r.info.run_id)
        assert listed, f"run {r.info.run_id} has no artifacts"
        on_disk = [p for p in (dest / exp.experiment_id / r.info.run_id / "artifacts").rglob("*") if p.is_file()]
        assert on_disk, f"no artifact files of run {r.info.run_id} under {dest}"
        assert {a.path.split("/")[0] for a in listed} <= {p.relative_to(dest / exp.experiment_id / r.info.run_id / "artifacts").parts[0] for p in on_disk}
    assert not (tmp_path / "mlruns").exists()  # nothing fell back to a local store
