"""``hyper_connections.hyper_connections_with_multi_branch_inputs``: hyper-connections that feed ``i``
inputs to the branch (or to ``i / k`` inputs each of ``k`` branches) and mix its ``i`` outputs back.

With ``n`` streams ``H`` (folded into the batch, ``(b s) ... d``) and ``Hbar = rmsnorm(H)``::

    A(H) = A + s_a act(Hbar W_a)       A in R^{n x (i + n)}: columns [branch inputs | streams]
    B(H) = B + s_b act(Hbar W_b)       B in R^{n x i}
    x_k  = sum_s A[s, k] H_s           the k-th branch input, stacked as (i b) ... d
    H_j' = sum_s A[s, i + j] H_s + sum_k B[j, k] f(x)_k

The width connection is :class:`anydepth.nn.residual.hyper.HyperConnection`'s with ``num_input_views = i``;
only the depth connection, which takes one output per input, is specific to this module. At init
branch input ``k`` of layer ``l`` reads stream ``(-(k + l i)) mod n`` (the package's rule), so the
inputs of one layer read different streams; ``layer_index=None`` draws ``l`` from torch's generator.
Parameter names and shapes are the package's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from anydepth.compat.hyper_connections import hyper_connections as _compat
from anydepth.compat.hyper_connections.hyper_connections import Residual, StreamEmbed, _move_channels_last
from anydepth.nn.residual.hyper import HyperConnection
from anydepth.nn.residual.hyper import StreamNorm as RMSNorm

__all__ = [
    "HyperConnections",
    "RMSNorm",
    "Residual",
    "StreamEmbed",
    "get_expand_reduce_stream_functions",
    "get_init_and_expand_reduce_stream_functions",
]


def _branch_input_start(streams: int, inputs: int, layer_index: int) -> Tensor:
    """``(n, i)``: 1 where stream s feeds branch input k at init, ``(s + k + (l mod n i) i) mod n == 0``."""
    offset = layer_index % (streams * inputs) * inputs
    grid = torch.arange(streams).unsqueeze(-1) + torch.arange(inputs) + offset
    return (grid % streams == 0).float()


class HyperConnections(_compat.HyperConnections):
    """``hyper_connections.hyper_connections_with_multi_branch_inputs.HyperConnections`` with the
    package's signature: ``branch`` is a module or a list of modules (their count divides
    ``num_branch_inputs``; branch ``k`` gets the ``k``-th equal slice of the stacked inputs)."""

    def __init__(
        self,
        num_residual_streams: int,
        *,
        dim: int,
        branch: nn.Module | Sequence[nn.Module] | None = None,
        layer_index: int | None = None,
        tanh: bool = True,
        channel_first: bool = False,
        dropout: float = 0.0,
        num_branch_inputs: int = 1,
        dropout_placement: str = "branch",
    ):
        streams = _compat._check_streams(num_residual_streams)
        if isinstance(num_branch_inputs, bool) or not isinstance(num_branch_inputs, int) or num_branch_inputs < 1:
            raise ValueError(f"num_branch_inputs must be an int >= 1, got {num_branch_inputs!r}")
        branches = [branch] if isinstance(branch, nn.Module) else branch
        if branches is not None and (len(branches) == 0 or num_branch_inputs % len(branches)):
            raise ValueError(
                f"the number of branches ({len(branches)}) must divide num_branch_inputs={num_branch_inputs}; "
                "each branch takes an equal share of the inputs"
            )
        if layer_index is None:
            layer_index = int(torch.randint(streams * num_branch_inputs, ()))
        super().__init__(
            streams,
            dim=dim,
            layer_index=layer_index,
            tanh=tanh,
            channel_first=channel_first,
            dropout=dropout,
            num_input_views=num_branch_inputs,
            dropout_placement=dropout_placement,
        )
        self.num_branch_inputs = num_branch_inputs
        self.branches = None if branches is None else nn.ModuleList(branches)
        i = num_branch_inputs
        with torch.no_grad():
            self.static_alpha[:, :i] = _branch_input_start(streams, i, layer_index)
        self.static_beta = nn.Parameter(torch.ones(streams, i))
        self.dynamic_beta_fn = nn.Parameter(torch.zeros(dim, i))

    def _coefficients(self, hs: Tensor) -> tuple[Tensor, Tensor]:
        """``A(H)`` as ``(..., n, i + n)`` and ``B(H)`` as ``(..., 1, n, i)`` (one fraction)."""
        t = self.dynamic_alpha_fn.shape[-1]
        proj = self.norm.project(hs, torch.cat((self.dynamic_alpha_fn, self.dynamic_beta_fn), dim=-1))
        alpha = self.act(proj[..., :t]) * self.dynamic_alpha_scale + self.static_alpha
        beta = self.act(proj[..., t:]) * self.dynamic_beta_scale + self.static_beta
        return alpha.squeeze(-3), beta

    def _eager_width(self, h: Tensor):
        branch_in, mixed, beta = HyperConnection.width_connection(self, h)
        if self.num_branch_inputs == 1:
            branch_in = branch_in.unsqueeze(-2)
        branch_in = branch_in.movedim(-2, 0).flatten(0, 1)  # (i b) ... d, input-major as the package
        if self.channel_first:
            branch_in = branch_in.movedim(-1, 1)
        return branch_in, mixed, beta, h.dtype

    def _depth(self, branch_out: Tensor, mixed: Tensor, beta: Tensor, dtype) -> Tensor:
        y = _move_channels_last(branch_out, self.channel_first)
        i = self.num_branch_inputs
        expected = (i * mixed.shape[0], *mixed.shape[1:-3], self.dim)
        if tuple(y.shape) != expected:
            raise ValueError(
                f"the branch output must be (num_branch_inputs * batch, ..., dim) = {expected} in the residual's "
                f"layout, got {tuple(branch_out.shape)}; each branch input needs its output"
            )
        y = y.unflatten(0, (i, -1)).movedim(0, -2).to(mixed.dtype)  # (b, ..., i, d)
        if self.dropout_placement == "branch":
            y = self.dropout(y)
        out = torch.matmul(beta.squeeze(-3).to(mixed.dtype), y) + mixed.squeeze(-3)
        if self.dropout_placement == "stream":
            out = self.dropout(out)
        return self._fold(out.to(dtype))

    def _run_branches(self, branches, branch_in: Tensor, args, kwargs) -> Tensor:
        chunks = branch_in.chunk(len(branches), dim=0)
        return torch.cat([fn(x, *args, **kwargs) for fn, x in zip(branches, chunks)])

    def forward(self, residuals: Tensor, *branch_args, **branch_kwargs):
        branch_in, add_residual = super().forward(residuals)
        if self.branches is None:
            return branch_in, add_residual
        return add_residual(self._run_branches(self.branches, branch_in, branch_args, branch_kwargs))

    def decorate_branch(self, branch: Callable | Sequence[Callable]) -> Callable:
        if self.branches is not None:
            raise ValueError("decorate_branch: this hyper-connection already wraps a branch (branch= at init)")
        branches = [branch] if callable(branch) else list(branch)

        def forward_and_add_residual(residual, *args, **kwargs):
            branch_in, add_residual = self(residual)
            return add_residual(self._run_branches(branches, branch_in, args, kwargs))

        return forward_and_add_residual


# (the package's versions of these two take a stray first argument and fail)
get_expand_reduce_stream_functions, get_init_and_expand_reduce_stream_functions = _compat.stream_functions_for(
    HyperConnections
)
