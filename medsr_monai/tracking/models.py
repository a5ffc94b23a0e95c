"""What MLflow users expect of a training run, with MLflow's own APIs.

* the experiment says it is a model-training experiment (``mlflow.experimentKind``), so ``mlflow ui`` opens on the
  training view, not the GenAI one;
* standard source tags (``mlflow.source.name`` / ``type`` / ``git.*``), so the Source column shows the bundle and
  config and the commit;
* the data as run inputs (:class:`mlflow.data.meta_dataset.MetaDataset`, one per split, digest from the datalist's
  sha256, a :class:`~mlflow.data.code_dataset_source.CodeDatasetSource` naming the bundle: never a path or a file
  name of a scan);
* the trained model as an MLflow ``pyfunc`` model (signature, input example) whose ``predict`` runs the bundle's
  own inference (its ``inference.json`` runner) on a numpy array, so ``mlflow models predict`` and
  ``mlflow.pyfunc.load_model`` work offline;
* registering that model (``medsr register``) under ``<method>-<task>`` (e.g. ``edsr-x2``) with an alias, and
  finding a registered version's bundle again (``medsr publish --model models:/edsr-x2@champion``).
"""

from __future__ import annotations

import contextlib
import importlib.metadata as _md
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

try:  # the pyfunc base class; mlflow is a hard dependency, but keep importing this module cheap to fail
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover
    PythonModel = object  # type: ignore[misc,assignment]

__all__ = [
    "EXPERIMENT_KIND_TAG", "TRAINING_EXPERIMENT_KIND", "mark_training_experiment", "source_tags", "config_source",
    "dataset_inputs", "BundleModel", "log_bundle_model", "model_name", "register_run_model", "registered_versions",
    "download_registered_bundle", "MODEL_ARTIFACT",
]

#: experiment tag the MLflow 3 UI reads to choose its view (``ExperimentKind`` in the UI's code)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
#: the value for classic model training ("Machine learning" in the UI), as opposed to ``genai_development``
TRAINING_EXPERIMENT_KIND = "custom_model_development"
#: name of the logged pyfunc model in a training run
MODEL_ARTIFACT = "model"
#: MLflow's dataset digest column holds 36 characters (enforced by PostgreSQL/MySQL); the full sha256 is an input tag
_DIGEST_LEN = 36
#: inference settings never copied from the training config (paths, devices, run plumbing)
_NOT_COPIED = {"bundle_root", "device", "ckpt_path", "input", "output_dir", "overwrite", "dataset_dir", "ckpt_dir",
               "imports", "initialize", "run", "finalize", "tracking_uri", "run_name", "provenance",
               "experiment_name", "roi_size", "sw_batch_size", "overlap", "adapt_seconds", "adapt_from_scratch"}


# ----------------------------------------------------------------------------------------------- experiment, source
def mark_training_experiment(client, experiment_id: str) -> None:
    """Tag an experiment as model training (``mlflow.experimentKind = custom_model_development``) unless it has a
    kind already (a user's choice is kept).

    Args:
        client: an :class:`mlflow.MlflowClient` on the store.
        experiment_id: the experiment to tag.
    """
    exp = client.get_experiment(experiment_id)
    if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT_KIND)


def config_source(bundle_root: str | os.PathLike | None, default: str = "train.json",
                  argv: list[str] | None = None) -> str:
    """``<bundle>:<config>[+<config>...]``: the bundle and the config file(s) a run executes, without any folder.

    The config files come from ``--config_file`` of ``python -m monai.bundle run`` when present (file names only,
    so no local path is recorded), else ``default``. No ``/`` in the result: the MLflow UI shows the last path
    component of a source name.

    Args:
        bundle_root: the bundle folder (its name is the bundle's name).
        default: the config file name when the command line does not say.
        argv: the command line (default: ``sys.argv``).
    """
    argv = list(sys.argv if argv is None else argv)
    files: list[str] = []
    for i, a in enumerate(argv):
        value = argv[i + 1] if a == "--config_file" and i + 1 < len(argv) else (
            a.split("=", 1)[1] if a.startswith("--config_file=") else None)
        if value:
            files = [Path(f.strip(" '\"")).name for f in value.strip("[]").split(",") if f.strip(" '\"")]
    bundle = Path(str(bundle_root)).resolve().name if bundle_root else "bundle"
    return f"{bundle}:{'+'.join(files or [default])}"


def _git(args: list[str], cwd: Path) -> str:
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _public_repo_url(url: str) -> str | None:
    """A remote URL that names no local path and carries no credentials (``https://``/``ssh://``/``git@``), else
    ``None``."""
    url = url.strip()
    if re.match(r"^git@[\w.-]+:[\w./-]+$", url):
        return url
    m = re.match(r"^(https?|ssh|git)://(?:[^@/]*@)?([^/]+)(/[\w./-]*)$", url)
    return f"{m.group(1)}://{m.group(2)}{m.group(3)}" if m else None


def source_tags(bundle_root: str | os.PathLike | None, source_name: str, commit: str | None = None) -> dict[str, str]:
    """MLflow's standard source tags of a run: ``mlflow.source.name`` (bundle and config), ``mlflow.source.type``
    (``LOCAL``), ``mlflow.source.git.commit``, and ``mlflow.source.git.branch`` / ``repoURL`` only when they are
    plain names (a branch of ``[A-Za-z0-9._/-]``, a remote URL that is not a local path, credentials stripped).

    Args:
        bundle_root: the bundle folder (the git tree is looked up from there).
        source_name: see :func:`config_source`.
        commit: the commit already recorded in the provenance (looked up when ``None``).
    """
    tags = {"mlflow.source.name": source_name, "mlflow.source.type": "LOCAL"}
    where = Path(str(bundle_root)).resolve() if bundle_root else Path.cwd()
    if not where.is_dir():
        where = Path.cwd()
    commit = commit if commit and commit != "unknown" else _git(["rev-parse", "HEAD"], where)
    if re.fullmatch(r"[0-9a-f]{7,64}", commit or ""):
        tags["mlflow.source.git.commit"] = commit
        branch = _git(["rev-parse", "--abbrev-ref", "HEAD"], where)
        if re.fullmatch(r"[A-Za-z0-9._/-]{1,100}", branch) and branch != "HEAD":
            tags["mlflow.source.git.branch"] = branch
        url = _public_repo_url(_git(["remote", "get-url", "origin"], where))
        if url:
            tags["mlflow.source.git.repoURL"] = url
    return tags


# ----------------------------------------------------------------------------------------------- datasets
def dataset_inputs(dataset_dir: str | os.PathLike | None, datalist_sha256: str | None, contexts: list[str],
                   bundle: str) -> list:
    """One :class:`mlflow.entities.DatasetInput` per split (``training``, ``validation``, ``test``).

    Each is a :class:`~mlflow.data.meta_dataset.MetaDataset` named ``<datalist name>-<split>`` (MLflow keeps one
    input per name and digest in a run, so the splits of one datalist need names of their own), digest the first
    36 hex digits of the datalist's sha256 (MLflow's digest column), source a
    :class:`~mlflow.data.code_dataset_source.CodeDatasetSource` naming the bundle and the full sha256, and input
    tags ``mlflow.data.context`` = the split and ``medsr.datalist_sha256``. Only the datalist's own ``name`` and
    split sizes are read from it: no path, file name or subject goes into MLflow.

    Args:
        dataset_dir: the datalist file or the folder holding ``datalist.json``.
        datalist_sha256: its sha256 (from the provenance); ``None``: nothing to log.
        contexts: the splits the run reads.
        bundle: the bundle's name (recorded in the source).
    """
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    if not datalist_sha256 or not dataset_dir:
        return []
    p = Path(str(dataset_dir))
    datalist = p / "datalist.json" if p.is_dir() else p
    try:
        content = json.loads(datalist.read_text())
    except (OSError, ValueError):
        content = {}
    name = str(content.get("name") or "datalist")
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,80}", name):  # a free-text name could say anything: keep a safe one
        name = "datalist"
    out = []
    for ctx in contexts:
        n = len(content.get(ctx) or []) if isinstance(content.get(ctx), list) else None
        source = CodeDatasetSource({"bundle": bundle, "datalist_sha256": datalist_sha256, "split": ctx,
                                    **({"items": str(n)} if n is not None else {})})
        ds = MetaDataset(source=source, name=f"{name}-{ctx}", digest=datalist_sha256[:_DIGEST_LEN])
        out.append(DatasetInput(ds._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, ctx),
                                                             InputTag("medsr.datalist_sha256", datalist_sha256)]))
    return out


# ----------------------------------------------------------------------------------------------- the pyfunc model
def _is_code(v: Any) -> bool:
    return isinstance(v, str) and (v.startswith("$") or v.startswith("@") or v.startswith("%"))


def _literal(v: Any) -> bool:
    if isinstance(v, (bool, int, float, str, type(None))):
        return not _is_code(v)
    if isinstance(v, list):
        return all(_literal(x) for x in v) and len(v) <= 16
    return False


def inference_config(bundle: Path, task: str | None = None) -> Path:
    """The bundle's inference config for a task: ``configs/inference_<task>.json`` when there is one, else
    ``configs/inference.json``.

    Args:
        bundle: the bundle folder.
        task: the training config's ``task`` (unet: ``mri_recon`` / ``ct_denoise``).
    """
    if task and re.fullmatch(r"[A-Za-z0-9_]+", str(task)):
        own = bundle / "configs" / f"inference_{task}.json"
        if own.is_file():
            return own
    return bundle / "configs" / "inference.json"


def inference_overrides(train_config: dict, inference_file: Path) -> dict[str, Any]:
    """The settings of the executed training config that the inference config also has, as literals (``scale``,
    ``task``, network sizes, consistency switches...), where they differ: so the logged model runs with what was
    trained, e.g. ``--scale 4``. Paths, devices and run plumbing are never copied.

    Args:
        train_config: the executed training config (``parser.get()``).
        inference_file: the bundle's inference config.
    """
    raw = json.loads(Path(inference_file).read_text())
    out = {}
    for k, v in raw.items():
        if k in _NOT_COPIED or k.startswith("_") or k not in train_config:
            continue
        tv = train_config[k]
        if _literal(tv) and (_is_code(v) or _literal(v)) and tv != v:
            out[k] = tv
    return out


def _phantom(shape: tuple[int, ...], ct: bool) -> np.ndarray:
    """A synthetic input example (no patient data): a Shepp-Logan phantom in MR units, or HU for CT."""
    from skimage.data import shepp_logan_phantom
    from skimage.transform import resize

    img = resize(shepp_logan_phantom(), shape[:2], anti_aliasing=True)
    img = (img * 2000.0 - 1000.0) if ct else img * 1000.0
    if len(shape) == 3:
        img = np.repeat(img[..., None], shape[2], axis=2)
    return img.astype(np.float32)


class BundleModel(PythonModel):
    """The MLflow ``pyfunc`` form of a trained bundle: ``predict`` runs the bundle's own inference runner (its
    ``configs/inference*.json``, the same code as ``monai.bundle run``) on a numpy array.

    Input: a float32 2D slice ``(H, W)`` for the slice bundles (in-plane SR, restoration, translation), a 3D volume
    ``(X, Y, Z)`` for through-plane SR (slices along the last axis), and for a model that reconstructs from the
    complex zero-filled image ``(2, H, W)`` (real, imaginary). Output: the model's output in the input's units
    (``(s*H, s*W)`` for in-plane SR by ``s``). The array is written to a temporary NIfTI with a 1 mm identity
    affine and run through the runner, so normalisation, sliding windows and the physics are the bundle's.

    Params (``predict(..., params={...})``): ``modality`` (``auto``, ``MR`` or ``CT``; default, or ``""``: the
    inference config's own).
    """

    def load_context(self, context) -> None:
        """Build the inference runner from the model's bundle copy and settings.

        Args:
            context: MLflow's context; ``artifacts["bundle"]`` is the bundle folder (configs, weights).
        """
        from monai.bundle import ConfigParser

        bundle = Path(context.artifacts["bundle"])
        self.settings = json.loads((bundle / "mlflow_settings.json").read_text())
        parser = ConfigParser()
        parser.read_config(str(bundle / "configs" / self.settings["inference_config"]))
        meta = bundle / "configs" / "metadata.json"
        if meta.is_file():
            parser.read_meta(str(meta))
        parser["bundle_root"] = str(bundle)
        for k, v in self.settings.get("overrides", {}).items():
            parser[k] = v
        self._tmp = tempfile.mkdtemp(prefix="medsr_pyfunc_")
        import atexit

        atexit.register(shutil.rmtree, self._tmp, True)
        parser["input"] = os.path.join(self._tmp, "input.nii.gz")
        parser["output_dir"] = os.path.join(self._tmp, "out")
        parser["overwrite"] = True
        self.runner = parser.get_parsed_content("runner")
        self.runner.progress = False
        self.runner.strategy.progress = False
        self.default_modality = self.runner.modality

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> np.ndarray:
        """The bundle's inference on one array (see the class doc).

        Args:
            context: MLflow's context (unused).
            model_input: a numpy array (or anything ``np.asarray`` takes).
            params: ``{"modality": "auto" | "MR" | "CT"}``.
        """
        from medsr_monai.data.samples import write_nifti

        x = np.asarray(model_input)
        if self.settings.get("complex_input"):
            if x.ndim < 3 or x.shape[0] != 2:
                raise ValueError(f"this model takes (2, H, W) arrays (real, imaginary), got {x.shape}")
            x = (x[0] + 1j * x[1]).astype(np.complex64)
        elif np.iscomplexobj(x) or x.dtype == object:
            raise ValueError(f"expected a real array, got {x.dtype}")
        if x.ndim not in (2, 3):
            raise ValueError(f"expected a 2D slice or a 3D volume, got shape {x.shape}")
        two_d = x.ndim == 2
        vol = (x[..., None] if two_d else x)
        if not np.iscomplexobj(vol):
            vol = vol.astype(np.float32)
        modality = str((params or {}).get("modality") or self.default_modality)
        work = Path(tempfile.mkdtemp(prefix="predict_", dir=self._tmp))
        try:
            src = write_nifti(work / "input.nii.gz", vol, np.eye(4))
            self.runner.inputs, self.runner.output_dir = str(src), str(work / "out")
            self.runner.overwrite, self.runner.modality = True, modality
            with contextlib.redirect_stdout(sys.stderr):  # the runner's summary must not mix with predictions
                written = self.runner.run()
            import nibabel as nib

            y = np.asarray(nib.load(str(written[0])).dataobj, dtype=np.float32)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return y.reshape(y.shape[:2]) if two_d else y


def _stage_bundle(bundle: Path, weights: list[Path], dest: Path, settings: dict) -> Path:
    """Copy of ``bundle`` as published (configs, docs, metadata; no run outputs, overlays or shipped weights) with
    the trained ``weights`` in ``models/`` and ``mlflow_settings.json``."""
    from medsr_monai.publish.archive import bundle_files

    out = dest / bundle.name
    for rel in bundle_files(bundle):
        if rel.startswith("models/"):
            continue
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(bundle / rel, out / rel)
    (out / "models").mkdir(parents=True, exist_ok=True)
    for w in weights:
        shutil.copy2(w, out / "models" / w.name)
    (out / "mlflow_settings.json").write_text(json.dumps(settings, indent=2, sort_keys=True))
    return out


def _requirements() -> list[str]:
    reqs = []
    for dist in ("medsr-monai", "torch", "monai", "mlflow", "nibabel", "numpy", "scikit-image"):
        try:
            reqs.append(f"{dist}=={_md.version(dist)}")
        except _md.PackageNotFoundError:
            reqs.append(dist)
    return reqs


def log_bundle_model(run_id: str, tracking_uri: str, bundle_root: str | os.PathLike, weights: list[str | Path],
                     train_config: dict, task: str | None = None, name: str = MODEL_ARTIFACT,
                     registered_model_name: str | None = None):
    """Log the trained bundle as an MLflow ``pyfunc`` model of run ``run_id`` (see :class:`BundleModel`), with a
    signature and a synthetic input example (a Shepp-Logan phantom: no patient data), validated by running the
    model on it.

    Args:
        run_id: the training run.
        tracking_uri: its store.
        bundle_root: the bundle folder (configs are copied with the weights).
        weights: the trained weights files (``models/model.pt``, and e.g. ``model_BA.pt``), as the run logged them.
        train_config: the executed training config (settings shared with inference are applied, see
            :func:`inference_overrides`).
        task: the training config's ``task`` (chooses ``inference_<task>.json``).
        name: the model's name in the run.
        registered_model_name: also register it under this name (a new version).

    Returns:
        MLflow's :class:`~mlflow.models.model.ModelInfo`.
    """
    import mlflow
    from mlflow.models import Model, ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    bundle = Path(str(bundle_root)).resolve()
    inf = inference_config(bundle, task)
    overrides = inference_overrides(train_config, inf)
    raw = json.loads(inf.read_text())
    runner = str(raw.get("runner", {}).get("_target_", ""))
    through_plane = "ThroughPlane" in runner
    complex_input = "cartesian" in json.dumps(raw.get("physics", "")).lower()
    modality = overrides.get("modality", raw.get("modality", "auto"))
    modality = "" if _is_code(modality) else str(modality)  # "": the inference config's own choice (per task)
    ct = str(modality).upper() == "CT" or "ct" in str(task or "").split("_")
    settings = {"bundle": bundle.name, "inference_config": inf.name, "overrides": overrides,
                "complex_input": complex_input, "through_plane": through_plane, "task": task}
    shape = (32, 32, 8) if through_plane else (32, 32)
    example = _phantom(shape, ct)
    if complex_input:
        example = np.stack([example, np.zeros_like(example)])
    ndim = example.ndim
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (2, -1, -1) if complex_input else (-1,) * ndim)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1,) * (3 if through_plane else 2))]),
        params=ParamSchema([ParamSpec("modality", "string", modality)]),
    )
    # MLflow's Model.log takes the process-wide URI: MLflow's own context manager sets ours and puts it back
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    env = os.environ.get("MLFLOW_TRACKING_URI")  # restoring an unset URI unsets the variable: keep the process's
    try:
        with _use_tracking_uri(tracking_uri), tempfile.TemporaryDirectory() as tmp:
            staged = _stage_bundle(bundle, [Path(w) for w in weights], Path(tmp), settings)
            # the logged model belongs to the run's experiment (Model.log alone would put it in the active one)
            run = mlflow.MlflowClient(tracking_uri).get_run(run_id)
            logged = mlflow.initialize_logged_model(
                name=name, source_run_id=run_id, experiment_id=run.info.experiment_id,
                params={k: str(v)[:500] for k, v in run.data.params.items()},
                tags={"medsr.bundle": bundle.name, "medsr.inference_config": inf.name})
            return Model.log(artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=run_id,
                             model_id=logged.model_id, python_model=BundleModel(),
                             artifacts={"bundle": str(staged)}, signature=signature, input_example=example,
                             pip_requirements=_requirements(), registered_model_name=registered_model_name)
    finally:
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env


# ----------------------------------------------------------------------------------------------- registry
def model_name(method: str, params: dict[str, str]) -> str:
    """The registered name of a method and task: ``edsr-x2``, ``unet-mri_recon-R4``, ``seqsr_lstm-x2-through-plane``.

    Args:
        method: the bundle's method (``medsr.method`` tag / ``method`` param).
        params: the run's params (the task comes from :func:`medsr_monai.compare.task_of`).
    """
    from medsr_monai.compare import task_of

    task = task_of(params)
    task = "" if task == "-" else re.sub(r"[^A-Za-z0-9_.]+", "-", task.replace("=", "")).strip("-")
    return f"{method}-{task}" if task else method


def _logged_model_uri(client, run_id: str, name: str = MODEL_ARTIFACT) -> str:
    """``models:/<model_id>`` of the model ``name`` a run logged (MLflow 3 logged model), else ``runs:/`` form."""
    try:
        models = client.search_logged_models(
            experiment_ids=[client.get_run(run_id).info.experiment_id],
            filter_string=f"source_run_id = '{run_id}' AND name = '{name}'")
        if models:
            return f"models:/{models[0].model_id}"
    except Exception:  # noqa: BLE001 - older stores: fall back to the run's artifact path
        pass
    return f"runs:/{run_id}/{name}"


def register_run_model(run_id: str, tracking_uri: str, name: str | None = None, alias: str | None = None):
    """Register the ``pyfunc`` model a training run logged, as a new version of ``name`` (default
    :func:`model_name` of the run's method and task), optionally pointing ``alias`` (e.g. ``champion``) at it.

    Args:
        run_id: the training run.
        tracking_uri: its store (the registry lives in the same store).
        name: registered model name.
        alias: alias to set on the new version.

    Returns:
        the :class:`~mlflow.entities.model_registry.ModelVersion`.

    Raises:
        ValueError: the run logged no model.
    """
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    run = client.get_run(run_id)
    uri = _logged_model_uri(client, run_id)
    if uri.startswith("runs:/") and not any(a.path == MODEL_ARTIFACT for a in client.list_artifacts(run_id)):
        raise ValueError(f"run {run_id} logged no MLflow model (train with log_model true, the default)")
    method = run.data.tags.get("medsr.method") or run.data.params.get("method") or "model"
    name = name or model_name(method, run.data.params)
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, description=f"{method} trained by medsr-monai bundles")
    model_id = uri[len("models:/"):] if uri.startswith("models:/") else None
    mv = client.create_model_version(name, uri, run_id=run_id, model_id=model_id, await_creation_for=0,
                                     tags={"medsr.method": method, "medsr.bundle": run.data.tags.get(
                                         "mlflow.source.name", "").split(":")[0]})
    if alias:
        client.set_registered_model_alias(name, alias, mv.version)
    return client.get_model_version(name, mv.version)


def registered_versions(tracking_uri: str) -> list[dict[str, Any]]:
    """Every version of every registered model in the store: name, version, aliases, run id, status, source.

    Args:
        tracking_uri: the store.
    """
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    rows = []
    for rm in client.search_registered_models(max_results=1000):
        aliases: dict[str, list[str]] = {}
        for a, v in (rm.aliases or {}).items():
            aliases.setdefault(str(v), []).append(a)
        for mv in client.search_model_versions(f"name = '{rm.name}'", max_results=1000):
            rows.append({"name": rm.name, "version": int(mv.version), "aliases": sorted(aliases.get(str(mv.version), [])),
                         "run_id": mv.run_id, "status": mv.status, "source": mv.source})
    return sorted(rows, key=lambda r: (r["name"], -r["version"]))


def format_versions(rows: list[dict[str, Any]], fmt: str = "markdown") -> str:
    """The table of :func:`registered_versions` (``markdown``, ``csv`` or ``json``).

    Args:
        rows: from :func:`registered_versions`.
        fmt: output format.
    """
    if fmt == "json":
        return json.dumps(rows, indent=2)
    cols = ["name", "version", "aliases", "run_id", "status"]
    cells = [[r["name"], str(r["version"]), ",".join(r["aliases"]) or "-", r["run_id"] or "-", r["status"]]
             for r in rows]
    if fmt == "csv":
        return "\n".join([",".join(cols)] + [",".join(c) for c in cells])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])


@contextlib.contextmanager
def mlflow_uris_preserved():
    """MLflow's tracking and registry URIs, and the ``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI`` variables,
    exactly as they were before the block, whatever it sets.

    ``mlflow.set_tracking_uri`` / ``set_registry_uri`` also write those variables into ``os.environ``; left set, a
    caller in the same process (``medsr publish``, a notebook, the next test) would send its later runs to that
    store. MLflow keeps the values in module globals and offers no public way to unset them, hence the private names.
    """
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri,
             {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")})
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved[0], saved[1]
        for k, v in saved[2].items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _mlflow_uris(uri: str):
    """MLflow's tracking and registry URIs set to ``uri`` for the block, then as they were."""
    import mlflow

    with mlflow_uris_preserved():
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        yield


def download_registered_bundle(model_uri: str, dest: str | os.PathLike, tracking_uri: str) -> tuple[Path, str | None]:
    """The bundle folder (configs + trained weights) inside a registered (or logged) pyfunc model, downloaded to
    ``dest``, and the id of the run that trained it.

    Args:
        model_uri: ``models:/<name>@<alias>``, ``models:/<name>/<version>``, ``models:/<model_id>`` or ``runs:/``.
        dest: download folder.
        tracking_uri: the store (tracking and registry).

    Raises:
        ValueError: the model is not a medsr bundle model.
    """
    import mlflow
    from mlflow.artifacts import download_artifacts

    with _mlflow_uris(tracking_uri):
        local = Path(download_artifacts(artifact_uri=model_uri, dst_path=str(dest), tracking_uri=tracking_uri))
        found = [p.parent for p in local.rglob("mlflow_settings.json")]
        if not found:
            raise ValueError(f"{model_uri}: not a medsr bundle model (no bundle with mlflow_settings.json in it)")
        info = mlflow.models.get_model_info(model_uri)
    return found[0], info.run_id
