"""Deterministic, cached projection-domain low-dose CT simulation of whole volumes (paired denoising data).

:class:`~medsr_monai.transforms.LowDoseCTNoised` is a random transform (fresh noise per call) and slow (a Radon
transform and FBP per slice: seconds per 512^2 slice). Paired training and evaluation need the opposite: one fixed
"low-dose acquisition" per slice, the same in every epoch, run and process, computed once. This wrapper therefore
seeds :class:`~medsr_monai.transforms.LowDoseCTNoise` per slice from ``(seed, subject, slice index)`` and keeps the
noisy volume in an ``.npy`` cache keyed by a hash of the input voxels and every simulation parameter, so a changed
image or setting never reuses a stale file. Deterministic, so MONAI's ``CacheDataset`` caches it too.

Slices are simulated in a thread pool (one simulator per slice, so no random state is shared): scikit-image's
``radon``/``iradon`` spend their time in compiled warps that release the GIL, so two threads simulate two 512^2
slices in about 13 s where one thread takes 11.5 s for one (measured on this project's 2-core machine). The seeds
are per slice, so the result does not depend on the number of threads.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Hashable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type, convert_to_numpy
from tqdm.auto import tqdm

from .noise import LowDoseCTNoise

__all__ = ["SeededLowDoseCTNoised"]


class SeededLowDoseCTNoised(MapTransform):
    """Add low-dose CT noise (HU in, HU out) to channel-first 3D volumes, slice by slice along the slice axis
    (the coarsest-spacing axis, or the singleton axis of a single-slice volume, as ``volume_slices`` cuts them).

    Args:
        keys: HU volumes ``(C, X, Y, Z)`` (MetaTensors: the affine gives spacing and pixel size).
        dose_fraction, incident_photons: see :class:`~medsr_monai.transforms.LowDoseCTNoise`.
        seed: base seed; slice ``k`` of subject ``s`` uses ``seed``, ``crc32(s)`` and ``k``.
        num_threads: slices simulated at once (``None``: the CPU cores this process may use).
        id_key: item field naming the subject (falls back to the image file name).
        cache_dir: folder for cached noisy volumes (``None``: no disk cache, simulate every time).
        max_slices: simulate only this many slices, evenly spread along the slice axis, and set the others to NaN
            (``None``: every slice). Each simulated slice is exactly what the full simulation gives it (the seed is
            per slice), and :func:`~medsr_monai.data.volume_slices` never keeps a slice with NaN in an extra key;
            so an evaluation on a few slices per volume does not pay seconds for every slice of a 500-slice CT.

    Example:
        >>> t = SeededLowDoseCTNoised("lowdose", seed=1, max_slices=2)
        >>> t.max_slices
        2
    """

    def __init__(self, keys: KeysCollection, dose_fraction: float = 0.25, incident_photons: float = 1e6,
                 seed: int = 0, id_key: str = "subject", cache_dir: str | os.PathLike | None = None,
                 max_slices: int | None = None, num_threads: int | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        # the cores this process may use (Linux); os.cpu_count() where the affinity call does not exist (macOS)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.num_threads = max(1, int(num_threads or cores))
        if max_slices is not None and int(max_slices) < 1:
            raise ValueError(f"max_slices must be >= 1 or None, got {max_slices}")
        self.max_slices = int(max_slices) if max_slices is not None else None
        self.noise = LowDoseCTNoise(dose_fraction, incident_photons, spatial_dims=2)
        self.seed, self.id_key = int(seed), id_key
        self.cache_dir = Path(cache_dir) if cache_dir else None

    def _noisy(self, x: np.ndarray, affine: np.ndarray, ident: str) -> np.ndarray:
        from medsr_monai.data.slices import slice_axis

        spacing = [float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)]
        axis = slice_axis(x.shape[1:], spacing)
        pixel = float(np.mean([s for i, s in enumerate(spacing) if i != axis]))
        params = {"dose_fraction": self.noise.dose_fraction, "incident_photons": self.noise.incident_photons,
                  "seed": self.seed, "id": ident, "pixel": round(pixel, 6), "axis": axis, "v": 1}
        if self.max_slices is not None:
            params["max_slices"] = self.max_slices
        path = None
        if self.cache_dir is not None:
            h = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
            h.update(str(x.shape).encode())
            h.update(np.ascontiguousarray(x, dtype=np.float32).tobytes())
            path = self.cache_dir / f"lowdose_{h.hexdigest()[:32]}.npy"
            if path.is_file():
                return np.load(path)
        sl = np.moveaxis(x.astype(np.float64), axis + 1, 0)  # (S, C, h, w)
        out = np.full_like(sl, np.nan)
        sub = zlib.crc32(ident.encode())
        which = range(sl.shape[0])
        if self.max_slices is not None and self.max_slices < sl.shape[0]:
            which = sorted(set(np.linspace(0, sl.shape[0] - 1, self.max_slices).round().astype(int).tolist()))

        def simulate(k: int) -> None:
            noise = LowDoseCTNoise(self.noise.dose_fraction, self.noise.incident_photons, pixel_size_mm=pixel,
                                   spatial_dims=2)
            noise.set_random_state(seed=int(np.random.SeedSequence([self.seed, sub, k]).generate_state(1)[0]))
            out[k] = noise(sl[k])

        with ThreadPoolExecutor(min(self.num_threads, len(which))) as pool:
            list(tqdm(pool.map(simulate, which), total=len(which), desc=f"low-dose CT simulation ({ident})",
                      leave=False, disable=len(which) < 4))
        out = np.moveaxis(out, 0, axis + 1).astype(np.float32)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npy")
            np.save(tmp, out)
            tmp.replace(path)  # atomic: concurrent ranks or a kill never leave half a file
        return out

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        ident = str(d.get(self.id_key) or Path(str(d.get("image", "volume"))).name)
        for key in self.key_iterator(d):
            img = d[key]
            affine = np.asarray(convert_to_numpy(getattr(img, "affine", np.eye(4))), dtype=np.float64)
            x = convert_to_numpy(img)
            if x.ndim != 4:
                raise ValueError(f"{ident}: low-dose simulation expects a channel-first 3D volume, got {x.shape}")
            d[key] = convert_to_dst_type(self._noisy(x, affine, ident), img, dtype=np.float32)[0]
        return d
