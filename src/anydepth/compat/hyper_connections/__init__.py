"""``hyper_connections`` 0.4.11's public modules, as configurations of :mod:`anydepth.nn.residual.hyper`.

``import anydepth.compat.hyper_connections as hyper_connections`` (or the same path in each
``from ... import``) runs code written for the package unchanged: every submodule of the package
has its counterpart here, with the original constructors, calling conventions and state-dict keys
and shapes, and the computation of :class:`~anydepth.nn.residual.hyper.HyperConnection` and
:class:`~anydepth.nn.residual.hyper.ManifoldHyperConnection`.

==========================================================  ===========================================
submodule                                                   residual layout
==========================================================  ===========================================
``hyper_connections``                                       streams folded in the batch ``(b s) ... d``
``manifold_constrained_hyper_connections``                  ``(b s) ... d`` (mHC)
``mHCv2``                                                   explicit stream axis ``... s d`` (mHC)
``hyper_connections_channel_first``                         ``(b s) d ...``
``hyper_connections_with_multi_input_streams``              ``(b s) ... d`` plus extra residual inputs
``hyper_connections_with_multi_branch_inputs``              ``(b s) ... d``, branch inputs ``(i b) ... d``
``residuals``                                               gated / orthogonal residual updates
``vit``                                                     the package's example vision transformer
``triton_sinkhorn``                                         Sinkhorn with the CUDA kernel's signature
==========================================================  ===========================================

The deliberate differences from the package are listed in
:mod:`~anydepth.compat.hyper_connections.hyper_connections` and in each submodule's docstring.
"""

from anydepth.compat.hyper_connections.hyper_connections import (
    AttentionPoolReduceStream,
    HyperConnections,
    Residual,
    StreamEmbed,
    get_expand_reduce_stream_functions,
    get_init_and_expand_reduce_stream_functions,
)
from anydepth.compat.hyper_connections.manifold_constrained_hyper_connections import (
    ManifoldConstrainedHyperConnections,
    mHC,
)
from anydepth.compat.hyper_connections.manifold_constrained_hyper_connections import (
    get_expand_reduce_stream_functions as mc_get_expand_reduce_stream_functions,
)
from anydepth.compat.hyper_connections.manifold_constrained_hyper_connections import (
    get_init_and_expand_reduce_stream_functions as mc_get_init_and_expand_reduce_stream_functions,
)

__all__ = [
    "AttentionPoolReduceStream",
    "HyperConnections",
    "ManifoldConstrainedHyperConnections",
    "Residual",
    "StreamEmbed",
    "get_expand_reduce_stream_functions",
    "get_init_and_expand_reduce_stream_functions",
    "mHC",
    "mc_get_expand_reduce_stream_functions",
    "mc_get_init_and_expand_reduce_stream_functions",
]
