"""Where ``medsr`` puts and finds things (:mod:`medsr_monai.paths`): flag > environment variable > working directory,
never the package's own folder; a bundle named by name is found in the bundles folder or refused naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import REPO

import medsr_monai
from medsr_monai.paths import PathError, bundle_arg, bundles_dir, experiments_dir, find_bundle, project_dir


@pytest.fixture
def clean(monkeypatch, tmp_path):
    """No path settings in the environment; the working directory an empty folder outside the checkout."""
    for var in ("MEDSR_PROJECT_DIR", "MEDSR_BUNDLES_DIR", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def _project(root: Path, *bundles: str) -> Path:
    for b in bundles:
        (root / "bundles" / b / "configs").mkdir(parents=True)
    (root / "bundles").mkdir(parents=True, exist_ok=True)
    (root / "mlruns").mkdir()
    return root


def test_project_folder_flag_then_environment_then_working_directory(clean, tmp_path, monkeypatch):
    package = Path(medsr_monai.__file__).resolve().parent
    assert project_dir() == clean and package.parent != clean
    assert experiments_dir() == clean / "experiments"
    proj = _project(tmp_path / "proj", "srcnn")
    monkeypatch.setenv("MEDSR_PROJECT_DIR", str(proj))
    assert project_dir() == proj
    assert project_dir(clean) == clean  # the flag wins
    monkeypatch.setenv("MEDSR_PROJECT_DIR", str(tmp_path / "typo"))
    with pytest.raises(PathError, match=r"MEDSR_PROJECT_DIR .*typo: no such folder"):
        project_dir()
    with pytest.raises(PathError, match=r"--project-dir .*nope: no such folder"):
        project_dir(tmp_path / "nope")


def test_project_folder_found_upwards_and_from_a_bundle(clean, tmp_path, monkeypatch):
    proj = _project(tmp_path / "proj", "srcnn")
    deep = proj / "sub" / "dir"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    assert project_dir() == proj  # like git: the nearest folder upwards holding bundles/ and mlruns/
    monkeypatch.chdir(clean)
    assert project_dir(bundle_root=proj / "bundles" / "srcnn") == proj  # a bundle of a project records there
    assert project_dir(bundle_root=tmp_path / "unpacked" / "srcnn") == clean  # a bundle elsewhere: here
    monkeypatch.chdir(REPO / "tests")
    assert project_dir() == REPO


def test_bundles_folder_and_bundles_by_name(clean, tmp_path, monkeypatch):
    proj = _project(tmp_path / "proj", "srcnn", "edsr")
    other = _project(tmp_path / "other", "unet") / "bundles"
    assert bundles_dir() == clean / "bundles"
    assert bundles_dir(project=proj) == proj / "bundles"
    assert find_bundle("srcnn", project=proj) == proj / "bundles" / "srcnn"
    monkeypatch.setenv("MEDSR_BUNDLES_DIR", str(other))
    assert find_bundle("unet") == other / "unet"
    assert find_bundle("srcnn", bundles=proj / "bundles") == proj / "bundles" / "srcnn"  # the flag wins
    with pytest.raises(PathError) as err:
        find_bundle("nosuch", bundles=proj / "bundles")
    assert f"no bundle 'nosuch' in the bundles folder {proj / 'bundles'} (bundles there: edsr, srcnn)" in str(err.value)
    with pytest.raises(PathError, match="that folder does not exist"):
        find_bundle("srcnn", bundles=tmp_path / "missing")
    # a bundle argument: a path as written, or a bare name looked up in the bundles folder
    assert bundle_arg("unet") == other / "unet"
    assert bundle_arg("some/path") == Path("some/path")
    (clean / "unet").mkdir()
    assert bundle_arg("unet") == Path("unet")  # a folder here wins over the bundles folder


def test_cli_defaults_come_from_the_project_folder(clean, tmp_path, capsys):
    from medsr_monai.cli import build_parser, main
    from medsr_monai.tuning.cli import settings_from_args

    proj = _project(tmp_path / "proj", "srcnn")
    assert main(["ui", "--print-only", "--project-dir", str(proj)]) == 0
    assert f"sqlite:///{proj}/mlruns/mlflow.db" in capsys.readouterr().out
    args = build_parser().parse_args(["tune", "--bundle", str(REPO / "bundles" / "srcnn"), "--trials", "1",
                                      "--project-dir", str(proj)])
    s = settings_from_args(args, [])
    assert s.storage == f"sqlite:///{proj}/experiments/optuna.db"
    assert s.output_root == proj / "experiments" / "tune" / "srcnn"
    assert s.best_out == proj / "experiments" / "best" / "srcnn" / "srcnn.json"
    assert s.space.source == "default"  # no experiments/spaces/srcnn.json in this project
    assert s.tracking_uri == f"sqlite:///{proj}/mlruns/mlflow.db"
    assert not (clean / "experiments").exists() and not (clean / "mlruns").exists()

    def tune_storage(bundle: Path) -> str:
        return settings_from_args(build_parser().parse_args(["tune", "--bundle", str(bundle), "--trials", "1"]),
                                  []).storage

    # no flag: the project the bundle sits in (as for its MLflow store), else the working directory
    assert tune_storage(proj / "bundles" / "srcnn") == f"sqlite:///{proj}/experiments/optuna.db"
    loose = tmp_path / "unpacked" / "srcnn"
    (loose / "configs").mkdir(parents=True)
    assert tune_storage(loose) == f"sqlite:///{clean}/experiments/optuna.db"


def test_demo_refuses_a_missing_bundle_before_anything_runs(clean, tmp_path, capsys):
    from medsr_monai.cli import main

    proj = _project(tmp_path / "proj", "srcnn")
    rc = main(["demo", "--bundles", "srcnn", "nosuch", "--project-dir", str(proj)])
    out, err = capsys.readouterr()
    assert rc == 2
    assert err.strip().splitlines()[-1] == (
        f"medsr demo: error: no bundle 'nosuch' in the bundles folder {proj / 'bundles'} (bundles there: srcnn); "
        f"give the folder holding it with --bundles-dir or MEDSR_BUNDLES_DIR, or run from the project folder")
    assert not (proj / "data").exists() and not (proj / "experiments").exists()  # nothing fetched, nothing run


def test_version_flag_prints_the_package_version(capsys):
    from medsr_monai import __version__
    from medsr_monai.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"medsr-monai {__version__}"
