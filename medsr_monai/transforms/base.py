"""Shared machinery of the random dictionary transforms."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform

__all__ = ["RandDictWrapper"]


class RandDictWrapper(RandomizableTransform, MapTransform):
    """Dictionary form of a random array transform: one decision (``prob``) and one parameter draw per
    call, applied to every key, all from one random stream.

    MONAI's own dictionary transforms repeat this per class; here the Rand*d transforms only say which
    array transform they wrap. ``inner`` must accept ``randomize=False`` in ``__call__`` and expose
    ``randomize()``; noise that it draws while applying comes from the same stream, fresh for each key.

    Args:
        keys: keys of the images.
        inner: the random array transform (its own ``prob`` should be 1.0).
        prob: probability of applying it at all.
        allow_missing_keys: do not raise if a key is missing.
    """

    def __init__(self, keys: KeysCollection, inner: RandomizableTransform, prob: float = 1.0,
                 allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.inner = inner

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.inner.set_random_state(state=self.R)  # share one stream
        return self

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        self.inner.R = self.R
        self.inner.randomize()
        for key in self.key_iterator(d):
            d[key] = self.inner(d[key], randomize=False)
        return d
