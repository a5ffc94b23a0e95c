"""Per-sample choice of physics by modality: MR slices are k-space truncated, CT slices decimated."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .base import Physics

__all__ = ["ModalitySwitch", "canonical_modality_name", "modality_kwargs"]

_ALIASES = {"MRI": "MR"}


def canonical_modality_name(value: Any) -> str:
    """``"MR"``/``"CT"``-style upper-case name (``MRI`` -> ``MR``); a collated batch of one is unwrapped."""
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    name = str(value).strip().upper()
    return _ALIASES.get(name, name)


class ModalitySwitch(Physics):
    """One physics per modality, chosen per sample.

    Operators take ``modality`` (one name, or one per batch item); a batch that mixes modalities is split, each
    part goes through its own physics and the results are put back in order. Every branch must have the same
    scale, so one network serves them all.

    Args:
        branches: ``{"MR": KSpaceTruncation(2, dc=True), "CT": Decimation(2)}``.
        default: branch used when no modality is given (e.g. MONAI's ``verify_net_in_out`` / ``ckpt_export``, which
            call the network on a tensor alone); ``None``: a call without modality is refused. Not part of
            :meth:`config`: it is a calling convenience, not physics.

    Example:
        >>> from medsr_monai.physics import Decimation, KSpaceTruncation
        >>> p = ModalitySwitch({"MR": KSpaceTruncation(2), "CT": Decimation(2)})
        >>> p.A(torch.rand(2, 1, 8, 8), modality=["MR", "CT"]).shape
        torch.Size([2, 1, 4, 4])
    """

    name = "modality_switch"

    def __init__(self, branches: Mapping[str, Physics], default: str | None = None) -> None:
        if not branches:
            raise ValueError("ModalitySwitch needs at least one branch")
        self.branches = {canonical_modality_name(k): v for k, v in branches.items()}
        first = next(iter(self.branches.values()))
        for k, v in self.branches.items():
            if not isinstance(v, Physics):
                raise TypeError(f"branch {k!r} is a {type(v).__name__}, not a Physics")
            if v.scale != first.scale or v.spatial_dims != first.spatial_dims:
                raise ValueError(f"every branch needs the same scale: {k} has {v.scale}, another has {first.scale}")
        super().__init__(first.spatial_dims, dc=False)
        self.dc = any(v.dc for v in self.branches.values())
        self.has_consistency = any(v.has_consistency for v in self.branches.values())
        self.default = None if default in (None, "", "None") else canonical_modality_name(default)
        if self.default is not None and self.default not in self.branches:
            raise ValueError(f"default modality {default!r} is not one of the branches {sorted(self.branches)}")
        grids = {v.grid for v in self.branches.values()}
        self.grid = grids.pop() if len(grids) == 1 else "mixed"

    @property
    def scale(self):
        return next(iter(self.branches.values())).scale

    def origin_shift(self):
        return next(iter(self.branches.values())).origin_shift()

    def select(self, modality: Any) -> Physics:
        """The branch for ``modality``; ``ValueError`` naming the value and the branches otherwise."""
        name = canonical_modality_name(modality)
        if name not in self.branches:
            raise ValueError(f"modality {modality!r} has no physics here; this model knows {sorted(self.branches)}")
        return self.branches[name]

    def _dispatch(self, fn: str, tensors: Sequence[torch.Tensor], modality: Any) -> torch.Tensor:
        if modality is None and self.default is not None:
            modality = self.default
        if modality is None:
            if len(self.branches) == 1:
                return getattr(next(iter(self.branches.values())), fn)(*tensors)
            raise ValueError(f"{self.name}: pass modality= (one of {sorted(self.branches)}) for this input")
        if isinstance(modality, str) or (isinstance(modality, (list, tuple)) and len(set(map(
                canonical_modality_name, modality))) == 1):
            first = modality if isinstance(modality, str) else modality[0]
            return getattr(self.select(first), fn)(*tensors)
        names = [canonical_modality_name(m) for m in modality]
        batch = tensors[0].shape[0]
        if len(names) != batch:
            raise ValueError(f"{len(names)} modalities for a batch of {batch}")
        out: list[torch.Tensor | None] = [None] * batch
        for name in dict.fromkeys(names):
            idx = [i for i, n in enumerate(names) if n == name]
            part = getattr(self.select(name), fn)(*[t[idx] for t in tensors])
            for j, i in enumerate(idx):
                out[i] = part[j]
        return torch.stack(out)  # type: ignore[arg-type]

    def A(self, x, modality=None):  # noqa: N802
        return self._dispatch("A", [x], modality)

    def baseline(self, y, modality=None):
        return self._dispatch("baseline", [y], modality)

    def consistency(self, x_hat, y, modality=None):
        return self._dispatch("consistency", [x_hat, y], modality)

    def apply_dc(self, x_hat, y, modality=None):
        """``consistency`` for the samples whose branch has ``dc`` on; the others are returned unchanged."""
        return self._dispatch("apply_dc", [x_hat, y], modality)

    def config(self):
        return {"physics": self.name, "branches": {k: v.config() for k, v in sorted(self.branches.items())}}

    def describe(self) -> str:
        return "; ".join(f"{k}: {v.describe()}" for k, v in sorted(self.branches.items()))


def modality_kwargs(physics, modality) -> dict:
    """``{"modality": modality}`` for a :class:`ModalitySwitch` (whose methods take it), else ``{}``: how callers
    pass a sample's modality to any physics object."""
    return {"modality": modality} if isinstance(physics, ModalitySwitch) else {}
