"""Multi-head attention: full (``torch.nn.functional.scaled_dot_product_attention``) and local windows.

Both kinds share :class:`Attention`, which owns the projections, the persistent memory key/values, the
rotary phases, mask checking and the key/value cache; a kind only decides which keys a query may see.
Built from the kind's ``Config`` plus ``dim``, ``heads``, ``dim_head``, ``causal``, ``cross`` and ``ctx``:
``ATTENTIONS.build(cfg, dim=, heads=, dim_head=, causal=, ctx=, cross=False)``, or by hand
``FullAttention(FullAttention.Config(num_mem_kv=4), dim=512, heads=8)`` or
``FullAttention.make(dim=512, heads=8, num_mem_kv=4)``; called as
``attn(x, *, mask=None, attn_mask=None, context=None, context_mask=None, rotary=None, cache=None)``.

Shapes (letters used in comments): ``b`` batch, ``h`` heads, ``n`` new query positions, ``k`` key positions
(cached prefix + new, or the context), ``m`` memory key/values, ``d`` ``dim_head``.

Masks, all with True = may attend:

- ``mask``: bool ``(b, k)`` key padding (True = real token). With a cache it may also cover only the new
  positions ``(b, n)``; the cache keeps the padding of the prefix. In cross-attention the keys are the
  context, masked by ``context_mask (b, m_ctx)``, and ``mask`` (the queries' padding, which does not change
  any real token's output) is not used.
- ``attn_mask``: bool ``(n, k)``, ``(b, n, k)`` or ``(b, h, n, k)``, True = may attend.
- ``causal``: query ``i`` (absolute position ``n_past + i``) sees keys ``j <= n_past + i``. Cross-attention
  is never causal.

``rotary`` ``(cos, sin)`` (from the rotary position kind, for the ``n`` new positions) turns the queries and
the new keys of self-attention; cross-attention ignores it, since its queries and the context do not share
positions. Memory key/values are always visible and never rotated.

A query whose keys are all masked gets zeros from every head (plain softmax would give NaN), so the layer
returns the output projection's bias there, and no gradient flows through that row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anydepth.nn.positional import apply_rotary
from anydepth.nn.registry import ATTENTIONS, NORMS, Configurable
from anydepth.validate import check_bool_mask

__all__ = ["Attention", "FullAttention", "LocalAttention", "QKNorm", "ValueResidual", "QK_NORM_KINDS"]

QK_NORM_KINDS = ("layer", "rms")


class QKNorm(nn.Module):
    """QK-norm: queries and keys normalised per head before the dot product (Dehghani et al. 2023,
    "Scaling Vision Transformers to 22 Billion Parameters"; Wortsman et al. 2023, arXiv 2309.14322)::

        q_h <- N_q(q_h),  k_h <- N_k(k_h)        over the dim_head features of each head

    with ``N`` a LayerNorm or RMSNorm of width ``dim_head`` whose gain is shared by the heads (as in
    ViT-22B, OLMo 2 per head, Gemma 3). The attention logits ``q.k / sqrt(d)`` are then bounded by the
    gains, which removes the attention-logit growth that makes large learning rates diverge. Applied
    before rotary phases, so cached keys are stored normalised.
    """

    def __init__(self, kind: str, dim_head: int):
        super().__init__()
        self.kind = check_qk_norm(kind)
        self.q_norm = NORMS.build(kind, dim=dim_head)
        self.k_norm = NORMS.build(kind, dim=dim_head)

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return self.q_norm(q), self.k_norm(k)


def check_qk_norm(kind: Any) -> str | None:
    if kind is None or kind in QK_NORM_KINDS:
        return kind
    raise ValueError(
        f"attention qk_norm={kind!r} is not supported; use 'layer' (LayerNorm, as in Dehghani et al. 2023), "
        "'rms' (RMSNorm) or None to leave queries and keys unnormalised"
    )


class ValueResidual(nn.Module):
    """Value residual learning (Zhou et al. 2024, "Value Residual Learning For Alleviating Attention
    Concentration In Transformers" (ResFormer), arXiv 2410.17897)::

        v_l <- lambda * v_1 + (1 - lambda) * v_l          every self-attention layer l > 1

    where ``v_1`` is the first layer's values (over the same keys, cached prefix included). ``lambda``
    is fixed (the paper's 0.5) or, with ``learned=True``, a trainable scalar per layer starting at
    ``lam``. The first layer of a stack publishes its values to the others through a holder shared by
    the stack (``LayerContext.stack``), so the layers must run in order in one forward: the rule table
    rejects the reversible stack and LayerDrop with it.
    """

    @dataclass(kw_only=True)
    class Config:
        lam: float = 0.5  # weight of the first layer's values; 0.5 in the paper
        learned: bool = False  # a trainable lambda per layer (starting at lam) instead of a fixed one

        def __post_init__(self) -> None:
            lam = self.lam
            if isinstance(lam, bool) or not isinstance(lam, int | float) or not 0.0 <= lam <= 1.0:
                raise ValueError(
                    f"value_residual lam={lam!r} is outside [0, 1]; v_l = lam * v_1 + (1 - lam) * v_l is a convex "
                    "mix of the first layer's values and this layer's, e.g. lam=0.5 (the paper)"
                )
            if not isinstance(self.learned, bool):
                raise ValueError(f"value_residual learned must be True or False, got {self.learned!r}")

    def __init__(self, cfg: ValueResidual.Config, holder: dict, first: bool):
        super().__init__()
        self.first, self.learned, self.init = first, cfg.learned, float(cfg.lam)
        object.__setattr__(self, "holder", holder)  # plain shared dict, not a submodule
        if not first and cfg.learned:
            self.lam = nn.Parameter(torch.full((), self.init))
        else:
            self.register_buffer("lam", torch.full((), self.init), persistent=False)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.lam.fill_(self.init)

    def forward(self, v: Tensor) -> Tensor:
        if self.first:
            self.holder["v"] = v
            return v
        v1 = self.holder.get("v")
        if v1 is None or v1.shape != v.shape:
            got = None if v1 is None else tuple(v1.shape)
            raise RuntimeError(
                f"value residual: the first layer's values {got} do not match this layer's {tuple(v.shape)}; "
                "the layers of a stack with value_residual must run in order in one forward"
            )
        return torch.lerp(v, v1, self.lam.to(v.dtype))

    def extra_repr(self) -> str:
        return f"first={self.first}, lam={self.init}, learned={self.learned}"


def resolve_value_residual(value: Any) -> ValueResidual.Config | None:
    """``None``/``False`` (off), ``True`` (defaults), a ``ValueResidual.Config`` or its dict -> config or None."""
    if value is None or value is False:
        return None
    if value is True:
        return ValueResidual.Config()
    if isinstance(value, ValueResidual.Config):
        return value
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"lam", "learned"})
        if unknown:
            raise ValueError(f"value_residual has no option(s) {', '.join(unknown)}; its options are lam, learned")
        return ValueResidual.Config(**value)
    raise ValueError(
        f"attention value_residual={value!r} is not supported; use None (off), True (lambda 0.5, fixed) or "
        "ValueResidual.Config(lam=..., learned=...)"
    )


class Attention(Configurable, nn.Module):
    """Projections, memory key/values, masks and cache shared by the attention kinds.

    ``q = x W_q``, ``k = x W_k``, ``v = x W_v`` (``context`` instead of ``x`` for keys and values in
    cross-attention), split into ``heads`` heads of width ``dim_head``; rotary phases turn ``q`` and ``k``;
    learned memory ``(M_k, M_v)`` is prepended to the keys and values; each head computes
    ``softmax(q k^T / sqrt(d) + mask) v`` over the keys its kind allows, and
    ``out = dropout(concat_heads(...) W_o)``.

    Self-attention holds one fused ``to_qkv`` projection (one matmul instead of three); cross-attention
    holds ``to_q`` and a fused ``to_kv``. ``one_value_head`` gives ``W_v`` a single head shared by all
    query heads (multi-query values, as reformer-pytorch's ``one_value_head``), which also shrinks the
    value cache to ``(b, 1, k, d)``.
    """

    def __init__(
        self,
        cfg: FullAttention.Config | None = None,
        *,
        dim: int,
        heads: int,
        dim_head: int | None = None,
        causal: bool = False,
        cross: bool = False,
        ctx: Any = None,
    ):
        """``cfg`` holds the options; ``dim``, ``heads``, ``dim_head`` (default ``dim // heads``), ``causal``,
        ``cross`` and ``ctx`` (the :class:`~anydepth.nn.context.LayerContext`, which ``value_residual``
        needs) are decided by the model."""
        super().__init__()
        cfg = self.config_of(cfg)
        num_mem_kv, one_value_head, dropout = cfg.num_mem_kv, cfg.one_value_head, cfg.dropout
        post_dropout, qk_norm = cfg.post_dropout, cfg.qk_norm
        _check_int("dim", dim, 1)
        _check_int("heads", heads, 1)
        if dim_head is None:
            if dim % heads:
                raise ValueError(
                    f"dim={dim} is not divisible by heads={heads}; choose heads dividing dim or pass dim_head"
                )
            dim_head = dim // heads
        _check_int("dim_head", dim_head, 1)
        _check_int("num_mem_kv", num_mem_kv, 0)
        for name, p in (("dropout", dropout), ("post_dropout", post_dropout)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"attention {name} must be in [0, 1), got {p!r}")
        self.dim, self.heads, self.dim_head = dim, heads, dim_head
        self.cross, self.causal = bool(cross), bool(causal) and not cross
        self.value_heads = 1 if one_value_head else heads
        self.num_mem_kv, self.dropout = num_mem_kv, dropout
        inner, v_inner = heads * dim_head, self.value_heads * dim_head
        if cross:
            self.to_q = nn.Linear(dim, inner, bias=cfg.qkv_bias)
            self.to_kv = nn.Linear(dim, inner + v_inner, bias=cfg.qkv_bias)
        else:
            self.to_qkv = nn.Linear(dim, 2 * inner + v_inner, bias=cfg.qkv_bias)
        self.to_out = nn.Linear(inner, dim, bias=cfg.out_bias)
        self.post_dropout = nn.Dropout(post_dropout)
        self.qk_norm = QKNorm(qk_norm, dim_head) if check_qk_norm(qk_norm) else None
        self.value_residual = _value_residual(cfg, ctx, cross)
        if num_mem_kv:
            self.mem_k = nn.Parameter(torch.empty(heads, num_mem_kv, dim_head))
            self.mem_v = nn.Parameter(torch.empty(self.value_heads, num_mem_kv, dim_head))
        self.reset_parameters()

    # ----------------------------------------------------------------------------------------- init

    def reset_parameters(self, beta: float = 1.0) -> None:
        """Xavier-normal init: gain 1 on ``W_q``, ``W_k``; gain ``beta`` on ``W_v``, ``W_o``; zero biases.

        This is DeepNet's rule (Wang et al. 2022, arXiv:2203.00555): only the value and output
        projections, which carry the branch's output scale, are shrunk by ``beta``; the query/key
        projections only shape the attention pattern. Each part of a fused projection gets Xavier's std
        for its own fan (``gain * sqrt(2 / (fan_in + fan_out))``). Memory keys are ``N(0, 1)`` (the scale
        of a projected unit-variance token); memory values ``N(0, beta^2)`` like the value projection.
        """
        inner, v_inner = self.heads * self.dim_head, self.value_heads * self.dim_head
        with torch.no_grad():
            if self.cross:
                _xavier_(self.to_q.weight, 1.0)
                wk, wv = self.to_kv.weight.split([inner, v_inner])
                biases = [self.to_q.bias, self.to_kv.bias]
            else:
                _, wk, wv = self.to_qkv.weight.split([inner, inner, v_inner])
                _xavier_(self.to_qkv.weight[:inner], 1.0)
                biases = [self.to_qkv.bias]
            _xavier_(wk, 1.0)
            _xavier_(wv, beta)
            _xavier_(self.to_out.weight, beta)
            for bias in [*biases, self.to_out.bias]:
                if bias is not None:
                    bias.zero_()
            if self.num_mem_kv:
                self.mem_k.normal_(0.0, 1.0)
                self.mem_v.normal_(0.0, abs(beta))
        for m in (self.qk_norm, self.value_residual):
            if m is not None:
                for sub in m.modules():
                    if sub is not m and hasattr(sub, "reset_parameters"):
                        sub.reset_parameters()
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()

    # -------------------------------------------------------------------------------------- forward

    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        rotary: tuple[Tensor, Tensor] | None = None,
        cache: dict[str, Any] | None = None,
    ) -> Tensor:
        """``(b, n, dim) -> (b, n, dim)``; see the module docstring for the arguments.

        With ``cache`` (a dict, empty on the first call) the layer appends this call's keys/values (and
        key padding) to ``cache["k"]``, ``cache["v"]`` (``(b, h, n_past, d)``), ``cache["mask"]`` and
        attends over the whole cached prefix, so decoding one token at a time equals the uncached forward
        on the full sequence. Cross-attention projects the context on the first call and reuses it.
        """
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"attention input x must be (batch, seq, dim={self.dim}), got {got}")
        if cache is not None and not isinstance(cache, dict):
            raise TypeError(f"cache must be a dict (one per layer, start with {{}}), got {type(cache).__name__}")
        b, n, _ = x.shape
        if self.cross:
            q, k, v, key_mask = self._project_cross(x, mask, context, context_mask, cache)
            offset = 0
        else:
            if context is not None or context_mask is not None:
                raise ValueError(
                    "context/context_mask were given to a self-attention layer; build the layer with "
                    "cross=True for cross-attention"
                )
            q, k, v, key_mask, offset = self._project_self(x, mask, rotary, cache)
            if self.value_residual is not None:
                v = self.value_residual(v)
        attn_mask = self._check_attn_mask(attn_mask, b, n, k.shape[-2])
        out = self._attend(q, k, v, key_mask, attn_mask, offset)  # (b, h, n, d)
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head)
        return self.post_dropout(self.to_out(out))

    def _attend(self, q, k, v, key_mask, attn_mask, offset) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _heads(self, t: Tensor, heads: int) -> Tensor:
        b, n, _ = t.shape
        return t.view(b, n, heads, self.dim_head).transpose(1, 2)  # (b, heads, n, d)

    def _project_self(self, x, mask, rotary, cache):
        b, n, _ = x.shape
        inner, v_inner = self.heads * self.dim_head, self.value_heads * self.dim_head
        q, k, v = self.to_qkv(x).split([inner, inner, v_inner], dim=-1)
        q, k, v = self._heads(q, self.heads), self._heads(k, self.heads), self._heads(v, self.value_heads)
        if self.qk_norm is not None:
            q, k = self.qk_norm(q, k)
        if rotary is not None:
            cos, sin, interleaved = _check_rotary(rotary, n, self.dim_head)
            # keys are rotated before they are cached, so a cached prefix keeps its own positions
            q = apply_rotary(q, cos, sin, interleaved)
            k = apply_rotary(k, cos, sin, interleaved)
        n_past = 0
        past_mask = None
        if cache is not None and "k" in cache:
            pk, pv = cache["k"], cache["v"]
            if pk.shape[0] != b or pk.shape[1] != self.heads or pk.shape[-1] != self.dim_head:
                raise ValueError(
                    f"cache['k'] has shape {tuple(pk.shape)}, which does not fit batch {b}, {self.heads} "
                    f"heads of width {self.dim_head}; use a fresh cache ({{}}) per layer and per batch"
                )
            n_past = pk.shape[2]
            k, v = torch.cat((pk, k), dim=2), torch.cat((pv, v), dim=2)
            past_mask = cache.get("mask")
        key_mask = None
        if mask is not None:
            _check_bool_mask("mask", mask, (b, n_past + n), extra=(b, n) if n_past else None)
            if mask.shape[-1] == n_past + n:
                key_mask = mask
            else:
                head = past_mask if past_mask is not None else mask.new_ones(b, n_past)
                key_mask = torch.cat((head, mask), dim=-1)
        elif past_mask is not None:
            key_mask = torch.cat((past_mask, past_mask.new_ones(b, n)), dim=-1)
        if cache is not None:
            cache["k"], cache["v"] = k, v
            if key_mask is not None:
                cache["mask"] = key_mask
        return q, k, v, key_mask, n_past

    def _project_cross(self, x, mask, context, context_mask, cache):
        b, n, _ = x.shape
        check_bool_mask("mask", mask, None, "True = real query")
        if mask is not None and mask.shape[0] != b:
            got = f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a bool (batch={b}, seq) padding mask, got {got}")
        inner, v_inner = self.heads * self.dim_head, self.value_heads * self.dim_head
        q = self._heads(self.to_q(x), self.heads)
        if self.qk_norm is not None:
            q = self.qk_norm.q_norm(q)
        if cache is not None and "k" in cache:
            # the context is fixed while decoding: its keys and values were projected on the first call
            return q, cache["k"], cache["v"], cache.get("mask")
        if not isinstance(context, Tensor) or context.dim() != 3 or context.shape[-1] != self.dim:
            got = tuple(context.shape) if isinstance(context, Tensor) else type(context).__name__
            raise ValueError(f"cross-attention needs context of shape (batch, m, dim={self.dim}), got {got}")
        if context.shape[0] != b:
            raise ValueError(f"context batch {context.shape[0]} differs from the input's batch {b}")
        k, v = self.to_kv(context).split([inner, v_inner], dim=-1)
        k, v = self._heads(k, self.heads), self._heads(v, self.value_heads)
        if self.qk_norm is not None:
            k = self.qk_norm.k_norm(k)
        if context_mask is not None:
            _check_bool_mask("context_mask", context_mask, (b, context.shape[1]))
        if cache is not None:
            cache["k"], cache["v"] = k, v
            if context_mask is not None:
                cache["mask"] = context_mask
        return q, k, v, context_mask

    def _check_attn_mask(self, attn_mask, b: int, n: int, nk: int) -> Tensor | None:
        """``attn_mask`` as a 4-D ``(b|1, h|1, n, k)`` tensor, or a ValueError saying what was expected."""
        if attn_mask is None:
            return None
        expected = f"(n, k)=({n}, {nk}), (b, n, k)=({b}, {n}, {nk}) or (b, heads, n, k)=({b}, {self.heads}, {n}, {nk})"
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"attn_mask must be a bool tensor of shape {expected}, got {type(attn_mask).__name__}")
        check_bool_mask("attn_mask", attn_mask, None, "True = may attend")
        shape = tuple(attn_mask.shape)
        ok = (
            (len(shape) == 2 and shape == (n, nk))
            or (len(shape) == 3 and shape[0] in (1, b) and shape[1:] == (n, nk))
            or (len(shape) == 4 and shape[0] in (1, b) and shape[1] in (1, self.heads) and shape[2:] == (n, nk))
        )
        if not ok:
            raise ValueError(f"attn_mask must have shape {expected}, got {shape}")
        while attn_mask.dim() < 4:
            attn_mask = attn_mask.unsqueeze(-3 if attn_mask.dim() == 3 else 0)
        return attn_mask

    # ----------------------------------------------------------------------------------- attention

    def _memory(self, b: int, extra: tuple[int, ...] = ()) -> tuple[Tensor, Tensor]:
        """Memory keys ``(b, h, *extra, m, d)`` and values ``(b, hv, *extra, m, d)``."""
        mk, mv = self.mem_k, self.mem_v
        for _ in extra:
            mk, mv = mk.unsqueeze(-3), mv.unsqueeze(-3)
        return (
            mk.expand(b, self.heads, *extra, *self.mem_k.shape[-2:]),
            mv.expand(b, self.value_heads, *extra, *self.mem_v.shape[-2:]),
        )

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, guard: bool):
        """``softmax(q k^T / sqrt(d) + mask) v`` with memory prepended; fully masked rows give zeros.

        ``allowed`` (bool, True = may attend) broadcasts to ``(..., n, k)`` and does not cover the memory
        columns, which are always visible. ``guard``: some row may be fully masked.
        """
        if self.num_mem_kv:
            mk, mv = self._memory(q.shape[0], tuple(q.shape[2:-2]))
            k, v = torch.cat((mk.to(k.dtype), k), dim=-2), torch.cat((mv.to(v.dtype), v), dim=-2)
            m = self.num_mem_kv
            if allowed is not None:
                allowed = F.pad(allowed, (m, 0), value=True)
            guard = False  # memory keys are visible to every query
        if v.shape[1] != q.shape[1]:
            v = v.expand(-1, q.shape[1], *v.shape[2:])
        attn = allowed
        has_key = None
        if allowed is not None and guard:
            has_key = allowed.any(-1, keepdim=True)
            attn = allowed | ~has_key
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn, dropout_p=p)
        return out if has_key is None else out.masked_fill(~has_key, 0.0)

    def _dense(self, q, k, v, key_mask, attn_mask, offset: int, window: int | None) -> Tensor:
        """Attention over all given keys: the causal/window band plus the user's masks."""
        n, nk = q.shape[-2], k.shape[-2]
        guard = key_mask is not None or attn_mask is not None
        if self.causal and window is None and not guard and not self.num_mem_kv and offset == 0 and n == nk:
            # the common training case: SDPA's own causal path needs no mask tensor at all
            p = self.dropout if self.training else 0.0
            if v.shape[1] != q.shape[1]:
                v = v.expand(-1, q.shape[1], -1, -1)
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        allowed = None
        if self.causal or window is not None:
            qpos = torch.arange(n, device=q.device)[:, None] + offset
            kpos = torch.arange(nk, device=q.device)[None, :]
            rel = qpos - kpos  # how far key j lies behind query i
            if self.causal:
                allowed = (rel >= 0) if window is None else (rel >= 0) & (rel < window)
            else:
                allowed = rel.abs() < window
        if key_mask is not None:
            km = key_mask[:, None, None, :]
            allowed = km if allowed is None else allowed & km
        if attn_mask is not None:
            allowed = attn_mask if allowed is None else allowed & attn_mask
        return self._sdpa(q, k, v, allowed, guard)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.heads}, dim_head={self.dim_head}, causal={self.causal}, "
            f"cross={self.cross}, num_mem_kv={self.num_mem_kv}, value_heads={self.value_heads}"
            + (f", qk_norm={self.qk_norm.kind!r}" if self.qk_norm is not None else "")
        )


@ATTENTIONS.register("full")
class FullAttention(Attention):
    """Full multi-head attention (Vaswani et al. 2017, arXiv:1706.03762) on PyTorch's fused SDPA kernels.

    ``out_i = sum_j softmax_j(q_i . k_j / sqrt(d) + mask_ij) v_j`` over every key (memory, cached prefix,
    new tokens or context) the masks allow: O(n k) time and memory. Self- or cross-attention; see the
    module docstring for masks, memory key/values (Sukhbaatar et al. 2019, arXiv:1907.01470), rotary and
    the cache.
    """

    @dataclass(kw_only=True)
    class Config:
        num_mem_kv: int = 0  # learned key/values every query sees (all-attention, arXiv:1907.01470)
        one_value_head: bool = False  # one value head shared by all heads: smaller layer and value cache
        dropout: float = 0.0  # on the attention probabilities
        post_dropout: float = 0.0  # on the layer output (reformer-pytorch's post_attn_dropout)
        qkv_bias: bool = False  # biases on q/k/v; most LMs drop them, nn.MultiheadAttention keeps them
        out_bias: bool = True  # bias of the output projection
        qk_norm: str | None = None  # "layer" or "rms": normalise q and k per head (QKNorm); None: off
        value_residual: Any = None  # True or ValueResidual.Config: v_l = lam v_1 + (1 - lam) v_l (ResFormer)

        def __post_init__(self) -> None:
            check_qk_norm(self.qk_norm)
            self.value_residual = resolve_value_residual(self.value_residual)

    def _attend(self, q, k, v, key_mask, attn_mask, offset) -> Tensor:
        return self._dense(q, k, v, key_mask, attn_mask, offset, window=None)


@ATTENTIONS.register("local")
class LocalAttention(Attention):
    """Sliding-window self-attention (Longformer, Beltagy et al. 2020, arXiv:2004.05150; Mistral's window).

    Query ``i`` sees key ``j`` when ``0 <= i - j < window`` (causal) or ``|i - j| < window`` (not causal),
    plus the memory key/values, within the user's masks: the same result as full attention with that band
    mask. Computed blockwise: queries in blocks of ``window`` attend to their own block and the previous
    one (and the next one when not causal), so time and memory are O(n * window), not O(n^2). With a
    cache, a new query reads only the last ``window - 1`` cached keys. Self-attention only.
    """

    @dataclass(kw_only=True)
    class Config(FullAttention.Config):
        window: int = 128  # keys each query sees on each side (itself included); cost is linear in it

        def __post_init__(self) -> None:
            super().__post_init__()
            _check_int("window", self.window, 1)

    def __init__(self, cfg: LocalAttention.Config | None = None, *, cross: bool = False, **context):
        if cross:
            raise ValueError(
                "local attention is self-attention only (a window over the context has no meaning); "
                "use attention kind 'full' for cross-attention"
            )
        super().__init__(cfg, **context)
        self.window = self.config_of(cfg).window

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window={self.window}"

    def _attend(self, q, k, v, key_mask, attn_mask, offset) -> Tensor:
        n, nk = q.shape[-2], k.shape[-2]
        if offset or n != nk:
            # incremental decoding: only the last window - 1 cached keys can be seen by the new queries
            keep = min(nk, self.window - 1 + n)
            k, v = k[..., nk - keep :, :], v[..., nk - keep :, :]
            key_mask = None if key_mask is None else key_mask[:, nk - keep :]
            attn_mask = None if attn_mask is None else attn_mask[..., nk - keep :]
            return self._dense(q, k, v, key_mask, attn_mask, offset - (nk - keep), window=self.window)
        return self._blockwise(q, k, v, key_mask, attn_mask)

    def _blockwise(self, q, k, v, key_mask, attn_mask) -> Tensor:
        b, h, n, d = q.shape
        B = self.window
        nb = math.ceil(n / B)
        N = nb * B
        pad = N - n

        def blocks(t: Tensor) -> Tensor:  # (..., n, d) -> (..., nb, B, d), zero-padded at the end
            return F.pad(t, (0, 0, 0, pad)).unflatten(-2, (nb, B))

        look = 2 if self.causal else 3
        qb = blocks(q)  # (b, h, nb, B, d)
        kw, vw = _look_around(blocks(k), look), _look_around(blocks(v), look)  # (b, h|hv, nb, look*B, d)
        valid = torch.ones(b, n, dtype=torch.bool, device=q.device) if key_mask is None else key_mask
        valid = F.pad(valid, (0, pad), value=False).view(b, nb, B, 1)
        valid = _look_around(valid, look).squeeze(-1)  # (b, nb, look*B); False outside the sequence
        qpos = torch.arange(N, device=q.device).view(nb, B)
        kpos = qpos[:, :1] + torch.arange(-B, (look - 1) * B, device=q.device)  # (nb, look*B)
        rel = qpos[:, :, None] - kpos[:, None, :]  # (nb, B, look*B)
        band = (rel >= 0) & (rel < B) if self.causal else rel.abs() < B
        allowed = band & valid[:, None, :, None, :]  # (b, 1, nb, B, look*B)
        if attn_mask is not None:
            iq = qpos.clamp(max=n - 1)[:, :, None]
            ik = kpos.clamp(0, n - 1)[:, None, :]
            allowed = allowed & attn_mask[:, :, iq, ik]  # (b|1, h|1, nb, B, look*B): the band of the user's mask
        # padded queries of the last block can be fully masked, so the guard is always on here
        out = self._sdpa(qb, kw, vw, allowed, guard=True)  # (b, h, nb, B, d)
        return out.flatten(2, 3)[:, :, :n]


def _look_around(t: Tensor, look: int) -> Tensor:
    """``(..., nb, B, d) -> (..., nb, look * B, d)``: each block with the previous (and next) one."""
    zero = torch.zeros_like(t[..., :1, :, :])
    parts = [torch.cat((zero, t[..., :-1, :, :]), dim=-3), t]
    if look == 3:
        parts.append(torch.cat((t[..., 1:, :, :], zero), dim=-3))
    return torch.cat(parts, dim=-2)


def _value_residual(cfg, ctx, cross: bool) -> ValueResidual | None:
    vr = resolve_value_residual(cfg.value_residual)
    if vr is None or cross:
        return None  # cross-attention values come from the context, not from the residual
    if ctx is None:
        raise ValueError(
            "value_residual needs the layer's position (LayerContext with the stack's shared state); "
            "build the model with build_model, or pass ctx=LayerContext(layer=..., stack=shared_dict)"
        )
    holder = ctx.stack.setdefault("value_residual", {})
    return ValueResidual(vr, holder, first=ctx.layer == 0)


def _xavier_(w: Tensor, gain: float) -> None:
    # by hand, because nn.init.xavier_normal_ would read the fans of the whole fused weight
    fan_out, fan_in = w.shape
    w.normal_(0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)))


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"attention {name} must be an int >= {minimum}, got {value!r}")


def _check_bool_mask(name: str, mask: Any, shape: tuple[int, int], extra: tuple[int, int] | None = None) -> None:
    want = f"{shape}" + (f" or {extra} (the new positions only)" if extra else "")
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a bool tensor of shape {want}, got {type(mask).__name__}")
    check_bool_mask(name, mask, None, "True = real token")
    if tuple(mask.shape) != shape and (extra is None or tuple(mask.shape) != extra):
        raise ValueError(f"{name} must have shape {want} (batch, keys), got {tuple(mask.shape)}")


def _check_rotary(rotary: Any, n: int, dim_head: int) -> tuple[Tensor, Tensor, bool]:
    if not isinstance(rotary, tuple | list) or len(rotary) != 2:
        raise TypeError(
            f"rotary must be a (cos, sin) pair from the rotary position module, got {type(rotary).__name__}"
        )
    cos, sin = rotary
    if not isinstance(cos, Tensor) or not isinstance(sin, Tensor):
        raise TypeError("rotary must be a (cos, sin) pair of tensors")
    if cos.dim() != 2 or cos.shape != sin.shape or cos.shape[0] != n:
        raise ValueError(
            f"rotary (cos, sin) must each be (n, rot_dim) for the n={n} query positions, got "
            f"{tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    if cos.shape[1] % 2 or cos.shape[1] > dim_head:
        raise ValueError(f"rotary width {cos.shape[1]} must be even and at most dim_head={dim_head}")
    return cos, sin, bool(getattr(rotary, "interleaved", False))
