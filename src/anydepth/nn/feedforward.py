"""Position-wise feed-forward layers: an MLP and gated linear units, optionally over pieces of rows.

Both kinds are built from their ``Config`` and ``dim`` (``FFS.build(cfg, dim=...)``, ``MLP(MLP.Config(mult=2),
dim=64)`` or ``MLP.make(dim=64, mult=2)``) and map ``(b, n, dim) -> (b, n, dim)`` token by token.
Because no token sees another, running them on pieces of the ``b * n`` rows gives exactly the unchunked
result while only one piece's hidden activations (``mult`` times wider than the input) exist at a time (the
Reformer's chunked feed-forward, Kitaev et al. 2020, arXiv:2001.04451, section 3).

Pieces are sized, not counted: ``chunk_size`` rows, or as many rows as ``chunk_mib`` MiB of hidden
activations hold. A count (``chunks``, the Reformer's ``ff_chunks``) bounds the memory to ``1 / chunks`` of
the unchunked layer's, but at short lengths it makes pieces of a few dozen rows whose matrix products run
far below the machine's speed; with ``chunk_mib`` as well, pieces are the larger of the two, so the bound is
``max(total / chunks, chunk_mib)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from anydepth.nn.registry import FFS, Configurable

__all__ = ["MLP", "GLU", "ACTIVATIONS", "get_activation"]


def _relu_squared(x: Tensor) -> Tensor:
    return F.relu(x).square()


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,  # exact erf form (BERT, GPT-2 used the tanh approximation below)
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "relu_squared": _relu_squared,  # Primer (So et al. 2021)
    "swish": F.silu,  # x * sigmoid(x); in a GLU this is SwiGLU
    "silu": F.silu,
    "sigmoid": torch.sigmoid,  # in a GLU this is Dauphin et al.'s original GLU
    "tanh": torch.tanh,
    "identity": lambda x: x,  # in a GLU this is the bilinear variant
}


def get_activation(name: str) -> Callable[[Tensor], Tensor]:
    """The activation function called ``name`` (see :data:`ACTIVATIONS`)."""
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"unknown feed-forward activation={name!r}; choose one of: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _check_sizes(cfg) -> None:
    """The feed-forward Configs' own checks (run before the generic field ranges, for these messages)."""
    mult, dropout, chunks = cfg.mult, cfg.dropout, cfg.chunks
    chunk_size, chunk_mib = cfg.chunk_size, cfg.chunk_mib
    if isinstance(mult, bool) or not isinstance(mult, int | float) or mult <= 0:
        raise ValueError(f"feed-forward mult must be a positive number (4 is usual), got {mult!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"feed-forward dropout must be in [0, 1), got {dropout!r}")
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"feed-forward chunks must be an int >= 1 (1: no chunking), got {chunks!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"feed-forward chunk_size must be a positive int (rows per piece) or None, got {chunk_size!r}")
    if chunk_mib is not None and (
        isinstance(chunk_mib, bool) or not isinstance(chunk_mib, int | float) or not chunk_mib > 0
    ):
        raise ValueError(
            f"feed-forward chunk_mib must be a positive number (MiB of hidden activations per piece) or "
            f"None, got {chunk_mib!r}"
        )
    if chunk_size is not None and chunk_mib is not None:
        raise ValueError(
            f"feed-forward chunk_size={chunk_size} and chunk_mib={chunk_mib} both size the pieces; pass one"
        )


class _FeedForward(Configurable, nn.Module):
    """Shared machinery: projections, xavier init and sequence chunking.

    Subclasses define ``proj_in`` (``dim -> width``), ``proj_out`` (``hidden -> dim``) and ``_hidden``.
    """

    def __init__(self, cfg, *, dim: int, width: int):
        """``width`` is the hidden width ``proj_in`` produces per unit of ``int(dim * mult)`` (2 for a GLU)."""
        super().__init__()
        cfg = self.config_of(cfg)
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"feed-forward dim must be a positive int, got {dim!r}")
        self.dim, self.hidden = dim, max(1, int(dim * cfg.mult))
        self.chunks, self.checkpoint_chunks = cfg.chunks, cfg.checkpoint
        self.chunk_size, self.chunk_mib = cfg.chunk_size, cfg.chunk_mib
        self.dropout = nn.Dropout(cfg.dropout)
        self.act_name, self.act = cfg.activation, get_activation(cfg.activation)
        self.proj_in = nn.Linear(dim, width * self.hidden, bias=cfg.bias)
        self.proj_out = nn.Linear(self.hidden, dim, bias=cfg.bias)
        self.reset_parameters()

    def reset_parameters(self, beta: float = 1.0) -> None:
        """Xavier-normal init with gain ``beta`` on both projections, zero biases.

        ``beta`` is DeepNet's down-scaling of branch weights (Wang et al. 2022, arXiv:2203.00555); 1 gives
        the plain Glorot init.
        """
        for lin in (self.proj_in, self.proj_out):
            nn.init.xavier_normal_(lin.weight, gain=beta)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def _ff(self, x: Tensor) -> Tensor:
        return self.proj_out(self.dropout(self._hidden(self.proj_in(x))))

    def piece_rows(self, rows: int, dtype: torch.dtype = torch.float32) -> int:
        """Rows per piece for an input of ``rows`` rows: ``chunk_size``; else the rows whose hidden
        activations fill ``chunk_mib``, or ``ceil(rows / chunks)``, or with both the larger of the two."""
        if self.chunk_size is not None:
            return self.chunk_size
        piece = -(-rows // self.chunks)
        if self.chunk_mib is not None:
            width = self.proj_in.out_features * torch.empty((), dtype=dtype).element_size()
            budget = int(self.chunk_mib * 2**20) // width
            piece = max(piece, budget) if self.chunks > 1 else budget
        return max(1, piece)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != self.dim:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"feed-forward input must end in dim={self.dim}, got {got}")
        rows = x.numel() // self.dim
        step = self.piece_rows(rows, x.dtype)
        if step >= rows:
            return self._ff(x)
        pieces = x.reshape(rows, self.dim).split(step)
        # Under autograd every piece's hidden activations would stay saved for backward, so chunking alone
        # would not lower the training peak; recomputing each piece in backward keeps only one alive.
        if self.checkpoint_chunks and torch.is_grad_enabled() and (x.requires_grad or self._has_grad()):
            outs = [checkpoint(self._ff, p, use_reentrant=False) for p in pieces]
        else:
            outs = [self._ff(p) for p in pieces]
        return torch.cat(outs).view(x.shape)

    def _has_grad(self) -> bool:
        return any(p.requires_grad for p in self.parameters())


@FFS.register("mlp")
class MLP(_FeedForward):
    """``ff(x) = W_2 dropout(act(W_1 x + b_1)) + b_2`` with hidden width ``int(mult * dim)``.

    ``act`` by name (``gelu``, ``relu``, ``swish``, ... see :data:`ACTIVATIONS`). With ``chunk_size``,
    ``chunk_mib`` or ``chunks > 1`` the rows are processed in pieces (see the module docstring); the result
    equals the unchunked one.
    """

    @dataclass(kw_only=True)
    class Config:
        mult: float = 4.0  # hidden width / dim; 4 is the Transformer's ratio
        activation: str = "gelu"  # name in ACTIVATIONS; GELU is the GPT/BERT/Reformer default
        dropout: float = 0.0  # on the hidden activations, as in reformer-pytorch's FeedForward
        bias: bool = True  # biases on both projections (the original Transformer had them)
        chunks: int = 1  # at most this many pieces, as the Reformer's ff_chunks: memory / chunks
        checkpoint: bool = True  # pieces under autograd: recompute each in backward to keep the saving
        chunk_size: int | None = None  # rows (batch x positions) per piece, whatever the length
        chunk_mib: float | None = None  # pieces at least this many MiB of hidden activations (none smaller)

        def __post_init__(self) -> None:
            _check_sizes(self)

    def __init__(self, cfg: MLP.Config | None = None, *, dim: int):
        super().__init__(cfg, dim=dim, width=1)

    def _hidden(self, h: Tensor) -> Tensor:
        return self.act(h)


@FFS.register("glu")
class GLU(_FeedForward):
    """Gated linear unit feed-forward (Shazeer 2020, "GLU Variants Improve Transformer", arXiv:2002.05202).

    ``ff(x) = W_2 dropout(act(x W) * (x V))``, ``W`` and ``V`` of width ``int(mult * dim)`` held as one
    fused ``proj_in`` (``[W | V]``). ``act`` by name: ``swish`` gives SwiGLU, ``gelu`` GEGLU, ``sigmoid``
    the original GLU, ``identity`` the bilinear layer. Pieces as in :class:`MLP`. With equal ``mult``
    a GLU has 1.5x the MLP's parameters; ``mult = 8/3`` matches them.
    """

    @dataclass(kw_only=True)
    class Config:
        mult: float = 4.0  # width of the gate and of the value; reformer-pytorch's ff_glu used 4
        activation: str = "swish"  # the gate's activation: swish = SwiGLU (PaLM, Llama), gelu = GEGLU
        dropout: float = 0.0  # on the gated hidden activations
        bias: bool = True  # biases on both projections (Shazeer's variants drop them; set False for that)
        chunks: int = 1  # at most this many pieces, as the Reformer's ff_chunks: memory / chunks
        checkpoint: bool = True  # pieces under autograd: recompute each in backward to keep the saving
        chunk_size: int | None = None  # rows (batch x positions) per piece, whatever the length
        chunk_mib: float | None = None  # pieces at least this many MiB of hidden activations (none smaller)

        def __post_init__(self) -> None:
            _check_sizes(self)

    def __init__(self, cfg: GLU.Config | None = None, *, dim: int):
        super().__init__(cfg, dim=dim, width=2)

    def reset_parameters(self, beta: float = 1.0) -> None:
        """Xavier-normal, gain ``beta``, on ``W``, ``V`` (each with its own fans) and ``W_2``; zero biases."""
        with torch.no_grad():
            for part in self.proj_in.weight.split(self.hidden, dim=0):
                part.copy_(nn.init.xavier_normal_(torch.empty_like(part), gain=beta))
        nn.init.xavier_normal_(self.proj_out.weight, gain=beta)
        for lin in (self.proj_in, self.proj_out):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def _hidden(self, h: Tensor) -> Tensor:
        gate, value = h.chunk(2, dim=-1)
        return self.act(gate) * value
