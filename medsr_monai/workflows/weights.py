"""Weight files of the bundles' networks: state dicts only, read with ``weights_only=True``, written atomically."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["load_weights", "save_weights"]


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
    try:
        _unwrap(net).load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{what} {path}: does not fit the network ({str(e).splitlines()[0]})") from e
    return net
