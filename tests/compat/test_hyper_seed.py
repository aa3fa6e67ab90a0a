"""The ``hyper_connections`` seed API: README examples, parity with the original 0.4.11, bad input."""

from __future__ import annotations

import hyper_connections as orig
import pytest
import torch
from hyper_connections import manifold_constrained_hyper_connections as orig_mc
from torch import nn

import anydepth
import anydepth.compat.hyper_connections as ours
from anydepth.compat.hyper_connections.hyper_connections import decorate_branch


def _perturb(module: nn.Module, scale: float = 0.3, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


# -- the seed README, imports changed -------------------------------------------------------------
def test_readme_wrapped_branch_example():
    torch.manual_seed(0)
    # a single branch layer

    branch = nn.Linear(512, 512)

    # before

    residual = torch.randn(2, 1024, 512)

    residual = branch(residual) + residual

    # after, say 4 streams in paper

    from anydepth.compat.hyper_connections import get_init_and_expand_reduce_stream_functions

    init_hyper_conn, expand_stream, reduce_stream = get_init_and_expand_reduce_stream_functions(4)

    # 1. wrap your branch function

    hyper_conn_branch = init_hyper_conn(dim=512, branch=branch)

    # 2. expand to 4 streams, this must be done before your trunk,
    # typically a for-loop with many branch functions

    residual = expand_stream(residual)

    # 3. forward your residual as usual into the wrapped branch function(s)

    residual = hyper_conn_branch(residual)

    # 4. reduce 4 streams with a summation, this has to be done after your for-loop trunk.

    residual = reduce_stream(residual)

    assert residual.shape == (2, 1024, 512)
    assert torch.isfinite(residual).all()


def test_readme_manual_example_and_decorate_branch():
    torch.manual_seed(0)
    branch = nn.Linear(512, 512)
    residual = torch.randn(2, 1024, 512)
    residual = branch(residual) + residual
    start = residual

    from anydepth.compat.hyper_connections import get_init_and_expand_reduce_stream_functions

    init_hyper_conn, expand_stream, reduce_stream = get_init_and_expand_reduce_stream_functions(4)

    # 1. instantiate hyper connection with correct number of streams (4 in this case)

    hyper_conn = init_hyper_conn(dim=512)

    # 2. expand to 4 streams

    residual = expand_stream(residual)

    # 3. forward your residual into hyper connection for the branch input + add residual function

    branch_input, add_residual = hyper_conn(residual)

    branch_output = branch(branch_input)

    residual = add_residual(branch_output)

    # or you can do it in one line as so -> residual = hyper_conn.decorate_branch(branch)(residual)

    # 4. reduce 4 streams with a summation, this has to be done after your for loop trunk

    residual = reduce_stream(residual)

    one_line = reduce_stream(hyper_conn.decorate_branch(branch)(expand_stream(start)))
    torch.testing.assert_close(one_line, residual)
    # at init: 4 copies of x + f(x) (eq. 14 init, no norm in this branch)
    torch.testing.assert_close(residual, 4 * (start + branch(start)), atol=1e-4, rtol=1e-5)


def test_readme_disable_gives_plain_residual_exactly():
    from anydepth.compat.hyper_connections import get_init_and_expand_reduce_stream_functions

    init_hyper_conn, expand_stream, reduce_stream = get_init_and_expand_reduce_stream_functions(
        4, disable=True
    )
    branch = nn.Linear(32, 32)
    x = torch.randn(2, 7, 32)
    out = reduce_stream(init_hyper_conn(dim=32, branch=branch)(expand_stream(x)))
    assert torch.equal(out, branch(x) + x)
    # one stream, one fraction: disabled by default, also exactly x + f(x)
    init1, expand1, reduce1 = get_init_and_expand_reduce_stream_functions(1)
    assert torch.equal(reduce1(init1(dim=32, branch=branch)(expand1(x))), x + branch(x))


def test_seed_names_live_under_compat_and_the_top_level_is_unambiguous():
    # the package root has the original's names; the top level keeps only the library's own classes
    assert ours.mHC is ours.ManifoldConstrainedHyperConnections
    assert ours.HyperConnections.get_init_and_expand_reduce_stream_functions is not None
    assert anydepth.Residual is anydepth.nn.residual.Residual  # the base class of the residual schemes
    assert anydepth.HyperConnection is anydepth.nn.residual.hyper.HyperConnection
    for name in (
        "HyperConnections",
        "mHC",
        "decorate_branch",
        "StreamEmbed",
        "AttentionPoolReduceStream",
        "get_expand_reduce_stream_functions",
        "get_init_and_expand_reduce_stream_functions",
        "mc_get_expand_reduce_stream_functions",
        "mc_get_init_and_expand_reduce_stream_functions",
        "admin",
    ):
        assert not hasattr(anydepth, name), name
        assert name == "admin" or hasattr(ours, name) or name == "decorate_branch"
    assert callable(decorate_branch)


# -- parity with hyper_connections 0.4.11 (same weights) -------------------------------------------------
def _compare(o, u, x, views=1):
    assert u.load_state_dict(o.state_dict()) is not None
    bo, ao = o(x)
    bu, au = u(x)
    torch.testing.assert_close(bu, bo, atol=1e-5, rtol=1e-5)
    y = torch.randn(bo.shape[1:] if views > 1 else bo.shape)
    torch.testing.assert_close(au(y), ao(y), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tanh", [True, False])
@pytest.mark.parametrize("views", [1, 2])
def test_dynamic_hyper_connections_match_original(tanh, views):
    torch.manual_seed(0)
    o = orig.HyperConnections(4, dim=16, layer_index=1, tanh=tanh, num_input_views=views)
    _perturb(o)
    u = ours.HyperConnections(4, dim=16, layer_index=3, tanh=tanh, num_input_views=views)
    _compare(o, u, torch.randn(8, 5, 16), views)


def test_static_hyper_connections_match_original():
    # static = dynamic projections at zero; only the static matrices trained away from eq. 14
    torch.manual_seed(1)
    o = orig.HyperConnections(3, dim=16, layer_index=2)
    with torch.no_grad():
        o.static_alpha.add_(0.5 * torch.randn_like(o.static_alpha))
        o.static_beta.add_(0.5 * torch.randn_like(o.static_beta))
    _compare(o, ours.HyperConnections(3, dim=16, layer_index=0), torch.randn(6, 4, 16))


def test_wrapped_branch_gradients_match_original():
    torch.manual_seed(2)
    branch = nn.Sequential(nn.Linear(16, 16), nn.GELU())
    o = orig.HyperConnections(2, dim=16, branch=branch, layer_index=0)
    _perturb(o)
    u = ours.HyperConnections(2, dim=16, branch=nn.Sequential(nn.Linear(16, 16), nn.GELU()), layer_index=0)
    u.load_state_dict(o.state_dict())
    x = torch.randn(4, 3, 16, requires_grad=True)
    names = [n for n, _ in o.named_parameters()]
    params_u = dict(u.named_parameters())
    assert sorted(names) == sorted(params_u)
    go = torch.autograd.grad(o(x).pow(2).sum(), [x, *o.parameters()])
    gu = torch.autograd.grad(u(x).pow(2).sum(), [x, *(params_u[n] for n in names)])
    for a, b in zip(go, gu):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_no_depth_connection_and_custom_depth_fn_match_original():
    torch.manual_seed(3)
    o = orig.HyperConnections(2, dim=16, layer_index=0, add_branch_out_to_residual=False)
    _perturb(o)
    _compare(
        o,
        ours.HyperConnections(2, dim=16, layer_index=0, add_branch_out_to_residual=False),
        torch.randn(4, 16),
    )

    def gated(out, res):
        return res + 0.5 * out

    o = orig.HyperConnections(2, dim=16, layer_index=1, depth_residual_fn=gated)
    _perturb(o)
    _compare(
        o, ours.HyperConnections(2, dim=16, layer_index=1, depth_residual_fn=gated), torch.randn(4, 3, 16)
    )


@pytest.mark.parametrize("log_domain", [False, True])
def test_mhc_matches_original(log_domain):
    torch.manual_seed(4)
    o = orig_mc.ManifoldConstrainedHyperConnections(4, dim=16, layer_index=1, log_domain_sinkhorn=log_domain)
    _perturb(o)
    u = ours.ManifoldConstrainedHyperConnections(4, dim=16, layer_index=0, log_domain_sinkhorn=log_domain)
    _compare(o, u, torch.randn(8, 5, 16))


def test_mhc_proposals_match_original():
    torch.manual_seed(5)
    o = orig_mc.ManifoldConstrainedHyperConnections(2, dim=16, layer_index=0, num_dynamic_alpha_proposals=3)
    _perturb(o)
    u = ours.ManifoldConstrainedHyperConnections(2, dim=16, layer_index=0, num_dynamic_alpha_proposals=3)
    _compare(o, u, torch.randn(4, 3, 16))


def test_expand_reduce_stream_embed_and_attention_pool_match_original():
    torch.manual_seed(6)
    x = torch.randn(3, 5, 16)
    oe, orr = orig.get_expand_reduce_stream_functions(4, add_stream_embed=True, dim=16)
    ue, ur = ours.get_expand_reduce_stream_functions(4, add_stream_embed=True, dim=16)
    _perturb(oe)
    ue.load_state_dict(oe.state_dict())
    torch.testing.assert_close(ue(x), oe(x))
    torch.testing.assert_close(ur(oe(x)), orr(oe(x)))
    pool_o, pool_u = orig.AttentionPoolReduceStream(4, 16), ours.AttentionPoolReduceStream(4, 16)
    _perturb(pool_o, scale=0.1)
    pool_u.load_state_dict(pool_o.state_dict())
    h = torch.randn(12, 5, 16)
    torch.testing.assert_close(pool_u(h), pool_o(h), atol=1e-6, rtol=1e-5)
    # channel-first pooling: the same numbers with features on dim 1
    pool_cf = ours.AttentionPoolReduceStream(4, 16, channel_first=True)
    pool_cf.load_state_dict(pool_o.state_dict())
    torch.testing.assert_close(pool_cf(h.transpose(1, 2)), pool_o(h).transpose(1, 2), atol=1e-6, rtol=1e-5)


# -- layouts the original gets wrong or rejects ------------------------------------------------------------
@pytest.mark.parametrize("klass", [ours.HyperConnections, ours.ManifoldConstrainedHyperConnections])
def test_channel_first_equals_channel_last_on_permuted_input(klass):
    torch.manual_seed(7)
    last = klass(2, dim=8, layer_index=1)
    _perturb(last)
    first = klass(2, dim=8, layer_index=1, channel_first=True)
    first.load_state_dict(last.state_dict())
    x = torch.randn(4, 8, 3, 5)  # (b s) d h w
    conv = nn.Conv2d(8, 8, 1)
    b_first, add_first = first(x)
    b_last, add_last = last(x.permute(0, 2, 3, 1))
    torch.testing.assert_close(b_first, b_last.permute(0, 3, 1, 2))
    out_first = add_first(conv(b_first))
    out_last = add_last(conv(b_last.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
    torch.testing.assert_close(out_first, out_last.permute(0, 3, 1, 2), atol=1e-5, rtol=1e-5)


def test_mhc_views_fracs_channel_first_run_where_the_original_raises():
    x = torch.randn(4, 3, 16)
    with pytest.raises(RuntimeError):
        orig_mc.ManifoldConstrainedHyperConnections(2, dim=16, layer_index=0, num_input_views=2)(x)
    m = ours.mHC(2, dim=16, layer_index=0, num_input_views=2)
    branch_in, add = m(x)
    assert branch_in.shape == (2, 2, 3, 16)  # views first, as in the original's HyperConnections
    assert add(branch_in[0]).shape == x.shape

    m = ours.mHC(2, dim=16, layer_index=0, num_fracs=4)
    h_res = m._coefficients(m._split_fracs(torch.randn(2, 3, 2, 16)))[0]
    # 4 fractions x 2 streams: an 8 x 8 doubly stochastic block in every row-block
    res = h_res.unflatten(-1, (4, 3))[..., 1:].flatten(-2)
    torch.testing.assert_close(res.sum(-1), torch.ones(2, 3, 8), atol=1e-5, rtol=0)
    torch.testing.assert_close(res.sum(-2), torch.ones(2, 3, 8), atol=1e-5, rtol=0)
    assert m(x)[0].shape == (2, 3, 16)

    orig_cf = orig_mc.ManifoldConstrainedHyperConnections(2, dim=8, layer_index=0, channel_first=True)
    branch_in, add = orig_cf(torch.randn(4, 8, 3, 3))
    with pytest.raises(RuntimeError):
        add(branch_in)
    cf = ours.mHC(2, dim=8, layer_index=0, channel_first=True, branch=nn.Conv2d(8, 8, 3, padding=1))
    assert cf(torch.randn(4, 8, 3, 3)).shape == (4, 8, 3, 3)


def test_fracs_at_init_equal_plain_residual_unlike_original():
    torch.manual_seed(8)
    x = torch.randn(2, 3, 16)
    branch = nn.Linear(16, 16)
    u = ours.HyperConnections(1, dim=16, layer_index=0, num_fracs=2, branch=branch)
    torch.testing.assert_close(u(x), x + branch(x), atol=1e-6, rtol=1e-6)
    o = orig.HyperConnections(1, dim=16, layer_index=0, num_fracs=2, branch=branch)
    assert not torch.allclose(
        o(x), x + branch(x), atol=1e-3
    )  # fraction 0 duplicated, output fractions summed
    u.load_state_dict(o.state_dict())  # same parameter shapes


def test_pytree_branch_output_passes_extra_leaves():
    hc = ours.HyperConnections(2, dim=8, layer_index=0)
    x = torch.randn(4, 3, 8)
    branch_in, add = hc(x)
    aux = torch.arange(3)
    new, (aux_out,) = add((branch_in * 2, (aux,)))
    assert aux_out is aux and new.shape == x.shape


def test_layer_index_none_follows_torch_seed():
    picks = []
    for _ in range(2):
        torch.manual_seed(123)
        picks.append([int(ours.HyperConnections(4, dim=8).static_alpha[:, 0].argmax()) for _ in range(6)])
    assert picks[0] == picks[1]


def test_dropout_placement_defaults_to_branch():
    torch.manual_seed(9)
    hc = ours.HyperConnections(2, dim=8, layer_index=0, dropout=0.5)
    hc.train()
    x = torch.randn(64, 8)
    _, add = hc(x)
    out = add(torch.zeros(32, 8))  # nothing to drop in the branch: the streams pass untouched
    torch.testing.assert_close(out, x)
    original_placement = ours.HyperConnections(
        2, dim=8, layer_index=0, dropout=0.5, dropout_placement="stream"
    )
    original_placement.train()
    _, add = original_placement(x)
    assert (add(torch.zeros(32, 8)) == 0).float().mean() > 0.3


# -- bad input ------------------------------------------------------------------------------------------
def test_bad_input_raises_value_error_naming_the_argument():
    with pytest.raises(ValueError, match="num_streams"):
        ours.get_init_and_expand_reduce_stream_functions(0)
    with pytest.raises(ValueError, match="num_residual_streams|num_streams"):
        ours.HyperConnections(0, dim=8)
    with pytest.raises(ValueError, match="num_fracs=3 does not divide dim=8"):
        ours.HyperConnections(2, dim=8, num_fracs=3)
    hc = ours.HyperConnections(4, dim=8, layer_index=0)
    with pytest.raises(ValueError, match="multiple of num_residual_streams=4.*expand_stream"):
        hc(torch.randn(6, 3, 8))
    with pytest.raises(ValueError, match="dim=8"):
        hc(torch.randn(8, 3, 16))
    with pytest.raises(ValueError, match="add_stream_embed=True needs dim"):
        ours.get_expand_reduce_stream_functions(4, add_stream_embed=True)
    with pytest.raises(ValueError, match="multiple of num_streams=4"):
        ours.get_expand_reduce_stream_functions(4)[1](torch.randn(6, 8))
    with pytest.raises(ValueError, match="already wraps a branch"):
        ours.HyperConnections(2, dim=8, layer_index=0, branch=nn.Identity()).decorate_branch(nn.Identity())


def test_seed_api_stack_compiles_fullgraph():
    torch.manual_seed(10)
    init, expand, reduce = ours.get_init_and_expand_reduce_stream_functions(4, dim=16)
    layers = nn.ModuleList(init(branch=nn.Linear(16, 16), layer_index=i) for i in range(3))
    manual = init(layer_index=3)
    branch = nn.Linear(16, 16)

    def trunk(x):
        x = expand(x)
        for layer in layers:
            x = layer(x)
        branch_input, add_residual = manual(x)  # the closure-returning convention
        return reduce(add_residual(branch(branch_input)))

    x = torch.randn(2, 3, 16)
    compiled = torch.compile(trunk, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), trunk(x))
