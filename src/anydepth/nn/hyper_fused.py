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
partial sums.
:class:`~anydepth.nn.hyper.HyperConnection` uses these where :func:`fused_ok` allows and its eager
path otherwise (other dtypes, fractions, several input views, mHC, custom depth functions, autocast,
``torch.compile``, ``torch.func``); ``tests/nn/test_hyper.py`` checks that both paths agree.
``ANYDEPTH_FUSED_HYPER=0`` (or ``use_fused_hyper(False)``) disables the kernels; do that for
double backward (``create_graph=True``, e.g. gradient penalties): the kernels' backward is not
itself differentiable, and autograd says so rather than returning a wrong second derivative.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

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


def _scalar(t: Tensor | None) -> float:
    return 0.0 if t is None else t.item()


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


def _scratch(like: Tensor, *sizes: int) -> tuple[Tensor, list[int | None]]:
    """One float32 buffer for several arrays that only the kernels read (sizes in elements, 0 for an
    absent one) and their addresses (None where absent). An allocation, or a view, costs a few
    microseconds, as long as these kernels take on a few tokens; addresses cost nothing."""
    buf = like.new_empty(sum(sizes))
    base, out, at = buf.data_ptr(), [], 0
    for size in sizes:
        out.append(base + 4 * at if size else None)
        at += size
    return buf, out


def _width_buffers(like: Tensor, lead, n: int, d: int, dynamic: bool, ln: bool):
    """The width forward's outputs ``(aux, addresses in aux, alpha, beta, h_in)`` for ``lead`` tokens:
    besides ``h`` and ``alpha``, the backward reads the packed projection W^T (n + 2, d), the
    projections and their activations (m, n, n + 2), the stream norms (m, n) and the LayerNorm's mean
    and 1/std (m), all in ``aux``."""
    m = lead.numel()
    sizes = [(n + 2) * d, m * n * (n + 2), m * n * (n + 2), m * n] if dynamic else [0] * 4
    aux, ptrs = _scratch(like, *sizes, *([m, m] if ln else [0, 0]))
    return aux, ptrs, like.new_empty(*lead, n, n + 1), like.new_empty(*lead, n), like.new_empty(*lead, d)


class _Width(torch.autograd.Function):
    """The width connection. With ``ln_w`` the branch input comes out through its LayerNorm
    (``ln_w``, ``ln_b`` or None, ``ln_eps``). With ``streams`` (an int) ``h`` is one row per token,
    ``(..., d)``, that every stream holds (the stack's first sublayer): the kernels read it by a
    stream stride of 0 and the backward returns its gradient, the sum over the streams, directly."""

    @staticmethod
    def forward(ctx, h, wa, wb, gamma, scale, a_static, b_static, sa, sb, use_tanh, ln_w, ln_b, ln_eps, streams):
        if streams is None:
            lead, (n, d) = h.shape[:-2], h.shape[-2:]
            h_ts, h_ss = n * d, d
        else:
            lead, n, d = h.shape[:-1], streams, h.shape[-1]
            h_ts, h_ss = d, 0
        m = lead.numel()
        sa, sb = _scalar(sa), _scalar(sb)
        bufs = _width_buffers(h, lead, n, d, wa is not None, ln_w is not None)
        aux, (wt, p, pact, r, mu, rstd), alpha, beta, h_in = bufs
        _KERNEL.lib.anydepth_hc_width_forward(struct_args(
            _WidthArgs, h=h.data_ptr(), h_ts=h_ts, h_ss=h_ss, wt=wt, wa=_ptr(wa), wb=_ptr(wb), gamma=_ptr(gamma),
            scale=scale, a_static=a_static.data_ptr(), b_static=b_static.data_ptr(), sa=sa, sb=sb,
            use_tanh=int(use_tanh), p=p, pact=pact, r=r, alpha=alpha.data_ptr(), beta=beta.data_ptr(),
            h_in=h_in.data_ptr(), ln_w=_ptr(ln_w), ln_b=_ptr(ln_b), ln_eps=float(ln_eps), ln_mu=mu, ln_rstd=rstd,
            m_tokens=m, n=n, d=d, nthreads=torch.get_num_threads(),
        ))
        ctx.save_for_backward(h, aux, alpha, wa, wb, gamma, ln_w)
        # offsets, not addresses: saved-tensor hooks (offloading, say) may hand back a copy of aux. One
        # attribute for all: each costs a lookup in both directions
        base = aux.data_ptr()
        ctx.plan = ([a - base if a is not None else None for a in (wt, p, pact, r, mu, rstd)], sa, sb,
                    bool(use_tanh), scale, ln_b is not None, (lead, m, n, d, h_ts, h_ss))
        ctx.set_materialize_grads(False)
        # h goes out again for the depth connection, whose backward hands the gradient of H_new back
        # here unmixed (see _Depth.backward): the streams' whole gradient is then one pass
        return h_in, alpha, beta, h if streams is None else h.unsqueeze(-2).expand(*lead, n, d)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_in, g_alpha, g_beta, g_depth):
        h, aux, alpha, wa, wb, gamma, ln_w = ctx.saved_tensors
        offsets, sa, sb, use_tanh, scale, ln_bias, (lead, m, n, d, h_ts, h_ss) = ctx.plan
        base = aux.data_ptr()
        wt, p, pact, r, mu, rstd = [None if a is None else base + a for a in offsets]
        need = ctx.needs_input_grad
        g_in = h.new_zeros(*lead, d) if g_in is None else _contiguous(g_in)
        g_depth, g_ts, g_ss = (h.new_zeros(*lead, n, d), n * d, d) if g_depth is None else _stream_rows(g_depth)
        g_alpha = None if g_alpha is None else _contiguous(g_alpha)
        g_beta = None if g_beta is None else _contiguous(g_beta)
        # with h_ss 0, the gradient of the broadcast row (the kernel sums the streams)
        dh = torch.empty_like(h)
        # the kernel writes these whole: no zero fill
        dynamic = wt is not None
        dwa = torch.empty_like(wa) if dynamic and need[1] else None
        dwb = torch.empty_like(wb) if dynamic and need[2] else None
        dgamma = torch.empty_like(gamma) if dynamic and need[3] else None
        da, db, ds = h.new_empty(n, n + 1), h.new_empty(n), h.new_empty(2)
        dln_w = torch.empty_like(ln_w) if ln_w is not None else None
        dln_b = torch.empty_like(ln_w) if ln_w is not None and ln_bias else None
        status = _KERNEL.lib.anydepth_hc_width_backward(struct_args(
            _WidthArgs, gin=g_in.data_ptr(), gdepth=g_depth.data_ptr(), h=h.data_ptr(), h_ts=h_ts, h_ss=h_ss, wt=wt,
            p=p, pact=pact, r=r, alpha=alpha.data_ptr(), galpha=_ptr(g_alpha), gbeta=_ptr(g_beta), sa=sa, sb=sb,
            use_tanh=int(use_tanh), dh=dh.data_ptr(), wa=_ptr(wa), wb=_ptr(wb), gamma=_ptr(gamma), scale=scale,
            dwa=_ptr(dwa), dwb=_ptr(dwb), dgamma=_ptr(dgamma), da_static=da.data_ptr(), db_static=db.data_ptr(),
            dscale=ds.data_ptr(), ln_w=_ptr(ln_w), ln_mu=mu, ln_rstd=rstd, dln_w=_ptr(dln_w), dln_b=_ptr(dln_b),
            m_tokens=m, n=n, d=d, g_ts=g_ts, g_ss=g_ss, nthreads=torch.get_num_threads(),
        ))
        if status != 0:
            raise MemoryError("hyper-connection width backward could not allocate its partial sums")
        norm = (dln_w, dln_b, None, None)
        if not dynamic:
            return dh, None, None, None, None, da, db, None, None, None, *norm
        return dh, dwa, dwb, dgamma, None, da, db, *ds.unbind(), None, *norm


class _Depth(torch.autograd.Function):
    """``H_new = A_r^T H + beta y`` whose backward computes only ``dy`` and ``dbeta``.

    For ``h`` it returns the incoming ``G = dL/dH_new`` unmixed, and nothing for ``alpha``: ``h`` and
    ``alpha`` are outputs of :class:`_Width`, whose backward receives ``G`` and computes
    ``dH = A_r G + ...`` and ``dalpha[:, 1:] = H G^T`` there, while it reads ``H`` and ``G`` for its
    own terms anyway. This is exact as long as ``h`` and ``alpha`` come from one width connection and
    feed nothing else (the gradient is linear in ``G``, so several depth connections over the same
    pair are exact too)."""

    @staticmethod
    def forward(ctx, h, alpha, beta, y):
        n, d = h.shape[-2:]
        m = y.numel() // d
        # h is contiguous, or one row per token broadcast to the streams (the stack's first sublayer)
        rows, h_ts, h_ss = _stream_rows(h)
        out = h.new_empty(h.shape)
        _KERNEL.lib.anydepth_hc_depth_forward(struct_args(
            _DepthArgs, h=rows.data_ptr(), h_ts=h_ts, h_ss=h_ss, alpha=alpha.data_ptr(), beta=beta.data_ptr(),
            y=y.data_ptr(), out=out.data_ptr(), m_tokens=m, n=n, d=d, nthreads=torch.get_num_threads(),
        ))
        ctx.save_for_backward(beta, y)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        beta, y = ctx.saved_tensors
        n = beta.shape[-1]
        m = beta.numel() // n
        need = ctx.needs_input_grad
        passthrough = g if need[0] or need[1] else None
        rest, g_ts, g_ss = _stream_rows(g)
        dbeta = torch.empty_like(beta) if need[2] else None
        dy = torch.empty_like(y) if need[3] else None
        if dbeta is not None or dy is not None:
            _KERNEL.lib.anydepth_hc_depth_backward(struct_args(
                _DepthArgs, g=rest.data_ptr(), g_ts=g_ts, g_ss=g_ss, beta=beta.data_ptr(), y=y.data_ptr(),
                dbeta=_ptr(dbeta), dy=_ptr(dy), m_tokens=m, n=n, d=y.shape[-1], nthreads=torch.get_num_threads(),
            ))
        return passthrough, None, dbeta, dy


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
    the returned ``h`` (the same values) to :func:`depth_connection` and nowhere else: its gradient
    then comes back here unmixed (see :class:`_Depth`). ``layer_norm = (weight (d,), bias (d,) or None,
    eps)`` applies the branch's LayerNorm to ``h_in`` inside the kernel."""
    d = h.shape[-1]
    wa = wb = gamma = None
    scale = 0.0
    if dynamic is not None:
        wa, wb, gamma, scale = dynamic
        wa, wb, gamma = _contiguous(wa), _contiguous(wb if wb.dim() == 1 else wb.reshape(d)), _contiguous(gamma)
    ln_w, ln_b, ln_eps = layer_norm or (None, None, 0.0)
    streams = None
    row = _broadcast_row(h)
    if row is not None:
        h, streams = row, h.shape[-2]
    else:
        # any leading shape goes through as it is: the kernels see flat tokens, and reshaped views would
        # each cost an autograd node in both directions
        h = _contiguous(h)
    return _Width.apply(
        h, wa, wb, gamma, float(scale), _contiguous(a_static), _contiguous(b_static), sa, sb, bool(use_tanh), ln_w,
        ln_b, float(ln_eps), streams,
    )


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


def depth_connection(h: Tensor, alpha: Tensor, beta: Tensor, y: Tensor) -> Tensor:
    """``H_new_c = sum_s alpha[s, 1 + c] H_s + beta_c y`` for ``h (..., n, d)`` and ``y (..., d)``."""
    # h as it is: contiguous, or the broadcast row of the stack's first sublayer (read by stride)
    return _Depth.apply(h, _contiguous(alpha), _contiguous(beta), _contiguous(y))
