"""``anydepth.compat.admin_torch`` against admin-torch 0.1.0 with the same inputs, plus its fixes and bad input."""

from __future__ import annotations

import math

import admin_torch
import pytest
import torch
from torch import nn

from anydepth.compat import admin_torch as admin
from anydepth.nn.residual import Admin

SCALES = ["O(logn)", "default", "O(n)", "O(1)"]


@pytest.fixture(autouse=True)
def _one_thread():
    # The tensors here are tiny; intra-op threads only spin against other processes on a shared CPU.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("scale", SCALES)
def test_calculate_init_equals_original_for_n_1_to_200(scale):
    ours = [admin.calculate_init(n, scale) for n in range(1, 201)]
    theirs = [admin_torch.calculate_init(n, scale) for n in range(1, 201)]
    assert ours == theirs


def test_calculate_init_formulas_and_documented_values():
    for n in (1, 7, 12, 200):
        assert admin.calculate_init(n) == pytest.approx(math.sqrt((n + 1) / math.log(n + 1) - 1), rel=1e-15)
        assert admin.calculate_init(n, "O(1)") == pytest.approx(math.sqrt(n), rel=1e-15)
        assert admin.calculate_init(n, "O(n)") == 1.0
    # residual-norm.md 1.2: N=12 -> (1, 2.017, 3.464); N=24 -> (1, 2.601, 4.899)
    assert [admin.calculate_init(12, s) for s in ("O(n)", "O(logn)", "O(1)")] == pytest.approx(
        [1, 2.017, 3.464], abs=5e-4
    )
    assert [admin.calculate_init(24, s) for s in ("O(n)", "O(logn)", "O(1)")] == pytest.approx(
        [1, 2.601, 4.899], abs=5e-4
    )


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("n", [1, 2, 12, 37, 200])
@pytest.mark.parametrize("as_parameter", [False, True])
def test_as_module_outputs_equal_original(scale, n, as_parameter):
    kw = {"as_parameter": as_parameter, "embed_dim": 6 if as_parameter else None}
    ours, theirs = admin.as_module(n, scale, **kw), admin_torch.as_module(n, scale, **kw)
    torch.manual_seed(n)
    x, fx = torch.randn(3, 4, 6), torch.randn(3, 4, 6)
    assert torch.equal(ours(x, fx), theirs(x, fx))
    assert torch.equal(ours.omega, theirs.omega)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["omega"]
    assert isinstance(ours.omega, nn.Parameter) == as_parameter


def test_original_state_dict_loads_and_gradients_match():
    theirs = admin_torch.as_module(12, as_parameter=True, embed_dim=6)
    with torch.no_grad():
        theirs.omega.copy_(torch.linspace(0.5, 2.0, 6))
    ours = admin.as_module(12, as_parameter=True, embed_dim=6)
    ours.load_state_dict(theirs.state_dict())
    x, fx = torch.randn(2, 6), torch.randn(2, 6)
    ours(x, fx).pow(2).sum().backward()
    theirs(x, fx).pow(2).sum().backward()
    assert torch.equal(ours.omega.grad, theirs.omega.grad)


def test_omega_residual_is_the_library_admin_scheme():
    res = admin.OmegaResidual(2.5)
    assert isinstance(res, Admin)
    x, fx = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.equal(res(x, fx), x * 2.5 + fx)
    unit = admin.OmegaResidual(1.0)
    assert torch.equal(unit(x, fx), x + fx)  # admin-torch's forward_original
    assert res.no_weight_decay() == [] and admin.OmegaResidual(2.0, True, 3).no_weight_decay()


@pytest.mark.parametrize("scale", SCALES)
def test_as_buffer_and_as_parameter_register_what_the_original_registers(scale):
    ours, theirs = nn.Module(), nn.Module()
    admin.as_buffer(ours, "attn_omega", 24, scale)
    admin_torch.as_buffer(theirs, "attn_omega", 24, scale)
    admin.as_parameter(ours, "ffn_omega", 24, 5, scale)
    admin_torch.as_parameter(theirs, "ffn_omega", 24, 5, scale)
    for name in ("attn_omega", "ffn_omega"):
        a, b = getattr(ours, name), getattr(theirs, name)
        assert torch.equal(a, b) and a.dtype == b.dtype and type(a) is type(b)
    assert dict(ours.named_buffers()).keys() == {"attn_omega"}
    assert dict(ours.named_parameters()).keys() == {"ffn_omega"}


def test_omega_follows_device_context_and_to_empty():
    # admin-torch builds its buffer with torch.FloatTensor, which ignores the device context
    with torch.device("meta"):
        theirs = admin_torch.as_module(12)
        ours = admin.as_module(12)
        holder = nn.Module()
        admin.as_buffer(holder, "omega", 12)
    assert theirs.omega.device.type == "cpu"
    assert ours.omega.device.type == "meta" and holder.omega.device.type == "meta"
    ours.to_empty(device="cpu")
    ours.reset_parameters()
    assert ours.omega.item() == pytest.approx(admin.calculate_init(12), rel=1e-7)


def test_half_precision():
    res = admin.as_module(12)
    x, fx = torch.randn(2, 4).half(), torch.randn(2, 4).half()
    assert res(x, fx).dtype == torch.float16  # admin-torch promotes this to float32
    res.half()
    assert res.omega.dtype == torch.float16
    assert torch.equal(res(x, fx), x * res.omega + fx)


def test_profile_a_model_built_with_the_seed_api():
    """The profiled init also sets OmegaResidual modules: w_1 = 1, w_2 = sqrt(Var[x] + Var[f_1(x)])."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
            self.res = nn.ModuleList([admin.as_module(2) for _ in range(2)])
            self.ln = nn.LayerNorm(4)

        def forward(self, x):
            for f, res in zip(self.f, self.res):
                x = self.ln(res(x, f(x)))
            return x

    torch.manual_seed(0)
    net, x = Net(), torch.randn(16, 4)
    with torch.no_grad():
        w2 = math.sqrt(
            x.double().var(unbiased=False).item() + net.f[0](x).double().var(unbiased=False).item()
        )
    values = admin.admin_profile_(net, x)
    assert values["default"] == pytest.approx([1.0, w2], rel=1e-6)
    assert net.res[1].omega.item() == pytest.approx(w2, rel=1e-6)


def test_bad_input():
    with pytest.raises(ValueError, match="num_res_layers must be >= 1, got 0"):
        admin.calculate_init(0)  # admin-torch: ZeroDivisionError
    with pytest.raises(ValueError, match="num_res_layers must be >= 1, got -3"):
        admin.as_module(-3)
    with pytest.raises(TypeError, match="num_res_layers must be an int"):
        admin.as_module("12")
    with pytest.raises(ValueError, match=r"output_change_scale='O\(log n\)' is not supported; use one of"):
        admin.calculate_init(12, "O(log n)")  # admin-torch: AssertionError
    with pytest.raises(ValueError, match="embed_dim is required when as_parameter=True"):
        admin.as_module(12, as_parameter=True)
    with pytest.raises(ValueError, match="embed_dim is required when as_parameter=True"):
        admin.OmegaResidual(2.0, as_parameter=True)
    with pytest.raises(ValueError, match="embed_dim must be a positive int"):
        admin.as_parameter(nn.Module(), "w", 12, 0)
    with pytest.raises(TypeError, match="network must be a torch.nn.Module"):
        admin.as_buffer(object(), "w", 12)
    with pytest.raises(ValueError, match="buffer_name must be a non-empty attribute name"):
        admin.as_buffer(nn.Module(), "a.b", 12)
    with pytest.raises(ValueError, match="init_value must be a finite number"):
        admin.OmegaResidual(float("inf"))
