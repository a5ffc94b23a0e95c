"""Super-resolution and translation network architectures (pure architecture, no training logic)."""

from .cyclegan import ResnetGenerator
from .discriminators import PatchGANDiscriminator, SRGANDiscriminator
from .edsr import EDSR, EDSR_VARIANTS, EDSRResBlock
from .srcnn import SRCNN, SRCNN_CONFIGS
from .srresnet import SRResBlock, SRResNet
from .wrappers import PhysicsCascade, PhysicsSR, decode_record, find_last_conv, physics_signature
from .convlstm import BiConvLSTMSR, ConvLSTMCell
from .unet import ResidualUNet

__all__ = [
    "EDSR",
    "EDSR_VARIANTS",
    "EDSRResBlock",
    "PhysicsCascade",
    "PhysicsSR",
    "physics_signature",
    "decode_record",
    "PatchGANDiscriminator",
    "ResnetGenerator",
    "SRCNN",
    "SRCNN_CONFIGS",
    "SRGANDiscriminator",
    "SRResBlock",
    "SRResNet",
    "find_last_conv",
    "BiConvLSTMSR",
    "ConvLSTMCell",
    "ResidualUNet",
]
