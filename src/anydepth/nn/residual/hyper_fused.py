"""Fused CPU kernels for the width and depth connections of (static or dynamic) hyper-connections.

A hyper-connected sublayer does little arithmetic around its branch (a few n x d products per
token) but, in eager torch, a dozen passes over the n-wide residual: norm, projection, batched
mixing, split, multiply-add, their backwards, and the gradient concatenations. On CPU those passes,
not the FLOPs, are what a 4-stream model pays. These kernels do the per-token work of each
connection in one pass over the streams, with hand-derived backwards. For one token with streams
``H`` (n x d), ``W = g [W_a | w_b]`` (d x K, K = n + 2; the stream norm's gain
``g = sqrt(d) (1 + gamma)`` folded in by the kernel), scales ``s_a``, ``s_b``::

    width:  r_s = max(||H_s||, 1e-12)     P_s = H_s W / r_s                      (dynamic only)
            alpha = act(P[:, :n+1]) s_a + A_static      beta = act(P[:, n+1]) s_b + B_static
            h_in = sum_s alpha[s, 0] H_s                (the branch input; its pre-norm follows,
                                                         inside the kernel when it is a LayerNorm)
    depth:  H_new_c = sum_s alpha[s, 1 + c] H_s + beta_c y          (y: the branch output)

The backward, with ``G = dL/dH_new`` and ``g = dL/dh_in``, is split so that each stream-sized
tensor is read once and ``dH`` written once. The depth backward computes only the branch's part::

    dy = sum_c beta_c G_c        dbeta_c = G_c . y

and hands ``G`` on unmixed; the width backward reads ``G`` with ``H`` and does the rest::

    dalpha[s, 0] = H_s . g       dalpha[s, 1 + c] = H_s . G_c
    dP = [dalpha, dbeta] * [s_a, s_b] * act'(P)      q_s = dP_s / r_s    c_s = (q_s . P_s) / r_s
    dH_s = sum_c alpha[s, 1 + c] G_c + alpha[s, 0] g + W q_s - c_s H_s    dW += H_s^T q_s

(``c_s`` only where ``||H_s|| > 1e-12``), plus the sums over tokens for ``A_static``, ``B_static``,
``s_a``, ``s_b``. With the branch's LayerNorm fused, ``g`` first comes from the gradient ``g_o`` of
the norm's output, with ``h_in`` recomputed from ``H``: ``xh = (h_in - mu) rstd``,
``g = rstd (g_o w - mean(g_o w) - xh mean(g_o w xh))``, and ``dw += g_o xh``, ``db += g_o``
(Ba et al., 2016, arXiv:1607.06450).

Float32 only; tokens run in parallel (OpenMP), parameter gradients are reduced from per-thread
partial sums. The C++ is ``anydepth/csrc/hyper_connections.cpp``; the kernels are the torch.library
ops ``anydepth::hc_width``, ``anydepth::hc_depth`` and their backward ops (fake implementations and
autograd formulas registered).
:class:`~anydepth.nn.residual.hyper.HyperConnection` uses these where :func:`fused_ok` allows and its eager
path otherwise (other dtypes, fractions, several input views, mHC, custom depth functions, autocast,
``torch.compile``, ``torch.func``); ``tests/nn/test_hyper.py`` checks that both paths agree.
``ANYDEPTH_FUSED_HYPER=0`` (or ``use_fused_hyper(False)``) disables the kernels; do that for
double backward (``create_graph=True``, e.g. gradient penalties): the backward ops are not
themselves differentiable, and autograd says so rather than returning a wrong second derivative.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from anydepth.nn.native import NativeKernel, plain_cpu_op, plain_cpu_tensor, struct_args

__all__ = [
    "MAX_STREAMS",
    "broadcast_streams",
    "fused_ok",
    "plain_f32",
    "width_connection",
    "depth_connection",
    "use_fused_hyper",
]

MAX_STREAMS = 16

class _WidthArgs(ctypes.Structure):
    """``AnydepthHcWidthArgs`` of ``csrc/hyper_connections.cpp``, field for field."""

    _fields_ = [
        ("h", ctypes.c_void_p),
        ("h_ts", ctypes.c_int64),
        ("h_ss", ctypes.c_int64),
        ("wt", ctypes.c_void_p),
        ("wa", ctypes.c_void_p),
        ("wb", ctypes.c_void_p),
        ("gamma", ctypes.c_void_p),
        ("scale", ctypes.c_float),
        ("a_static", ctypes.c_void_p),
        ("b_static", ctypes.c_void_p),
        ("sa", ctypes.c_float),
        ("sb", ctypes.c_float),
        ("use_tanh", ctypes.c_int32),
        ("p", ctypes.c_void_p),
        ("pact", ctypes.c_void_p),
        ("r", ctypes.c_void_p),
        ("alpha", ctypes.c_void_p),
        ("beta", ctypes.c_void_p),
        ("h_in", ctypes.c_void_p),
        ("ln_w", ctypes.c_void_p),
        ("ln_b", ctypes.c_void_p),
        ("ln_eps", ctypes.c_float),
        ("ln_mu", ctypes.c_void_p),
        ("ln_rstd", ctypes.c_void_p),
        ("gin", ctypes.c_void_p),
        ("gdepth", ctypes.c_void_p),
        ("galpha", ctypes.c_void_p),
        ("gbeta", ctypes.c_void_p),
        ("g_ts", ctypes.c_int64),
        ("g_ss", ctypes.c_int64),
        ("dh", ctypes.c_void_p),
        ("dwa", ctypes.c_void_p),
        ("dwb", ctypes.c_void_p),
        ("dgamma", ctypes.c_void_p),
        ("da_static", ctypes.c_void_p),
        ("db_static", ctypes.c_void_p),
        ("dscale", ctypes.c_void_p),
        ("dln_w", ctypes.c_void_p),
        ("dln_b", ctypes.c_void_p),
        ("m_tokens", ctypes.c_int64),
        ("n", ctypes.c_int64),
        ("d", ctypes.c_int64),
        ("nthreads", ctypes.c_int32),
    ]


class _DepthArgs(ctypes.Structure):
    """``AnydepthHcDepthArgs`` of ``csrc/hyper_connections.cpp``, field for field."""

    _fields_ = [
        ("h", ctypes.c_void_p),
        ("h_ts", ctypes.c_int64),
        ("h_ss", ctypes.c_int64),
        ("alpha", ctypes.c_void_p),
        ("beta", ctypes.c_void_p),
        ("y", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("g", ctypes.c_void_p),
        ("g_ts", ctypes.c_int64),
        ("g_ss", ctypes.c_int64),
        ("dbeta", ctypes.c_void_p),
        ("dy", ctypes.c_void_p),
        ("m_tokens", ctypes.c_int64),
        ("n", ctypes.c_int64),
        ("d", ctypes.c_int64),
        ("nthreads", ctypes.c_int32),
    ]


def _bind(lib) -> None:
    width, depth = ctypes.POINTER(_WidthArgs), ctypes.POINTER(_DepthArgs)
    lib.anydepth_hc_width_forward.argtypes, lib.anydepth_hc_width_forward.restype = [width], None
    lib.anydepth_hc_width_backward.argtypes, lib.anydepth_hc_width_backward.restype = [width], ctypes.c_int
    lib.anydepth_hc_depth_forward.argtypes, lib.anydepth_hc_depth_forward.restype = [depth], None
    lib.anydepth_hc_depth_backward.argtypes, lib.anydepth_hc_depth_backward.restype = [depth], None
    p = ctypes.c_void_p
    lib.anydepth_hc_tanh.argtypes, lib.anydepth_hc_tanh.restype = [p, p, ctypes.c_int64], None


_KERNEL = NativeKernel("hyper", "hyper_connections.cpp", "ANYDEPTH_FUSED_HYPER", _bind)


def use_fused_hyper(enabled: bool):
    """Context manager that turns the fused hyper-connection kernels on or off."""
    return _KERNEL.use(enabled)


def fused_ok(h: Tensor, *params: Tensor | None) -> bool:
    """Whether the kernels can stand in for the eager formula on these tensors (float32, CPU, plain
    tensors, no tracing or transform active, at most ``MAX_STREAMS`` streams)."""
    if not _KERNEL.enabled or h.dtype != torch.float32 or h.dim() < 2 or h.numel() == 0:
        return False
    if h.shape[-2] > MAX_STREAMS or any(p is not None and p.dtype != torch.float32 for p in params):
        return False
    return plain_cpu_op(h, *params) and _KERNEL.get() is not None


def plain_f32(t: Tensor) -> bool:
    """Whether the kernels can read ``t`` through its pointer as it is: a plain (not subclassed),
    contiguous float32 CPU tensor. The per-call checks of tracing and transforms are
    :func:`fused_ok`'s."""
    return plain_cpu_tensor(t) and t.dtype == torch.float32 and t.is_contiguous()


def _ptr(t: Tensor | None):
    return None if t is None else t.data_ptr()


def _contiguous(t: Tensor) -> Tensor:
    # .contiguous() of a contiguous tensor returns it, but through the dispatcher: a few microseconds
    # per call, a dozen calls per sublayer and step
    return t if t.is_contiguous() else t.contiguous()


def _stream_rows(g: Tensor) -> tuple[Tensor, int, int]:
    """``(g, token stride, stream stride)`` for streams ``(..., n, d)``, or their gradient, as the kernels
    read them: contiguous, or one row per token broadcast to the n streams (stride 0), which is how the
    gradient of the streams' sum arrives at the stack's last sublayer and how ``expand`` hands the
    residual to its first. Those are read as they are rather than copied to n rows (8 MiB per copy at
    the benchmark's size); anything else is copied."""
    n, d = g.shape[-2:]
    if g.is_contiguous():
        return g, n * d, d
    if g.stride(-1) == 1 and g.stride(-2) == 0 and g.select(-2, 0).is_contiguous():
        return g, d, 0
    return g.contiguous(), n * d, d


def _check_kernel() -> None:
    if _KERNEL.get() is None:
        raise RuntimeError(
            f"the hyper-connection kernel is not built ({_KERNEL.error}); HyperConnection uses its eager "
            "formula where fused_ok() is False"
        )


def _lead(h: Tensor, streams: int) -> tuple:
    """``(lead, m, n, d, h_ts, h_ss)``: ``h`` is ``(*lead, n, d)``, or with ``streams`` > 0 one row per
    token ``(*lead, d)`` that every stream holds (read by a stream stride of 0)."""
    if streams == 0:
        lead, (n, d) = h.shape[:-2], h.shape[-2:]
        return lead, lead.numel(), n, d, n * d, d
    lead, d = h.shape[:-1], h.shape[-1]
    return lead, lead.numel(), streams, d, d, 0


def _aux_sizes(m: int, n: int, d: int, dynamic: bool, ln: bool) -> list[int]:
    """Element counts of the arrays in the width forward's ``aux``: the packed projection W^T (n + 2, d),
    the projections and their activations (m, n, n + 2), the stream norms (m, n), the LayerNorm's mean
    and 1/std (m); 0 for an absent one."""
    return [(n + 2) * d, m * n * (n + 2), m * n * (n + 2), m * n] * dynamic + [0] * 4 * (not dynamic) + (
        [m, m] if ln else [0, 0]
    )


def _addresses(aux: Tensor, sizes: list[int]) -> list[int | None]:
    base, out, at = aux.data_ptr(), [], 0
    for size in sizes:
        out.append(base + 4 * at if size else None)
        at += size
    return out


def _scalar(t: Tensor | None) -> float:
    return 0.0 if t is None else t.item()


# The kernels as torch.library ops, so that the dispatcher, torch.compile, torch.export and the meta
# device see one op each (with a fake implementation) and autograd a registered formula.
#
# hc_width returns, besides the branch input and the coefficients, ``aux`` (what its backward reads)
# and ``token``: a tensor of the streams' shape and no memory of its own (stride 0 over one element)
# that hc_depth takes as an input and hands the incoming ``G = dL/dH_new`` back to, unmixed. The width
# backward then computes ``dH = A_r G + ...`` and ``dalpha[:, 1:] = H G^T`` in the pass over ``H``
# and ``G`` that its own terms need, and the depth backward only ``dy`` and ``dbeta``: each
# stream-sized tensor read once. hc_depth gives ``h`` and ``alpha`` no gradient of its own, which
# is exact as long as ``h``, ``alpha`` and ``token`` come from one hc_width (the gradient is linear
# in ``G``, so several depth connections over one width connection are exact too).


@torch.library.custom_op("anydepth::hc_width", mutates_args=(), device_types="cpu")
def width_op(
    h: Tensor, wa: Tensor | None, wb: Tensor | None, gamma: Tensor | None, scale: float, a_static: Tensor,
    b_static: Tensor, sa: Tensor | None, sb: Tensor | None, use_tanh: bool, ln_w: Tensor | None, ln_b: Tensor | None,
    ln_eps: float, streams: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The width connection (module docstring): ``(h_in, alpha, beta, aux, token)``. ``h`` is ``(..., n, d)``
    (contiguous), or with ``streams`` > 0 one row per token ``(..., d)`` that every stream holds."""
    _check_kernel()
    lead, m, n, d, h_ts, h_ss = _lead(h, streams)
    sizes = _aux_sizes(m, n, d, wa is not None, ln_w is not None)
    aux = h.new_empty(sum(sizes))
    wt, p, pact, r, mu, rstd = _addresses(aux, sizes)
    alpha, beta, h_in = h.new_empty(*lead, n, n + 1), h.new_empty(*lead, n), h.new_empty(*lead, d)
    _KERNEL.lib.anydepth_hc_width_forward(struct_args(
        _WidthArgs, h=h.data_ptr(), h_ts=h_ts, h_ss=h_ss, wt=wt, wa=_ptr(wa), wb=_ptr(wb), gamma=_ptr(gamma),
        scale=scale, a_static=a_static.data_ptr(), b_static=b_static.data_ptr(), sa=_scalar(sa), sb=_scalar(sb),
        use_tanh=int(use_tanh), p=p, pact=pact, r=r, alpha=alpha.data_ptr(), beta=beta.data_ptr(),
        h_in=h_in.data_ptr(), ln_w=_ptr(ln_w), ln_b=_ptr(ln_b), ln_eps=ln_eps, ln_mu=mu, ln_rstd=rstd,
        m_tokens=m, n=n, d=d, nthreads=torch.get_num_threads(),
    ))
    return h_in, alpha, beta, aux, h.new_zeros(1).expand(*lead, n, d)


@width_op.register_fake
def _(h, wa, wb, gamma, scale, a_static, b_static, sa, sb, use_tanh, ln_w, ln_b, ln_eps, streams):
    lead, m, n, d, _, _ = _lead(h, streams)
    aux = h.new_empty(sum(_aux_sizes(m, n, d, wa is not None, ln_w is not None)))
    token = h.new_zeros(1).expand(*lead, n, d)
    return h.new_empty(*lead, d), h.new_empty(*lead, n, n + 1), h.new_empty(*lead, n), aux, token


@torch.library.custom_op("anydepth::hc_width_backward", mutates_args=(), device_types="cpu")
def width_backward_op(
    g_in: Tensor | None, g_alpha: Tensor | None, g_beta: Tensor | None, g_depth: Tensor | None, h: Tensor,
    aux: Tensor, alpha: Tensor, wa: Tensor | None, wb: Tensor | None, gamma: Tensor | None, scale: float,
    sa: Tensor | None, sb: Tensor | None, use_tanh: bool, ln_w: Tensor | None, ln_bias: bool, streams: int,
) -> list[Tensor]:
    """``[dh, dwa, dwb, dgamma, da_static, db_static, dscale (2,), dln_w, dln_b]`` of :func:`width_op`
    (module docstring), an empty tensor for each one that does not apply. Not itself differentiable."""
    _check_kernel()
    lead, m, n, d, h_ts, h_ss = _lead(h, streams)
    dynamic = wa is not None
    wt, p, pact, r, mu, rstd = _addresses(aux, _aux_sizes(m, n, d, dynamic, ln_w is not None))
    g_in = h.new_zeros(*lead, d) if g_in is None else _contiguous(g_in)
    g_depth, g_ts, g_ss = (h.new_zeros(*lead, n, d), n * d, d) if g_depth is None else _stream_rows(g_depth)
    g_alpha = None if g_alpha is None else _contiguous(g_alpha)
    g_beta = None if g_beta is None else _contiguous(g_beta)
    # with streams, the gradient of the broadcast row (the kernel sums the streams); the kernel writes
    # every output whole: no zero fill. An output that does not apply is an empty tensor of its own
    # (an op's outputs may not alias one another)
    dh = torch.empty_like(h)
    dwa, dwb, dgamma = (torch.empty_like(t) if dynamic else h.new_empty(0) for t in (wa, wb, gamma))
    da, db, ds = h.new_empty(n, n + 1), h.new_empty(n), h.new_empty(2)
    dln_w = torch.empty_like(ln_w) if ln_w is not None else h.new_empty(0)
    dln_b = torch.empty_like(ln_w) if ln_w is not None and ln_bias else h.new_empty(0)
    status = _KERNEL.lib.anydepth_hc_width_backward(struct_args(
        _WidthArgs, gin=g_in.data_ptr(), gdepth=g_depth.data_ptr(), h=h.data_ptr(), h_ts=h_ts, h_ss=h_ss, wt=wt,
        p=p, pact=pact, r=r, alpha=alpha.data_ptr(), galpha=_ptr(g_alpha), gbeta=_ptr(g_beta), sa=_scalar(sa),
        sb=_scalar(sb),
        use_tanh=int(use_tanh), dh=dh.data_ptr(), wa=_ptr(wa), wb=_ptr(wb), gamma=_ptr(gamma), scale=scale,
        dwa=_ptr(dwa) if dynamic else None, dwb=_ptr(dwb) if dynamic else None,
        dgamma=_ptr(dgamma) if dynamic else None, da_static=da.data_ptr(), db_static=db.data_ptr(),
        dscale=ds.data_ptr(), ln_w=_ptr(ln_w), ln_mu=mu, ln_rstd=rstd, dln_w=_ptr(dln_w) if dln_w.numel() else None,
        dln_b=_ptr(dln_b) if dln_b.numel() else None, m_tokens=m, n=n, d=d, g_ts=g_ts, g_ss=g_ss,
        nthreads=torch.get_num_threads(),
    ))
    if status != 0:
        raise MemoryError("hyper-connection width backward could not allocate its partial sums")
    return [dh, dwa, dwb, dgamma, da, db, ds, dln_w, dln_b]


@width_backward_op.register_fake
def _(g_in, g_alpha, g_beta, g_depth, h, aux, alpha, wa, wb, gamma, scale, sa, sb, use_tanh, ln_w, ln_bias, streams):
    lead, m, n, d, _, _ = _lead(h, streams)
    dyn = [torch.empty_like(t) if wa is not None else h.new_empty(0) for t in (wa, wb, gamma)]
    norm = [torch.empty_like(ln_w) if ln_w is not None else h.new_empty(0),
            torch.empty_like(ln_w) if ln_w is not None and ln_bias else h.new_empty(0)]
    return [torch.empty_like(h), *dyn, h.new_empty(n, n + 1), h.new_empty(n), h.new_empty(2), *norm]


def _width_setup(ctx, inputs, output):
    h, wa, wb, gamma, scale, a_static, b_static, sa, sb, use_tanh, ln_w, ln_b, ln_eps, streams = inputs
    _, alpha, _, aux, _ = output
    ctx.save_for_backward(h, aux, alpha, wa, wb, gamma, ln_w, sa, sb)
    ctx.plan = (scale, use_tanh, ln_b is not None, streams)
    ctx.set_materialize_grads(False)


def _width_backward(ctx, g_in, g_alpha, g_beta, g_aux, g_depth):
    h, aux, alpha, wa, wb, gamma, ln_w, sa, sb = ctx.saved_tensors
    scale, use_tanh, ln_bias, streams = ctx.plan
    scaled = sa is not None
    dh, dwa, dwb, dgamma, da, db, ds, dln_w, dln_b = width_backward_op(
        g_in, g_alpha, g_beta, g_depth, h, aux, alpha, wa, wb, gamma, scale, sa, sb, use_tanh, ln_w, ln_bias, streams
    )
    need = ctx.needs_input_grad
    dynamic = wa is not None
    dsa, dsb = ds.unbind() if scaled else (None, None)
    return (
        dh, dwa if dynamic and need[1] else None, dwb if dynamic and need[2] else None,
        dgamma if dynamic and need[3] else None, None, da, db, dsa, dsb, None,
        dln_w if ln_w is not None else None, dln_b if ln_bias else None, None, None,
    )


width_op.register_autograd(_width_backward, setup_context=_width_setup)


@torch.library.custom_op("anydepth::hc_depth", mutates_args=(), device_types="cpu")
def depth_op(h: Tensor, token: Tensor, alpha: Tensor, beta: Tensor, y: Tensor) -> Tensor:
    """``H_new_c = sum_s alpha[s, 1 + c] H_s + beta_c y``; ``h`` contiguous or one row per token broadcast
    to the streams (stride 0); ``token`` is :func:`width_op`'s (see above)."""
    _check_kernel()
    n, d = h.shape[-2:]
    m = y.numel() // d
    rows, h_ts, h_ss = _stream_rows(h)
    out = h.new_empty(h.shape)
    _KERNEL.lib.anydepth_hc_depth_forward(struct_args(
        _DepthArgs, h=rows.data_ptr(), h_ts=h_ts, h_ss=h_ss, alpha=alpha.data_ptr(), beta=beta.data_ptr(),
        y=y.data_ptr(), out=out.data_ptr(), m_tokens=m, n=n, d=d, nthreads=torch.get_num_threads(),
    ))
    return out


@depth_op.register_fake
def _(h, token, alpha, beta, y):
    return h.new_empty(h.shape)


@torch.library.custom_op("anydepth::hc_depth_backward", mutates_args=(), device_types="cpu")
def depth_backward_op(g: Tensor, beta: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``(dbeta, dy)`` of :func:`depth_op`: ``dy = sum_c beta_c G_c``, ``dbeta_c = y . G_c``. Not itself
    differentiable."""
    _check_kernel()
    n = beta.shape[-1]
    m = beta.numel() // n
    rest, g_ts, g_ss = _stream_rows(g)
    dbeta, dy = torch.empty_like(beta), torch.empty_like(y)
    _KERNEL.lib.anydepth_hc_depth_backward(struct_args(
        _DepthArgs, g=rest.data_ptr(), g_ts=g_ts, g_ss=g_ss, beta=beta.data_ptr(), y=y.data_ptr(),
        dbeta=dbeta.data_ptr(), dy=dy.data_ptr(), m_tokens=m, n=n, d=y.shape[-1], nthreads=torch.get_num_threads(),
    ))
    return dbeta, dy


@depth_backward_op.register_fake
def _(g, beta, y):
    return torch.empty_like(beta), torch.empty_like(y)


def _depth_setup(ctx, inputs, output):
    _, _, _, beta, y = inputs
    ctx.save_for_backward(beta, y)


def _depth_backward(ctx, g):
    beta, y = ctx.saved_tensors
    need = ctx.needs_input_grad
    dbeta = dy = None
    if need[3] or need[4]:
        dbeta, dy = depth_backward_op(g, beta, y)
    # G goes back unmixed through the token to the width backward, which mixes it (see above)
    return None, g if need[1] else None, None, dbeta if need[3] else None, dy if need[4] else None


depth_op.register_autograd(_depth_backward, setup_context=_depth_setup)


def width_connection(
    h: Tensor,
    dynamic: tuple[Tensor, Tensor, Tensor, float] | None,
    a_static: Tensor,
    b_static: Tensor,
    sa: Tensor | None,
    sb: Tensor | None,
    use_tanh: bool,
    layer_norm: tuple[Tensor, Tensor | None, float] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``h (..., n, d)`` -> ``(h_in (..., d), alpha (..., n, n+1), beta (..., n), h)``. ``dynamic`` is
    ``(W_a (d, n+1), w_b (d,), gamma (d,), scale)``: the dynamic projections and the stream norm's gain
    ``scale (1 + gamma)``, which the kernel folds into them; None for static hyper-connections. Pass
    the returned ``h`` (the streams and the op's token) to :func:`depth_connection` and nowhere else:
    the gradient of ``H_new`` then comes back here unmixed (see :func:`width_op`). ``layer_norm =
    (weight (d,), bias (d,) or None, eps)`` applies the branch's LayerNorm to ``h_in`` inside the kernel."""
    d = h.shape[-1]
    wa = wb = gamma = None
    scale = 0.0
    if dynamic is not None:
        wa, wb, gamma, scale = dynamic
        wa, wb, gamma = _contiguous(wa), _contiguous(wb if wb.dim() == 1 else wb.reshape(d)), _contiguous(gamma)
    ln_w, ln_b, ln_eps = layer_norm or (None, None, 0.0)
    streams = 0
    row = _broadcast_row(h)
    if row is not None:
        h, streams = row, h.shape[-2]
    else:
        # any leading shape goes through as it is: the kernels see flat tokens, and reshaped views would
        # each cost an autograd node in both directions
        h = _contiguous(h)
    h_in, alpha, beta, _, token = width_op(
        h, wa, wb, gamma, float(scale), _contiguous(a_static), _contiguous(b_static), sa, sb, bool(use_tanh), ln_w,
        ln_b, float(ln_eps), streams,
    )
    h = h if streams == 0 else h.unsqueeze(-2).expand(*h.shape[:-1], streams, d)
    return h_in, alpha, beta, (h, token)


def broadcast_streams(x: Tensor, streams: int) -> Tensor:
    """``x (..., d)`` as ``(..., streams, d)`` with every stream the same row, without copying: a view
    with a stream stride of 0. :func:`width_connection` reads it as it is and sends its gradient
    straight to ``x`` (the sum over the streams, formed in the kernel); a copy would cost a pass over
    the n-wide streams forward and the autograd sum over them backward. Writing into the view in
    place is an error (its streams share memory)."""
    return x.unsqueeze(-2).expand(*x.shape[:-1], streams, x.shape[-1])


def _broadcast_row(h: Tensor) -> Tensor | None:
    """The ``(..., d)`` tensor that ``h (..., n, d)`` broadcasts to its streams (a
    :func:`broadcast_streams` view of a contiguous tensor, possibly through autograd), else None."""
    if h.dim() < 2 or h.stride(-2) != 0 or h.shape[-2] < 2:
        return None
    base = h._base
    if (
        base is None
        or base.shape != h.shape[:-2] + h.shape[-1:]
        or not base.is_contiguous()
        or base.data_ptr() != h.data_ptr()
        or h.stride()[:-2] + h.stride()[-1:] != base.stride()
    ):
        return None
    return base


def depth_connection(h: tuple[Tensor, Tensor], alpha: Tensor, beta: Tensor, y: Tensor) -> Tensor:
    """``H_new_c = sum_s alpha[s, 1 + c] H_s + beta_c y`` for ``h`` the streams ``(..., n, d)`` as
    :func:`width_connection` returned them and ``y (..., d)``."""
    streams, token = h
    # the streams as they are: contiguous, or the broadcast row of the stack's first sublayer (read by stride)
    return depth_op(streams, token, _contiguous(alpha), _contiguous(beta), _contiguous(y))
