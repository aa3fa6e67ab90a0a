"""Peri-LN (``periln``) and LayerNorm Scaling (``layer_scaling`` on ``prenorm``/``periln``) against their formulas."""

import math

import pytest
import torch

from anydepth.nn.context import LayerContext
from anydepth.registry import RESIDUALS


def _randomise(module, std=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if p.dim() == 1 and p.shape[0] > 1 else 0.0))


def _branch(x):
    return torch.sin(3 * x) * 5 + 1


def test_periln_is_x_plus_ln_out_of_f_of_ln_in():
    res = RESIDUALS.build("periln", dim=8, ctx=LayerContext(), norm="layer")
    _randomise(res, seed=3)
    x = torch.randn(3, 8)

    def ln(t, norm):
        return (t - t.mean(-1, keepdim=True)) / torch.sqrt(
            t.var(-1, unbiased=False, keepdim=True) + 1e-5
        ) * norm.weight + norm.bias

    torch.testing.assert_close(res(x, _branch), x + ln(_branch(ln(x, res.norm)), res.norm_out), rtol=1e-5, atol=1e-5)
    assert res.additive and res.delta(x, _branch).shape == x.shape


@pytest.mark.parametrize("kind", ["prenorm", "periln"])
@pytest.mark.parametrize("layer", [0, 3, 15])
def test_layer_scaling_scales_the_norm_output_by_one_over_sqrt_l(kind, layer):
    cfg = RESIDUALS.config(kind, layer_scaling=True)
    res = RESIDUALS.build(cfg, dim=8, ctx=LayerContext(layer=layer, n_layers=16), norm="layer")
    plain = RESIDUALS.build(kind, dim=8, ctx=LayerContext(layer=layer, n_layers=16), norm="layer")
    plain.load_state_dict(res.state_dict())
    x = torch.randn(3, 8)
    seen = []
    res(x, lambda h: seen.append(h) or h)
    plain(x, lambda h: seen.append(h) or h)
    torch.testing.assert_close(seen[0], seen[1] / math.sqrt(layer + 1))


def test_layer_scaling_must_be_a_bool():
    with pytest.raises((TypeError, ValueError), match="layer_scaling must be True or False"):
        RESIDUALS.build(RESIDUALS.config("prenorm", layer_scaling="yes"), dim=8)
