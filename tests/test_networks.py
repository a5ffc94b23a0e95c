"""Tests for medsr_monai.networks: shapes, parameter counts against the papers, wrapper, TorchScript."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from medsr_monai.networks import EDSR, SRCNN, PhysicsSR, find_last_conv
from medsr_monai.transforms.grid import interpolate_scaled
from medsr_monai.transforms.grid import grid_interpolate

# torch 2.x deprecates TorchScript, but MONAI's ckpt_export still scripts by default.
pytestmark = pytest.mark.filterwarnings(r"ignore::DeprecationWarning:torch\.jit.*")


def n_params(net: nn.Module, weights_only: bool = False) -> int:
    return sum(p.numel() for n, p in net.named_parameters() if not weights_only or n.endswith("weight"))


# ---------------------------------------------------------------------------------------------------- SRCNN


@pytest.mark.parametrize("config", ["9-1-5", "9-3-5", "9-5-5"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_srcnn_keeps_shape(config, spatial_dims):
    net = SRCNN(spatial_dims=spatial_dims, config=config, features=(8, 4) if spatial_dims == 3 else (64, 32))
    shape = (2, 1) + (11,) * spatial_dims
    assert net(torch.rand(shape)).shape == shape


def test_srcnn_param_counts_match_paper():
    # Dong et al. TPAMI 2016, Sec. 4.1/4.3: the 9-1-5 network (n1=64, n2=32, one channel) has 8,032 parameters
    # (weights: 9*9*64 + 64*32 + 5*5*32 = 8,032); the 9-5-5 network 57,184.
    net = SRCNN(config="9-1-5")
    assert n_params(net, weights_only=True) == 8032
    assert n_params(net) == 8032 + 64 + 32 + 1 == 8129
    assert n_params(SRCNN(config="9-5-5"), weights_only=True) == 57184
    assert n_params(SRCNN(config="9-3-5"), weights_only=True) == 9 * 9 * 64 + 3 * 3 * 64 * 32 + 5 * 5 * 32
    assert SRCNN(kernel_sizes=(9, 5, 5), config="9-1-5").kernel_sizes == (9, 5, 5)  # explicit sizes win


def test_srcnn_invalid():
    with pytest.raises(ValueError):
        SRCNN(config="9-2-5")  # even kernel: no symmetric "same" padding
    with pytest.raises(ValueError):
        SRCNN(config="nine")
    with pytest.raises(ValueError):
        SRCNN(features=(64,))


# ----------------------------------------------------------------------------------------------------- EDSR


@pytest.mark.parametrize("scale", [1, 2, 3, 4, 8])
def test_edsr_shape_2d(scale):
    net = EDSR(spatial_dims=2, scale=scale, num_blocks=2, features=8)
    assert net(torch.rand(2, 1, 6, 7)).shape == (2, 1, 6 * scale, 7 * scale)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_edsr_shape_3d(scale):
    net = EDSR(spatial_dims=3, scale=scale, num_blocks=1, features=4)
    assert net(torch.rand(1, 1, 4, 5, 3)).shape == (1, 1, 4 * scale, 5 * scale, 3 * scale)


def test_edsr_multichannel_and_invalid():
    net = EDSR(in_channels=2, out_channels=3, scale=2, num_blocks=1, features=8)
    assert net(torch.rand(1, 2, 5, 5)).shape == (1, 3, 10, 10)
    for bad in (5, 6, 0):
        with pytest.raises(ValueError):
            EDSR(scale=bad)
    with pytest.raises(ValueError):
        EDSR(kernel_size=4)
    with pytest.raises(ValueError):
        EDSR.from_variant("huge")


def edsr_param_formula(c_in: int, c_out: int, blocks: int, f: int, scale: int, k: int = 3, d: int = 2) -> int:
    """Parameter count from the architecture definition (Lim et al. 2017, Fig. 3), conv = k^d*cin*cout + cout."""

    def conv(cin: int, cout: int, kk: int = k) -> int:
        return kk**d * cin * cout + cout

    ups = {1: [], 2: [2], 3: [3], 4: [2, 2]}[scale]
    return (
        conv(c_in, f)  # head
        + blocks * 2 * conv(f, f)  # residual blocks
        + conv(f, f)  # body conv before the global skip
        + sum(conv(f, f * r**d, 3) for r in ups)  # sub-pixel convs
        + conv(f, c_out)  # tail
    )


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_edsr_param_counts(scale):
    base = EDSR.baseline(scale)
    assert (base.num_blocks, base.features, base.res_scale) == (16, 64, 1.0)
    assert n_params(base) == edsr_param_formula(1, 1, 16, 64, scale)
    large = EDSR.large(scale)
    assert (large.num_blocks, large.features, large.res_scale) == (32, 256, 0.1)
    assert n_params(large) == edsr_param_formula(1, 1, 32, 256, scale)
    assert n_params(EDSR(spatial_dims=3, scale=scale, num_blocks=2, features=8)) == edsr_param_formula(
        1, 1, 2, 8, scale, d=3
    )


def test_edsr_param_counts_vs_paper():
    # Lim et al., CVPR-W 2017, Table 1: EDSR baseline 1.5 M and EDSR 43 M parameters (RGB, x4 models).
    assert abs(edsr_param_formula(3, 3, 16, 64, 4) / 1.5e6 - 1) < 0.03
    assert abs(edsr_param_formula(3, 3, 32, 256, 4) / 43e6 - 1) < 0.03
    assert abs(n_params(EDSR.baseline(4, in_channels=3, out_channels=3)) / 1.5e6 - 1) < 0.03
    assert abs(n_params(EDSR.large(4, in_channels=3, out_channels=3)) / 43e6 - 1) < 0.03
    # x2 large RGB: one x2 sub-pixel stage instead of two -> about 40.7 M.
    assert abs(n_params(EDSR.large(2, in_channels=3, out_channels=3)) / 40.7e6 - 1) < 0.03


def test_edsr_input_offset():
    net = EDSR(scale=2, num_blocks=1, features=8, input_offset=0.5)
    tail = find_last_conv(net)
    assert tail is net.tail
    with torch.no_grad():
        tail.weight.zero_()
        tail.bias.zero_()
    assert torch.equal(net(torch.rand(1, 1, 4, 4)), torch.full((1, 1, 8, 8), 0.5))


# ------------------------------------------------------------------------------------------ PhysicsSR


def make_models(scale: int, spatial_dims: int = 2, physics=None, **kw) -> dict[str, PhysicsSR]:
    from medsr_monai.physics import Decimation

    physics = physics if physics is not None else Decimation(scale, spatial_dims=spatial_dims)
    feats = (16, 8) if spatial_dims == 3 else (64, 32)
    return {
        "srcnn": PhysicsSR(SRCNN(spatial_dims, config="9-1-5", features=feats), physics, pre_upsample=True, **kw),
        "edsr": PhysicsSR(EDSR(spatial_dims, scale=scale, num_blocks=2, features=8), physics, **kw),
    }


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_wrapper_starts_at_the_physics_baseline(scale):
    from medsr_monai.physics import KSpaceTruncation

    torch.manual_seed(0)
    x = torch.rand(2, 1, 8, 6)
    for physics, ref in ((None, grid_interpolate(x, scale, mode="cubic", grid="corner", spatial_dims=2)),
                         (KSpaceTruncation(scale), KSpaceTruncation(scale).baseline(x))):
        for name, model in make_models(scale, physics=physics).items():
            y = model(x)
            assert y.shape == (2, 1, 8 * scale, 6 * scale), name
            torch.testing.assert_close(y, ref, atol=1e-6, rtol=0, msg=name)
            torch.testing.assert_close(model.baseline(x), ref, atol=1e-6, rtol=0, msg=name)


def test_wrapper_3d_shapes():
    x = torch.rand(1, 1, 4, 6, 4)
    for name, model in make_models(2, spatial_dims=3).items():
        y = model(x)
        assert y.shape == (1, 1, 8, 12, 8), name
        assert torch.equal(y, grid_interpolate(x, 2, mode="cubic", grid="corner", spatial_dims=3)), name


def test_wrapper_anisotropic_pre_upsample():
    from medsr_monai.physics import SliceThickness

    model = PhysicsSR(SRCNN(3, features=(4, 4)), SliceThickness(4, axis=-1, spatial_dims=3), pre_upsample=True)
    assert model(torch.rand(1, 1, 6, 6, 3)).shape == (1, 1, 6, 6, 12)


def test_wrapper_validation():
    from medsr_monai.physics import Decimation

    with pytest.raises(ValueError, match="upsamples by 2"):
        PhysicsSR(EDSR(scale=2, num_blocks=1, features=8), Decimation(4))  # net upsamples by 2
    with pytest.raises(ValueError, match="grid"):
        from medsr_monai.physics import grid_interpolate as gi

        gi(torch.rand(1, 1, 2, 2), 2, grid="middle")
    with pytest.raises(ValueError, match="unknown physics"):
        PhysicsSR(SRCNN(), {"physics": "lanczos"})
    with pytest.raises(ValueError):
        PhysicsSR(nn.Identity(), Decimation(2))  # nothing to zero-initialise
    with pytest.warns(UserWarning, match="input_offset"):
        PhysicsSR(EDSR(scale=2, num_blocks=1, features=8, input_offset=0.5), Decimation(2))


@pytest.mark.parametrize("name", ["srcnn", "edsr"])
def test_wrapper_gradients(name):
    torch.manual_seed(0)
    model = make_models(2)[name]
    last = find_last_conv(model.net)
    x, target = torch.rand(2, 1, 8, 8), torch.rand(2, 1, 16, 16)

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    nn.functional.mse_loss(model(x), target).backward()
    # With a zero last layer, the upstream gradient into the body is zero: only the last layer learns first.
    assert last.weight.grad is not None and last.weight.grad.abs().sum() > 0
    assert last.bias.grad.abs().sum() > 0
    opt.step()
    opt.zero_grad()
    nn.functional.mse_loss(model(x), target).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


# -------------------------------------------------------------------------------------------- TorchScript


@pytest.mark.parametrize("mode", ["nearest", "linear", "cubic"])
@pytest.mark.parametrize("grid", ["corner", "center"])
@pytest.mark.parametrize("scales", [[2.0, 2.0], [3.0, 1.0], [1.5, 4.0], [2.5, 3.0]])
def test_scripted_interpolation_matches_eager_grid_interpolate(mode, grid, scales):
    x = torch.rand(2, 1, 5, 7)
    ref = grid_interpolate(x, scales, mode=mode, grid=grid, spatial_dims=2)
    scripted = torch.jit.script(interpolate_scaled)
    assert torch.equal(scripted(x, scales, mode, grid), ref)
    x3 = torch.rand(1, 2, 3, 4, 5)
    ref3 = grid_interpolate(x3, scales + [2.0], mode=mode, grid=grid, spatial_dims=3)
    assert torch.equal(scripted(x3, scales + [2.0], mode, grid), ref3)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_traced_physics_model_matches_eager(scale):
    """Physics models are not scriptable (the physics is a plain Python object); ``torch.jit.trace`` (MONAI's
    ``ckpt_export --use_trace``) exports them for one input size."""
    from medsr_monai.physics import in_plane_sr_physics

    torch.manual_seed(0)
    x = torch.rand(1, 1, 12, 12)
    physics = in_plane_sr_physics(scale, default="MR")
    for name, model in make_models(scale, physics=physics, zero_init_last=False).items():
        model.eval()
        traced = torch.jit.trace(model, x)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
        buf.seek(0)
        loaded = torch.jit.load(buf)
        with torch.no_grad():
            eager = model(x)
            assert not torch.equal(eager, model.baseline(x)), name
            torch.testing.assert_close(loaded(x), eager, rtol=1e-5, atol=1e-6, msg=name)


def test_torchscript_bare_networks():
    for net, x in (
        (SRCNN(config="9-5-5"), torch.rand(1, 1, 12, 12)),
        (EDSR.baseline(4), torch.rand(1, 1, 6, 6)),
        (EDSR(3, scale=2, num_blocks=1, features=4), torch.rand(1, 1, 3, 3, 3)),
    ):
        net.eval()
        with torch.no_grad():
            torch.testing.assert_close(torch.jit.script(net)(x), net(x))
