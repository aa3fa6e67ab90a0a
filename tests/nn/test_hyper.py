"""Hyper-connection residual schemes ("hyper", "mhc") against the paper's formulas and invariants."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anydepth.nn.context import LayerContext
from anydepth.nn.residual.hyper import IDENTITY_LOGIT, HyperConnection, ManifoldHyperConnection, sinkhorn
from anydepth.registry import RESIDUALS, config_from_dict, config_to_dict

DIM = 16


def _ctx(i: int, n_layers: int) -> LayerContext:
    return LayerContext(layer=i // 2, n_layers=n_layers, sublayer=i % 2)


def _branches(n: int, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM)) for _ in range(n)]


def _build(kind: str, n_sub: int, **fields) -> list[nn.Module]:
    cfg = RESIDUALS.config(kind, **fields)
    return [RESIDUALS.build(cfg, dim=DIM, ctx=_ctx(i, n_sub // 2), norm="layer") for i in range(n_sub)]


def _run(residuals, branches, x):
    h = residuals[0].expand(x)
    for res, f in zip(residuals, branches):
        h = res(h, f)
    return residuals[0].reduce(h)


def _prenorm(branches, x):
    for f in branches:
        x = x + f(F.layer_norm(x, (DIM,)))
    return x


# -- the paper's init: equal to pre-LN ---------------------------------------------------------------
@pytest.mark.parametrize("streams", [1, 2, 4])
@pytest.mark.parametrize("dynamic", [True, False])
def test_hyper_equals_prenorm_at_init(streams, dynamic):
    branches = _branches(6)
    x = torch.randn(2, 5, DIM)
    ref = _prenorm(branches, x)
    mean = _run(_build("hyper", 6, streams=streams, dynamic=dynamic, reduce="mean"), branches, x)
    torch.testing.assert_close(mean, ref, atol=1e-5, rtol=1e-5)
    # the paper's sum reduce is n times the pre-LN residual: the final norm removes the factor
    total = _run(_build("hyper", 6, streams=streams, dynamic=dynamic), branches, x)
    torch.testing.assert_close(total, streams * ref, atol=1e-5 * streams, rtol=1e-5)
    torch.testing.assert_close(F.layer_norm(total, (DIM,)), F.layer_norm(ref, (DIM,)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("streams,fracs", [(1, 2), (2, 4), (4, 2)])
def test_frac_connections_equal_prenorm_at_init(streams, fracs):
    branches = _branches(4, seed=1)
    x = torch.randn(2, 3, DIM)
    out = _run(_build("hyper", 4, streams=streams, num_fracs=fracs, reduce="mean"), branches, x)
    torch.testing.assert_close(out, _prenorm(branches, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("identity_init", [False, True])
def test_mhc_equals_prenorm_at_init(identity_init):
    # identical streams: any doubly stochastic H_res keeps them; H_post = 2 sigmoid(0) = 1; the branch
    # input is sum(H_pre) * x, which LayerNorm maps to LN(x) up to its eps
    branches = _branches(6, seed=2)
    x = torch.randn(2, 5, DIM)
    out = _run(_build("mhc", 6, streams=4, identity_init=identity_init, reduce="mean"), branches, x)
    torch.testing.assert_close(out, _prenorm(branches, x), atol=1e-4, rtol=1e-4)


def test_init_matrices_follow_eq14():
    n = 4
    for k in range(6):
        hc = HyperConnection(HyperConnection.Config(streams=n), dim=DIM, layer_index=k)
        a = hc.static_alpha.detach()
        expected_am = torch.zeros(n)
        expected_am[k % n] = 1
        torch.testing.assert_close(a[:, 0], expected_am)
        torch.testing.assert_close(a[:, 1:], torch.eye(n))
        torch.testing.assert_close(hc.static_beta.detach(), torch.ones(n))
        assert hc.dynamic_alpha_scale.item() == pytest.approx(0.01)
        assert hc.dynamic_beta_scale.item() == pytest.approx(0.01)
        assert not hc.dynamic_alpha_fn.any() and not hc.dynamic_beta_fn.any()


# -- the formulas with trained-like weights ------------------------------------------------------------
def _perturb(module: nn.Module, scale: float = 0.3, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("tanh", [True, False])
def test_dynamic_hyper_connection_matches_paper_formula(tanh):
    n, d = 3, DIM
    hc = HyperConnection(HyperConnection.Config(streams=n, tanh=tanh), dim=d, layer_index=1)
    _perturb(hc)
    f = nn.Linear(d, d)
    h = torch.randn(2, 4, n, d)
    out = hc(h, f)

    act = torch.tanh if tanh else (lambda t: t)
    gamma = hc.norm.gamma.detach()
    expected = torch.empty_like(h)
    for b in range(2):
        for t in range(4):
            H = h[b, t]  # (n, d)
            hbar = H / H.norm(dim=-1, keepdim=True) * d**0.5 * (1 + gamma)
            A = hc.static_alpha + hc.dynamic_alpha_scale * act(hbar @ hc.dynamic_alpha_fn)  # (n, 1 + n)
            B = hc.static_beta + hc.dynamic_beta_scale * act(hbar @ hc.dynamic_beta_fn)  # (n,)
            h_in = A[:, 0] @ H
            y = f(h_in)  # no branch norm was given: identity
            for j in range(n):
                expected[b, t, j] = B[j] * y + (A[:, 1 + j, None] * H).sum(0)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_static_hyper_connection_parameter_count_and_formula():
    n = 4
    hc = HyperConnection(HyperConnection.Config(streams=n, dynamic=False), dim=DIM, layer_index=2)
    assert sum(p.numel() for p in hc.parameters()) == n * (n + 2)  # the paper's SHC count
    _perturb(hc)
    h = torch.randn(3, n, DIM)
    f = nn.Linear(DIM, DIM)
    A, B = hc.static_alpha.detach(), hc.static_beta.detach()
    y = f(torch.einsum("s,bsd->bd", A[:, 0], h))
    expected = B[None, :, None] * y[:, None, :] + torch.einsum("sj,bsd->bjd", A[:, 1:], h)
    torch.testing.assert_close(hc(h, f), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_dynamic_parameter_count_matches_paper(n):
    d = DIM
    hc = HyperConnection(HyperConnection.Config(streams=n), dim=d, layer_index=0)
    # |theta_norm| + d (n + 2) + n (n + 2) + 2  (paper, Sec. 4); no branch norm was given
    assert sum(p.numel() for p in hc.parameters()) == d + d * (n + 2) + n * (n + 2) + 2
    built = RESIDUALS.build(RESIDUALS.config("hyper", streams=n), dim=d, ctx=LayerContext(), norm="layer")
    extra = sum(p.numel() for p in built.parameters()) - sum(p.numel() for p in built.branch_norm.parameters())
    assert extra == d + d * (n + 2) + n * (n + 2) + 2


# -- Sinkhorn ------------------------------------------------------------------------------------------------
def test_sinkhorn_is_doubly_stochastic():
    torch.manual_seed(0)
    # generic logits (std 1): columns converge geometrically; 50 iterations reach float32 precision
    logits = torch.randn(256, 4, 4)
    for log_domain in (False, True):
        p = sinkhorn(logits, 50, log_domain=log_domain)
        assert (p >= 0).all()
        torch.testing.assert_close(p.sum(-1), torch.ones(256, 4), atol=1e-5, rtol=0)
        torch.testing.assert_close(p.sum(-2), torch.ones(256, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(sinkhorn(logits, 50), sinkhorn(logits, 50, log_domain=True), atol=1e-5, rtol=0)


def test_mhc_residual_mixing_is_doubly_stochastic_at_its_operating_point():
    # the module's own logits (static I plus scaled dynamic terms) with the default 20 iterations
    m = ManifoldHyperConnection(ManifoldHyperConnection.Config(streams=4), dim=DIM, layer_index=0)
    _perturb(m, scale=0.3, seed=4)
    h = torch.randn(8, 5, 4, DIM)
    alpha, _ = m._coefficients(m._split_fracs(h))
    h_res = alpha[..., :, 1:]
    torch.testing.assert_close(h_res.sum(-1), torch.ones(8, 5, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(h_res.sum(-2), torch.ones(8, 5, 4), atol=1e-5, rtol=0)


def test_sinkhorn_one_iteration_formula():
    logits = torch.randn(3, 3)
    p = logits.exp()
    p = p / p.sum(0, keepdim=True)
    p = p / p.sum(1, keepdim=True)
    torch.testing.assert_close(sinkhorn(logits, 1), p)


@pytest.mark.parametrize("log_domain", [False, True])
def test_sinkhorn_gradient_matches_finite_differences(log_domain):
    torch.manual_seed(0)
    logits = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: sinkhorn(x, 4, log_domain=log_domain), (logits,), eps=1e-6, atol=1e-6)


def test_mhc_identity_init_gives_identity_residual_mixing():
    n = 4
    m = ManifoldHyperConnection(ManifoldHyperConnection.Config(streams=n, identity_init=True), dim=DIM, layer_index=0)
    _, res = m.static_alpha[:, :1], m.static_alpha[:, 1:]
    h_res = sinkhorn(res, 20)
    torch.testing.assert_close(h_res, torch.eye(n), atol=2e-5, rtol=0)
    off = torch.exp(torch.tensor(-IDENTITY_LOGIT))
    assert h_res[0, 1].item() == pytest.approx((off / (1 + (n - 1) * off)).item(), rel=1e-3)
    default = ManifoldHyperConnection(ManifoldHyperConnection.Config(streams=n), dim=DIM, layer_index=0)
    assert sinkhorn(default.static_alpha[:, 1:], 20)[0, 0].item() == pytest.approx(0.4754, abs=1e-3)


def test_mhc_matches_constrained_formula():
    n, d = 3, DIM
    m = ManifoldHyperConnection(ManifoldHyperConnection.Config(streams=n), dim=d, layer_index=1)
    _perturb(m, seed=3)
    h = torch.randn(5, n, d)
    f = nn.Linear(d, d)
    out = m(h, f)
    gamma = m.norm.gamma.detach()
    expected = torch.empty_like(h)
    for b in range(5):
        H = h[b]
        hbar = H / H.norm(dim=-1, keepdim=True) * d**0.5 * (1 + gamma)
        proj = hbar @ m.dynamic_alpha_fn[0]
        pre = torch.sigmoid(m.static_alpha[:, 0] + m.pre_branch_scale * proj[:, 0])
        res_logits = m.static_alpha[:, 1:] + m.residual_scale * proj[:, 1:]
        p = res_logits.exp()
        for _ in range(20):
            p = p / p.sum(0, keepdim=True)
            p = p / p.sum(1, keepdim=True)
        post = 2 * torch.sigmoid(m.static_beta + m.h_post_scale * (hbar @ m.dynamic_beta_fn))
        y = f(pre @ H)
        expected[b] = post[:, None] * y + p.t() @ H
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# -- depth: bounded streams, and the failure mode of an all-ones mixing matrix ------------------------------
def _stream_growth(residuals, n_sub: int = 24) -> float:
    torch.manual_seed(5)
    branches = [nn.Linear(DIM, DIM) for _ in range(n_sub)]
    x = torch.randn(4, 8, DIM)
    h = residuals[0].expand(x)
    with torch.no_grad():
        for res, f in zip(residuals, branches):
            h = res(h, f)
    return (h.pow(2).mean().sqrt() / x.pow(2).mean().sqrt()).item()


def _all_ones_mixing(residuals):
    # x-transformers 2.31.10's multi-stream residual: H_res stuck at all ones (every stream gets the sum)
    with torch.no_grad():
        for r in residuals:
            r.static_alpha[:, 1:] = 1.0
    return residuals


@pytest.mark.parametrize("kind", ["hyper", "mhc"])
def test_stream_norm_stays_bounded_over_24_sublayers(kind):
    residuals = _build(kind, 24, streams=4)
    for i, r in enumerate(residuals):
        _perturb(r, scale=0.05, seed=i)  # away from the exact init, as after some training
    growth = _stream_growth(residuals)
    # 24 unit-scale branch outputs added to a unit-scale residual: sqrt(25) = 5 for independent updates
    assert growth < 15.0, growth
    # the same check flags the all-ones mixing, which multiplies the residual by about 4 per sublayer
    broken = _stream_growth(_all_ones_mixing(_build("hyper", 24, streams=4)))
    assert broken > 1e6, broken


def test_mhc_bounded_even_with_large_random_logits():
    residuals = _build("mhc", 24, streams=4)
    for i, r in enumerate(residuals):
        _perturb(r, scale=2.0, seed=i)
    assert _stream_growth(residuals) < 15.0


# -- gradients -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["hyper", "mhc"])
def test_gradient_reaches_residual_mixing_when_streams_differ(kind):
    res = _build(kind, 2, streams=4)[1]
    h = torch.randn(2, 3, 4, DIM)  # distinct streams
    res(h, nn.Linear(DIM, DIM)).pow(2).sum().backward()
    grad_res = res.static_alpha.grad[:, 1:]
    assert grad_res.abs().max() > 1e-3
    assert res.dynamic_alpha_fn.grad.abs().max() > 0


def test_mhc_identical_streams_give_no_static_residual_gradient():
    # Sinkhorn is invariant to per-column shifts and identical streams see only column sums: the
    # residual logits get no gradient until the streams differ (a known property, not a defect)
    res = _build("mhc", 2, streams=4)[1]
    h = res.expand(torch.randn(2, 3, DIM))
    res(h, nn.Linear(DIM, DIM)).pow(2).sum().backward()
    assert res.static_alpha.grad[:, 1:].abs().max() < 1e-5


# -- construction and configs ------------------------------------------------------------------------------
def test_registered_kinds_and_config_round_trip():
    assert "hyper" in RESIDUALS and "mhc" in RESIDUALS
    cfg = RESIDUALS.config("hyper", streams=2, num_fracs=2, tanh=False)
    assert config_from_dict(config_to_dict(cfg), RESIDUALS) == cfg
    res = RESIDUALS.build(cfg, dim=DIM, ctx=LayerContext(layer=3, sublayer=1), norm="layer")
    assert isinstance(res, HyperConnection) and res.streams == 2 and res.layer_index == 7
    assert res.placement == "pre" and res.additive is False
    mcfg = RESIDUALS.config("mhc", streams=2, sinkhorn_iters=5)
    assert config_from_dict(config_to_dict(mcfg), RESIDUALS) == mcfg


def test_same_torch_seed_same_model():
    def build():
        torch.manual_seed(0)
        return _build("hyper", 4, streams=4)

    a, b = build(), build()
    for ra, rb in zip(a, b):
        for (na, pa), (nb, pb) in zip(ra.state_dict().items(), rb.state_dict().items()):
            assert na == nb and torch.equal(pa, pb)
    # the stream feeding the branch at init is the sublayer index mod n
    assert [int(r.static_alpha[:, 0].argmax()) for r in a] == [0, 1, 2, 3]


def test_no_weight_decay_lists_static_scales_and_gains():
    res = _build("hyper", 1, streams=4)[0]
    names = {id(p): n for n, p in res.named_parameters()}
    got = {names[id(p)] for p in res.no_weight_decay()}
    assert got == {
        "static_alpha",
        "static_beta",
        "dynamic_alpha_scale",
        "dynamic_beta_scale",
        "norm.gamma",
        "branch_norm.weight",
        "branch_norm.bias",
    }
    mres = _build("mhc", 1, streams=4)[0]
    mnames = {id(p): n for n, p in mres.named_parameters()}
    assert {mnames[id(p)] for p in mres.no_weight_decay()} >= {
        "pre_branch_scale",
        "residual_scale",
        "h_post_scale",
    }


def test_dropout_hits_branch_only_by_default():
    torch.manual_seed(0)
    n = 4
    res = HyperConnection(HyperConnection.Config(streams=n, dynamic=False, dropout=0.5), dim=DIM, layer_index=0)
    res.train()
    h = torch.randn(64, n, DIM)
    out = res(h, lambda t: torch.ones_like(t))
    # A_r = I, B = 1: H' = H, so out = H + dropout(ones), one mask per token shared by every stream
    dropped = out == h
    assert 0.3 < dropped.float().mean() < 0.7
    assert all(torch.equal(dropped[:, 0], dropped[:, j]) for j in range(1, n))
    torch.testing.assert_close(out[~dropped], (h + 2.0)[~dropped])
    stream = HyperConnection(
        HyperConnection.Config(streams=n, dynamic=False, dropout=0.5, dropout_placement="stream"),
        dim=DIM,
        layer_index=0,
    )
    stream.train()
    out_s = stream(h, lambda t: torch.ones_like(t))
    assert (out_s == 0).float().mean() > 0.3  # whole stream entries zeroed (the original's placement)


# -- torch.compile -----------------------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self, i: int, kind: str):
        super().__init__()
        self.res_attn = RESIDUALS.build(kind, dim=DIM, ctx=LayerContext(layer=i, n_layers=2, sublayer=0))
        self.res_ff = RESIDUALS.build(kind, dim=DIM, ctx=LayerContext(layer=i, n_layers=2, sublayer=1))
        self.attn, self.ff = nn.Linear(DIM, DIM), nn.Sequential(nn.Linear(DIM, DIM), nn.GELU())

    def forward(self, x):
        x = self.res_attn(x, self.attn)
        return self.res_ff(x, self.ff)


class _Stack(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.blocks = nn.ModuleList(_Block(i, kind) for i in range(2))

    def forward(self, x):
        first = self.blocks[0].res_attn
        x = first.expand(x)
        for b in self.blocks:
            x = b(x)
        return first.reduce(x)


@pytest.mark.parametrize("kind", ["hyper", "mhc"])
def test_compiles_fullgraph_without_graph_breaks(kind):
    torch.manual_seed(0)
    stack = _Stack(kind)
    x = torch.randn(2, 3, DIM)
    # the eager backend still traces the whole forward with dynamo: fullgraph=True fails on any break
    compiled = torch.compile(stack, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), stack(x), atol=1e-5, rtol=1e-5)
    compiled(x).sum().backward()


# -- bad input -------------------------------------------------------------------------------------------
def test_bad_arguments_raise_with_the_fix():
    with pytest.raises(ValueError, match="streams"):
        HyperConnection(HyperConnection.Config(streams=0), dim=DIM, layer_index=0)
    with pytest.raises(ValueError, match="num_fracs=3 does not divide dim=16"):
        HyperConnection(HyperConnection.Config(streams=2, num_fracs=3), dim=DIM, layer_index=0)
    with pytest.raises(ValueError, match="layer_index"):
        HyperConnection(HyperConnection.Config(streams=2), dim=DIM, layer_index=-1)
    with pytest.raises(ValueError, match="dropout_placement"):
        HyperConnection(HyperConnection.Config(streams=2, dropout_placement="everywhere"), dim=DIM, layer_index=0)
    with pytest.raises(ValueError, match="reduce"):
        HyperConnection(HyperConnection.Config(streams=2, reduce="max"), dim=DIM, layer_index=0)
    with pytest.raises(ValueError, match="sinkhorn_iters"):
        ManifoldHyperConnection(ManifoldHyperConnection.Config(streams=2, sinkhorn_iters=0), dim=DIM, layer_index=0)
    with pytest.raises(ValueError, match="square"):
        sinkhorn(torch.randn(3, 4))
    hc = HyperConnection(HyperConnection.Config(streams=4), dim=DIM, layer_index=0)
    with pytest.raises(ValueError, match="dim=16"):
        hc.expand(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="call expand"):
        hc(torch.randn(2, 3, DIM), nn.Identity())
    with pytest.raises(ValueError, match="branch output"):
        hc(hc.expand(torch.randn(2, 3, DIM)), lambda t: t[..., :8])


# -- the hand-written backward passes against autograd of the plain formulas -------------------------------
def test_norm_projection_matches_autograd_of_the_normalize_formula():
    from anydepth.nn.residual.hyper import StreamNorm

    torch.manual_seed(0)
    norm = StreamNorm(DIM)
    with torch.no_grad():
        norm.gamma.normal_(0, 0.3)
    x = torch.randn(3, 4, DIM, dtype=torch.float64)
    x[0, 1] = 0.0  # a zero row: F.normalize clamps the norm at 1e-12
    w = torch.randn(DIM, 6, dtype=torch.float64)
    gp = torch.randn(3, 4, 6, dtype=torch.float64)
    norm = norm.double()
    args = [t.clone().requires_grad_() for t in (x, w)]
    ref = (F.normalize(args[0], dim=-1) * DIM**0.5 * (norm.gamma + 1)) @ args[1]
    ref_grads = torch.autograd.grad(ref, [*args, norm.gamma], gp)
    args2 = [t.clone().requires_grad_() for t in (x, w)]
    out = norm.project(*args2)
    grads = torch.autograd.grad(out, [*args2, norm.gamma], gp)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_depth_connection_backward_matches_autograd_of_the_broadcast_formula():
    from anydepth.nn.residual.hyper import _DepthConnection

    torch.manual_seed(0)
    mixed, beta, y = (torch.randn(*s, dtype=torch.float64) for s in ((5, 4, 8), (5, 4), (5, 8)))
    g = torch.randn(5, 4, 8, dtype=torch.float64)
    a = [t.clone().requires_grad_() for t in (mixed, beta, y)]
    ref = a[0] + a[1][..., None] * a[2][:, None, :]
    b = [t.clone().requires_grad_() for t in (mixed, beta, y)]
    out = _DepthConnection.apply(*b)
    torch.testing.assert_close(out, ref)
    for x1, x2 in zip(torch.autograd.grad(out, b, g), torch.autograd.grad(ref, a, g)):
        torch.testing.assert_close(x1, x2)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("name", ["static_alpha", "dynamic_alpha_fn", "gamma"])
def test_parametrized_parameter_gives_the_formula_and_its_gradient(name, fused):
    # torch.nn.utils.parametrize takes the parameter out of _parameters and computes it on access:
    # the connection must read it there, and the gradient reach the parametrization's original
    import copy

    from torch.nn.utils import parametrize

    from anydepth.nn.residual import hyper_fused

    class Double(nn.Module):
        def forward(self, t):
            return 2 * t

    hc = HyperConnection(HyperConnection.Config(streams=4), dim=DIM, layer_index=1, norm=nn.LayerNorm(DIM))
    _perturb(hc, scale=0.1)
    ref = copy.deepcopy(hc)
    owner, ref_owner = (hc.norm, ref.norm) if name == "gamma" else (hc, ref)
    with torch.no_grad():
        getattr(ref_owner, name).mul_(2)
    parametrize.register_parametrization(owner, name, Double())
    f = nn.Linear(DIM, DIM)
    h = torch.randn(2, 8, 4, DIM)
    with hyper_fused.use_fused_hyper(fused):
        if fused and hyper_fused._KERNEL.available():
            assert hc._fused_args(h) is not None  # the kernels run
        out, expected = hc(h, f), ref(h, f)
        out.square().sum().backward()
        expected.square().sum().backward()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    original = getattr(owner.parametrizations, name).original
    torch.testing.assert_close(original.grad, 2 * getattr(ref_owner, name).grad, atol=1e-5, rtol=1e-4)
