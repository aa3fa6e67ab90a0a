"""``hyper_connections.mHCv2``: manifold-constrained hyper-connections (DeepSeek-AI, arXiv 2512.24880)
on an explicit stream axis, ``(..., s, d)``, the layout of :mod:`anydepth.nn.residual.hyper` itself.

Per token, with ``Hbar = rmsnorm(M H)`` (``M = I`` unless ``mix_streams_before_norm``)::

    H_pre  = sigmoid(alpha_pre  + s_pre  Hbar W_pre)              branch input  x = H_pre^T H
    H_res  = Sinkhorn(alpha_res + s_res  Hbar W_res)              (doubly stochastic, 20 iterations)
    H_post = 2 sigmoid(beta     + s_post Hbar w_post)             H_new = H_post * f(x) + H_res^T H

``mix_streams_before_norm`` learns the s x s matrix ``M`` (the package's ``Conv2d(s, s, 1)``, Dirac
init, so ``M = I`` at init): the coefficients see a mix of the streams, the mixing itself still reads
``H``. ``sinkhorn_iters=0`` leaves ``H_res`` unconstrained (the raw logits), as in the package.
``use_triton_sinkhorn`` selects :mod:`~anydepth.compat.hyper_connections.triton_sinkhorn`, which is
the eager iteration on every device.

The computation is :class:`anydepth.nn.residual.hyper.ManifoldHyperConnection`'s; parameters carry the
package's names and shapes, so state dicts load both ways. Differences from ``hyper_connections``
0.4.11: those of :mod:`anydepth.compat.hyper_connections.hyper_connections` (dropout on the branch
output by default, fraction semantics, ``layer_index=None`` from torch's generator); several input
views work (the package's scale vector has the wrong length for them); ``width_connection`` returns
``beta`` as ``(..., fracs, s)`` and the mixed streams as ``(..., s, d)``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

from anydepth.compat.hyper_connections import manifold_constrained_hyper_connections as _mc
from anydepth.compat.hyper_connections import triton_sinkhorn as _triton
from anydepth.compat.hyper_connections.hyper_connections import Residual, _check_streams
from anydepth.compat.hyper_connections.manifold_constrained_hyper_connections import (
    log_domain_sinkhorn_knopps,
    sinkhorn_knopps,
)
from anydepth.nn.residual.hyper import StreamNorm as RMSNorm

__all__ = [
    "AttentionPoolReduceStream",
    "ManifoldConstrainedHyperConnections",
    "RMSNorm",
    "Residual",
    "StreamEmbed",
    "get_expand_reduce_stream_functions",
    "get_init_and_expand_reduce_stream_functions",
    "log_domain_sinkhorn_knopps",
    "mHC",
    "sinkhorn_knopps",
]


class ManifoldConstrainedHyperConnections(_mc.ManifoldConstrainedHyperConnections):
    """``hyper_connections.mHCv2.ManifoldConstrainedHyperConnections`` with the original signature, on
    :class:`anydepth.nn.residual.hyper.ManifoldHyperConnection`; residuals are ``(..., s, dim)``.

    ``hc(residuals)`` returns ``(branch_input, add_residual)``, or the new residuals when built with
    ``branch=``. Extra keywords: ``dropout_placement`` (``"branch"`` default, ``"stream"`` as the
    package) and ``identity_init``.
    """

    def __init__(
        self,
        num_residual_streams: int,
        *,
        dim: int,
        branch: nn.Module | None = None,
        layer_index: int | None = None,
        dropout: float = 0.0,
        residual_transform: nn.Module | None = None,
        add_branch_out_to_residual: bool = True,
        num_input_views: int = 1,
        depth_residual_fn: Callable[[Tensor, Tensor], Tensor] = operator.add,
        num_fracs: int = 1,
        sinkhorn_iters: int = 20,
        log_domain_sinkhorn: bool = False,
        residual_mix_constraint_fn: Callable[[Tensor], Tensor] | None = None,
        forward_method_names: tuple[str, ...] = (),
        num_dynamic_alpha_proposals: int = 1,
        use_triton_sinkhorn: bool = False,
        mix_streams_before_norm: bool = False,
        dropout_placement: str = "branch",
        identity_init: bool = False,
    ):
        streams = _check_streams(num_residual_streams)
        if isinstance(sinkhorn_iters, bool) or not isinstance(sinkhorn_iters, int) or sinkhorn_iters < 0:
            raise ValueError(
                f"sinkhorn_iters must be an int >= 0, got {sinkhorn_iters!r}; 20 is the usual choice "
                "(0 leaves H_res unconstrained)"
            )
        if residual_mix_constraint_fn is None and (sinkhorn_iters == 0 or use_triton_sinkhorn):
            fn = _triton.triton_sinkhorn if use_triton_sinkhorn else sinkhorn_knopps
            residual_mix_constraint_fn = partial(fn, iters=sinkhorn_iters)
        super().__init__(
            streams,
            dim=dim,
            branch=branch,
            layer_index=layer_index,
            dropout=dropout,
            residual_transform=residual_transform,
            add_branch_out_to_residual=add_branch_out_to_residual,
            num_input_views=num_input_views,
            depth_residual_fn=depth_residual_fn,
            num_fracs=num_fracs,
            sinkhorn_iters=max(sinkhorn_iters, 1),
            log_domain_sinkhorn=log_domain_sinkhorn,
            residual_mix_constraint_fn=residual_mix_constraint_fn,
            forward_method_names=forward_method_names,
            num_dynamic_alpha_proposals=num_dynamic_alpha_proposals,
            dropout_placement=dropout_placement,
            identity_init=identity_init,
        )
        f = self.num_fracs
        if add_branch_out_to_residual:
            # the package's shapes; _static_beta and _coefficients read them through views
            with torch.no_grad():
                self.static_beta = nn.Parameter(self.static_beta.reshape(streams, f, 1).clone())
                self.dynamic_beta_fn = nn.Parameter(self.dynamic_beta_fn.reshape(self.frac_dim, f).clone())
        self.maybe_mix_streams = None
        if mix_streams_before_norm:
            self.maybe_mix_streams = nn.Conv2d(streams, streams, 1, bias=False)
            nn.init.dirac_(self.maybe_mix_streams.weight)

    def _unfold(self, residuals: Tensor) -> Tensor:
        if residuals.dim() < 2 or residuals.shape[-2] != self.streams:
            raise ValueError(
                f"the residual must be (..., num_residual_streams={self.streams}, dim={self.dim}), got shape "
                f"{tuple(residuals.shape)}; call expand_stream(x) before the first hyper-connection"
            )
        return residuals

    def _fold(self, h: Tensor) -> Tensor:
        return h

    def _coefficients(self, hs: Tensor):
        # hs: (..., f, s, d / f); the coefficients read M H, the mixing reads H
        if self.maybe_mix_streams is not None:
            m = self.maybe_mix_streams.weight[:, :, 0, 0]
            hs = torch.matmul(m.to(hs.dtype), hs)
        return super()._coefficients(hs)


mHC = ManifoldConstrainedHyperConnections


class StreamEmbed(nn.Module):
    """Adds a learned per-stream embedding (zero at init) to ``(..., s, d)``; with
    ``expand_to_streams=True`` it first repeats ``(..., d) -> (..., s, d)``."""

    def __init__(self, num_streams: int, dim: int, expand_to_streams: bool = False):
        super().__init__()
        self.num_streams = _check_streams(num_streams)
        self.expand_to_streams = expand_to_streams
        self.stream_embed = nn.Parameter(torch.zeros(num_streams, dim))

    def forward(self, residuals: Tensor) -> Tensor:
        if self.expand_to_streams:
            residuals = _repeat_streams(residuals, self.num_streams)
        return residuals + self.stream_embed


class AttentionPoolReduceStream(nn.Module):
    """``(..., s, d) -> (..., d)``: ``sum_s softmax_s(W h_s) * h_s`` per feature (Enformer's attention
    pool), ``W`` initialised to the identity: a weighted average of the streams."""

    def __init__(self, dim: int):
        super().__init__()
        self.to_attn_logits = nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            self.to_attn_logits.weight.copy_(torch.eye(dim))

    def forward(self, residuals: Tensor) -> Tensor:
        attn = self.to_attn_logits(residuals).softmax(dim=-2)
        return (residuals * attn).sum(-2)


def _repeat_streams(x: Tensor, num_streams: int) -> Tensor:
    return x.unsqueeze(-2).expand(*x.shape[:-1], num_streams, x.shape[-1]).contiguous()


class _RepeatStreams(nn.Module):
    """``(..., d) -> (..., s, d)``: s copies of the residual."""

    def __init__(self, num_streams: int):
        super().__init__()
        self.num_streams = num_streams

    def forward(self, x: Tensor) -> Tensor:
        return _repeat_streams(x, self.num_streams)


class _SumStreams(nn.Module):
    """``(..., s, d) -> (..., d)``: the sum of the streams."""

    def forward(self, x: Tensor) -> Tensor:
        return x.sum(-2)


def get_expand_reduce_stream_functions(
    num_streams: int,
    add_stream_embed: bool = False,
    add_attn_pool_reduce_stream: bool = False,
    dim: int | None = None,
    disable: bool = False,
) -> tuple[nn.Module, nn.Module]:
    """``(expand, reduce)``: ``(..., d) -> (..., s, d)`` (repeat, plus a stream embedding when
    ``add_stream_embed``) and ``(..., s, d) -> (..., d)`` (sum, or an attention pool when
    ``add_attn_pool_reduce_stream``); identities when ``disable``."""
    if disable:
        return nn.Identity(), nn.Identity()
    _check_streams(num_streams)
    if (add_stream_embed or add_attn_pool_reduce_stream) and dim is None:
        raise ValueError("add_stream_embed=True and add_attn_pool_reduce_stream=True need dim= (the feature size)")
    expand = StreamEmbed(num_streams, dim, expand_to_streams=True) if add_stream_embed else _RepeatStreams(num_streams)
    reduce = AttentionPoolReduceStream(dim) if add_attn_pool_reduce_stream else _SumStreams()
    return expand, reduce


def get_init_and_expand_reduce_stream_functions(
    num_streams: int,
    num_fracs: int = 1,
    dim: int | None = None,
    add_stream_embed: bool = False,
    add_attn_pool_reduce_stream: bool = False,
    disable: bool | None = None,
    sinkhorn_iters: int = 20,
    use_triton_sinkhorn: bool = False,
    **kwargs,
):
    """``(init_hyper_conn, expand_stream, reduce_stream)``; ``init_hyper_conn(dim=..., branch=...)``
    builds :class:`ManifoldConstrainedHyperConnections` (or :class:`Residual` when ``disable``, which
    defaults to one stream and one fraction). Other keywords go to the constructor."""
    _check_streams(num_streams)
    disable = (num_streams == 1 and num_fracs == 1) if disable is None else disable
    klass = Residual if disable else ManifoldConstrainedHyperConnections
    init = partial(
        klass,
        num_streams,
        num_fracs=num_fracs,
        sinkhorn_iters=sinkhorn_iters,
        use_triton_sinkhorn=use_triton_sinkhorn,
        **kwargs,
    )
    if dim is not None:
        init = partial(init, dim=dim)
    expand, reduce = get_expand_reduce_stream_functions(
        num_streams, add_stream_embed, add_attn_pool_reduce_stream, dim, disable
    )
    return init, expand, reduce


ManifoldConstrainedHyperConnections.get_expand_reduce_stream_functions = staticmethod(
    get_expand_reduce_stream_functions
)
ManifoldConstrainedHyperConnections.get_init_and_expand_reduce_stream_functions = staticmethod(
    get_init_and_expand_reduce_stream_functions
)
