"""Conditional dispatch of dictionary transforms on a metadata value (e.g. the modality)."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping

import numpy as np
from monai.transforms import Randomizable, Transform
from monai.utils import MAX_SEED

__all__ = ["SelectByKeyd"]


class SelectByKeyd(Randomizable, Transform):
    """Apply ``branches[d[key]]`` to the data dictionary ``d``.

    MONAI has no conditional transform (``OneOf`` picks at random, ``Compose`` applies everything), so this one picks a
    branch by the value stored under ``key``, e.g.
    ``SelectByKeyd("modality", {"MR": KSpaceDownsampled("lr", 2), "CT": DecimateDownsampled("lr", 2)})``.

    Matching is exact first, then case-insensitive on strings, then through ``aliases`` (default ``{"MRI": "MR"}``).
    ``set_random_state`` is forwarded to every randomizable branch (each gets its own seed drawn from this
    transform's generator, in sorted branch order, the way ``Compose`` seeds its members), so a seeded ``Compose``
    containing this transform repeats exactly.

    Args:
        key: key whose value selects the branch.
        branches: mapping from value to a callable on the dictionary (a transform or ``Compose``).
        default: callable used when no branch matches; if ``None`` an unknown value raises ``ValueError``.
        aliases: extra value -> branch-name mapping (case-insensitive).

    Example:
        >>> t = SelectByKeyd("modality", {"MR": lambda d: {**d, "x": 1}, "CT": lambda d: {**d, "x": 2}})
        >>> t({"modality": "mri"})["x"]
        1
    """

    def __init__(
        self,
        key: Hashable,
        branches: Mapping[str, Callable],
        default: Callable | None = None,
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        if not branches:
            raise ValueError("branches must not be empty")
        self.key = key
        self.branches = dict(branches)
        self.default = default
        self.aliases = {"MRI": "MR"} if aliases is None else dict(aliases)

    def _members(self) -> list[Callable]:
        names = sorted(self.branches, key=str)
        out = [self.branches[n] for n in names]
        return out + ([self.default] if self.default is not None else [])

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed=seed, state=state)
        for t in self._members():
            if isinstance(t, Randomizable):
                t.set_random_state(seed=int(self.R.randint(MAX_SEED, dtype="uint32")))
        return self

    def randomize(self, data=None) -> None:  # the choice is deterministic; branches randomise themselves
        pass

    def select(self, value) -> Callable:
        """Return the branch for ``value`` (or the default); raise ``ValueError`` naming value and choices."""
        if isinstance(value, (list, tuple)) and len(value) == 1:  # collated batch of one
            value = value[0]
        try:
            if value in self.branches:
                return self.branches[value]
        except TypeError:  # unhashable value
            pass
        upper = {str(k).strip().upper(): v for k, v in self.branches.items()}
        name = str(value).strip().upper()
        if name not in upper:
            name = {str(k).strip().upper(): str(v).strip().upper() for k, v in self.aliases.items()}.get(name, name)
        if name in upper:
            return upper[name]
        if self.default is not None:
            return self.default
        raise ValueError(f"{self.key!r} has value {value!r}, which matches none of the branches {list(self.branches)}")

    def __call__(self, data: Mapping[Hashable, object]):
        if self.key not in data:
            raise KeyError(f"key {self.key!r} not in data (keys: {list(data)})")
        return self.select(data[self.key])(data)
