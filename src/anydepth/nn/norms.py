"""Normalisation layers: LayerNorm, RMSNorm (full and partial), ScaleNorm.

Every norm normalises over the last dimension and is built from its ``Config`` and ``dim``: by the
registry as ``NORMS.build(kind_or_config, dim=d)``, or by hand as ``RMSNorm(RMSNorm.Config(eps=1e-5),
dim=d)`` or ``RMSNorm.make(dim=d, eps=1e-5)``:

========  ======================  =====================================================================
kind      class                   output for a row ``x`` of ``d`` features
========  ======================  =====================================================================
layer     :class:`LayerNorm`      ``(x - mean(x)) / sqrt(var(x) + eps) * w + b``  (Ba et al., 2016)
rms       :class:`RMSNorm`        ``x / RMS(x) * g (+ b)``                        (Zhang & Sennrich, 2019)
prms      :class:`PartialRMSNorm` the same with RMS taken over the first ``floor(d*p)`` features
scale     :class:`ScaleNorm`      ``g * x / max(||x||_2, eps)``, scalar ``g``      (Nguyen & Salazar, 2019)
========  ======================  =====================================================================

Statistics are computed in float32 (at least) and the result is cast back to the input's dtype, so
float16 and bfloat16 inputs neither underflow ``eps`` nor overflow ``x**2`` (|x| > 256 in float16).

On CPU, RMSNorm runs through a small fused C++ kernel (one read of ``x`` and one write of ``y`` in
the forward; one read of ``x`` and ``dy`` and one write of ``dx`` in the backward, with the weight
gradient reduced from per-thread partial sums). PyTorch's own CPU ``rms_norm`` is a chain of eager
ops with three full-size temporaries, several times slower than its fused LayerNorm. Outputs of
32 MiB or more, which glibc maps afresh, are advised onto transparent huge pages before the kernel
writes them (``anydepth/csrc/huge_pages.h``), so they fault in 2 MiB rather than 4 KiB
pieces. The kernel (``anydepth/csrc/rms_norm.cpp``) is compiled once per machine with the system C++
compiler (about 2 s) into a cache directory, loaded with ``ctypes`` and exposed as the torch.library
ops ``anydepth::rms_norm`` and ``anydepth::rms_norm_backward`` (fake implementations and the autograd
formula registered; the backward is not itself differentiable). Without a compiler, under ``torch.compile`` (which
fuses the eager formula itself), under autocast, ``torch.func`` transforms, tensor subclasses, other
devices or dtypes, the eager formula is used instead; both paths compute the same formula.
``ANYDEPTH_FUSED_NORM=0`` disables the kernel; it is cached under ``$ANYDEPTH_CACHE/kernels``
(default ``~/.cache/anydepth``).
"""

from __future__ import annotations

import ctypes
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anydepth.nn.native import NativeKernel, plain_cpu_op, struct_args
from anydepth.nn.registry import NORMS, Configurable

__all__ = [
    "LayerNorm",
    "RMSNorm",
    "PartialRMSNorm",
    "ScaleNorm",
    "rms_norm",
    "fused_rms_norm_available",
    "use_fused_rms_norm",
]

log = logging.getLogger(__name__)

EPS_PLACEMENTS = ("inside", "outside")


# --------------------------------------------------------------------------------------------------
# argument checks


def _check_dim(owner: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{owner}: {name} must be a positive int (the size of the normalised last dimension), "
            f"got {type(value).__name__} {value!r}"
        )
    if value <= 0:
        raise ValueError(
            f"{owner}: {name} must be a positive int (the size of the normalised last dimension), "
            f"got {name}={value}"
        )
    return value


def _check_eps(owner: str, eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{owner}: eps must be a finite float >= 0 (e.g. 1e-6), got eps={eps!r}")
    return float(eps)


def _check_placement(owner: str, eps_placement) -> str:
    if eps_placement not in EPS_PLACEMENTS:
        raise ValueError(
            f"{owner}: eps_placement={eps_placement!r} is not one of {EPS_PLACEMENTS}; use 'outside' for "
            "x / (RMS(x) + eps) (the RMSNorm paper's code) or 'inside' for x / sqrt(mean(x^2) + eps) "
            "(torch.nn.RMSNorm)"
        )
    return eps_placement


def _check_p(owner: str, p, *, allow_disabled: bool) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"{owner}: p must be a float, got {type(p).__name__} {p!r}")
    if allow_disabled and p == -1:
        return -1.0
    if not 0 < p <= 1:
        fix = "pass p in (0, 1] (the paper suggests 0.0625)"
        if allow_disabled:
            fix += " for partial RMSNorm, or p=-1.0 to use all features"
        raise ValueError(f"{owner}: p={p!r} is outside (0, 1]; {fix}")
    return float(p)


def _partial_size(owner: str, d: int, p: float) -> int:
    """Number of leading features the statistic uses: all for p == -1, else ``int(d * p)`` (the seed's rounding)."""
    if p == -1:
        return d
    k = int(d * p)
    if k == 0:
        raise ValueError(
            f"{owner}: p={p!r} with d={d} gives floor(d*p)=0 features for the statistic; "
            f"use p >= 1/d = {1 / d:.6g}, or p=-1.0 for all features"
        )
    return k


def _check_input(owner: str, x, dim: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner} expects a torch.Tensor input, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{owner} expects a floating-point input, got dtype {x.dtype}; convert it with x.float() first"
        )
    if x.dim() == 0 or x.shape[-1] != dim:
        last = x.shape[-1] if x.dim() else "none (a 0-d tensor)"
        raise ValueError(
            f"{owner}: the input's last dimension is {last} (shape {tuple(x.shape)}) but the norm was built "
            f"for {dim} features; normalise inputs of shape (..., {dim}) or build the norm with that size"
        )


def _opmath(dtype: torch.dtype) -> torch.dtype:
    # float16/bfloat16 statistics in float32: 1e-8 underflows in float16 and x**2 overflows for |x| > 256
    return torch.promote_types(dtype, torch.float32)


# --------------------------------------------------------------------------------------------------
# RMSNorm: eager formula


def _rms_norm_eager(x: Tensor, weight: Tensor, bias: Tensor | None, k: int, eps: float, inside: bool) -> Tensor:
    d = x.shape[-1]
    if inside and k == d and bias is None and weight.dtype == x.dtype:
        # torch's own op: identical results to torch.nn.RMSNorm, and fused where torch has a kernel (CUDA)
        return F.rms_norm(x, (d,), weight, eps)
    xf = x.to(_opmath(x.dtype))
    head = xf if k == d else xf[..., :k]
    if inside:
        r = torch.rsqrt(head.square().mean(-1, keepdim=True) + eps)
    else:
        # vector_norm (not sqrt of a mean) so that the gradient at an all-zero row is 0, not NaN
        r = 1.0 / (torch.linalg.vector_norm(head, dim=-1, keepdim=True) * k**-0.5 + eps)
    y = xf * r * weight.to(xf.dtype)
    if bias is not None:
        y = y + bias.to(xf.dtype)
    return y.to(x.dtype)


# --------------------------------------------------------------------------------------------------
# RMSNorm: fused CPU kernel
#
# Forward, per row:  ms = sum_{j<k} x_j^2 / k;  r = 1/sqrt(ms + eps) (inside) or 1/(sqrt(ms) + eps);
#                    y_j = x_j * r * w_j (+ b_j)
# Backward, per row: g_j = dy_j * w_j;  s = sum_j g_j x_j;
#                    dx_j = r g_j - c x_j [j < k],  c = s r^3 / k (inside) or s r^2 / (k sqrt(ms)) (outside,
#                    0 when ms == 0, matching the subgradient of ||x|| at 0);
#                    dw_j = sum_rows dy_j x_j r,  db_j = sum_rows dy_j.
# r is recomputed in the backward from the row already in cache, so nothing but x is saved.

_FUSED_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}


class _RmsNormArgs(ctypes.Structure):
    """``AnydepthRmsNormArgs`` of ``csrc/rms_norm.cpp``, field for field."""

    _fields_ = [
        ("x", ctypes.c_void_p),
        ("w", ctypes.c_void_p),
        ("b", ctypes.c_void_p),
        ("y", ctypes.c_void_p),
        ("dy", ctypes.c_void_p),
        ("dx", ctypes.c_void_p),
        ("dw", ctypes.c_void_p),
        ("db", ctypes.c_void_p),
        ("rows", ctypes.c_int64),
        ("d", ctypes.c_int64),
        ("k", ctypes.c_int64),
        ("eps", ctypes.c_float),
        ("inside", ctypes.c_int32),
        ("nthreads", ctypes.c_int32),
    ]


def _bind(lib) -> None:
    args = ctypes.POINTER(_RmsNormArgs)
    for tag in _FUSED_DTYPES.values():
        fwd = getattr(lib, f"anydepth_rms_forward_{tag}")
        fwd.argtypes, fwd.restype = [args], None
        bwd = getattr(lib, f"anydepth_rms_backward_{tag}")
        bwd.argtypes, bwd.restype = [args], ctypes.c_int


def _Kernel() -> NativeKernel:
    return NativeKernel("rmsnorm", "rms_norm.cpp", "ANYDEPTH_FUSED_NORM", _bind)


_KERNEL = _Kernel()


def fused_rms_norm_available() -> bool:
    """True if the fused CPU RMSNorm kernel is enabled and built (building it on the first call)."""
    return _KERNEL.available()


def use_fused_rms_norm(enabled: bool):
    """Context manager that turns the fused CPU RMSNorm kernel on or off (e.g. to time the eager path)."""
    return _KERNEL.use(enabled)


def _fused_ok(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    if not _KERNEL.enabled or x.dtype not in _FUSED_DTYPES or x.numel() == 0:
        return False
    if weight.dtype not in _FUSED_DTYPES or (bias is not None and bias.dtype not in _FUSED_DTYPES):
        return False
    return plain_cpu_op(x, weight, bias) and _KERNEL.get() is not None


def _as_f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().to(torch.float32).contiguous()


def _ptr(t: Tensor | None):
    return None if t is None else t.data_ptr()


def _fused_forward(x2: Tensor, w32: Tensor, b32: Tensor | None, k: int, eps: float, inside: bool) -> Tensor:
    rows, d = x2.shape
    y = torch.empty_like(x2)
    fn = getattr(_KERNEL.lib, f"anydepth_rms_forward_{_FUSED_DTYPES[x2.dtype]}")
    fn(struct_args(_RmsNormArgs, x=x2.data_ptr(), w=w32.data_ptr(), b=_ptr(b32), y=y.data_ptr(), rows=rows, d=d, k=k,
                   eps=eps, inside=int(inside), nthreads=torch.get_num_threads()))
    return y


# The kernel as torch.library ops: torch.compile, torch.export, the meta device and the dispatcher see
# one op with a fake (shape) implementation and a registered autograd formula. Without the built kernel
# each op computes the eager formula (the reference).


@torch.library.custom_op("anydepth::rms_norm", mutates_args=(), device_types="cpu")
def rms_norm_op(x: Tensor, weight: Tensor, bias: Tensor | None, k: int, eps: float, inside: bool) -> Tensor:
    """:func:`rms_norm` of a contiguous ``(rows, d)`` float32 or bfloat16 ``x`` through the fused kernel."""
    if _KERNEL.get() is None:
        return _rms_norm_eager(x, weight, bias, k, eps, inside)
    return _fused_forward(x, _as_f32(weight), _as_f32(bias), k, eps, inside)


@rms_norm_op.register_fake
def _(x, weight, bias, k, eps, inside):
    return torch.empty_like(x)


@torch.library.custom_op("anydepth::rms_norm_backward", mutates_args=(), device_types="cpu")
def rms_norm_backward_op(
    dy: Tensor, x: Tensor, weight: Tensor, bias: bool, k: int, eps: float, inside: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)`` of :func:`rms_norm_op` (the closed form in the comment above); ``dbias`` is
    empty without a bias. Not itself differentiable."""
    x = x.contiguous()
    dy = dy.to(x.dtype).contiguous()
    rows, d = x.shape
    if _KERNEL.get() is None:
        with torch.enable_grad():
            xg, wg = x.detach().requires_grad_(), weight.detach().requires_grad_()
            bg = torch.zeros(d, dtype=weight.dtype, requires_grad=True) if bias else None
            y = _rms_norm_eager(xg, wg, bg, k, eps, inside)
            grads = torch.autograd.grad(y, [xg, wg] + ([bg] if bias else []), dy)
        return grads[0], grads[1], grads[2] if bias else weight.new_empty(0)
    w32 = _as_f32(weight)
    dx = torch.empty_like(x)
    dw = torch.zeros(d, dtype=torch.float32)
    db = torch.zeros(d, dtype=torch.float32) if bias else None
    fn = getattr(_KERNEL.lib, f"anydepth_rms_backward_{_FUSED_DTYPES[x.dtype]}")
    status = fn(struct_args(_RmsNormArgs, x=x.data_ptr(), w=w32.data_ptr(), dy=dy.data_ptr(), dx=dx.data_ptr(),
                            dw=dw.data_ptr(), db=_ptr(db), rows=rows, d=d, k=k, eps=eps, inside=int(inside),
                            nthreads=torch.get_num_threads()))
    if status != 0:
        raise MemoryError(f"fused RMSNorm backward could not allocate its {d}-wide partial sums")
    return dx, dw.to(weight.dtype), weight.new_empty(0) if db is None else db.to(weight.dtype)


@rms_norm_backward_op.register_fake
def _(dy, x, weight, bias, k, eps, inside):
    return torch.empty_like(x), torch.empty_like(weight), weight.new_empty(weight.shape[0] if bias else 0)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, bias, k, eps, inside = inputs
    ctx.save_for_backward(x, weight)
    ctx.k, ctx.eps, ctx.inside = k, eps, inside
    ctx.b_dtype = None if bias is None else bias.dtype


def _rms_norm_backward(ctx, dy):
    x, weight = ctx.saved_tensors
    dx, dw, db = rms_norm_backward_op(dy, x, weight, ctx.b_dtype is not None, ctx.k, ctx.eps, ctx.inside)
    return dx, dw, None if ctx.b_dtype is None else db.to(ctx.b_dtype), None, None, None


rms_norm_op.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)


def rms_norm(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    k: int | None = None,
    eps: float = 1e-6,
    eps_placement: str = "inside",
) -> Tensor:
    """Functional RMSNorm over the last dimension.

    ``y = x / RMS(x[..., :k]) * weight (+ bias)`` with ``RMS = sqrt(mean(x[..., :k]^2) + eps)`` for
    ``eps_placement="inside"`` or ``sqrt(mean(x[..., :k]^2)) + eps`` for ``"outside"``; ``k`` (1..d)
    defaults to all features. Computed in float32 for half-precision inputs; the result has the input's
    dtype. ``weight`` (and ``bias``) must have ``d = x.shape[-1]`` elements; the modules check ``x``.
    """
    d = x.shape[-1]
    k = d if k is None else k
    # the kernel indexes raw memory: out-of-range sizes must not reach it
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d:
        raise ValueError(f"rms_norm: k={k!r} must be an int in [1, {d}] (the features the statistic uses)")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (d,):
            raise ValueError(f"rms_norm: {name} has shape {tuple(t.shape)}; it must be ({d},) for inputs (..., {d})")
    inside = _check_placement("rms_norm", eps_placement) == "inside"
    if not _fused_ok(x, weight, bias):
        return _rms_norm_eager(x, weight, bias, k, eps, inside)
    return rms_norm_op(x.reshape(-1, d).contiguous(), weight, bias, k, eps, inside).view(x.shape)


# --------------------------------------------------------------------------------------------------
# modules


@NORMS.register("layer")
class LayerNorm(Configurable, nn.Module):
    """Layer normalisation (Ba, Kiros & Hinton, 2016, "Layer Normalization", arXiv:1607.06450).

    ``y = (x - mean(x)) / sqrt(var(x) + eps) * weight (+ bias)`` over the last dimension (biased
    variance). ``bias=False`` drops the additive term (as in PaLM). Parameters are named
    ``weight`` and ``bias`` like ``torch.nn.LayerNorm``, so its state dicts load. Runs torch's fused
    ``layer_norm``; an input whose dtype differs from the parameters' is normalised in float32 and
    cast back.
    """

    @dataclass(kw_only=True)
    class Config:
        eps: float = 1e-5  # torch.nn.LayerNorm's default, so converted checkpoints behave the same
        bias: bool = True  # False gives the bias-free LayerNorm of PaLM (one parameter vector fewer)

        def __post_init__(self) -> None:
            _check_eps("LayerNorm.Config", self.eps)

    def __init__(self, cfg: LayerNorm.Config | None = None, *, dim: int):
        super().__init__()
        cfg = self.config_of(cfg)
        self.dim = _check_dim("LayerNorm", "dim", dim)
        self.eps = cfg.eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if cfg.bias else None

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        _check_input("LayerNorm", x, self.dim)
        if x.dtype == self.weight.dtype:
            return F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)
        dt = _opmath(x.dtype)
        b = None if self.bias is None else self.bias.to(dt)
        return F.layer_norm(x.to(dt), (self.dim,), self.weight.to(dt), b, self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, bias={self.bias is not None}"


@NORMS.register("rms")
class RMSNorm(Configurable, nn.Module):
    """Root mean square layer normalisation (Zhang & Sennrich, NeurIPS 2019, "Root Mean Square Layer
    Normalization"), with the signature and semantics of the paper's ``rmsnorm_torch.RMSNorm``.

    ``y = x / RMS(x) * scale (+ offset)`` over the last dimension, where with ``k = d`` (``p = -1``)
    or ``k = floor(d*p)`` (partial RMSNorm, ``0 < p <= 1``; the statistic comes from the first ``k``
    features only)::

        eps_placement="outside":  RMS(x) = sqrt(sum_{j<k} x_j^2 / k) + eps     (the paper's code, default)
        eps_placement="inside":   RMS(x) = sqrt(sum_{j<k} x_j^2 / k + eps)     (torch.nn.RMSNorm)

    Parameters are named ``scale`` (ones) and ``offset`` (zeros, only with ``bias=True``) as in the
    original, so its state dicts load. Half-precision inputs are normalised in float32 and cast back.
    With ``eps_placement="inside"``, all features and no bias, the eager path is
    ``torch.nn.functional.rms_norm``; on CPU a fused kernel computes the same formula (module docstring).

    Constraints: ``d >= 1``; ``p == -1`` or ``0 < p <= 1`` with ``floor(d*p) >= 1``; ``eps >= 0``. With
    ``"outside"`` and ``eps = 0`` an all-zero row divides by zero. The original's signature and defaults
    (``RMSNorm(d, p=-1., eps=1e-8, bias=False)``, eps outside) are :class:`anydepth.compat.rmsnorm.RMSNorm`.
    """

    @dataclass(kw_only=True)
    class Config:
        eps: float = 1e-6  # with 'inside': torchscale/HF value; bounds 1/RMS by 1e3 on all-zero rows
        p: float = -1.0  # -1 uses every feature; 0 < p <= 1 estimates the RMS from the first floor(d*p)
        bias: bool = False  # RMSNorm drops re-centring by design; an offset is the paper's option
        eps_placement: str = "inside"  # bounded gradient at zero rows; torch.nn.RMSNorm checkpoints port as-is

        def __post_init__(self) -> None:
            _check_eps("RMSNorm.Config", self.eps)
            _check_p("RMSNorm.Config", self.p, allow_disabled=True)
            _check_placement("RMSNorm.Config", self.eps_placement)

    def __init__(self, cfg: RMSNorm.Config | None = None, *, dim: int):
        super().__init__()
        cfg = self.config_of(cfg)
        owner = type(self).__name__
        d = self.d = _check_dim(owner, "dim", dim)
        self.p = cfg.p
        self.k = _partial_size(owner, d, self.p)
        self.eps = cfg.eps
        self.eps_placement = cfg.eps_placement
        self.bias = cfg.bias  # a flag, as in the original; the parameter is ``offset``
        self.scale = nn.Parameter(torch.ones(d))
        if cfg.bias:
            self.offset = nn.Parameter(torch.zeros(d))
        else:
            self.register_parameter("offset", None)

    @property
    def dim(self) -> int:
        return self.d

    def reset_parameters(self) -> None:
        nn.init.ones_(self.scale)
        if self.offset is not None:
            nn.init.zeros_(self.offset)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(type(self).__name__, x, self.d)
        return rms_norm(x, self.scale, self.offset, k=self.k, eps=self.eps, eps_placement=self.eps_placement)

    def extra_repr(self) -> str:
        return f"{self.d}, p={self.p}, eps={self.eps}, bias={self.bias}, eps_placement={self.eps_placement!r}"


@NORMS.register("prms")
class PartialRMSNorm(RMSNorm):
    """Partial RMSNorm (pRMSNorm, Zhang & Sennrich 2019): :class:`RMSNorm` whose statistic is
    estimated from the first ``floor(d*p)`` features only, ``RMS(x) = sqrt(sum_{j<k} x_j^2 / k (+eps))``.

    The paper suggests ``p = 6.25%``. The estimate assumes the features are exchangeable, so the result
    depends on the feature order. Constraints: ``0 < p <= 1`` and ``floor(d*p) >= 1``.
    """

    @dataclass(kw_only=True)
    class Config:
        p: float = 0.0625  # the paper's suggested fraction: the statistic from 1/16 of the features
        eps: float = 1e-6  # as RMSNorm.Config
        bias: bool = False  # as RMSNorm.Config
        eps_placement: str = "inside"  # as RMSNorm.Config: smooth gradient at zero rows

        def __post_init__(self) -> None:
            _check_eps("PartialRMSNorm.Config", self.eps)
            _check_p("PartialRMSNorm.Config", self.p, allow_disabled=False)
            _check_placement("PartialRMSNorm.Config", self.eps_placement)



@NORMS.register("scale")
class ScaleNorm(Configurable, nn.Module):
    """ScaleNorm (Nguyen & Salazar, 2019, "Transformers without Tears", arXiv:1910.05895).

    ``y = g * x / max(||x||_2, eps)`` over the last dimension, with one learned scalar ``g``
    initialised to ``sqrt(d)`` as in the paper (so that at init ``||y|| = sqrt(d)``, the norm of a
    unit-variance vector). Half-precision inputs are normalised in float32 and cast back.
    Constraints: ``dim >= 1``, ``eps >= 0``.
    """

    @dataclass(kw_only=True)
    class Config:
        eps: float = 1e-5  # the paper's clamp; keeps all-zero rows finite

        def __post_init__(self) -> None:
            _check_eps("ScaleNorm.Config", self.eps)

    def __init__(self, cfg: ScaleNorm.Config | None = None, *, dim: int):
        super().__init__()
        self.dim = _check_dim("ScaleNorm", "dim", dim)
        self.eps = self.config_of(cfg).eps
        self.g = nn.Parameter(torch.tensor(math.sqrt(dim)))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.g.fill_(math.sqrt(self.dim))

    def forward(self, x: Tensor) -> Tensor:
        _check_input("ScaleNorm", x, self.dim)
        xf = x.to(_opmath(x.dtype))
        norm = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).clamp_min(self.eps)
        return (xf * (self.g.to(xf.dtype) / norm)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


@NORMS.register("dyt")
class DyT(Configurable, nn.Module):
    """Dynamic Tanh (Zhu, Chen, He, LeCun & Liu, 2025, "Transformers without Normalization",
    arXiv:2503.10622), a drop-in replacement for a norm layer with no statistics.

    ``y = weight * tanh(alpha * x) + bias`` elementwise, with one learned scalar ``alpha``
    (``alpha_init``, 0.5 in the paper) and per-channel ``weight`` (ones) and ``bias`` (zeros).
    It squashes extreme activations like LayerNorm does in trained models, but does not rescale:
    a positive scale of the input is *not* divided out. Half-precision inputs are computed in float32.
    Constraints: ``dim >= 1``; ``alpha_init > 0`` (a non-positive alpha flips or flattens the map).
    """

    # no per-row statistics: a scheme that up-weights the skip (Admin, DeepNorm) cannot rely on it to
    # divide the scale back out (the rule table reads this; norms without the attribute have statistics)
    has_statistics = False

    @dataclass(kw_only=True)
    class Config:
        alpha_init: float = 0.5  # the paper's default; it lowers alpha for wider LLMs

        def __post_init__(self) -> None:
            _check_alpha("DyT.Config", self.alpha_init)

    def __init__(self, cfg: DyT.Config | None = None, *, dim: int):
        super().__init__()
        self.dim = _check_dim("DyT", "dim", dim)
        self.alpha_init = float(self.config_of(cfg).alpha_init)
        self.alpha = nn.Parameter(torch.full((), self.alpha_init))
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.alpha.fill_(self.alpha_init)
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        _check_input("DyT", x, self.dim)
        dt = _opmath(x.dtype)
        y = torch.tanh(self.alpha.to(dt) * x.to(dt))
        return torch.addcmul(self.bias.to(dt), y, self.weight.to(dt)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, alpha_init={self.alpha_init}"


def _check_alpha(owner: str, alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(
            f"{owner}: alpha_init must be a finite number > 0 (the paper uses 0.5), got alpha_init={alpha!r}"
        )
    return float(alpha)
