"""``anydepth.compat.hyper_connections`` against the installed ``hyper_connections`` 0.4.11, module by
module: the same names, and the same outputs and gradients from the same state dict."""

from __future__ import annotations

import importlib
import inspect

import hyper_connections as o_hc
import hyper_connections.hyper_connections_channel_first as o_cf
import hyper_connections.hyper_connections_with_multi_branch_inputs as o_mb
import hyper_connections.hyper_connections_with_multi_input_streams as o_mi
import hyper_connections.manifold_constrained_hyper_connections as o_mc
import hyper_connections.mHCv2 as o_v2
import hyper_connections.residuals as o_res
import hyper_connections.vit as o_vit
import pytest
import torch
from torch import nn

import anydepth
import anydepth.compat.hyper_connections as ours_pkg
from anydepth.compat.hyper_connections import hyper_connections as u_hc
from anydepth.compat.hyper_connections import hyper_connections_channel_first as u_cf
from anydepth.compat.hyper_connections import hyper_connections_with_multi_branch_inputs as u_mb
from anydepth.compat.hyper_connections import hyper_connections_with_multi_input_streams as u_mi
from anydepth.compat.hyper_connections import manifold_constrained_hyper_connections as u_mc
from anydepth.compat.hyper_connections import mHCv2 as u_v2
from anydepth.compat.hyper_connections import residuals as u_res
from anydepth.compat.hyper_connections import triton_sinkhorn as u_triton
from anydepth.compat.hyper_connections import vit as u_vit

TOL = {"atol": 1e-5, "rtol": 1e-5}
MODULES = [
    "hyper_connections",
    "manifold_constrained_hyper_connections",
    "mHCv2",
    "hyper_connections_channel_first",
    "hyper_connections_with_multi_input_streams",
    "hyper_connections_with_multi_branch_inputs",
    "residuals",
    "vit",
]
# one-line generic helpers of the package's modules, not part of what they offer
HELPERS = {"exists", "default", "divisible_by", "identity", "add", "l1norm"}


def _perturb(module: nn.Module, scale: float = 0.3) -> None:
    """Moves every parameter off its init (the dynamic projections start at zero, which would hide
    any difference in how they are applied)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def _same_state(o: nn.Module, u: nn.Module) -> None:
    """``u`` loads ``o``'s state dict with every key, and writes back the same keys and shapes."""
    u.load_state_dict(o.state_dict())
    assert {k: v.shape for k, v in u.state_dict().items()} == {k: v.shape for k, v in o.state_dict().items()}


def _grads(module: nn.Module, names, inputs, out) -> list[torch.Tensor]:
    params = dict(module.named_parameters())
    return list(torch.autograd.grad(out, [*inputs, *(params[n] for n in names)]))


# -- layout -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODULES)
def test_every_public_class_and_function_of_each_module_exists(name):
    orig = importlib.import_module(f"hyper_connections.{name}")
    ours = importlib.import_module(f"anydepth.compat.hyper_connections.{name}")
    public = {
        n
        for n, obj in vars(orig).items()
        if not n.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and getattr(obj, "__module__", "").startswith("hyper_connections")
    }
    missing = sorted(n for n in public - HELPERS if not hasattr(ours, n))
    assert not missing


def test_package_root_and_top_level_names():
    import hyper_connections as orig

    for name in ("HyperConnections", "ManifoldConstrainedHyperConnections", "mHC", "Residual", "StreamEmbed"):
        assert hasattr(orig, name) and hasattr(ours_pkg, name)
    assert ours_pkg.mc_get_init_and_expand_reduce_stream_functions is u_mc.get_init_and_expand_reduce_stream_functions
    # one translation: the package root's names are the submodules' very objects, and the top level of
    # anydepth does not carry them (its HyperConnection is the library's class)
    assert ours_pkg.HyperConnections is u_hc.HyperConnections
    assert ours_pkg.mHC is u_mc.ManifoldConstrainedHyperConnections
    assert not hasattr(anydepth, "HyperConnections") and not hasattr(anydepth, "mHC")
    assert u_v2.mHC is not u_mc.mHC  # v2 has its own layout


# -- mHCv2 --------------------------------------------------------------------------------------------
V2_OPTIONS = [
    {},
    {"mix_streams_before_norm": True},
    {"log_domain_sinkhorn": True},
    {"sinkhorn_iters": 0},
    {"sinkhorn_iters": 3, "num_dynamic_alpha_proposals": 2},
    {"mix_streams_before_norm": True, "log_domain_sinkhorn": True, "num_dynamic_alpha_proposals": 3},
    {"add_branch_out_to_residual": False},
    {"use_triton_sinkhorn": True},
]


@pytest.mark.parametrize("kwargs", V2_OPTIONS, ids=lambda kw: ",".join(kw) or "default")
def test_mhcv2_matches_original_outputs_and_gradients(kwargs):
    torch.manual_seed(0)
    o = o_v2.mHC(3, dim=16, layer_index=1, **kwargs)
    _perturb(o)
    u = u_v2.mHC(3, dim=16, layer_index=0, **kwargs)
    _same_state(o, u)
    x = torch.randn(2, 5, 3, 16, requires_grad=True)
    bo, add_o = o(x)
    bu, add_u = u(x)
    torch.testing.assert_close(bu, bo, **TOL)
    y = torch.randn(bo.shape)
    out_o, out_u = add_o(y), add_u(y)
    torch.testing.assert_close(out_u, out_o, **TOL)
    names = [n for n, _ in o.named_parameters()]
    go = _grads(o, names, [x], (out_o * torch.cos(out_o)).sum() + bo.pow(2).sum())
    gu = _grads(u, names, [x], (out_u * torch.cos(out_u)).sum() + bu.pow(2).sum())
    for a, b in zip(go, gu, strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_mhcv2_stream_mix_changes_only_the_coefficients():
    torch.manual_seed(1)
    mixed = u_v2.mHC(3, dim=8, layer_index=0, mix_streams_before_norm=True)
    _perturb(mixed)
    plain = u_v2.mHC(3, dim=8, layer_index=0)
    plain.load_state_dict(mixed.state_dict(), strict=False)  # all but the mix
    x = torch.randn(4, 3, 8)
    assert not torch.allclose(mixed(x)[0], plain(x)[0], atol=1e-3)
    with torch.no_grad():
        nn.init.dirac_(mixed.maybe_mix_streams.weight)  # M = I: the stream mix is off
    torch.testing.assert_close(mixed(x)[0], plain(x)[0])


@pytest.mark.parametrize("streams,fracs", [(1, 1), (1, 2), (3, 2)])
def test_mhcv2_stream_and_fraction_counts_run_and_load(streams, fracs):
    torch.manual_seed(2)
    o = o_v2.mHC(streams, dim=8, layer_index=0, num_fracs=fracs)
    u = u_v2.mHC(streams, dim=8, layer_index=0, num_fracs=fracs)
    _same_state(o, u)
    x = torch.randn(2, 3, streams, 8)
    branch_in, add = u(x)
    assert branch_in.shape == (2, 3, 8) and add(branch_in).shape == x.shape
    if fracs == 1:  # fractions follow the semantics of anydepth.nn.residual.hyper (see compat.hyper_connections)
        torch.testing.assert_close(add(branch_in), o(x)[1](o(x)[0]), **TOL)


@pytest.mark.parametrize("embed,pool", [(False, False), (True, False), (False, True), (True, True)])
def test_mhcv2_init_expand_reduce_pipeline_matches_original(embed, pool):
    torch.manual_seed(3)
    opts = {"dim": 16, "add_stream_embed": embed, "add_attn_pool_reduce_stream": pool, "layer_index": 2}
    oi, oe, orr = o_v2.get_init_and_expand_reduce_stream_functions(4, **opts)
    ui, ue, ur = u_v2.get_init_and_expand_reduce_stream_functions(4, **opts)
    o_model = nn.ModuleList([oe, oi(branch=nn.Linear(16, 16)), oi(branch=nn.Linear(16, 16)), orr])
    u_model = nn.ModuleList([ue, ui(branch=nn.Linear(16, 16)), ui(branch=nn.Linear(16, 16)), ur])
    _perturb(o_model, 0.1)
    _same_state(o_model, u_model)
    x = torch.randn(2, 5, 16)
    outs = []
    for model in (o_model, u_model):
        h = x
        for layer in model:
            h = layer(h)
        outs.append(h)
    assert outs[0].shape == x.shape
    torch.testing.assert_close(outs[1], outs[0], **TOL)


def test_mhcv2_disable_is_the_plain_residual():
    init, expand, reduce = u_v2.get_init_and_expand_reduce_stream_functions(1, dim=8)
    branch = nn.Linear(8, 8)
    x = torch.randn(2, 3, 8)
    assert isinstance(init(branch=branch), u_v2.Residual)
    torch.testing.assert_close(reduce(init(branch=branch)(expand(x))), branch(x) + x)


def test_mhcv2_bad_residual_shape_names_the_fix():
    hc = u_v2.mHC(4, dim=8, layer_index=0)
    with pytest.raises(ValueError, match="expand_stream"):
        hc(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="sinkhorn_iters"):
        u_v2.mHC(4, dim=8, sinkhorn_iters=-1)


# -- Sinkhorn -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("iters", [0, 1, 20])
@pytest.mark.parametrize("which", ["sinkhorn_knopps", "log_domain_sinkhorn_knopps"])
def test_sinkhorn_functions_match_original(which, iters):
    torch.manual_seed(4)
    logits = (2 * torch.randn(3, 5, 5)).requires_grad_()
    expected = getattr(o_v2, which)(logits, iters)
    got = getattr(u_v2, which)(logits, iters)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    if iters:
        g = torch.randn_like(got)
        (ge,) = torch.autograd.grad(expected, logits, g)
        (gg,) = torch.autograd.grad(got, logits, g)
        torch.testing.assert_close(gg, ge, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(getattr(u_mc, which)(logits, iters), getattr(o_mc, which)(logits, iters))


def test_triton_sinkhorn_takes_the_eager_path_on_cpu():
    torch.manual_seed(5)
    logits = torch.randn(2, 4, 4, dtype=torch.float64, requires_grad=True)
    # the original iterates in float32 and casts back; ours keeps float64
    expected = o_v2.sinkhorn_knopps(logits, 20)
    torch.testing.assert_close(u_triton.triton_sinkhorn(logits, 20), expected, atol=1e-6, rtol=1e-5)
    assert torch.autograd.gradcheck(u_triton.triton_sinkhorn, (logits, 10), eps=1e-6, atol=1e-5)
    if not torch.cuda.is_available():
        assert not u_triton.is_triton_available()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the original's Triton Sinkhorn kernel needs CUDA")
def test_triton_sinkhorn_matches_original_kernel_on_cuda():
    pytest.importorskip("triton")
    from hyper_connections.triton_sinkhorn import triton_sinkhorn as orig_triton

    torch.manual_seed(6)
    logits = torch.randn(2, 16, 16, device="cuda", requires_grad=True)
    expected, got = orig_triton(logits, 20), u_triton.triton_sinkhorn(logits, 20)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    g = torch.randn_like(got)
    (ge,) = torch.autograd.grad(expected, logits, g)
    (gg,) = torch.autograd.grad(got, logits, g)
    torch.testing.assert_close(gg, ge, atol=1e-3, rtol=1e-3)
    o = o_v2.mHC(4, dim=32, layer_index=0, use_triton_sinkhorn=True).cuda()
    _perturb(o)
    u = u_v2.mHC(4, dim=32, layer_index=0, use_triton_sinkhorn=True).cuda()
    u.load_state_dict(o.state_dict())
    x = torch.randn(2, 8, 4, 32, device="cuda")
    torch.testing.assert_close(u(x)[0], o(x)[0], atol=1e-4, rtol=1e-4)


# -- the width/depth contract -------------------------------------------------------------------------
def _contract_pairs():
    return [
        ("hc", o_hc.HyperConnections, u_hc.HyperConnections, (8, 3, 16)),
        ("mhc", o_mc.ManifoldConstrainedHyperConnections, u_mc.ManifoldConstrainedHyperConnections, (8, 3, 16)),
        ("mhcv2", o_v2.ManifoldConstrainedHyperConnections, u_v2.ManifoldConstrainedHyperConnections, (2, 3, 4, 16)),
    ]


@pytest.mark.parametrize("case", _contract_pairs(), ids=lambda c: c[0])
def test_width_then_depth_connection_matches_original_and_forward(case):
    _, o_cls, u_cls, shape = case
    torch.manual_seed(7)
    o = o_cls(4, dim=16, layer_index=1)
    _perturb(o)
    u = u_cls(4, dim=16, layer_index=1)
    u.load_state_dict(o.state_dict())
    x = torch.randn(shape)
    bo, ro, kwo = o.width_connection(x)
    bu, ru, kwu = u.width_connection(x)
    assert set(kwu) == set(kwo) == {"beta"}
    torch.testing.assert_close(bu, bo, **TOL)
    torch.testing.assert_close(ru, ro, **TOL)  # the mixed streams, in the residual's layout
    y = torch.randn(bo.shape)
    torch.testing.assert_close(u.depth_connection(y, ru, **kwu), o.depth_connection(y, ro, **kwo), **TOL)
    branch_in, add = u(x)
    torch.testing.assert_close(u.depth_connection(y, ru, **kwu), add(y), **TOL)
    torch.testing.assert_close(branch_in, bu)


@pytest.mark.parametrize("v2", [False, True])
def test_mhc_width_depth_contract_keeps_half_precision(v2):
    # mHC computes its coefficients in float32 and casts back (as the original; its plain
    # hyper-connections, like the original's, need the input in the parameters' dtype)
    hc = (u_v2.mHC if v2 else u_mc.mHC)(4, dim=16, layer_index=0)
    residual = torch.randn((1, 2, 4, 16) if v2 else (4, 2, 16)).half()
    branch_in, residuals, kw = hc.width_connection(residual)
    assert branch_in.dtype == residuals.dtype == kw["beta"].dtype == torch.half
    out = hc.depth_connection(torch.randn_like(branch_in), residuals, **kw)
    assert out.dtype == torch.half and out.shape == residual.shape
    with pytest.raises(ValueError, match="beta"):
        hc.depth_connection(branch_in, residuals)


# -- residual updates ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [
        lambda m: m.GRUGatedResidual(8),
        lambda m: m.GatedResidual(8),
        lambda m: m.GatedResidual(8, fine_gate=True),
        lambda m: m.OrthogonalResidualUpdate(),
        lambda m: m.OrthogonalResidualUpdate(double_precision=False),
        lambda m: m.MVSplitResidualUpdate(8, init_alpha=0.1),
    ],
    ids=["gru", "gated", "gated_fine", "orthogonal64", "orthogonal32", "mvsplit"],
)
def test_residual_updates_match_original(make):
    torch.manual_seed(8)
    o, u = make(o_res), make(u_res)
    _perturb(o, 0.1)
    _same_state(o, u)
    x, r = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    expected = o(x, r)
    got = u(x, r)
    assert got.dtype == r.dtype  # (the original returns float64 from the float64 orthogonal update)
    torch.testing.assert_close(got, expected.to(r.dtype), **TOL)


@pytest.mark.parametrize("fn", ["gated", "mvsplit", "orthogonal"])
def test_residual_updates_as_depth_residual_fn_match_original(fn):
    torch.manual_seed(9)
    makers = {
        "gated": lambda m: m.GatedResidual(16),
        "mvsplit": lambda m: m.MVSplitResidualUpdate(16, init_alpha=0.2),
        "orthogonal": lambda m: m.OrthogonalResidualUpdate(),
    }
    layouts = [(o_mc.mHC, u_mc.mHC, (8, 3, 16))]
    if fn != "gated":  # the gate flattens all but two dims: the package's (..., s, d) layout gives it s*d features
        layouts.append((o_v2.mHC, u_v2.mHC, (2, 3, 4, 16)))
    for o_cls, u_cls, shape in layouts:
        o = o_cls(4, dim=16, layer_index=0, depth_residual_fn=makers[fn](o_res), branch=nn.Linear(16, 16))
        _perturb(o, 0.1)
        u = u_cls(4, dim=16, layer_index=0, depth_residual_fn=makers[fn](u_res), branch=nn.Linear(16, 16))
        _same_state(o, u)
        x = torch.randn(shape)
        torch.testing.assert_close(u(x), o(x).to(x.dtype), **TOL)


# -- channel-first ------------------------------------------------------------------------------------
def test_channel_first_matches_original_both_ways():
    torch.manual_seed(10)
    branch = nn.Conv2d(8, 8, 3, padding=1)
    o = o_cf.HyperConnections(3, dim=8, layer_index=2, branch=branch)
    _perturb(o)
    u = u_cf.HyperConnections(3, dim=8, layer_index=0, branch=branch)
    _same_state(o, u)
    back = o_cf.HyperConnections(3, dim=8, layer_index=0, branch=branch)
    back.load_state_dict(u.state_dict())
    x = torch.randn(6, 8, 4, 5, requires_grad=True)
    expected = o(x)
    torch.testing.assert_close(u(x), expected, **TOL)
    torch.testing.assert_close(back(x), expected)
    names = [n for n, _ in o.named_parameters() if not n.startswith("branch")]
    go = _grads(o, names, [x], expected.pow(2).sum())
    params = dict(u.named_parameters())
    ours_names = {"norm.gamma": "norm.gamma", "dynamic_alpha_fn.weight": "dynamic_alpha_fn"}
    ours_names["dynamic_beta_fn.0.weight"] = "dynamic_beta_fn"
    gu = torch.autograd.grad(u(x).pow(2).sum(), [x, *(params[ours_names.get(n, n)] for n in names)])
    for a, b in zip(go, gu, strict=True):
        torch.testing.assert_close(_as(a, b), a, atol=1e-4, rtol=1e-4)


def _as(theirs: torch.Tensor, ours: torch.Tensor) -> torch.Tensor:
    """Our gradient in the package's parameter shape (a (d, k) projection is its (k, d, 1, 1) weight)."""
    if ours.shape == theirs.shape:
        return ours
    return (ours.t() if ours.dim() == 2 else ours).reshape(theirs.shape)


def test_channel_first_rmsnorm_matches_original():
    torch.manual_seed(11)
    o, u = o_cf.RMSNorm(8), u_cf.RMSNorm(8)
    _perturb(o)
    _same_state(o, u)
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(u(x), o(x), **TOL)


# -- multi-input streams ------------------------------------------------------------------------------
class _ThreeInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 16), nn.Linear(12, 16), nn.Linear(6, 16)

    def forward(self, x, second, *, third):
        return self.a(x) + self.b(second) + torch.tanh(self.c(third)), 3.0


@pytest.mark.parametrize("tanh", [True, False])
def test_multi_input_streams_match_original(tanh):
    torch.manual_seed(12)
    paths = [(1, 12), ("third", 6)]
    branch = _ThreeInputs()
    o = o_mi.HyperConnections(3, dim=16, additional_input_paths=paths, layer_index=1, tanh=tanh, branch=branch)
    _perturb(o)
    u = u_mi.HyperConnections(3, dim=16, additional_input_paths=paths, layer_index=0, tanh=tanh, branch=branch)
    _same_state(o, u)
    x = torch.randn(6, 5, 16, requires_grad=True)
    second = torch.randn(6, 5, 12, requires_grad=True)
    third = torch.randn(6, 5, 6, requires_grad=True)
    out_o, aux_o = o(x, second, third=third)
    out_u, aux_u = u(x, second, third=third)
    assert aux_o == aux_u == 3.0
    torch.testing.assert_close(out_u, out_o, **TOL)
    names = [n for n, _ in o.named_parameters()]
    go = _grads(o, names, [x, second, third], out_o.pow(2).sum())
    ours = [MULTI_INPUT_NAMES.get(n, n) for n in names]  # the main connection keeps the library's names
    gu = _grads(u, ours, [x, second, third], out_u.pow(2).sum())
    for a, b in zip(go, gu, strict=True):
        torch.testing.assert_close(_as(a, b), a, atol=1e-4, rtol=1e-4)


MULTI_INPUT_NAMES = {
    "dynamic_alpha_and_branch_input.proj.weight": "dynamic_alpha_fn",
    "dynamic_alpha_and_branch_input.scale": "dynamic_alpha_scale",
    "dynamic_beta.proj.weight": "dynamic_beta_fn",
    "dynamic_beta.scale": "dynamic_beta_scale",
}


def test_multi_input_streams_without_branch_and_default_dims():
    torch.manual_seed(13)
    o = o_mi.HyperConnections(2, dim=8, additional_input_paths=[2, "mem"], layer_index=0)
    _perturb(o)
    u = u_mi.HyperConnections(2, dim=8, additional_input_paths=[2, "mem"], layer_index=1)
    _same_state(o, u)
    x, skip, other, mem = (torch.randn(4, 3, 8) for _ in range(4))
    (args_o, kw_o), add_o = o(x, skip, other, mem=mem)
    (args_u, kw_u), add_u = u(x, skip, other, mem=mem)
    assert args_u[1] is skip  # path 2 is the second positional argument: the first passes untouched
    for a, b in zip(args_o, args_u, strict=True):
        torch.testing.assert_close(b, a, **TOL)
    torch.testing.assert_close(kw_u["mem"], kw_o["mem"], **TOL)
    y = torch.randn(2, 3, 8)
    torch.testing.assert_close(add_u(y), add_o(y), **TOL)
    decorated = u_mi.HyperConnections(2, dim=8, additional_input_paths=["mem"], layer_index=0)
    out = decorated.decorate_branch(lambda h, *, mem: h + mem)(x, mem=mem)
    assert out.shape == x.shape


def test_multi_input_streams_bad_paths_raise_value_error():
    with pytest.raises(ValueError, match="additional_input_paths"):
        u_mi.HyperConnections(2, dim=8, additional_input_paths=[0])
    hc = u_mi.HyperConnections(2, dim=8, additional_input_paths=[1, ("mem", 4)], layer_index=0)
    x = torch.randn(4, 3, 8)
    with pytest.raises(ValueError, match="positional argument 1"):
        hc(x, mem=torch.randn(4, 3, 4))
    with pytest.raises(ValueError, match="mem="):
        hc(x, x)
    with pytest.raises(ValueError, match="4 features"):
        hc(x, x, mem=x)


# -- multi-branch inputs ------------------------------------------------------------------------------
@pytest.mark.parametrize("inputs,branches", [(1, 1), (2, 1), (2, 2), (4, 2)])
def test_multi_branch_inputs_match_original(inputs, branches):
    torch.manual_seed(14)
    for layer in range(3 * inputs):  # the init rule: branch inputs of one layer read different streams
        o = o_mb.HyperConnections(3, dim=8, layer_index=layer, num_branch_inputs=inputs)
        u = u_mb.HyperConnections(3, dim=8, layer_index=layer, num_branch_inputs=inputs)
        assert torch.equal(u.static_alpha, o.static_alpha)
    fns = [nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(branches)]
    o = o_mb.HyperConnections(3, dim=8, layer_index=1, num_branch_inputs=inputs, branch=fns)
    _perturb(o)
    u = u_mb.HyperConnections(3, dim=8, layer_index=2, num_branch_inputs=inputs, branch=fns)
    _same_state(o, u)
    x = torch.randn(6, 5, 8, requires_grad=True)
    out_o, out_u = o(x), u(x)
    torch.testing.assert_close(out_u, out_o, **TOL)
    names = [n for n, _ in o.named_parameters()]
    go = _grads(o, names, [x], out_o.pow(2).sum())
    gu = _grads(u, names, [x], out_u.pow(2).sum())
    for a, b in zip(go, gu, strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    # without a branch: the stacked (i b) ... d inputs and the width/depth contract
    bare_o = o_mb.HyperConnections(3, dim=8, layer_index=0, num_branch_inputs=inputs)
    _perturb(bare_o)
    bare_u = u_mb.HyperConnections(3, dim=8, layer_index=0, num_branch_inputs=inputs)
    _same_state(bare_o, bare_u)
    bo, add_o = bare_o(x)
    bu, add_u = bare_u(x)
    assert bu.shape == (inputs * 2, 5, 8)
    torch.testing.assert_close(bu, bo, **TOL)
    y = torch.randn(bo.shape)
    torch.testing.assert_close(add_u(y), add_o(y), **TOL)
    _, res, kw = bare_u.width_connection(x)
    torch.testing.assert_close(bare_u.depth_connection(y, res, **kw), add_o(y), **TOL)


def test_multi_branch_decorate_branch_with_a_list():
    torch.manual_seed(15)
    fns = [nn.Linear(8, 8), nn.Linear(8, 8)]
    wrapped = u_mb.HyperConnections(2, dim=8, layer_index=0, num_branch_inputs=2, branch=fns)
    _perturb(wrapped)
    bare = u_mb.HyperConnections(2, dim=8, layer_index=0, num_branch_inputs=2)
    bare.load_state_dict(wrapped.state_dict(), strict=False)
    x = torch.randn(4, 3, 8)
    torch.testing.assert_close(bare.decorate_branch(fns)(x), wrapped(x))
    with pytest.raises(ValueError, match="divide"):
        u_mb.HyperConnections(2, dim=8, num_branch_inputs=3, branch=fns)
    _, residuals, kw = bare.width_connection(x)
    with pytest.raises(ValueError, match="num_branch_inputs"):
        bare.depth_connection(torch.randn(2, 3, 8), residuals, **kw)  # one output for two inputs


# -- ViT ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pool,proposals", [("cls", 1), ("mean", 2)])
def test_vit_matches_original(pool, proposals):
    torch.manual_seed(16)
    kw = {
        "image_size": (16, 8),
        "patch_size": 4,
        "num_classes": 5,
        "dim": 16,
        "depth": 2,
        "heads": 2,
        "dim_head": 8,
        "mlp_dim": 24,
        "pool": pool,
        "num_residual_streams": 3,
        "mhc_kwargs": {"num_dynamic_alpha_proposals": proposals},
    }
    o, u = o_vit.ViT(**kw), u_vit.ViT(**kw)
    _perturb(o, 0.1)
    _same_state(o, u)
    img = torch.randn(2, 3, 16, 8)
    expected = o(img)
    torch.testing.assert_close(u(img), expected, **TOL)
    names = [n for n, _ in o.named_parameters()]
    go = torch.autograd.grad(expected.pow(2).sum(), [dict(o.named_parameters())[n] for n in names])
    gu = torch.autograd.grad(u(img).pow(2).sum(), [_param_by_their_name(u, n) for n in names])
    for a, b in zip(go, gu, strict=True):
        torch.testing.assert_close(b.reshape(a.shape), a, atol=1e-4, rtol=1e-4)


def _param_by_their_name(model: nn.Module, name: str) -> torch.Tensor:
    """Our parameter behind the package's state-dict key (the branches keep the library's names)."""
    renames = {".net.0.": ".norm.", ".net.1.": ".proj_in.", ".net.4.": ".proj_out.", ".to_out.0.": ".to_out."}
    for theirs, ours in renames.items():
        name = name.replace(theirs, ours)
    return dict(model.named_parameters())[name]


def test_vit_bad_patch_size_raises_value_error():
    with pytest.raises(ValueError, match="patch_size"):
        u_vit.ViT(image_size=10, patch_size=4, num_classes=2, dim=8, depth=1, heads=1, mlp_dim=8)


def test_multi_branch_inputs_channel_first_match_original():
    torch.manual_seed(17)
    o = o_mb.HyperConnections(2, dim=8, layer_index=1, num_branch_inputs=2, channel_first=True)
    _perturb(o)
    u = u_mb.HyperConnections(2, dim=8, layer_index=1, num_branch_inputs=2, channel_first=True)
    _same_state(o, u)
    x = torch.randn(4, 8, 3, 5)  # (b s) d h w
    bo, add_o = o(x)
    bu, add_u = u(x)
    assert bu.shape == (4, 8, 3, 5)  # (i b) d h w
    torch.testing.assert_close(bu, bo, **TOL)
    y = torch.randn(bo.shape)
    torch.testing.assert_close(add_u(y), add_o(y), **TOL)


def test_vit_single_head_attention_has_no_output_projection_like_original():
    torch.manual_seed(18)
    o, u = o_vit.Attention(8, heads=1, dim_head=8, dropout=0.1), u_vit.Attention(8, heads=1, dim_head=8, dropout=0.1)
    _perturb(o, 0.1)
    _same_state(o, u)
    assert not any("to_out" in k for k in u.state_dict())
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(u.eval()(x), o.eval()(x), **TOL)
