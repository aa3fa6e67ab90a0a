"""``hyper_connections.hyper_connections_channel_first``: hyper-connections for feature maps, residuals
``(b s) d ...`` with the features on dimension 1 (convolutional branches).

:class:`HyperConnections` is :class:`anydepth.compat.hyper_connections.hyper_connections.HyperConnections` with
``channel_first=True``; the package computes its dynamic weights with 1x1 convolutions, which are
the same projections: ``state_dict()`` writes the package's keys and shapes (``dynamic_alpha_fn.weight``
``(s + 1, d, 1, 1)``, ``dynamic_beta_fn.0.weight`` ``(1, d, 1, 1)``, ``norm.gamma`` ``(d, 1, 1)``) and
``load_state_dict`` reads them. Unlike the package (``Conv2d``), any number of spatial dims works.
"""

from __future__ import annotations

from torch import nn

from anydepth.compat.hyper_connections import hyper_connections as _compat
from anydepth.compat.hyper_connections._state import Renamed, shape, translate_state_dict
from anydepth.compat.hyper_connections.hyper_connections import Residual
from anydepth.nn.residual.hyper import StreamNorm

__all__ = [
    "HyperConnections",
    "RMSNorm",
    "Residual",
    "get_expand_reduce_stream_functions",
    "get_init_and_expand_reduce_stream_functions",
]


class RMSNorm(StreamNorm):
    """:class:`anydepth.nn.residual.hyper.StreamNorm` over dimension 1 (``x / ||x|| * sqrt(d) * (1 + gamma)``
    per position of a feature map); ``gamma`` is stored as ``(d, 1, 1)`` like the package's."""

    def __init__(self, dim: int):
        super().__init__(dim)
        translate_state_dict(self, Renamed("gamma", "gamma", (dim,), (dim, 1, 1)))

    def forward(self, x):
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


class HyperConnections(_compat.HyperConnections):
    """``hyper_connections.hyper_connections_channel_first.HyperConnections``: the package's signature
    (``channel_first`` defaults to True), the computation of
    :class:`anydepth.nn.residual.hyper.HyperConnection`. Keywords of
    :class:`anydepth.compat.hyper_connections.hyper_connections.HyperConnections` (``num_fracs``,
    ``dropout_placement``, ...) pass through."""

    def __init__(
        self,
        num_residual_streams: int,
        *,
        dim: int,
        branch: nn.Module | None = None,
        layer_index: int | None = None,
        tanh: bool = True,
        channel_first: bool = True,
        dropout: float = 0.0,
        **kwargs,
    ):
        super().__init__(
            num_residual_streams,
            dim=dim,
            branch=branch,
            layer_index=layer_index,
            tanh=tanh,
            channel_first=channel_first,
            dropout=dropout,
            **kwargs,
        )
        if self.num_fracs == 1 and self.num_input_views == 1 and self.add_branch_out_to_residual:
            s, d = self.streams, self.dim
            translate_state_dict(
                self,
                Renamed("norm.gamma", "norm.gamma", (d,), (d, 1, 1)),
                Renamed("dynamic_alpha_fn", "dynamic_alpha_fn.weight", (d, s + 1), (s + 1, d, 1, 1), True),
                Renamed("dynamic_beta_fn", "dynamic_beta_fn.0.weight", shape(self, "dynamic_beta_fn"), (1, d, 1, 1)),
            )


get_expand_reduce_stream_functions, get_init_and_expand_reduce_stream_functions = _compat.stream_functions_for(
    HyperConnections
)
