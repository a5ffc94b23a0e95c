"""Search spaces and objectives for ``medsr tune``, read from JSON files a user edits.

A space file names bundle config ids (flat MONAI ids, ``#`` for nesting) and how to sample each::

    {
      "description": "what this space is for",
      "params": {
        "batch_size":    {"type": "categorical", "choices": [16, 32, 64, 128]},
        "optimizer":     {"type": "categorical", "choices": ["Adam", "RMSprop", "SGD"]},
        "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-2, "log": true},
        "lr_schedule":   {"type": "categorical", "choices": ["none", "cosine", "step", "exponential"]},
        "network_def#net#n_resblocks": {"type": "int", "low": 4, "high": 16, "step": 4}
      },
      "fixed": {"max_epochs": 4},
      "objective": "val_psnr",
      "pruner": {"type": "median", "n_startup_trials": 3, "n_warmup_steps": 1}
    }

``params`` are sampled per trial (Optuna parameter name = config id); ``fixed`` overrides hold for every trial
(the tuning budget, e.g. fewer epochs) and are *not* part of the best-trial override; ``objective`` is a metric of
the bundle's validation evaluator or a weighted sum (``"val_psnr + 20*val_ssim"``), maximised.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["SpaceError", "SearchSpace", "Objective", "DEFAULT_SPACE", "load_space", "find_space"]

DEFAULT_SPACE = "default_tune_space.json"
_TYPES = ("categorical", "float", "int")
_SPACE_KEYS = {"description", "params", "fixed", "objective", "pruner"}


class SpaceError(ValueError):
    """A search space or objective that cannot be used; the message names the file and the entry."""


@dataclass(frozen=True)
class Objective:
    """A weighted sum of validation metrics, maximised: ``val_psnr`` or ``val_psnr + 20*val_ssim``.

    Example:
        >>> obj = Objective.parse("val_psnr + 20*val_ssim")
        >>> obj.value({"val_psnr": 30.0, "val_ssim": 0.9})
        48.0
    """

    terms: tuple[tuple[float, str], ...]

    @classmethod
    def parse(cls, text: str) -> Objective:
        terms = []
        for part in str(text).replace(" ", "").split("+"):
            m = re.fullmatch(r"(?:([0-9.eE-]+)\*)?([A-Za-z_][\w.]*)", part)
            if not m:
                raise SpaceError(f"objective {text!r}: cannot read term {part!r}; write e.g. 'val_psnr' or "
                                 f"'val_psnr + 20*val_ssim'")
            terms.append((float(m.group(1) or 1.0), m.group(2)))
        if not terms:
            raise SpaceError("objective is empty")
        return cls(tuple(terms))

    @property
    def metrics(self) -> list[str]:
        return [name for _, name in self.terms]

    def value(self, metrics: dict[str, Any]) -> float:
        """The objective from an evaluator's ``state.metrics``.

        Raises:
            SpaceError: a metric the evaluator does not produce (the message lists those it does).
        """
        missing = [n for n in self.metrics if n not in metrics]
        if missing:
            raise SpaceError(f"objective {self}: the validation evaluator has no metric {missing}; "
                             f"it reports {sorted(metrics)}")
        return float(sum(w * float(metrics[n]) for w, n in self.terms))

    def __str__(self) -> str:
        return " + ".join(n if w == 1.0 else f"{w:g}*{n}" for w, n in self.terms)


@dataclass
class SearchSpace:
    """Parameters to sample, fixed overrides, objective and pruner settings of a study (see module docstring)."""

    params: dict[str, dict[str, Any]]
    fixed: dict[str, Any] = field(default_factory=dict)
    objective: str = "val_psnr"
    pruner: dict[str, Any] = field(default_factory=lambda: {"type": "median"})
    description: str = ""
    source: str = "<dict>"

    def __post_init__(self) -> None:
        if not self.params:
            raise SpaceError(f"search space {self.source}: 'params' is empty")
        for key, spec in self.params.items():
            self._check(key, spec)
        Objective.parse(self.objective)
        if str(self.pruner.get("type", "median")) not in ("median", "none"):
            raise SpaceError(f"search space {self.source}: pruner type {self.pruner.get('type')!r}; use 'median' or 'none'")

    def _check(self, key: str, spec: Any) -> None:
        where = f"search space {self.source}, param {key!r}"
        if not isinstance(spec, dict) or spec.get("type") not in _TYPES:
            raise SpaceError(f"{where}: needs {{\"type\": one of {_TYPES}, ...}}, got {spec!r}")
        if spec["type"] == "categorical":
            if not isinstance(spec.get("choices"), list) or not spec["choices"]:
                raise SpaceError(f"{where}: categorical needs a non-empty 'choices' list")
            return
        for bound in ("low", "high"):
            if not isinstance(spec.get(bound), (int, float)):
                raise SpaceError(f"{where}: {spec['type']} needs numeric 'low' and 'high'")
        if spec["low"] > spec["high"]:
            raise SpaceError(f"{where}: low {spec['low']} > high {spec['high']}")
        if spec.get("log") and spec["low"] <= 0:
            raise SpaceError(f"{where}: a log scale needs low > 0")

    # -- sampling -------------------------------------------------------------------------------------
    def sample(self, trial) -> dict[str, Any]:
        """``{config id: value}`` for one Optuna trial."""
        out = {}
        for key, spec in self.params.items():
            kind = spec["type"]
            if kind == "categorical":
                out[key] = trial.suggest_categorical(key, spec["choices"])
            elif kind == "float":
                out[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]),
                                               log=bool(spec.get("log", False)), step=spec.get("step"))
            else:
                out[key] = trial.suggest_int(key, int(spec["low"]), int(spec["high"]),
                                             log=bool(spec.get("log", False)), step=int(spec.get("step", 1)))
        return out

    def contains(self, key: str, value: Any) -> bool:
        """Whether ``value`` can be drawn for ``key`` (used to enqueue the bundle's own defaults as trial 0)."""
        spec = self.params[key]
        if spec["type"] == "categorical":
            return value in spec["choices"]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            return False
        return spec["low"] <= value <= spec["high"]

    def to_dict(self) -> dict[str, Any]:
        return {"description": self.description, "params": self.params, "fixed": self.fixed,
                "objective": self.objective, "pruner": self.pruner}


def load_space(path: str | Path | None = None) -> SearchSpace:
    """Read a space file; ``None`` gives the built-in default space (``medsr_monai/resources/``).

    Raises:
        SpaceError: unreadable JSON, unknown keys, or an entry that cannot be sampled (file and key named).
    """
    if path is None:
        text, source = resources.files("medsr_monai.resources").joinpath(DEFAULT_SPACE).read_text(), "default"
    else:
        p = Path(path)
        if not p.is_file():
            raise SpaceError(f"search space file {p} does not exist")
        text, source = p.read_text(), str(p)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SpaceError(f"search space {source} is not valid JSON: {e}") from e
    if not isinstance(data, dict) or set(data) - _SPACE_KEYS:
        raise SpaceError(f"search space {source}: unknown keys {sorted(set(data) - _SPACE_KEYS)}; "
                         f"allowed {sorted(_SPACE_KEYS)}")
    return SearchSpace(params=data.get("params", {}), fixed=data.get("fixed", {}),
                       objective=data.get("objective", "val_psnr"), pruner=data.get("pruner", {"type": "median"}),
                       description=data.get("description", ""), source=source)


def find_space(bundle: str | Path, spaces_dir: str | Path) -> Path | None:
    """``<spaces_dir>/<bundle name>.json`` if a per-bundle space exists there, else ``None`` (default space)."""
    p = Path(spaces_dir) / f"{Path(bundle).resolve().name}.json"
    return p if p.is_file() else None
