"""Whole-volume inference for every bundle: NIfTI (NRRD, DICOM) in, NIfTI + JSON sidecar out, overlaying the input.

:class:`VolumeRunner` is the one runner: inputs, loading with MONAI's ``LoadImage``
(:func:`~medsr_monai.data.load_volume`), checks, modality, normalisation, output in the input's units and voxel
type, sidecar, progress and memory figures. A small strategy says how the network runs over a volume and where
its output lies: :class:`SliceStrategy` (MONAI's ``SliceInferer``, a 2D network over the slices, sliding window
within each slice: in-plane SR; at scale 1 same-size restoration and translation) or
:class:`~medsr_monai.workflows.through_plane.ThroughPlaneStrategy`. :class:`VolumeSuperResolver` and
``ThroughPlaneSuperResolver`` are the runner with each strategy, the names the bundle configs use.

Memory bound: the network only ever sees ``sw_batch_size`` windows of ``roi_size`` (on ``device``, e.g. the
GPU); the input and output volumes stay in host memory as float32 (plus the output in its stored dtype while
writing). :func:`memory_estimate` gives those figures for a volume; they are logged and kept in the sidecar.

Grid convention (in-plane): the LR input voxel ``i`` is taken to sit at output voxel ``s*i`` ("corner", what
k-space truncation and decimation produce). The output affine is therefore the input affine with
the in-plane columns divided by ``s`` and the same origin.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.inferers import SliceInferer
from tqdm.auto import tqdm

from medsr_monai.data.datalist import file_sha256
from medsr_monai.data.slices import slice_axis

from .weights import load_weights

__all__ = [
    "SliceStrategy", "VolumeRunner", "VolumeSuperResolver", "resolve_inputs", "sr_affine", "ensure_writable_dir",
    "file_sha256", "memory_estimate", "load_checkpoint", "volume_stem", "write_output_volume", "output_paths",
    "InferenceError", "OutputExistsError",
]

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr")


class InferenceError(RuntimeError):
    """Some inputs of an inference run failed (the others were processed). The message lists each failed input
    with its problem, one per line, the last line naming a file and its problem."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


class OutputExistsError(FileExistsError):
    """An output is already there and ``overwrite`` is not set."""


def ensure_writable_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Create ``path`` if needed and check it is writable; raise ``PermissionError`` naming it if not."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write_test_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"{what} {p} is not writable: {e.strerror or e}") from e
    return p


def resolve_inputs(source: str | os.PathLike | Sequence[str], split: str | None = None) -> list[dict[str, Any]]:
    """Volumes to process: a NIfTI/NRRD file, a folder of them, a DICOM series folder (or a folder of series
    folders), or a datalist (all splits, or ``split``).

    Returns ``[{"image": path, ...}]``; raises ``FileNotFoundError``/``ValueError`` naming the source.
    """
    if isinstance(source, (list, tuple)):
        return [item for s in source for item in resolve_inputs(s, split)]
    p = Path(source)
    if not p.exists():
        raise FileNotFoundError(f"inference input {p} does not exist")
    if p.is_dir() and not (p / "datalist.json").is_file():
        from medsr_monai.data.checks import is_dicom_file

        files = sorted(f for f in p.iterdir() if f.name.endswith(VOLUME_SUFFIXES))
        if files:
            return [{"image": str(f)} for f in files]
        if any(is_dicom_file(f) for f in p.iterdir() if f.is_file()):
            return [{"image": str(p)}]  # the folder is one DICOM series
        series = sorted(d for d in p.iterdir() if d.is_dir() and any(is_dicom_file(f) for f in d.iterdir()))
        if series:
            return [{"image": str(d)} for d in series]
        raise ValueError(f"inference input folder {p} holds no NIfTI/NRRD files and no DICOM series")
    if p.name.endswith(VOLUME_SUFFIXES):
        return [{"image": str(p)}]
    from medsr_monai.data import load_datalist

    splits = [split] if split else ["training", "validation", "test"]
    items: list[dict[str, Any]] = []
    for s in splits:
        try:
            items += load_datalist(p, s)
        except Exception:
            if split:
                raise
    if not items:
        raise ValueError(f"datalist {p} lists no volumes")
    return items


def load_checkpoint(network: torch.nn.Module, checkpoint: str | os.PathLike | None) -> str | None:
    """Load inference weights (``weights_only``) into ``network``; return the file's sha256 (``None``: no file
    given, the network keeps its weights). A missing file raises ``FileNotFoundError`` naming it."""
    if not checkpoint:
        return None
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist: train the bundle first, or set ckpt_path")
    load_weights(network, checkpoint, what="checkpoint")
    return file_sha256(checkpoint)


def volume_stem(path: str | os.PathLike) -> str:
    """File name without its volume suffix (``scan.nii.gz`` -> ``scan``; a DICOM folder keeps its name)."""
    name = Path(path).name
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def output_paths(sources: Sequence[str | os.PathLike], out_dir: Path, postfix: str
                 ) -> tuple[list[Path | None], dict[int, str], dict[int, str]]:
    """Where each input's output goes, so that no two inputs ever write one file.

    ``<out_dir>/<stem>_<postfix>.nii.gz`` when the stems are unique (the usual case: one folder, one scan); when two
    inputs share a stem (``p1/T1w.nii.gz`` and ``p2/T1w.nii.gz``), every input's folder relative to the inputs'
    common folder is mirrored under ``out_dir`` (``p1/T1w_sr.nii.gz``, ``p2/T1w_sr.nii.gz``). Inputs that still
    collide (``x.nii`` and ``x.nii.gz`` side by side) get no output path; a file listed again (e.g. in two splits
    of a datalist) is processed once.

    Returns:
        (output path or ``None`` per input, ``{index: reason}`` for colliding inputs, ``{index: reason}`` for
        repeats of an earlier input).
    """
    srcs = [Path(s).absolute() for s in sources]
    first: dict[Path, int] = {}
    repeats = {i: f"{s}: listed more than once; processed once" for i, s in enumerate(srcs)
               if first.setdefault(s, i) != i}
    names = [f"{volume_stem(s)}_{postfix}.nii.gz" for s in srcs]
    outs = [out_dir / n for n in names]
    unique = [i for i in range(len(srcs)) if i not in repeats]
    if len({names[i] for i in unique}) < len(unique):
        common = Path(os.path.commonpath([str(srcs[i].parent) for i in unique]))
        outs = [out_dir / s.parent.relative_to(common) / n if s.parent.is_relative_to(common) else out_dir / n
                for s, n in zip(srcs, names)]
    by_out: dict[Path, list[int]] = {}
    for i in unique:
        by_out.setdefault(outs[i], []).append(i)
    refused = {}
    for o, idx in by_out.items():
        for i in idx if len(idx) > 1 else ():
            others = ", ".join(str(srcs[j]) for j in idx if j != i)
            refused[i] = (f"{srcs[i]}: its output {o} would also be written for {others}; refusing both (rename "
                          "one, or run them separately)")
    return [None if i in refused or i in repeats else o for i, o in enumerate(outs)], refused, repeats


def _commit(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move a finished file into place: atomically, and without ever replacing an existing file unless
    ``overwrite`` (a hard link fails if ``out`` exists, also when another process created it meanwhile)."""
    if overwrite:
        os.replace(tmp, out)
        return
    try:
        os.link(tmp, out)
    except FileExistsError:
        raise OutputExistsError(f"{out}: already exists; set overwrite=true to replace it") from None
    except OSError:  # a file system without hard links: check, then rename (not atomic, but still no overwrite)
        if out.exists():
            raise OutputExistsError(f"{out}: already exists; set overwrite=true to replace it") from None
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def as_stored(y: np.ndarray, like_dtype: np.dtype) -> np.ndarray:
    """``y`` in the voxel type it is stored in: integer types (e.g. int16 HU) rounded and clipped to that type,
    anything else float32."""
    if np.issubdtype(like_dtype, np.integer):
        info = np.iinfo(like_dtype)
        return y if y.dtype == like_dtype else np.clip(np.rint(y), info.min, info.max).astype(like_dtype)
    return y.astype(np.float32, copy=False)


def _as_bool(value: Any, name: str) -> bool:
    """A config flag: booleans, and the strings ``monai.bundle run --flag true/false`` hands over."""
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no", "none", ""):
            return False
        raise ValueError(f"{name} must be a boolean, got {value!r}")
    return bool(value)


def write_output_volume(y: np.ndarray, affine: np.ndarray, like_dtype: np.dtype, out: Path,
                        sidecar: dict[str, Any], overwrite: bool = True) -> Path:
    """Write a processed volume as NIfTI in the input's voxel type, with its JSON sidecar beside it.

    Integer inputs (e.g. int16 HU) are rounded and clipped to that type; anything else is stored as float32.
    qform and sform both get ``affine`` (so every viewer places the new grid the same way); the sidecar gets
    ``output_shape``, ``output_spacing_mm``, ``output_dtype`` and ``created`` added. Both files are written under
    temporary names and moved into place when complete; with ``overwrite=False`` an existing output (volume or
    sidecar) raises :class:`OutputExistsError` and nothing is replaced.
    """
    side_path = out.with_name(out.name.replace(".nii.gz", ".json"))
    if not overwrite:
        for existing in (out, side_path):
            if existing.exists():
                raise OutputExistsError(f"{existing}: already exists; set overwrite=true to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    y = as_stored(y, like_dtype)
    img = nib.Nifti1Image(y, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    tag = f".part-{os.getpid()}"
    tmp_img, tmp_side = out.with_name(out.name[:-7] + tag + ".nii.gz"), side_path.with_name(side_path.name + tag)
    try:
        nib.save(img, str(tmp_img))
        sidecar = {**sidecar, "output_shape": list(y.shape),
                   "output_spacing_mm": [float(z) for z in img.header.get_zooms()[:3]], "output_dtype": str(y.dtype),
                   "created": _dt.datetime.now(_dt.timezone.utc).isoformat()}
        tmp_side.write_text(json.dumps(sidecar, indent=2))
        _commit(tmp_img, out, overwrite)
        _commit(tmp_side, side_path, overwrite)
    finally:
        tmp_img.unlink(missing_ok=True)
        tmp_side.unlink(missing_ok=True)
    return out


def normalise_input(data: np.ndarray, vol: torch.Tensor, modality: str, normalizer_kwargs: dict | None = None
                    ) -> tuple[torch.Tensor, float, float]:
    """What a model is given for a volume: ``vol`` (``(1, X, Y, Z)``, the magnitude of complex ``data``) normalised
    without clipping by :class:`~medsr_monai.transforms.ModalityNormalize`, and that map's ``(lo, hi)``. Complex
    ``data`` gets the same linear map, ``(z - lo) / (hi - lo)``, as ``(2, X, Y, Z)`` (real, imaginary). Shared by
    the inference runner and scan-specific adaptation, so both see the same input."""
    from medsr_monai.transforms import ModalityNormalize

    normalizer = ModalityNormalize(modality=modality, clip=False, **(normalizer_kwargs or {}))
    x = torch.as_tensor(normalizer(vol)).float()
    lo, hi = normalizer.last_range
    if np.iscomplexobj(data):
        z = (data.astype(np.complex64) - lo) / (hi - lo)
        x = torch.stack([torch.as_tensor(z.real.copy()), torch.as_tensor(z.imag.copy())]).float()
    return x, lo, hi


def sr_affine(affine: np.ndarray, scale: int, slice_dim: int) -> np.ndarray:
    """Affine of the SR output: in-plane voxel vectors divided by ``scale``, origin kept (corner grid)."""
    out = np.array(affine, dtype=np.float64, copy=True)
    for ax in range(3):
        if ax != slice_dim:
            out[:3, ax] /= scale
    return out


def memory_estimate(in_shape: Sequence[int], zoom: Sequence[float], window: Sequence[int], windows_per_pass: int,
                    channels: int = 1) -> dict[str, Any]:
    """Memory figures (MiB, float32) of processing one volume window by window.

    Args:
        in_shape: spatial shape of the input volume.
        zoom: output/input size factor per axis (e.g. ``(2, 2, 1)`` for in-plane x2).
        window: spatial shape of one network input window (e.g. ``(1, 128, 128)`` for a slice window).
        windows_per_pass: windows per forward pass (``sw_batch_size``).
        channels: image channels.

    Example::

        >>> memory_estimate((256, 256, 23), (2, 2, 1), (128, 128), 8)["network_input_mib"]
        0.5
    """
    mib = 4.0 / 2**20
    n_in = float(np.prod(in_shape)) * channels
    n_out = n_in * float(np.prod(zoom))
    n_win = float(np.prod(window)) * channels * windows_per_pass
    return {
        "input_volume_mib": round(n_in * mib, 2),
        "output_volume_mib": round(n_out * mib, 2),
        "network_input_mib": round(n_win * mib, 2),
        "window": [int(w) for w in window],
        "windows_per_pass": int(windows_per_pass),
        "bound": "host: input + output volume; network device: windows_per_pass windows and their activations",
    }


class VolumeRunner:
    """Process whole volumes with a network and write NIfTI outputs with a JSON sidecar: one runner for every task.

    Shared by every task: inputs (:func:`resolve_inputs`), the checkpoint, loading with MONAI's ``LoadImage``
    (:func:`~medsr_monai.data.load_volume`: NIfTI, NRRD or a DICOM series, errors name the file), the checks
    (3D, finite, not constant), the modality (datalist, DICOM header, ``modality``, else a guess from the
    intensities), the normalisation (``ModalityNormalize`` without clipping, so the round trip keeps HU / MR
    units), the output in the input's units and voxel type, the sidecar, progress bars and the memory figures.
    What differs is the ``strategy``: :class:`SliceStrategy` (a 2D network over the slices: in-plane SR, and at
    scale 1 same-size restoration -- denoising, MR reconstruction from the complex zero-filled image -- and
    translation) or :class:`~medsr_monai.workflows.through_plane.ThroughPlaneStrategy`.

    MONAI's evaluators assume the prediction lives on the input grid; an SR output lives on a finer grid, with its
    own affine, hence this runner rather than MONAI's ``SupervisedEvaluator`` + ``SaveImage``.

    Args:
        network: the model (its ``physics``, if any, gives the output grid).
        scale: the factor recorded in the sidecar (1 for restoration / translation).
        inputs: NIfTI / NRRD file, folder, DICOM series or datalist (see :func:`resolve_inputs`).
        output_dir: where ``<name>_<output_postfix>.nii.gz`` and ``.json`` go (created; must be writable).
        strategy: how the network runs over a volume and where its output lies.
        checkpoint: optional weights file (a state dict, or a dict with a ``network`` entry), loaded with
            ``torch.load(weights_only=True)``.
        modality: ``"MR"``, ``"CT"`` or ``"auto"`` (see :func:`~medsr_monai.data.modality.volume_modality`).
        normalizer_kwargs: passed to ``ModalityNormalize`` (CT window, MR percentiles).
        bundle_name, bundle_version: recorded in the JSON sidecar.
        device: torch device for the network (the volumes stay in host memory).
        overwrite: replace outputs that already exist (default: skip those inputs, reported in the summary).
        backend: ``"torch"`` (eager PyTorch) or ``"onnx"``: the network's learned part runs in ONNX Runtime from
            ``onnx_path`` (default: the checkpoint with suffix ``.onnx``, what ``medsr publish`` ships), the physics
            around it stays in PyTorch (see :mod:`medsr_monai.workflows.onnx_backend`).
        dicom_output: when an input is a DICOM series, also write the output as a DICOM series (a derived series
            of the same study) in ``<name>_<postfix>_dicom/`` beside the NIfTI (see
            :mod:`medsr_monai.data.dicom_out`). Off by default here, on in the bundles' ``inference.json``: that
            series carries the input's patient and study identifiers *inside* its files (what filing it back into
            the same study needs), unlike the NIfTI and its sidecar; never in a file name.

    Outputs never collide: see :func:`output_paths`. A bad input does not stop the run: every input is tried,
    a summary (written, skipped, failed with reasons) is printed, and :meth:`run` raises :class:`InferenceError`
    at the end when any input failed (so ``monai.bundle run`` exits non-zero).
    """

    def __init__(self, network: torch.nn.Module, scale: int, inputs: Any, output_dir: str, strategy: Any,
                 checkpoint: str | None = None, modality: str = "auto", normalizer_kwargs: dict | None = None,
                 bundle_name: str = "", bundle_version: str = "", device: str | torch.device = "cpu",
                 output_postfix: str = "sr", progress: bool = True, overwrite: bool = False,
                 backend: str = "torch", onnx_path: str | None = None, dicom_output: bool = False):
        from .onnx_backend import BACKENDS

        if str(backend).lower() not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.backend, self.onnx_path = str(backend).lower(), onnx_path
        self.dicom_output = _as_bool(dicom_output, "dicom_output")
        self.overwrite = bool(overwrite)
        self.summary: dict[str, list] = {"written": [], "skipped": [], "failed": []}
        self.network, self.scale, self.inputs, self.strategy = network, int(scale), inputs, strategy
        self.output_dir, self.checkpoint, self.modality = output_dir, checkpoint, modality
        self.normalizer_kwargs = dict(normalizer_kwargs or {})
        self.bundle_name, self.bundle_version = bundle_name, bundle_version
        self.device, self.output_postfix, self.progress = torch.device(device), output_postfix, progress
        strategy.check(network)

    @property
    def takes_complex(self) -> bool:
        """Whether the model reconstructs from a complex image (read from complex NIfTI)."""
        return self.strategy.takes_complex(self.network)

    def load_weights(self) -> str | None:
        return load_checkpoint(self.network, self.checkpoint)

    def run(self) -> list[Path]:
        """Process every input; returns the outputs written. Raises :class:`InferenceError` after trying all
        inputs when any failed; an input whose output exists is skipped unless ``overwrite``."""
        items = resolve_inputs(self.inputs)
        out_dir = ensure_writable_dir(self.output_dir)
        ckpt_hash = self.load_weights()
        self.network.to(self.device).eval()
        torch_net = self.network
        if self.backend == "onnx":  # a copy with ONNX Runtime for the learned part; the torch model is kept
            import copy

            from .onnx_backend import onnx_path_for, use_onnx

            onnx_file = self.onnx_path or onnx_path_for(self.checkpoint or "model.pt")
            key = (str(onnx_file), ckpt_hash, id(torch_net))
            cached = getattr(self, "_onnx_cache", None)
            if cached is None or cached[0] != key:  # ONNX Runtime sessions are made once per file and weights
                self._onnx_cache = (key, use_onnx(copy.deepcopy(torch_net), onnx_file, ckpt_hash, self.device))
            self.network = self._onnx_cache[1]
            self._backend_info = {"backend": "onnx", "onnx_path": str(onnx_file),
                                  "onnx_sha256": file_sha256(onnx_file)}
        else:
            self._backend_info = {"backend": "torch"}
        try:
            return self._run_items(items, out_dir, ckpt_hash)
        finally:
            self.network = torch_net

    def _run_items(self, items: list[dict], out_dir: Path, ckpt_hash: str | None) -> list[Path]:
        outs, refused, repeats = output_paths([it["image"] for it in items], out_dir, self.output_postfix)
        summary = self.summary = {"written": [], "skipped": [], "failed": []}
        for i, item in enumerate(tqdm(items, desc=self.strategy.desc, disable=not self.progress)):
            src = str(item["image"])
            if i in refused or i in repeats:
                summary["failed" if i in refused else "skipped"].append((src, refused.get(i) or repeats[i]))
                continue
            if not self.overwrite and outs[i].exists():
                summary["skipped"].append((src, f"{outs[i]} exists (set overwrite=true to replace it)"))
                continue
            try:
                summary["written"].append(self.process(item, out_dir, ckpt_hash, out=outs[i]))
            except OutputExistsError as e:  # appeared meanwhile (another process): still never replaced
                summary["skipped"].append((src, str(e)))
            except (KeyboardInterrupt, MemoryError):
                raise
            except Exception as e:  # noqa: BLE001 - one bad input must not cost the others; reported below
                msg = str(e) if src in str(e) else f"{src}: {type(e).__name__}: {e}"
                summary["failed"].append((src, msg))
        self._report(summary, len(items))
        return summary["written"]

    def _report(self, summary: dict, n: int) -> None:
        """Print the summary; raise :class:`InferenceError` when any input failed."""
        w, sk, f = summary["written"], summary["skipped"], summary["failed"]
        lines = [f"inference: {len(w)} written, {len(sk)} skipped, {len(f)} failed (of {n} inputs)"]
        lines += [f"  written: {p}" for p in w] + [f"  skipped: {why}" for _, why in sk]
        lines += [f"  FAILED:  {why}" for _, why in f]
        print("\n".join(lines), flush=True)
        if f:
            # one failure per line, the last line naming a file and its problem (what the user sees last)
            raise InferenceError(f"{len(f)} of {n} inference inputs failed ({len(w)} written, {len(sk)} skipped):\n"
                                 + "\n".join(why for _, why in f), summary)

    def process(self, item: dict, out_dir: Path, ckpt_hash: str | None, out: Path | None = None) -> Path:
        """Load, check, normalise, run, write one volume (to ``out``, default
        ``<out_dir>/<stem>_<postfix>.nii.gz``); return the output path."""
        from medsr_monai.data import load_volume
        from medsr_monai.data.checks import VolumeError, check_array
        from medsr_monai.data.modality import volume_modality
        from medsr_monai.transforms import denormalize

        src, strategy, takes_complex = Path(item["image"]), self.strategy, self.takes_complex
        data, affine_in, meta = load_volume(src)  # NIfTI, NRRD or a DICOM series; errors name the file
        # 3D (or one slice where the strategy takes it), finite, not constant; complex only for a complex model
        check_array(src, data, affine_in, allow_single_slice=strategy.single_slice, allow_complex=takes_complex)
        data = np.asarray(data)
        data = data.reshape(data.shape[:3])  # drop singleton trailing dims that check_array allows
        is_complex = np.iscomplexobj(data)
        if takes_complex and not is_complex:
            raise VolumeError(src, "is a real (magnitude) image, but this model reconstructs from the complex "
                                   "zero-filled image (the phase of the measurement is needed for data "
                                   "consistency): write one with medsr_monai.transforms.zero_filled_volume")
        vol = torch.as_tensor(np.abs(data).astype(np.float32) if is_complex else data.astype(np.float32))[None]
        dicom = meta.get("Modality", "").upper()
        modality = volume_modality(item.get("modality"), dicom if dicom in ("CT", "MR") else None, self.modality,
                                   min_value=float(vol.min()))
        x, lo, hi = normalise_input(data, vol, modality, self.normalizer_kwargs)
        spacing = [float(v) for v in np.linalg.norm(np.asarray(affine_in)[:3, :3], axis=0)]
        axis = strategy.axis(src, data.shape, spacing)
        memory = strategy.memory(self.network, data.shape, axis)
        if self.progress:
            tqdm.write(strategy.describe(src, data.shape, axis, memory))
        with torch.no_grad():
            y = strategy(self.network, x, axis, modality, self.device)
        y = denormalize(y, lo, hi).numpy()[0]
        out = out or out_dir / f"{volume_stem(src)}_{self.output_postfix}.nii.gz"
        out_affine = strategy.affine(self.network, np.asarray(affine_in), axis)
        y = as_stored(y, np.dtype(np.float32) if is_complex else data.dtype)
        dicom_dir = None
        if self.dicom_output and meta.get("format") == "dicom" and meta.get("files"):
            from medsr_monai.data.dicom_out import describe, dicom_output_dir

            dicom_dir = dicom_output_dir(out)
        written = write_output_volume(y, out_affine, y.dtype, out, {
            "bundle": self.bundle_name, "bundle_version": self.bundle_version,
            "checkpoint": str(self.checkpoint) if self.checkpoint else None, "checkpoint_sha256": ckpt_hash,
            "scale": self.scale, "zoom": strategy.zoom(axis), **strategy.geometry(self.network, axis),
            "modality": modality, "input": str(src), "input_format": meta.get("format"),
            "input_shape": list(data.shape), "input_spacing_mm": spacing,
            "normalization_range": [float(lo), float(hi)], **strategy.settings(), "memory": memory,
            **getattr(self, "_backend_info", {"backend": self.backend}),
            **({"dicom_output": str(dicom_dir)} if dicom_dir else {}),
        }, overwrite=self.overwrite)
        if dicom_dir is not None:  # the same values and grid as the NIfTI, as a derived series of the input's study
            from medsr_monai.data.dicom_out import write_dicom_series

            zoom = strategy.zoom(axis)
            write_dicom_series(y, out_affine, meta["files"], dicom_dir,
                               describe(self.bundle_name, self.bundle_version, self.output_postfix),
                               f"{self.bundle_name or 'medsr'} {self.bundle_version} {self.output_postfix}: zoom "
                               f"{zoom} on slice axis {axis} (medsr-monai)", zoom=zoom,
                               software_version=f"{self.bundle_name} {self.bundle_version}".strip(), overwrite=True)
        return written


class SliceStrategy:
    """A 2D network over the slices of a volume (MONAI's ``SliceInferer``, sliding window within each slice).

    In-plane SR at ``scale`` ``s`` (LR ``(B, C, h, w)`` -> HR ``(B, 1, s*h, s*w)``), and at scale 1 same-size
    restoration (denoising; MR reconstruction from the complex zero-filled image, 2 channels, when the network's
    physics is Cartesian undersampling) and translation (CycleGAN).

    Memory bound: the network only ever sees ``sw_batch_size`` windows of ``roi_size`` (on ``device``); the input
    and output volumes stay in host memory as float32. Grid: the physics' (``hr_affine``), else "corner" (LR
    voxel ``i`` at output voxel ``s*i``: in-plane columns of the affine divided by ``s``, origin kept).

    Args:
        scale: in-plane factor.
        roi_size: LR window (h, w) the network sees at once; ``sw_batch_size`` windows per forward pass.
        overlap: sliding-window overlap (Gaussian blending).
        slice_axis: 0, 1, 2, or ``None`` / ``"auto"`` (a single slice's singleton axis, else the coarsest spacing).
    """

    desc = "super-resolving volumes"
    single_slice = True  # a one-slice volume (e.g. one DICOM image) is processed

    def __init__(self, scale: int, roi_size: Sequence[int] = (128, 128), sw_batch_size: int = 8,
                 overlap: float = 0.25, slice_axis: int | str | None = None, progress: bool = True):
        if slice_axis not in (None, "auto", "None") and int(slice_axis) not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1, 2 or None (coarsest spacing), got {slice_axis!r}")
        self.scale, self.roi_size, self.sw_batch_size = int(scale), tuple(roi_size), sw_batch_size
        self.overlap, self.progress = overlap, progress
        self.slice_axis = None if slice_axis in (None, "auto", "None") else int(slice_axis)

    def check(self, network: torch.nn.Module) -> None:
        physics = getattr(network, "physics", None)
        if physics is not None and physics.grid != "same" and any(s != self.scale for s in physics.scale):
            raise ValueError(f"scale={self.scale} but the network's physics has scale {physics.scale}")

    @staticmethod
    def takes_complex(network: torch.nn.Module) -> bool:
        """A model whose measurement is a complex image (Cartesian undersampling: the zero-filled image with its
        phase)."""
        return getattr(getattr(network, "physics", None), "name", "") == "cartesian_undersampling"

    def axis(self, src: Path, shape: Sequence[int], spacing: Sequence[float]) -> int:
        return slice_axis(shape, spacing) if self.slice_axis is None else self.slice_axis

    def zoom(self, axis: int) -> list[int]:
        return [1 if ax == axis else self.scale for ax in range(3)]

    def _roi(self, shape: Sequence[int], axis: int) -> list[int]:
        # a window larger than the slice would be padded up to roi_size: wasted work (4x for 256^2 in 512^2)
        return [min(r, n) for r, n in zip(self.roi_size, [n for ax, n in enumerate(shape) if ax != axis])]

    def memory(self, network: torch.nn.Module, shape: Sequence[int], axis: int) -> dict[str, Any]:
        return memory_estimate(shape, self.zoom(axis), self._roi(shape, axis), self.sw_batch_size)

    def describe(self, src: Path, shape: Sequence[int], axis: int, memory: dict) -> str:
        return (f"{src.name}: {list(shape)} -> {[n * z for n, z in zip(shape, self.zoom(axis))]}, "
                f"host memory ~{memory['input_volume_mib'] + memory['output_volume_mib']:.0f} MiB")

    def __call__(self, net: torch.nn.Module, x: torch.Tensor, axis: int, modality: str,
                 device: torch.device) -> torch.Tensor:
        """The network's output for a normalised ``(C, X, Y, Z)`` volume over its in-plane axes (all but ``axis``)."""
        from medsr_monai.networks import PhysicsSR

        # slices smaller than roi_size are padded: replicate the edge (what the interpolation does at the
        # border), not MONAI's default zeros (0 = -1000 HU for CT, the low percentile for MR)
        # windows go to the network's device one batch at a time; the volumes stay on the host (memory bound)
        inferer = SliceInferer(spatial_dim=axis, roi_size=self._roi(x.shape[1:], axis),
                               sw_batch_size=self.sw_batch_size, overlap=self.overlap, mode="gaussian",
                               padding_mode="replicate", progress=self.progress, sw_device=device, device="cpu")
        if not isinstance(net, PhysicsSR) or type(net).forward is not PhysicsSR.forward:
            return inferer(x[None], net)[0].cpu()
        # The physics baseline of each window on its own would re-extrapolate at every window edge, and blending
        # does not hide those seams; so take the baseline of whole slices once and blend only the learned part,
        # then apply the consistency step once more to the whole slices (the blend weights break it at overlaps).
        slices = x.movedim(axis + 1, 0)  # (S, 1, h, w): the slices as a batch
        chunks = slices.split(self.sw_batch_size)
        base = torch.cat([net.baseline(c.to(device), modality).cpu() for c in chunks])
        residual = inferer(x[None], lambda t: net.residual(t, modality))[0].movedim(axis + 1, 0)
        out = base + residual
        out = torch.cat([net.consistency(o.to(device), c.to(device), modality).cpu()
                         for o, c in zip(out.split(self.sw_batch_size), chunks)])
        return out.movedim(0, axis + 1)

    def affine(self, network: torch.nn.Module, affine_in: np.ndarray, axis: int) -> np.ndarray:
        physics = getattr(network, "physics", None)
        if physics is not None and physics.spatial_dims == 2:
            return physics.hr_affine(affine_in, [a for a in range(3) if a != axis])
        return sr_affine(affine_in, self.scale, axis)

    def geometry(self, network: torch.nn.Module, axis: int) -> dict[str, Any]:
        physics = getattr(network, "physics", None)
        return {"grid": physics.grid if physics is not None else "corner",
                "physics": physics.config() if physics is not None else None, "slice_axis": axis}

    def settings(self) -> dict[str, Any]:
        return {"roi_size": list(self.roi_size), "sw_batch_size": self.sw_batch_size}


class VolumeSuperResolver(VolumeRunner):
    """:class:`VolumeRunner` with a :class:`SliceStrategy`: in-plane SR (``scale`` > 1), same-size restoration and
    translation (``scale`` 1); the constructor the bundle configs use.

    Example::

        sr = VolumeSuperResolver(net, 2, "scan.nii.gz", "out/", checkpoint="models/model.pt")
        written = sr.run()  # [Path("out/scan_sr.nii.gz")]
    """

    def __init__(self, network: torch.nn.Module, scale: int, inputs: Any, output_dir: str,
                 checkpoint: str | None = None, modality: str = "auto", roi_size: Sequence[int] = (128, 128),
                 sw_batch_size: int = 8, overlap: float = 0.25, normalizer_kwargs: dict | None = None,
                 bundle_name: str = "", bundle_version: str = "", device: str | torch.device = "cpu",
                 output_postfix: str = "sr", progress: bool = True, slice_axis: int | None = None,
                 overwrite: bool = False, backend: str = "torch", onnx_path: str | None = None,
                 dicom_output: bool = False):
        strategy = SliceStrategy(scale, roi_size, sw_batch_size, overlap, slice_axis, progress)
        super().__init__(network, scale, inputs, output_dir, strategy, checkpoint, modality, normalizer_kwargs,
                         bundle_name, bundle_version, device, output_postfix, progress, overwrite, backend,
                         onnx_path, dicom_output)
