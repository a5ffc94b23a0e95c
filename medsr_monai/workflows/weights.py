"""Weight files of the bundles' networks: state dicts only, read with ``weights_only=True``, written atomically."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

__all__ = ["load_state", "load_weights", "save_weights"]


def _unwrap(net: torch.nn.Module) -> torch.nn.Module:
    return net.module if hasattr(net, "module") and isinstance(net.module, torch.nn.Module) else net


def save_weights(net: torch.nn.Module, path: str | Path) -> Path:
    """Write ``net``'s state dict atomically (a killed run never leaves a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(_unwrap(net).state_dict(), tmp)
    tmp.replace(path)
    return path


def load_weights(net: torch.nn.Module, path: str | Path | None, what: str = "weights") -> torch.nn.Module:
    """Load a state dict (``weights_only``) into ``net``; ``None``/empty path: leave ``net`` as it is."""
    if not path:
        return net
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such file")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{what} {path}: cannot be read as a state dict ({e})") from e
    if isinstance(state, dict) and isinstance(state.get("network"), dict):
        state = state["network"]
    load_state(net, state, f"{what} {path}")
    return net


def load_state(net: torch.nn.Module, state: dict, where: str) -> None:
    """``load_state_dict`` with errors that name ``where``. A model that records its physics (``physics_record``,
    see :class:`~medsr_monai.networks.PhysicsSR`) refuses weights of another physics; weights saved before models
    recorded it load with a warning that the check could not be made."""
    module = _unwrap(net)
    record = "physics_record"
    expects_record = any(k.endswith(record) for k in module.state_dict())
    if expects_record and isinstance(state, dict) and not any(str(k).endswith(record) for k in state):
        warnings.warn(f"{where}: records no physics (saved by an older version); cannot check that it was trained "
                      "for this bundle's physics", stacklevel=3)
        state = {**state, **{k: v for k, v in module.state_dict().items() if k.endswith(record)}}
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{where}: does not fit the network ({str(e).splitlines()[0]})") from e
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
