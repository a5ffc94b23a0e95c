"""The package works when installed from its wheel, outside the checkout.

The wheel is built from a copy of the sources (so the build writes nothing into the checkout) and installed into a
fresh virtual environment that sees this environment's installed dependencies through a ``.pth`` file (offline, no
downloads; ``.pth`` files of that folder are not run, so the checkout's editable install is not on its path). From a
folder outside the checkout, ``medsr --help``, ``medsr tune --help``, the tune defaults, a bundle run and a bundle
named by name must work with the bundles folder given by path, import the installed package, and write nothing next
to the installed package or into the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import zipfile
from pathlib import Path

import pytest
from helpers import PYTHON, REPO, crop_nifti, tail

pytestmark = pytest.mark.slow


def _check(proc: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{tail(proc.stdout + proc.stderr)}"
    return proc


def _run(cmd, cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=str(cwd), env=env, capture_output=True, text=True,
                          timeout=timeout)


def _flat(text: str) -> str:
    """Help text without white space (argparse wraps it)."""
    return "".join(text.split())


def _tree(folder: Path) -> dict[str, int]:
    """``{relative path: size}`` of every file under ``folder`` (byte-code caches left out)."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


def _listing(folder: Path) -> dict[str, float]:
    """Names and modification times of a folder's direct entries (empty when it does not exist)."""
    return {p.name: p.stat().st_mtime for p in folder.iterdir()} if folder.is_dir() else {}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``{"venv", "python", "medsr", "site", "env", "wheel"}``: the wheel installed into a fresh venv under /tmp."""
    root = tmp_path_factory.mktemp("install")
    assert REPO not in root.parents
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "medsr_monai", src / "medsr_monai", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "MLFLOW_TRACKING_URI", "MEDSR_PROJECT_DIR",
                        "MEDSR_BUNDLES_DIR")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1", OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    _check(_run([PYTHON, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                 "-w", root / "dist", src], root, env), "pip wheel")
    (wheel,) = (root / "dist").glob("medsr_monai-*.whl")

    venv = root / "venv"
    _check(_run([PYTHON, "-m", "venv", "--without-pip", venv], root, env), "python -m venv")
    python = venv / "bin" / "python"
    purelib = Path(_check(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root, env),
                          "sysconfig").stdout.strip())
    deps = [p for p in [*site.getsitepackages(), site.getusersitepackages()] if Path(p).is_dir()]
    (purelib / "zz_medsr_test_dependencies.pth").write_text("\n".join(deps) + "\n")
    _check(_run([python, "-m", "pip", "install", "--no-deps", "--ignore-installed", "-q", wheel], root, env),
           "pip install")
    return {"venv": venv, "python": python, "medsr": venv / "bin" / "medsr", "site": purelib, "env": env,
            "wheel": wheel, "deps": deps}


def test_wheel_holds_the_package_and_its_data(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    for f in ("medsr_monai/cli.py", "medsr_monai/paths.py", "medsr_monai/resources/meta_schema.json",
              "medsr_monai/resources/default_tune_space.json"):
        assert f in names, f
    assert not [n for n in names if n.startswith(("tests/", "bundles/", "experiments/", "data/"))]
    (entry,) = [n for n in names if n.endswith("entry_points.txt")]
    assert "medsr = medsr_monai.cli:main" in zipfile.ZipFile(installed["wheel"]).read(entry).decode()


def test_installed_package_runs_outside_the_checkout(installed, sample_dir, tmp_path):
    python, medsr, site_dir = installed["python"], installed["medsr"], installed["site"]
    bundles = tmp_path / "my_bundles"  # a bundles folder of the user's, given by path
    shutil.copytree(REPO / "bundles" / "srcnn", bundles / "srcnn",
                    ignore=shutil.ignore_patterns("models", "eval", "runs", "__pycache__"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(installed["env"], MEDSR_BUNDLES_DIR=str(bundles))
    site_before = _tree(site_dir)
    repo_before = {d: _listing(REPO / d) for d in ("experiments", "mlruns", "data")}

    # the installed copy is the one imported, and the checkout is not on the path
    info = json.loads(_check(_run([python, "-c", (
        "import json, sys, medsr_monai, medsr_monai.paths as p\n"
        "from medsr_monai.cli import build_parser\n"
        "from medsr_monai.tuning.cli import settings_from_args\n"
        "a = build_parser().parse_args(['tune', '--bundle', 'srcnn', '--trials', '1'])\n"
        "s = settings_from_args(a, [])\n"
        "print(json.dumps({'file': medsr_monai.__file__, 'path': sys.path, 'project': str(p.project_dir()),\n"
        "  'bundles': str(p.bundles_dir()), 'bundle': str(s.bundle), 'storage': s.storage,\n"
        "  'output': str(s.output_root), 'best': str(s.best_out), 'space': s.space.source}))")],
        elsewhere, env), "python -c").stdout.strip().splitlines()[-1])
    assert Path(info["file"]).parent == site_dir / "medsr_monai", info["file"]
    assert not [d for d in info["path"] if d.startswith(str(REPO)) and d not in installed["deps"]], info["path"]
    assert info["project"] == str(elsewhere) and info["bundles"] == str(bundles)
    assert info["bundle"] == str(bundles / "srcnn")
    assert info["storage"] == f"sqlite:///{(elsewhere / 'experiments' / 'optuna.db').as_posix()}"
    assert info["output"] == str(elsewhere / "experiments" / "tune" / "srcnn")
    assert info["best"] == str(elsewhere / "experiments" / "best" / "srcnn" / "srcnn.json")
    assert info["space"] == "default"  # the built-in space: package data read from the installed wheel

    proc = _check(_run([medsr, "--help"], elsewhere, env), "medsr --help")
    assert "tune" in proc.stdout and "$MEDSR_PROJECT_DIR" in _flat(proc.stdout)
    proc = _check(_run([medsr, "tune", "--help"], elsewhere, env), "medsr tune --help")
    assert "sqlite:///<project>/experiments/optuna.db" in _flat(proc.stdout)

    # a bundle run with plain paths, the bundle given by path
    scan = crop_nifti(sample_dir / "nifti" / "brain2.nii.gz", tmp_path / "scan.nii.gz", (48, 48, 3))
    out = elsewhere / "sr"
    proc = _check(_run([python, "-m", "monai.bundle", "run",
                        "--config_file", bundles / "srcnn" / "configs" / "inference.json",
                        "--bundle_root", bundles / "srcnn", "--input", scan, "--output_dir", out,
                        "--ckpt_path", "$None"], elsewhere, env), "bundle inference")
    import nibabel as nib

    assert nib.load(str(out / "scan_sr.nii.gz")).shape == (96, 96, 3), tail(proc.stdout + proc.stderr)

    # a bundle named by name, not in the bundles folder given by path: one clear error line, no traceback
    proc = _run([medsr, "demo", "--bundles-dir", bundles, "--bundles", "nosuch"], elsewhere, env)
    assert proc.returncode == 2, tail(proc.stdout + proc.stderr)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"medsr demo: error: no bundle 'nosuch' in the bundles folder {bundles} "
                           f"(bundles there: srcnn)"), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout

    # nothing beside the installed package, nothing in the checkout; the project's files went to the working folder
    assert _tree(site_dir) == site_before
    for d in ("experiments", "mlruns", "data", "bundles"):
        assert not (site_dir / d).exists() and not (site_dir.parent / d).exists(), d
    assert {d: _listing(REPO / d) for d in repo_before} == repo_before
    assert (elsewhere / "mlruns").is_dir() and not (elsewhere / "experiments").exists()
