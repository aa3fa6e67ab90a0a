"""Admin's output-change measurement against the closed form for a linear map."""

import pytest
import torch
from torch import nn

from anydepth.study.output_change import output_change


class Linear(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d_out, d_in))

    def forward(self, x):
        return x @ self.w.T


def test_linear_map_matches_sigma2_dout_norm2():
    # F(x) = W x, delta iid N(0, s^2): E ||delta x||^2 = s^2 * d_out * ||x||^2 (averaged over rows of x).
    torch.manual_seed(0)
    m = Linear(16, 64)
    x = torch.randn(4, 16)
    expected = 1e-3**2 * 64 * x.pow(2).sum(-1).mean().item()
    got = output_change(m, x, sigma=1e-3, draws=200, seed=0, perturb=lambda n, p: True)
    # 200 draws x 64 outputs: relative standard error about sqrt(2 / 12800) = 1.3%; 6% is 4.7 sigma.
    assert got == pytest.approx(expected, rel=0.06)


def test_quadratic_in_sigma_and_weights_restored():
    torch.manual_seed(0)
    m = Linear(8, 8).double()  # float64: the 4x relation is exact up to rounding of W + delta
    x = torch.randn(3, 8, dtype=torch.float64)
    a = output_change(m, x, sigma=1e-3, draws=3, seed=5, perturb=lambda n, p: True)
    b = output_change(m, x, sigma=2e-3, draws=3, seed=5, perturb=lambda n, p: True)
    assert b == pytest.approx(4 * a, rel=1e-9)  # same noise draws, linear map: exactly 4x
    m32 = Linear(8, 8)
    before = m32.w.detach().clone()
    output_change(m32, x.float(), draws=3, perturb=lambda n, p: True)
    assert torch.equal(m32.w, before)  # bit-exact restore


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok_emb = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4, bias=False)

    def forward(self, tokens):
        return self.proj(self.tok_emb(tokens))


def test_embeddings_are_not_perturbed_by_default():
    torch.manual_seed(0)
    m = TinyLM()
    tokens = torch.arange(6).view(2, 3)
    # Only proj is perturbed: the change is ||delta e||^2 with e the (fixed) embedding rows.
    default = output_change(m, tokens, seed=3, draws=2)
    only_proj = output_change(m, tokens, seed=3, draws=2, perturb=lambda n, p: n == "proj.weight")
    assert default == only_proj > 0
    m.proj = nn.Identity()  # only the embedding is left, and it is never perturbed by default
    with pytest.raises(ValueError, match="no parameter was selected"):
        output_change(m, tokens)


def test_bad_input_names_the_argument():
    m = TinyLM()
    tokens = torch.arange(6).view(2, 3)
    with pytest.raises(ValueError, match="sigma must be positive.*-1"):
        output_change(m, tokens, sigma=-1)
    with pytest.raises(ValueError, match="draws must be a positive integer.*0"):
        output_change(m, tokens, draws=0)


@pytest.mark.parametrize("scheme", ["postln", "admin", "preln"])
def test_linear_chain_matches_admins_theorem(scheme):
    """The exact construction: linear branches with LayerNorm, where Theorem 2's first-order closed form
    holds (N sigma^2 / 2 for post-LN, sigma^2 (H_{N+1} - 1) for pre-LN and profiled Admin)."""
    from anydepth.study.output_change import linear_chain_change, theory_linear_chain

    for depth in (4, 32):
        got = linear_chain_change(scheme, depth, width=256, batch=64, sigma=0.05, draws=8)
        # 8 draws x 64 rows x 256 features; higher-order terms and the LN projection add about 5%
        assert got == pytest.approx(theory_linear_chain(scheme, depth, 0.05), rel=0.15)


def test_linear_chain_separates_linear_from_logarithmic_growth():
    from anydepth.study.output_change import linear_chain_change

    post = linear_chain_change("postln", 32, width=128, draws=4) / linear_chain_change("postln", 4, width=128, draws=4)
    admin = linear_chain_change("admin", 32, width=128, draws=4) / linear_chain_change("admin", 4, width=128, draws=4)
    assert post == pytest.approx(8, rel=0.2)  # O(N): 8x the layers, 8x the change
    # O(log N): (H_33 - 1) / (H_5 - 1) = 2.09
    assert admin == pytest.approx(sum(1 / (i + 1) for i in range(1, 33)) / sum(1 / (i + 1) for i in range(1, 5)),
                                  rel=0.2)


def test_relative_change_of_the_final_hidden_state_on_model_s():
    from anydepth.study.output_change import measure

    out = measure((1, 2), schemes=("postln",), draws=1, batch_size=2, seq_len=8)
    assert set(out) == {"postln", "chain-postln", "chain-admin", "chain-preln"}
    # relative to a hidden state of unit scale: a 5% weight perturbation of one or two blocks moves it little
    assert all(0 < v < 0.1 for v in out["postln"].values())
