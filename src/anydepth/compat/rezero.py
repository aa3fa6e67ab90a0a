"""The ``rezero`` package's transformer layers (``from rezero.transformer import RZTXEncoderLayer``),
built on the library's ReZero residual.

ReZero (Bachlechner et al. 2020, "ReZero is All You Need: Fast Convergence at Large Depth") drops
every LayerNorm and gates each residual branch with a learned scalar initialised to zero::

    encoder layer:  x = x + drop1(a * SelfAttn(x))
                    x = x + drop2(a * FF(x))            FF(x) = linear2(drop(act(linear1(x))))
    decoder layer:  x = x + a * drop1(SelfAttn(x))
                    x = x + a * drop2(CrossAttn(x, memory))
                    x = x + a * drop3(FF(x))

``a`` (``resweight``, shape ``[1]``) is one scalar per layer, shared by all its sublayers, so every
layer is the identity at init. Same parameter names as the original, so its state dicts load here.

Unlike the original these layers work inside today's ``nn.TransformerEncoder`` /
``nn.TransformerDecoder`` (they accept ``is_causal``, ``tgt_is_causal``, ``memory_is_causal``), take
``batch_first``, a callable activation, ``bias``, ``device`` and ``dtype``, and skip computing the
attention weights they never use. Leave the stack's ``norm`` argument as ``None``: ReZero has no norms.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anydepth.nn.residual import ReZero

__all__ = ["RZTXEncoderLayer", "RZTXDecoderLayer"]

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"relu": F.relu, "gelu": F.gelu}


def _activation(activation: Any, who: str) -> Callable[[Tensor], Tensor]:
    if isinstance(activation, str):
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"{who}: activation={activation!r} is not supported; use 'relu', 'gelu' or a callable "
                "such as torch.nn.functional.silu"
            )
        return _ACTIVATIONS[activation]
    if callable(activation):
        return activation
    raise TypeError(
        f"{who}: activation must be 'relu', 'gelu' or a callable, got {type(activation).__name__}"
    )


def _check_sizes(who: str, d_model: Any, nhead: Any, dim_feedforward: Any, dropout: Any) -> None:
    for name, v in (("d_model", d_model), ("nhead", nhead), ("dim_feedforward", dim_feedforward)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
            raise ValueError(f"{who}: {name} must be a positive int, got {v!r}")
    if d_model % nhead:
        raise ValueError(
            f"{who}: d_model={d_model} is not divisible by nhead={nhead}; each head gets d_model // nhead "
            "features, so choose nhead dividing d_model"
        )
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{who}: dropout must lie in [0, 1), got {dropout!r}")


def _check_input(who: str, name: str, x: Any, d_model: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{who}: {name} must be a Tensor, got {type(x).__name__}")
    if x.dim() not in (2, 3) or x.shape[-1] != d_model:
        raise ValueError(
            f"{who}: {name} must have shape (seq, batch, d_model), (batch, seq, d_model) with "
            f"batch_first=True, or (seq, d_model), with d_model={d_model}; got shape {tuple(x.shape)}"
        )


def _causal_mask(n_q: int, n_kv: int, device: torch.device) -> Tensor:
    # nn.MultiheadAttention's boolean convention: True = may NOT attend.
    return torch.ones(n_q, n_kv, dtype=torch.bool, device=device).triu(1)


class _RZTXLayer(nn.Module):
    def _attend(
        self, attn: nn.MultiheadAttention, x: Tensor, kv: Tensor, mask, key_padding_mask, is_causal: bool
    ) -> Tensor:
        if is_causal and mask is None:
            # torch's own layers raise here ("Need attn_mask if specifying the is_causal hint");
            # the hint says what the mask is, so it can be built.
            seq = 1 if (self.batch_first and x.dim() == 3) else 0
            mask = _causal_mask(x.shape[seq], kv.shape[seq], x.device)
        return attn(
            x,
            kv,
            kv,
            attn_mask=mask,
            key_padding_mask=key_padding_mask,
            need_weights=False,
            is_causal=is_causal,
        )[0]

    def _ff(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def no_weight_decay(self) -> list[nn.Parameter]:
        """``resweight``: weight decay would pull it back to 0, the identity (rezero issue #14)."""
        return [self.resweight]

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, nhead={self.nhead}, batch_first={self.batch_first}"


class RZTXEncoderLayer(_RZTXLayer):
    """ReZero transformer encoder layer: self-attention and feed-forward, no norms, one shared gate.

    ``x = x + drop1(a * SelfAttn(x)); x = x + drop2(a * linear2(drop(act(linear1(x)))))`` with
    ``a = resweight = 0`` at init (Bachlechner et al. 2020). Drop-in for ``nn.TransformerEncoderLayer``
    inside ``nn.TransformerEncoder(layer, num_layers)`` (keep ``norm=None``).

    Args:
        d_model: features of the input; must be divisible by ``nhead``.
        nhead: attention heads.
        dim_feedforward: hidden width of the feed-forward network.
        dropout: dropout on attention weights, the feed-forward hidden layer and each gated branch.
        activation: ``'relu'``, ``'gelu'`` or a callable.
        batch_first: inputs are ``(batch, seq, d_model)`` instead of ``(seq, batch, d_model)``.
        bias: biases in the projections.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str | Callable[[Tensor], Tensor] = "relu",
        *,
        batch_first: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        _check_sizes("RZTXEncoderLayer", d_model, nhead, dim_feedforward, dropout)
        fk = {"device": device, "dtype": dtype}
        self.d_model, self.nhead, self.batch_first = d_model, nhead, batch_first
        self.self_attn = nn.MultiheadAttention(
            d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first, **fk
        )
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **fk)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **fk)
        self.activation = _activation(activation, "RZTXEncoderLayer")
        self.resweight = nn.Parameter(torch.zeros(1, **fk))
        # Both sublayers read the layer's own resweight; dropout follows the gate, as in the original.
        self.res_attn = ReZero(ReZero.Config(dropout=dropout), shared_with=self, shared_name="resweight")
        self.res_ff = ReZero(ReZero.Config(dropout=dropout), shared_with=self, shared_name="resweight")

    def reset_parameters(self) -> None:
        """Zeroes the gate (the projections keep torch's own init)."""
        with torch.no_grad():
            self.resweight.zero_()

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        """Same arguments as ``nn.TransformerEncoderLayer.forward``; ``is_causal=True`` without a mask
        builds the causal mask."""
        _check_input("RZTXEncoderLayer", "src", src, self.d_model)
        x = self.res_attn(src, self._sa_block, src_mask, src_key_padding_mask, is_causal)
        return self.res_ff(x, self._ff)

    def _sa_block(self, x: Tensor, mask, key_padding_mask, is_causal: bool) -> Tensor:
        return self._attend(self.self_attn, x, x, mask, key_padding_mask, is_causal)


class RZTXDecoderLayer(_RZTXLayer):
    """ReZero transformer decoder layer: self-attention, cross-attention and feed-forward, no norms.

    ``x = x + a * drop1(SelfAttn(x)); x = x + a * drop2(CrossAttn(x, memory));
    x = x + a * drop3(linear2(drop(act(linear1(x)))))`` with one ``a = resweight = 0`` at init
    (Bachlechner et al. 2020). Drop-in for ``nn.TransformerDecoderLayer`` inside
    ``nn.TransformerDecoder(layer, num_layers)`` (keep ``norm=None``). Arguments as
    :class:`RZTXEncoderLayer`.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str | Callable[[Tensor], Tensor] = "relu",
        *,
        batch_first: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        _check_sizes("RZTXDecoderLayer", d_model, nhead, dim_feedforward, dropout)
        fk = {"device": device, "dtype": dtype}
        self.d_model, self.nhead, self.batch_first = d_model, nhead, batch_first
        self.self_attn = nn.MultiheadAttention(
            d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first, **fk
        )
        self.multihead_attn = nn.MultiheadAttention(
            d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first, **fk
        )
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **fk)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **fk)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = _activation(activation, "RZTXDecoderLayer")
        self.resweight = nn.Parameter(torch.zeros(1, **fk))
        # The decoder drops the branch before gating it, so the dropouts live in the branches.
        self.res_self = ReZero(shared_with=self, shared_name="resweight")
        self.res_cross = ReZero(shared_with=self, shared_name="resweight")
        self.res_ff = ReZero(shared_with=self, shared_name="resweight")

    def reset_parameters(self) -> None:
        """Zeroes the gate (the projections keep torch's own init)."""
        with torch.no_grad():
            self.resweight.zero_()

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
    ) -> Tensor:
        """Same arguments as ``nn.TransformerDecoderLayer.forward``; a causal hint without its mask
        builds the causal mask."""
        _check_input("RZTXDecoderLayer", "tgt", tgt, self.d_model)
        _check_input("RZTXDecoderLayer", "memory", memory, self.d_model)
        x = self.res_self(tgt, self._self_block, tgt_mask, tgt_key_padding_mask, tgt_is_causal)
        x = self.res_cross(
            x, self._cross_block, memory, memory_mask, memory_key_padding_mask, memory_is_causal
        )
        return self.res_ff(x, self._ff_block)

    def _self_block(self, x: Tensor, mask, key_padding_mask, is_causal: bool) -> Tensor:
        return self.dropout1(self._attend(self.self_attn, x, x, mask, key_padding_mask, is_causal))

    def _cross_block(self, x: Tensor, memory: Tensor, mask, key_padding_mask, is_causal: bool) -> Tensor:
        return self.dropout2(self._attend(self.multihead_attn, x, memory, mask, key_padding_mask, is_causal))

    def _ff_block(self, x: Tensor) -> Tensor:
        return self.dropout3(self._ff(x))
