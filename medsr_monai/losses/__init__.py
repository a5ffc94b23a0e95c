"""Losses of the adversarial bundles."""

from .adversarial import ADVERSARIAL_KINDS, AdversarialLoss
from .features import VGG19_LAYERS, FeatureLoss, VGGFeatureExtractor, make_feature_extractor

__all__ = ["ADVERSARIAL_KINDS", "AdversarialLoss", "FeatureLoss", "VGG19_LAYERS", "VGGFeatureExtractor",
           "make_feature_extractor"]
