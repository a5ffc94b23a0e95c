"""Degradation ("physics"), noise, intensity and grid-aware upsampling transforms.

Every degradation states its grid convention (``grid = "corner"``: LR voxel ``i`` at HR voxel ``s*i``) and writes the
matching affine; see ``docs/PROTOCOL.md`` and :mod:`medsr_monai.physics.grid`.
"""

from .degrade import (
    DecimateDownsample,
    DecimateDownsampled,
    KSpaceDownsample,
    KSpaceDownsampled,
    RandDecimateDownsample,
    RandDecimateDownsampled,
    RandKSpaceDownsample,
    RandKSpaceDownsampled,
)
from .dispatch import SelectByKeyd
from .physics import PhysicsBaselined, PhysicsDegraded
from .paired_crop import RandScaledPairCropd
from .functional import decimate_downsample, gaussian_blur, kspace_downsample, kspace_zerofill, rescale_affine
from .grid import GRID_CONVENTIONS, INTERP_MODES, grid_interpolate, lr_positions
from .intensity import (
    DenormalizeIntensityd,
    ModalityNormalize,
    ModalityNormalized,
    canonical_modality,
    denormalize,
    normalization_range,
)
from .noise import (
    MU_WATER_PER_MM,
    LowDoseCTNoise,
    LowDoseCTNoised,
    RandLowDoseCTNoise,
    RandLowDoseCTNoised,
    RandRicianNoise,
    RandRicianNoised,
    RicianNoise,
    RicianNoised,
)
from .upsample import UPSAMPLE_MODES, GridUpsample, GridUpsampled
from .denoise import GaussianFilterd, NonLocalMeansd
from .lowdose_cache import SeededLowDoseCTNoised
from .thickness import (
    PROFILES,
    CropToMultiple,
    CropToMultipled,
    MoveSliceAxisd,
    SliceThickness,
    SliceThicknessd,
    slice_profile,
    slice_thickness,
    thick_affine,
    thin_affine,
)
from .undersample import (
    KSPACE_MASKS,
    KspaceUndersample,
    KspaceUndersampled,
    RandKspaceUndersample,
    RandKspaceUndersampled,
    make_kspace_mask,
    zero_filled_volume,
)

__all__ = [
    "GRID_CONVENTIONS",
    "INTERP_MODES",
    "MU_WATER_PER_MM",
    "UPSAMPLE_MODES",
    "DecimateDownsample",
    "DecimateDownsampled",
    "DenormalizeIntensityd",
    "GridUpsample",
    "GridUpsampled",
    "KSpaceDownsample",
    "KSpaceDownsampled",
    "LowDoseCTNoise",
    "LowDoseCTNoised",
    "ModalityNormalize",
    "RandScaledPairCropd",
    "ModalityNormalized",
    "RandDecimateDownsample",
    "RandDecimateDownsampled",
    "RandKSpaceDownsample",
    "RandKSpaceDownsampled",
    "RandLowDoseCTNoise",
    "RandLowDoseCTNoised",
    "RandRicianNoise",
    "RandRicianNoised",
    "RicianNoise",
    "RicianNoised",
    "SelectByKeyd",
    "PhysicsBaselined",
    "PhysicsDegraded",
    "canonical_modality",
    "decimate_downsample",
    "denormalize",
    "gaussian_blur",
    "grid_interpolate",
    "kspace_downsample",
    "kspace_zerofill",
    "lr_positions",
    "normalization_range",
    "rescale_affine",
    # slice thickness (through-plane), k-space undersampling (reconstruction), classical denoisers
    "PROFILES", "CropToMultiple", "CropToMultipled", "MoveSliceAxisd", "SliceThickness", "SliceThicknessd",
    "slice_profile", "slice_thickness", "thick_affine", "thin_affine",
    "KSPACE_MASKS", "KspaceUndersample", "KspaceUndersampled", "RandKspaceUndersample", "RandKspaceUndersampled",
    "make_kspace_mask", "zero_filled_volume", "GaussianFilterd", "NonLocalMeansd", "SeededLowDoseCTNoised",
]
