"""``medsr tune``: an Optuna study over a bundle's own ``configs/train.json``.

The main process creates (or reloads) the study and its MLflow parent run, runs the trials itself (``workers=1``)
or starts ``workers`` processes on the same storage, and at the end writes the best trial as a bundle override
file, Optuna's plots and a trials table, and ends the parent run. Running the same command again continues the
study up to ``trials`` trials in total.

Before anything is created (storage, MLflow run, trial) the study is checked: the space against the bundle, the
trial count, the best-override file (one per study, ``experiments/best/<bundle>/<study>.json``, never another
study's), and the bundle's data with the study's overrides (the datalist parsed once, every image present).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from medsr_monai.tuning.space import Objective, SearchSpace
from medsr_monai.tuning.tracking import StudyTracker, mask_url
from medsr_monai.tuning.trial import TrialSetup, as_override, bundle_parser, run_trial

__all__ = ["TuneSettings", "TuneError", "tune", "run_worker", "open_storage", "write_best_override",
           "sampler_seed", "trials_table", "default_study_name", "default_best_file", "best_file_owner", "check_data"]

#: trial states that use up the study's trial budget (``--trials`` counts all of them)
_COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)


class TuneError(RuntimeError):
    """A study that cannot start or go on (storage, tracking, objective); the message says what to change."""


@dataclass
class TuneSettings:
    """Everything one ``medsr tune`` invocation needs (the CLI builds it; tests may build it directly)."""

    bundle: Path
    trials: int
    study_name: str
    storage: str
    space: SearchSpace
    objective: Objective
    tracking_uri: str
    output_root: Path
    best_out: Path
    fixed: dict[str, Any] = field(default_factory=dict)
    workers: int = 1
    timeout: float | None = None
    seed: int = 0
    enqueue: list[dict[str, Any]] = field(default_factory=list)
    default_trial: bool = True
    pruner: str = "median"
    argv: list[str] = field(default_factory=list)
    overwrite_best: bool = False
    config: str = "train"


def open_storage(url: str, heartbeat: int = 60):
    """Optuna RDB storage with heartbeats (a trial whose worker died is failed after ``2 * heartbeat`` s) and a
    patient sqlite connection (several local workers write the same file)."""
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:"):
        path = Path(url.split(":///", 1)[-1])
        path.parent.mkdir(parents=True, exist_ok=True)
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat, grace_period=2 * heartbeat, **kwargs)
    except Exception as e:  # noqa: BLE001 - driver missing, server down, bad URL: name the storage
        raise TuneError(f"Optuna storage {mask_url(url)!r} cannot be opened: {type(e).__name__}: {e} "
                        f"(for PostgreSQL/MySQL install the driver, e.g. psycopg2-binary / pymysql)") from e


def sampler_seed(base: int, worker: int, n_existing: int) -> int:
    """Each worker, and each resumed call, gets its own sampler seed: a seeded TPE sampler in a new process would
    otherwise replay the same parameters as the one before it."""
    return base + 1000 * worker + n_existing


def _trial_seed(seed: int, number: int) -> int:
    return (seed * 1_000_003 + number) % (2**32)


class _TrialSeededTPE(optuna.samplers.TPESampler):
    """TPE whose random state is reseeded from (process seed, trial number) before every trial.

    Trial numbers are unique within a study, so two ``medsr tune`` processes started separately on one storage with
    the same seed (both finding an empty study) still draw different parameters, while one process re-run from the
    same state draws the same ones.
    """

    def __init__(self, seed: int, **kwargs: Any) -> None:
        super().__init__(seed=seed, **kwargs)
        self._medsr_seed = seed

    def before_trial(self, study, trial) -> None:
        seed = _trial_seed(self._medsr_seed, trial.number)
        states = [getattr(self, "_rng", None), getattr(getattr(self, "_random_sampler", None), "_rng", None)]
        if all(hasattr(st, "rng") for st in states):
            for st in states:
                st.rng.seed(seed)
        else:  # optuna moved its private random states: at least never replay another process's draws
            self.reseed_rng()
        super().before_trial(study, trial)


def _pruner(settings: TuneSettings):
    cfg = dict(settings.space.pruner)
    if settings.pruner == "none" or cfg.get("type") == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=int(cfg.get("n_startup_trials", 3)),
                                       n_warmup_steps=int(cfg.get("n_warmup_steps", 1)))


def _load_study(settings: TuneSettings, storage, worker: int):
    n_existing = 0
    try:
        n_existing = len(optuna.load_study(study_name=settings.study_name, storage=storage).trials)
    except KeyError:
        pass
    seed = sampler_seed(settings.seed, worker, n_existing)
    sampler = _TrialSeededTPE(seed=seed, constant_liar=True)
    study = optuna.create_study(study_name=settings.study_name, storage=storage, direction="maximize",
                                sampler=sampler, pruner=_pruner(settings), load_if_exists=True)
    return study, seed


def _storage_lock(url: str, timeout: float = 300.0):
    """An OS file lock beside a sqlite storage (``<db>.lock``) for the check-then-insert steps that processes
    sharing the storage must not interleave; a server storage (PostgreSQL, MySQL) gets no lock (its processes
    may run on other machines), so there ``skip_if_exists`` alone keeps queued trials apart."""
    import contextlib

    if not url.startswith("sqlite:///"):
        return contextlib.nullcontext()
    from filelock import FileLock

    return FileLock(url[len("sqlite:///"):] + ".lock", timeout=timeout)


def _bundle_defaults(settings: TuneSettings) -> dict[str, Any]:
    """The bundle's own values of the searched parameters (with the fixed overrides applied) that lie in the space."""
    parser = bundle_parser(settings.bundle, {k: as_override(v) for k, v in settings.fixed.items()}, settings.config)
    out = {}
    for key in settings.space.params:
        try:
            value = parser.get_parsed_content(key, instantiate=False)
        except Exception:  # noqa: BLE001 - an id the bundle computes from others: let the sampler choose it
            continue
        if settings.space.contains(key, value):
            out[key] = value
    return out


def _check_bundle(settings: TuneSettings) -> tuple[str, dict[str, Any]]:
    """Fail before any trial if the space names ids the bundle's train.json does not have."""
    train = settings.bundle / "configs" / f"{settings.config}.json"
    if not train.is_file():
        raise TuneError(f"{settings.bundle} is not a bundle: {train} does not exist")
    plain = bundle_parser(settings.bundle, config=settings.config)
    missing = []
    for key in list(settings.space.params) + list(settings.fixed):
        try:
            plain[key]
        except (KeyError, IndexError, ValueError, TypeError):
            missing.append(key)
    if missing:
        raise TuneError(f"search space {settings.space.source}: {train} has no config id(s) {missing}; "
                        f"edit the space (per-bundle spaces live in experiments/spaces/<bundle>.json)")
    parser = bundle_parser(settings.bundle, {k: as_override(v) for k, v in settings.fixed.items()}, settings.config)
    return str(parser.get_parsed_content("experiment_name")), parser.get()


#: config ids whose value is the bundle's data (items with an ``image`` path, or paths): checked before a study
_DATA_IDS = ("train#datalist", "validate#datalist", "train_files", "val_files")


def _has_id(parser, key: str) -> bool:
    try:
        parser[key]
    except (KeyError, IndexError, ValueError, TypeError):
        return False
    return True


def _paths_of(value: Any) -> list[str]:
    """The file paths a datalist-like value names: ``[{"image": p, ...}, ...]`` or ``[p, ...]``."""
    if isinstance(value, (str, os.PathLike)):
        return [str(value)]
    if isinstance(value, dict):
        return [str(value["image"])] if isinstance(value.get("image"), (str, os.PathLike)) else []
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _paths_of(v)]
    return []


def check_data(settings: TuneSettings) -> None:
    """Fail before any trial when the bundle cannot build its data with the study's overrides: its datalist ids
    (``train#datalist``, ``validate#datalist``, or ``train_files`` / ``val_files``) are evaluated once, as a trial
    would, and every image they name must exist. Without such ids, ``dataset_dir`` must exist.

    Raises:
        TuneError: one line naming ``dataset_dir``, the missing path, and the command that fixes it.
    """
    from medsr_monai.tuning.trial import error_chain

    overrides = {k: as_override(v) for k, v in settings.fixed.items()}
    given = "dataset_dir" in settings.fixed
    user_data = any(str(k).startswith("dataset_dir") for k in settings.fixed)  # cyclegan: dataset_dir_a / _b
    with tempfile.TemporaryDirectory(prefix="medsr_tune_check_") as tmp:
        parser = bundle_parser(settings.bundle, overrides, settings.config)
        parser["output_dir"] = as_override(tmp)  # a plain folder of volumes is indexed under output_dir: not here
        data_dir = None
        if _has_id(parser, "dataset_dir"):
            try:
                data_dir = parser.get_parsed_content("dataset_dir", instantiate=False)
            except Exception as e:  # noqa: BLE001 - an expression the user's --set broke
                problem = f"dataset_dir cannot be evaluated: {type(e).__name__}: {e}"
                raise TuneError(_data_error(settings, None, given, user_data, problem)) from e
        no_dir = f"{data_dir} does not exist" if data_dir is not None and not Path(str(data_dir)).exists() else None
        ids = [key for key in _DATA_IDS if _has_id(parser, key)]
        if not ids:
            if no_dir:
                raise TuneError(_data_error(settings, data_dir, given, user_data, no_dir))
            return
        for key in ids:
            try:
                value = parser.get_parsed_content(key, instantiate=False)
            except Exception as e:  # noqa: BLE001 - MONAI wraps the datalist's own error: report the innermost
                inner = list(error_chain(e))[-1]
                problem = f"{key}: {str(inner) or type(inner).__name__}"
                if no_dir and str(data_dir) in problem:  # the datalist's own error names the folder: say it plainly
                    problem = no_dir
                raise TuneError(_data_error(settings, data_dir, given, user_data, problem)) from e
            missing = [p for p in _paths_of(value) if not os.path.exists(p)]
            if missing:
                more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                problem = no_dir or (f"{key} names {len(missing)} missing file(s): {', '.join(missing[:3])}{more}")
                raise TuneError(_data_error(settings, data_dir, given, user_data, problem))


def _data_error(settings: TuneSettings, data_dir: Any, given: bool, user_data: bool, problem: str) -> str:
    problem = problem.replace("\n", " ")
    if len(problem) > 600:
        problem = problem[:600] + "..."
    source = "from --set" if given else "the bundle default"
    if data_dir and problem == f"{data_dir} does not exist":
        problem, where = f"dataset_dir {data_dir} ({source}) does not exist", ""
    else:
        where = f" (dataset_dir={data_dir}, {source})" if data_dir else ""
    fix = ("give a folder that holds the data with --set dataset_dir=DIR" if user_data else
           "fetch the sample scans with `medsr data samples` (from the repository root), or give your own data "
           "with --set dataset_dir=DIR")
    return f"bundle {settings.bundle.name} has no data: {problem}{where}; no trial was started: {fix}"


def default_study_name(bundle: Path) -> str:
    """The study name when ``--study`` is not given: the bundle's folder name (``srcnn``)."""
    return re.sub(r"[^\w.-]", "_", Path(bundle).resolve().name)


def default_best_file(best_dir: Path, bundle: Path, study_name: str) -> Path:
    """``<best_dir>/<bundle>/<study>.json``: one best-override file per study (``experiments/best/srcnn/srcnn.json``
    for the default study of bundles/srcnn)."""
    return Path(best_dir) / Path(bundle).resolve().name / (re.sub(r"[^\w.-]", "_", study_name) + ".json")


def _study_identity(settings: TuneSettings) -> dict[str, str]:
    return {"bundle": settings.bundle.name, "study": settings.study_name, "storage": mask_url(settings.storage)}


def best_file_owner(path: Path) -> dict[str, str] | None:
    """``{"bundle", "study", "storage"}`` of the study that wrote the best-override file ``path`` (its ``tuned_by``);
    ``None`` when there is no such file. A file that is not a best override reads as owned by ``"?"``."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        tuned_by = json.loads(path.read_text()).get("tuned_by")
    except (OSError, ValueError, AttributeError):
        tuned_by = None
    if not isinstance(tuned_by, dict):
        return {"bundle": "?", "study": "?", "storage": "?"}
    return {k: str(tuned_by.get(k, "?")) for k in ("bundle", "study", "storage")}


def _check_best_out(settings: TuneSettings) -> None:
    """Refuse a best-override file another study wrote (or that is not a best override), unless
    ``overwrite_best``: checked before the first trial, and again when the file is written."""
    owner = best_file_owner(settings.best_out)
    if owner is None or settings.overwrite_best or owner == _study_identity(settings):
        return
    if owner["study"] == "?":
        what = "is not a best-override file of medsr tune (no tuned_by record)"
    else:
        what = (f"holds the result of study {owner['study']!r} of bundle {owner['bundle']!r} "
                f"({owner['storage']})")
    raise TuneError(f"{settings.best_out} {what}; this study ({settings.study_name!r}, {mask_url(settings.storage)}) "
                    f"would overwrite it: give this study its own file (--study NAME writes "
                    f"experiments/best/{settings.bundle.name}/NAME.json, or --best-out FILE), or pass --overwrite-best")


def _check_counts(settings: TuneSettings) -> None:
    if settings.trials < 1:
        raise TuneError(f"--trials {settings.trials}: a study needs at least 1 trial (--trials counts all the "
                        f"study's trials, finished ones included; e.g. --trials 20)")
    if settings.workers < 1:
        raise TuneError(f"--workers {settings.workers}: give at least 1 process")


def _n_counted(study) -> int:
    return len(study.get_trials(deepcopy=False, states=_COUNTED))


def _optimize(study, setup: TrialSetup, n_total: int, deadline: float | None) -> None:
    """Run trials until the study holds ``n_total`` (or the deadline passes); each through ``study.optimize`` so
    that Optuna's heartbeat and stale-trial check run, with every ``Exception`` caught (recorded FAIL) and
    ``KeyboardInterrupt`` re-raised after the running trial is recorded."""
    while _n_counted(study) < n_total and (deadline is None or time.time() < deadline):
        study.optimize(lambda t: run_trial(t, setup), n_trials=1, catch=(Exception,), gc_after_trial=True)
        if setup.stop.requested:
            raise KeyboardInterrupt("stopped by the user")
        if setup.fatal:
            raise TuneError(f"stopping the study: {setup.fatal[0]}")


def run_worker(settings: TuneSettings, worker: int, parent_run_id: str) -> int:
    """A ``--workers`` child process: trials only; the main process finalises the study."""
    storage = open_storage(settings.storage)
    study, seed = _load_study(settings, storage, worker)
    experiment, _ = _check_bundle(settings)
    tracker = StudyTracker(settings.tracking_uri, _tune_experiment(experiment), settings.study_name,
                           settings.storage, parent_run_id=parent_run_id)
    setup = TrialSetup(settings.bundle, settings.space, settings.objective, settings.fixed,
                       settings.output_root, _tune_experiment(experiment), tracker, config=settings.config)
    print(f"[worker {worker}] sampler seed {seed}", flush=True)
    deadline = time.time() + settings.timeout if settings.timeout else None
    with setup.stop:
        _optimize(study, setup, settings.trials, deadline)
    return 0


def _tune_experiment(bundle_experiment: str) -> str:
    return f"{bundle_experiment}-tune"


def tune(settings: TuneSettings) -> dict[str, Any]:
    """Run (or continue) the study; returns a summary dict (also printed by the CLI).

    Ctrl-C stops after the running trial's current iteration; that trial is recorded FAIL, the parent run KILLED,
    and the summary has ``status == "KILLED"``.

    Raises:
        TuneError: the storage, tracking store, space or objective cannot be used.
    """
    from medsr_monai.tracking import check_tracking_uri

    _check_counts(settings)
    experiment, _ = _check_bundle(settings)
    _check_best_out(settings)
    check_data(settings)
    check_tracking_uri(settings.tracking_uri)
    os.environ["MLFLOW_TRACKING_URI"] = settings.tracking_uri  # the bundle configs resolve their store from it
    storage = open_storage(settings.storage)
    study, seed = _load_study(settings, storage, worker=0)
    first_call = len(study.trials) == 0
    _check_same_study(study, settings, first_call)
    tracker = StudyTracker(settings.tracking_uri, _tune_experiment(experiment), settings.study_name, settings.storage)
    params = {"bundle": settings.bundle.name, "objective": str(settings.objective), "space": settings.space.source,
              "pruner": settings.pruner if settings.pruner == "none" else json.dumps(settings.space.pruner),
              "sampler": "TPESampler(constant_liar=True)", "fixed": json.dumps(settings.fixed, default=str),
              "storage": mask_url(settings.storage)}
    from medsr_monai.tracking import collect_provenance

    provenance = {f"medsr.{k}": str(v)[:4900] for k, v in
                  collect_provenance(seed=settings.seed, dataset_dir=settings.fixed.get("dataset_dir")).items()}
    parent_id, resumed = tracker.open_parent(params, {**provenance, "medsr.tune_target_trials": str(settings.trials),
                                                      "medsr.tune_workers": str(settings.workers)})
    swept = tracker.sweep_dead_trials(study)
    _enqueue(study, settings, first_call)
    print(f"study {settings.study_name!r} ({'resumed' if not first_call else 'new'}, {_n_counted(study)} of "
          f"{settings.trials} trials done) on {mask_url(settings.storage)}; MLflow experiment "
          f"{_tune_experiment(experiment)!r}, parent run {parent_id}" + (f"; failed dead trials {swept}" if swept else ""),
          flush=True)
    setup = TrialSetup(settings.bundle, settings.space, settings.objective, settings.fixed, settings.output_root,
                       _tune_experiment(experiment), tracker, config=settings.config)
    deadline = time.time() + settings.timeout if settings.timeout else None
    status, reason = "FINISHED", "study reached its trial count or timeout"
    try:
        with setup.stop:
            if settings.workers <= 1:
                print(f"sampler seed {seed}", flush=True)
                _optimize(study, setup, settings.trials, deadline)
            else:
                _run_workers(settings, parent_id)
                if setup.stop.requested:
                    raise KeyboardInterrupt("stopped by the user")
    except KeyboardInterrupt:
        status, reason = "KILLED", "interrupted (Ctrl-C); finished trials are kept"
    except BaseException as e:
        status, reason = "FAILED", f"{type(e).__name__}: {e}"
        raise
    finally:
        summary = _finalize(study, settings, tracker, status, reason)
    return summary


def _enqueue(study, settings: TuneSettings, first_call: bool) -> None:
    """Queue the bundle's own values (a new study) and the ``--enqueue`` parameters, each only once per study.

    ``skip_if_exists`` is check-then-insert: two processes started together on one storage would both queue the
    bundle defaults (trial 0 = trial 1); the storage lock makes the check and the insert one step.
    """
    with _storage_lock(settings.storage):
        if first_call and settings.default_trial:
            defaults = _bundle_defaults(settings)
            if defaults:
                study.enqueue_trial(defaults, user_attrs={"enqueued": "bundle defaults"}, skip_if_exists=True)
        for params_ in settings.enqueue:  # skipped when the study already has a trial with these params
            study.enqueue_trial(params_, user_attrs={"enqueued": "--enqueue"}, skip_if_exists=True)


def _check_same_study(study, settings: TuneSettings, first_call: bool) -> None:
    """A study name reused for another bundle or objective would mix incomparable values: refuse it."""
    attrs = study.user_attrs
    mine = {"bundle": str(settings.bundle), "objective": str(settings.objective)}
    if first_call or not attrs:
        for k, v in mine.items():
            study.set_user_attr(k, v)
        return
    for k, v in mine.items():
        if attrs.get(k) not in (None, v):
            raise TuneError(f"study {settings.study_name!r} in {mask_url(settings.storage)} was created with "
                            f"{k}={attrs[k]!r}, not {v!r}: continue it with the same {k}, or choose another --study")


def _run_workers(settings: TuneSettings, parent_id: str) -> None:
    """Start ``settings.workers`` processes of this same command on the same storage and wait for them."""
    procs = []
    for i in range(settings.workers):
        cmd = [sys.executable, "-m", "medsr_monai", *settings.argv, "--worker-index", str(i),
               "--parent-run-id", parent_id]
        procs.append(subprocess.Popen(cmd, env=dict(os.environ)))
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:  # the terminal sent SIGINT to the workers too: give them time to record their trial
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.terminate()
        raise
    bad = [(i, c) for i, c in enumerate(codes) if c != 0]
    if bad:
        print(f"warning: worker exit codes {bad}; their finished trials are kept", file=sys.stderr)


def trials_table(study) -> str:
    """Markdown table of every trial: number, state, value, duration, params, and the reason it was pruned/failed."""
    keys = sorted({k for t in study.trials for k in t.params})
    head = ["trial", "state", "value", "epochs", "minutes"] + keys + ["note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in study.trials:
        dur = (t.datetime_complete - t.datetime_start).total_seconds() / 60 if t.datetime_complete and t.datetime_start else None
        cells = [str(t.number), t.state.name, f"{t.value:.4f}" if t.value is not None else "-",
                 str(len(t.intermediate_values)), f"{dur:.1f}" if dur is not None else "-"]
        cells += [_fmt(t.params.get(k)) for k in keys]
        note = t.user_attrs.get("prune_reason") or t.user_attrs.get("error") or t.user_attrs.get("enqueued") or ""
        cells.append(str(note).replace("|", "/").replace("\n", " ")[:160])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def write_best_override(study, settings: TuneSettings, parent_run_id: str | None) -> Path | None:
    """The best trial's parameters as a bundle override file (config ids -> values), usable as
    ``--config_file "['bundles/<b>/configs/train.json','<this file>']"``. The tuning budget (``fixed``) is not part
    of it: the file changes only what was searched. ``tuned_by`` records where it came from (unused by the bundle).

    Raises:
        TuneError: ``settings.best_out`` holds another study's result (and ``settings.overwrite_best`` is not set).
    """
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return None
    _check_best_out(settings)
    best = max(done, key=lambda t: t.value)
    data: dict[str, Any] = dict(best.params)
    data["tuned_by"] = {
        "tool": "medsr tune", "bundle": settings.bundle.name, "study": settings.study_name,
        "storage": mask_url(settings.storage), "trial": best.number, "objective": str(settings.objective),
        "value": best.value, "trials_complete": len(done), "trials_total": len(study.trials),
        "budget": json.dumps({k: str(v) for k, v in settings.fixed.items()}),
        "mlflow_parent_run_id": parent_run_id or "", "mlflow_run_id": best.user_attrs.get("mlflow_run_id", ""),
        "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    settings.best_out.parent.mkdir(parents=True, exist_ok=True)
    settings.best_out.write_text(json.dumps(data, indent=2) + "\n")
    return settings.best_out


def _plots(study, folder: Path) -> tuple[list[Path], list[str]]:
    """Optuna's own matplotlib plots; one that cannot be drawn yet (e.g. importances need 2+ complete trials with
    varied params) is skipped with a note."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    made, notes = [], []
    for name, fn in (("optimization_history", ovm.plot_optimization_history),
                     ("param_importances", ovm.plot_param_importances),
                     ("parallel_coordinate", ovm.plot_parallel_coordinate),
                     ("intermediate_values", ovm.plot_intermediate_values)):
        path = folder / f"{name}.png"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = fn(study)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.savefig(path, dpi=110, bbox_inches="tight")
            plt.close(fig)
            made.append(path)
        except Exception as e:  # noqa: BLE001 - a plot that needs more trials must not lose the study's records
            notes.append(f"{name}: not drawn ({type(e).__name__}: {str(e)[:120]})")
    return made, notes


def _finalize(study, settings: TuneSettings, tracker: StudyTracker, status: str, reason: str) -> dict[str, Any]:
    tracker.sweep_dead_trials(study)
    folder = settings.output_root / "study"
    folder.mkdir(parents=True, exist_ok=True)
    table = trials_table(study)
    (folder / "trials.md").write_text(table + "\n")
    counts = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,)))
              for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)}
    all_failed = counts["fail"] > 0 and not (counts["complete"] or counts["pruned"] or counts["running"])
    first_error = ""
    if all_failed:
        failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        first_error = str(failed[0].user_attrs.get("error") or "no error recorded").replace("\n", " ")[:500]
        if status == "FINISHED":
            status, reason = "FAILED", f"every trial failed ({counts['fail']}); first error: {first_error}"
    notes: list[str] = []
    try:
        best_path = write_best_override(study, settings, tracker.parent_run_id)
    except TuneError as e:
        best_path = None
        notes.append(f"best override not written: {e}")
    plots, plot_notes = _plots(study, folder)
    notes += plot_notes
    metrics = {f"n_{k}": v for k, v in counts.items()}
    tags: dict[str, str] = {}
    best = None
    if counts["complete"]:
        best = study.best_trial
        metrics["best_value"] = best.value
        tags = {"best_trial": str(best.number), **{f"best.{k.replace('#', '.')}": str(v) for k, v in best.params.items()}}
        if best_path is not None:
            copy = folder / "best_override.json"
            copy.write_text(best_path.read_text())
            plots.append(copy)
    tracker.finish_parent(status, reason, metrics, tags, plots + [folder / "trials.md"], step=len(study.trials))
    return {"study": settings.study_name, "storage": mask_url(settings.storage), "counts": counts,
            "best_trial": best.number if best else None, "best_value": best.value if best else None,
            "best_params": best.params if best else None, "best_override": str(best_path) if best_path else None,
            "parent_run_id": tracker.parent_run_id, "experiment": tracker.experiment_name, "table": table,
            "plots": [str(p) for p in plots], "notes": notes, "status": status, "all_failed": all_failed,
            "first_error": first_error}
