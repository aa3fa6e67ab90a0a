"""The fused CPU kernels of hyper-connections against the eager formula, computed in float64.

The eager path (``width_connection``/``depth_connection``) is itself checked against the paper's
formulas and the original package in test_hyper.py; here every output and every gradient of the fused
float32 path must match it run in float64, for static and dynamic variants, with and without tanh,
for stream counts that do and do not fill a vector, and feature widths with a remainder after the
kernels' 16-lane blocks.
"""

from __future__ import annotations

import ctypes

import pytest
import torch
from torch import nn

from anydepth.nn.norms import LayerNorm, RMSNorm
from anydepth.nn.residual import hyper_fused
from anydepth.nn.residual.hyper import HyperConnection, ManifoldHyperConnection

pytestmark = pytest.mark.skipif(
    not hyper_fused._KERNEL.available(), reason=f"fused kernel unavailable: {hyper_fused._KERNEL.error}"
)


def _perturbed(hc: nn.Module, seed: int) -> nn.Module:
    # away from the init, where the dynamic weights are zero and tanh'(0) = 1 would hide mistakes
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hc.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return hc


def _grads(hc, branch, x, gy, fused: bool):
    with hyper_fused.use_fused_hyper(fused):
        hc.zero_grad(set_to_none=True)
        branch.zero_grad(set_to_none=True)
        xa = x.clone().requires_grad_()
        out = hc(xa, branch)
        out.backward(gy)
    params = {f"hc.{k}": p.grad for k, p in hc.named_parameters()}
    params |= {f"branch.{k}": p.grad for k, p in branch.named_parameters()}
    return out.detach(), xa.grad, params


def _assert_matches_float64_eager(fused, hc, branch, x, gy):
    out, dx, grads = fused
    out_ref, dx_ref, grads_ref = _grads(hc.double(), branch.double(), x.double(), gy.double(), fused=False)
    torch.testing.assert_close(out.double(), out_ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(dx.double(), dx_ref, atol=2e-5, rtol=2e-5)
    assert grads.keys() == grads_ref.keys()
    for name, g in grads.items():
        # parameter gradients are sums over a hundred tokens or so
        torch.testing.assert_close(g.double(), grads_ref[name], atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("dynamic,tanh", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("streams,dim", [(4, 32), (2, 20), (5, 67), (1, 24)])
def test_fused_equals_eager_float64(dynamic, tanh, streams, dim):
    hc = _perturbed(
        HyperConnection(
            HyperConnection.Config(streams=streams, dynamic=dynamic, tanh=tanh),
            dim=dim,
            layer_index=3,
            norm=nn.LayerNorm(dim),
        ),
        0,
    )
    branch = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
    shape = (3, 41, streams, dim) if streams > 1 else (3, 41, dim)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    gy = torch.randn(shape, generator=torch.Generator().manual_seed(2))

    calls = []
    lib = hyper_fused._KERNEL.lib
    real = lib.anydepth_hc_depth_forward
    lib.anydepth_hc_depth_forward = lambda a: calls.append(1) or real(a)
    try:
        out, dx, grads = _grads(hc, branch, x, gy, fused=True)
    finally:
        lib.anydepth_hc_depth_forward = real
    assert calls, "the fused path was not taken"

    _assert_matches_float64_eager((out, dx, grads), hc, branch, x, gy)


@pytest.mark.parametrize(
    "make_norm,fused_norm",
    [
        (lambda d: nn.LayerNorm(d), True),
        (lambda d: nn.LayerNorm(d, eps=1e-3, bias=False), True),
        (lambda d: LayerNorm.make(dim=d, bias=False), True),
        (lambda d: LayerNorm(dim=d), True),
        # not fused: the module runs on the kernel's output
        (lambda d: RMSNorm.make(dim=d, eps=1e-8, eps_placement="outside"), False),
        (lambda d: None, False),
    ],
)
# 8 streams: the kernels' loops that are unrolled for up to 6 terms take their general form
@pytest.mark.parametrize("streams,dim", [(4, 32), (3, 37), (8, 37)])
def test_fused_branch_layer_norm_equals_eager_float64(make_norm, fused_norm, streams, dim):
    # The width kernel applies a plain LayerNorm itself and recomputes its input in the backward;
    # every output and gradient (the norm's weight and bias included) must match float64 eager.
    hc = _perturbed(
        HyperConnection(HyperConnection.Config(streams=streams), dim=dim, layer_index=2, norm=make_norm(dim)), 4
    )
    branch = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
    g = torch.Generator().manual_seed(5)
    x, gy = torch.randn(2, 29, streams, dim, generator=g), torch.randn(2, 29, streams, dim, generator=g)
    norm_calls = []
    hook = hc.branch_norm.register_forward_hook(lambda *a: norm_calls.append(1))
    out, dx, grads = _grads(hc, branch, x, gy, fused=True)
    hook.remove()
    assert bool(norm_calls) != fused_norm, "the LayerNorm was not fused" if fused_norm else "the norm did not run"
    _assert_matches_float64_eager((out, dx, grads), hc, branch, x, gy)


@pytest.mark.parametrize("dynamic", [True, False])
def test_saved_tensor_hooks_that_copy_keep_the_fused_backward_exact(dynamic):
    # The width connection keeps its per-token scratch (projections, norms, LayerNorm statistics) in
    # one saved buffer and addresses it by offset. Hooks that hand the backward a copy of every saved
    # tensor (as offloading does) free the original: the backward must read the copy. The original
    # scratch (the one flat saved tensor that is not a parameter) is poisoned here, so that reading
    # it instead cannot pass by luck.
    dim, streams = 24, 4
    hc = _perturbed(
        HyperConnection(
            HyperConnection.Config(streams=streams, dynamic=dynamic), dim=dim, layer_index=1, norm=nn.LayerNorm(dim)
        ),
        6,
    )
    branch = nn.Sequential(nn.Linear(dim, dim), nn.Tanh())
    g = torch.Generator().manual_seed(7)
    x, gy = torch.randn(3, 11, streams, dim, generator=g), torch.randn(3, 11, streams, dim, generator=g)
    packed = []

    def pack(t):
        packed.append(1)
        copy = t.clone()
        if t.dim() == 1 and not t.requires_grad and not isinstance(t, nn.Parameter):
            # all bits set: a NaN; written behind autograd's back, which forbids changing a packed tensor
            ctypes.memset(t.data_ptr(), 0xFF, t.numel() * t.element_size())
        return copy

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fused = _grads(hc, branch, x, gy, fused=True)
    assert packed, "no tensor went through the hooks"
    _assert_matches_float64_eager(fused, hc, branch, x, gy)


@pytest.mark.parametrize("make_norm", [lambda d: LayerNorm(dim=d), nn.LayerNorm], ids=["LayerNorm0", "LayerNorm1"])
def test_fused_path_keeps_the_norms_shape_error(make_norm):
    # a branch norm of another width must fail as on the eager path, not be read past its end
    hc = HyperConnection(HyperConnection.Config(streams=4), dim=16, layer_index=0, norm=make_norm(8))
    with hyper_fused.use_fused_hyper(True), pytest.raises((ValueError, RuntimeError), match="8"):
        hc(torch.randn(2, 3, 4, 16), nn.Identity())


def test_fused_dropout_placements_match_eager():
    for placement in ("branch", "stream"):
        hc = _perturbed(
            HyperConnection(
                HyperConnection.Config(streams=4, dropout=0.5, dropout_placement=placement), dim=16, layer_index=0
            ),
            3,
        )
        branch = nn.Linear(16, 16)
        x = torch.randn(2, 9, 4, 16)
        outs = []
        for fused in (False, True):
            torch.manual_seed(7)  # the same dropout mask on both paths
            with hyper_fused.use_fused_hyper(fused):
                outs.append(hc(x, branch))
        torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
        with torch.no_grad(), hyper_fused.use_fused_hyper(True):
            no_dropout = hc.eval()(x, branch)
        hc.train()
        # dropout took effect (the same mask on both paths), so the agreement above is not trivial
        assert not torch.allclose(outs[1], no_dropout, atol=1e-3)


def test_fused_path_is_skipped_where_it_does_not_apply(monkeypatch):
    calls = []
    monkeypatch.setattr(hyper_fused, "depth_connection", lambda *a: calls.append(1))
    x = torch.randn(2, 5, 4, 16)
    cases = [
        HyperConnection(HyperConnection.Config(streams=4, num_fracs=2), dim=16, layer_index=0),
        HyperConnection(HyperConnection.Config(streams=4), dim=16, layer_index=0, depth_residual_fn=lambda a, b: a + b),
        ManifoldHyperConnection(ManifoldHyperConnection.Config(streams=4), dim=16, layer_index=0),
    ]
    for hc in cases:
        hc(x, nn.Identity())
    HyperConnection(HyperConnection.Config(streams=4), dim=16, layer_index=0).double()(x.double(), nn.Identity())
    # the kernel reads the stream norm's gain through a raw pointer too: a float64 gain keeps it out
    mixed = HyperConnection(HyperConnection.Config(streams=4), dim=16, layer_index=0)
    mixed.norm.double()
    mixed(x, nn.Identity())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        HyperConnection(HyperConnection.Config(streams=4), dim=16, layer_index=0)(x, nn.Identity())
    assert not calls


def test_fused_branch_output_shape_is_checked():
    hc = HyperConnection(HyperConnection.Config(streams=4), dim=16, layer_index=0)
    with pytest.raises(ValueError, match="branch must map dim to dim"):
        hc(torch.randn(2, 5, 4, 16), nn.Linear(16, 8))


def test_fused_kernel_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("ANYDEPTH_FUSED_HYPER", "0")
    kernel = hyper_fused.NativeKernel("hyper", "hyper_connections.cpp", "ANYDEPTH_FUSED_HYPER", hyper_fused._bind)
    assert kernel.enabled is False


def test_kernel_tanh_within_two_ulp_of_float64():
    # the width kernel's branch-free tanh: Taylor series below |x| = 0.55, exp-based above
    x = torch.cat(
        [
            torch.linspace(-12, 12, 400_001),
            torch.tensor([0.0, -0.0, 1e-30, -1e-40, 0.55, -0.55, 0.5499999, 9.0, 1e30, float("inf"), -float("inf")]),
        ]
    ).float()
    y = torch.empty_like(x)
    hyper_fused._KERNEL.lib.anydepth_hc_tanh(x.data_ptr(), y.data_ptr(), x.numel())
    ref = torch.tanh(x.double())
    err = (y.double() - ref).abs()
    assert err.max() < 1.2e-7
    big = x.abs() > 1e-3
    assert (err[big] / ref[big].abs()).max() < 2.4e-7  # two float32 ulps
    assert torch.equal(torch.signbit(y), torch.signbit(x))  # odd, -0.0 included
    nan = torch.tensor([float("nan")])
    hyper_fused._KERNEL.lib.anydepth_hc_tanh(nan.data_ptr(), nan.data_ptr(), 1)
    assert nan.isnan().all()


@pytest.mark.parametrize("channel_first", [False, True])
def test_seed_api_takes_the_fused_path_and_matches_eager(channel_first, monkeypatch):
    from anydepth.compat.hyper_connections import get_init_and_expand_reduce_stream_functions

    init, expand, reduce = get_init_and_expand_reduce_stream_functions(4)
    conv = nn.Conv2d(16, 16, 1) if channel_first else nn.Linear(16, 16)
    hc = _perturbed(init(dim=16, branch=conv, layer_index=1, channel_first=channel_first), 5)
    x = torch.randn((2, 16, 3, 5) if channel_first else (2, 7, 16))
    gy = torch.randn(x.shape)
    results = []
    real = hyper_fused.depth_connection
    calls = []
    monkeypatch.setattr(hyper_fused, "depth_connection", lambda *a: calls.append(1) or real(*a))
    for fused in (False, True):  # eager in float64 as the reference, fused in float32
        calls.clear()
        dtype = torch.float32 if fused else torch.float64
        hc.to(dtype)
        with hyper_fused.use_fused_hyper(fused):
            hc.zero_grad(set_to_none=True)
            xa = x.to(dtype).requires_grad_()
            out = reduce(hc(expand(xa)))
            out.backward(gy.to(dtype))
        assert bool(calls) == fused
        # copies: hc.to() converts the gradients in place
        results.append((out.detach().double(), xa.grad.double(), [p.grad.double().clone() for p in hc.parameters()]))
    (o0, g0, p0), (o1, g1, p1) = results
    torch.testing.assert_close(o1, o0, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(g1, g0, atol=2e-5, rtol=2e-5)
    for a, b in zip(p1, p0):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_stream_sized_outputs_of_32_mib_ask_for_huge_pages(vma_flags):
    # glibc maps such allocations afresh; the depth forward's output and the width backward's dH get
    # the huge-page advice before their first write, as the RMSNorm kernel's outputs do
    hc = HyperConnection(HyperConnection.Config(streams=4), dim=1024, layer_index=0)
    x = torch.randn(2, 1025, 4, 1024, requires_grad=True)  # 33.6 MB of streams
    seen = []
    lib = hyper_fused._KERNEL.lib
    real = lib.anydepth_hc_width_backward

    def spy(args):
        status = real(args)
        seen.append(vma_flags(args.dh + (4 << 20)))
        return status

    lib.anydepth_hc_width_backward = spy
    try:
        out = hc(x, nn.Identity())
        assert "hg" in vma_flags(out.data_ptr() + (4 << 20))
        out.sum().backward()
    finally:
        lib.anydepth_hc_width_backward = real
    assert seen and "hg" in seen[0]


def test_double_backward_needs_the_eager_path():
    hc = _perturbed(HyperConnection(HyperConnection.Config(streams=4), dim=16, layer_index=0), 9)
    x = torch.randn(2, 3, 4, 16, requires_grad=True)
    (g,) = torch.autograd.grad(hc(x, nn.Linear(16, 16)).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula was registered"):
        g.sum().backward()
    with hyper_fused.use_fused_hyper(False):
        (g,) = torch.autograd.grad(hc(x, nn.Linear(16, 16)).pow(2).sum(), x, create_graph=True)
        g.sum().backward()  # the eager path differentiates twice
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_sums_over_many_tokens_keep_float32_accuracy():
    # the static matrices' and the scales' gradients are sums over every token, stream and column
    # (here 2100 x 16 x 17 terms): their per-thread partial sums must not lose digits to the count
    torch.manual_seed(0)
    hc = _perturbed(HyperConnection(HyperConnection.Config(streams=16), dim=3, layer_index=2, norm=nn.LayerNorm(3)), 11)
    branch = nn.Linear(3, 3)
    x = torch.randn(3, 700, 16, 3)
    gy = torch.randn(x.shape)
    _, dx, grads = _grads(hc, branch, x, gy, fused=True)
    _, dx_ref, grads_ref = _grads(hc.double(), branch.double(), x.double(), gy.double(), fused=False)
    for name, g in {"x": dx, **grads}.items():
        ref = dx_ref if name == "x" else grads_ref[name]
        err = (g.double() - ref).abs().max() / ref.abs().max()
        # the scales sum ~570k terms: float partial sums left them 2e-5 and 4e-6 off
        bound = 1e-6 if name.endswith("_scale") else 1e-5
        assert err < bound, (name, err.item())


@pytest.mark.parametrize("mhc", [False, True])
def test_seed_api_applies_the_residual_transform_once(mhc):
    # the path choice (fused or eager) is made after the transform, which must run once per call:
    # a transform with dropout would otherwise draw its mask twice
    from anydepth.compat.hyper_connections import (
        HyperConnections,
        ManifoldConstrainedHyperConnections,
    )

    calls = []

    class Counting(nn.Module):
        def forward(self, x):
            calls.append(1)
            return x

    if mhc:
        hc = ManifoldConstrainedHyperConnections(4, dim=16, branch=nn.Linear(16, 16), residual_transform=Counting())
    else:
        hc = HyperConnections(4, dim=16, branch=nn.Linear(16, 16))
        hc.residual_transform = Counting()
    hc(torch.randn(8, 5, 16))
    assert len(calls) == 1


class _Chain(nn.Module):
    """Three hyper-connected sublayers in a row: each depth connection's output feeds the next width
    connection directly, so the fused path links them (the width backward does the depth backward's
    branch part). ``tap`` returns the intermediate streams as well, for extra uses of them."""

    def __init__(self, dim: int, streams: int, dynamic: bool):
        super().__init__()
        self.res = nn.ModuleList(
            _perturbed(
                HyperConnection(
                    HyperConnection.Config(streams=streams, dynamic=dynamic),
                    dim=dim,
                    layer_index=i,
                    norm=nn.LayerNorm(dim),
                ),
                i,
            )
            for i in range(3)
        )
        self.branches = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.Tanh()) for _ in range(3))

    def forward(self, x, edit=None):
        taps = []
        for i, (res, f) in enumerate(zip(self.res, self.branches)):
            x = res(x, f)
            if edit is not None and i == 0:
                x = edit(x)
            taps.append(x)
        return x, taps


def _chain_grads(model, x, loss_fn, fused, edit=None):
    model.zero_grad(set_to_none=True)
    with hyper_fused.use_fused_hyper(fused):
        xa = x.clone().requires_grad_()
        out, taps = model(xa, edit)
        loss_fn(out, taps).backward()
    return xa.grad, {k: p.grad for k, p in model.named_parameters()}


def _count_depth_kernel(monkeypatch) -> list:
    """The stream stride of each depth backward kernel call."""
    lib, calls = hyper_fused._KERNEL.lib, []
    real = lib.anydepth_hc_depth_backward
    monkeypatch.setattr(lib, "anydepth_hc_depth_backward", lambda a: calls.append(a.g_ss) or real(a))
    return calls


def _weights(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize(
    "case",
    ["chain", "extra_use", "edited_in_place", "reduced"],
    ids=["chain", "extra-use", "edited-in-place", "reduced"],
)
@pytest.mark.parametrize("dim", [37, 32])  # 32: whole 16-lane rows, written with streaming stores
def test_chained_sublayers_equal_eager_float64(monkeypatch, dynamic, case, dim):
    streams = 4
    model = _Chain(dim, streams, dynamic)
    x = _weights((2, 13, streams, dim), 5)
    w_out, w_tap = _weights(x.shape, 6), _weights(x.shape, 7)
    # extra_use: the first sublayer's output also enters the loss, so its gradient is more than what
    # the next width backward computes; edited_in_place: the stream is changed in place between
    # sublayers; reduced: the loss sees the sum of the streams, whose gradient reaches the last
    # sublayer as one row per token broadcast to every stream (stride 0)
    extra = case == "extra_use"
    edit = (lambda t: t.mul_(1.5)) if case == "edited_in_place" else None

    def loss_fn(out, taps):
        if case == "reduced":
            return (out.sum(-2) * w_out[..., 0, :].to(out.dtype)).sum()
        loss = (out * w_out.to(out.dtype)).sum()
        return loss + (taps[0] * w_tap.to(out.dtype)).pow(2).sum() if extra else loss

    strides = _count_depth_kernel(monkeypatch)
    dx, grads = _chain_grads(model, x, loss_fn, True, edit)
    # one depth backward per sublayer
    assert len(strides) == 3
    # the broadcast gradient is read in place, not copied to n rows first
    assert strides[0] == (0 if case == "reduced" else dim)
    dx_ref, grads_ref = _chain_grads(model.double(), x.double(), loss_fn, False, edit)
    torch.testing.assert_close(dx.double(), dx_ref, atol=5e-5, rtol=5e-5)
    for name, g in grads.items():
        torch.testing.assert_close(g.double(), grads_ref[name], atol=2e-4, rtol=2e-4, msg=name)


def _spy_broadcast_rows(monkeypatch) -> list[bool]:
    """Per width connection, whether it took its streams as one broadcast row."""
    seen, real = [], hyper_fused._broadcast_row

    def spy(h):
        row = real(h)
        seen.append(row is not None)
        return row

    monkeypatch.setattr(hyper_fused, "_broadcast_row", spy)
    return seen


def _two_sublayers(dim, streams, dynamic, norm, x, gy, materialise: bool):
    """reduce(hc2(hc1(expand(x)))) with perturbed connections: output, x's gradient, parameter gradients
    and the stream stride of what expand returned (materialised with .contiguous() when asked)."""
    torch.manual_seed(0)
    hcs = nn.ModuleList(
        _perturbed(
            HyperConnection(
                HyperConnection.Config(streams=streams, dynamic=dynamic), dim=dim, layer_index=i, norm=norm(dim)
            ),
            7 + i,
        )
        for i in range(2)
    )
    branch = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
    xa = x.clone().requires_grad_()
    h = hcs[0].expand(xa)
    stride = h.stride(-2)
    if materialise:
        h = h.contiguous()
    out = hcs[0].reduce(hcs[1](hcs[0](h, branch), branch))
    out.backward(gy)
    grads = [p.grad for p in [*hcs.parameters(), *branch.parameters()]]
    return out.detach(), xa.grad, grads, stride


@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("streams,dim,tokens", [(4, 32, 9), (2, 37, 9), (4, 37, 300)])
@pytest.mark.parametrize("norm", [nn.LayerNorm, lambda d: None], ids=["layernorm", "none"])
def test_expand_view_gives_the_materialised_streams_result(dynamic, streams, dim, tokens, norm, monkeypatch):
    # expand() hands the fused kernels one row per token with a stream stride of 0, and the first width
    # backward returns x's gradient (the sum over the streams) itself; everything must equal the run
    # on n materialised copies, which the tests above check against float64 eager. 2 x 300 tokens x 4
    # streams x 37 take the kernels' two-thread path; 37 leaves a remainder after the 16-lane blocks.
    g = torch.Generator().manual_seed(3)
    x, gy = torch.randn(2, tokens, dim, generator=g), torch.randn(2, tokens, dim, generator=g)
    rows = _spy_broadcast_rows(monkeypatch)
    out, dx, grads, stride = _two_sublayers(dim, streams, dynamic, norm, x, gy, materialise=False)
    assert rows == [True, False]  # the first sublayer read the broadcast row, the second real streams
    rows.clear()
    ref_out, ref_dx, ref_grads, ref_stride = _two_sublayers(dim, streams, dynamic, norm, x, gy, materialise=True)
    assert rows == [False, False]
    assert stride == 0 and ref_stride == 0  # the reference copies the same view
    # the kernels read the same values in the same order: bitwise equal but for x's gradient, which
    # the kernel sums over the streams where autograd summed the materialised copies' gradients
    assert torch.equal(out, ref_out)
    for got, want in zip(grads, ref_grads):
        assert torch.equal(got, want)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-6, atol=1e-6)


def test_expand_materialises_the_streams_where_the_kernels_will_not_read_them():
    hc = HyperConnection(HyperConnection.Config(streams=4), dim=16, layer_index=0)
    x = torch.randn(2, 3, 16)
    assert hc.expand(x).stride(-2) == 0
    with hyper_fused.use_fused_hyper(False):
        assert hc.expand(x).is_contiguous()  # the eager path's batched matmuls want copies
    assert hc.double().expand(x.double()).is_contiguous()  # the kernels are float32 only
    mhc = ManifoldHyperConnection(ManifoldHyperConnection.Config(streams=4), dim=16, layer_index=0)
    assert mhc.expand(x).is_contiguous()  # mHC keeps the eager path
    assert hc.float().expand(x.transpose(0, 1)).is_contiguous()  # a strided residual is copied
    assert HyperConnection(HyperConnection.Config(streams=1), dim=16, layer_index=0).expand(x) is x


def test_a_broadcast_view_of_another_tensor_is_read_as_it_is(monkeypatch):
    # x is itself a view (of a flat buffer): its broadcast has no base of x's shape, so the connection
    # takes its streams as given (copied to n rows) and the gradient reaches the buffer through autograd
    dim, streams = 24, 4
    g = torch.Generator().manual_seed(4)
    flat, gy = torch.randn(2 * 5 * dim, generator=g), torch.randn(2, 5, dim, generator=g)
    hc = _perturbed(
        HyperConnection(HyperConnection.Config(streams=streams), dim=dim, layer_index=1, norm=nn.LayerNorm(dim)), 2
    )
    branch = nn.Linear(dim, dim)
    rows = _spy_broadcast_rows(monkeypatch)
    grads = []
    for view in (True, False):
        buf = flat.clone().requires_grad_()
        x = buf.view(2, 5, dim)
        h = hyper_fused.broadcast_streams(x, streams) if view else x.unsqueeze(-2).repeat(1, 1, streams, 1)
        out = hc.reduce(hc(h, branch))
        out.backward(gy)
        grads.append((out.detach(), buf.grad))
    assert rows == [False, False]  # no base of x's shape: taken as the n streams it shows
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("layer_norm", [True, False])
def test_the_kernels_are_torch_library_ops_with_fake_and_autograd(dynamic, layer_norm):
    n, d = 4, 32
    gen = torch.Generator().manual_seed(3)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).requires_grad_()

    h = rnd(2, 5, n, d)
    wa, wb, gamma = (rnd(d, n + 1, scale=0.1), rnd(d, scale=0.1), rnd(d, scale=0.1)) if dynamic else (None,) * 3
    sa, sb = (rnd((), scale=0.1), rnd((), scale=0.1)) if dynamic else (None, None)
    ln = (rnd(d), rnd(d), 1e-5) if layer_norm else (None, None, 0.0)
    args = (h, wa, wb, gamma, 2.0, rnd(n, n + 1), rnd(n), sa, sb, True, *ln, 0)
    torch.library.opcheck(hyper_fused.width_op, args)
    h_in, alpha, beta, aux, token = hyper_fused.width_op(*args)
    # the depth op on inputs of its own graph (the token as the width op makes it: stride 0 over one element)
    token_leaf = torch.zeros(1, requires_grad=True)
    h_leaf = h.detach().requires_grad_()
    depth_args = (h_leaf, token_leaf.expand(token.shape), alpha.detach(), rnd(2, 5, n), rnd(2, 5, d))
    torch.library.opcheck(hyper_fused.depth_op, depth_args)
    # the meta device runs on the fake implementations
    meta = [None if a is None else a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    shapes = [t.shape for t in hyper_fused.width_op(*meta)]
    assert shapes == [t.shape for t in (h_in, alpha, beta, aux, token)]
