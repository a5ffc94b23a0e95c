"""The degradation as an object: forward model, classical inverse, data consistency, grid and record.

Shaped after deepinv's ``Physics`` (``A``, ``A_dagger``, composition): models and workflows receive a physics object
and never hard-code a grid or a scale. A physics object is not an ``nn.Module`` (it has no weights); it works on
batched ``(B, C, *spatial)`` or channel-first ``(C, *spatial)`` tensors, operating on the trailing ``spatial_dims``
axes.

Every physics states:

* ``A(x)``: the forward model, high-resolution / clean -> low-resolution / degraded;
* ``baseline(y)`` (alias ``A_dagger``): the classical inverse *on the grid the forward model produced*; the number a
  learned method must beat;
* ``consistency(x_hat, y)``: the data-consistency step where one exists (``has_consistency``); a model applies it
  after its network when ``dc`` is on;
* ``scale`` (one factor per spatial axis), ``grid`` (``"corner"``, ``"center"`` or ``"same"``) and the affine maps
  :meth:`lr_affine` / :meth:`hr_affine` between the two grids;
* ``config()``: a plain dict that :func:`medsr_monai.physics.physics_from_config` turns back into the object, so
  checkpoints, MLflow runs and output sidecars record exactly which physics a model belongs to.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["Physics", "ComposedPhysics", "apply_affine_grid_change"]


def apply_affine_grid_change(affine, axes: Sequence[int], factors: Sequence[float], origin_shift: Sequence[float]):
    """Return a copy of the 4x4 ``affine`` with voxel axis ``axes[k]`` scaled by ``factors[k]`` and the origin moved by
    ``origin_shift[k]`` voxels of the *input* grid along it.

    Example:
        >>> apply_affine_grid_change(np.eye(4), [2], [3.0], [1.0])[:3, 2:].tolist()
        [[0.0, 0.0], [0.0, 0.0], [3.0, 1.0]]
    """
    a = np.array(torch.as_tensor(affine).detach().cpu().numpy() if isinstance(affine, torch.Tensor) else affine,
                 dtype=np.float64, copy=True)
    old = a.copy()
    for ax, f, sh in zip(axes, factors, origin_shift):
        a[:3, ax] = old[:3, ax] * float(f)
        a[:3, 3] = a[:3, 3] + old[:3, ax] * float(sh)
    return a


class Physics:
    """Base class: the identity degradation (same grid, no consistency step).

    Subclasses override :meth:`A`, :meth:`baseline`, :meth:`consistency` and :meth:`_params`; ``name`` is the key
    under which :func:`~medsr_monai.physics.physics_from_config` finds the class.

    Args:
        spatial_dims: number of trailing spatial axes the physics acts on.
        dc: apply :meth:`consistency` in models built on this physics (:class:`~medsr_monai.networks.PhysicsSR`).
    """

    name = "identity"
    grid = "same"
    has_consistency = False

    def __init__(self, spatial_dims: int = 2, dc: bool = False) -> None:
        if int(spatial_dims) not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}")
        self.spatial_dims = int(spatial_dims)
        self.dc = _as_bool(dc) and self.has_consistency

    # --- the three operators -------------------------------------------------------------------------------
    def A(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802 (deepinv's name)
        """Forward model: HR / clean -> LR / degraded."""
        return x

    def baseline(self, y: torch.Tensor) -> torch.Tensor:
        """The classical inverse on the forward model's own grid."""
        return y

    def A_dagger(self, y: torch.Tensor) -> torch.Tensor:  # noqa: N802
        """deepinv's name for the (pseudo-)inverse: here the classical baseline."""
        return self.baseline(y)

    def consistency(self, x_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Data-consistency step; the identity where the physics has none."""
        return x_hat

    def apply_dc(self, x_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """:meth:`consistency` when ``dc`` is on, else ``x_hat``: what a model applies after its network."""
        return self.consistency(x_hat, y) if self.dc else x_hat

    def init_estimate(self, y: torch.Tensor) -> torch.Tensor:
        """Where an unrolled reconstruction starts, in the domain its consistency step works in (the baseline,
        except for complex-valued measurements, which stay complex until :meth:`to_image`)."""
        return self.baseline(y)

    def to_image(self, z: torch.Tensor) -> torch.Tensor:
        """The image of an estimate in the :meth:`init_estimate` domain (the identity, or a magnitude)."""
        return z

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.A(x)

    def __mul__(self, other: "Physics") -> "ComposedPhysics":
        """``(p2 * p1).A(x) == p2.A(p1.A(x))``, as in deepinv."""
        return ComposedPhysics(other, self)

    # --- grid ------------------------------------------------------------------------------------------------
    @property
    def scale(self) -> tuple[int, ...]:
        """Size factor HR/LR per spatial axis (1 where the grid is unchanged)."""
        return (1,) * self.spatial_dims

    def origin_shift(self) -> tuple[float, ...]:
        """Where LR voxel 0 sits, in HR voxels, per spatial axis: 0 (corner grid) or ``(s-1)/2`` (centre grid)."""
        if self.grid == "center":
            return tuple((s - 1) / 2.0 for s in self.scale)
        return (0.0,) * self.spatial_dims

    def lr_affine(self, hr_affine, axes: Sequence[int] | None = None) -> np.ndarray:
        """The LR volume's affine from the HR one; ``axes``: the volume axes the physics' spatial axes map to
        (default: the last ``spatial_dims`` of three)."""
        axes = self._axes(axes)
        return apply_affine_grid_change(hr_affine, axes, self.scale, self.origin_shift())

    def hr_affine(self, lr_affine, axes: Sequence[int] | None = None) -> np.ndarray:
        """Inverse of :meth:`lr_affine`: the grid a super-resolved volume lands on (overlays the LR input)."""
        axes = self._axes(axes)
        shift = [-sh / s for sh, s in zip(self.origin_shift(), self.scale)]  # in LR voxels
        return apply_affine_grid_change(lr_affine, axes, [1.0 / s for s in self.scale], shift)

    def _axes(self, axes: Sequence[int] | None) -> list[int]:
        axes = list(range(3 - self.spatial_dims, 3)) if axes is None else [int(a) for a in axes]
        if len(axes) != self.spatial_dims:
            raise ValueError(f"{self.name}: got {len(axes)} volume axes {axes} for {self.spatial_dims} spatial dims")
        return axes

    # --- record ----------------------------------------------------------------------------------------------
    def _params(self) -> dict[str, Any]:
        return {}

    def config(self) -> dict[str, Any]:
        """A plain, JSON-serialisable dict that rebuilds this physics (``physics_from_config``)."""
        return {"physics": self.name, "spatial_dims": self.spatial_dims, "dc": bool(self.dc), **self._params()}

    def config_json(self) -> str:
        """:meth:`config` as sorted JSON (an MLflow param, a sidecar field)."""
        import json

        return json.dumps(self.config(), sort_keys=True)

    def describe(self) -> str:
        """One line for tables and logs."""
        params = ", ".join(f"{k}={v}" for k, v in self._params().items())
        return f"{self.name}({params}; grid={self.grid}, dc={self.dc})"

    def __repr__(self) -> str:
        return self.describe()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Physics) and self.config() == other.config()

    def __hash__(self) -> int:
        return hash(repr(sorted(self.config().items())))

    # --- helpers for subclasses ------------------------------------------------------------------------------
    def _check_spatial(self, x: torch.Tensor, what: str) -> None:
        if x.ndim < self.spatial_dims + 1:
            raise ValueError(f"{self.name}.{what}: expected (C, *spatial) or (B, C, *spatial) with {self.spatial_dims} "
                             f"spatial dims, got shape {tuple(x.shape)}")


class ComposedPhysics(Physics):
    """``second`` after ``first``: ``A = second.A o first.A``; ``baseline = first.baseline o second.baseline``.

    No consistency step is defined for a composition (the inner measurement is not observed). Example: a thick-slice
    MR scan that is also k-space truncated in-plane is ``KSpaceTruncation(2, spatial_dims=3) * SliceThickness(2)``.
    """

    name = "composed"

    def __init__(self, first: Physics, second: Physics) -> None:
        if first.spatial_dims != second.spatial_dims:
            raise ValueError(f"cannot compose {first.name} ({first.spatial_dims}D) with {second.name} "
                             f"({second.spatial_dims}D)")
        super().__init__(first.spatial_dims, dc=False)
        self.first, self.second = first, second
        self.grid = first.grid if second.grid in ("same", first.grid) else (
            second.grid if first.grid == "same" else "mixed")

    def A(self, x):  # noqa: N802
        return self.second.A(self.first.A(x))

    def baseline(self, y):
        return self.first.baseline(self.second.baseline(y))

    @property
    def scale(self):
        return tuple(a * b for a, b in zip(self.first.scale, self.second.scale))

    def origin_shift(self):
        # LR voxel 0 of the outer grid in HR voxels: inner shift + outer shift (in inner voxels) x inner scale
        return tuple(a + b * s for a, b, s in zip(self.first.origin_shift(), self.second.origin_shift(),
                                                   self.first.scale))

    def config(self):
        return {"physics": self.name, "first": self.first.config(), "second": self.second.config()}


def _as_bool(v: Any) -> bool:
    from medsr_monai.utils import as_bool

    return as_bool(v, "dc")  # a CLI override arrives as a string
