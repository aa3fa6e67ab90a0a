"""``hyper_connections.hyper_connections``: static and dynamic hyper-connections with the streams folded
into the batch, ``(b s) ... d``. The classes are those of :mod:`anydepth.compat.hyper`; ``RMSNorm``
is :class:`anydepth.nn.hyper.StreamNorm` (``x / ||x|| * sqrt(d) * (1 + gamma)``, the same parameter)."""

from anydepth.compat.hyper import (
    AttentionPoolReduceStream,
    HyperConnections,
    Residual,
    StreamEmbed,
    decorate_branch,
    get_expand_reduce_stream_functions,
    get_init_and_expand_reduce_stream_functions,
)
from anydepth.nn.hyper import StreamNorm as RMSNorm

__all__ = [
    "AttentionPoolReduceStream",
    "HyperConnections",
    "RMSNorm",
    "Residual",
    "StreamEmbed",
    "decorate_branch",
    "get_expand_reduce_stream_functions",
    "get_init_and_expand_reduce_stream_functions",
]
