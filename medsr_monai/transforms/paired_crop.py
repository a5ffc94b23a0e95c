"""Aligned patch pairs from a whole degraded slice: the HR patch and the LR patch that the physics made from it.

Degrading a small crop is not degrading the scan: k-space truncation of a 96 px patch wraps its edges around and
filters with the patch's own spectrum (1.9-4.3 % relative RMS error against the whole-slice LR on brain1 at x2, and
still 1.3-1.5 % with a 32 px margin). Training pairs are therefore made by augmenting and degrading the whole
slice first, then cropping the HR patch at an offset that is a multiple of the scale and the LR patch at that
offset divided by the scale, which is the same field of view for every physics that is shift-equivariant by
``scale`` HR pixels (k-space truncation, decimation, slice thickness on any of their grids).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable

__all__ = ["RandScaledPairCropd"]


class RandScaledPairCropd(Randomizable, MapTransform):
    """Crop ``num_samples`` aligned (HR, LR) patch pairs, centred on foreground with probability
    ``pos / (pos + neg)``.

    MONAI's ``RandCropByPosNegLabeld`` crops every key with one box in pixels; an LR image on a grid ``scale``
    times coarser needs the box divided by the scale, hence this transform.

    Args:
        keys: HR images (``(C, H, W)``, H and W multiples of ``scale``), cropped to ``patch_size``.
        lr_keys: LR images (``(C, H / scale, W / scale)``), cropped to ``patch_size / scale`` at the same place.
        scale: the in-plane scale (int) of the physics that made ``lr_keys`` from ``keys``.
        patch_size: HR patch size (int or pair), a multiple of ``scale``; images must be at least this size.
        num_samples: patch pairs per item (returns a list of dicts).
        label_key: foreground mask at HR size (``None``: centres drawn uniformly).
        pos, neg: the ratio of foreground to anywhere centres.
        allow_missing_keys: do not raise if a key is missing.

    Example:
        >>> import torch
        >>> t = RandScaledPairCropd("label", "image", scale=2, patch_size=8, num_samples=2)
        >>> out = t({"label": torch.rand(1, 32, 32), "image": torch.rand(1, 16, 16)})
        >>> [tuple(o["label"].shape) + tuple(o["image"].shape) for o in out]
        [(1, 8, 8, 1, 4, 4), (1, 8, 8, 1, 4, 4)]
    """

    def __init__(self, keys: KeysCollection, lr_keys: KeysCollection, scale: int, patch_size: int | Sequence[int],
                 num_samples: int = 1, label_key: Hashable | None = None, pos: float = 1.0, neg: float = 1.0,
                 allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.lr_keys = [lr_keys] if isinstance(lr_keys, (str, int)) else list(lr_keys)
        self.scale = int(scale)
        self.patch = [int(patch_size)] * 2 if np.isscalar(patch_size) else [int(p) for p in patch_size]
        if any(p % self.scale for p in self.patch):
            raise ValueError(f"patch_size {self.patch} is not a multiple of the scale {self.scale}")
        self.num_samples = int(num_samples)
        self.label_key = label_key
        self.pos_ratio = float(pos) / float(pos + neg)

    def randomize(self, data=None) -> None:
        pass

    def _offsets(self, shape: Sequence[int], label) -> list[tuple[int, int]]:
        fg = None
        if label is not None:
            fg = np.argwhere(np.asarray(label)[0] > 0)
        offsets = []
        for _ in range(self.num_samples):
            if fg is not None and len(fg) and self.R.rand() < self.pos_ratio:
                centre = fg[self.R.randint(len(fg))]
            else:
                centre = [self.R.randint(n) for n in shape]
            offsets.append(tuple(
                int(np.clip(c - p // 2, 0, n - p)) // self.scale * self.scale
                for c, p, n in zip(centre, self.patch, shape)
            ))
        return offsets

    def __call__(self, data: Mapping[Hashable, object]) -> list[dict]:
        d = dict(data)
        hr_keys = list(self.key_iterator(d))
        if not hr_keys:
            return [d]
        shape = tuple(d[hr_keys[0]].shape[1:])
        if any(n < p for n, p in zip(shape, self.patch)) or any(n % self.scale for n in shape):
            raise ValueError(f"HR image of shape {shape} cannot give {self.patch} patches at scale {self.scale} "
                             "(pad it to the patch size and crop it to a multiple of the scale first)")
        s = self.scale
        out = []
        for y, x in self._offsets(shape, d.get(self.label_key) if self.label_key is not None else None):
            item = dict(d)
            for k in hr_keys:
                item[k] = d[k][:, y:y + self.patch[0], x:x + self.patch[1]]
            for k in self.lr_keys:
                if k in d:
                    lr = d[k]
                    if tuple(lr.shape[1:]) != (shape[0] // s, shape[1] // s):
                        raise ValueError(f"{k!r} has shape {tuple(lr.shape[1:])}, expected {shape} / {s}")
                    item[k] = lr[:, y // s:(y + self.patch[0]) // s, x // s:(x + self.patch[1]) // s]
                elif not self.allow_missing_keys:
                    raise KeyError(k)
            out.append(item)
        return out
