"""MLflow records of a study: one parent run per study, one nested run per trial, never left RUNNING.

The nested run is created here, RUNNING, with the trial's name; the bundle's own MLflow handlers then log into it
(MONAI's ``MLFlowHandler`` takes over the unfinished run of the same name), so a trial's run holds exactly what a
plain ``monai.bundle run`` records (params, per-epoch metrics, grids, executed config, provenance) plus the
trial number and state.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any

from medsr_monai.tracking.handler import _pid_alive

__all__ = ["StudyTracker", "mask_url", "mlflow_key"]

#: Optuna-side state of a trial -> (tag value, MLflow run status)
_STATES = {"COMPLETE": ("COMPLETE", "FINISHED"), "PRUNED": ("PRUNED", "FINISHED"), "FAIL": ("FAIL", "FAILED"),
           "KILLED": ("FAIL", "KILLED")}


def mask_url(url: str) -> str:
    """A storage URL without its password (``postgresql://u:***@host/db``), safe to record."""
    return re.sub(r"(//[^:/@]+):[^@/]*@", r"\1:***@", url)


def mlflow_key(config_id: str) -> str:
    """MLflow param keys may not contain ``#``: ``network_def#net#features`` -> ``network_def.net.features``."""
    return config_id.replace("#", ".")


class StudyTracker:
    """The parent run of a study in ``experiment_name`` and its nested trial runs.

    Args:
        tracking_uri: the MLflow store.
        experiment_name: experiment holding the study (created if missing).
        study_name: Optuna study name; the parent run is found again by it (and the storage) on resume.
        storage: the Optuna storage URL (recorded with the password masked).
        parent_run_id: attach to an existing parent run (``--workers`` child processes) instead of finding one.
    """

    def __init__(self, tracking_uri: str, experiment_name: str, study_name: str, storage: str,
                 parent_run_id: str | None = None):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.uri = tracking_uri
        self.study_name = study_name
        self.storage = mask_url(storage)
        self.experiment_id = self._experiment(experiment_name)
        self.experiment_name = experiment_name
        self.parent_run_id = parent_run_id

    def _experiment(self, name: str) -> str:
        """The experiment's id, created if missing with its artifacts beside the store (not in ``./mlruns`` of the
        working directory); a process that created it at the same moment is not an error."""
        from mlflow.exceptions import MlflowException

        from medsr_monai.tracking.models import EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT_KIND
        from medsr_monai.tracking.store import artifact_location

        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifact_location(self.uri),
                                                 tags={EXPERIMENT_KIND_TAG: TRAINING_EXPERIMENT_KIND})
        except MlflowException:
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    # -- parent -------------------------------------------------------------------------------------------
    def open_parent(self, params: dict[str, Any], tags: dict[str, str]) -> tuple[str, bool]:
        """Find this study's parent run (reopening it) or create it. Returns ``(run_id, resumed)``."""
        found = self.client.search_runs(
            [self.experiment_id], max_results=10,
            filter_string=f"tags.`medsr.tune_role` = 'study' and tags.`medsr.tune_study` = '{self.study_name}'",
        )
        found = [r for r in found if r.data.tags.get("medsr.tune_storage") == self.storage]
        base = {"medsr.tune_role": "study", "medsr.tune_study": self.study_name, "medsr.tune_storage": self.storage,
                "medsr.pid": str(os.getpid()), "medsr.host": socket.gethostname(), **tags}
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            for k, v in base.items():
                self.client.set_tag(run_id, k, v)
            resumed = True
        else:
            run_id = self.client.create_run(self.experiment_id, run_name=f"study-{self.study_name}", tags=base).info.run_id
            for k, v in params.items():
                self.client.log_param(run_id, k, str(v)[:6000])
            resumed = False
        self.parent_run_id = run_id
        return run_id, resumed

    def finish_parent(self, status: str, reason: str, metrics: dict[str, float], tags: dict[str, str],
                      artifacts: list[Path], step: int) -> None:
        run_id = self.parent_run_id
        for k, v in metrics.items():
            self.client.log_metric(run_id, k, float(v), step=step)
        for k, v in tags.items():
            self.client.set_tag(run_id, k, str(v)[:4900])
        for path in artifacts:
            if Path(path).is_file():
                self.client.log_artifact(run_id, str(path), artifact_path="optuna")
        self.client.set_tag(run_id, "medsr.end_reason", reason[:4900])
        self.client.set_terminated(run_id, status)

    # -- trials -------------------------------------------------------------------------------------------
    def trial_run_name(self, number: int) -> str:
        return f"{self.study_name}-trial-{number:04d}"

    def start_trial_run(self, number: int, params: dict[str, Any]) -> tuple[str, str]:
        """Create the nested, RUNNING run the bundle's handlers will log into. Returns ``(run_id, run_name)``."""
        name = self.trial_run_name(number)
        tags = {"mlflow.parentRunId": self.parent_run_id, "medsr.tune_study": self.study_name,
                "medsr.tune_role": "trial", "optuna.trial_number": str(number), "optuna.trial_state": "RUNNING",
                "medsr.pid": str(os.getpid()), "medsr.host": socket.gethostname()}
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        self.client.log_param(run.info.run_id, "trial_number", number)
        for k, v in params.items():
            self.client.log_param(run.info.run_id, mlflow_key(k), v)
        return run.info.run_id, name

    def end_trial_run(self, run_id: str, state: str, reason: str, history: list[tuple[int, float]]) -> None:
        """Tag the trial's final state and end its run if the bundle's handler has not (e.g. it failed in setup)."""
        tag, status = _STATES[state]
        for step, value in history:
            self.client.log_metric(run_id, "tune_objective", value, step=step)
        self.client.set_tag(run_id, "optuna.trial_state", tag)
        if reason:
            self.client.set_tag(run_id, "medsr.end_reason", reason[:4900])
        run = self.client.get_run(run_id)
        if run.info.status == "RUNNING" or (tag == "FAIL" and run.info.status == "FINISHED"):
            self.client.set_terminated(run_id, status)

    def sweep_dead_trials(self, study) -> list[int]:
        """Trials RUNNING in Optuna whose process on this host is gone (SIGKILL, power loss): mark them FAIL, and
        their MLflow runs KILLED. Trials of other hosts are left to Optuna's heartbeat (``fail_stale_trials``)."""
        from optuna.trial import TrialState

        host, swept = socket.gethostname(), []
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            pid = t.user_attrs.get("pid")
            if t.user_attrs.get("host") != host or not isinstance(pid, int) or pid == os.getpid() or _pid_alive(pid):
                continue
            reason = f"worker process {pid} ended without finishing the trial (killed)"
            study._storage.set_trial_user_attr(t._trial_id, "error", reason)
            study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
            swept.append(t.number)
            run_id = t.user_attrs.get("mlflow_run_id")
            if run_id:
                self.client.set_tag(run_id, "optuna.trial_state", "FAIL")
                self.client.set_tag(run_id, "medsr.end_reason", reason)
                if self.client.get_run(run_id).info.status == "RUNNING":
                    self.client.set_terminated(run_id, "KILLED")
        return swept

