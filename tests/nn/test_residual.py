"""Residual schemes against formulas written out here, their invariants, and their bad-input errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from anydepth.nn.context import LayerContext
from anydepth.nn.residual import (
    Admin,
    DeepNorm,
    LayerScale,
    PostNorm,
    PreNorm,
    ReZero,
    admin_omega,
    admin_profile_,
    deepnorm_constants,
)
from anydepth.registry import NORMS, RESIDUALS, config_from_dict, config_to_dict

DIM = 8
KINDS = ["prenorm", "postnorm", "rezero", "admin", "deepnorm", "layerscale"]


@pytest.fixture(autouse=True)
def _one_thread():
    # The tensors here are tiny; intra-op threads only spin against other processes on a shared CPU.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def ln(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm with unit gain and zero bias (the norm's state at init)."""
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps)


def linear_branch(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(DIM, DIM).double()


def build(kind: str, ctx: LayerContext | None = None, **fields):
    cfg = RESIDUALS.config(kind, **fields)
    return RESIDUALS.build(cfg, dim=DIM, ctx=ctx or LayerContext(n_layers=6), norm="layer").double()


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 5, DIM, dtype=torch.float64)


# --------------------------------------------------------------------------------------------------
# each scheme against its formula


def test_prenorm_formula(x):
    f = linear_branch()
    torch.testing.assert_close(build("prenorm")(x, f), x + f(ln(x)), rtol=0, atol=1e-12)


def test_postnorm_formula(x):
    f = linear_branch()
    torch.testing.assert_close(build("postnorm")(x, f), ln(x + f(x)), rtol=0, atol=1e-12)


def test_rezero_formula(x):
    f = linear_branch()
    res = build("rezero")
    with torch.no_grad():
        res.a.fill_(0.3)
    torch.testing.assert_close(res(x, f), x + 0.3 * f(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale", ["O(logn)", "O(1)", "O(n)"])
def test_admin_formula(x, scale):
    ctx = LayerContext(n_layers=6, n_sublayers=2)
    n = 12  # 6 blocks x 2 residual sublayers
    w = {"O(logn)": math.sqrt((n + 1) / math.log(n + 1) - 1), "O(1)": math.sqrt(n), "O(n)": 1.0}[scale]
    w = torch.tensor(w, dtype=torch.float32).item()  # w is stored in the dtype the module was built in
    f = linear_branch()
    res = build("admin", ctx, output_change_scale=scale)
    torch.testing.assert_close(res(x, f), ln(w * x + f(x)), rtol=0, atol=1e-12)


def test_admin_counts_cross_attention_sublayers():
    ctx = LayerContext(n_layers=4, n_sublayers=3, arch="encdec_decoder")
    res = RESIDUALS.build("admin", dim=DIM, ctx=ctx, norm="layer")
    assert res.omega.item() == pytest.approx(math.sqrt(13 / math.log(13) - 1), rel=1e-6)


def test_deepnorm_formula(x):
    m = 6
    alpha = (2 * m) ** 0.25
    f = linear_branch()
    res = build("deepnorm", LayerContext(n_layers=m, arch="decoder"))
    torch.testing.assert_close(res(x, f), ln(alpha * x + f(x)), rtol=0, atol=1e-12)


def test_layerscale_formula(x):
    f = linear_branch()
    res = build("layerscale", init=0.25)
    g = torch.linspace(-1, 1, DIM, dtype=torch.float64)
    with torch.no_grad():
        res.g.copy_(g)
    torch.testing.assert_close(res(x, f), x + g * f(ln(x)), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("depth", "init"), [(12, 0.1), (18, 0.1), (24, 1e-5), (36, 1e-6)])
def test_layerscale_cait_init_rule(depth, init):
    res = RESIDUALS.build("layerscale", dim=DIM, ctx=LayerContext(n_layers=depth), norm="layer")
    assert torch.equal(res.g, torch.full((DIM,), init))
    assert res.no_weight_decay() == [res.g]


def test_schemes_use_the_configured_norm():
    rms = NORMS.get("rms")
    for kind in ["prenorm", "postnorm", "admin", "deepnorm", "layerscale"]:
        res = RESIDUALS.build(kind, dim=DIM, ctx=LayerContext(), norm="rms")
        assert isinstance(res.norm, rms), kind


# --------------------------------------------------------------------------------------------------
# contract: class attributes, additivity, one branch evaluation, arguments


def test_placement_and_additive_table():
    expected = {
        "prenorm": ("pre", True),
        "postnorm": ("post", False),
        "rezero": ("none", True),
        "admin": ("post", False),
        "deepnorm": ("post", False),
        "layerscale": ("pre", True),
    }
    for kind, (placement, additive) in expected.items():
        cls = RESIDUALS.get(kind)
        assert (cls.placement, cls.additive) == (placement, additive), kind


@pytest.mark.parametrize("kind", ["prenorm", "rezero", "layerscale"])
def test_additive_schemes_equal_x_plus_delta(kind, x):
    f = linear_branch()
    res = build(kind)
    if kind == "rezero":
        with torch.no_grad():
            res.a.fill_(0.7)
    assert torch.equal(res(x, f), x + res.delta(x, f))


@pytest.mark.parametrize("kind", ["postnorm", "admin", "deepnorm"])
def test_post_norm_schemes_have_no_delta(kind, x):
    with pytest.raises(TypeError, match="not additive"):
        build(kind).delta(x, linear_branch())


@pytest.mark.parametrize("kind", KINDS)
def test_branch_is_called_once_with_its_arguments(kind, x):
    calls = []

    def branch(h, scale, *, shift):
        calls.append((scale, shift))
        return h * scale + shift

    out = build(kind)(x, branch, 2.0, shift=1.0)
    assert calls == [(2.0, 1.0)]
    assert out.shape == x.shape


@pytest.mark.parametrize("kind", KINDS)
def test_config_round_trip(kind):
    cfg = RESIDUALS.config(kind)
    d = config_to_dict(cfg)
    assert d["kind"] == kind
    assert config_from_dict(d, RESIDUALS) == cfg


# --------------------------------------------------------------------------------------------------
# ReZero invariants and sharing


def test_rezero_is_identity_at_init_and_only_a_gets_gradient(x):
    f = linear_branch()
    res = build("rezero")
    out = res(x, f)
    assert torch.equal(out, x)
    out.pow(2).sum().backward()
    assert torch.equal(f.weight.grad, torch.zeros_like(f.weight))
    assert res.a.grad is not None and res.a.grad.abs().item() > 0


def test_rezero_shared_gate_is_one_parameter_and_collects_both_gradients(x):
    ctx = LayerContext(n_layers=2)
    r1 = RESIDUALS.build("rezero", dim=DIM, ctx=ctx, norm="layer").double()
    r2 = RESIDUALS.build("rezero", dim=DIM, ctx=ctx, norm="layer").double()
    block = nn.ModuleList([r1, r2])
    assert r2.gate is r1.a
    assert [n for n, _ in block.named_parameters()] == ["0.a"]
    assert list(block.state_dict()) == ["0.a"]
    assert r1.no_weight_decay() == [r1.a] and r2.no_weight_decay() == []

    f, g = linear_branch(0), linear_branch(1)
    with torch.no_grad():
        r1.a.fill_(0.5)
    r2(r1(x, f), g).sum().backward()

    a = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    y = x + a * f(x)
    (y + a * g(y)).sum().backward()
    torch.testing.assert_close(r1.a.grad, a.grad, rtol=0, atol=1e-10)


def test_rezero_per_sublayer_option_gives_separate_gates():
    ctx = LayerContext(n_layers=2)
    cfg = RESIDUALS.config("rezero", shared=False)
    r1 = RESIDUALS.build(cfg, dim=DIM, ctx=ctx)
    r2 = RESIDUALS.build(cfg, dim=DIM, ctx=ctx)
    assert r1.a is not r2.a
    assert r1.no_weight_decay() == [r1.a] and r2.no_weight_decay() == [r2.a]


def test_rezero_shared_gate_survives_deepcopy(x):
    import copy

    ctx = LayerContext()
    block = nn.ModuleList([RESIDUALS.build("rezero", dim=DIM, ctx=ctx) for _ in range(2)])
    clone = copy.deepcopy(block)
    assert clone[1].gate is clone[0].a
    assert clone[0].a is not block[0].a


def test_rezero_dropout_applies_after_the_gate(x):
    res = ReZero(ReZero.Config(init=0.5, dropout=0.5)).double()
    f = linear_branch()
    torch.manual_seed(3)
    out = res(x, f)
    torch.manual_seed(3)
    expected = x + nn.functional.dropout(0.5 * f(x), p=0.5, training=True)
    assert torch.equal(out, expected)


# --------------------------------------------------------------------------------------------------
# Admin invariants, storage, dtype and device


def test_admin_o_n_equals_post_ln(x):
    f = linear_branch()
    admin = build("admin", output_change_scale="O(n)")
    post = build("postnorm")
    assert torch.equal(admin(x, f), post(x, f))


def test_admin_buffer_and_parameter_storage():
    buf = Admin(dim=DIM, ctx=LayerContext(n_layers=6))
    assert [n for n, _ in buf.named_buffers()] == ["omega"] and buf.omega.shape == (1,)
    assert "omega" not in dict(buf.named_parameters()) and buf.no_weight_decay() == []
    par = RESIDUALS.build(RESIDUALS.config("admin", as_parameter=True), dim=DIM, ctx=LayerContext(n_layers=6))
    assert isinstance(par.omega, nn.Parameter) and par.omega.shape == (DIM,)
    assert torch.equal(par.omega.detach(), torch.full((DIM,), admin_omega(12)))
    assert par.no_weight_decay() == [par.omega]


def test_admin_follows_meta_device_and_to_empty_restores_w():
    with torch.device("meta"):
        res = Admin(dim=DIM, ctx=LayerContext(n_layers=12))
    assert res.omega.device.type == "meta"
    res.to_empty(device="cpu")
    res.reset_parameters()
    assert res.omega.item() == pytest.approx(admin_omega(24), rel=1e-7)


def test_admin_half_precision(x):
    res = Admin(dim=DIM, ctx=LayerContext(n_layers=6), norm=None)
    xh, fh = x.half(), (2 * x).half()
    assert res(xh, lambda h: fh).dtype == torch.float16  # w is cast to the input's dtype
    res.half()
    assert res.omega.dtype == torch.float16
    expected = xh * torch.tensor(admin_omega(12), dtype=torch.float16) + fh
    assert torch.equal(res(xh, lambda h: fh), expected)


# --------------------------------------------------------------------------------------------------
# Admin profiled init (Liu et al. 2020, Transformer-Clinic's adaptive-profiling)


class _ToyStack(nn.Module):
    def __init__(self, n: int, arch: str = "decoder", as_parameter: bool = False):
        super().__init__()
        ctx = [LayerContext(layer=i, n_layers=n, n_sublayers=1, arch=arch) for i in range(n)]
        cfg = RESIDUALS.config("admin", as_parameter=as_parameter)
        self.res = nn.ModuleList([RESIDUALS.build(cfg, dim=DIM, ctx=c, norm="layer") for c in ctx])
        torch.manual_seed(7)
        self.f = nn.ModuleList([nn.Linear(DIM, DIM) for _ in range(n)])

    def forward(self, x):
        for res, f in zip(self.res, self.f):
            x = res(x, f)
        return x


def _recurrence(stack: _ToyStack, x: torch.Tensor) -> list[float]:
    """omega_i = ratio; ratio = sqrt(Var[omega_i x] + Var[f_i(x)]); x = LN(omega_i x + f_i(x))."""
    ratio, out = 1.0, []
    with torch.no_grad():
        for f in stack.f:
            w = ratio
            out.append(w)
            fx = f(x)
            ratio = math.sqrt((w * x).double().var(unbiased=False).item() + fx.double().var(unbiased=False).item())
            x = ln(w * x + fx)
    return out


@pytest.mark.parametrize("as_parameter", [False, True])
def test_admin_profile_sets_w_by_the_recurrence(as_parameter):
    stack = _ToyStack(5, as_parameter=as_parameter)
    torch.manual_seed(0)
    x = torch.randn(4, 6, DIM) * 3.0
    expected = _recurrence(stack, x)
    values = admin_profile_(stack, x)
    assert values["decoder"] == pytest.approx(expected, rel=1e-5)
    for res, w in zip(stack.res, expected):
        assert torch.allclose(res.omega, torch.full_like(res.omega, w), rtol=1e-5, atol=0)
        assert res._profile is None
    assert expected[0] == 1.0 and expected[-1] > 1.5
    # reset_parameters restores the profiled value, not the closed form
    stack.res[3].reset_parameters()
    assert stack.res[3].omega.flatten()[0].item() == pytest.approx(expected[3], rel=1e-6)


def test_admin_profile_keeps_encoder_and_decoder_chains_apart():
    enc, dec = _ToyStack(3, "encdec_encoder"), _ToyStack(3, "encdec_decoder")
    model = nn.Sequential(enc, dec)
    x = torch.randn(2, 4, DIM)
    values = admin_profile_(model, x)
    assert values["encdec_encoder"][0] == 1.0 and values["encdec_decoder"][0] == 1.0
    assert len(values["encdec_encoder"]) == 3 and len(values["encdec_decoder"]) == 3


def test_admin_profile_bad_input():
    with pytest.raises(ValueError, match="no Admin residual"):
        admin_profile_(nn.Linear(DIM, DIM), torch.randn(2, DIM))
    stack = _ToyStack(3)
    stack.forward = lambda x: stack.res[0](x, stack.f[0])  # skips two residuals
    with pytest.raises(ValueError, match=r"did not reach .*res\.1"):
        admin_profile_(stack, torch.randn(2, DIM))
    with pytest.raises(TypeError, match="nn.Module"):
        admin_profile_(lambda x: x, torch.randn(2, DIM))


# --------------------------------------------------------------------------------------------------
# DeepNorm constants and branch init


def test_deepnorm_constants_match_the_paper_table():
    # papers.md section 6, values computed from the DeepNet paper's table
    assert deepnorm_constants("decoder", 12) == pytest.approx((2.213, 0.3195), abs=5e-4)
    assert deepnorm_constants("decoder", 32) == pytest.approx((2.828, 0.250), abs=5e-4)
    assert deepnorm_constants("decoder", 64) == pytest.approx((3.364, 0.2102), abs=5e-4)
    assert deepnorm_constants("encdec_encoder", 6, n_enc_layers=6, n_dec_layers=6) == pytest.approx(
        (1.418, 0.497), abs=5e-4
    )
    assert deepnorm_constants("encdec_decoder", 6, n_enc_layers=6, n_dec_layers=6) == pytest.approx(
        (2.060, 0.343), abs=5e-4
    )


@pytest.mark.parametrize(
    ("arch", "n", "m", "alpha", "beta"),
    [
        ("encoder", 10, 0, (2 * 10) ** 0.25, (8 * 10) ** -0.25),
        ("decoder", 7, 0, (2 * 7) ** 0.25, (8 * 7) ** -0.25),
        ("encdec_encoder", 9, 3, 0.81 * (9**4 * 3) ** (1 / 16), 0.87 * (9**4 * 3) ** (-1 / 16)),
        ("encdec_decoder", 9, 3, (3 * 3) ** 0.25, (12 * 3) ** -0.25),
    ],
)
def test_deepnorm_reads_constants_from_context(arch, n, m, alpha, beta):
    n_layers = m if arch == "encdec_decoder" else n
    ctx = LayerContext(n_layers=n_layers, arch=arch, n_enc_layers=n if m else 0, n_dec_layers=m)
    res = RESIDUALS.build("deepnorm", dim=DIM, ctx=ctx, norm="layer")
    assert res.alpha == pytest.approx(alpha, rel=1e-12) and res.beta == pytest.approx(beta, rel=1e-12)


class _AttnLikeBranch(nn.Module):
    """Follows the library's branch contract: xavier-normal, gain beta on v/out, gain 1 on q/k."""

    def __init__(self, dim: int):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.betas: list[float] = []

    def reset_parameters(self, beta: float = 1.0) -> None:
        self.betas.append(beta)
        for lin, gain in ((self.q, 1.0), (self.k, 1.0), (self.v, beta), (self.o, beta)):
            nn.init.xavier_normal_(lin.weight, gain=gain)

    def forward(self, x):
        return self.o(self.v(x))


def test_deepnorm_init_branch_calls_reset_parameters_with_beta():
    ctx = LayerContext(n_layers=16, arch="decoder")
    res = RESIDUALS.build("deepnorm", dim=256, ctx=ctx, norm="layer")
    branch = _AttnLikeBranch(256)
    torch.manual_seed(0)
    res.init_branch_(branch)
    beta = (8 * 16) ** -0.25
    assert branch.betas == [pytest.approx(beta, rel=1e-12)]
    xavier_std = math.sqrt(2.0 / (256 + 256))
    assert branch.v.weight.std().item() == pytest.approx(beta * xavier_std, rel=0.02)
    assert branch.q.weight.std().item() == pytest.approx(xavier_std, rel=0.02)


def test_deepnorm_overrides_and_other_schemes_leave_branch_alone():
    res = RESIDUALS.build(RESIDUALS.config("deepnorm", alpha=3.0, beta=0.5), dim=DIM, ctx=LayerContext(), norm="layer")
    assert (res.alpha, res.beta) == (3.0, 0.5)
    branch = _AttnLikeBranch(DIM)
    for kind in ["prenorm", "postnorm", "rezero", "admin", "layerscale"]:
        build(kind).init_branch_(branch)
    assert branch.betas == []


def test_deepnorm_init_branch_rejects_branch_without_beta():
    res = DeepNorm(DeepNorm.Config(alpha=2.0, beta=0.5), dim=DIM)
    with pytest.raises(TypeError, match=r"reset_parameters\(beta"):
        res.init_branch_(nn.Linear(DIM, DIM))  # reset_parameters() takes no beta


# --------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("kind", ["admin", "deepnorm"])
def test_pre_placement_is_rejected(kind):
    # post-norm is the only placement their skip scale is derived for, so there is no option to set
    with pytest.raises(TypeError, match=rf"{kind!r} has no option\(s\) placement"):
        RESIDUALS.config(kind, placement="pre")
    assert RESIDUALS.get(kind).placement == "post"


@pytest.mark.parametrize("cls", [PreNorm, PostNorm])
@pytest.mark.parametrize("dim", [0, -3, 2.5, True])
def test_bad_dim(cls, dim):
    with pytest.raises(ValueError, match=rf"dim must be a positive int.*{dim!r}"):
        cls(dim=dim)


def test_bad_dim_other_schemes():
    with pytest.raises(ValueError, match="dim must be a positive int"):
        LayerScale(dim=0)
    with pytest.raises(ValueError, match="dim must be a positive int"):
        DeepNorm(DeepNorm.Config(alpha=2.0), dim=-1)
    with pytest.raises(ValueError, match="dim is required"):
        Admin(ctx=LayerContext(n_layers=6))


def test_unknown_norm_and_scheme():
    with pytest.raises(ValueError, match="unknown norm kind 'nope'"):
        PreNorm(dim=DIM, norm="nope")
    with pytest.raises(ValueError, match="unknown residual kind 'nope'"):
        RESIDUALS.build("nope", dim=DIM)


def test_admin_bad_input():
    with pytest.raises(ValueError, match=r"num_res_layers must be >= 1, got 0"):
        Admin(dim=DIM, ctx=LayerContext(n_layers=0))
    with pytest.raises(TypeError, match="num_res_layers must be an int"):
        admin_omega(2.5)
    with pytest.raises(ValueError, match=r"output_change_scale='O\(n2\)'.*'O\(logn\)'"):
        Admin(Admin.Config(output_change_scale="O(n2)"), dim=DIM, ctx=LayerContext(n_layers=6))
    with pytest.raises(ValueError, match="exactly one of ctx"):
        Admin(dim=DIM)
    with pytest.raises(ValueError, match="exactly one of ctx"):
        Admin(dim=DIM, ctx=LayerContext(n_layers=6), init_value=2.0)
    res = Admin(Admin.Config(as_parameter=True), dim=DIM, ctx=LayerContext(n_layers=6))
    with pytest.raises(ValueError, match="last dimension is 5"):
        res(torch.randn(2, 5), lambda h: h)


def test_branch_output_instead_of_branch_is_a_type_error(x):
    with pytest.raises(TypeError, match="OmegaResidual"):
        build("admin")(x, x * 2)


def test_deepnorm_constants_bad_input():
    with pytest.raises(ValueError, match="unknown arch 'gpt'"):
        deepnorm_constants("gpt", 12)
    with pytest.raises(ValueError, match="n_dec_layers"):
        deepnorm_constants("encdec_encoder", 6)
    with pytest.raises(ValueError, match="n_layers must be >= 1"):
        deepnorm_constants("decoder", 0)
    with pytest.raises(ValueError, match="alpha and beta must be > 0"):
        DeepNorm(DeepNorm.Config(alpha=2.0, beta=-0.1), dim=DIM)


def test_scalar_options_bad_input():
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.0"):
        ReZero(ReZero.Config(dropout=1.0))
    with pytest.raises(ValueError, match="init must be a finite number, got nan"):
        LayerScale(LayerScale.Config(init=float("nan")), dim=DIM)
    with pytest.raises(TypeError, match="init must be a finite number"):
        ReZero(ReZero.Config(init="0"))
    with pytest.raises(TypeError, match="shared_with must be the nn.Module"):
        ReZero(shared_with=torch.zeros(1))
    with pytest.raises(ValueError, match="no tensor attribute 'resweight'"):
        ReZero(shared_with=nn.Linear(2, 2), shared_name="resweight")


def test_rezero_keeps_a_low_precision_stream_in_its_dtype():
    res = ReZero(ReZero.Config(init=0.5))  # a is float32
    x = torch.randn(2, 3, DIM, dtype=torch.bfloat16)
    out = res(x, lambda h: 2 * h)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, x + torch.tensor(0.5, dtype=torch.bfloat16) * (2 * x))


class _FFLikeBranch(nn.Sequential):
    """A feed-forward branch following the library contract: xavier-normal with gain beta."""

    def __init__(self, dim: int):
        super().__init__(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def reset_parameters(self, beta: float = 1.0) -> None:
        for lin in (self[0], self[2]):
            nn.init.xavier_normal_(lin.weight, gain=beta)
            nn.init.zeros_(lin.bias)


@pytest.mark.parametrize("kind", KINDS)
def test_100_block_stack_trains_one_step_with_finite_values(kind):
    depth = 100
    torch.manual_seed(0)
    residuals, branches = nn.ModuleList(), nn.ModuleList()
    for layer in range(depth):
        shared: dict = {}
        for sub in range(2):
            ctx = LayerContext(layer=layer, n_layers=depth, sublayer=sub, n_sublayers=2, shared=shared)
            res, branch = RESIDUALS.build(kind, dim=DIM, ctx=ctx, norm="layer"), _FFLikeBranch(DIM)
            res.init_branch_(branch)
            residuals.append(res)
            branches.append(branch)
    params = list(residuals.parameters()) + list(branches.parameters())
    opt = torch.optim.SGD(params, lr=1e-2)
    x = torch.randn(4, 3, DIM)
    h = x
    for res, branch in zip(residuals, branches):
        h = res(h, branch)
    loss = h.pow(2).mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)
    assert all(torch.isfinite(p).all() for p in params)


# --------------------------------------------------------------------------------------------------
# one statement per option


def test_from_config_is_the_constructor_call():
    # no second mapping of the Config fields (tests/nn/test_one_statement.py checks the constructors)
    from anydepth.nn.registry import Configurable

    for kind in RESIDUALS.kinds():
        assert RESIDUALS.get(kind).from_config.__func__ is Configurable.from_config.__func__, kind


def test_rezero_sharing_uses_no_object_setattr():
    import inspect

    import anydepth.nn.residual.rezero as rezero_module

    assert "object.__setattr__" not in inspect.getsource(rezero_module)


@pytest.mark.parametrize("kind", ["admin", "deepnorm"])
def test_configs_saved_with_the_retired_placement_option_still_load(kind):
    saved = {**config_to_dict(RESIDUALS.config(kind)), "placement": "post"}
    assert config_from_dict(saved, RESIDUALS) == RESIDUALS.config(kind)
    with pytest.raises(TypeError, match="no option"):
        config_from_dict({**saved, "placement": "pre"}, RESIDUALS)
