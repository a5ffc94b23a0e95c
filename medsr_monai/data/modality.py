"""The modality of a volume: what the datalist, the DICOM header or the user declares, else a guess.

One rule for the whole package (indexing a folder, in-plane and through-plane inference). MONAI has no
modality notion of its own; the normalisation (:class:`~medsr_monai.transforms.ModalityNormalize`) needs one.
"""

from __future__ import annotations

__all__ = ["guess_modality", "volume_modality"]


def guess_modality(min_value: float) -> str:
    """CT if the darkest voxel is below -500 (air in HU), else MR.

    Example:
        >>> guess_modality(-1024.0), guess_modality(0.0)
        ('CT', 'MR')
    """
    return "CT" if min_value < -500 else "MR"


def volume_modality(*declared: str | None, min_value: float) -> str:
    """The first declared modality that is set (``None``, ``""`` and ``"auto"`` are not), upper case, ``MRI`` read
    as ``MR``; else :func:`guess_modality` of ``min_value``.

    Example:
        >>> volume_modality(None, "auto", "mri", min_value=-1000.0), volume_modality(None, "auto", min_value=-1000.0)
        ('MR', 'CT')
    """
    for m in declared:
        m = str(m or "").upper()
        if m and m != "AUTO":
            return "MR" if m == "MRI" else m
    return guess_modality(float(min_value))
