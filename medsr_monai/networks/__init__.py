"""Super-resolution network architectures (pure architecture, no training logic)."""

from .edsr import EDSR, EDSR_VARIANTS, EDSRResBlock
from .srcnn import SRCNN, SRCNN_CONFIGS
from .wrappers import InterpolationSR, find_last_conv

__all__ = [
    "EDSR",
    "EDSR_VARIANTS",
    "EDSRResBlock",
    "InterpolationSR",
    "SRCNN",
    "SRCNN_CONFIGS",
    "find_last_conv",
]
