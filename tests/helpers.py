"""Helpers shared by the integration tests: run bundles through the real ``monai.bundle`` CLI (or
in-process), read what they recorded in MLflow, and build small real inputs.

Every subprocess gets ``MLFLOW_TRACKING_URI=sqlite:///<tmp>/mlflow.db`` so that no test ever writes to
the project's own store (``<repo>/mlruns``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
BUNDLES = ("srcnn", "edsr")

#: the smallest settings that still train and validate on the tiny 64x64x6 crops
TINY_TRAIN = {
    "patch_size": 32,
    "patches_per_slice": 1,
    "batch_size": 4,
    "max_epochs": 1,
    "val_slices_per_volume": 2,
}


def config(bundle: str, name: str) -> Path:
    return REPO / "bundles" / bundle / "configs" / f"{name}.json"


def config_arg(bundle: str, *names: str) -> str:
    """``--config_file`` value: one file, or MONAI's list syntax ``"['a.json','b.json']"``."""
    files = [str(config(bundle, n)) for n in names]
    return files[0] if len(files) == 1 else "[" + ",".join(f"'{f}'" for f in files) + "]"


def expr(path: str | os.PathLike) -> str:
    """A path as a config *expression* (``$'/abs/path'``): plain strings break MONAI's saved config."""
    return f"$'{Path(path).resolve()}'"


_STORE_TEMPLATE: list[Path] = []


def empty_store(db: Path) -> None:
    """Put an empty MLflow sqlite store at ``db`` (nothing there yet) by copying one migrated once per process.

    Why: a new sqlite store runs MLflow's ~50 schema migrations on first contact, about 4 s of CPU, and the suite
    makes about 80 private stores. The copy is what a fresh store is after its migrations, minus the ``Default``
    experiment: MLflow creates that on first contact with an empty experiments table, with the artifact root of the
    process that connects, exactly as it does for a new store."""
    import atexit
    import shutil
    import sqlite3
    import tempfile

    if not _STORE_TEMPLATE:
        from mlflow.tracking import MlflowClient

        tpl = Path(tempfile.mkdtemp(prefix="medsr-store-template-")) / "mlflow.db"
        atexit.register(shutil.rmtree, tpl.parent, True)
        MlflowClient(f"sqlite:///{tpl.as_posix()}").search_experiments()
        with contextlib.closing(sqlite3.connect(tpl)) as con, con:
            con.execute("DELETE FROM experiments")
        _STORE_TEMPLATE.append(tpl)
    db.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_STORE_TEMPLATE[0], db)


def bundle_env(tmp: str | os.PathLike, fresh_store: bool = False, **extra: str) -> dict[str, str]:
    """Environment for a bundle subprocess: a private sqlite MLflow store under ``tmp`` (:func:`empty_store` when
    there is none yet; ``fresh_store``: left for the subprocess to create, for tests of that step), the repository on
    ``PYTHONPATH`` (the package is used from the work tree), unbuffered output."""
    db = Path(tmp).resolve() / "mlflow.db"
    if not (fresh_store or "MLFLOW_TRACKING_URI" in extra or db.exists() or REPO in db.parents):
        empty_store(db)
    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = tracking_uri(tmp)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    env["MEDSR_LOG_MODEL"] = "0"  # no MLflow model per tiny training (~3 s each); the shared fixture logs one
    env.setdefault("OMP_NUM_THREADS", "2")
    env.update(extra)
    return env


def copy_store(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """A consistent copy of the sqlite MLflow store folder ``src`` (its ``mlflow.db``) into ``dest``, through sqlite's
    backup API. The runs keep their artifact locations (absolute paths under ``src``): the copy reads them, and new
    runs in the copy go where the writing process puts them. Tests use it to start from the shared trained fixture's
    runs instead of training again."""
    import sqlite3

    Path(dest).mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(Path(src) / "mlflow.db")) as a, \
            contextlib.closing(sqlite3.connect(Path(dest) / "mlflow.db")) as b:
        a.backup(b)


def tracking_uri(tmp: str | os.PathLike) -> str:
    return f"sqlite:///{(Path(tmp).resolve() / 'mlflow.db').as_posix()}"


def overrides_to_args(overrides: dict[str, Any]) -> list[str]:
    args: list[str] = []
    for k, v in overrides.items():
        args += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
    return args


def bundle_cmd(command: str, bundle: str, configs: Sequence[str], **overrides: Any) -> list[str]:
    """``python -m monai.bundle <command> --config_file ... --bundle_root bundles/<b> --k v ...``."""
    return [PYTHON, "-m", "monai.bundle", command, "--config_file", config_arg(bundle, *configs),
            "--bundle_root", str(REPO / "bundles" / bundle), *overrides_to_args(overrides)]


def run(cmd: Sequence[str], env: dict[str, str], timeout: float = 600, cwd: str | os.PathLike = REPO
        ) -> subprocess.CompletedProcess:
    """Run ``cmd``; stdout and stderr together in ``.stdout``; ``.duration`` in seconds."""
    t0 = time.monotonic()
    proc = subprocess.run(list(cmd), env=env, cwd=str(cwd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)
    proc.duration = time.monotonic() - t0  # type: ignore[attr-defined]
    return proc


def tail(text: str, n: int = 4000) -> str:
    return text[-n:]


def sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot(folder: str | os.PathLike) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder``."""
    root = Path(folder)
    return {str(p.relative_to(root)): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def error_text(exc: BaseException) -> str:
    """The messages of an exception and of every exception it was raised from (MONAI wraps config errors)."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------- MLflow
def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def runs_of(uri: str, experiment: str) -> list:
    """All runs of ``experiment`` (oldest first); empty when the experiment does not exist."""
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return sorted(runs, key=lambda r: r.info.start_time)


def artifact_paths(uri: str, run_id: str) -> list[str]:
    client = mlflow_client(uri)
    out, todo = [], [None]
    while todo:
        for a in client.list_artifacts(run_id, todo.pop()):
            (todo if a.is_dir else out).append(a.path)
    return sorted(out)


def download_artifact(uri: str, run_id: str, path: str, dst: str | os.PathLike) -> Path:
    Path(dst).mkdir(parents=True, exist_ok=True)
    return Path(mlflow_client(uri).download_artifacts(run_id, path, str(dst)))


# ----------------------------------------------------------------------------------------------- training
@dataclass
class TrainedBundle:
    """A bundle trained once on the tiny data through the real CLI (see the ``trained_bundle`` fixture)."""

    bundle: str
    root: Path
    dataset_dir: Path
    output_dir: Path
    ckpt_dir: Path
    env: dict[str, str]
    proc: subprocess.CompletedProcess
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return self.env["MLFLOW_TRACKING_URI"]

    @property
    def model(self) -> Path:
        return self.ckpt_dir / "model.pt"

    def check(self) -> None:
        assert self.proc.returncode == 0, f"training {self.bundle} failed:\n{tail(self.proc.stdout)}"


def train_tiny(bundle: str, datalist: Path, root: Path, **extra: Any) -> TrainedBundle:
    output_dir, ckpt_dir = root / "out", root / "models"
    overrides = {"dataset_dir": expr(datalist.parent), "output_dir": expr(output_dir), "ckpt_dir": expr(ckpt_dir),
                 **TINY_TRAIN, **extra}
    env = bundle_env(root)
    proc = run(bundle_cmd("run", bundle, ["train"], **overrides), env)
    return TrainedBundle(bundle, root, datalist.parent, output_dir, ckpt_dir, env, proc, overrides)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(bundle: str, configs: Sequence[str], nproc: int = 2, **overrides: Any) -> list[str]:
    """``torchrun --nproc_per_node=N --master_port=<free> -m monai.bundle run ...``: a free port per call, so that
    concurrent test processes never meet on the same rendezvous."""
    return [PYTHON, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
            *bundle_cmd("run", bundle, configs, **overrides)[1:]]


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, artifact_args: Sequence[str], log_path: Path, timeout: float = 120):
    """``mlflow server`` on 127.0.0.1 at a free port over ``backend_store_uri`` (``artifact_args``: its artifact
    options), output to ``log_path``; yields the URL once ``/health`` answers; stopped (terminate, then kill) on exit.
    Fails the test with the server's log when it does not come up within ``timeout`` seconds."""
    import urllib.request

    import pytest

    url = f"http://127.0.0.1:{free_port()}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [PYTHON, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri, *artifact_args,
             "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1], "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MLFLOW_TRACKING_URI": ""})
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    with urllib.request.urlopen(url + "/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail(f"mlflow server did not start:\n{Path(log_path).read_text()[-3000:]}")
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def kill_after_first_checkpoint(cmd: Sequence[str], env: dict[str, str], ckpt_dir: Path, log_path: Path,
                                timeout: float = 300) -> subprocess.Popen:
    """Start a training command (output to ``log_path``), SIGKILL it as soon as a ``checkpoint_*.pt`` appears in
    ``ckpt_dir`` (or at ``timeout``) and reap it: a run killed half-way, without a chance to clean up."""
    import signal

    with open(log_path, "w") as log:
        proc = subprocess.Popen(list(cmd), env=env, cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None and not list(Path(ckpt_dir).glob("checkpoint_*.pt")):
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return proc


def network_from_config(bundle: str, name: str = "inference", **overrides: Any):
    """``network_def`` of a bundle config, instantiated in-process (weights as initialised)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(config(bundle, name)))
    parser["bundle_root"] = str(REPO / "bundles" / bundle)
    for k, v in overrides.items():
        parser[k] = v
    return parser.get_parsed_content("network_def", instantiate=True)


SCHEMA = REPO / "medsr_monai" / "resources" / "meta_schema.json"


def bundle_tools(bundle: str, ckpt: str | os.PathLike, ts_file: str | os.PathLike,
                 input_shape: Sequence[int] | None = None, verify_n: int = 1, **net_overrides: Any) -> None:
    """MONAI's ``verify_metadata``, ``verify_net_in_out`` and ``ckpt_export`` on ``bundle``, in this process: the
    functions ``python -m monai.bundle <tool>`` dispatches to, without three interpreter start-ups (about 10 s of CPU
    each: importing monai). ``tests/test_bundles.py`` runs the same tools through the CLI. Each raises on a failure.
    ``input_shape``: export by tracing for that input (physics models: their physics is a plain Python object);
    ``net_overrides``: config overrides of the exported network (a tiny trained variant)."""
    from monai.bundle import ckpt_export, verify_metadata, verify_net_in_out

    meta, inf = str(config(bundle, "metadata")), str(config(bundle, "inference"))
    verify_metadata(meta_file=meta, filepath=str(SCHEMA))
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=inf, device="cpu", n=verify_n)
    trace = {"use_trace": True, "input_shape": list(input_shape)} if input_shape is not None else {}
    ckpt_export(net_id="network_def", filepath=str(ts_file), ckpt_file=str(ckpt), meta_file=meta, config_file=inf,
                **trace, **net_overrides)
    assert Path(ts_file).is_file()


def export_matches_eager(bundle: str, ckpt: str | os.PathLike, x, tmp_path: Path, verify_n: int = 1,
                         **net_overrides: Any):
    """:func:`bundle_tools` on the trained ``ckpt`` (physics models traced for ``x``'s shape), then the TorchScript
    network must compute what the eager trained network computes on ``x``; returns ``(eager network, its output)``
    for the caller's own checks."""
    import torch

    ts_file = tmp_path / f"{bundle}.ts"
    eager = network_from_config(bundle, **net_overrides)
    bundle_tools(bundle, ckpt, ts_file, list(x.shape) if hasattr(eager, "physics") else None, verify_n,
                 **net_overrides)
    eager.load_state_dict(load_state(ckpt))
    eager.eval()
    with torch.no_grad():
        y_eager, y_ts = eager(x), torch.jit.load(str(ts_file))(x)
    torch.testing.assert_close(y_ts, y_eager, atol=1e-5, rtol=1e-5)
    return eager, y_eager


def load_state(path: str | os.PathLike) -> dict:
    import torch

    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("network"), dict):
        state = state["network"]
    return state


# ----------------------------------------------------------------------------------------------- data
def crop_nifti(src: str | os.PathLike, dest: str | os.PathLike, size: Sequence[int]) -> Path:
    """Centre crop of a real NIfTI (nibabel's slicer keeps the affine right), voxel type kept."""
    import nibabel as nib
    import numpy as np

    from medsr_monai.data import write_nifti

    img = nib.load(str(src))
    starts = [(s - c) // 2 for s, c in zip(img.shape[:3], size)]
    crop = img.slicer[tuple(slice(a, a + c) for a, c in zip(starts, size))]
    return write_nifti(dest, np.asanyarray(crop.dataobj), crop.affine)


def keys_cubic(t):
    """Keys' cubic convolution kernel, a = -0.5 (closed form)."""
    import numpy as np

    a, d = -0.5, np.abs(t)
    return np.where(d <= 1, (a + 2) * d**3 - (a + 3) * d**2 + 1,
                    np.where(d < 2, a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a, 0.0))


def corner_cubic(x, axis: int, s: int):
    """Cubic interpolation by ``s`` along ``axis`` on the corner grid (LR voxel i at HR voxel s*i), edges
    replicated: HR voxel j sits at LR coordinate j/s and takes the 4 LR neighbours with Keys weights."""
    import numpy as np

    n = x.shape[axis]
    u = np.arange(s * n) / s
    base = np.floor(u).astype(int)
    t = u - base
    out = 0.0
    shape = [1] * x.ndim
    shape[axis] = -1
    for o in (-1, 0, 1, 2):
        idx = np.clip(base + o, 0, n - 1)
        out = out + np.take(x, idx, axis=axis) * keys_cubic(t - o).reshape(shape)
    return out


def kspace_zerofill_np(x, axis: int, s: int):
    """Independent numpy k-space zero-filling by ``s`` along ``axis`` (the inverse of keeping the central ``n``
    frequencies): the mean-normalised spectrum is zero-padded to ``s * n`` bins, an even-size Nyquist bin split
    equally between +-n/2, and inverse-transformed; corner grid (LR voxel i at HR voxel s*i)."""
    import numpy as np

    x = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    n = x.shape[-1]
    big = s * n
    spec = np.fft.fft(x, axis=-1) / n
    half = n // 2
    pad = np.zeros(x.shape[:-1] + (big,), dtype=complex)
    if n % 2:
        pad[..., : half + 1] = spec[..., : half + 1]
        pad[..., big - half:] = spec[..., half + 1:]
    else:
        pad[..., :half] = spec[..., :half]
        pad[..., half] = 0.5 * spec[..., half]
        pad[..., big - half] = 0.5 * spec[..., half]
        pad[..., big - half + 1:] = spec[..., half + 1:]
    return np.moveaxis((np.fft.ifft(pad, axis=-1) * big).real, -1, axis)
