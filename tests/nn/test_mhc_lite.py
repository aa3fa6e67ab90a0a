"""mHC-lite (``mhc_lite``): an exactly doubly stochastic mixing matrix, the permutation formula, its bounds."""

import itertools
import math

import pytest
import torch

from anydepth.nn.context import LayerContext
from anydepth.nn.residual.mhc_lite import LiteManifoldHyperConnection
from anydepth.registry import RESIDUALS


def _randomise(module, std=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if p.dim() == 1 and p.shape[0] > 1 else 0.0))


@pytest.mark.parametrize("streams", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mhc_lite_mixing_matrix_is_exactly_doubly_stochastic(streams, seed):
    res = RESIDUALS.build(RESIDUALS.config("mhc_lite", streams=streams), dim=8, ctx=LayerContext(layer=1))
    _randomise(res, std=5.0, seed=seed)  # any parameters, far from init
    h = torch.randn(2, 7, streams, 8) * 10
    m = res.residual_matrix(h)
    assert m.shape == (2, 7, streams, streams) and (m >= 0).all()
    one = torch.ones(())
    torch.testing.assert_close(m.sum(-1), one.expand(2, 7, streams), rtol=0, atol=2e-6)
    torch.testing.assert_close(m.sum(-2), one.expand(2, 7, streams), rtol=0, atol=2e-6)


def test_mhc_lite_matrix_is_the_softmax_weighted_sum_of_permutations():
    n, d = 3, 8
    res = LiteManifoldHyperConnection(LiteManifoldHyperConnection.Config(streams=n), dim=d, layer_index=0)
    _randomise(res, std=1.0, seed=5)
    h = torch.randn(4, n, d)
    # Hbar_s = h_s / ||h_s|| * sqrt(d) * (1 + gamma); logits = b_res + s_res * sum_s Hbar_s W_res[s]
    hbar = h / h.norm(dim=-1, keepdim=True) * math.sqrt(d) * (1 + res.norm.gamma)
    logits = res.static_perm + res.residual_scale * torch.einsum("bsd,sdk->bk", hbar, res.dynamic_perm_fn)
    a = torch.softmax(logits, -1)
    perms = list(itertools.permutations(range(n)))
    expected = torch.zeros(4, n, n)
    for k, sigma in enumerate(perms):
        p = torch.zeros(n, n)
        p[range(n), list(sigma)] = 1
        expected += a[:, k, None, None] * p
    torch.testing.assert_close(res.residual_matrix(h), expected, rtol=1e-5, atol=1e-6)
    # H_pre[s] = sigmoid(b_pre[s] + s_pre Hbar_s . w_pre); H_post[s] = 2 sigmoid(b_post[s] + s_post Hbar_s . w_post)
    alpha, beta = res._coefficients(h.unsqueeze(-3))
    pre = torch.sigmoid(res.static_pre + res.pre_branch_scale * hbar @ res.dynamic_pre_fn)
    post = 2 * torch.sigmoid(res.static_beta + res.h_post_scale * hbar @ res.dynamic_beta_fn)
    torch.testing.assert_close(alpha[..., 0], pre, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(beta.squeeze(-2), post, rtol=1e-5, atol=1e-6)


def test_mhc_lite_stream_count_is_bounded():
    with pytest.raises(ValueError, match=r"streams=7 must be an int in \[1, 6\].*residual='mhc'"):
        LiteManifoldHyperConnection(LiteManifoldHyperConnection.Config(streams=7), dim=8, layer_index=0)
