"""MONAI's MLFlowHandler plus what a reproducible run needs and MONAI leaves out.

MONAI's handler logs params, losses and metrics, but (1) leaves the run RUNNING when training
crashes or is interrupted, after which the next run with the same name silently takes it over,
(2) records the executed config only under ``--tracking``, not on a plain ``monai.bundle run``, and
(3) records no provenance. This subclass ends runs as FAILED/KILLED (exceptions, Ctrl-C, SIGTERM,
interpreter exit), marks runs left RUNNING by dead processes on this host as KILLED, tags the run
with provenance and logs the executed config as an artifact at start, so even a crashed run has it.
"""

from __future__ import annotations

import atexit
import inspect
import json
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events
from monai.handlers import MLFlowHandler

__all__ = ["MLflowRunHandler", "capture_executed_config", "config_params"]

_MAX_TAG = 4900
# modules whose calls must not be cut by the SIGTERM exception: a sqlite write interrupted half-way keeps the
# store locked by this process, and the run could then not be marked KILLED
_NO_INTERRUPT_MODULES = ("mlflow", "sqlalchemy", "alembic", "sqlite3")
_RETRY_S = 0.05


def _in_store_call(frame) -> bool:
    while frame is not None:
        if str(frame.f_globals.get("__name__", "")).split(".")[0] in _NO_INTERRUPT_MODULES:
            return True
        frame = frame.f_back
    return False


def _running_parser():
    """The :class:`~monai.bundle.ConfigParser` of the ``monai.bundle`` workflow being run, or ``None``.

    ``monai.bundle run`` holds its parser in the running :class:`~monai.bundle.ConfigWorkflow`, which config
    items cannot reference (a config has no id for its own parser); handlers are built from inside the
    workflow, so this walks up the call stack to find it. ``None`` when built outside a bundle workflow.
    """
    from monai.bundle import ConfigParser, ConfigWorkflow

    frame = inspect.currentframe()
    try:
        while frame is not None:
            for value in frame.f_locals.values():
                if isinstance(value, ConfigWorkflow):
                    return value.parser
                if isinstance(value, ConfigParser):
                    return value
            frame = frame.f_back
    finally:
        del frame
    return None


def capture_executed_config() -> dict | None:
    """The config of the ``monai.bundle`` workflow that is being run, with command-line overrides applied
    (``None`` outside a bundle workflow)."""
    parser = _running_parser()
    return None if parser is None else parser.get()


#: top-level config entries that are code, not settings
_NOT_PARAMS = ("imports", "initialize", "run", "finalize")
_SCALARS = (bool, int, float, str, type(None))
_SKIP = object()


def _is_code(value: Any) -> bool:
    """A config expression (``"$..."``) or reference (``"@..."``), not a literal."""
    from monai.bundle.config_item import ConfigExpression

    return isinstance(value, str) and (ConfigExpression.is_expression(value) or value.startswith("@"))


def _as_param(value: Any) -> Any:
    """``value`` if it is a setting worth a param (a scalar, a device, a short list of scalars), else ``_SKIP``."""
    if isinstance(value, _SCALARS):
        return value[:500] if isinstance(value, str) else value
    if type(value).__name__ == "device":  # torch.device, without importing torch here
        return str(value)
    if isinstance(value, (list, tuple)) and len(value) <= 16 and all(isinstance(v, _SCALARS) for v in value):
        return list(value)
    return _SKIP


def config_params(parser) -> dict[str, Any]:
    """Every top-level setting of the executed config, as MLflow params, so configs need no mirror lists.

    A literal scalar (or short list of scalars) is logged as written, after command-line overrides; an
    expression (``"$..."`` / ``"@..."``) is logged with the value it evaluated to, but only if the workflow
    already evaluated it (evaluating it here could build objects the run never asked for) and the value is a
    scalar. Entries whose names start with ``_`` and the code lists (``imports``, ``initialize``, ``run``,
    ``finalize``) are skipped.
    """
    raw = parser.get()
    resolved = getattr(parser.ref_resolver, "resolved_content", {})
    params: dict[str, Any] = {}
    for key, value in raw.items():
        if key.startswith("_") or key in _NOT_PARAMS or isinstance(value, dict):
            continue
        if _is_code(value) or (isinstance(value, list) and any(_is_code(v) for v in value)):
            if key not in resolved or resolved[key] is None or resolved[key] == [None] * len(value or []):
                continue  # not evaluated by the run, or a check that returns nothing
            value = resolved[key]
        value = _as_param(value)
        if value is not _SKIP:
            params[key] = value
    return params


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class MLflowRunHandler(MLFlowHandler):
    """MLFlowHandler that always ends its run and records provenance and the executed config.

    Attach it to the trainer first in ``train#handlers`` so that its exception handler runs before
    handlers that re-raise. Use a plain ``MLFlowHandler`` with the same ``run_name`` on the evaluator.

    Args:
        provenance: flat dict recorded as run tags (see :func:`~medsr_monai.tracking.collect_provenance`).
        config_snapshot: file to write the executed config to; logged as an artifact at start.
        config_params: log every top-level setting of the executed config as a param (see :func:`config_params`);
            ``experiment_param`` then only needs what is not a top-level setting (counts, descriptions).
        run_record: file holding the id of the run that last trained in this output folder (beside the
            checkpoints). A run that resumes a killed or stopped one (the trainer starts past epoch 0: the
            checkpoint was loaded) is tagged ``medsr.resumed_from_run_id`` with that id, and the earlier run
            ``medsr.resumed_by_run_id``, so that the pieces of one training can be found from either.
        log_model: on a trainer, log the trained bundle as an MLflow ``pyfunc`` model (``model``, with signature and
            input example; see :func:`~medsr_monai.tracking.models.log_bundle_model`) when training completes.
            ``None``: the executed config's top-level ``log_model`` (``--log_model false`` turns it off), else on.
        register_model: also register that model: a name, or ``True`` for ``<method>-<task>`` (e.g. ``edsr-x2``).
            ``None``: the config's top-level ``register_model`` (``--register_model true`` / ``edsr-x2``), else no.
        register_alias: alias of the new version (e.g. ``champion``); ``None``: the config's ``register_alias``.
        dataset_contexts: the datalist splits logged as run inputs (``mlflow.log_input``-style MetaDatasets, see
            :func:`~medsr_monai.tracking.models.dataset_inputs`); default ``training`` + ``validation`` on a
            trainer, the config's ``eval_split`` (``test``) on an evaluator.
        kwargs: passed to :class:`monai.handlers.MLFlowHandler` (``tracking_uri``, ``run_name``, ...).

    Besides MONAI's records, a run gets MLflow's standard ``mlflow.source.*`` tags (bundle, config, commit), and its
    experiment ``mlflow.experimentKind = custom_model_development`` (the UI's model-training view).

    Example (bundle config)::

        {"_target_": "medsr_monai.tracking.MLflowRunHandler", "tracking_uri": "@tracking_uri",
         "experiment_name": "edsr", "run_name": "@run_name", "provenance": "@provenance",
         "config_snapshot": "$@output_dir + '/executed_config.json'", "close_on_complete": true}
    """

    def __init__(self, provenance: dict[str, Any] | None = None, config_snapshot: str | None = None,
                 config_params: bool = True, run_record: str | None = None, log_model: bool | None = None,
                 register_model: str | bool | None = None, register_alias: str | None = None,
                 dataset_contexts: list[str] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.log_model, self.register_model, self.register_alias = log_model, register_model, register_alias
        self.dataset_contexts = dataset_contexts
        self._is_trainer = False
        self.run_record = Path(run_record) if run_record else None
        self.provenance = dict(provenance or {})
        self.config_snapshot = config_snapshot
        self._parser = _running_parser()
        self._executed = self._parser.get() if (config_snapshot and self._parser is not None) else None
        self._config_params = bool(config_params)
        self._prev_sigterm = None

    # -- lifecycle -------------------------------------------------------------------------------
    def attach(self, engine: Engine) -> None:
        from monai.engines import Trainer

        self._is_trainer = isinstance(engine, Trainer)
        super().attach(engine)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.exception_raised)
        # Handlers such as StatsHandler and CheckpointSaver re-raise from their own exception handler,
        # which stops Ignite from calling later ones: run ours first, wherever it sits in the list.
        handlers = engine._event_handlers[Events.EXCEPTION_RAISED]
        handlers.insert(0, handlers.pop())
        atexit.register(self._end_if_open, "FAILED", "process exited before the run completed")
        if threading.current_thread() is threading.main_thread():
            self._prev_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):  # turn `kill` into an exception the engine reports
        if _in_store_call(frame) and hasattr(signal, "setitimer"):
            # an MLflow / database call is under way: raise once it has returned (checked every 50 ms)
            signal.signal(signal.SIGALRM, self._on_sigterm)
            signal.setitimer(signal.ITIMER_REAL, _RETRY_S)
            return
        raise KeyboardInterrupt("SIGTERM")

    def start(self, engine: Engine) -> None:
        fresh = self.cur_run is None
        if fresh and self._config_params and self._parser is not None:
            # every top-level setting, then the config's own extras (``experiment_param``) on top
            self.experiment_param = {**config_params(self._parser), **(self.experiment_param or {})}
        if fresh:
            self._set_experiment()
            if self.experiment is not None:
                self._end_stale_runs()
        super().start(engine)
        if not fresh or self.cur_run is None:
            return
        run_id = self.cur_run.info.run_id
        tags = {f"medsr.{k}": str(v)[:_MAX_TAG] for k, v in self.provenance.items()}
        tags.update({"medsr.pid": str(os.getpid()), "medsr.host": socket.gethostname()})
        if self.provenance.get("git_commit"):
            tags["mlflow.source.git.commit"] = str(self.provenance["git_commit"])
        tags.update(self._mlflow_standard(run_id))
        for k, v in tags.items():
            self.client.set_tag(run_id, k, v)
        if "seed" in self.provenance:
            self._log_params({"seed": self.provenance["seed"]})
        self._link_resumed(engine, run_id)
        if self.config_snapshot and self._executed is not None:
            path = Path(self.config_snapshot)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self._executed, indent=2, default=str))
            self.client.log_artifact(run_id, str(path))

    # -- what MLflow users expect: experiment kind, source tags, dataset inputs, the model -------------------
    def _setting(self, key: str, value: Any, default: Any = None) -> Any:
        """``value`` when given, else the executed config's top-level ``key`` (a ``--key`` override), else
        ``default``; ``"true"``/``"false"`` strings read as booleans."""
        if value is None and self._parser is not None:
            try:
                value = self._parser.get_parsed_content(key) if key in self._parser.get() else None
            except Exception:  # noqa: BLE001 - an expression that cannot be evaluated here: the default
                value = None
        if isinstance(value, str) and value.lower() in ("true", "false", "none", "null", ""):
            value = {"true": True, "false": False}.get(value.lower())
        return default if value is None else value

    def _bundle_root(self) -> str | None:
        root = self._setting("bundle_root", None)
        return str(root) if root else None

    def _mlflow_standard(self, run_id: str) -> dict[str, str]:
        """Mark the experiment as model training, log the datalist splits as run inputs, and return MLflow's
        standard source tags (never fails the run: a problem is recorded as a ``medsr.mlflow_warning`` tag)."""
        from .models import config_source, dataset_inputs, mark_training_experiment, source_tags

        tags: dict[str, str] = {}
        try:
            mark_training_experiment(self.client, self.experiment.experiment_id)
            root = self._bundle_root()
            default = "train.json" if self._is_trainer else "evaluate.json"
            tags.update(source_tags(root, config_source(root, default), self.provenance.get("git_commit")))
            contexts = self.dataset_contexts or (
                ["training", "validation"] if self._is_trainer else [str(self._setting("eval_split", None, "test"))])
            inputs = dataset_inputs(self._setting("dataset_dir", None), self.provenance.get("datalist_sha256"),
                                    contexts, Path(root).name if root else str(self.experiment_name))
            if inputs:
                self.client.log_inputs(run_id, datasets=inputs)
        except Exception as e:  # noqa: BLE001 - a missing extra must never cost the training run
            tags["medsr.mlflow_warning"] = f"standard MLflow records incomplete: {type(e).__name__}: {e}"[:_MAX_TAG]
        return tags

    def complete(self) -> None:
        """MONAI's artifacts, then (trainer) the MLflow ``pyfunc`` model and its registration, before the run
        closes."""
        super().complete()
        # default on; MEDSR_LOG_MODEL=0 makes it off by default (the test suite: ~3 s per tiny training), while a
        # config's or the command line's log_model still wins
        log_default = os.environ.get("MEDSR_LOG_MODEL", "1").strip().lower() not in ("0", "false", "no", "off")
        if self._is_trainer and self.cur_run is not None and self._setting("log_model", self.log_model, log_default):
            self._log_model(self.cur_run.info.run_id)

    def _log_model(self, run_id: str) -> None:
        """Log the trained bundle as an MLflow model (and register it when asked). A failure is reported and tagged
        (``medsr.model_log_error``), never raised: the weights are already saved and logged as ``model.pt``."""
        import time

        from .models import log_bundle_model, register_run_model

        t0 = time.monotonic()
        try:
            weights = [p for p in self._parse_artifacts() if str(p).endswith(".pt") and Path(p).is_file()]
            root = self._bundle_root()
            if not weights or not root:
                raise FileNotFoundError("no trained weights (.pt artifact) or bundle_root to build the model from")
            config = self._parser.get() if self._parser is not None else {}
            task = config.get("task") if isinstance(config.get("task"), str) else None
            log_bundle_model(run_id, self.client.tracking_uri, root, weights, config, task=task)
            self.client.set_tag(run_id, "medsr.model_log_seconds", f"{time.monotonic() - t0:.2f}")
            register = self._setting("register_model", self.register_model, False)
            if register:
                name = None if register is True else str(register)
                mv = register_run_model(run_id, self.client.tracking_uri, name=name,
                                        alias=self._setting("register_alias", self.register_alias, None))
                print(f"registered model {mv.name} version {mv.version}", flush=True)
        except Exception as e:  # noqa: BLE001
            import sys

            msg = f"{type(e).__name__}: {e}"
            print(f"WARNING: the MLflow model was not logged: {msg}", file=sys.stderr, flush=True)
            self.client.set_tag(run_id, "medsr.model_log_error", msg[:_MAX_TAG])

    def _link_resumed(self, engine: Engine, run_id: str) -> None:
        """Tag the link to the run this one resumes (see ``run_record``), then record this run as the latest."""
        if self.run_record is None:
            return
        try:
            previous = self.run_record.read_text().strip()
        except OSError:
            previous = ""
        if previous and previous != run_id and (engine.state.epoch or 0) > 0:
            self.client.set_tag(run_id, "medsr.resumed_from_run_id", previous)
            self.client.set_tag(run_id, "medsr.resumed_from_epoch", str(engine.state.epoch))
            try:
                self.client.set_tag(previous, "medsr.resumed_by_run_id", run_id)
            except Exception:  # noqa: BLE001 - the earlier run may be in another store (a copied folder)
                pass
        self.run_record.parent.mkdir(parents=True, exist_ok=True)
        self.run_record.write_text(run_id + "\n")

    def _log_params(self, params: dict[str, Any]) -> None:
        items = list(params.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            super()._log_params(dict(items[i:i + 100]))

    def exception_raised(self, engine: Engine, e: BaseException) -> None:
        interrupted = isinstance(e, KeyboardInterrupt)
        self._end_if_open("KILLED" if interrupted else "FAILED", f"{type(e).__name__}: {e}")
        raise e

    def close(self) -> None:
        super().close()
        if self._prev_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._prev_sigterm)
            self._prev_sigterm = None

    def _end_if_open(self, status: str, reason: str) -> None:
        if self.cur_run is None:
            return
        run_id = self.cur_run.info.run_id
        try:
            self.client.set_tag(run_id, "medsr.end_reason", reason[:_MAX_TAG])
            self.client.set_terminated(run_id, status)
        finally:
            self.cur_run = None
            self._dispose_sqlite_store()

    def _end_stale_runs(self) -> None:
        """Runs left RUNNING by processes of this host that no longer exist were killed (e.g. SIGKILL)."""
        host = socket.gethostname()
        runs = self.client.search_runs(
            [self.experiment.experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=200
        )
        for run in runs:
            tags = run.data.tags
            if tags.get("medsr.host") != host or not tags.get("medsr.pid", "").isdigit():
                continue
            pid = int(tags["medsr.pid"])
            if pid != os.getpid() and not _pid_alive(pid):
                self.client.set_tag(run.info.run_id, "medsr.end_reason", f"process {pid} ended without closing the run")
                self.client.set_terminated(run.info.run_id, "KILLED")
