"""``hyper_connections.manifold_constrained_hyper_connections``: mHC (arXiv 2512.24880) with the streams
folded into the batch, ``(b s) ... d``; the classes of :mod:`anydepth.compat.hyper`.

``sinkhorn_knopps`` and ``log_domain_sinkhorn_knopps`` are :func:`anydepth.nn.hyper.sinkhorn` (the
plain and the log-space iteration); unlike the package, ``iters < 1`` raises here (this module's
classes never pass it; see :mod:`~anydepth.compat.hyper_connections.mHCv2` for ``iters=0``)."""

from __future__ import annotations

from torch import Tensor

from anydepth.compat.hyper import (
    AttentionPoolReduceStream,
    ManifoldConstrainedHyperConnections,
    Residual,
    StreamEmbed,
    mHC,
)
from anydepth.compat.hyper import get_expand_reduce_stream_functions as get_expand_reduce_stream_functions
from anydepth.compat.hyper import (
    mc_get_init_and_expand_reduce_stream_functions as get_init_and_expand_reduce_stream_functions,
)
from anydepth.nn.hyper import StreamNorm as RMSNorm
from anydepth.nn.hyper import sinkhorn

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
    """Sinkhorn-Knopp projection of ``exp(log_alpha)`` (see :func:`anydepth.nn.hyper.sinkhorn`)."""
    return sinkhorn(log_alpha, iters)


def log_domain_sinkhorn_knopps(log_alpha: Tensor, iters: int = 20) -> Tensor:
    """The same projection iterated in log space (``log_softmax`` over columns, then rows)."""
    return sinkhorn(log_alpha, iters, log_domain=True)
