"""Which training run produced a bundle's weights: the FINISHED MLflow run whose ``model.pt`` artifact has the
same sha256 as the bundle's ``models/model.pt``, or, where that store is not at hand (a fresh clone), the provenance
sidecar shipped next to the weights (``models/model.provenance.json``, written from that run by
:func:`write_sidecar`)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from medsr_monai.data.datalist import file_sha256 as sha256

from .checks import PublishError

__all__ = ["sha256", "find_provenance", "run_provenance", "sidecar_path", "read_sidecar", "write_sidecar"]

#: what a sidecar holds besides the run's provenance: the weights it describes, by name and sha256
SIDECAR_SUFFIX = ".provenance.json"


def _model_artifact_sha(client, run_id: str, tmp: str, size: int | None = None, name: str = "model.pt"
                        ) -> str | None:
    """sha256 of the run's weights artifact ``name`` (``model.pt``, or a task's ``model_<task>.pt``); ``None``
    when it has none (or, given ``size``, when its size differs: no download needed to rule it out)."""
    sizes = {a.path: a.file_size for a in client.list_artifacts(run_id)}
    if name not in sizes or (size is not None and sizes[name] not in (None, size)):
        return None
    return sha256(client.download_artifacts(run_id, name, tempfile.mkdtemp(dir=tmp)))


def run_provenance(client, run, uri: str) -> dict:
    """What a collaborator needs to trace the weights: the run, its metrics and its provenance tags
    (data hashes, git commit, seed, package versions, recorded by ``MLflowRunHandler`` as ``medsr.*``)."""
    tags = run.data.tags
    prov = {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "experiment_id": run.info.experiment_id,
        "tracking_uri": uri,
        "status": run.info.status,
        "metrics": dict(run.data.metrics),
        "params": dict(run.data.params),
        "tags": {k[len("medsr."):]: v for k, v in tags.items() if k.startswith("medsr.")},
    }
    prov["data_hash"] = {k: v for k, v in prov["tags"].items() if k.endswith("_sha256")}
    return prov


def find_provenance(model: Path, experiment: str, uri: str, run_id: str | None = None) -> dict | None:
    """Provenance of ``model`` from the store ``uri``.

    Args:
        model: the bundle's ``models/model.pt``.
        experiment: the experiment the bundle trains into (its ``method``, i.e. the bundle name).
        uri: the MLflow tracking URI.
        run_id: use this run instead of searching; refused if its ``model.pt`` artifact is another file.

    Returns:
        the provenance dict, or ``None`` when no FINISHED run of ``experiment`` logged these weights.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    digest = sha256(model)
    with tempfile.TemporaryDirectory() as tmp:
        if run_id:
            try:
                run = client.get_run(run_id)
            except MlflowException as e:
                raise PublishError(f"--run-id {run_id}: no such run in {uri}: {e.message}") from e
            found = _model_artifact_sha(client, run_id, tmp, name=Path(model).name)
            if found is not None and found != digest:
                raise PublishError(f"--run-id {run_id}: its model.pt artifact (sha256 {found[:12]}) is not {model} "
                                   f"(sha256 {digest[:12]})")
            return run_provenance(client, run, uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return None
        runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=1000)
        for run in runs:
            if _model_artifact_sha(client, run.info.run_id, tmp, model.stat().st_size, Path(model).name) == digest:
                return run_provenance(client, run, uri)
    return None


def sidecar_path(weights: Path) -> Path:
    """``models/model.pt`` -> ``models/model.provenance.json``."""
    weights = Path(weights)
    return weights.with_name(weights.stem + SIDECAR_SUFFIX)


def write_sidecar(weights: Path, provenance: dict, training: dict | None = None) -> Path:
    """Store ``provenance`` (from :func:`run_provenance`) next to ``weights``, tied to them by sha256.

    Args:
        weights: the shipped weights file.
        provenance: the training run's provenance (run id, metrics, params, seed, git commit, package versions,
            data hashes).
        training: how it was trained, in words and numbers (budget, threads, machine, what it was measured on).
    """
    import json

    doc = {"weights": Path(weights).name, "weights_sha256": sha256(weights), **provenance}
    if training:
        doc["training"] = training
    dest = sidecar_path(weights)
    dest.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return dest


def read_sidecar(weights: Path) -> dict | None:
    """The sidecar's provenance of ``weights``; ``None`` when there is none. Raises :class:`PublishError` when the
    sidecar is unreadable or describes other weights (its sha256 differs: the weights were retrained or replaced
    and the sidecar was not)."""
    import json

    path = sidecar_path(weights)
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PublishError(f"{path}: unreadable provenance sidecar ({e})") from e
    if not isinstance(doc, dict) or doc.get("weights_sha256") != sha256(weights):
        raise PublishError(f"{path} describes other weights (sha256 {str(doc.get('weights_sha256'))[:12]}) than "
                           f"{weights} (sha256 {sha256(weights)[:12]}): write it again from the run that trained "
                           "them, or remove it")
    doc["source"] = f"sidecar {path.name}"
    return doc
