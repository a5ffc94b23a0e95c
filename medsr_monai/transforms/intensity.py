"""Modality-aware intensity normalisation to ``[0, 1]`` and its inverse.

* CT: a fixed HU window ``(lo, hi)`` (default ``(-1000, 1000)``) maps linearly to ``[0, 1]``.
* MR: robust percentile scaling. ``lo, hi`` are the ``mr_percentiles`` (default 0.5 and 99.5) of **all voxels of the
  image** (background included), matching ``docs/PROTOCOL.md`` ("MRI: percentiles of the HR volume"). With
  ``nonzero=True`` only non-zero voxels are used instead (better for skull-stripped images dominated by zeros).

The range used is returned / stored so that network outputs can be mapped back (:func:`denormalize`,
:class:`DenormalizeIntensityd`). Normalise the HR image and reuse its range for the LR image and the prediction so
that all three share one scale. No transform here changes the grid.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_numpy, convert_to_tensor, ensure_tuple_rep

__all__ = [
    "DenormalizeIntensityd",
    "ModalityNormalize",
    "ModalityNormalized",
    "canonical_modality",
    "denormalize",
    "normalization_range",
]

_ALIASES = {"MR": "MR", "MRI": "MR", "CT": "CT"}


def canonical_modality(modality) -> str:
    """Map a modality value to ``"MR"`` or ``"CT"`` (case-insensitive; ``"MRI"`` accepted).

    Raises:
        ValueError: naming the value if it is neither.

    Example:
        >>> canonical_modality("mri")
        'MR'
    """
    if isinstance(modality, (list, tuple)) and len(modality) == 1:  # e.g. after collation of a batch of one
        modality = modality[0]
    key = str(modality).strip().upper()
    if key not in _ALIASES:
        raise ValueError(f"unknown modality {modality!r}; expected one of 'MR', 'MRI', 'CT' (case-insensitive)")
    return _ALIASES[key]


def normalization_range(
    img,
    modality: str = "MR",
    ct_window: Sequence[float] = (-1000.0, 1000.0),
    mr_percentiles: Sequence[float] = (0.5, 99.5),
    nonzero: bool = False,
) -> tuple[float, float]:
    """Intensity range ``(lo, hi)`` that :class:`ModalityNormalize` maps to ``[0, 1]``.

    Args:
        img: image (numpy / torch), any shape.
        modality: ``"MR"``/``"MRI"`` or ``"CT"``.
        ct_window: HU window for CT.
        mr_percentiles: lower / upper percentiles (0-100) for MR, over the whole image (or non-zero voxels).
        nonzero: MR only; take the percentiles over non-zero voxels.

    Returns:
        ``(lo, hi)`` as Python floats; a constant MR image gets ``hi = lo + 1`` to avoid division by zero.

    Example:
        >>> normalization_range(np.zeros(4), "CT")
        (-1000.0, 1000.0)
    """
    mod = canonical_modality(modality)
    if mod == "CT":
        lo, hi = float(ct_window[0]), float(ct_window[1])
        if hi <= lo:
            raise ValueError(f"ct_window must be increasing, got {tuple(ct_window)}")
        return lo, hi
    x = convert_to_numpy(img).astype(np.float64).ravel()
    if nonzero:
        x = x[x != 0]
    if x.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(x, [mr_percentiles[0], mr_percentiles[1]]))
    if hi - lo <= 1e-12 * max(1.0, abs(lo)):
        hi = lo + 1.0
    return lo, hi


def _bcast(v, x):
    """Turn a range value into something broadcastable against ``x`` (scalar, or per-batch-item vector)."""
    arr = np.asarray(convert_to_numpy(v), dtype=np.float64).reshape(-1)
    if arr.size > 1:
        if arr.size != x.shape[0]:
            raise ValueError(f"got {arr.size} range values for an input with leading dimension {x.shape[0]}")
        return torch.from_numpy(arr).reshape(-1, *([1] * (x.ndim - 1)))
    return float(arr[0])


def denormalize(img, lo, hi):
    """Invert the normalisation: ``img * (hi - lo) + lo`` (type kept).

    ``lo``/``hi`` may be floats or, for a batch, vectors with one value per batch item.

    Example:
        >>> float(denormalize(torch.tensor(0.5), -1000.0, 1000.0))
        0.0
    """
    x = convert_to_tensor(img, track_meta=False)
    xf = x if torch.is_floating_point(x) else x.float()
    lo_b, hi_b = _bcast(lo, xf), _bcast(hi, xf)
    out = xf.to(torch.float64) * (hi_b - lo_b) + lo_b
    return convert_to_dst_type(out, img, dtype=xf.dtype)[0]


class ModalityNormalize(Transform):
    """Normalise to ``[0, 1]`` by modality: CT by HU window, MR by robust percentiles (of the whole image).

    After a call, ``self.last_range = (lo, hi)`` holds the range that was mapped to ``[0, 1]``; invert with
    :func:`denormalize`. The grid is unchanged.

    Args:
        modality: ``"MR"``/``"MRI"`` or ``"CT"`` (case-insensitive).
        ct_window: HU window ``(lo, hi)`` for CT.
        mr_percentiles: ``(lower, upper)`` percentiles (0-100) for MR.
        clip: clip the result to ``[0, 1]``.
        nonzero: MR only; percentiles over the non-zero voxels instead of the whole image.

    Example:
        >>> t = ModalityNormalize("CT")
        >>> t(torch.tensor([[-1000.0, 0.0, 2000.0]])).tolist(), t.last_range
        ([[0.0, 0.5, 1.0]], (-1000.0, 1000.0))
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        modality: str = "MR",
        ct_window: Sequence[float] = (-1000.0, 1000.0),
        mr_percentiles: Sequence[float] = (0.5, 99.5),
        clip: bool = True,
        nonzero: bool = False,
    ) -> None:
        self.modality = canonical_modality(modality)
        self.ct_window = tuple(float(v) for v in ct_window)
        self.mr_percentiles = tuple(float(v) for v in mr_percentiles)
        self.clip = clip
        self.nonzero = nonzero
        self.last_range: tuple[float, float] | None = None

    def __call__(self, img, modality: str | None = None):
        mod = self.modality if modality is None else canonical_modality(modality)
        lo, hi = normalization_range(img, mod, self.ct_window, self.mr_percentiles, self.nonzero)
        self.last_range = (lo, hi)
        x = convert_to_tensor(img, track_meta=False)
        dtype = x.dtype if torch.is_floating_point(x) else torch.float32
        out = (x.to(torch.float64) - lo) / (hi - lo)
        if self.clip:
            out = out.clamp(0.0, 1.0)
        return convert_to_dst_type(out, img, dtype=dtype)[0]


class ModalityNormalized(MapTransform):
    """Dictionary form of :class:`ModalityNormalize`; the modality is read from ``d[modality_key]``.

    For each key the range is stored as ``d[f"{key}_norm_range"] = [lo, hi]`` (Python floats) so that a later step
    (:class:`DenormalizeIntensityd`) can invert it.

    Args:
        keys: keys of the images to normalise (each gets its own range; to share the HR range, normalise the HR
            image and derive the LR image from it afterwards).
        modality_key: key holding ``"MR"``/``"MRI"``/``"CT"`` (case-insensitive); unknown values raise ``ValueError``.
        ct_window: HU window for CT.
        mr_percentiles: percentiles for MR.
        clip: clip to ``[0, 1]``.
        nonzero: MR percentiles over non-zero voxels.
        allow_missing_keys: do not raise if a key is missing.

    Example:
        >>> d = ModalityNormalized("image")({"image": torch.tensor([[-1000.0, 1000.0]]), "modality": "ct"})
        >>> d["image"].tolist(), d["image_norm_range"]
        ([[0.0, 1.0]], [-1000.0, 1000.0])
    """

    backend = ModalityNormalize.backend

    def __init__(
        self,
        keys: KeysCollection,
        modality_key: str = "modality",
        ct_window: Sequence[float] = (-1000.0, 1000.0),
        mr_percentiles: Sequence[float] = (0.5, 99.5),
        clip: bool = True,
        nonzero: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.modality_key = modality_key
        self.normalizer = ModalityNormalize("MR", ct_window, mr_percentiles, clip, nonzero)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if self.modality_key not in d:
            raise KeyError(f"modality key {self.modality_key!r} not in data (keys: {list(d)})")
        modality = canonical_modality(d[self.modality_key])
        for key in self.key_iterator(d):
            d[key] = self.normalizer(d[key], modality)
            lo, hi = self.normalizer.last_range
            d[f"{key}_norm_range"] = [float(lo), float(hi)]
        return d


class DenormalizeIntensityd(MapTransform):
    """Map normalised images back to their original intensity range (inverse of :class:`ModalityNormalized`).

    Args:
        keys: keys of the images to de-normalise (e.g. ``"pred"``).
        range_key: key(s) holding ``[lo, hi]``, one for all keys or one per key; default ``f"{key}_norm_range"``.
            Batched ranges (``[tensor(lo_1..lo_B), tensor(hi_1..hi_B)]`` after collation) are applied per item.
        allow_missing_keys: do not raise if a key is missing.

    Example:
        >>> d = {"pred": torch.tensor([[0.5]]), "image_norm_range": [-1000.0, 1000.0]}
        >>> DenormalizeIntensityd("pred", "image_norm_range")(d)["pred"].tolist()
        [[0.0]]
    """

    backend = ModalityNormalize.backend

    def __init__(
        self,
        keys: KeysCollection,
        range_key: str | Sequence[str] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.range_keys = ensure_tuple_rep(range_key, len(self.keys))

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key, rkey in self.key_iterator(d, self.range_keys):
            rkey = f"{key}_norm_range" if rkey is None else rkey
            if rkey not in d:
                raise KeyError(f"range key {rkey!r} for {key!r} not in data (keys: {list(d)})")
            lo, hi = d[rkey][0], d[rkey][1]
            d[key] = denormalize(d[key], lo, hi)
        return d
