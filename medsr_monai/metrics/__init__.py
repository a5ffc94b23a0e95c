"""Image-quality measures beyond MONAI's PSNR/SSIM that need no downloaded weights."""

from .sharpness import gmsd, gradient_magnitude, sharpness_ratio

__all__ = ["gmsd", "gradient_magnitude", "sharpness_ratio"]
