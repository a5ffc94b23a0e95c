"""Feature ("perceptual") losses that never download anything.

The SRGAN paper's content loss compares VGG19 feature maps of the SR and HR images. MONAI's
``PerceptualLoss`` fetches its networks from a hub at run time, which fails behind hospital firewalls;
here the VGG19 weights are a file the user gives (torchvision's ``vgg19-dcbb9e9d.pth`` layout), loaded
with ``weights_only=True``. Without that file the default feature network is the discriminator itself
(feature matching, Salimans et al. 2016): it needs no external weights and its features are learned on
the same modality, whereas ImageNet VGG features describe natural RGB photographs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["VGGFeatureExtractor", "FeatureLoss", "make_feature_extractor", "VGG19_LAYERS"]

_VGG19_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


def _vgg19_layer_index() -> dict[str, int]:
    """``{"relu5_4": 35, "conv5_4": 34, ...}``: indices in torchvision's ``vgg19().features``."""
    names, block, conv, i = {}, 1, 0, 0
    for v in _VGG19_CFG:
        if v == "M":
            names[f"pool{block}"] = i
            block, conv, i = block + 1, 0, i + 1
        else:
            conv += 1
            names[f"conv{block}_{conv}"], names[f"relu{block}_{conv}"] = i, i + 1
            i += 2
    return names


VGG19_LAYERS = _vgg19_layer_index()


class VGGFeatureExtractor(nn.Module):
    """VGG19 ``features`` up to ``layer`` (SRGAN's VGG54 is ``relu5_4``, VGG22 ``relu2_2``), frozen, in eval mode.

    Single-channel images on [0, 1] are repeated to RGB and normalised with the ImageNet mean and std the
    weights were trained with.

    Args:
        weights_path: a state dict of torchvision's ``vgg19`` (keys ``features.N.weight``) or of its
            ``features`` alone (``N.weight``). Nothing is downloaded.
        layer: last layer kept, a name of :data:`VGG19_LAYERS`.
    """

    def __init__(self, weights_path: str | Path, layer: str = "relu5_4") -> None:
        super().__init__()
        if layer not in VGG19_LAYERS:
            raise ValueError(f"layer {layer!r} is not a VGG19 layer; choose one of {sorted(VGG19_LAYERS)}")
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"perceptual weights {path}: no such file (give torchvision's vgg19 state dict)")
        layers: list[nn.Module] = []
        c_in = 3
        for v in _VGG19_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, int(v), 3, padding=1), nn.ReLU(inplace=False)]
                c_in = int(v)
        self.features = nn.Sequential(*layers[: VGG19_LAYERS[layer] + 1])
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # truncated file, not a state dict, pickled objects
            raise ValueError(f"perceptual weights {path}: cannot be read as a state dict ({e})") from e
        if isinstance(state, nn.Module) or not isinstance(state, dict):
            raise ValueError(f"perceptual weights {path}: expected a state dict, got {type(state).__name__}")
        state = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
        wanted = self.features.state_dict()
        missing = sorted(set(wanted) - set(state))
        if missing:
            raise ValueError(f"perceptual weights {path}: not a VGG19 state dict, missing {missing[:4]}")
        bad = [k for k in wanted if tuple(state[k].shape) != tuple(wanted[k].shape)]
        if bad:
            raise ValueError(f"perceptual weights {path}: wrong shapes for {bad[:4]} (is it VGG19?)")
        self.features.load_state_dict({k: state[k] for k in wanted})
        self.requires_grad_(False)
        self.eval()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def train(self, mode: bool = True) -> VGGFeatureExtractor:  # always frozen
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"VGG features need 2D images (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        return self.features((x - self.mean) / self.std)


class FeatureLoss(nn.Module):
    """Mean L1 distance between feature maps of the prediction and of the (detached) target.

    Args:
        extractor: ``x -> tensor`` or ``x -> list of tensors`` (e.g. :class:`VGGFeatureExtractor`, or a
            discriminator's ``feature_maps``).
    """

    def __init__(self, extractor: Callable[[torch.Tensor], torch.Tensor | Sequence[torch.Tensor]]) -> None:
        super().__init__()
        self.extractor = extractor

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        fp, ft = self.extractor(pred), self.extractor(target)
        if isinstance(fp, torch.Tensor):
            fp, ft = [fp], [ft]
        return sum(F.l1_loss(a, b.detach()) for a, b in zip(fp, ft)) / len(fp)


def make_feature_extractor(weights_path: str | None, discriminator: nn.Module | None = None,
                           layer: str = "relu5_4") -> Callable | None:
    """VGG19 from ``weights_path`` when given, else the discriminator's ``feature_maps`` (feature matching);
    ``None`` when neither is available."""
    if weights_path:
        return VGGFeatureExtractor(weights_path, layer=layer)
    discriminator = getattr(discriminator, "module", discriminator)  # DistributedDataParallel
    if discriminator is not None and hasattr(discriminator, "feature_maps"):
        return discriminator.feature_maps
    return None
