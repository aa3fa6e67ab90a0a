"""``hyper_connections.hyper_connections``: static and dynamic hyper-connections with the streams folded
into the batch, ``(b s) ... d``, as configurations of :mod:`anydepth.nn.residual.hyper`.

Code written for ``hyper_connections`` runs unchanged: residual streams are folded into the batch,
``(b s) ... d`` with the stream as the inner index (``(b s) d ...`` with ``channel_first=True``), and
every class keeps the original constructor, parameter names and shapes, so a state dict saved from
the original loads here. The computation is the library's own
(:class:`~anydepth.nn.residual.hyper.HyperConnection`,
:class:`~anydepth.nn.residual.hyper.ManifoldHyperConnection`): these classes translate the original
keyword arguments into the library's ``Config`` and only move the stream axis next to the features
and back. ``RMSNorm`` is :class:`anydepth.nn.residual.hyper.StreamNorm` (``x / ||x|| * sqrt(d) *
(1 + gamma)``, the same parameter). This module is the one translation; every other submodule of
:mod:`anydepth.compat.hyper_connections` builds on it.

Deliberate differences from ``hyper_connections`` 0.4.11:

- ``layer_index=None`` draws the initial input stream from torch's generator, so
  ``torch.manual_seed`` makes construction reproducible (the original uses Python's ``random``);
- ``dropout`` hits the branch output only (``dropout_placement="stream"`` restores the original);
- with ``num_fracs > 1`` the model equals the plain residual at init (see :mod:`anydepth.nn.residual.hyper`);
- mHC accepts several input views, fractions and ``channel_first`` (each raises in the original),
  and ``identity_init=True`` starts its residual mixing at the identity;
- with several input views and ``channel_first=True`` the branch input is ``(v, b, d, ...)`` (the
  original moves the features in front of the batch, ``(v, d, b, ...)``);
- ``width_connection`` returns ``beta`` as ``(..., fracs, streams)``; what it returns is meant for
  ``depth_connection`` (the original's contract), not for inspection;
- bad arguments raise ``ValueError`` naming the argument instead of failing inside einops.

"""

from __future__ import annotations

import operator
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from anydepth.nn.residual import hyper_fused
from anydepth.nn.residual.hyper import HyperConnection
from anydepth.nn.residual.hyper import StreamNorm as RMSNorm

__all__ = [
    "HyperConnections",
    "Residual",
    "StreamEmbed",
    "AttentionPoolReduceStream",
    "decorate_branch",
    "get_expand_reduce_stream_functions",
    "get_init_and_expand_reduce_stream_functions",
    "RMSNorm",
]


def _check_streams(num_streams) -> int:
    if isinstance(num_streams, bool) or not isinstance(num_streams, int) or num_streams < 1:
        raise ValueError(
            f"num_streams must be an int >= 1, got {num_streams!r}; use 1 for a plain residual or 4 as in the paper"
        )
    return num_streams


def unfold_streams(x: Tensor, streams: int, channel_first: bool = False) -> Tensor:
    """``(b s) ... d`` (or ``(b s) d ...``) -> ``(b, ..., s, d)``, the layout of :mod:`anydepth.nn.residual.hyper`."""
    if x.dim() < 2 or x.shape[0] % streams:
        raise ValueError(
            f"the residual's batch dimension must be a multiple of num_residual_streams={streams} "
            f"(streams are folded into the batch as (b s) ...), got shape {tuple(x.shape)}; "
            "call expand_stream(x) before the first hyper-connection"
        )
    h = x.unflatten(0, (-1, streams))  # (b, s, ..., d)
    if channel_first:
        h = h.movedim(2, -1)
    return h.movedim(1, -2)


def fold_streams(h: Tensor, channel_first: bool = False) -> Tensor:
    """Inverse of :func:`unfold_streams`."""
    x = h.movedim(-2, 1)
    if channel_first:
        x = x.movedim(-1, 2)
    return x.flatten(0, 1)


def _move_channels_last(x: Tensor, channel_first: bool) -> Tensor:
    return x.movedim(1, -1) if channel_first else x


def _move_channels_first(x: Tensor, channel_first: bool) -> Tensor:
    return x.movedim(-1, 1) if channel_first else x


class _FoldedStreams:
    """The original's calling conventions on top of a :class:`HyperConnection` subclass.

    ``forward(residuals, *a, **kw)`` returns the new residuals when a ``branch`` was given, else
    ``(branch_input, add_residual)``; ``add_residual`` takes a tensor or a pytree whose first leaf is
    the branch output (other leaves pass through unchanged).
    """

    def _init_seed_api(self, branch, channel_first, residual_transform=None, forward_method_names=()):
        self.branch = branch
        self.channel_first = channel_first
        self.num_residual_streams = self.streams
        self.residual_transform = residual_transform if residual_transform is not None else nn.Identity()
        self.forward_method_names = tuple(forward_method_names)
        for name in self.forward_method_names:
            if hasattr(self, name):
                raise ValueError(f"forward_method_names: {name!r} would shadow an attribute of the module")
            setattr(self, name, getattr(branch, name))

    def _check_channels(self, residuals: Tensor) -> None:
        axis = 1 if self.channel_first else -1
        if residuals.dim() < 2 or residuals.shape[axis] != self.dim:
            where = "dimension 1 (channel_first=True)" if self.channel_first else "the last dimension"
            raise ValueError(
                f"the residual's feature size ({where}) must be dim={self.dim}, got shape "
                f"{tuple(residuals.shape)}; pass the branch width as dim="
            )

    def _unfold(self, residuals: Tensor) -> Tensor:
        """The residual in this API's layout -> ``(..., n, d)``; :meth:`_fold` is the inverse."""
        return unfold_streams(residuals, self.streams, self.channel_first)

    def _fold(self, h: Tensor) -> Tensor:
        return fold_streams(h, self.channel_first)

    def _streams(self, residuals: Tensor) -> Tensor:
        """The transformed, checked residual with its streams unfolded to an explicit axis."""
        residuals = self.residual_transform(residuals)
        self._check_channels(residuals)
        return self._unfold(residuals)

    def width_connection(self, residuals: Tensor):
        """``(branch_input, residuals, residual_kwargs)``, the original's contract: the mixed streams
        ``H' = A_r^T H`` in the residual's layout and ``{"beta": B}`` (``B`` of shape
        ``(..., fracs, n)``), all in the residual's dtype; :meth:`depth_connection` takes them back."""
        h = self._streams(residuals)
        branch_in, mixed, beta, dtype = self._eager_width(h)
        mixed = self._fold(self._merge_fracs(mixed).to(dtype))
        return branch_in, mixed, {"beta": None if beta is None else beta.to(dtype)}

    def depth_connection(self, branch_output: Tensor, residuals: Tensor, *, beta: Tensor | None = None) -> Tensor:
        """``H_new = B * branch_output + residuals`` for the values :meth:`width_connection` returned,
        in ``residuals``' layout and dtype."""
        if not self.add_branch_out_to_residual:
            return branch_output
        if beta is None:
            raise ValueError("depth_connection needs beta=, the residual_kwargs['beta'] of width_connection")
        mixed = self._split_fracs(self._unfold(residuals))
        return self._depth(branch_output, mixed, beta, residuals.dtype)

    def _eager_width(self, h: Tensor):
        branch_in, mixed, beta = HyperConnection.width_connection(self, h)
        views = self.num_input_views > 1
        if views:
            branch_in = branch_in.movedim(-2, 0)  # the original puts the views first: (v, b, ..., d)
        if self.channel_first:
            branch_in = branch_in.movedim(-1, 2 if views else 1)
        return branch_in, mixed, beta, h.dtype

    def _depth(self, branch_out: Tensor, mixed: Tensor, beta, dtype) -> Tensor:
        if not self.add_branch_out_to_residual:
            return branch_out
        y = _move_channels_last(branch_out, self.channel_first)
        if self.depth_residual_fn is not None:
            return self._custom_depth(y, mixed, beta, dtype)
        h = HyperConnection.depth_connection(self, y, mixed, beta).to(dtype)
        return self._fold(h)

    def _custom_depth(self, y: Tensor, mixed: Tensor, beta: Tensor, dtype) -> Tensor:
        """``depth_residual_fn(B * y, H')`` with both arguments in this API's residual layout and dtype,
        as the original calls it (a gated or orthogonal update sees whole streams, not fractions)."""
        if y.shape[-1] != self.dim:
            raise ValueError(
                f"the branch output's feature size must be dim={self.dim}, got shape {tuple(y.shape)}; "
                "a residual branch must map dim to dim"
            )
        if self.dropout_placement == "branch":
            y = self.dropout(y)
        ys = y.unflatten(-1, (self.num_fracs, self.frac_dim)).unsqueeze(-2).to(mixed.dtype)
        out = self._merge_fracs(beta.unsqueeze(-1).to(mixed.dtype) * ys)
        residuals = self._fold(self._merge_fracs(mixed).to(dtype))
        new = self.depth_residual_fn(self._fold(out.to(dtype)), residuals)
        return self.dropout(new) if self.dropout_placement == "stream" else new

    def forward(self, residuals: Tensor, *branch_args, **branch_kwargs):
        h = self._streams(residuals)
        fused = HyperConnection._fused_args(self, h, branch_norm=False) if self.streams > 1 else None
        if fused is not None:
            # the builder module's fused kernels; same result as width_connection/depth_connection
            branch_in, alpha, beta, h = hyper_fused.width_connection(h, *fused)
            branch_in = _move_channels_first(branch_in, self.channel_first)

            def depth(branch_out: Tensor) -> Tensor:
                y = _move_channels_last(branch_out, self.channel_first)
                return self._fold(HyperConnection._fused_depth(self, h, alpha, beta, y))
        else:
            branch_in, mixed, beta, dtype = self._eager_width(h)

            def depth(branch_out: Tensor) -> Tensor:
                return self._depth(branch_out, mixed, beta, dtype)

        def add_residual(branch_out):
            if not self.add_branch_out_to_residual:
                return branch_out
            (first, *rest), spec = tree_flatten(branch_out)
            return tree_unflatten((depth(first), *rest), spec)

        if self.branch is None:
            return branch_in, add_residual
        return add_residual(self.branch(branch_in, *branch_args, **branch_kwargs))

    def decorate_branch(self, branch: Callable) -> Callable:
        """``residuals -> add_residual(branch(branch_input, *a, **kw))`` for a plain callable."""
        return decorate_branch(self, branch)


def decorate_branch(hyper_conn: nn.Module, branch: Callable) -> Callable:
    """Wraps ``branch`` so that ``fn(residuals, *a, **kw)`` runs the whole hyper-connection around it.

    ``hyper_conn`` is a :class:`HyperConnections`, :class:`ManifoldConstrainedHyperConnections` or
    :class:`Residual` built without a ``branch`` (one that already wraps a branch raises).
    """
    if getattr(hyper_conn, "branch", None) is not None:
        raise ValueError(
            "decorate_branch: this hyper-connection already wraps a branch (branch= was given at init); "
            "build it without branch= to decorate another callable"
        )
    if not callable(branch):
        raise TypeError(f"decorate_branch: branch must be callable, got {type(branch).__name__}")

    def forward_and_add_residual(residuals, *args, **kwargs):
        branch_input, add_residual = hyper_conn(residuals)
        return add_residual(branch(branch_input, *args, **kwargs))

    return forward_and_add_residual


def _layer_index(layer_index, streams: int) -> int:
    if layer_index is None:
        # torch's generator, not Python's random: torch.manual_seed alone makes the model reproducible
        return int(torch.randint(streams, ()))
    return layer_index


class HyperConnections(_FoldedStreams, HyperConnection):
    """``hyper_connections.HyperConnections`` (static + dynamic hyper-connections, Alg. 2 of
    arXiv 2409.19606) with the original signature, on :class:`anydepth.nn.residual.hyper.HyperConnection`.

    ``hc(residuals)`` with residuals ``(b s) ... dim`` returns ``(branch_input, add_residual)``, or the
    new residuals directly when built with ``branch=``. Extra keyword ``dropout_placement``:
    ``"branch"`` (default) or ``"stream"`` (the original's whole-stream dropout).
    """

    def __init__(
        self,
        num_residual_streams: int,
        *,
        dim: int,
        branch: nn.Module | None = None,
        layer_index: int | None = None,
        tanh: bool = True,
        channel_first: bool = False,
        dropout: float = 0.0,
        add_branch_out_to_residual: bool = True,
        num_input_views: int = 1,
        depth_residual_fn: Callable[[Tensor, Tensor], Tensor] = operator.add,
        num_fracs: int = 1,
        dropout_placement: str = "branch",
    ):
        streams = _check_streams(num_residual_streams)
        cfg = HyperConnection.Config(
            streams=streams, tanh=tanh, num_fracs=num_fracs, dropout=dropout, dropout_placement=dropout_placement
        )
        super().__init__(
            cfg,
            dim=dim,
            layer_index=_layer_index(layer_index, streams),
            num_input_views=num_input_views,
            add_branch_out_to_residual=add_branch_out_to_residual,
            depth_residual_fn=None if depth_residual_fn is operator.add else depth_residual_fn,
        )
        self._init_seed_api(branch, channel_first)


class Residual(nn.Module):
    """The plain residual with the hyper-connection calling conventions: ``branch(x) + transform(x)``.

    What ``get_init_and_expand_reduce_stream_functions(..., disable=True)`` returns, so the same code
    compares hyper-connections against the baseline. Positional and unknown keyword arguments of the
    hyper-connection constructors are accepted and ignored.
    """

    def __init__(self, *args, branch: nn.Module | None = None, residual_transform: nn.Module | None = None, **kw):
        super().__init__()
        self.branch = branch
        self.residual_transform = residual_transform if residual_transform is not None else nn.Identity()

    def width_connection(self, residuals: Tensor, *args, **kwargs):
        """``(branch_input, residuals, {})``: the residual is the branch input."""
        return residuals, residuals, {}

    def depth_connection(self, branch_output: Tensor, residuals: Tensor) -> Tensor:
        return branch_output + self.residual_transform(residuals)

    def forward(self, residuals: Tensor, *branch_args, **branch_kwargs):
        def add_residual(branch_out):
            (first, *rest), spec = tree_flatten(branch_out)
            return tree_unflatten((first + self.residual_transform(residuals), *rest), spec)

        if self.branch is None:
            return residuals, add_residual
        return add_residual(self.branch(residuals, *branch_args, **branch_kwargs))

    def decorate_branch(self, branch: Callable) -> Callable:
        return decorate_branch(self, branch)


class _RepeatStreams(nn.Module):
    """``b ... -> (b s) ...``: s copies of each sample, stream as the inner index."""

    def __init__(self, num_streams: int):
        super().__init__()
        self.num_streams = num_streams

    def forward(self, x: Tensor) -> Tensor:
        return x.repeat_interleave(self.num_streams, dim=0)


class _SumStreams(nn.Module):
    """``(b s) ... -> b ...``: the sum of the streams (what the original's reduce computes)."""

    def __init__(self, num_streams: int):
        super().__init__()
        self.num_streams = num_streams

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] % self.num_streams:
            raise ValueError(
                f"reduce_stream: the batch dimension must be a multiple of num_streams={self.num_streams}, "
                f"got shape {tuple(x.shape)}; pass the output of the hyper-connected trunk"
            )
        return x.unflatten(0, (-1, self.num_streams)).sum(1)


class StreamEmbed(nn.Module):
    """Adds a learned per-stream embedding (zero at init) to the folded streams; with
    ``expand_to_streams=True`` it first repeats ``b ... -> (b s) ...`` (an expand function)."""

    def __init__(self, num_streams: int, dim: int, channel_first: bool = False, expand_to_streams: bool = False):
        super().__init__()
        self.num_streams = _check_streams(num_streams)
        self.channel_first = channel_first
        self.expand_to_streams = expand_to_streams
        self.stream_embed = nn.Parameter(torch.zeros(num_streams, dim))

    def forward(self, residuals: Tensor) -> Tensor:
        if self.expand_to_streams:
            residuals = residuals.repeat_interleave(self.num_streams, dim=0)
        h = unfold_streams(residuals, self.num_streams, self.channel_first)
        return fold_streams(h + self.stream_embed, self.channel_first)


class AttentionPoolReduceStream(nn.Module):
    """Reduces ``(b s) ... d -> b ... d`` by a per-feature softmax over the streams (Enformer's
    attention pool): ``sum_s softmax_s(W h_s) * h_s`` with ``W`` initialised to the identity. A
    weighted average, so the output keeps the scale of one stream (the sum reduce gives s times it)."""

    def __init__(self, num_streams: int, dim: int, channel_first: bool = False):
        super().__init__()
        self.num_streams = _check_streams(num_streams)
        self.channel_first = channel_first
        self.to_attn_logits = nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            self.to_attn_logits.weight.copy_(torch.eye(dim))

    def forward(self, residuals: Tensor) -> Tensor:
        h = unfold_streams(residuals, self.num_streams, self.channel_first)
        attn = self.to_attn_logits(h).softmax(dim=-2)
        return _move_channels_first((h * attn).sum(-2), self.channel_first)


def get_expand_reduce_stream_functions(
    num_streams: int, add_stream_embed: bool = False, dim: int | None = None, disable: bool = False
) -> tuple[nn.Module, nn.Module]:
    """``(expand, reduce)``: ``b ... -> (b s) ...`` (repeat, plus a stream embedding when
    ``add_stream_embed``) and ``(b s) ... -> b ...`` (sum); identities when ``disable``."""
    if disable:
        return nn.Identity(), nn.Identity()
    _check_streams(num_streams)
    if add_stream_embed:
        if dim is None:
            raise ValueError("add_stream_embed=True needs dim= (the feature size of the stream embedding)")
        expand = StreamEmbed(num_streams, dim, expand_to_streams=True)
    else:
        expand = _RepeatStreams(num_streams)
    return expand, _SumStreams(num_streams)


def _init_and_expand_reduce(klass, num_streams, num_fracs, dim, add_stream_embed, disable, **kwargs):
    _check_streams(num_streams)
    disable = (num_streams == 1 and num_fracs == 1) if disable is None else disable
    init = partial(Residual if disable else klass, num_streams, num_fracs=num_fracs, **kwargs)
    if dim is not None:
        init = partial(init, dim=dim)
    return (init, *get_expand_reduce_stream_functions(num_streams, add_stream_embed, dim, disable))


def get_init_and_expand_reduce_stream_functions(
    num_streams: int,
    num_fracs: int = 1,
    dim: int | None = None,
    add_stream_embed: bool = False,
    disable: bool | None = None,
):
    """``(init_hyper_conn, expand_stream, reduce_stream)``: ``init_hyper_conn(dim=..., branch=...)``
    builds :class:`HyperConnections` (or :class:`Residual` when ``disable``, which defaults to one
    stream and one fraction)."""
    return _init_and_expand_reduce(HyperConnections, num_streams, num_fracs, dim, add_stream_embed, disable)


def stream_functions_for(klass: type) -> tuple[Callable, Callable]:
    """``(get_expand_reduce_stream_functions, get_init_and_expand_reduce_stream_functions)`` of a
    submodule whose hyper-connection class takes the stream count alone (channel-first, multi-input,
    multi-branch): ``(expand, reduce)``, and ``(init_hyper_conn, expand, reduce)`` building ``klass``
    (:class:`Residual` when ``disable``, which defaults to one stream). Both are attached to ``klass``
    as static methods, as the package does."""

    def get_expand_reduce_stream_functions(num_streams: int, disable: bool = False):
        """``(expand, reduce)``: ``b ... -> (b s) ...`` and the sum back; identities when ``disable``."""
        return _get_expand_reduce(num_streams, disable=disable)

    def get_init_and_expand_reduce_stream_functions(num_streams: int, disable: bool | None = None):
        """``(init_hyper_conn, expand_stream, reduce_stream)``; :class:`Residual` when ``disable``
        (default: one stream)."""
        _check_streams(num_streams)
        disable = num_streams == 1 if disable is None else disable
        init = partial(Residual if disable else klass, num_streams)
        return (init, *get_expand_reduce_stream_functions(num_streams, disable))

    klass.get_expand_reduce_stream_functions = staticmethod(get_expand_reduce_stream_functions)
    klass.get_init_and_expand_reduce_stream_functions = staticmethod(get_init_and_expand_reduce_stream_functions)
    return get_expand_reduce_stream_functions, get_init_and_expand_reduce_stream_functions


_get_expand_reduce = get_expand_reduce_stream_functions

# the original exposes the helpers on the class too
HyperConnections.get_expand_reduce_stream_functions = staticmethod(get_expand_reduce_stream_functions)
HyperConnections.get_init_and_expand_reduce_stream_functions = staticmethod(get_init_and_expand_reduce_stream_functions)
