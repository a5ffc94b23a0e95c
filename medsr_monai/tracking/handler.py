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

__all__ = ["MLflowRunHandler", "capture_executed_config"]

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


def capture_executed_config() -> dict | None:
    """The config of the ``monai.bundle`` workflow that is being run, with command-line overrides applied.

    ``monai.bundle run`` holds its :class:`~monai.bundle.ConfigParser` in the running
    :class:`~monai.bundle.ConfigWorkflow`, which config items cannot reference; this walks up the call
    stack (objects are being built from inside the workflow) to find it. Returns ``None`` when the
    handler is built outside a bundle workflow (e.g. in plain Python).
    """
    from monai.bundle import ConfigParser, ConfigWorkflow

    frame = inspect.currentframe()
    try:
        while frame is not None:
            for value in frame.f_locals.values():
                if isinstance(value, ConfigWorkflow):
                    return value.parser.get()
                if isinstance(value, ConfigParser):
                    return value.get()
            frame = frame.f_back
    finally:
        del frame
    return None


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
        kwargs: passed to :class:`monai.handlers.MLFlowHandler` (``tracking_uri``, ``run_name``, ...).

    Example (bundle config)::

        {"_target_": "medsr_monai.tracking.MLflowRunHandler", "tracking_uri": "@tracking_uri",
         "experiment_name": "edsr", "run_name": "@run_name", "provenance": "@provenance",
         "config_snapshot": "$@output_dir + '/executed_config.json'", "close_on_complete": true}
    """

    def __init__(self, provenance: dict[str, Any] | None = None, config_snapshot: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.provenance = dict(provenance or {})
        self.config_snapshot = config_snapshot
        self._executed = capture_executed_config() if config_snapshot else None
        self._prev_sigterm = None

    # -- lifecycle -------------------------------------------------------------------------------
    def attach(self, engine: Engine) -> None:
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
        for k, v in tags.items():
            self.client.set_tag(run_id, k, v)
        if "seed" in self.provenance:
            self._log_params({"seed": self.provenance["seed"]})
        if self.config_snapshot and self._executed is not None:
            path = Path(self.config_snapshot)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self._executed, indent=2, default=str))
            self.client.log_artifact(run_id, str(path))

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
