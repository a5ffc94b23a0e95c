"""Adapt a bundle's model to one scan, record it, and run the bundle's own inference with the adapted copy.

The bundle's inference config gives everything: the network (``network_def``), its physics, the shipped weights
(``ckpt_path``), the normalisation and the runner, so the adapted model sees exactly what inference gives it and
its output lands on the same grid with the same sidecar. The adapted weights and a JSON sidecar go next to the
output (``<scan>_adapted.pt`` / ``.json``); the bundle's ``models/`` is only read.

Privacy: the MLflow run records the input's sha256, shape and spacing, never its file name or path (a file name
can carry a patient identifier); the local sidecar next to the output keeps the path for the user.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .loop import AdaptResult, adapt_network, start_settings
from .objectives import objective_for

__all__ = ["ScanAdaptation", "adapt_scan", "adapt_volume", "bundle_network", "input_sha256", "load_scan", "run_inference"]


@dataclass
class ScanAdaptation:
    """The files and figures of one :func:`adapt_scan`."""

    weights: Path
    sidecar: Path
    outputs: list[Path]
    result: AdaptResult
    run_id: str | None
    record: dict[str, Any]


def input_sha256(path: str | os.PathLike) -> str:
    """sha256 of a scan file, or of a DICOM series folder (its files' hashes in name order)."""
    from medsr_monai.data.datalist import file_sha256

    p = Path(path)
    if p.is_file():
        return file_sha256(p)
    h = hashlib.sha256()
    for f in sorted(q for q in p.iterdir() if q.is_file()):
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def _parser(bundle: Path, config: str, overrides: dict[str, Any]):
    from monai.bundle import ConfigParser

    config_file = bundle / "configs" / f"{config}.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"bundle config {config_file} does not exist (is {bundle} a bundle folder?)")
    parser = ConfigParser()
    parser.read_config(str(config_file))
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser["bundle_root"] = str(bundle)
    for k, v in overrides.items():
        parser[k] = v
    return parser


def bundle_network(bundle: str | os.PathLike, config: str = "inference", shipped: bool = True,
                   device: str | torch.device | None = None, overrides: dict[str, Any] | None = None
                   ) -> torch.nn.Module:
    """The model of a bundle's inference config (``network_def``), with its shipped weights (``ckpt_path``) loaded
    unless ``shipped`` is False (fresh weights: the physics baseline), on ``device`` (default: the config's)."""
    from medsr_monai.workflows.inference import load_checkpoint

    parser = _parser(Path(bundle), config, dict(overrides or {}))
    net = parser.get_parsed_content("network_def", instantiate=True)
    net = net.to(device if device is not None else parser.get_parsed_content("device"))
    if shipped:
        load_checkpoint(net, parser.get_parsed_content("ckpt_path"))
    return net


def _takes_complex(network: torch.nn.Module) -> bool:
    from medsr_monai.workflows.inference import SliceStrategy

    return SliceStrategy.takes_complex(network)


def load_scan(src: Path, modality: str = "auto", normalizer_kwargs: dict | None = None,
              slice_axis_setting: Any = None, complex_input: bool = False) -> dict[str, Any]:
    """The scan as the inference runner sees it: loaded, checked, modality resolved, normalised without clipping
    (``modality``, ``normalizer_kwargs`` and ``slice_axis_setting`` as the runner's). ``complex_input`` (a model
    that reconstructs from the complex zero-filled image): the volume is ``(2, X, Y, Z)`` (real, imaginary) under
    the linear map the runner applies, ``(z - lo) / (hi - lo)`` with the range of the magnitude."""
    from medsr_monai.data import load_volume
    from medsr_monai.data.checks import check_array
    from medsr_monai.data.modality import volume_modality
    from medsr_monai.data.slices import slice_axis
    from medsr_monai.workflows.inference import normalise_input

    data, affine, meta = load_volume(src)
    check_array(src, data, affine, allow_single_slice=False, allow_complex=complex_input)
    data = np.asarray(data)
    data = data.reshape(data.shape[:3])
    is_complex = np.iscomplexobj(data)
    if complex_input and not is_complex:
        raise ValueError(f"{src}: is a real (magnitude) image, but this model reconstructs from the complex "
                         "zero-filled image (write one with medsr_monai.transforms.zero_filled_volume)")
    vol = torch.as_tensor((np.abs(data) if is_complex else data).astype(np.float32))[None]
    dicom = meta.get("Modality", "").upper()
    modality = volume_modality(None, dicom if dicom in ("CT", "MR") else None, modality, min_value=float(vol.min()))
    x, _, _ = normalise_input(data, vol, modality, normalizer_kwargs)
    spacing = [float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)]
    axis = (slice_axis(data.shape, spacing) if slice_axis_setting in (None, "auto", "None")
            else int(slice_axis_setting))
    return {"volume": x, "modality": modality, "spacing": spacing, "shape": list(data.shape), "slice_axis": axis}


def _log_mlflow(tracking_uri: str, method: str, params: dict[str, Any], result: AdaptResult, sidecar: Path,
                tags: dict[str, str]) -> str:
    import mlflow
    from mlflow.entities import Metric, Param

    from medsr_monai.tracking import init_tracking_store

    init_tracking_store(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    name = f"adapt-{method}"
    exp = client.get_experiment_by_name(name)
    from medsr_monai.tracking.models import EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT_KIND

    exp_id = exp.experiment_id if exp else client.create_experiment(
        name, tags={EXPERIMENT_KIND_TAG: TRAINING_EXPERIMENT_KIND})  # the UI's model-training view
    from medsr_monai.tracking.provenance import new_run_name

    run = client.create_run(exp_id, run_name=new_run_name(name), tags={
        **tags, "mlflow.source.name": f"medsr adapt --bundle {method}", "kind": "adaptation"})
    rid = run.info.run_id
    ts = int(run.info.start_time or 0)
    metrics = [Metric("train_loss", v, ts, i + 1) for i, v in enumerate(result.train_losses)]
    metrics += [Metric("val_loss", v, ts, s) for s, v in result.val_history]
    metrics += [Metric(k, float(getattr(result, k)), ts, result.steps)
                for k in ("val_before", "val_after", "val_best", "seconds")]
    metrics.append(Metric("kept", float(result.kept), ts, result.steps))
    client.log_batch(rid, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    for i in range(0, len(metrics), 900):  # MLflow caps a batch at 1000 metrics
        client.log_batch(rid, metrics=metrics[i:i + 900])
    client.log_artifact(rid, str(sidecar))
    client.set_terminated(rid, "FINISHED")
    return rid


def _refuse_existing(out_dir: Path, src: Path, overwrite: bool) -> tuple[Path, Path]:
    from medsr_monai.workflows.inference import volume_stem

    stem = volume_stem(src)
    weights, sidecar = out_dir / f"{stem}_adapted.pt", out_dir / f"{stem}_adapted.json"
    for existing in (weights, sidecar):
        if existing.exists() and not overwrite:
            raise FileExistsError(f"{existing}: already exists (an earlier adaptation of this scan); pass "
                                  "--overwrite to replace it, or choose another --output_dir")
    return weights, sidecar


def adapt_volume(network: torch.nn.Module, src: Path, out_dir: Path, scan_info: dict[str, Any], method: str,
                 tracking_uri: str, seconds: float, from_scratch: bool, start_hash: str | None, seed: int = 0,
                 max_steps: int | None = None, learning_rate: float | None = None, batch_size: int = 8,
                 progress: bool = True, overwrite: bool = False, extra: dict[str, Any] | None = None,
                 allow_large_scale: bool = False) -> tuple[Path, Path, AdaptResult, str, dict[str, Any]]:
    """Adapt ``network`` (in place) to one loaded scan; write ``<scan>_adapted.pt`` / ``.json`` and the MLflow run.
    ``allow_large_scale``: see :func:`~medsr_monai.adapt.objectives.objective_for`.

    Returns ``(weights, sidecar, result, run_id, record)``.
    """
    from medsr_monai.data.datalist import file_sha256
    from medsr_monai.tracking.provenance import collect_provenance

    weights, sidecar = _refuse_existing(out_dir, src, overwrite)
    device = next(network.parameters()).device
    objective = objective_for(network, scan_info["volume"].to(device), scan_info["modality"], scan_info["spacing"],
                              scan_info["slice_axis"], batch_size=batch_size, allow_large_scale=allow_large_scale)
    lr, patience = start_settings(objective, from_scratch)
    lr = learning_rate or lr
    result = adapt_network(network, objective, seconds=seconds, max_steps=max_steps, learning_rate=lr, seed=seed,
                           patience=patience, progress=progress)
    tmp = weights.with_name(weights.name + ".part")
    torch.save(network.state_dict(), tmp)
    os.replace(tmp, weights)  # a run killed while saving leaves no half-written weights under the final name
    record = {
        "bundle": method, **(extra or {}), "input_sha256": input_sha256(src), "input_shape": scan_info["shape"],
        "input_spacing_mm": scan_info["spacing"], "modality": scan_info["modality"],
        "slice_axis": scan_info["slice_axis"], "start": "from scratch" if from_scratch else "shipped weights",
        "start_weights_sha256": start_hash, "budget_seconds": seconds, "learning_rate": lr, "patience": patience,
        "seed": seed,
        **{f"pairs_{k}": v for k, v in objective.describe().items()}, **result.summary(),
        "adapted_weights_sha256": file_sha256(weights),
    }
    sidecar.write_text(json.dumps({**record, "input": str(src), "weights": weights.name}, indent=2))
    run_id = _log_mlflow(tracking_uri, method, record, result, sidecar, collect_provenance(seed=seed, method=method))
    return weights, sidecar, result, run_id, record


def adapt_scan(bundle: str | os.PathLike, scan: str | os.PathLike, seconds: float = 180.0,
               output_dir: str | os.PathLike | None = None, config: str = "inference", from_scratch: bool = False,
               overrides: dict[str, Any] | None = None, tracking_uri: str | None = None, seed: int = 0,
               max_steps: int | None = None, learning_rate: float | None = None, batch_size: int = 8,
               infer: bool = True, progress: bool = True, overwrite: bool = False,
               allow_large_scale: bool = False) -> ScanAdaptation:
    """Fine-tune a copy of ``bundle``'s model on ``scan`` with the bundle's physics, then run its inference.

    Args:
        bundle: the bundle folder (``bundles/edsr``).
        scan: a NIfTI / NRRD file or a DICOM series folder (the scan to super-resolve / denoise).
        seconds: the adaptation's wall-clock budget.
        output_dir: where the output volume, ``<scan>_adapted.pt`` and ``<scan>_adapted.json`` go
            (default ``<bundle>/eval/adapt``).
        config: the inference config to take the model from (e.g. ``inference_ct_denoise`` for the unet bundle's
            CT-denoising task).
        from_scratch: adapt a freshly initialised model (it starts at the physics baseline) instead of the shipped
            weights: for users with no training data at all.
        overrides: config overrides (``{"scale": 4}``...).
        tracking_uri: MLflow store (default: the project store, or ``MLFLOW_TRACKING_URI``).
        seed: seeds the pair sampling.
        max_steps, learning_rate, batch_size: loop settings (default rate and patience:
            :func:`~medsr_monai.adapt.loop.start_settings`).
        infer: run the bundle's inference with the adapted weights afterwards.
        progress: progress bars.
        overwrite: replace an existing ``<scan>_adapted.pt`` / ``.json`` and output volume (default: refuse, before
            any work is done, naming the file).
        allow_large_scale: adapt in-plane SR above x2 anyway (refused by default: it measured harmful, and the
            no-harm guard cannot see it; :func:`~medsr_monai.adapt.objectives.objective_for`).
    """
    from medsr_monai.tracking import resolve_tracking_uri
    from medsr_monai.workflows.inference import ensure_writable_dir, load_checkpoint

    bundle, src = Path(bundle).resolve(), Path(scan).resolve()
    if not src.exists():
        raise FileNotFoundError(f"scan {src} does not exist")
    parser = _parser(bundle, config, dict(overrides or {}))
    method = str(parser.get("method", bundle.name))
    out_dir = ensure_writable_dir(output_dir or bundle / "eval" / "adapt")
    _refuse_existing(out_dir, src, overwrite)
    uri = resolve_tracking_uri(bundle, tracking_uri)
    network = parser.get_parsed_content("network_def", instantiate=True).to(parser.get_parsed_content("device"))
    shipped = parser.get_parsed_content("ckpt_path")
    start_hash = None
    if not from_scratch:
        if not Path(shipped).is_file():
            raise FileNotFoundError(f"bundle weights {shipped} do not exist: train the bundle, or adapt a fresh "
                                    "model with --from-scratch")
        start_hash = load_checkpoint(network, shipped)
    runner_cfg = parser["runner"]
    scan_info = load_scan(src, parser.get_parsed_content("modality"),
                          parser.get_parsed_content("runner#normalizer_kwargs")
                          if "normalizer_kwargs" in runner_cfg else None, parser.get("slice_axis"),
                          complex_input=_takes_complex(network))
    weights, sidecar, result, run_id, record = adapt_volume(
        network, src, out_dir, scan_info, method, uri, seconds, from_scratch, start_hash, seed, max_steps,
        learning_rate, batch_size, progress, overwrite,
        extra={"bundle_version": str(parser.get("_meta_#version", "")), "config": config},
        allow_large_scale=allow_large_scale)
    outputs: list[Path] = []
    if infer:
        parser["ckpt_path"] = str(weights)
        parser["input"] = str(src)
        parser["output_dir"] = str(out_dir)
        if "overwrite" in parser.config:
            parser["overwrite"] = bool(overwrite)
        runner = parser.get_parsed_content("runner", instantiate=True)
        runner.progress = progress
        outputs = list(runner.run())
    return ScanAdaptation(weights=weights, sidecar=sidecar, outputs=outputs, result=result, run_id=run_id,
                          record=record)


def run_inference(runner, adapt_seconds: float = 0.0, from_scratch: bool = False, tracking_uri: str | None = None,
                  seed: int = 0, overwrite: bool = False) -> list[Path]:
    """A bundle's ``run`` step: ``runner.run()``, or with ``adapt_seconds > 0`` each input adapted first.

    The bundles' ``inference.json`` call this with ``--adapt_seconds``: every input volume gets its own adapted
    copy of the runner's network (:func:`adapt_volume`, written next to its output), and the runner then processes
    that input with it. ``from_scratch`` starts each copy from fresh weights instead of the checkpoint.

    Example::

        python -m monai.bundle run --config_file bundles/edsr/configs/inference.json --bundle_root bundles/edsr \\
            --input scan.nii.gz --adapt_seconds 180
    """
    import copy

    from medsr_monai.tracking import resolve_tracking_uri
    from medsr_monai.workflows.inference import ensure_writable_dir, resolve_inputs

    if not adapt_seconds or float(adapt_seconds) <= 0:
        return runner.run()
    out_dir = ensure_writable_dir(runner.output_dir)
    uri = resolve_tracking_uri(None, tracking_uri)
    strategy = runner.strategy
    # the start of every input's adaptation, snapshot once: from scratch the network as built, else with the
    # checkpoint; each input's run then loads its own adapted weights into runner.network
    start_hash = None if from_scratch else runner.load_weights()
    start = copy.deepcopy(runner.network)
    outputs: list[Path] = []
    for item in resolve_inputs(runner.inputs):
        src = Path(item["image"]).resolve()
        net = copy.deepcopy(start)
        scan_info = load_scan(src, item.get("modality") or runner.modality, runner.normalizer_kwargs,
                              getattr(strategy, "slice_axis", None), complex_input=_takes_complex(net))
        weights, *_ = adapt_volume(net, src, out_dir, scan_info, runner.bundle_name or "bundle", uri,
                                   float(adapt_seconds), from_scratch, start_hash, seed, progress=runner.progress,
                                   overwrite=overwrite, extra={"bundle_version": runner.bundle_version})
        one = copy.copy(runner)
        one.inputs, one.checkpoint = str(src), str(weights)
        outputs += list(one.run())
    return outputs
