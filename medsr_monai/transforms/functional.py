"""Moved to :mod:`medsr_monai.physics.functional` (the degradation maths belongs to the physics); kept so old
imports keep working."""

from medsr_monai.physics.functional import *  # noqa: F401,F403
from medsr_monai.physics.functional import __all__, _as_float_tensor, rescale_affine  # noqa: F401
