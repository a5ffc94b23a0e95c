"""Wrappers that make every super-resolution network map the LR image to the HR image."""

from __future__ import annotations

import warnings
import torch
from torch import nn


__all__ = ["PhysicsCascade", "PhysicsSR", "RECORD_KEY", "decode_record", "encode_record", "find_last_conv",
           "physics_signature"]



def find_last_conv(net: nn.Module) -> nn.Module:
    """Return the last ``nn.Conv*`` / ``nn.ConvTranspose*`` module of ``net`` in registration order.

    Args:
        net: any module.

    Example:
        >>> find_last_conv(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 1, 3))).in_channels
        4
    """
    last = None
    for m in net.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            last = m
    if last is None:
        raise ValueError(f"{type(net).__name__} has no convolution layer to zero-initialise")
    return last


class PhysicsSR(nn.Module):
    """Start from the physics' own inverse and stay consistent with the measurement.

    ``output = physics.apply_dc(physics.baseline(y) + net(...), y)``: the network sees the measurement ``y``
    (``pre_upsample=False``, networks that upsample themselves, e.g. :class:`EDSR`) or the baseline
    (``pre_upsample=True``, e.g. :class:`SRCNN`) and predicts the correction to the matched classical inverse
    (k-space zero-fill for k-space truncation, cubic on the corner grid for decimation, cubic on the centre grid for
    slice thickness); the physics' consistency step follows where the physics has ``dc`` on. The last convolution
    of ``net`` starts at zero, so an untrained model returns exactly the physics baseline (after consistency) and
    training starts from the number it has to beat.

    With a :class:`~medsr_monai.physics.ModalitySwitch`, ``forward`` takes ``modality`` (one name or one per batch
    item; MONAI's ``PrepareBatchExtraInput(extra_keys={"modality": "modality"})`` passes it from the batch).

    The model records its physics: a ``physics_record`` buffer (the JSON of ``physics.config()``, the network class
    and ``pre_upsample``) is in every state dict (checkpoint), and loading a state dict whose physics (scale, grid,
    profile, mask, ...) or network class differs raises ``ValueError`` naming both.

    Args:
        net: the network; output channels = input channels of the baseline.
        physics: a :class:`~medsr_monai.physics.Physics` (or its ``config()`` dict).
        pre_upsample: feed ``net`` the baseline instead of the measurement.
        zero_init_last: zero the last convolution of ``net``.
        amp: ``"bf16"`` runs ``net`` under ``torch.autocast`` in bfloat16 (on the input's device; on CPUs with
            AVX-512 BF16 about 1.9x faster training for SRCNN and EDSR, see ``experiments/amp_benchmark.py``);
            the baseline, the residual sum and the consistency step stay float32, and so do the weights, so
            checkpoints do not depend on it. ``None``/``"fp32"``: full precision.
        channels_last: run ``net`` on channels-last tensors (a memory layout some CPU kernels prefer).

    Example:
        >>> from medsr_monai.networks import EDSR
        >>> from medsr_monai.physics import KSpaceTruncation
        >>> model = PhysicsSR(EDSR(scale=2, num_blocks=2, features=16), KSpaceTruncation(2, dc=True))
        >>> y = torch.rand(1, 1, 8, 8)
        >>> torch.allclose(model(y), model.physics.baseline(y), atol=1e-6)
        True
    """

    def __init__(self, net: nn.Module, physics, pre_upsample: bool = False, zero_init_last: bool = True,
                 amp: str | None = None, channels_last: bool = False) -> None:
        super().__init__()
        from medsr_monai.physics import Physics, physics_from_config

        if amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {sorted(k for k in AMP_DTYPES if k)} or null, got {amp!r}")
        self.amp = amp
        self.channels_last = bool(channels_last)
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.physics: Physics = physics_from_config(physics)
        self.net = net
        self.pre_upsample = bool(pre_upsample)
        net_scale = getattr(net, "scale", None)
        if isinstance(net_scale, int) and not pre_upsample and max(self.physics.scale) != net_scale:
            raise ValueError(f"{type(net).__name__} upsamples by {net_scale} but the physics has scale "
                             f"{self.physics.scale}: set the network's scale from the physics")
        if float(getattr(net, "input_offset", 0.0)) != 0.0:
            warnings.warn(f"{type(net).__name__}.input_offset is non-zero: the output is then offset from the physics "
                          "baseline; use input_offset=0.", stacklevel=2)
        if zero_init_last:
            last = find_last_conv(net)
            with torch.no_grad():
                last.weight.zero_()
                if last.bias is not None:
                    last.bias.zero_()
        self.register_buffer(RECORD_KEY, encode_record(self.record()))

    @property
    def scale(self) -> tuple[int, ...]:
        return self.physics.scale

    def _kw(self, modality) -> dict:
        from medsr_monai.physics import modality_kwargs

        return modality_kwargs(self.physics, modality)

    def baseline(self, y: torch.Tensor, modality=None) -> torch.Tensor:
        """The physics' classical inverse of ``y`` (what the untrained model returns)."""
        return self.physics.baseline(y, **self._kw(modality))

    def consistency(self, x_hat: torch.Tensor, y: torch.Tensor, modality=None) -> torch.Tensor:
        """The physics' consistency step where ``dc`` is on (identity elsewhere)."""
        return self.physics.apply_dc(x_hat, y, **self._kw(modality))

    def residual(self, y: torch.Tensor, modality=None) -> torch.Tensor:
        """``forward(y) - baseline(y)``: what sliding-window inference blends (the baseline is taken on whole
        slices once, so window edges never re-extrapolate it)."""
        out, base = self._output_and_baseline(y, modality)
        return out - base

    def _output_and_baseline(self, y: torch.Tensor, modality=None) -> tuple[torch.Tensor, torch.Tensor]:
        base = self.baseline(y, modality)
        out = base + self.run_net(base if self.pre_upsample else y)
        return self.consistency(out, y, modality), base

    def run_net(self, x: torch.Tensor) -> torch.Tensor:
        """``net(x)`` in the configured precision and memory layout, returned as float32 (contiguous)."""
        dtype = AMP_DTYPES[self.amp]
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if dtype is None:
            return self.net(x).contiguous()
        with torch.autocast(device_type=x.device.type, dtype=dtype):
            out = self.net(x)
        return out.float().contiguous()

    def forward(self, y: torch.Tensor, modality=None) -> torch.Tensor:
        return self._output_and_baseline(y, modality)[0]

    def record(self) -> dict:
        """What the model is: physics config, network class and input mode (stored with every state dict)."""
        return {"physics": self.physics.config(), "network": type(self.net).__name__,
                "pre_upsample": self.pre_upsample}

    def _check_record(self, state) -> None:
        from medsr_monai.physics import physics_from_config

        if not isinstance(state, dict) or "physics" not in state:
            return
        theirs = physics_from_config(state["physics"])
        if physics_signature(theirs) != physics_signature(self.physics):
            raise ValueError(f"the weights were trained for physics {theirs.describe()}, but this model declares "
                             f"{self.physics.describe()}: use weights trained for this physics (scale, grid, "
                             "profile, mask) or change the config to match them")
        if state.get("network") not in (None, self._net_name()):
            raise ValueError(f"the weights belong to network {state.get('network')}, this model is "
                             f"{self._net_name()}")
        if state.get("cascades", 1) != getattr(self, "cascades", 1):
            raise ValueError(f"the weights have {state.get('cascades')} cascades, this model has "
                             f"{getattr(self, 'cascades', 1)}")

    def _net_name(self) -> str:
        return type(self.net).__name__

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # the record is checked here, by meaning, before PyTorch compares tensor sizes; the model keeps its own
        # record (the same physics may differ in choices that do not change the weights, e.g. consistency on/off)
        key = prefix + RECORD_KEY
        if key in state_dict:
            self._check_record(decode_record(state_dict[key]))
            state_dict[key] = getattr(self, RECORD_KEY).clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


#: ``amp`` setting -> autocast dtype (None: no autocast)
AMP_DTYPES = {None: None, "fp32": None, "bf16": torch.bfloat16}

#: state-dict entry that holds a model's record (physics config, network class) as UTF-8 JSON bytes: a uint8
#: tensor, so every tool that expects tensors in a state dict (MONAI's ``copy_model_state``, ``weights_only``
#: loading, ONNX/TorchScript export) keeps working
RECORD_KEY = "physics_record"


def encode_record(record: dict) -> torch.Tensor:
    """A record as a uint8 tensor of its sorted JSON."""
    import json

    return torch.tensor(list(json.dumps(record, sort_keys=True).encode("utf-8")), dtype=torch.uint8)


def decode_record(t) -> dict | None:
    """Inverse of :func:`encode_record` (``None`` for anything else)."""
    import json

    try:
        return json.loads(bytes(torch.as_tensor(t).to(torch.uint8).tolist()).decode("utf-8"))
    except Exception:  # noqa: BLE001 - not a record
        return None


_IGNORED_IN_SIGNATURE = ("dc", "seed", "random", "steps", "step")


def physics_signature(physics) -> dict:
    """A physics' config without the choices that may differ between training and use (consistency on/off,
    random vs fixed mask, seeds, back-projection steps): what a checkpoint must match."""
    def strip(cfg):
        if isinstance(cfg, dict):
            return {k: strip(v) for k, v in cfg.items() if k not in _IGNORED_IN_SIGNATURE}
        return cfg

    return strip(physics.config())


class PhysicsCascade(PhysicsSR):
    """Same-grid restoration that starts from the measurement and stays consistent with it: an unrolled cascade.

    ``z_0 = physics.init_estimate(y)``; for each of the ``cascades`` networks ``z_k = physics.apply_dc(z_{k-1} +
    net_k(z_{k-1}), y)``; the output is ``physics.to_image(z_K)``. For Cartesian undersampling ``z`` is the complex
    image (two channels), the step replaces the sampled k-space lines by the measured ones and the output is its
    magnitude (a cascade of U-Nets with data consistency, as in Schlemper et al. 2018); for low-dose CT there is no
    consistency step and ``z`` is the image. Each network's last convolution starts at zero, so the untrained model
    returns exactly the physics baseline (zero-filled magnitude / low-dose input).

    Args:
        net: the network of one cascade (copied ``cascades`` times; channels: those of ``init_estimate(y)``).
        physics: a physics (or its config dict) with ``init_estimate`` / ``to_image``.
        cascades: number of network + consistency steps (``K``; 1 is a plain network plus one consistency step).
        zero_init_last: zero each network's last convolution.

    Example:
        >>> from medsr_monai.networks import ResidualUNet
        >>> from medsr_monai.physics import CartesianUndersampling
        >>> phys = CartesianUndersampling("equispaced", 4, 0.08)
        >>> model = PhysicsCascade(ResidualUNet(2, 2, 2, channels=(8, 16), residual=False), phys, cascades=2)
        >>> y = phys.A(torch.rand(1, 1, 32, 32))
        >>> torch.allclose(model(y), phys.baseline(y), atol=1e-5)
        True
    """

    def __init__(self, net: nn.Module, physics, cascades: int = 1, zero_init_last: bool = True) -> None:
        import copy

        if int(cascades) < 1:
            raise ValueError(f"cascades must be >= 1, got {cascades}")
        super().__init__(net, physics, pre_upsample=False, zero_init_last=zero_init_last)
        self.cascades = int(cascades)
        self.nets = nn.ModuleList([self.net] + [copy.deepcopy(self.net) for _ in range(self.cascades - 1)])
        del self.net  # the first cascade is nets[0]
        setattr(self, RECORD_KEY, encode_record(self.record()))  # now with the cascades

    def residual(self, y: torch.Tensor, modality=None) -> torch.Tensor:
        return self.forward(y, modality) - self.baseline(y, modality)

    def estimate(self, y: torch.Tensor, modality=None) -> torch.Tensor:
        """The last cascade's estimate ``z_K`` before :meth:`physics.to_image` (for Cartesian undersampling the
        complex image, whose k-space self-supervised losses such as SSDU compare with the measurement)."""
        z = self.physics.init_estimate(y)
        for net in self.nets:
            z = self.physics.apply_dc(z + net(z), y)
        return z

    def forward(self, y: torch.Tensor, modality=None) -> torch.Tensor:
        return self.physics.to_image(self.estimate(y, modality))

    def record(self) -> dict:
        nets = getattr(self, "nets", None)
        return {"physics": self.physics.config(), "network": type(nets[0] if nets is not None else self.net).__name__,
                "cascades": getattr(self, "cascades", 1)}

    def _net_name(self) -> str:
        return type(self.nets[0]).__name__
