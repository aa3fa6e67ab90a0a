"""Norms against formulas written here, torch's own layers, and the fused CPU kernel against the eager path.

Reference formulas are evaluated in float64 with autograd, so both the forward and the hand-derived
backward of the fused kernel are checked against an independent computation.
"""

import dataclasses
import math

import pytest
import torch
from torch import nn

from anydepth.compat.rmsnorm import RMSNorm
from anydepth.nn import norms
from anydepth.nn.norms import LayerNorm, PartialRMSNorm, ScaleNorm, use_fused_rms_norm
from anydepth.registry import NORMS, config_from_dict, config_to_dict

FUSED = norms.fused_rms_norm_available()


@pytest.fixture(autouse=True)
def _float32_default():
    # other test modules change the default dtype at import; these tests choose dtypes explicitly
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(prev)


@pytest.fixture(params=["eager", "fused"])
def path(request):
    if request.param == "fused":
        if not FUSED:
            pytest.skip(f"fused kernel unavailable: {norms._KERNEL.error}")
        with use_fused_rms_norm(True):
            yield request.param
    else:
        with use_fused_rms_norm(False):
            yield request.param


def ref_rms(x, scale, offset=None, p=-1.0, eps=1e-8, inside=False):
    """The RMSNorm paper's formula: RMS from the first int(d*p) features, eps outside or inside the root."""
    d = x.shape[-1]
    k = d if not 0 < p <= 1 else int(d * p)
    if inside:
        rms = torch.sqrt((x[..., :k] ** 2).sum(-1, keepdim=True) / k + eps)
    else:
        # the original's ||x|| / sqrt(k): its gradient at an all-zero row is the subgradient 0
        rms = x[..., :k].norm(2, dim=-1, keepdim=True) * k**-0.5 + eps
    y = x / rms * scale
    return y + offset if offset is not None else y


def random_params(m, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prm in m.parameters():
            prm.copy_(torch.rand(prm.shape, generator=g) + 0.5)
    return m


def grads_vs_reference(m, x, ref_fn, atol=2e-5, rtol=1e-4):
    """Output and gradients of module ``m`` on fp32 ``x`` against ``ref_fn`` evaluated in float64."""
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    xa = x.clone().requires_grad_()
    y = m(xa)
    y.backward(gy)
    params = dict(m.named_parameters())
    x64 = x.double().requires_grad_()
    p64 = {n: prm.detach().double().requires_grad_() for n, prm in params.items()}
    y64 = ref_fn(x64, p64)
    y64.backward(gy.double())
    torch.testing.assert_close(y.double(), y64.detach(), atol=atol, rtol=rtol)
    torch.testing.assert_close(xa.grad.double(), x64.grad, atol=atol, rtol=rtol)
    for n, prm in params.items():
        torch.testing.assert_close(prm.grad.double(), p64[n].grad, atol=atol * 10, rtol=rtol)


# ------------------------------------------------------------------------------------------------- registry


def test_registry_builds_each_kind_with_its_config():
    assert {"layer", "rms", "prms", "scale"} <= set(NORMS.kinds())
    assert type(NORMS.build("layer", dim=8)) is LayerNorm
    assert type(NORMS.build("rms", dim=8)) is norms.RMSNorm
    assert type(NORMS.build("prms", dim=32)) is PartialRMSNorm
    assert type(NORMS.build("scale", dim=8)) is ScaleNorm
    ln = NORMS.build(LayerNorm.Config(eps=1e-3, bias=False), dim=8)
    assert ln.eps == 1e-3 and ln.bias is None
    rms = NORMS.build(NORMS.config("rms", p=0.5, eps_placement="outside", bias=True), dim=8)
    assert (rms.k, rms.eps_placement, rms.offset.shape) == (4, "outside", (8,))


def test_builder_defaults_are_torch_placement_and_seed_constructor_keeps_seed_defaults():
    built = NORMS.build("rms", dim=16)
    assert (built.eps, built.eps_placement, built.p, built.offset) == (1e-6, "inside", -1.0, None)
    seed = RMSNorm(16)
    assert (seed.eps, seed.eps_placement, seed.p, seed.bias) == (1e-8, "outside", -1.0, False)
    assert NORMS.build("prms", dim=32).k == 2  # p = 1/16 of 32 features


def test_config_dict_round_trip():
    for kind in ("layer", "rms", "prms", "scale"):
        cfg = NORMS.config(kind)
        d = config_to_dict(cfg)
        assert d["kind"] == kind
        assert config_from_dict(d, NORMS) == cfg
    assert config_to_dict(norms.RMSNorm.Config(p=0.25))["p"] == 0.25


# ------------------------------------------------------------------------------------------------- LayerNorm


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_matches_formula(bias):
    m = random_params(LayerNorm.make(dim=12, eps=1e-5, bias=bias))
    x = torch.randn(3, 5, 12) * 3 + 1

    def ref(x, p):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        y = (x - mu) / torch.sqrt(var + 1e-5) * p["weight"]
        return y + p["bias"] if bias else y

    grads_vs_reference(m, x, ref)


def test_layernorm_loads_torch_state_dict_and_agrees():
    t = random_params(nn.LayerNorm(10))
    m = LayerNorm(dim=10)
    m.load_state_dict(t.state_dict())
    x = torch.randn(4, 10)
    torch.testing.assert_close(m(x), t(x), atol=0, rtol=0)


def test_layernorm_mixed_dtype_computes_in_float32():
    m = random_params(LayerNorm(dim=16))
    x = torch.randn(4, 16).bfloat16()
    y = m(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, m(x.float()).bfloat16(), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("p", [-1.0, 0.25, 1.0])
@pytest.mark.parametrize("placement", ["outside", "inside"])
@pytest.mark.parametrize("bias", [False, True])
def test_rmsnorm_matches_paper_formula_and_gradients(path, p, placement, bias):
    eps = 1e-3  # large enough that a wrong placement is visible at the tolerance
    m = random_params(RMSNorm(16, p=p, eps=eps, bias=bias, eps_placement=placement))
    x = torch.randn(3, 5, 16)
    x[0, 0] = 0.0  # an all-zero row: finite output and finite, subgradient-consistent gradients
    x[1, 1] *= 1e-3  # small activations, where the placement of eps matters most

    def ref(x, prm):
        return ref_rms(x, prm["scale"], prm.get("offset"), p=p, eps=eps, inside=placement == "inside")

    grads_vs_reference(m, x, ref)


def test_rmsnorm_multithreaded_rows_match_formula(path):
    # 64 x 1024 elements is above the kernel's serial threshold: dw is reduced from per-thread sums
    m = random_params(RMSNorm(1024, eps=1e-6, eps_placement="inside"))
    x = torch.randn(64, 1024)
    grads_vs_reference(m, x, lambda x, prm: ref_rms(x, prm["scale"], eps=1e-6, inside=True), atol=5e-5)


def test_rmsnorm_inside_equals_torch_rmsnorm(path):
    ours = random_params(RMSNorm(32, eps=1e-6, eps_placement="inside"))
    theirs = nn.RMSNorm(32, eps=1e-6)
    with torch.no_grad():
        theirs.weight.copy_(ours.scale)
    x = torch.randn(6, 32)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    gy = torch.randn(6, 32)
    ours(x1).backward(gy)
    y2 = theirs(x2)
    y2.backward(gy)
    torch.testing.assert_close(ours(x), y2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.scale.grad, theirs.weight.grad, atol=1e-4, rtol=1e-4)


def test_eager_path_goes_through_f_rms_norm_where_the_configuration_allows(monkeypatch):
    calls = []
    real = norms.F.rms_norm

    def spy(*a, **kw):
        calls.append(a[1])
        return real(*a, **kw)

    monkeypatch.setattr(norms.F, "rms_norm", spy)
    x = torch.randn(2, 8)
    with use_fused_rms_norm(False):
        NORMS.build("rms", dim=8)(x)
        assert calls == [(8,)]
        RMSNorm(8)(x)  # outside placement: not torch's formula
        RMSNorm(8, p=0.5, eps_placement="inside")(x)  # partial statistic
        RMSNorm(8, bias=True, eps_placement="inside")(x)  # bias added in float32 before the cast
    assert calls == [(8,)]


def test_rmsnorm_loads_reference_state_dict():
    """Parameter names are the original's ``scale`` and ``offset``: its state dicts load strictly."""
    reference_state = {"scale": torch.rand(8) + 0.5, "offset": torch.randn(8)}
    m = RMSNorm(8, bias=True)
    m.load_state_dict(reference_state)
    x = torch.randn(3, 8)
    torch.testing.assert_close(m(x), ref_rms(x, reference_state["scale"], reference_state["offset"]))
    assert list(RMSNorm(8).state_dict()) == ["scale"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("placement", ["outside", "inside"])
def test_half_precision_edge_cases_are_finite(path, dtype, placement):
    # |x| > 256 overflows x**2 in float16; 1e18 is near the top of what float32 statistics hold for d=64
    big = 6e4 if dtype == torch.float16 else 1e18
    x = torch.randn(4, 64)
    x[0] = 0.0
    x[1] = torch.rand(64) * 2 * big - big  # within the dtype's range, far beyond 256
    x[2] *= 300.0
    x[3] *= 1e-4
    x = x.to(dtype)
    m = RMSNorm(64, eps_placement=placement).to(dtype)
    xa = x.clone().requires_grad_()
    y = m(xa)
    y.float().sum().backward()
    assert y.dtype == dtype
    assert torch.isfinite(y).all() and torch.isfinite(m.scale.grad).all()
    assert (y[0] == 0).all()
    # d y / d x at an all-zero row is scale / eps: 1e8 with eps=1e-8 outside, beyond float16's 65504
    rows = slice(1, None) if (dtype, placement) == (torch.float16, "outside") else slice(None)
    assert torch.isfinite(xa.grad[rows]).all()
    expected = ref_rms(x.double(), 1.0, eps=1e-8, inside=placement == "inside")
    torch.testing.assert_close(y.double(), expected.to(dtype).double(), atol=2e-2, rtol=1e-2)


def test_half_precision_output_is_float32_math_cast_back(path):
    m = random_params(RMSNorm(32, eps_placement="inside")).bfloat16()
    x = (torch.randn(5, 32) * 500).bfloat16()
    expected = ref_rms(x.float(), m.scale.float(), eps=1e-8, inside=True).bfloat16()
    torch.testing.assert_close(m(x), expected, atol=0, rtol=8e-3)  # one bfloat16 rounding apart at most


# ------------------------------------------------------------------------------------------------- fused path


@pytest.mark.skipif(not FUSED, reason="fused kernel unavailable on this machine")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"eps_placement": "inside", "eps": 1e-6},
        {"p": 0.0625, "bias": True},
        {"p": 0.5, "eps_placement": "inside", "bias": True},
    ],
)
def test_fused_equals_eager(dtype, kw):
    m = random_params(RMSNorm(256, **kw)).to(dtype)
    x = (torch.randn(2, 96, 512) * 2)[..., ::2].to(dtype)  # non-contiguous 3-D input, 192 x 256 rows
    gy = torch.randn(x.shape).to(dtype)
    results = []
    for fused in (False, True):
        with use_fused_rms_norm(fused):
            m.zero_grad(set_to_none=True)
            xa = x.clone().requires_grad_()
            y = m(xa)
            y.backward(gy)
            results.append((y, xa.grad, [p.grad for p in m.parameters()]))
    (ye, gxe, gpe), (yf, gxf, gpf) = results
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 1e-2}
    torch.testing.assert_close(yf, ye, **tol)
    torch.testing.assert_close(gxf, gxe, **tol)
    for a, b in zip(gpf, gpe):
        torch.testing.assert_close(a.float(), b.float(), atol=tol["atol"] * 50, rtol=tol["rtol"] * 5)



@pytest.mark.skipif(not FUSED, reason="fused kernel unavailable on this machine")
def test_fused_outputs_of_32_mib_ask_for_huge_pages(vma_flags):
    # glibc maps each allocation of 32 MiB or more afresh; the kernel advises huge pages on y and dx so
    # their first write faults 2 MiB at a time ("hg" in VmFlags is the advice itself, granted or not)
    d = 1024
    rows = (32 << 20) // (4 * d) + 5
    m = random_params(RMSNorm(d, p=0.5, bias=True))
    x = torch.randn(rows, d, requires_grad=True)
    gy = torch.randn(rows, d)
    y = m(x)
    y.backward(gy)
    assert "hg" in vma_flags(y.data_ptr() + (4 << 20))
    assert "hg" in vma_flags(x.grad.data_ptr() + (4 << 20))
    small = m(torch.randn(64, d))  # below 32 MiB: glibc's heap, no advice
    assert "hg" not in vma_flags(small.data_ptr())
    with use_fused_rms_norm(False):
        xe = x.detach().clone().requires_grad_()
        ye = m(xe)
        ye.backward(gy)
    torch.testing.assert_close(y, ye, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, xe.grad, atol=1e-5, rtol=1e-5)

@pytest.mark.skipif(not FUSED, reason="fused kernel unavailable on this machine")
def test_fused_path_is_taken_and_avoided_where_it_must_be(monkeypatch):
    calls = []
    real = norms._fused_forward
    monkeypatch.setattr(norms, "_fused_forward", lambda *a: calls.append(1) or real(*a))
    m = RMSNorm(16)
    x = torch.randn(4, 16)
    m(x)
    assert len(calls) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(x)
    m(x.half())  # no float16 kernel
    with torch.no_grad():
        torch.func.vmap(m)(x)
    assert len(calls) == 1
    m.scale.requires_grad_(False)
    with torch.inference_mode():
        m(x)
    assert len(calls) == 2


@pytest.mark.skipif(not FUSED, reason="fused kernel unavailable on this machine")
def test_mixed_weight_dtype_fused_equals_eager():
    m = random_params(RMSNorm(64, eps_placement="inside")).bfloat16()
    x = torch.randn(8, 64)
    with use_fused_rms_norm(False):
        ye = m(x)
    yf = m(x)
    assert yf.dtype == ye.dtype == torch.float32
    torch.testing.assert_close(yf, ye, atol=1e-5, rtol=1e-5)


def test_whole_model_torch_compile_traces_the_eager_formula():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(16, 16), RMSNorm(16, p=0.5, bias=True), nn.Linear(16, 4))
    x = torch.randn(3, 16)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    g_compiled = model[1].scale.grad.clone()
    model.zero_grad()
    y_ref = model(x)
    y_ref.sum().backward()
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g_compiled, model[1].scale.grad, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


def test_missing_compiler_falls_back_to_eager(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("ANYDEPTH_CACHE", str(tmp_path / "cache"))
    kernel = norms._Kernel()
    assert kernel.get() is None and "no-such-compiler" in kernel.error
    monkeypatch.setattr(norms, "_KERNEL", kernel)
    assert not norms.fused_rms_norm_available()
    m = RMSNorm(8)
    x = torch.randn(2, 8)
    torch.testing.assert_close(m(x), ref_rms(x, m.scale.detach()))


def test_fused_kernel_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("ANYDEPTH_FUSED_NORM", "0")
    assert norms._Kernel().enabled is False


# ------------------------------------------------------------------------------------------------- partial, scale


def test_partial_rmsnorm_uses_first_features_only(path):
    m = PartialRMSNorm(dim=64)  # p = 1/16 -> statistic from the first 4 features
    assert m.k == 4
    x = torch.randn(2, 64)
    y = m(x)
    x2 = x.clone()
    x2[:, 4:] *= 100  # later features do not enter the statistic, only scale with themselves
    y2 = m(x2)
    torch.testing.assert_close(y2[:, :4], y[:, :4])
    torch.testing.assert_close(y2[:, 4:], y[:, 4:] * 100, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(y, ref_rms(x, 1.0, p=0.0625, eps=1e-6, inside=True))


def test_scalenorm_matches_formula():
    m = ScaleNorm.make(dim=9, eps=1e-5)
    assert m.g.item() == pytest.approx(3.0)  # sqrt(d) at init, as in the paper
    with torch.no_grad():
        m.g.fill_(1.7)
    x = torch.randn(4, 9)
    x[0] = 0.0

    def ref(x, p):
        n = x.norm(2, dim=-1, keepdim=True)  # the subgradient 0 at an all-zero row, like sqrt(sum x^2) elsewhere
        return p["g"] * x / torch.maximum(n, torch.full_like(n, 1e-5))

    grads_vs_reference(m, x, ref)


def test_scalenorm_half_precision_is_finite():
    m = ScaleNorm(dim=64).half()
    x = ((torch.rand(3, 64) * 2 - 1) * 6e4).half()
    x[0] = 0
    y = m(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float().norm(dim=-1)[1:], torch.full((2,), 8.0), rtol=1e-2, atol=0)


# ------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("make", "exc", "words"),
    [
        (lambda: RMSNorm(0), ValueError, ["d", "0", "positive"]),
        (lambda: RMSNorm(-3), ValueError, ["d", "-3", "positive"]),
        (lambda: RMSNorm(8.0), TypeError, ["d", "8.0", "positive int"]),
        (lambda: RMSNorm(16, p=1.5), ValueError, ["p=1.5", "(0, 1]", "p=-1.0"]),
        (lambda: RMSNorm(16, p=0.0), ValueError, ["p=0.0", "(0, 1]"]),
        (lambda: RMSNorm(16, p=-0.5), ValueError, ["p=-0.5", "(0, 1]"]),
        (lambda: RMSNorm(16, p=0.05), ValueError, ["p=0.05", "d=16", "floor(d*p)=0", "0.0625"]),
        (lambda: RMSNorm(8, eps=-1.0), ValueError, ["eps=-1.0", ">= 0"]),
        (lambda: RMSNorm(8, eps_placement="sqrt"), ValueError, ["eps_placement='sqrt'", "inside", "outside"]),
        (lambda: PartialRMSNorm.make(dim=16, p=-1.0), ValueError, ["p=-1.0", "(0, 1]"]),
        (lambda: LayerNorm(dim=0), ValueError, ["dim", "0"]),
        (lambda: ScaleNorm(dim=-1), ValueError, ["dim", "-1"]),
        (lambda: RMSNorm.Config(eps_placement="middle"), ValueError, ["eps_placement='middle'"]),
        (lambda: RMSNorm.Config(p=2.0), ValueError, ["p=2.0"]),
        (lambda: NORMS.config("rms", q=1), TypeError, ["q", "eps_placement"]),
        (lambda: NORMS.build("batch", dim=4), ValueError, ["batch", "rms"]),
    ],
)
def test_bad_construction_names_argument_value_and_fix(make, exc, words):
    with pytest.raises(exc) as info:
        make()
    for w in words:
        assert w in str(info.value), (w, str(info.value))


@pytest.mark.parametrize("norm", [RMSNorm(8), PartialRMSNorm(dim=32), LayerNorm(dim=8), ScaleNorm(dim=8)])
def test_wrong_last_dim_or_dtype_is_rejected_before_torch(norm):
    d = norm.d if isinstance(norm, RMSNorm) else norm.dim
    with pytest.raises(ValueError, match=rf"last dimension is {d + 1}.*built for {d} features"):
        norm(torch.randn(2, d + 1))
    with pytest.raises(ValueError, match="0-d tensor"):
        norm(torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"floating-point input, got dtype torch.int64"):
        norm(torch.ones(2, d, dtype=torch.long))


def test_config_fields_have_defaults_for_every_kind():
    for kind in ("layer", "rms", "prms", "scale"):
        cfg_cls = NORMS.get(kind).Config
        assert all(f.default is not dataclasses.MISSING for f in dataclasses.fields(cfg_cls))
        NORMS.build(kind, dim=64)(torch.randn(2, 64))


def test_rms_of_output_is_scale_at_init():
    """Invariant: with scale = 1 and eps -> 0, every nonzero row of the output has RMS exactly 1."""
    x = torch.randn(5, 48) * torch.logspace(-3, 3, 5)[:, None]
    y = RMSNorm(48, eps=0.0)(x)
    torch.testing.assert_close(y.pow(2).mean(-1).sqrt(), torch.ones(5))
    y = PartialRMSNorm.make(dim=48, p=1.0, eps=0.0)(x)
    assert math.isclose(float(y.detach().pow(2).mean(-1)[0]), 1.0, rel_tol=1e-5)


def test_functional_rms_norm_checks_sizes_before_the_kernel():
    x, w = torch.randn(3, 8), torch.ones(8)
    torch.testing.assert_close(norms.rms_norm(x, w, k=4, eps=0.0), ref_rms(x, w, p=0.5, eps=0.0, inside=True))
    with pytest.raises(ValueError, match=r"k=9 must be an int in \[1, 8\]"):
        norms.rms_norm(x, w, k=9)
    with pytest.raises(ValueError, match=r"k=0 must be"):
        norms.rms_norm(x, w, k=0)
    with pytest.raises(ValueError, match=r"weight has shape \(4,\); it must be \(8,\)"):
        norms.rms_norm(x, torch.ones(4))
    with pytest.raises(ValueError, match=r"bias has shape \(8, 1\)"):
        norms.rms_norm(x, w, torch.zeros(8, 1))
    with pytest.raises(ValueError, match="eps_placement='both'"):
        norms.rms_norm(x, w, eps_placement="both")


@pytest.mark.skipif(not FUSED, reason="fused kernel unavailable on this machine")
@pytest.mark.parametrize("bias", [False, True])
def test_the_kernel_is_a_torch_library_op_with_fake_and_autograd(bias):
    x = torch.randn(6, 16, requires_grad=True)
    w = (1 + 0.1 * torch.randn(16)).requires_grad_()
    b = torch.randn(16, requires_grad=True) if bias else None
    # schema, fake implementation, autograd registration, and the op against itself under each mode
    torch.library.opcheck(norms.rms_norm_op, (x, w, b, 12, 1e-6, True))
    meta = norms.rms_norm_op(torch.empty(6, 16, device="meta"), torch.empty(16, device="meta"), None, 12, 1e-6, True)
    assert meta.shape == (6, 16) and meta.device.type == "meta"
    # its gradient is the eager formula's
    y = norms.rms_norm_op(x, w, b, 12, 1e-6, True)
    ye = norms._rms_norm_eager(x, w, b, 12, 1e-6, True)
    gy = torch.randn(6, 16)
    got = torch.autograd.grad(y, [x, w] + ([b] if bias else []), gy)
    ref = torch.autograd.grad(ye, [x, w] + ([b] if bias else []), gy)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
