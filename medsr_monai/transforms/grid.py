"""Moved to :mod:`medsr_monai.physics.grid` (the physics owns the grid); kept so old imports keep working."""

from medsr_monai.physics.grid import *  # noqa: F401,F403
from medsr_monai.physics.grid import __all__, _cubic_weights, _interp_axis, _round_half_even  # noqa: F401
