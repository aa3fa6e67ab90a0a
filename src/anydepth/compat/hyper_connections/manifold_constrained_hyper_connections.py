"""``hyper_connections.manifold_constrained_hyper_connections``: mHC (arXiv 2512.24880) with the streams
folded into the batch, ``(b s) ... d``, as a configuration of
:class:`anydepth.nn.residual.hyper.ManifoldHyperConnection` (the folding is that of
:mod:`~anydepth.compat.hyper_connections.hyper_connections`).

``sinkhorn_knopps`` and ``log_domain_sinkhorn_knopps`` are :func:`anydepth.nn.residual.hyper.sinkhorn`
(the plain and the log-space iteration); ``iters <= 0`` returns ``log_alpha`` unchanged, the
package's way to switch the constraint off."""

from __future__ import annotations

import operator
from collections.abc import Callable

from torch import Tensor, nn

from anydepth.compat.hyper_connections.hyper_connections import (
    AttentionPoolReduceStream,
    Residual,
    StreamEmbed,
    _check_streams,
    _FoldedStreams,
    _init_and_expand_reduce,
    _layer_index,
    get_expand_reduce_stream_functions,
)
from anydepth.nn.residual.hyper import ManifoldHyperConnection, sinkhorn
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


def sinkhorn_knopps(log_alpha: Tensor, iters: int = 20) -> Tensor:
    """Sinkhorn-Knopp projection of ``exp(log_alpha)`` (see :func:`anydepth.nn.residual.hyper.sinkhorn`)."""
    return log_alpha if iters <= 0 else sinkhorn(log_alpha, iters)


def log_domain_sinkhorn_knopps(log_alpha: Tensor, iters: int = 20) -> Tensor:
    """The same projection iterated in log space (``log_softmax`` over columns, then rows)."""
    return log_alpha if iters <= 0 else sinkhorn(log_alpha, iters, log_domain=True)


class ManifoldConstrainedHyperConnections(_FoldedStreams, ManifoldHyperConnection):
    """``hyper_connections.ManifoldConstrainedHyperConnections`` (mHC) with the original signature,
    on :class:`anydepth.nn.residual.hyper.ManifoldHyperConnection` (``H_post`` starts at ``2 sigmoid(1)`` as in
    the original). Extra keywords: ``dropout_placement`` and ``identity_init``.
    """

    def __init__(
        self,
        num_residual_streams: int,
        *,
        dim: int,
        branch: nn.Module | None = None,
        layer_index: int | None = None,
        channel_first: bool = False,
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
        dropout_placement: str = "branch",
        identity_init: bool = False,
    ):
        streams = _check_streams(num_residual_streams)
        cfg = ManifoldHyperConnection.Config(
            streams=streams,
            num_fracs=num_fracs,
            sinkhorn_iters=sinkhorn_iters,
            log_domain=log_domain_sinkhorn,
            identity_init=identity_init,
            dropout=dropout,
            dropout_placement=dropout_placement,
        )
        super().__init__(
            cfg,
            dim=dim,
            layer_index=_layer_index(layer_index, streams),
            num_input_views=num_input_views,
            beta_init=1.0,
            num_dynamic_alpha_proposals=num_dynamic_alpha_proposals,
            residual_mix_constraint_fn=residual_mix_constraint_fn,
            add_branch_out_to_residual=add_branch_out_to_residual,
            depth_residual_fn=None if depth_residual_fn is operator.add else depth_residual_fn,
        )
        self._init_seed_api(branch, channel_first, residual_transform, forward_method_names)


mHC = ManifoldConstrainedHyperConnections


def get_init_and_expand_reduce_stream_functions(
    num_streams: int,
    num_fracs: int = 1,
    dim: int | None = None,
    add_stream_embed: bool = False,
    disable: bool | None = None,
    sinkhorn_iters: int = 20,
    **kwargs,
):
    """``(init_hyper_conn, expand_stream, reduce_stream)`` building
    :class:`ManifoldConstrainedHyperConnections` (or :class:`Residual` when ``disable``)."""
    return _init_and_expand_reduce(
        ManifoldConstrainedHyperConnections,
        num_streams,
        num_fracs,
        dim,
        add_stream_embed,
        disable,
        sinkhorn_iters=sinkhorn_iters,
        **kwargs,
    )


# the original exposes the helpers on the class too
ManifoldConstrainedHyperConnections.get_expand_reduce_stream_functions = staticmethod(
    get_expand_reduce_stream_functions
)
ManifoldConstrainedHyperConnections.get_init_and_expand_reduce_stream_functions = staticmethod(
    get_init_and_expand_reduce_stream_functions
)
