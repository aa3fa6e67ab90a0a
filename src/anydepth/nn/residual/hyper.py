"""Hyper-connections: the residual widened into n streams, mixed by learned width and depth connections.

Hyper-connections (Zhu et al., "Hyper-Connections", ICLR 2025, arXiv 2409.19606) replace the residual
``h`` (d features per token) by n streams ``H`` (n x d per token). Every residual sublayer owns

    HC = [[0,   B  ],          B   in R^{1 x n}   depth connection: branch output into each stream
          [A_m, A_r]]          A_m in R^{n x 1}   width connection: which mix of streams feeds the branch
                               A_r in R^{n x n}   width connection: how the streams mix among themselves

and computes, per token (Alg. 2 of the paper)::

    h_in   = A_m^T H                         (branch input; the pre-norm is applied to it)
    H'     = A_r^T H
    H_new  = B^T f(norm(h_in)) + H'          i.e.  H_new_j = B_j f(...) + H'_j

Static hyper-connections (SHC) learn A_m, A_r, B directly (``n (n + 2)`` parameters per sublayer).
Dynamic ones (DHC) add input-dependent terms computed from ``Hbar = rmsnorm(H)`` (per stream)::

    [A_m | A_r](H) = [A_m | A_r] + s_a * act(Hbar W_a)      W_a in R^{d x (n + 1)}, zero at init
    B(H)           = B           + s_b * act(Hbar w_b)      w_b in R^{d},           zero at init

with ``act = tanh`` (or the identity) and learnable scalars ``s_a = s_b = 0.01``; DHC adds
``|gamma| + d (n + 2) + n (n + 2) + 2`` parameters per sublayer. Layer ``k`` starts (eq. 14) from
``B = 1``, ``A_m = e_(k mod n)``, ``A_r = I``: all streams stay copies of the pre-LN residual, so the
network equals the pre-LN network at init (after the final norm when ``reduce="sum"``, exactly with
``"mean"``).

Frac-connections (Zhu et al., arXiv 2503.14125; ``num_fracs = m``) split each stream's d features into
m fractions of d/m and treat the n*m (fraction, stream) pairs as sub-streams: the width connection is a
``(m n) x (m (1 + n))`` matrix from sub-streams to (fraction of the branch input, sub-stream), and the
depth connection scales fraction i of the branch output into fraction i of every stream. Our init
feeds fraction i of stream k into fraction i of the branch input and keeps every sub-stream, so with
fractions the network still equals pre-LN at init. (``hyper_connections`` 0.4.11 feeds fraction 0 into
every input fraction and adds the sum of all output fractions to each fraction; its parameters have
the same shapes and load here, but its fraction semantics are not reproduced.)

Manifold-constrained hyper-connections (mHC; DeepSeek-AI, arXiv 2512.24880) constrain the
width connection: ``H_pre = sigmoid(.)`` (non-negative input weights), ``H_res = Sinkhorn(.)``
(doubly stochastic residual mixing, so the streams' mean is preserved and products over depth stay
bounded) and ``H_post = 2 sigmoid(.)``.

Layout: the model's residual ``(..., d)`` becomes ``(..., n, d)`` (streams next to features, so the
per-token mixing is one batched matmul); :meth:`HyperConnection.expand` and ``reduce`` convert. The
seed-compatible classes in :mod:`anydepth.compat.hyper_connections` reuse these modules with the
original's folded ``(b n) ... d`` layout.

Speed: on CPU in float32, with one fraction and one input view, static and dynamic hyper-connections
run their width and depth connections through the fused kernels of :mod:`anydepth.nn.residual.hyper_fused`
(one pass over the streams per connection and direction); mHC and every other configuration use the
eager formulas below, which compute the same thing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anydepth.nn.amp import autocast_apply
from anydepth.nn.context import LayerContext
from anydepth.nn.norms import LayerNorm
from anydepth.nn.registry import NORMS, RESIDUALS
from anydepth.nn.residual import hyper_fused
from anydepth.nn.residual.base import Residual

__all__ = ["StreamNorm", "sinkhorn", "HyperConnection", "ManifoldHyperConnection", "IDENTITY_LOGIT"]

# Diagonal logit of the static H_res for mHC's identity init: Sinkhorn(exp(c I)) has off-diagonal
# entries e^-c / (1 + (n - 1) e^-c) ~ 6e-6 at c = 12, so H_res = I to 2e-5 for n <= 4 while the
# off-diagonal logits still receive (small) gradients; exp(-inf) would freeze them for good.
IDENTITY_LOGIT = 12.0

_DROPOUT_PLACEMENTS = ("branch", "stream")
_REDUCTIONS = ("sum", "mean")


class StreamNorm(nn.Module):
    """RMS norm of each stream that feeds the dynamic weights: ``x / ||x||_2 * sqrt(d) * (1 + gamma)``.

    The paper uses LayerNorm here; ``hyper_connections`` uses this gain-offset RMS form (``gamma``
    starts at zero so weight decay pulls the gain toward 1), which we keep so its weights load.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1) * self.scale * (self.gamma + 1)

    def project(self, x: Tensor, w: Tensor) -> Tensor:
        """``norm(x) @ w`` without materialising ``norm(x)``: ``(x @ (g * w)) / max(||x||, 1e-12)``
        with ``g = sqrt(d) (1 + gamma)``. The norm is a per-row scalar, so it can be applied to the
        small projected output instead of the full-width input; this saves passes over the streams."""
        g = (self.gamma.to(w.dtype) + 1) * self.scale
        return autocast_apply(_NormProject, x, g.unsqueeze(-1) * w)


class _NormProject(torch.autograd.Function):
    """``P = (x @ w) / r`` with ``r = max(||x||_2, 1e-12)`` per row, and a hand-written backward::

        dx = (dP / r) @ w^T - (sum_t dP_t P_t / r^2) x        (second term only where ||x|| > 1e-12)
        dw = x^T (dP / r)

    which touches the full-width ``x`` three times (one matmul each for ``dx`` and ``dw``, one fused
    update) where autograd's chain through the norm takes about seven passes. Applied through
    :func:`~anydepth.nn.amp.autocast_apply`: under autocast, a matrix product in the autocast dtype.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:
        r = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        rc = r.clamp_min(1e-12)
        p = (x @ w) / rc
        ctx.save_for_backward(x, w, rc, p, r > 1e-12)
        return p

    @staticmethod
    def backward(ctx, gp: Tensor):
        x, w, rc, p, live = ctx.saved_tensors
        q = gp / rc
        gx = gw = None
        if ctx.needs_input_grad[0]:
            c = ((q * p).sum(-1, keepdim=True) / rc) * live
            gx = torch.addcmul(q @ w.mT, x, c, value=-1)
        if ctx.needs_input_grad[1]:
            gw = (x.reshape(-1, x.shape[-1]).mT @ q.reshape(-1, q.shape[-1])).to(w.dtype)
        return gx, gw


class _DepthConnection(torch.autograd.Function):
    """``out[m, j] = mixed[m, j] + beta[m, j] * y[m]`` for ``mixed (M, n, d)``, ``beta (M, n)``, ``y (M, d)``.

    The forward is one ``addcmul``; the backward computes ``dbeta = dout @ y`` and
    ``dy = beta^T dout`` as batched matrix products, which read ``dout`` once each instead of
    materialising the full-size products that autograd's broadcast-and-reduce would. Applied through
    :func:`~anydepth.nn.amp.autocast_apply` with ``promote``: under autocast, as ``addcmul``, in the
    widest dtype of its inputs.
    """

    @staticmethod
    def forward(ctx, mixed: Tensor, beta: Tensor, y: Tensor) -> Tensor:
        ctx.save_for_backward(beta, y)
        return torch.addcmul(mixed, beta.unsqueeze(-1), y.unsqueeze(-2))

    @staticmethod
    def backward(ctx, g: Tensor):
        beta, y = ctx.saved_tensors
        g_beta = torch.bmm(g, y.unsqueeze(-1)).squeeze(-1) if ctx.needs_input_grad[1] else None
        g_y = torch.bmm(beta.unsqueeze(-2), g).squeeze(-2) if ctx.needs_input_grad[2] else None
        return g, g_beta, g_y


def sinkhorn(logits: Tensor, iters: int = 20, *, log_domain: bool = False) -> Tensor:
    """Sinkhorn-Knopp projection of ``exp(logits)`` onto the doubly stochastic matrices.

    ``P = exp(logits)``; then ``iters`` times: divide each column by its sum, then each row by its
    sum. Rows of the result sum to 1 exactly, columns to 1 up to the (geometric) convergence error,
    which grows with the spread of the logits: for 4 x 4 matrices of std-1 logits it is about 2e-4
    after 20 iterations and below 1e-6 after 50; near the identity-plus-small-terms logits of mHC,
    20 iterations reach float32 precision.
    ``log_domain=True`` alternates ``log_softmax`` over columns and rows, the same iteration in log
    space (no overflow for large logits). Computed in at least float32 and cast back.

    The backward is exact for the returned value: autograd differentiates through every iteration
    (no fixed-point approximation). Subtracting the per-column max first is exact too, because a
    per-column factor is removed by the first column normalisation; it is detached for that reason.
    """
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(
            f"sinkhorn expects square matrices in the last two dims, got logits of shape {tuple(logits.shape)}"
        )
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"sinkhorn iters must be a positive int, got {iters!r}; 20 is the usual choice")
    dtype = logits.dtype
    x = logits.to(torch.promote_types(dtype, torch.float32))  # half precision loses the marginals
    if log_domain:
        for _ in range(iters):
            x = torch.log_softmax(x, dim=-2)
            x = torch.log_softmax(x, dim=-1)
        return x.exp().to(dtype)
    p = (x - x.amax(dim=-2, keepdim=True).detach()).exp()
    for _ in range(iters):
        p = p / p.sum(dim=-2, keepdim=True)
        p = p / p.sum(dim=-1, keepdim=True)
    return p.to(dtype)


def _param(module: nn.Module, name: str) -> Tensor:
    """``module.<name>`` for a parameter: straight from ``_parameters`` (an ``nn.Module`` attribute
    lookup goes through ``__getattr__``, about a microsecond each), or as the attribute where it is not
    there. A ``torch.nn.utils.parametrize`` parametrization computes it on access; the kernels then
    read that tensor, and its gradient flows back through the parametrization."""
    p = module._parameters.get(name)
    return p if p is not None else getattr(module, name)


def _check_int(name: str, value, minimum: int, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}; {fix}")
    return value


def _static_alpha(streams: int, fracs: int, views: int, layer_index: int, eye: float = 1.0):
    """Static width matrix, rows (fraction, stream), columns (fraction, [views..., streams...]).

    Fraction i of stream ``layer_index mod n`` feeds fraction i of every branch-input view (weight 1);
    sub-stream (i, j) keeps itself (weight ``eye``; mHC's identity init uses a large logit here).
    """
    k = layer_index % streams
    t = views + streams
    a = torch.zeros(fracs, streams, fracs, t)
    for i in range(fracs):
        a[i, k, i, :views] = 1.0
        for j in range(streams):
            a[i, j, i, views + j] = eye
    return a.reshape(fracs * streams, fracs * t)


@RESIDUALS.register("hyper")
class HyperConnection(Residual):
    """Static or dynamic hyper-connections around one pre-norm sublayer (Zhu et al., ICLR 2025).

    ``forward(H, f, *a, **kw)`` with ``H`` of shape ``(..., streams, dim)`` (from :meth:`expand`):
    ``h_in = A_m(H)^T H``, ``H' = A_r(H)^T H``, ``H_new = B(H)^T f(norm(h_in), *a, **kw) + H'`` (see
    the module docstring for the dynamic terms and the frac-connection generalisation).

    Constraints: ``streams >= 1``; ``num_fracs`` divides ``dim``; ``layer_index`` is explicit (it
    picks the stream ``layer_index mod streams`` that feeds the branch at init; the builder passes
    the sublayer's global index). With one stream, ``expand``/``reduce`` are the identity and the
    residual is ``(..., dim)`` as for single-stream schemes.

    Dropout (``dropout > 0``) hits the branch output only (``dropout_placement="branch"``); the
    original package drops the whole updated stream, available as ``"stream"``.
    """

    @dataclass(kw_only=True)
    class Config:
        streams: int = 4  # expansion rate n: the paper's best trade-off (n=1 trails pre-LN, n=8 adds little)
        dynamic: bool = True  # input-dependent weights (DHC); False keeps only the static matrix (SHC)
        tanh: bool = True  # squashes the dynamic terms; the paper finds both variants close (Table 1)
        num_fracs: int = 1  # frac-connections: split features into fractions that mix like streams
        dropout: float = 0.0  # dropout probability, applied where dropout_placement says
        dropout_placement: str = "branch"  # "branch": branch output only; "stream": whole stream (original)
        reduce: str = "sum"  # how reduce() merges the streams: the paper's "sum", or "mean" (keeps the scale)

    placement = "pre"
    additive = False

    def __init__(
        self,
        cfg: Config | None = None,
        *,
        dim: int,
        ctx: LayerContext | None = None,
        norm: Any = None,
        layer_index: int | None = None,
        num_input_views: int = 1,
        add_branch_out_to_residual: bool = True,
        depth_residual_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    ):
        super().__init__()
        cfg = self.config_of(cfg)
        self._setup(cfg, dim, ctx, layer_index, num_input_views, norm)
        dynamic, tanh = cfg.dynamic, cfg.tanh
        self.dynamic = bool(dynamic)
        self.act = nn.Tanh() if tanh else nn.Identity()
        self.add_branch_out_to_residual = add_branch_out_to_residual
        # None means the fused B * y + H' (addcmul); a callable g gives g(B * y, H') instead
        self.depth_residual_fn = depth_residual_fn

        s, f, v, dp = self.streams, self.num_fracs, self.num_input_views, self.frac_dim
        self.static_alpha = nn.Parameter(_static_alpha(s, f, v, self.layer_index))
        if self.dynamic:
            self.norm = StreamNorm(dp)
            self.dynamic_alpha_fn = nn.Parameter(torch.zeros(dp, f * (v + s)))
            self.dynamic_alpha_scale = nn.Parameter(torch.full((), 1e-2))
        if add_branch_out_to_residual:
            self.static_beta = nn.Parameter(torch.ones(s * f))
            if self.dynamic:
                # shape (d,) for one fraction keeps hyper_connections' state dicts loadable
                self.dynamic_beta_fn = nn.Parameter(torch.zeros(dp) if f == 1 else torch.zeros(dp, f))
                self.dynamic_beta_scale = nn.Parameter(torch.full((), 1e-2))

    # -- construction helpers shared with the mHC subclass -------------------------------------
    def _setup(self, cfg, dim, ctx, layer_index, num_input_views, norm):
        # layer_index picks the stream that feeds the branch at init: the sublayer's global index
        # from the build context, or given directly (the seed API's layer_index)
        if layer_index is None:
            if ctx is None:
                raise ValueError(
                    f"{type(self).__name__}: give ctx (the sublayer's position) or layer_index (the stream "
                    "that feeds the branch at init is layer_index mod streams)"
                )
            layer_index = ctx.index
        # a Config without num_fracs (mHC-lite) is one fraction by construction
        streams, num_fracs = cfg.streams, getattr(cfg, "num_fracs", 1)
        dropout, placement, reduce = cfg.dropout, cfg.dropout_placement, cfg.reduce
        if norm is None or isinstance(norm, nn.Module):
            self.branch_norm = norm if norm is not None else nn.Identity()
        else:
            self.branch_norm = NORMS.build(norm, dim=dim)
        self.dim = _check_int("dim", dim, 1, "pass the model width (the residual's last dimension)")
        self.streams = _check_int(
            "streams (num_residual_streams)", streams, 1, "use 1 for a plain residual or 4 as in the paper"
        )
        self.num_fracs = _check_int("num_fracs", num_fracs, 1, "use 1 to disable frac-connections")
        if dim % num_fracs:
            divisors = [m for m in range(1, min(dim, 16) + 1) if dim % m == 0]
            raise ValueError(f"num_fracs={num_fracs} does not divide dim={dim}; choose num_fracs from {divisors}")
        self.num_input_views = _check_int("num_input_views", num_input_views, 1, "use 1 for one branch input")
        if isinstance(layer_index, bool) or not isinstance(layer_index, int) or layer_index < 0:
            raise ValueError(
                f"layer_index must be a non-negative int, got {layer_index!r}; pass the sublayer's index "
                "(it picks the stream that feeds the branch at init)"
            )
        self.layer_index = layer_index
        self.frac_dim = dim // num_fracs
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if placement not in _DROPOUT_PLACEMENTS:
            raise ValueError(
                f"dropout_placement must be one of {_DROPOUT_PLACEMENTS}, got {placement!r}; "
                "'branch' drops the branch output, 'stream' the whole updated stream (hyper_connections)"
            )
        if reduce not in _REDUCTIONS:
            raise ValueError(f"reduce must be one of {_REDUCTIONS}, got {reduce!r}")
        self.dropout = nn.Dropout(dropout)
        self.dropout_placement = placement
        self.reduction = reduce

    # -- stream shape ----------------------------------------------------------------------------
    def expand(self, x: Tensor) -> Tensor:
        """``(..., dim) -> (..., streams, dim)``: n copies of the residual.

        Where the fused CPU kernels will read it (see :meth:`forward`), a view with a stream stride of
        0 (:func:`hyper_fused.broadcast_streams`): no copy, and the first connection's backward writes
        the gradient of ``x`` itself instead of the n streams' for autograd to sum (at dim 256, 2048
        tokens and 4 streams, an 8 MiB copy and an 8 MiB sum fewer per step). Such a view cannot be
        written in place; ``.contiguous()`` gives the copies. Elsewhere the copies are materialised:
        the eager path's batched matmuls would fall back to a per-token loop on the view, which costs
        more than the copy."""
        self._check_dim(x, "expand")
        if self.streams == 1:
            return x
        view = hyper_fused.broadcast_streams(x, self.streams)
        if x.is_contiguous() and self._fused_args(view, branch_norm=False) is not None:
            return view
        return view.contiguous()

    def reduce(self, h: Tensor) -> Tensor:
        """``(..., streams, dim) -> (..., dim)``: sum of the streams (the paper), or their mean."""
        if self.streams == 1:
            return h
        self._check_streams(h, "reduce")
        return h.sum(-2) if self.reduction == "sum" else h.mean(-2)

    def _check_dim(self, x: Tensor, where: str) -> None:
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(
                f"{type(self).__name__}.{where}: the last dimension of the residual must be dim={self.dim}, "
                f"got shape {tuple(x.shape)}; build the scheme with the model's width"
            )

    def _check_streams(self, h: Tensor, where: str) -> None:
        self._check_dim(h, where)
        if h.dim() < 2 or h.shape[-2] != self.streams:
            raise ValueError(
                f"{type(self).__name__}.{where} expects the expanded residual (..., streams={self.streams}, "
                f"dim={self.dim}), got shape {tuple(h.shape)}; call expand(x) before the first block"
            )

    # -- the connection --------------------------------------------------------------------------
    def forward(self, x: Tensor, f, *args, **kwargs) -> Tensor:
        single = self.streams == 1
        h = x.unsqueeze(-2) if single else x
        self._check_streams(h, "forward")
        fused = self._fused_args(h)
        if fused is not None:
            out = self._fused_forward(h, fused, f, *args, **kwargs)
        else:
            branch_in, mixed, beta = self.width_connection(h)
            y = f(self.branch_norm(branch_in), *args, **kwargs)
            out = self.depth_connection(y, mixed, beta)
        return out.squeeze(-2) if single else out

    def _fused_args(self, h: Tensor, branch_norm: bool = True) -> tuple | None:
        """The arguments of :func:`hyper_fused.width_connection` for ``h``, or None where the kernels
        cannot stand in for the eager formula. They cover one fraction, one input view and the plain
        (tanh or identity) coefficients; mHC overrides ``_coefficients`` and keeps the eager path.

        Each parameter is looked up once per call (:func:`_param`), and every tensor the kernels
        read is checked in one :func:`hyper_fused.fused_ok`: at a few hundred tokens this Python is as
        long as the kernels themselves."""
        if (
            type(self)._coefficients is not HyperConnection._coefficients
            or self.num_fracs != 1
            or self.num_input_views != 1
            or not self.add_branch_out_to_residual
            or self.depth_residual_fn is not None
        ):
            return None
        a_static, b_static = _param(self, "static_alpha"), _param(self, "static_beta")
        dynamic = sa = sb = None
        tensors = [a_static, b_static]
        if self.dynamic:
            norm = self._modules["norm"]
            wa, wb, gamma = _param(self, "dynamic_alpha_fn"), _param(self, "dynamic_beta_fn"), _param(norm, "gamma")
            sa, sb = _param(self, "dynamic_alpha_scale"), _param(self, "dynamic_beta_scale")
            dynamic = (wa, wb, gamma, norm.scale)
            tensors += [wa, wb, gamma, sa, sb]
        if not hyper_fused.fused_ok(h, *tensors):
            return None
        layer_norm = self._fused_layer_norm() if branch_norm else None
        use_tanh = isinstance(self._modules["act"], nn.Tanh)
        return dynamic, a_static, b_static, sa, sb, use_tanh, layer_norm

    def _fused_forward(self, h: Tensor, fused: tuple, f, *args, **kwargs) -> Tensor:
        """The same computation as ``width_connection``/``depth_connection`` through the fused kernels."""
        branch_in, alpha, beta, h = hyper_fused.width_connection(h, *fused)
        x = branch_in if fused[-1] is not None else self.branch_norm(branch_in)
        return self._fused_depth(h, alpha, beta, f(x, *args, **kwargs))

    def _fused_layer_norm(self) -> tuple[Tensor, Tensor | None, float] | None:
        """``(weight, bias, eps)`` when the branch norm is a plain LayerNorm over ``dim`` that the width
        kernel can apply itself, else None (the norm module then runs on the kernel's output). Called
        where :func:`hyper_fused.fused_ok` has accepted the streams (device, tracing, transforms).

        Fused, the norm costs no pass of its own over the branch input in either direction, and its
        input is not stored: the backward recomputes it from the streams it reads anyway."""
        norm = self._modules["branch_norm"]
        if type(norm) not in (LayerNorm, nn.LayerNorm):
            return None
        weight, bias = norm.weight, norm.bias
        # a norm of another width is left to its own forward, which raises the shape error
        if weight is None or weight.shape != (self.dim,):
            return None
        if not all(hyper_fused.plain_f32(p) for p in ((weight,) if bias is None else (weight, bias))):
            return None
        return weight, bias, float(norm.eps)

    def _fused_depth(self, streams: tuple[Tensor, Tensor], alpha: Tensor, beta: Tensor, y: Tensor) -> Tensor:
        """``streams``: what :func:`hyper_fused.width_connection` returned for them."""
        # dropout(p=0) is the identity: skipping the module call saves microseconds per sublayer
        dropout = self._modules["dropout"]
        drop = dropout.p > 0
        if drop and self.dropout_placement == "branch":
            y = dropout(y)
        h = streams[0]
        if y.shape != h.shape[:-2] + h.shape[-1:]:
            raise ValueError(
                f"the branch output must have the branch input's shape {tuple(h.shape[:-2] + h.shape[-1:])}, "
                f"got {tuple(y.shape)}; a residual branch must map dim to dim"
            )
        out = hyper_fused.depth_connection(streams, alpha, beta, y if y.dtype == h.dtype else y.to(h.dtype))
        return dropout(out) if drop and self.dropout_placement == "stream" else out

    def width_connection(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """``H (..., n, d)`` -> branch input ``(..., d)`` (``(..., views, d)`` for several views),
        the mixed streams ``H'`` as ``(..., fracs, n, d / fracs)``, and ``B`` as ``(..., fracs, n)``."""
        hs = self._split_fracs(h)
        alpha, beta = self._coefficients(hs)
        mix = self._mix(alpha, hs)
        # split, not two slices: its backward is one concatenation instead of two zero-filled copies
        branch_part, mixed = mix.split([self.num_input_views, self.streams], dim=-2)
        return self._branch_input(branch_part).to(h.dtype), mixed, beta

    def depth_connection(self, y: Tensor, mixed: Tensor, beta: Tensor | None) -> Tensor:
        """``H_new = B * y + H'`` with fraction i of ``y`` going to fraction i of every stream."""
        if not self.add_branch_out_to_residual:
            return y
        if self.dropout_placement == "branch":
            y = self.dropout(y)
        if y.shape[-1] != self.dim:
            raise ValueError(
                f"the branch output's last dimension must be dim={self.dim}, got shape {tuple(y.shape)}; "
                "a residual branch must map dim to dim"
            )
        ys = y.unflatten(-1, (self.num_fracs, self.frac_dim)).unsqueeze(-2).to(mixed.dtype)  # (..., f, 1, d')
        scale = beta.unsqueeze(-1).to(mixed.dtype)  # (..., f, n, 1)
        if self.depth_residual_fn is None:
            sub, dp = mixed.shape[:-1], self.frac_dim  # sub = (..., f, n)
            out = autocast_apply(
                _DepthConnection,
                mixed.reshape(-1, self.streams, dp),
                scale.squeeze(-1).expand(sub).reshape(-1, self.streams),
                ys.expand(*sub[:-1], 1, dp).reshape(-1, dp),
                promote=True,
            ).view(mixed.shape)
        else:
            out = self.depth_residual_fn(scale * ys, mixed)
        out = self._merge_fracs(out).to(y.dtype)  # mHC mixes in float32; come back to the model's dtype
        return self.dropout(out) if self.dropout_placement == "stream" else out

    def _split_fracs(self, h: Tensor) -> Tensor:
        """``(..., n, d) -> (..., f, n, d/f)``: rows ordered (fraction, stream) like the static matrix."""
        if self.num_fracs == 1:
            return h.unsqueeze(-3)
        return h.unflatten(-1, (self.num_fracs, self.frac_dim)).transpose(-3, -2)

    def _merge_fracs(self, hs: Tensor) -> Tensor:
        if self.num_fracs == 1:
            return hs.squeeze(-3)
        return hs.transpose(-3, -2).flatten(-2)

    def _mix(self, alpha: Tensor, hs: Tensor) -> Tensor:
        """``sum_{(i,s)} alpha[(i,s), (j,t)] H[i,s]`` as one batched matmul -> ``(..., f, v + n, d')``."""
        f, s = self.num_fracs, self.streams
        flat = hs.reshape(*hs.shape[:-3], f * s, self.frac_dim)
        mix = torch.matmul(alpha.transpose(-1, -2).to(flat.dtype), flat)
        return mix.unflatten(-2, (f, self.num_input_views + s))

    def _branch_input(self, x: Tensor) -> Tensor:
        # x: (..., f, v, d')
        x = x.squeeze(-3) if self.num_fracs == 1 else x.transpose(-3, -2).flatten(-2)
        return x.squeeze(-2) if self.num_input_views == 1 else x

    def _dynamic_projection(self, hs: Tensor) -> tuple[Tensor, Tensor | None]:
        """``Hbar W_a`` and the fraction-diagonal of ``Hbar w_b``, from one matmul over ``[W_a | w_b]``."""
        w = self.dynamic_alpha_fn
        if self.add_branch_out_to_residual:
            w = torch.cat((w, self.dynamic_beta_fn.reshape(self.frac_dim, -1)), dim=-1)
        proj = self.norm.project(hs, w)
        n_alpha = self.dynamic_alpha_fn.shape[-1]
        proj_a = proj[..., :n_alpha]
        if not self.add_branch_out_to_residual:
            return proj_a, None
        proj_b = proj[..., n_alpha:]  # (..., f1, n, f2): fraction i of the output goes to fraction i
        proj_b = proj_b.squeeze(-1) if self.num_fracs == 1 else torch.diagonal(proj_b, dim1=-3, dim2=-1).mT
        return proj_a, proj_b

    def _static_beta(self) -> Tensor:
        return self.static_beta.view(self.streams, self.num_fracs).t()  # (f, n)

    def _coefficients(self, hs: Tensor) -> tuple[Tensor, Tensor | None]:
        """``alpha`` ``(..., f n, f (v + n))`` and ``beta`` ``(..., f, n)`` (static plus dynamic terms)."""
        if not self.dynamic:
            beta = self._static_beta() if self.add_branch_out_to_residual else None
            return self.static_alpha, beta
        proj_a, proj_b = self._dynamic_projection(hs)
        f, s = self.num_fracs, self.streams
        alpha = self.act(proj_a) * self.dynamic_alpha_scale + self.static_alpha.view(f, s, -1)
        alpha = alpha.flatten(-3, -2)
        beta = None
        if proj_b is not None:
            beta = self.act(proj_b) * self.dynamic_beta_scale + self._static_beta()
        return alpha, beta

    def no_weight_decay(self) -> list[nn.Parameter]:
        """Static matrices, the dynamic scales and norm gains: decaying them would pull the network
        away from its residual structure (the paper keeps static parts out of weight decay)."""
        keep = ("static_", "_scale", "gamma")
        out = [p for name, p in self.named_parameters() if any(k in name for k in keep)]
        out += [p for p in self.branch_norm.parameters() if all(p is not q for q in out)]
        return out

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, streams={self.streams}, layer_index={self.layer_index}, "
            f"num_fracs={self.num_fracs}, dynamic={self.dynamic}"
        )


@RESIDUALS.register("mhc")
class ManifoldHyperConnection(HyperConnection):
    """Manifold-constrained hyper-connections (mHC; DeepSeek-AI, arXiv 2512.24880).

    With ``a = alpha_static + Hbar W_a * [s_pre | s_res]`` (no tanh) and
    ``b = beta_static + s_post Hbar w_b``::

        H_pre  = sigmoid(a[:, views])                     branch input  h_in = H_pre^T H
        H_res  = Sinkhorn(a[:, streams])  (doubly stochastic over the n*f sub-streams)
        H_post = 2 sigmoid(b)                             H_new = H_post * f(norm(h_in)) + H_res^T H

    Coefficients are computed in float32. Doubly stochastic ``H_res`` keeps the mean of the streams
    (column sums 1) and its products over depth stay doubly stochastic, so the residual cannot grow
    through the mixing. At init the streams are copies of ``x``, so ``H_res^T H = H`` for any doubly
    stochastic ``H_res``; with ``beta_static = 0`` (``H_post = 1``) the network equals pre-LN at init
    up to the branch norm's eps, which sees ``sum(H_pre) x`` (2.23 x for n = 4) instead of ``x``.
    ``identity_init=True`` makes ``H_res`` itself the identity (to 2e-5, see ``IDENTITY_LOGIT``)
    instead of the original's ``Sinkhorn(exp(I))``.
    ``num_dynamic_alpha_proposals = p`` averages the constrained matrices of p projections.
    """

    @dataclass(kw_only=True)
    class Config:
        streams: int = 4  # expansion rate n (the mHC paper uses 4)
        num_fracs: int = 1  # frac-connections: the Sinkhorn matrix is over all n*f sub-streams
        sinkhorn_iters: int = 20  # iterations of Sinkhorn-Knopp (20 as in the paper and the original)
        log_domain: bool = False  # log-space Sinkhorn: same result, no overflow for large logits
        identity_init: bool = False  # H_res = I at init (True) or the original's Sinkhorn(exp(I))
        dropout: float = 0.0  # dropout probability, applied where dropout_placement says
        dropout_placement: str = "branch"  # "branch": branch output only; "stream": whole stream (original)
        reduce: str = "sum"  # how reduce() merges the streams: the paper's "sum", or "mean"

    def __init__(
        self,
        cfg: Config | None = None,
        *,
        dim: int,
        ctx: LayerContext | None = None,
        norm: Any = None,
        layer_index: int | None = None,
        num_input_views: int = 1,
        beta_init: float = 0.0,
        num_dynamic_alpha_proposals: int = 1,
        residual_mix_constraint_fn: Callable[[Tensor], Tensor] | None = None,
        add_branch_out_to_residual: bool = True,
        depth_residual_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    ):
        nn.Module.__init__(self)
        cfg = self.config_of(cfg)
        self._setup(cfg, dim, ctx, layer_index, num_input_views, norm)
        # mHC-lite's Config has no Sinkhorn or identity_init option (it replaces that matrix
        # altogether), so a subclass's Config falls back to this class's defaults
        base = cfg if isinstance(cfg, ManifoldHyperConnection.Config) else ManifoldHyperConnection.Config()
        sinkhorn_iters, log_domain, identity_init = base.sinkhorn_iters, base.log_domain, base.identity_init
        _check_int("sinkhorn_iters", sinkhorn_iters, 1, "20 is the usual choice")
        p = _check_int("num_dynamic_alpha_proposals", num_dynamic_alpha_proposals, 1, "use 1 for one projection")
        self.dynamic = True
        self.add_branch_out_to_residual = add_branch_out_to_residual
        self.depth_residual_fn = depth_residual_fn
        self.sinkhorn_iters, self.log_domain = sinkhorn_iters, log_domain
        self.residual_mix_constraint_fn = residual_mix_constraint_fn

        s, f, v, dp = self.streams, self.num_fracs, self.num_input_views, self.frac_dim
        eye = IDENTITY_LOGIT if identity_init else 1.0
        self.static_alpha = nn.Parameter(_static_alpha(s, f, v, self.layer_index, eye))
        self.norm = StreamNorm(dp)
        self.dynamic_alpha_fn = nn.Parameter(torch.zeros(p, dp, f * (v + s)))
        self.pre_branch_scale = nn.Parameter(torch.full((1,), 1e-2))
        self.residual_scale = nn.Parameter(torch.full((1,), 1e-2))
        if add_branch_out_to_residual:
            self.static_beta = nn.Parameter(torch.full((s * f,), float(beta_init)))
            self.dynamic_beta_fn = nn.Parameter(torch.zeros(dp) if f == 1 else torch.zeros(dp, f))
            self.h_post_scale = nn.Parameter(torch.full((), 1e-2))

    def _constrain_residual(self, logits: Tensor) -> Tensor:
        if self.residual_mix_constraint_fn is not None:
            return self.residual_mix_constraint_fn(logits)
        return sinkhorn(logits, self.sinkhorn_iters, log_domain=self.log_domain)

    def _coefficients(self, hs: Tensor) -> tuple[Tensor, Tensor | None]:
        f, s, v = self.num_fracs, self.streams, self.num_input_views
        wa = self.dynamic_alpha_fn.float()  # (p, d', f (v + s))
        p_, t_ = wa.shape[0], wa.shape[-1]
        w = wa.permute(1, 0, 2).flatten(1)
        if self.add_branch_out_to_residual:
            w = torch.cat((w, self.dynamic_beta_fn.float().reshape(self.frac_dim, -1)), dim=-1)
        proj_all = self.norm.project(hs.float(), w)  # one matmul for every proposal and for beta
        proj = proj_all[..., : p_ * t_].unflatten(-1, (p_, t_)).movedim(-2, 0)  # (p, ..., f, n, f (v + n))
        # per-column scale: s_pre on the input-view columns, s_res on the stream columns, in the
        # matrix's (fraction, [views, streams]) column order
        col = torch.cat((self.pre_branch_scale.float().expand(v), self.residual_scale.float().expand(s)))
        a = proj * col.repeat(f) + self.static_alpha.float().view(f, s, -1)
        a = a.unflatten(-1, (f, v + s))  # (p, ..., f1, n, f2, v + n)
        pre = torch.sigmoid(a[..., :v])
        res = a[..., v:].flatten(-2).flatten(-3, -2)  # (p, ..., f n, f n): square over sub-streams
        res = self._constrain_residual(res).unflatten(-1, (f, s))
        alpha = torch.cat((pre, res.unflatten(-3, (f, s))), dim=-1).mean(0)  # average the proposals
        alpha = alpha.flatten(-2).flatten(-3, -2)  # (..., f n, f (v + n))
        beta = None
        if self.add_branch_out_to_residual:
            proj_b = proj_all[..., p_ * t_ :]
            proj_b = proj_b.squeeze(-1) if f == 1 else torch.diagonal(proj_b, dim1=-3, dim2=-1).mT
            beta = 2 * torch.sigmoid(proj_b * self.h_post_scale.float() + self._static_beta().float())
        return alpha, beta

    def _mix(self, alpha: Tensor, hs: Tensor) -> Tensor:
        # mix in float32 like the coefficients; depth_connection casts back to the input dtype
        return super()._mix(alpha, hs.float())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", sinkhorn_iters={self.sinkhorn_iters}"
