"""Offline model-zoo checks run by ``medsr publish`` before anything is written.

Each check raises :class:`PublishError` with a message naming the file and the problem, so that the CLI can
print it as is. Nothing here needs the network: the metadata schema is the copy kept in the package
(``medsr_monai/resources/meta_schema.json``) because MONAI's ``verify_metadata`` downloads its schema URL.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

__all__ = ["PublishError", "REQUIRED_FILES", "SCHEMA", "check_required_files", "check_rendered_configs", "load_metadata", "check_metadata",
           "check_version", "published_versions", "check_network", "load_weights", "real_slice"]

#: files the model zoo requires in every bundle (relative to the bundle root)
REQUIRED_FILES = ("configs/metadata.json", "LICENSE", "models/model.pt", "docs/README.md", "docs/data_license.txt")
SCHEMA = Path(__file__).resolve().parent.parent / "resources" / "meta_schema.json"


class PublishError(RuntimeError):
    """A bundle or archive failed a check; the message names the file and the problem."""


def check_rendered_configs(bundle: Path) -> None:
    """A bundle written as overlays must publish the configs its overlays render to, not stale ones."""
    from medsr_monai.overlays import render_bundle

    if (bundle / "overlays").is_dir():
        try:
            stale = render_bundle(bundle, check=True)
        except FileNotFoundError:  # a bundle copied without the shared bases: its configs/ are all there is
            return
        if stale:
            raise PublishError(f"{bundle}: configs differ from what overlays/ render to ({', '.join(p.name for p in stale)}); "
                               "run `python -m medsr_monai.overlays` on the bundle first")


def check_required_files(bundle: Path) -> None:
    """Refuse a bundle missing any of :data:`REQUIRED_FILES` (all missing ones are named at once), or one whose
    configs are stale against its overlays."""
    missing = [f for f in REQUIRED_FILES if not (bundle / f).is_file()]
    if missing:
        raise PublishError(f"{bundle}: required file(s) missing: {', '.join(missing)}")
    check_rendered_configs(bundle)


def load_metadata(bundle: Path) -> dict:
    path = bundle / "configs" / "metadata.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PublishError(f"{path}: cannot read metadata: {e}") from e


def check_metadata(bundle: Path, schema: Path = SCHEMA) -> dict:
    """Validate ``configs/metadata.json`` against the local schema with jsonschema (what
    ``monai.bundle verify_metadata --filepath <schema>`` does, without a subprocess or a download).

    Returns:
        the metadata dict.
    """
    import jsonschema

    meta = load_metadata(bundle)
    validator = jsonschema.Draft7Validator(json.loads(Path(schema).read_text()))
    errors = sorted(validator.iter_errors(meta), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]
        raise PublishError(f"{bundle / 'configs' / 'metadata.json'} does not validate against {schema}:\n  "
                           + "\n  ".join(lines))
    return meta


def _version(text: str):
    try:
        from packaging.version import Version

        return Version(text)
    except ImportError:  # pragma: no cover - packaging is a dependency of pip/setuptools, normally present
        return tuple(int(p) for p in re.findall(r"\d+", text))


def published_versions(out: Path, name: str) -> list[str]:
    """Versions of ``name`` already in ``out`` (files ``<name>_<version>.zip``), lowest first; archives of
    another bundle whose name starts with ``<name>_`` are not counted."""
    pattern = re.compile(rf"^{re.escape(name)}_(\d+\.\d+\.\d+[^_/]*)\.zip$")  # not edsr_x2_1.0.0.zip
    return sorted((m.group(1) for p in out.glob(f"{name}_*.zip") if (m := pattern.match(p.name))), key=_version)


def check_version(meta: dict, out: Path, name: str, meta_file: Path) -> str:
    """The metadata's version must be in its changelog, not published in ``out`` yet and not lower than the
    highest version published there (a collaborator takes the highest as the latest).

    Returns:
        the version string.
    """
    version = str(meta.get("version", ""))
    if version not in (meta.get("changelog") or {}):
        raise PublishError(f"{meta_file}: version {version!r} has no entry in \"changelog\" "
                           f"(entries: {', '.join(meta.get('changelog') or {}) or 'none'})")
    done = published_versions(out, name) if out.is_dir() else []
    if version in done:
        raise PublishError(f"{meta_file}: version {version} of {name} is already published in {out}; "
                           "bump \"version\" and add a changelog entry")
    if done and _version(version) < _version(done[-1]):
        raise PublishError(f"{meta_file}: version {version} is lower than {done[-1]}, the highest version of "
                           f"{name} already published in {out}")
    return version


def load_weights(path: Path) -> dict:
    """State dict of a weights file, loaded with ``weights_only=True`` (no arbitrary unpickling); a
    ``{"network": state}`` checkpoint gives its network."""
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused or a corrupt file
        raise PublishError(f"{path}: cannot be loaded with torch.load(weights_only=True): {e}") from e
    if isinstance(state, dict) and isinstance(state.get("network"), dict):
        state = state["network"]
    if not isinstance(state, dict):
        raise PublishError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def real_slice(nifti: Path, size: int = 64):
    """A real LR test input ``(1, 1, size, size)`` in [0, 1]: the centre of the middle slice of ``nifti``,
    normalised to its 0.5-99.5 percentiles (the MR convention of the bundles)."""
    import nibabel as nib
    import numpy as np
    import torch

    vol = np.asarray(nib.load(str(nifti)).dataobj, dtype=np.float32)
    sl = vol[..., vol.shape[2] // 2] if vol.ndim >= 3 else vol
    x0, y0 = max(0, (sl.shape[0] - size) // 2), max(0, (sl.shape[1] - size) // 2)
    sl = sl[x0:x0 + size, y0:y0 + size]
    lo, hi = np.percentile(sl, [0.5, 99.5])
    sl = np.clip((sl - lo) / max(hi - lo, 1e-6), 0, 1)
    return torch.as_tensor(np.ascontiguousarray(sl, dtype=np.float32))[None, None]


def physics_input(network, sample: Path):
    """A real input for ``network``: a slice of ``sample`` degraded by the network's own physics (LR for SR, the
    complex zero-filled image for undersampling, a thick slab for slice thickness); the slice itself when the
    network has no physics or its physics is noise (whose measurement is the image)."""
    import nibabel as nib
    import numpy as np
    import torch

    physics = getattr(network, "physics", None)
    if physics is None or physics.grid == "same" and physics.name != "cartesian_undersampling":
        return real_slice(sample)
    if physics.spatial_dims == 3:  # a slab of thin slices, slice axis first: (1, 1, S, H, W)
        vol = np.asarray(nib.load(str(sample)).dataobj, dtype=np.float32)
        c = [n // 2 for n in vol.shape[:3]]
        slab = vol[c[0] - 24:c[0] + 24, c[1] - 24:c[1] + 24, c[2] - 8:c[2] + 8]
        lo, hi = np.percentile(slab, [0.5, 99.5])
        slab = np.clip((slab - lo) / max(hi - lo, 1e-6), 0, 1)
        hr = torch.as_tensor(np.ascontiguousarray(np.moveaxis(slab, 2, 0)))[None, None]
        return physics.A(hr).float()
    x = real_slice(sample)
    kw = {"modality": getattr(physics, "default", None) or "MR"} if hasattr(physics, "branches") else {}
    return physics.A(x, **kw).float()


def check_network(bundle: Path, sample: Path, ts_file: Path, config: str = "inference") -> float:
    """``verify_net_in_out`` on the inference config, ``ckpt_export`` of ``models/model.pt`` to ``ts_file``
    (traced: physics models are not scriptable), and the TorchScript output compared with the eager network's on
    a real input made from ``sample`` with the network's own physics.

    Runs MONAI's functions in-process (the same code as ``python -m monai.bundle ...``, without a second
    interpreter start-up).

    Returns:
        the largest absolute difference between TorchScript and eager outputs.
    """
    import torch
    from monai.bundle import ConfigParser, ckpt_export, verify_net_in_out

    cfg, meta = bundle / "configs" / f"{config}.json", bundle / "configs" / "metadata.json"
    model = bundle / "models" / "model.pt"
    if not cfg.is_file():
        raise PublishError(f"{bundle}: configs/{config}.json missing (needed for the network checks)")
    common = {"net_id": "network_def", "meta_file": str(meta), "config_file": str(cfg),
              "bundle_root": str(bundle)}
    try:
        verify_net_in_out(device="cpu", **common)
    except Exception as e:
        raise PublishError(f"{cfg}: verify_net_in_out failed: {type(e).__name__}: {e}") from e
    state = load_weights(model)
    parser = ConfigParser()
    parser.read_config(str(cfg))
    parser["bundle_root"] = str(bundle)
    eager = parser.get_parsed_content("network_def", instantiate=True)
    try:
        eager.load_state_dict(state)
    except (RuntimeError, ValueError) as e:
        raise PublishError(f"{model}: weights do not match network_def of {cfg}: {e}") from e
    eager.eval()
    x = physics_input(eager, sample)
    try:
        ckpt_export(filepath=str(ts_file), ckpt_file=str(model), use_trace=True, input_shape=list(x.shape), **common)
    except Exception as e:
        raise PublishError(f"{model}: ckpt_export (TorchScript) failed: {type(e).__name__}: {e}") from e
    scripted = torch.jit.load(str(ts_file), map_location="cpu")
    scripted.eval()
    try:
        with torch.no_grad():
            y_eager, y_ts = eager(x), scripted(x)
    except Exception as e:
        raise PublishError(f"{cfg}: the network fails on a slice of {sample}: {type(e).__name__}: {e}") from e
    if y_eager.shape != y_ts.shape:
        raise PublishError(f"{ts_file}: TorchScript output shape {tuple(y_ts.shape)} != eager {tuple(y_eager.shape)}")
    diff = float((y_eager - y_ts).abs().max())
    if not diff <= 1e-4:
        raise PublishError(f"{ts_file}: TorchScript output differs from the eager model by {diff:.3g} on a slice "
                           f"of {sample}")
    return diff
