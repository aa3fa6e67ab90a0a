"""The post-2023 techniques as leaf layers, each against its paper's formula written out here."""

import math

import pytest
import torch

from anydepth.nn.attention import FullAttention, ValueResidual
from anydepth.nn.context import LayerContext
from anydepth.nn.norms import DyT
from anydepth.registry import ATTENTIONS, NORMS


def _randomise(module, std=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if p.dim() == 1 and p.shape[0] > 1 else 0.0))


# ------------------------------------------------------------------------------------------------ DyT


def test_dyt_is_gamma_tanh_alpha_x_plus_beta():
    norm = NORMS.build(NORMS.config("dyt", alpha_init=0.7), dim=6)
    assert isinstance(norm, DyT)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-1, 2, 6))
        norm.bias.copy_(torch.linspace(0.5, -0.5, 6))
    x = torch.randn(3, 4, 6) * 3
    expected = norm.weight * torch.tanh(0.7 * x) + norm.bias
    torch.testing.assert_close(norm(x), expected, rtol=0, atol=1e-6)
    # bf16 input: computed in float32, returned in bf16
    assert norm(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("alpha", [0.0, -0.5, float("nan"), True])
def test_dyt_alpha_must_be_positive(alpha):
    with pytest.raises(ValueError, match="alpha_init must be a finite number > 0"):
        NORMS.config("dyt", alpha_init=alpha)
    with pytest.raises(ValueError, match="alpha_init"):
        DyT.make(dim=4, alpha_init=alpha)


# ------------------------------------------------------------------------------------------------ QK-norm


def _manual_attention(attn, x, q_fn, k_fn, v_fn=lambda v: v):
    b, n, _ = x.shape
    h, d = attn.heads, attn.dim_head
    w = attn.to_qkv.weight
    q, k, v = (x @ w[i * h * d : (i + 1) * h * d].T for i in range(3))
    q, k, v = (t.view(b, n, h, d).transpose(1, 2) for t in (q, k, v))
    q, k, v = q_fn(q), k_fn(k), v_fn(v)
    logits = q @ k.transpose(-1, -2) / math.sqrt(d)
    out = torch.softmax(logits, -1) @ v
    return out.transpose(1, 2).reshape(b, n, h * d) @ attn.to_out.weight.T + attn.to_out.bias


def test_qk_layernorm_normalises_each_head_before_the_dot_product():
    torch.manual_seed(0)
    attn = ATTENTIONS.build(ATTENTIONS.config("full", qk_norm="layer"), dim=16, heads=4, dim_head=None, causal=False)
    _randomise(attn.qk_norm, seed=1)
    x = torch.randn(2, 5, 16)

    def ln(t, norm):  # (t - mean) / sqrt(var + eps) * g + b over the head's 4 features
        mu, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
        return (t - mu) / torch.sqrt(var + 1e-5) * norm.weight + norm.bias

    expected = _manual_attention(attn, x, lambda q: ln(q, attn.qk_norm.q_norm), lambda k: ln(k, attn.qk_norm.k_norm))
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)


def test_qk_rmsnorm_normalises_each_head_before_the_dot_product():
    torch.manual_seed(0)
    attn = ATTENTIONS.build(ATTENTIONS.config("full", qk_norm="rms"), dim=16, heads=2, dim_head=None, causal=False)
    _randomise(attn.qk_norm, seed=2)
    x = torch.randn(2, 5, 16) * 4

    def rms(t, norm):  # t / sqrt(mean(t^2) + eps) * g (the builder's RMSNorm: eps 1e-6 inside)
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.scale

    expected = _manual_attention(attn, x, lambda q: rms(q, attn.qk_norm.q_norm), lambda k: rms(k, attn.qk_norm.k_norm))
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)


def test_qk_norm_bounds_attention_logits_whatever_the_input_scale():
    attn = ATTENTIONS.build(ATTENTIONS.config("full", qk_norm="layer"), dim=16, heads=2, dim_head=None, causal=True)
    x = torch.randn(1, 6, 16)
    # the attention pattern ignores the input's scale (up to eps); only the values scale (biases are 0 at init)
    torch.testing.assert_close(attn(x * 1000), attn(x) * 1000, rtol=1e-3, atol=1e-2)


def test_qk_norm_cached_decoding_equals_full_forward():
    torch.manual_seed(0)
    attn = ATTENTIONS.build(ATTENTIONS.config("full", qk_norm="rms"), dim=16, heads=2, dim_head=None, causal=True)
    x = torch.randn(1, 6, 16)
    cache = {}
    steps = torch.cat([attn(x[:, i : i + 1], cache=cache) for i in range(6)], dim=1)
    torch.testing.assert_close(steps, attn(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", ["l2", "scale", "LayerNorm", 1])
def test_unknown_qk_norm_is_named_with_the_fix(bad):
    with pytest.raises(ValueError, match=r"qk_norm=.*use 'layer'.*'rms'"):
        ATTENTIONS.config("full", qk_norm=bad)


# ------------------------------------------------------------------------------------------------ value residual


def _value_residual_pair(lam=0.5, learned=False):
    shared = {}
    cfg = ATTENTIONS.config("full", value_residual=ValueResidual.Config(lam=lam, learned=learned))
    layers = [
        ATTENTIONS.build(cfg, dim=16, heads=2, dim_head=None, causal=True, ctx=LayerContext(layer=i, stack=shared))
        for i in range(2)
    ]
    return layers


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_value_residual_mixes_the_first_layers_values(lam):
    torch.manual_seed(0)
    first, second = _value_residual_pair(lam)
    x0, x1 = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    out0 = first(x0)
    inner = 16
    v1 = (x0 @ first.to_qkv.weight[2 * inner :].T).view(2, 5, 2, 8).transpose(1, 2)
    plain = FullAttention(dim=16, heads=2, causal=True)
    plain.load_state_dict(first.state_dict())
    torch.testing.assert_close(out0, plain(x0), rtol=0, atol=0)  # the first layer only publishes its values
    # v_2 <- lam * v_1 + (1 - lam) * v_2 inside causal attention, written out
    b, n = 2, 5
    w = second.to_qkv.weight
    q, k, v = (x1 @ w[i * inner : (i + 1) * inner].T for i in range(3))
    q, k, v = (t.view(b, n, 2, 8).transpose(1, 2) for t in (q, k, v))
    v = lam * v1 + (1 - lam) * v
    logits = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -math.inf)
    expected = (torch.softmax(logits, -1) @ v).transpose(1, 2).reshape(b, n, inner) @ second.to_out.weight.T
    torch.testing.assert_close(second(x1), expected + second.to_out.bias, rtol=1e-5, atol=1e-5)


def test_value_residual_learned_lambda_trains_and_fixed_does_not():
    first, second = _value_residual_pair(0.5, learned=True)
    assert [n for n, _ in second.named_parameters() if "value_residual" in n] == ["value_residual.lam"]
    x = torch.randn(1, 4, 16)
    first(x)
    second(x).sum().backward()
    assert second.value_residual.lam.grad is not None and second.value_residual.lam.grad != 0
    fixed = _value_residual_pair(0.5)[1]
    assert not [n for n, _ in fixed.named_parameters() if "value_residual" in n]


@pytest.mark.parametrize("lam", [-0.1, 1.5, float("nan")])
def test_value_residual_lambda_outside_unit_interval_is_rejected(lam):
    with pytest.raises(ValueError, match=r"lam=.* is outside \[0, 1\]"):
        ValueResidual.Config(lam=lam)
    with pytest.raises(ValueError, match="outside"):
        ATTENTIONS.config("full", value_residual={"lam": lam})


def test_unknown_value_residual_value_is_named():
    with pytest.raises(ValueError, match="value_residual='yes'.*use None"):
        ATTENTIONS.config("full", value_residual="yes")
