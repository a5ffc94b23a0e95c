"""Image-quality measures beyond MONAI's PSNR/SSIM that need no downloaded weights, and the Ignite handlers that
score a model and its baselines slice by slice (in-plane and through-plane)."""

from .handlers import SliceMetrics, SRMetricsHandler, save_epoch_figure, sr_items
from .sharpness import gmsd, gradient_magnitude, sharpness_ratio
from .through_plane import VIEWS, ThroughPlaneMetricsHandler

__all__ = [
    "gmsd", "gradient_magnitude", "sharpness_ratio",
    "SliceMetrics", "SRMetricsHandler", "ThroughPlaneMetricsHandler", "VIEWS", "save_epoch_figure", "sr_items",
]
