"""``medsr reproduce RUN_ID [--tracking-uri URL]``: re-run a recorded MLflow run and compare its metrics.

What it does, in order (any refusal prints ``medsr reproduce: error: ...`` and exits 2, before anything runs):

1. Checks the store (:func:`~medsr_monai.tracking.check_tracking_uri`), fetches the run and downloads its
   ``executed_config.json`` artifact (the whole bundle config with the command-line overrides applied, logged by
   :class:`~medsr_monai.tracking.MLflowRunHandler`). A missing run or artifact is refused, naming the run id.
2. Data check: ``dataset_dir`` is resolved with MONAI's ``ConfigParser`` on the executed config (so expressions
   such as ``$os.path.abspath(...)`` work), :func:`~medsr_monai.tracking.data_hashes` is recomputed and compared
   with the run's ``medsr.datalist_sha256`` / ``medsr.manifest_sha256`` tags. A mismatch (or a file that is gone,
   or appeared) is refused naming the file and both hashes. A run that recorded no datalist hash is refused
   unless ``--no-data-check``.
3. Re-runs ``python -m monai.bundle run --config_file <executed_config.json>`` (same interpreter and environment,
   cwd = the project folder of :mod:`medsr_monai.paths`; a relative ``bundle_root`` is taken relative to the project
   folder, and a ``bundle_root`` that is not there is looked up by its name in the bundles folder, with a note)
   with overrides: ``output_dir`` and ``ckpt_dir`` to a fresh folder (default
   ``<project>/experiments/reproduce/<run_id>/<UTC stamp>/``; ``--output DIR`` must be empty or new), ``resume`` false,
   a new ``run_name`` (``<original name>-repro-<stamp>``), and ``tracking_uri`` / ``experiment_name`` of the
   original run, so the reproduction lands beside it. The new run is then tagged ``medsr.reproduces=<run id>``.
   Evaluation runs (``medsr.stage=evaluate``) are supported: only ``output_dir`` moves, ``ckpt_path`` is pinned
   to the resolved checkpoint, which must still exist (refused otherwise). Note that a checkpoint overwritten
   since (e.g. by retraining) cannot be detected: runs record no checkpoint hash.
4. Reports every metric of the original run (last value) against the reproduction, the difference and a verdict
   (``identical`` or ``max |diff| = ...``), as markdown (default) or JSON (``--format json``). Differences in the
   environment tags (git commit / dirty, package versions, device, thread count, python, determinism) between the
   two runs are listed as warnings, not refusals; a run tagged ``medsr.deterministic=false`` is expected to differ.

Exit codes: 0 when the re-run succeeded (differences are reported, not errors); 1 when ``--tolerance X`` is given
and a metric differs by more than X (or is missing on one side); 2 for refusals and a failed re-run.
Tuning trials are re-run as plain training runs of their executed config (not nested under the study).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["register", "reproduce", "ReproduceError"]

_ENV_KEYS = ("git_commit", "git_dirty", "device", "torch_threads", "deterministic", "python")
_FILES = {"datalist_sha256": "datalist.json", "manifest_sha256": "manifest.json"}


class ReproduceError(RuntimeError):
    """The run cannot be reproduced; the message says why (exit 2)."""


def _path(path: str | os.PathLike) -> str:
    """An absolute path as a plain override value (the bundle runner keeps it a string)."""
    return str(Path(path).resolve())


def _text(value: str) -> str:
    """A name as a ``$'...'`` expression: plain, a name such as ``2024`` would reach the config as a number."""
    return "$" + repr(value)


def _parse(cfg: dict, key: str) -> Any:
    from monai.bundle import ConfigParser

    parser = ConfigParser(cfg, globals={"os": "os", "torch": "torch", "monai": "monai", "medsr_monai": "medsr_monai"})
    return parser.get_parsed_content(key, instantiate=False)


def _data_check(run_id: str, tags: dict, cfg: dict, skip: bool, notes: list[str]) -> None:
    from medsr_monai.tracking import data_hashes

    if "dataset_dir" not in cfg:
        raise ReproduceError(f"run {run_id}: the executed config has no 'dataset_dir'; cannot check the data")
    try:
        dataset_dir = _parse(cfg, "dataset_dir")
    except Exception as e:  # a config expression that no longer evaluates here
        raise ReproduceError(f"run {run_id}: cannot resolve dataset_dir {cfg['dataset_dir']!r}: {e}") from e
    if skip:
        notes.append(f"data check skipped (--no-data-check); dataset_dir = {dataset_dir}")
        return
    recorded = {k: tags[f"medsr.{k}"] for k in _FILES if f"medsr.{k}" in tags}
    if "datalist_sha256" not in recorded:
        raise ReproduceError(f"run {run_id} recorded no datalist hash (tag medsr.datalist_sha256), so the data "
                             f"in {dataset_dir} cannot be checked; pass --no-data-check to re-run anyway")
    current = data_hashes(dataset_dir)
    p = Path(dataset_dir)
    folder = p if p.is_dir() or not p.suffix else p.parent
    for key, name in _FILES.items():
        old, new = recorded.get(key), current.get(key)
        if old != new:
            file = p if key == "datalist_sha256" and p.suffix == ".json" else folder / name
            raise ReproduceError(
                f"run {run_id}: the data on disk no longer matches the recorded hash: {file}: "
                f"recorded sha256 {old or '(file absent)'}, current sha256 {new or '(file absent)'}; "
                f"restore the data (or pass --no-data-check to re-run anyway)")


def _env_diffs(orig: dict, new: dict) -> list[str]:
    keys = [f"medsr.{k}" for k in _ENV_KEYS] + sorted(k for k in set(orig) | set(new) if k.startswith("medsr.version."))
    return [f"{k[6:]}: original {orig.get(k, '(not recorded)')}, reproduction {new.get(k, '(not recorded)')}"
            for k in keys if orig.get(k) != new.get(k)]


def compare_metrics(orig: dict[str, float], new: dict[str, float]) -> dict:
    rows, max_diff, missing = [], 0.0, []
    for k in sorted(set(orig) | set(new)):
        a, b = orig.get(k), new.get(k)
        diff = None if a is None or b is None else b - a
        if diff is None:
            missing.append(k)
        elif not (math.isnan(a) and math.isnan(b)):
            max_diff = max(max_diff, abs(diff)) if not math.isnan(diff) else math.inf
        rows.append({"metric": k, "original": a, "reproduction": b, "diff": diff})
    identical = not missing and max_diff == 0.0
    verdict = "identical" if identical else f"max |diff| = {max_diff:.6g}" + (
        f"; missing on one side: {', '.join(missing)}" if missing else "")
    return {"rows": rows, "max_abs_diff": max_diff, "missing": missing, "identical": identical, "verdict": verdict}


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.10g}"


def format_markdown(result: dict) -> str:
    lines = [f"Reproduction of run {result['run_id']} ({result['original_run_name']}) as run {result['new_run_id']} "
             f"({result['new_run_name']})", "", "| metric | original | reproduction | diff |", "|---|---|---|---|"]
    lines += [f"| {r['metric']} | {_fmt(r['original'])} | {_fmt(r['reproduction'])} | {_fmt(r['diff'])} |"
              for r in result["metrics"]["rows"]]
    lines += ["", f"verdict: {result['metrics']['verdict']}"]
    if result.get("weights"):
        lines.append(f"weights (model.pt): {result['weights']}")
    lines += [f"warning: {w}" for w in result["warnings"]] + [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def _bundle_root(run_id: str, cfg: dict, project: Path, bundles: str | os.PathLike | None,
                 notes: list[str]) -> Path:
    """The recorded ``bundle_root`` here: relative -> under the project folder; not there -> the bundle of that name in
    the bundles folder (a run recorded on another machine or in another checkout), with a note."""
    from medsr_monai.paths import PathError, find_bundle

    recorded = str(cfg.get("bundle_root", "."))
    bundle_root = Path(recorded)
    if not bundle_root.is_absolute():  # given relative to an unknown cwd: take the project folder's
        bundle_root = project / bundle_root
        notes.append(f"relative bundle_root {recorded!r} taken as {bundle_root}")
    if not bundle_root.is_dir():
        try:
            found = find_bundle(bundle_root.resolve().name, bundles, project)
        except PathError as e:
            raise ReproduceError(f"run {run_id}: its bundle_root {bundle_root} does not exist here, and {e}") from e
        notes.append(f"bundle_root {bundle_root} does not exist here: using {found}")
        bundle_root = found
    return bundle_root


def reproduce(run_id: str, tracking_uri: str, output: str | None = None, data_check: bool = True,
              project: str | os.PathLike | None = None, bundles: str | os.PathLike | None = None) -> dict:
    """Re-run ``run_id`` of ``tracking_uri``; returns the comparison (see the module docstring).

    Args:
        project, bundles: ``--project-dir`` / ``--bundles-dir`` (see :mod:`medsr_monai.paths`): the re-run's working
            directory and default output folder, and where a recorded bundle that is not there is looked up.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from medsr_monai.paths import project_dir
    from medsr_monai.tracking import TrackingError, check_tracking_uri

    project = project_dir(project)

    try:
        check_tracking_uri(tracking_uri)
    except TrackingError as e:
        raise ReproduceError(str(e)) from e
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        orig = client.get_run(run_id)
    except MlflowException as e:
        raise ReproduceError(f"run {run_id} not found in the MLflow store {tracking_uri}") from e
    tags, notes, warnings = dict(orig.data.tags), [], []
    if tags.get("optuna.trial_state", "COMPLETE") != "COMPLETE":
        notes.append(f"tuning trial ended {tags['optuna.trial_state']}; the re-run has no pruner and runs every epoch")
    if orig.info.status != "FINISHED":
        warnings.append(f"the original run ended {orig.info.status}; its metrics are those of an incomplete run")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            cfg_path = Path(client.download_artifacts(run_id, "executed_config.json", tmp))
            cfg = json.loads(cfg_path.read_text())
        except (MlflowException, OSError, ValueError) as e:
            raise ReproduceError(f"run {run_id} has no readable executed_config.json artifact (logged by "
                                 f"MLflowRunHandler with config_snapshot), so it cannot be re-run: {e}") from e
    bundle_root = _bundle_root(run_id, cfg, project, bundles, notes)
    if str(bundle_root) != str(cfg.get("bundle_root", ".")):
        cfg["bundle_root"] = str(bundle_root)
    _data_check(run_id, tags, cfg, not data_check, notes)

    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = Path(output) if output else project / "experiments" / "reproduce" / run_id / stamp
    if out.exists() and any(out.iterdir()):
        raise ReproduceError(f"output folder {out} is not empty; name a new or empty one with --output")
    out.mkdir(parents=True, exist_ok=True)
    cfg_file = out / "original_executed_config.json"
    cfg_file.write_text(json.dumps(cfg, indent=2))
    new_name = f"{orig.info.run_name}-repro-{stamp}"
    experiment = client.get_experiment(orig.info.experiment_id).name
    overrides = {"output_dir": _path(out), "run_name": _text(new_name), "tracking_uri": _text(tracking_uri),
                 "experiment_name": _text(experiment)}
    if tags.get("medsr.stage") == "evaluate":
        try:
            ckpt = Path(str(_parse(cfg, "ckpt_path")))
        except Exception as e:
            raise ReproduceError(f"evaluation run {run_id}: cannot resolve ckpt_path: {e}") from e
        if not ckpt.is_file():
            raise ReproduceError(f"evaluation run {run_id}: its checkpoint {ckpt} no longer exists")
        overrides["ckpt_path"] = _path(ckpt)
        notes.append(f"evaluation run: re-evaluated checkpoint {ckpt} (its content is not hashed by the run)")
    else:
        overrides["ckpt_dir"] = _path(out / "models")
    if "resume" in cfg:
        overrides["resume"] = "$False"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(cfg_file)]
    for k, v in overrides.items():
        cmd += [f"--{k}", v]
    # the same interpreter and environment as this command (so the same medsr_monai), run from the project folder
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, PYTHONUNBUFFERED="1")
    log = out / "reproduce.log"
    print(f"medsr reproduce: re-running run {run_id} into {out} (log: {log})", file=sys.stderr, flush=True)
    with open(log, "w") as f:
        rc = subprocess.call(cmd, env=env, cwd=str(project), stdout=f, stderr=subprocess.STDOUT)
    new = _find_run(client, new_name)
    if new is not None:
        client.set_tag(new.info.run_id, "medsr.reproduces", run_id)
    if rc != 0 or new is None:
        tail = log.read_text()[-2000:]
        raise ReproduceError(f"the re-run of run {run_id} failed (exit {rc}"
                             f"{'' if new else ', no new run recorded'}); log {log}:\n{tail}")
    new = client.get_run(new.info.run_id)
    warnings += [f"environment differs: {d}" for d in _env_diffs(tags, dict(new.data.tags))]
    if "false" in (tags.get("medsr.deterministic"), new.data.tags.get("medsr.deterministic")):
        notes.append("a run is tagged medsr.deterministic=false (e.g. GPU): metric differences are expected")
    weights = None
    if "ckpt_dir" in overrides and (out / "models" / "model.pt").is_file():
        weights = _compare_weights(client, run_id, out / "models" / "model.pt", notes)
    return {"run_id": run_id, "original_run_name": orig.info.run_name, "new_run_id": new.info.run_id,
            "new_run_name": new_name, "experiment": experiment, "output_dir": str(out),
            "metrics": compare_metrics(dict(orig.data.metrics), dict(new.data.metrics)), "weights": weights,
            "warnings": warnings, "notes": notes}


def _compare_weights(client, run_id: str, new_model: Path, notes: list[str]) -> str | None:
    """``identical`` / ``differ: ...`` for the original run's model.pt artifact against the reproduction's."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        try:
            old_model = client.download_artifacts(run_id, "model.pt", tmp)
        except Exception:
            notes.append(f"run {run_id} has no model.pt artifact: weights not compared")
            return None
        a, b = (torch.load(p, map_location="cpu", weights_only=True) for p in (old_model, new_model))
    a, b = (s["network"] if isinstance(s, dict) and isinstance(s.get("network"), dict) else s for s in (a, b))
    if a.keys() != b.keys():
        return "differ: different tensor names"
    # tensors compared exactly; any non-tensor entry by value
    bad = [k for k in a if not (torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k])]
    return "identical" if not bad else f"differ in {len(bad)} of {len(a)} tensors (e.g. {bad[0]})"


def _find_run(client, name: str):
    ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(ids, filter_string=f"attributes.run_name = '{name}'", max_results=5) if ids else []
    return runs[0] if runs else None


def _cmd(args) -> int:
    from medsr_monai.tracking import resolve_tracking_uri

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = args.tracking_uri or resolve_tracking_uri(check=False, project=args.project_dir)
    try:
        result = reproduce(args.run_id, uri, output=args.output, data_check=not args.no_data_check,
                           project=args.project_dir, bundles=args.bundles_dir)
    except ReproduceError as e:
        sys.stdout.flush()  # the error is the last line the user sees
        print(f"medsr reproduce: error: {e}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(json.dumps(result, indent=2))
    else:
        print(format_markdown(result))
    m = result["metrics"]
    if args.tolerance is not None and (m["missing"] or m["max_abs_diff"] > args.tolerance):
        sys.stdout.flush()  # the verdict is the last line the user sees, also when stdout is a pipe
        print(f"medsr reproduce: metrics differ by more than --tolerance {args.tolerance}: {m['verdict']}",
              file=sys.stderr)
        return 1
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "reproduce", help="re-run a recorded MLflow run from its executed config and compare the metrics",
        description="Re-run a recorded training or evaluation run from its executed_config.json artifact, after "
        "checking that the data on disk still matches the recorded datalist/manifest hashes (refused otherwise), "
        "into the same MLflow store and experiment (new run tagged medsr.reproduces=RUN_ID), then print every "
        "metric of the original run against the reproduction. Exit 0 when the re-run succeeded, 1 when "
        "--tolerance is exceeded, 2 when refused or the re-run failed.",
    )
    p.add_argument("run_id", metavar="RUN_ID", help="MLflow run id of the run to reproduce")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store: sqlite:///<abs>/mlflow.db or http(s)://server:port "
                   "(default: MLFLOW_TRACKING_URI, else the project store <project>/mlruns/mlflow.db)")
    p.add_argument("--output", default=None,
                   help="new or empty folder for the re-run's outputs "
                   "(default: <project>/experiments/reproduce/RUN_ID/<UTC stamp>)")
    p.add_argument("--format", choices=("markdown", "json"), default="markdown", help="report format (default: %(default)s)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="exit 1 when a metric differs by more than this (or is missing on one side)")
    p.add_argument("--no-data-check", action="store_true",
                   help="re-run even though the data hashes do not match or were not recorded")
    from medsr_monai.paths import add_path_arguments

    add_path_arguments(p)
    p.set_defaults(func=_cmd)
