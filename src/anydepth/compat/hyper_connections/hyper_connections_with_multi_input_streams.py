"""``hyper_connections.hyper_connections_with_multi_input_streams``: hyper-connections whose branch also
takes other residual streams, each reduced to one input by its own dynamic width connection.

``additional_input_paths`` names where each extra residual sits in the branch call: an int ``p >= 1``
is positional argument ``p`` of the branch (0 is the main residual), a str is a keyword argument;
``(path, dim)`` gives its feature size when it is not ``dim``. Each extra residual ``X`` (streams
folded into the batch, ``(b s) ... d_i``) becomes ``sum_s m_s X_s`` with

    m = a + s_x * act(rmsnorm(X) w_x)          a = e_(layer_index mod s), w_x = 0, s_x = 0.01 at init

(a width connection with one output and no residual columns). The main residual goes through
:class:`anydepth.compat.hyper_connections.hyper_connections.HyperConnections` unchanged.

``hc(residual, *args, **kwargs)`` returns ``((branch_args, branch_kwargs), add_residual)`` without a
branch (``branch_args[0]`` is the branch input), or the new residual (and the branch's other outputs)
with one. Parameters carry the package's names and shapes in ``state_dict()``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from anydepth.compat.hyper_connections import hyper_connections as _compat
from anydepth.compat.hyper_connections._state import Renamed, shape, translate_state_dict
from anydepth.compat.hyper_connections.hyper_connections import Residual, _move_channels_first, unfold_streams
from anydepth.nn.residual.hyper import StreamNorm as RMSNorm

__all__ = [
    "HyperConnections",
    "InputPathType",
    "ProjActScale",
    "RMSNorm",
    "Residual",
    "get_expand_reduce_stream_functions",
    "get_init_and_expand_reduce_stream_functions",
]

InputPathType = int | str


class ProjActScale(nn.Module):
    """``act(x W^T) * scale`` (``W`` zero and ``scale = 0.01`` at init; ``squeeze_output`` drops a
    trailing size-1 dim): the dynamic weight of one extra input. The hyper-connection folds its stream
    norm into ``W`` (:meth:`anydepth.nn.residual.hyper.StreamNorm.project`) instead of calling this forward."""

    def __init__(
        self,
        dim: int,
        dim_out: int | None = None,
        activation: nn.Module | None = None,
        scale_init: float = 1e-2,
        squeeze_output: bool = False,
    ):
        super().__init__()
        self.proj = nn.Linear(dim, dim if dim_out is None else dim_out, bias=False)
        nn.init.zeros_(self.proj.weight)
        self.act = activation if activation is not None else nn.Identity()
        self.scale = nn.Parameter(torch.full((), float(scale_init)))
        self.squeeze_output = squeeze_output

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.proj(x)) * self.scale
        return out.squeeze(-1) if self.squeeze_output else out


def _check_path(entry, dim: int) -> tuple[InputPathType, int]:
    path, path_dim = entry if isinstance(entry, tuple) else (entry, dim)
    ok_path = isinstance(path, str) or (isinstance(path, int) and not isinstance(path, bool) and path > 0)
    if not ok_path or isinstance(path_dim, bool) or not isinstance(path_dim, int) or path_dim < 1:
        raise ValueError(
            f"additional_input_paths: {entry!r} is not a path; give an int >= 1 (positional argument of "
            "the branch), a str (keyword argument), or (path, dim) for another feature size"
        )
    return path, path_dim


class HyperConnections(_compat.HyperConnections):
    """``hyper_connections.hyper_connections_with_multi_input_streams.HyperConnections``: the package's
    signature on :class:`anydepth.compat.hyper_connections.hyper_connections.HyperConnections` (whose
    keywords pass through)."""

    def __init__(
        self,
        num_residual_streams: int,
        *,
        dim: int,
        additional_input_paths: list[InputPathType | tuple[InputPathType, int]] | None = None,
        branch: nn.Module | None = None,
        layer_index: int | None = None,
        tanh: bool = True,
        channel_first: bool = False,
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
        paths = [_check_path(entry, dim) for entry in (additional_input_paths or [])]
        self.additional_input_paths = paths
        s = self.streams
        start = torch.zeros(s)
        start[self.layer_index % s] = 1.0
        self.additional_norms = nn.ModuleList([RMSNorm(d) for _, d in paths])
        self.additional_to_dynamic_input = nn.ModuleList(
            [ProjActScale(d, 1, self.act, squeeze_output=True) for _, d in paths]
        )
        self.additional_static_input = nn.ParameterList([nn.Parameter(start.clone()) for _ in paths])
        if self.num_fracs == 1 and self.num_input_views == 1 and self.add_branch_out_to_residual:
            d = self.dim
            translate_state_dict(
                self,
                Renamed("dynamic_alpha_fn", "dynamic_alpha_and_branch_input.proj.weight", (d, s + 1), (s + 1, d), True),
                Renamed("dynamic_alpha_scale", "dynamic_alpha_and_branch_input.scale", (), ()),
                Renamed("dynamic_beta_fn", "dynamic_beta.proj.weight", shape(self, "dynamic_beta_fn"), (1, d)),
                Renamed("dynamic_beta_scale", "dynamic_beta.scale", (), ()),
            )

    def _reduce_input(self, i: int, x, path) -> Tensor:
        if not torch.is_tensor(x):
            raise TypeError(f"additional input {path!r} must be a tensor of residual streams, got {type(x).__name__}")
        norm, dyn = self.additional_norms[i], self.additional_to_dynamic_input[i]
        static = self.additional_static_input[i]
        h = unfold_streams(x, self.streams, self.channel_first)  # (b, ..., s, d_i)
        if h.shape[-1] != norm.gamma.shape[-1]:
            raise ValueError(
                f"additional input {path!r} must have {norm.gamma.shape[-1]} features, got shape {tuple(x.shape)}; "
                "give its size as (path, dim) in additional_input_paths"
            )
        mix = self.act(norm.project(h, dyn.proj.weight.t())) * dyn.scale + static.unsqueeze(-1)
        return _move_channels_first((h * mix).sum(-2), self.channel_first)

    def width_connection(self, residuals: Tensor, *branch_args, **branch_kwargs):
        """``(([branch_input, *branch_args], branch_kwargs), residuals, residual_kwargs)``: the main
        width connection, with each additional input replaced by its reduced stream mix."""
        branch_input, mixed, residual_kwargs = super().width_connection(residuals)
        args, kwargs = list(branch_args), dict(branch_kwargs)
        for i, (path, _) in enumerate(self.additional_input_paths):
            if isinstance(path, int):
                if path > len(args):
                    raise ValueError(
                        f"additional input path {path} points at positional argument {path} of the branch, "
                        f"but only {len(args)} were given after the residual"
                    )
                args[path - 1] = self._reduce_input(i, args[path - 1], path)
            else:
                if path not in kwargs:
                    raise ValueError(f"additional input path {path!r}: the keyword argument {path}= was not given")
                kwargs[path] = self._reduce_input(i, kwargs[path], path)
        return ([branch_input, *args], kwargs), mixed, residual_kwargs

    def forward(self, residuals: Tensor, *branch_args, **branch_kwargs):
        (args, kwargs), mixed, residual_kwargs = self.width_connection(residuals, *branch_args, **branch_kwargs)

        def add_residual(branch_out):
            (first, *rest), spec = tree_flatten(branch_out)
            return tree_unflatten((self.depth_connection(first, mixed, **residual_kwargs), *rest), spec)

        if self.branch is None:
            return (args, kwargs), add_residual
        return add_residual(self.branch(*args, **kwargs))

    def decorate_branch(self, branch: Callable) -> Callable:
        if self.branch is not None:
            raise ValueError("decorate_branch: this hyper-connection already wraps a branch (branch= at init)")

        def forward_and_add_residual(residual, *args, **kwargs):
            (args, kwargs), add_residual = self(residual, *args, **kwargs)
            return add_residual(branch(*args, **kwargs))

        return forward_and_add_residual


get_expand_reduce_stream_functions, get_init_and_expand_reduce_stream_functions = _compat.stream_functions_for(
    HyperConnections
)
