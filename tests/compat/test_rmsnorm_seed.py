"""The RMSNorm seed README (bzhangGo/rmsnorm) against ``anydepth.compat.rmsnorm.RMSNorm``.

The README contains no PyTorch usage example: its code blocks are a TensorFlow layer (Nematus), a Theano
function and a Lasagne layer, and its prose points to ``rmsnorm_torch.RMSNorm(d, p=-1., eps=1e-8,
bias=False)``. TensorFlow, Theano and Lasagne cannot run here, so each snippet is transcribed below as
the formula it computes (written in float64 torch ops, line by line after the snippet) and our layer,
configured to the same eps and placement, is tested against it. The PyTorch class is exercised with
its documented signature and parameter names against the paper's formula.
"""

import pytest
import torch

from anydepth.compat.rmsnorm import RMSNorm
from anydepth.nn.norms import PartialRMSNorm


@pytest.fixture(autouse=True)
def _float32_default():
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(prev)


def set_params(m, **values):
    with torch.no_grad():
        for name, v in values.items():
            getattr(m, name).copy_(v)
    return m


def test_readme_formula_without_eps():
    """README: a_bar_i = a_i / RMS(a) * g_i, RMS(a) = sqrt(1/n sum_i a_i^2)."""
    n = 20
    a = torch.randn(7, n, dtype=torch.float64)
    g = torch.rand(n, dtype=torch.float64) + 0.5
    rms = torch.sqrt((a**2).sum(-1, keepdim=True) / n)
    expected = a / rms * g
    for placement in ("outside", "inside"):
        m = set_params(RMSNorm(n, eps=0.0, eps_placement=placement).double(), scale=g)
        torch.testing.assert_close(m(a), expected, atol=1e-12, rtol=1e-12)


def test_readme_partial_rms_statistic():
    """README: the RMS statistic can be estimated from partial inputs (pRMSNorm)."""
    n, p = 64, 0.0625
    a = torch.randn(5, n, dtype=torch.float64)
    k = int(n * p)
    expected = a / torch.sqrt((a[:, :k] ** 2).sum(-1, keepdim=True) / k)
    torch.testing.assert_close(RMSNorm(n, p, 0.0).double()(a), expected)
    torch.testing.assert_close(PartialRMSNorm.make(dim=n, p=p, eps=0.0).double()(a), expected)


def test_nematus_tensorflow_layer():
    """README, Nematus ``LayerNormLayer.forward``: ms = reduce_sum(x^2) / layer_size; x * rsqrt(ms + eps) * new_std."""
    layer_size, eps = 32, 1e-5
    x = torch.randn(4, 6, layer_size)
    new_std = torch.rand(layer_size) + 0.5
    x64, s64 = x.double(), new_std.double()
    ms = torch.sum(x64**2, dim=-1, keepdim=True) * 1.0 / layer_size
    norm_inputs = x64 * torch.rsqrt(ms + eps)
    expected = norm_inputs * s64
    m = set_params(RMSNorm(layer_size, eps=eps, eps_placement="inside"), scale=new_std)
    torch.testing.assert_close(m(x).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ndim", [2, 3])
def test_nematus_theano_layer_norm(ndim):
    """README, Theano ``layer_norm(x, b, s)``: x / sqrt(mean(x*x) + 1e-5), then s * output + b."""
    d = 24
    x = torch.randn(*(3, 5)[: ndim - 1], d)
    b, s = torch.randn(d), torch.rand(d) + 0.5
    x64 = x.double()
    norm_x = torch.mean(x64 * x64, dim=-1, keepdim=True)
    output = x64 / torch.sqrt(norm_x + 1e-5)
    expected = s.double() * output + b.double()
    m = set_params(RMSNorm(d, eps=1e-5, bias=True, eps_placement="inside"), scale=s, offset=b)
    torch.testing.assert_close(m(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_lasagne_rmsnorm_layer_dense():
    """README, Lasagne ``RMSNormLayer`` on a 2-D input: mean(input^2, axis=1), input / sqrt(meanS + 1e-6),
    * g + b, then the layer's nonlinearity (relu by default)."""
    k = 16
    x = torch.randn(8, k)
    g, b = torch.rand(k) + 0.5, torch.randn(k)
    x64 = x.double()
    mean_s = torch.mean(x64**2, dim=1, keepdim=True)
    norm_input = x64 / torch.sqrt(mean_s + 1e-6)
    expected = torch.relu(norm_input * g.double() + b.double())
    m = set_params(RMSNorm(k, eps=1e-6, bias=True, eps_placement="inside"), scale=g, offset=b)
    torch.testing.assert_close(torch.relu(m(x)).double(), expected, atol=1e-5, rtol=1e-5)


def test_lasagne_rmsnorm_layer_conv():
    """README, Lasagne ``RMSNormLayer`` on a 4-D input: the statistic over the spatial axes (2, 3), g and b
    per channel. Our norm takes its statistic over the last dimension, so the spatial axes are flattened
    into it and the per-channel affine is applied outside (the norm's own scale stays 1)."""
    n, c, h, w = 2, 3, 4, 5
    x = torch.randn(n, c, h, w)
    g, b = torch.rand(c) + 0.5, torch.randn(c)
    x64 = x.double()
    mean_s = torch.mean(x64**2, dim=(2, 3), keepdim=True)
    norm_input = x64 / torch.sqrt(mean_s + 1e-6)
    expected = torch.relu(norm_input * g.double()[None, :, None, None] + b.double()[None, :, None, None])
    normed = RMSNorm(h * w, eps=1e-6, eps_placement="inside")(x.reshape(n, c, h * w)).reshape(n, c, h, w)
    ours = torch.relu(normed * g[None, :, None, None] + b[None, :, None, None])
    torch.testing.assert_close(ours.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("p", [-1.0, 0.0625, 0.5, 1.0])
@pytest.mark.parametrize("bias", [False, True])
def test_rmsnorm_torch_signature_and_semantics(p, bias):
    """``rmsnorm_torch.RMSNorm(d, p=-1., eps=1e-8, bias=False)``: positional arguments, parameters
    ``scale``/``offset``, y = scale * x / (||x[:k]|| * k^-1/2 + eps) (+ offset), k = int(d*p) for 0 <= p <= 1."""
    d = 64
    m = RMSNorm(d, p, 1e-8, bias)
    assert (m.d, m.p, m.eps, m.bias) == (d, p, 1e-8, bias)
    names = ["scale", "offset"] if bias else ["scale"]
    assert [n for n, _ in m.named_parameters()] == names
    assert torch.equal(m.scale, torch.ones(d)) and (not bias or torch.equal(m.offset, torch.zeros(d)))
    state = {"scale": torch.rand(d) + 0.5, **({"offset": torch.randn(d)} if bias else {})}
    m.load_state_dict(state)
    x = torch.randn(3, 10, d, dtype=torch.float64)
    k = d if p < 0 else int(d * p)
    rms = x[..., :k].norm(2, dim=-1, keepdim=True) * k ** (-1.0 / 2)
    expected = state["scale"].double() * (x / (rms + 1e-8))
    if bias:
        expected = expected + state["offset"].double()
    torch.testing.assert_close(m(x.float()).double(), expected, atol=1e-5, rtol=1e-5)
