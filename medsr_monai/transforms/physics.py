"""Dictionary transforms over a physics object: degrade with ``A``, or add the ``baseline`` as a new key.

The physics (:mod:`medsr_monai.physics`) is the one place a bundle states its degradation; these transforms only
apply it inside MONAI pipelines. With a :class:`~medsr_monai.physics.ModalitySwitch` the branch is chosen by the
item's ``modality_key`` value. A ``MetaTensor`` gets the affine of the new grid (the physics' scale and origin
shift).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch  # noqa: F401  (used in the examples)
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable
from monai.utils import MAX_SEED

from medsr_monai.physics import ModalitySwitch, Physics, physics_from_config

from .degrade import apply_resampling

__all__ = ["PhysicsDegraded", "PhysicsBaselined"]


class _PhysicsMapTransform(Randomizable, MapTransform):
    def __init__(self, keys: KeysCollection, physics: Physics | Mapping, modality_key: str = "modality",
                 allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.physics = physics_from_config(physics)
        self.modality_key = modality_key

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        # random physics (fresh masks, noise) get their own seeds from this transform's stream, so a seeded
        # Compose repeats exactly
        super().set_random_state(seed=seed, state=state)
        members = (list(self.physics.branches.values()) if isinstance(self.physics, ModalitySwitch)
                   else [self.physics])
        for p in members:
            if hasattr(p, "set_random_state"):
                p.set_random_state(int(self.R.randint(MAX_SEED, dtype="uint32")))
        return self

    def randomize(self, data=None) -> None:
        pass

    def branch(self, d: Mapping) -> Physics:
        if isinstance(self.physics, ModalitySwitch):
            if self.modality_key not in d:
                raise KeyError(f"key {self.modality_key!r} (the modality that picks the physics) is not in the item "
                               f"(keys: {list(d)})")
            return self.physics.select(d[self.modality_key])
        return self.physics


class PhysicsDegraded(_PhysicsMapTransform):
    """Replace each key by ``physics.A`` of it (HR/clean -> LR/degraded).

    Args:
        keys: images to degrade (augment them *before*: a flip of an LR/HR pair moves the corner grid).
        physics: a physics object or its config dict.
        modality_key: item key that selects the branch of a ``ModalitySwitch``.
        allow_missing_keys: do not raise if a key is missing.

    Example:
        >>> from medsr_monai.physics import in_plane_sr_physics
        >>> t = PhysicsDegraded("image", in_plane_sr_physics(2))
        >>> t({"image": torch.rand(1, 8, 8), "modality": "MR"})["image"].shape
        torch.Size([1, 4, 4])
    """

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        p = self.branch(d)
        for key in self.key_iterator(d):
            d[key] = apply_resampling(d[key], p.A, [float(s) for s in p.scale], p.spatial_dims, p.origin_shift())
        return d


class PhysicsBaselined(_PhysicsMapTransform):
    """Add ``physics.baseline`` of each key under a new name (the matched classical inverse, at HR size).

    Args:
        keys: degraded images.
        physics: a physics object or its config dict.
        names: output keys, one per key (default ``"baseline"``).
        consistent: follow the baseline by the physics' consistency step (e.g. cubic + slice-thickness
            consistency, the matched classical inverse for through-plane SR).
        modality_key: item key that selects the branch of a ``ModalitySwitch``.
        allow_missing_keys: do not raise if a key is missing.

    Example:
        >>> from medsr_monai.physics import KSpaceTruncation
        >>> PhysicsBaselined("image", KSpaceTruncation(2))({"image": torch.rand(1, 4, 4)})["baseline"].shape
        torch.Size([1, 8, 8])
    """

    def __init__(self, keys: KeysCollection, physics: Physics | Mapping, names: str | Sequence[str] = "baseline",
                 consistent: bool = False, modality_key: str = "modality", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, physics, modality_key, allow_missing_keys)
        self.consistent = bool(consistent)
        self.names = [names] if isinstance(names, str) else list(names)
        if len(self.names) != len(self.keys):
            raise ValueError(f"{len(self.names)} names for {len(self.keys)} keys")

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        p = self.branch(d)
        for key, name in zip(self.key_iterator(d), self.names):
            shift = [-sh / s for sh, s in zip(p.origin_shift(), p.scale)]
            fn = (lambda y, p=p: p.consistency(p.baseline(y), y)) if self.consistent else p.baseline
            d[name] = apply_resampling(d[key], fn, [1.0 / s for s in p.scale], p.spatial_dims, shift)
        return d
