"""LSH attention (Reformer; Kitaev, Kaiser and Levskaya, ICLR 2020, arXiv 2001.04451).

Shared-QK attention restricted to tokens that hash alike. For each of ``n_hashes`` rounds ``r``:

1. hash (angular LSH, Andoni et al. 2015, arXiv 1509.02897): ``h_r(x) = argmax([x R_r ; -x R_r])`` with a
   random ``R_r`` of shape ``(d, n_buckets / 2)``; ``n_buckets = ceil(n / bucket_size)`` rounded up to even
   (above 512 buckets, a product of two such hashes over ``~sqrt(n_buckets)`` buckets each, which keeps
   hashing linear in ``n``; see ``LSHAttention.bucket_factors``);
2. sort the tokens by ``(bucket, position)`` and cut the sorted order into chunks of ``bucket_size``;
3. every query attends to the keys of its own chunk and of the chunk before it (the first chunk of a round
   looks back at the last chunk of the *same* round), with ``q = x`` and ``k = x / ||x||`` (shared QK), logits
   ``q . k / sqrt(d)``, causal masking by original positions, and its own key at ``-5e4`` so that a token
   attends to itself only when nothing else is allowed;
4. the rounds are merged by their log-sum-exp: ``out_i = sum_r softmax_r(lse_ir) o_ir``, i.e. one softmax
   over the union of the windows in which a key seen in ``k`` rounds counts ``k`` times; with
   ``allow_duplicate_attention=False`` each key counts once (``log N_ij`` is subtracted, ``N_ij`` = number of
   rounds whose window holds ``(i, j)``).

Differences from reformer-pytorch 1.4.4, each on purpose:

- any length works: the sequence is padded to the chunk multiple and padding (and masked tokens) are hashed
  into an extra bucket sorted after every real one, so they never take a real token's window slot;
- the look-back never crosses rounds, so duplicate counting is exact and a sequence of ``2 * bucket_size``
  tokens gives exactly full shared-QK attention for any ``n_hashes``;
- rotations are drawn from the global RNG only in training with ``seed=None``; in ``eval()`` (or always,
  with a ``seed``) they come from a seeded generator, so inference is deterministic;
- positions (rotary) reach every path: LSH heads, local heads and the full-attention fallback;
- the chunked attention is one autograd function that keeps nothing per window: the backward recomputes the
  window scores block by block (the flash-attention recipe), so memory is ``O(n)`` per round;
- cached decoding hashes only the new token and attends over its windows from cached keys, values and
  per-round sorted buckets (``LSHAttention.decode_newest``), where the original recomputes the whole prefix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anydepth.nn.positional import InterleavedRotaryTable, RotaryTable, apply_rotary
from anydepth.nn.registry import ATTENTIONS, Configurable
from anydepth.validate import check_bool_mask

__all__ = ["LSHAttention", "LSHSelfAttention", "TOKEN_SELF_ATTN_VALUE"]

# A token's logit for itself. Finite and far below any real logit, so self-attention wins only when every
# other key is masked; representable in float16 and bfloat16, and above the -inf used for masked keys.
TOKEN_SELF_ATTN_VALUE = -5e4

# Window scores kept alive at once by the chunked attention (elements); bounds the working memory.
_BLOCK_ELEMS = 1 << 21


def _apply_rotary(t: Tensor, rotary, interleaved: bool | None = None) -> Tensor:
    """Rotates the first ``n`` positions of ``t (..., L, d)`` by ``rotary = (cos, sin)``, each
    ``(n, rot_dim)``;
    later positions (memory key/values, context keys, padding) pass through. The pairing convention comes
    from the table (:class:`~anydepth.nn.positional.InterleavedRotaryTable`) unless given."""
    if (
        not isinstance(rotary, tuple | list)
        or len(rotary) != 2
        or not all(isinstance(r, Tensor) for r in rotary)
    ):
        raise TypeError(f"rotary must be a (cos, sin) pair of tensors, got {type(rotary).__name__}")
    cos, sin = rotary
    if interleaved is None:
        interleaved = bool(getattr(rotary, "interleaved", False))
    n = cos.shape[-2]
    if n > t.shape[-2]:
        raise ValueError(f"rotary tables cover {n} positions but the sequence has only {t.shape[-2]}")
    head = apply_rotary(t[..., :n, :], cos, sin, interleaved)
    return torch.cat((head, t[..., n:, :]), dim=-2) if n < t.shape[-2] else head


def _rotary_from_pos_emb(pos_emb: Tensor) -> InterleavedRotaryTable:
    """reformer-pytorch's ``pos_emb`` table ``(1, n, d) = cat(sin, cos)`` -> interleaved ``(cos, sin)``."""
    if not isinstance(pos_emb, Tensor):
        raise TypeError(f"pos_emb must be a (1, n, dim_head) tensor, got {type(pos_emb).__name__}")
    if pos_emb.dim() == 3:
        pos_emb = pos_emb[0]
    if pos_emb.dim() != 2 or pos_emb.shape[-1] % 2:
        raise ValueError(
            "pos_emb must be a (1, n, dim_head) sinusoid table cat(sin, cos), "
            f"got shape {tuple(pos_emb.shape)}"
        )
    sin, cos = pos_emb.chunk(2, dim=-1)
    return InterleavedRotaryTable(cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1))


# ---------------------------------------------------------------------------------------------------------
# chunked attention over a permuted sequence


@dataclass
class _Plan:
    """Everything the chunked attention needs besides q/k/v; shared by the forward and the backward.

    Rows are ``(group, round)`` pairs: ``order[row]`` lists the positions of group ``row // rounds`` in the
    order in which that round reads them (sorted by bucket for LSH, identity for local and full attention).
    That order is cut into chunks of ``chunk`` slots; a chunk's queries see its window: the previous chunk
    (``back``), itself, and the next chunk (``forward``).
    """

    order: Tensor  # (G * R, Lp) long: position read at each slot
    rounds: int  # R
    chunk: int  # slots per chunk
    back: bool  # window includes the previous chunk
    forward: bool  # window includes the next chunk
    wrap: bool  # the first chunk's previous chunk is the last one (LSH); otherwise it is empty
    valid: Tensor  # (G * Lp,) bool: real, unmasked token
    all_valid: bool  # no padding and no mask: ``valid`` is all True (known to the caller without a sync)
    causal: bool
    query_len: (
        int  # causal masking applies to keys before this position; later ones (memory, context) stay visible
    )
    scale: float
    buckets: Tensor | None = None  # (G * R, Lp) bucket per slot when attention must stay inside a bucket
    dup_chunks: Tensor | None = None  # (G * Lp, R) chunk of each position per round, for duplicate counting
    dup_buckets: Tensor | None = None  # (G * Lp, R) bucket of each position per round (same-bucket counting)
    attn_mask: Tensor | None = None  # (G // mask_div or 1, Lm, Lm) bool mask over positions (True = may attend)
    mask_div: int = 1  # groups per attention-mask entry (heads share their batch element's mask)
    dropout: float = 0.0
    dropout_seed: int = 0
    acc_dtype: torch.dtype = torch.float32  # softmax statistics' dtype (float64 inputs keep float64)

    def __post_init__(self) -> None:
        self._slot_of: Tensor | None = None

    @property
    def length(self) -> int:
        return self.order.shape[1]

    @property
    def n_chunks(self) -> int:
        return self.length // self.chunk

    @property
    def window(self) -> int:
        return self.chunk * (1 + int(self.back) + int(self.forward))

    @property
    def self_offset(self) -> int:
        """Window column of a query's own key: its slot in the current chunk."""
        return self.chunk if self.back else 0

    def spans(self):
        """Whole rows in groups, each with its blocks: ranges of the flattened (row, chunk) axis sized to
        bound the live window scores (a span is one row split into blocks, or several rows in one block)."""
        per_chunk = self.chunk * self.window * (self.rounds if self.dup_chunks is not None else 1)
        step = max(1, _BLOCK_ELEMS // per_chunk)  # chunks per block
        nc, n_rows = self.n_chunks, self.order.shape[0]
        if step >= nc:
            per = step // nc
            if per >= self.rounds:  # whole groups per span: rounds merge in one vectorised step
                per -= per % self.rounds
            for r0 in range(0, n_rows, per):
                r1 = min(n_rows, r0 + per)
                yield r0, r1, [(r0 * nc, r1 * nc)]
        else:
            for r in range(n_rows):
                yield r, r + 1, [(r * nc + c0, r * nc + min(nc, c0 + step)) for c0 in range(0, nc, step)]

    @property
    def slot_of(self) -> Tensor:
        """``(G * R, Lp)``: the slot at which each round reads each position (inverse of ``order``)."""
        if self._slot_of is None:
            inv = torch.empty_like(self.order)
            inv.scatter_(
                1, self.order, torch.arange(self.length, device=self.order.device).expand_as(self.order)
            )
            self._slot_of = inv
        return self._slot_of

    def blocks(self):
        """Ranges of the flattened (row, chunk) axis, sized to bound the live window scores."""
        per_chunk = self.chunk * self.window * (self.rounds if self.dup_chunks is not None else 1)
        step = max(1, _BLOCK_ELEMS // per_chunk)
        total = self.order.shape[0] * self.n_chunks
        for start in range(0, total, step):
            yield start, min(start + step, total)


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics run in float32 for half inputs and in the input precision otherwise."""
    return torch.promote_types(dtype, torch.float32)


@dataclass
class _Block:
    flat: Tensor  # (nb, chunk) flat index (group * Lp + position) of the queries
    kflat: Tensor  # (nb, window) flat index of the window's keys
    slot: Tensor  # (nb, chunk) index into the (row, position) layout, where this round's output goes
    disallowed: Tensor | None  # (nb, chunk, window) bool
    extra: Tensor | None  # (nb, chunk, window) additive float term


def _block(plan: _Plan, n0: int, n1: int, device) -> _Block:
    c, nc, lp = plan.chunk, plan.n_chunks, plan.length
    n = torch.arange(n0, n1, device=device)
    row = torch.div(n, nc, rounding_mode="floor")
    ci = n - row * nc
    group = torch.div(row, plan.rounds, rounding_mode="floor")
    chunk_pos = plan.order.view(-1, c)
    qp = chunk_pos[n0:n1]
    ids, win_ok = [], []
    if plan.back:
        ids.append(row * nc + torch.remainder(ci - 1, nc))
        win_ok.append(ci > 0)
    ids.append(n)
    win_ok.append(torch.ones_like(ci, dtype=torch.bool))
    if plan.forward:
        ids.append(row * nc + torch.remainder(ci + 1, nc))
        win_ok.append(ci < nc - 1)
    kp = torch.cat([chunk_pos.index_select(0, i) for i in ids], dim=1) if len(ids) > 1 else qp
    base = (group * lp)[:, None]
    flat, kflat = base + qp, base + kp
    disallowed = None

    def forbid(mask: Tensor) -> None:
        nonlocal disallowed
        disallowed = mask if disallowed is None else disallowed | mask

    if plan.causal:
        later = kp[:, None, :] > qp[:, :, None]
        if plan.query_len < lp:
            later &= (kp < plan.query_len)[:, None, :]
        forbid(later)
    if not plan.all_valid:
        forbid(~(_take(plan.valid, flat)[:, :, None] & _take(plan.valid, kflat)[:, None, :]))
    # some chunk of the block has no previous (next) chunk: n with n % nc == 0 (nc - 1) lies in [n0, n1)
    edge = (plan.back and -n0 % nc < n1 - n0) or (plan.forward and (nc - 1 - n0) % nc < n1 - n0)
    if not plan.wrap and len(ids) > 1 and edge:
        ok = torch.cat([w[:, None].expand(-1, c) for w in win_ok], dim=1)
        forbid(~ok[:, None, :])
    if plan.buckets is not None:
        cb = plan.buckets.view(-1, c)
        qb = cb[n0:n1]
        kb = torch.cat([cb.index_select(0, i) for i in ids], dim=1) if len(ids) > 1 else qb
        forbid(qb[:, :, None] != kb[:, None, :])
    extra = None
    if plan.attn_mask is not None:
        am = plan.attn_mask
        lm = am.shape[-1]
        inside = (qp < lm)[:, :, None] & (kp < lm)[:, None, :]
        ag = (
            torch.div(group, plan.mask_div, rounding_mode="floor")
            if am.shape[0] > 1
            else torch.zeros_like(group)
        )
        idx = (ag[:, None, None] * lm + qp.clamp(max=lm - 1)[:, :, None]) * lm + kp.clamp(max=lm - 1)[
            :, None, :
        ]
        forbid(~am.reshape(-1)[idx] & inside)
    if plan.dup_chunks is not None:
        cq = plan.dup_chunks[flat.reshape(-1)].view(n1 - n0, c, 1, -1)
        ck = plan.dup_chunks[kflat.reshape(-1)].view(n1 - n0, 1, kp.shape[1], -1)
        same = torch.remainder(cq - ck, nc) <= 1  # key's chunk is the query's or the one before it
        if plan.dup_buckets is not None:
            bq = plan.dup_buckets[flat.reshape(-1)].view(n1 - n0, c, 1, -1)
            bk = plan.dup_buckets[kflat.reshape(-1)].view(n1 - n0, 1, kp.shape[1], -1)
            same &= bq == bk
        # at least 1: every unmasked pair lies in the window of the round being computed
        log_n = torch.log(same.sum(-1).clamp(min=1).to(plan.acc_dtype))
        extra = -log_n if extra is None else extra - log_n
    slot = row[:, None] * lp + qp
    return _Block(flat=flat, kflat=kflat, slot=slot, disallowed=disallowed, extra=extra)


def _norm_eps(dtype: torch.dtype) -> float:
    """Floor of ``|qk|`` when normalising keys; 1e-12 underflows to 0 in float16 (zero padding -> NaN)."""
    return max(1e-12, torch.finfo(dtype).tiny)


def _take(x: Tensor, idx: Tensor) -> Tensor:
    """``x[idx]`` for a 2-D ``x`` through ``index_select`` (much faster on CPU than advanced indexing)."""
    out = x.index_select(0, idx.reshape(-1))
    return out.view(*idx.shape, *x.shape[1:])


def _scores(q: Tensor, kw: Tensor, blk: _Block, plan: _Plan) -> Tensor:
    """Masked window logits ``(nb, chunk, window)`` in the accumulation dtype."""
    s = torch.matmul(q, kw.transpose(-1, -2))
    s = s.to(_acc(q.dtype)) if s.dtype != _acc(q.dtype) else s
    s.mul_(plan.scale)
    if blk.extra is not None:
        s.add_(blk.extra.to(s.dtype))
    if blk.disallowed is not None:
        s.masked_fill_(blk.disallowed, float("-inf"))
    # a query's own key sits on the diagonal of the current-chunk columns: O(n) to set
    s[:, :, plan.self_offset : plan.self_offset + plan.chunk].diagonal(dim1=-2, dim2=-1).fill_(
        TOKEN_SELF_ATTN_VALUE
    )
    return s


_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _use_flash(plan: _Plan, qk: Tensor, v: Tensor) -> bool:
    """PyTorch's fused CPU flash-attention kernels run the windows unless dropout needs our own masks (or
    values and keys differ in width, which the kernel does not take)."""
    return (
        _FLASH is not None
        and _FLASH_BACKWARD is not None
        and v.device.type == "cpu"
        and plan.dropout == 0
        and qk.shape[-1] == v.shape[-1]
    )


def _float_mask(blk: _Block, q: Tensor, kw: Tensor, plan: _Plan) -> Tensor:
    """Additive mask ``(nb, 1, chunk, window)`` for the fused kernel: -inf where forbidden, the extra terms,
    and on each query's own key ``-5e4 - logit`` so that the kernel's ``logit + mask`` is the self value."""
    nb, c, _ = q.shape
    forbidden = blk.disallowed
    if forbidden is not None and forbidden.shape[1] != c:
        forbidden = forbidden.expand(nb, c, kw.shape[1])
    if forbidden is not None and blk.extra is None:
        neg_inf = torch.tensor(float("-inf"), dtype=q.dtype, device=q.device)
        mask = torch.where(forbidden, neg_inf, torch.zeros((), dtype=q.dtype, device=q.device))
    else:
        mask = torch.zeros(nb, c, kw.shape[1], dtype=q.dtype, device=q.device)
        if blk.extra is not None:
            mask += blk.extra.to(q.dtype)
        if blk.disallowed is not None:
            mask.masked_fill_(blk.disallowed, float("-inf"))
    off = plan.self_offset
    self_logit = torch.linalg.vector_norm(q, dim=-1, dtype=plan.acc_dtype) * plan.scale  # q . q/|q|
    mask[:, :, off : off + c].diagonal(dim1=-2, dim2=-1).copy_(TOKEN_SELF_ATTN_VALUE - self_logit)
    return mask[:, None]


def _dropout_seed(training: bool, rate: float) -> int:
    """Seed of this call's attention-dropout masks, drawn from the global RNG (so RNG replay replays it)."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item()) if training and rate > 0 else 0


def _dropout_keep(plan: _Plan, shape, block: int, device) -> Tensor:
    # Regenerated from (seed, block) in the backward, so no dropout mask is kept between the passes.
    gen = torch.Generator(device=device)
    gen.manual_seed(plan.dropout_seed + 7919 * block)
    return torch.rand(shape, generator=gen, device=device) >= plan.dropout


def _dense_attention(
    qk_flat: Tensor, khat: Tensor, plan: _Plan, top: Tensor, rem: Tensor, groups: int
) -> Tensor:
    """``(G, Lp, Lp)`` merged attention weights (before dropout), for inspection only: ``O(n^2)`` memory."""
    lp = plan.length
    dense = torch.zeros(groups * lp * lp, dtype=_acc(qk_flat.dtype), device=qk_flat.device)
    for n0, n1 in plan.blocks():
        blk = _block(plan, n0, n1, qk_flat.device)
        s = _scores(_take(qk_flat, blk.flat), _take(khat, blk.kflat), blk, plan)
        p = torch.exp((s - top[blk.flat][..., None]) - rem[blk.flat][..., None])
        kpos = blk.kflat - torch.div(blk.kflat, lp, rounding_mode="floor") * lp
        idx = blk.flat[:, :, None] * lp + kpos[:, None, :]
        live = p > 0
        if blk.disallowed is not None:
            live &= ~blk.disallowed  # wrapped-out window slots may repeat a position
        dense.index_put_((idx[live],), p[live], accumulate=True)
    return dense.view(groups, lp, lp)


class _ChunkedAttention(torch.autograd.Function):
    """Chunked shared-QK attention over permuted rows, merged across rounds; backward by recomputation.

    Forward per round ``r``: ``o_r = softmax(s_r) v`` and ``lse_r``; merged ``out = sum_r w_r o_r`` with
    ``w_r = exp(lse_r - logsumexp_r lse_r)``. The merged output is one softmax over every (round, key) entry
    with probabilities ``P = exp(s - L)``, ``L = logsumexp_r lse_r``, so the backward is the flash-attention
    one: ``dS = P (dout . v - dout . out)``. Per round that is the ordinary attention backward with
    ``grad_out = w_r dout`` and ``out`` the merged output, which lets CPU runs use PyTorch's fused
    flash-attention kernels on the windows. Only ``out``, ``L`` and the per-round ``lse`` (one number per
    query and round) are kept between the passes; rounds are merged online, so memory is ``O(n)``.
    """

    @staticmethod
    def forward(ctx, qk: Tensor, v: Tensor, plan: _Plan, want_attn: bool):
        groups, lp, dv = v.shape[0], plan.length, v.shape[-1]
        acc = _acc(v.dtype)
        qk_flat, v_flat = qk.reshape(-1, qk.shape[-1]), v.reshape(-1, dv)
        khat = F.normalize(qk_flat, dim=-1, eps=_norm_eps(qk.dtype))
        flash = _use_flash(plan, qk, v)
        c = plan.chunk
        lse_sorted = torch.empty(plan.order.numel(), dtype=acc, device=v.device)
        out_acc = torch.zeros(groups, lp, dv, dtype=acc, device=v.device)
        m_acc = torch.full((groups, lp), float("-inf"), dtype=acc, device=v.device)
        z_acc = torch.zeros(groups, lp, dtype=acc, device=v.device)
        bi = 0
        for r0, r1, blocks in plan.spans():
            o_span = torch.empty((r1 - r0) * lp, dv, dtype=acc, device=v.device)
            for n0, n1 in blocks:
                blk = _block(plan, n0, n1, v.device)
                q, kw, vw = _take(qk_flat, blk.flat), _take(khat, blk.kflat), _take(v_flat, blk.kflat)
                if flash:
                    mask = _float_mask(blk, q, kw, plan)
                    o, lse = _FLASH(
                        q[:, None], kw[:, None], vw[:, None], 0.0, False, attn_mask=mask, scale=plan.scale
                    )
                    o, lse = o[:, 0], lse[:, 0]
                else:
                    s = _scores(q, kw, blk, plan)
                    m = s.amax(dim=-1, keepdim=True)
                    e = s.sub_(m).exp_()
                    z = e.sum(dim=-1, keepdim=True)
                    if plan.dropout > 0:
                        e = e * _dropout_keep(plan, e.shape, bi, v.device) / (1.0 - plan.dropout)
                    o = torch.matmul(e.to(v.dtype), vw).to(acc) / z
                    lse = (m + torch.log(z))[..., 0]
                o_span[n0 * c - r0 * lp : n1 * c - r0 * lp] = o.reshape(-1, dv)
                lse_sorted[n0 * c : n1 * c] = lse.reshape(-1)
                bi += 1
            # unsort this span's rows and merge them into the running (max, sum, output) of their groups
            slots = plan.slot_of[r0:r1] + torch.arange(r1 - r0, device=v.device)[:, None] * lp
            o_u = o_span.index_select(0, slots.reshape(-1)).view(r1 - r0, lp, dv)
            lse_u = lse_sorted.index_select(0, (slots + r0 * lp).reshape(-1)).view(r1 - r0, lp)
            del o_span
            if r0 % plan.rounds == 0 and r1 % plan.rounds == 0:  # whole groups: merge all rounds at once
                grp = slice(r0 // plan.rounds, r1 // plan.rounds)
                lse_g = lse_u.view(-1, plan.rounds, lp)
                m_acc[grp] = lse_g.amax(1)
                w = torch.exp(lse_g - m_acc[grp][:, None])
                z_acc[grp] = w.sum(1)
                out_acc[grp] = (o_u.view(-1, plan.rounds, lp, dv) * w[..., None]).sum(1)
                continue
            for rows, grp in _rows_by_group(r0, r1, plan.rounds):
                m_old = m_acc[grp]
                m_new = torch.maximum(m_old, lse_u[rows])
                keep, w = torch.exp(m_old - m_new), torch.exp(lse_u[rows] - m_new)
                out_acc[grp].mul_(keep[..., None]).add_(w[..., None] * o_u[rows])
                z_acc[grp].mul_(keep).add_(w)
                m_acc[grp] = m_new
        # The merged normaliser is kept as max + log-remainder: rows that only see themselves sit at -5e4,
        # where float32 cannot hold log(n_hashes) next to it; the split keeps (s - max) exact there.
        top, rem = m_acc, torch.log(z_acc)
        out = (out_acc / z_acc[..., None]).to(v.dtype)
        del out_acc
        attn = torch.empty(0, device=v.device)
        if want_attn:
            attn = _dense_attention(qk_flat, khat, plan, top.reshape(-1), rem.reshape(-1), groups)
        ctx.plan = plan
        ctx.save_for_backward(qk, v, out, top, rem, lse_sorted)
        ctx.mark_non_differentiable(attn)
        return out, attn

    @staticmethod
    def backward(ctx, dout: Tensor, _dattn: Tensor):
        qk, v, out, top, rem, lse_sorted = ctx.saved_tensors
        plan: _Plan = ctx.plan
        groups, lp = v.shape[0], plan.length
        d, dv_dim = qk.shape[-1], v.shape[-1]
        acc = _acc(v.dtype)
        qk_flat, v_flat = qk.reshape(-1, d), v.reshape(-1, dv_dim)
        khat = F.normalize(qk_flat, dim=-1, eps=_norm_eps(qk.dtype))
        dout_flat = dout.contiguous().reshape(-1, dv_dim)
        out_flat = out.reshape(-1, dv_dim)
        top, rem = top.reshape(-1), rem.reshape(-1)
        flash = _use_flash(plan, qk, v)
        if not flash:
            delta = (dout_flat.to(acc) * out_flat.to(acc)).sum(-1)  # D_i = dout_i . out_i
        dq_acc = torch.zeros(groups, lp, d, dtype=acc, device=v.device)
        dk_acc = torch.zeros(groups, lp, d, dtype=acc, device=v.device)
        dv_acc = torch.zeros(groups, lp, dv_dim, dtype=acc, device=v.device)
        c, nc = plan.chunk, plan.n_chunks
        sides = (["back"] if plan.back else []) + ["cur"] + (["fwd"] if plan.forward else [])
        bi = 0
        for r0, r1, blocks in plan.spans():
            nr = r1 - r0
            # gradients in each round's sorted order (contiguous writes, no scatter-add): "cur" holds a
            # chunk's own slots, "back"/"fwd" what its window sends to the previous/next chunk
            bq = torch.empty(nr * lp, d, dtype=acc, device=v.device)
            bk = {s: torch.empty(nr * lp, d, dtype=acc, device=v.device) for s in sides}
            bv = {s: torch.empty(nr * lp, dv_dim, dtype=acc, device=v.device) for s in sides}
            for n0, n1 in blocks:
                blk = _block(plan, n0, n1, v.device)
                nb = n1 - n0
                q, kw, vw = _take(qk_flat, blk.flat), _take(khat, blk.kflat), _take(v_flat, blk.kflat)
                do = _take(dout_flat, blk.flat)
                if flash:
                    lse = lse_sorted[n0 * c : n1 * c].view(nb, c)
                    w = torch.exp(lse - _take(top, blk.flat) - _take(rem, blk.flat))  # round weights
                    g = (do.to(acc) * w[..., None]).to(v.dtype)
                    mask = _float_mask(blk, q, kw, plan)
                    dq, dkw, dvw = _FLASH_BACKWARD(
                        g[:, None],
                        q[:, None],
                        kw[:, None],
                        vw[:, None],
                        _take(out_flat, blk.flat)[:, None],
                        lse[:, None].to(torch.float32) if lse.dtype != torch.float64 else lse[:, None],
                        0.0,
                        False,
                        attn_mask=mask,
                        scale=plan.scale,
                    )
                    dq, dkw, dvw = dq[:, 0], dkw[:, 0], dvw[:, 0]
                else:
                    dq, dkw, dvw = _manual_backward(plan, blk, q, kw, vw, do, top, rem, delta, bi, acc)
                rows = slice(n0 * c - r0 * lp, n1 * c - r0 * lp)
                bq[rows].view(nb, c, d).copy_(dq)
                for i, side in enumerate(sides):
                    bk[side][rows].view(nb, c, d).copy_(dkw[:, i * c : (i + 1) * c])
                    bv[side][rows].view(nb, c, dv_dim).copy_(dvw[:, i * c : (i + 1) * c])
                bi += 1
            dk, dvs = bk.pop("cur"), bv.pop("cur")
            for side, shift in (("back", -1), ("fwd", 1)):
                if side in bk:  # what chunk n's window sent to chunk n -/+ 1, moved onto that chunk's slots
                    dk += bk.pop(side).view(nr, nc, c, d).roll(shift, dims=1).view(-1, d)
                    dvs += bv.pop(side).view(nr, nc, c, dv_dim).roll(shift, dims=1).view(-1, dv_dim)
            slots = (plan.slot_of[r0:r1] + torch.arange(nr, device=v.device)[:, None] * lp).reshape(-1)
            for buf, target in ((bq, dq_acc), (dk, dk_acc), (dvs, dv_acc)):
                unsorted = buf.index_select(0, slots).view(nr, lp, -1)
                if r0 % plan.rounds == 0 and r1 % plan.rounds == 0:
                    target[r0 // plan.rounds : r1 // plan.rounds] += unsorted.view(
                        -1, plan.rounds, lp, unsorted.shape[-1]
                    ).sum(1)
                    continue
                for rows, grp in _rows_by_group(r0, r1, plan.rounds):
                    target[grp] += unsorted[rows]
            del bq, dk, dvs
        # through khat = qk / max(|qk|, eps)
        dq_acc, dkhat = dq_acc.view(-1, d), dk_acc.view(-1, d)
        norm = qk_flat.to(acc).norm(dim=-1, keepdim=True)
        kh = khat.to(acc)
        eps = _norm_eps(qk.dtype)
        proj = torch.where(norm > eps, kh * (kh * dkhat).sum(-1, keepdim=True), torch.zeros_like(kh))
        dq_acc += (dkhat - proj) / norm.clamp(min=eps)
        return dq_acc.view(qk.shape).to(qk.dtype), dv_acc.view(v.shape).to(v.dtype), None, None


def _manual_backward(plan, blk, q, kw, vw, do, top, rem, delta, bi, acc):
    """Window gradients without the fused kernel (dropout, non-CPU devices): ``dS = P (dP - D)``."""
    s = _scores(q, kw, blk, plan)
    p = s.sub_(_take(top, blk.flat)[..., None]).sub_(_take(rem, blk.flat)[..., None]).exp_()
    dp = torch.matmul(do, vw.transpose(-1, -2)).to(acc)
    if plan.dropout > 0:
        keep = _dropout_keep(plan, p.shape, bi, q.device).to(acc) / (1.0 - plan.dropout)
        dp.mul_(keep)
        pv = p * keep
    else:
        pv = p
    dvw = torch.matmul(pv.transpose(-1, -2).to(do.dtype), do)
    ds = dp.sub_(_take(delta, blk.flat)[..., None]).mul_(p)
    off, c = plan.self_offset, plan.chunk
    ds[:, :, off : off + c].diagonal(dim1=-2, dim2=-1).zero_()  # the self logit is a constant
    ds = ds.mul_(plan.scale).to(q.dtype)
    return torch.matmul(ds, kw), torch.matmul(ds.transpose(-1, -2), q), dvw


def _rows_by_group(r0: int, r1: int, rounds: int):
    """Rows ``r0:r1`` as (local row slice, group slice) pairs, one per round: the rows of one round in a
    span belong to consecutive groups, so plain slices (no gather/scatter) address both."""
    for k in range(rounds):
        first = r0 + (k - r0) % rounds  # first row of round k at or after r0
        if first >= r1:
            continue
        count = (r1 - 1 - first) // rounds + 1
        g0 = first // rounds
        yield slice(first - r0, first - r0 + (count - 1) * rounds + 1, rounds), slice(g0, g0 + count)


# ---------------------------------------------------------------------------------------------------------
# argument checks


def _check_positive_int(name: str, value, owner: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}; pass e.g. {name}=64")


def _check_rate(name: str, value, owner: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{owner}: {name} must be a probability in [0, 1), got {value!r}")


def _as_bool_mask(name: str, mask: Tensor, shape: tuple[int, ...]) -> Tensor:
    # bool only, as in full and local attention: a 0/1 float mask is ambiguous (keep-flags or additive biases)
    check_bool_mask(name, mask, None, "True = real token")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(
            f"{name} has shape {tuple(mask.shape)} but this input needs {tuple(shape)} "
            "(True = real token); build it for the same batch and sequence length as the input"
        )
    return mask


def _attn_mask_tensor(name: str, mask: Tensor, batch: int, n: int) -> Tensor:
    """``(n, n)`` or ``(batch, n, n)`` bool (True = may attend) -> ``(1 or batch, n, n)``."""
    check_bool_mask(name, mask, None, "True = may attend")
    if mask.dim() == 2:
        mask = mask[None]
    if mask.dim() != 3 or mask.shape[-2:] != (n, n) or mask.shape[0] not in (1, batch):
        raise ValueError(
            f"{name} has shape {tuple(mask.shape)}; it must be ({n}, {n}) or ({batch}, {n}, {n}) "
            f"over the {n} input positions (True = may attend)"
        )
    return mask


# ---------------------------------------------------------------------------------------------------------
# the parameter-free core


class LSHAttention(nn.Module):
    """Bucketed shared-QK attention on pre-projected inputs (no parameters); see the module docstring.

    ``forward(qk (B, n, d), v (B, n, dv), query_len=None, input_mask=None, input_attn_mask=None,
    pos_emb=None, rotary=None)`` returns ``(out (B, query_len, dv), attn, buckets)``: ``attn`` is the dense
    merged attention ``(B, query_len, n)`` when ``return_attn`` is set (``O(n^2)``, for inspection) and
    empty otherwise; ``buckets (B, n_hashes * n)`` are the hash buckets with round offsets
    ``r * n_buckets``. The first ``query_len`` positions are the queries; later ones (memory key/values,
    context keys) are keys that stay visible under causal masking.

    Built from the ``lsh`` kind's options (:class:`LSHSelfAttention.Config`, which states their defaults),
    plus ``causal`` (mask keys after the query, by original position) and the ``layer_index`` that offsets
    the seeds, so that the layers of a model hash differently. The options it reads:

        dropout: dropout on the attention probabilities.
        bucket_size: chunk length of the sorted order; ``n_buckets = ceil(n / bucket_size)`` rounded up to
            even (the average bucket fills one chunk).
        n_hashes: hashing rounds; time and memory grow linearly.
        allow_duplicate_attention: False counts a key seen in several rounds once.
        attend_across_buckets: False also masks keys of the window that sit in another bucket (the paper).
        rehash_each_round: False draws one rotation and uses each token's ``n_hashes`` best buckets as the
            rounds' buckets (needs ``allow_duplicate_attention=True``; inputs too short for ``n_hashes``
            buckets get ``n_hashes`` (rounded up to even) buckets anyway).
        drop_for_hash_rate: dropout on the vectors fed to the hash only.
        random_rotations_per_head: one rotation per leading batch element instead of one shared.
        seed: rotations from a generator seeded with ``seed + layer_index`` in training too (None: fresh
            rotations from the global RNG in training, the paper's behaviour, and rotations seeded by
            ``layer_index`` in eval).

    Setting the attribute ``return_attn`` also returns the dense attention. reformer-pytorch's keyword
    signature and defaults are :class:`anydepth.compat.reformer.LSHAttention`.
    """

    def __init__(self, cfg: LSHSelfAttention.Config | None = None, *, causal: bool = False, layer_index: int = 0):
        super().__init__()
        if cfg is None:
            cfg = LSHSelfAttention.Config()
        elif not isinstance(cfg, LSHSelfAttention.Config):
            raise TypeError(
                f"{type(self).__name__} takes the lsh kind's options: {type(self).__name__}(LSHSelfAttention.Config"
                f"(...), causal=...); got {type(cfg).__name__} {cfg!r}"
            )
        self.dropout = float(cfg.dropout)
        self.bucket_size = cfg.bucket_size
        self.n_hashes = cfg.n_hashes
        self.causal = causal
        self.allow_duplicate_attention = cfg.allow_duplicate_attention
        self.attend_across_buckets = cfg.attend_across_buckets
        self.rehash_each_round = cfg.rehash_each_round
        self.drop_for_hash_rate = float(cfg.drop_for_hash_rate)
        self.random_rotations_per_head = cfg.random_rotations_per_head
        self.return_attn = False
        self.seed = None if cfg.seed is None else cfg.seed + layer_index
        self.eval_seed = layer_index  # seed of eval-time rotations when ``seed`` is None

    # above this many buckets the hash is a product of two smaller angular hashes (see bucket_factors)
    FACTOR_ABOVE = 512

    # hashing ------------------------------------------------------------------------------------------
    def _rotations(self, groups: int, dim: int, n_buckets: int, device) -> Tensor:
        shape = (
            groups if self.random_rotations_per_head else 1,
            dim,
            self.n_hashes if self.rehash_each_round else 1,
            n_buckets // 2,
        )
        if self.seed is None and self.training:
            return torch.randn(shape, device=device)
        gen = torch.Generator(device=device)
        gen.manual_seed(self.seed if self.seed is not None else self.eval_seed)
        return torch.randn(shape, generator=gen, device=device)

    def bucket_factors(self, n_buckets: int) -> tuple[int, int] | None:
        """``(b1, b2)``, both even, ``b1 * b2 >= n_buckets``, when the hash is a product of two angular hashes.

        One argmax over ``n_buckets / 2`` directions costs ``O(n * n_buckets * d)`` per round, and
        ``n_buckets`` grows with ``n``: at 131,072 tokens that quadratic term was half of the layer's time.
        Above ``FACTOR_ABOVE`` buckets the bucket is ``h1 * b2 + h2`` with ``h1``, ``h2`` two independent
        angular hashes (their concatenation, Andoni et al. 2015) over ``b1`` and ``b2 ~ sqrt(n_buckets)``
        buckets: ``O(n * sqrt(n_buckets) * d)``. Tokens share a bucket only when both hashes agree, so the
        collision probability is the product of the two; the sort and the windows are unchanged.
        """
        if n_buckets <= self.FACTOR_ABOVE or not self.rehash_each_round:
            return None
        b2 = 2 * math.ceil(math.sqrt(n_buckets) / 2)
        return 2 * math.ceil(n_buckets / (2 * b2)), b2

    def bucket_count(self, n_buckets: int) -> int:
        """Buckets that :meth:`hash_vectors` draws from when asked for ``n_buckets`` (``b1 * b2`` if
        factorised)."""
        f = self.bucket_factors(n_buckets)
        return n_buckets if f is None else f[0] * f[1]

    def hash_vectors(self, n_buckets: int, vecs: Tensor) -> Tensor:
        """``(B, n, d)`` -> buckets ``(B, n_hashes, n)`` in ``[0, bucket_count(n_buckets))`` (no round
        offsets).

        ``argmax([x R ; -x R])`` over a random ``R (d, n_buckets/2)`` per round, computed in float32 so that
        half-precision ties do not change buckets; above ``FACTOR_ABOVE`` buckets a product of two such
        hashes (:meth:`bucket_factors`).
        """
        b = vecs.shape[0]
        factors = self.bucket_factors(n_buckets)
        rot = self._rotations(b, vecs.shape[-1], n_buckets if factors is None else sum(factors), vecs.device)
        if not self.rehash_each_round and self.n_hashes > n_buckets:
            raise ValueError(
                f"rehash_each_round=False uses each token's n_hashes best of n_buckets={n_buckets} buckets, "
                f"but n_hashes={self.n_hashes}; lower n_hashes or use longer sequences / smaller bucket_size"
            )
        half = rot.shape[-1]
        out = torch.empty(b, self.n_hashes, vecs.shape[1], dtype=torch.long, device=vecs.device)
        # projections are (rows, rounds, n, n_buckets / 2), i.e. quadratic in n (n_buckets grows with n):
        # computed a few rows and positions at a time so that memory stays O(n)
        n, per_pos = vecs.shape[1], rot.shape[2] * half
        step = max(1, _BLOCK_ELEMS // max(1, per_pos * n))
        with torch.no_grad():
            for i in range(0, b, step):
                x = F.dropout(vecs[i : i + step].float(), self.drop_for_hash_rate, self.training)
                r = rot[i : i + step] if rot.shape[0] > 1 else rot
                r = r.expand(x.shape[0], -1, -1, -1)
                t_step = max(1, _BLOCK_ELEMS // (per_pos * x.shape[0]))
                for t0 in range(0, n, t_step):
                    t1 = min(n, t0 + t_step)
                    proj = torch.einsum("btd,bdri->brti", x[:, t0:t1], r)
                    if factors is not None:
                        h1 = _signed_argmax(proj[..., : factors[0] // 2])
                        out[i : i + step, :, t0:t1] = h1 * factors[1] + _signed_argmax(proj[..., factors[0] // 2 :])
                    elif self.rehash_each_round:
                        out[i : i + step, :, t0:t1] = _signed_argmax(proj)
                    else:
                        # the k best buckets, weakest first (round 0 gets the k-th best), as in the original
                        top = torch.cat((proj, -proj), dim=-1)[:, 0].topk(self.n_hashes, dim=-1).indices.flip(-1)
                        out[i : i + step, :, t0:t1] = top.permute(0, 2, 1)
        return out

    def layout(self, n: int) -> tuple[int, int, int]:
        """``(lp, hashed_buckets, n_buckets)`` of an LSH pass over ``n`` positions: the padded length
        ``lp = max(2, ceil(n / bucket_size)) * bucket_size`` (at least two chunks, so the look-back never
        repeats one), the count asked of :meth:`hash_vectors` (``lp / bucket_size`` rounded up to even) and
        the buckets it draws from (:meth:`bucket_count`); padding sorts into bucket ``n_buckets``."""
        lp = max(2, math.ceil(n / self.bucket_size)) * self.bucket_size
        n_chunks = lp // self.bucket_size
        hashed = n_chunks + n_chunks % 2
        if not self.rehash_each_round and hashed < self.n_hashes:
            # the rounds are each token's n_hashes best buckets of one rotation, so there must be that many;
            # buckets smaller than a chunk only make the sort finer (short inputs, many rounds)
            hashed = self.n_hashes + self.n_hashes % 2
        return lp, hashed, self.bucket_count(hashed)

    # incremental decoding ------------------------------------------------------------------------------
    def decode_newest(
        self, q: Tensor, qk: Tensor, k: Tensor, v: Tensor, state: dict, n_mem: int = 0, valid: Tensor | None = None
    ) -> Tensor:
        """Output ``(G, dv)`` of the newest position of ``x``, exactly as :meth:`_attend` computes it for the
        last query of ``[x ; memory]``, from the cached ``qk (n, G, d)`` (unrotated, for hashing), keys ``k``
        (rotated and normalised) and values ``v (n, G, dv)`` of ``G`` groups, all stored as ``[memory ; x]``
        (position-major, so that a window's keys are rows of one contiguous tensor), and the rotated query
        ``q (G, d)``.

        ``state`` keeps each round's buckets of the cached positions (``"buckets" (G, R, n)``) and their sort keys
        ``bucket * 2^32 + p`` in ascending order (``"sorted" (G, R, n)``), with ``p`` the position in ``x``, or
        ``2^31 + i`` for memory slot ``i`` (memory sorts after ``x`` within a bucket, as in the full forward), and
        keys that ``valid (G, n)`` marks False with bucket ``2^31 - 1``, after every real one (the full pass's extra
        bucket); the newest position must be valid. A step hashes the new position and inserts its key (``O(n)``);
        when the length changes the bucket count (every ``2 * bucket_size`` positions, which also redraws the
        rotations), all cached positions are rehashed and sorted again, ``O(n log n)`` once per ``2 * bucket_size``
        steps. The query's slot in round ``r`` is its key's rank ``s_r``; its window is the slots of chunk
        ``c_r = s_r // bucket_size`` and of the chunk before it (the last one when ``c_r = 0``), less the slots ``>= n``
        (padding) and the invalid keys. The rounds merge as in the full forward: one softmax over the union of the
        windows, each entry ``q . k / sqrt(d)``, ``-inf`` for other buckets' keys when not
        ``attend_across_buckets``, ``- log N_j`` with ``N_j`` the rounds whose window holds key ``j`` when not
        ``allow_duplicate_attention``, and ``TOKEN_SELF_ATTN_VALUE`` for the query's own key.
        """
        n, g, d = qk.shape
        bs = self.bucket_size
        lp, hashed, _ = self.layout(n)
        n_chunks = lp // bs
        mem_at = 1 << 31
        low = (1 << 32) - 1

        def code(i):  # sort position of cache slots i: memory after every position of x
            return torch.where(i < n_mem, mem_at + i, i - n_mem)

        newest = code(torch.tensor(n - 1, device=qk.device))
        if state.get("hashed") == hashed and state.get("hashed_n") == n - 1:
            new = self.hash_vectors(hashed, qk[-1:].transpose(0, 1))  # (G, R, 1)
            buckets = _append(state, "buckets", new, dim=2)
            key = (new << 32) | newest
            prev = state["sorted"]
            slot = torch.searchsorted(prev, key)  # (G, R, 1)
            ar = torch.arange(n, device=qk.device)
            src = (ar - (ar > slot).long()).clamp(max=n - 2)
            ordered = prev.gather(-1, src).scatter_(-1, slot, key)
        else:
            state.pop("buckets", None)
            buckets = _append(state, "buckets", self.hash_vectors(hashed, qk.transpose(0, 1)), dim=2)
            sort_buckets = buckets if valid is None else torch.where(valid[:, None], buckets, mem_at - 1)
            ordered = ((sort_buckets << 32) | code(torch.arange(n, device=qk.device))).sort(dim=-1).values
            key = (buckets[..., -1:] << 32) | newest
            slot = torch.searchsorted(ordered, key)
        state.update(sorted=ordered, hashed=hashed, hashed_n=n)
        bq, slot = buckets[..., -1], slot[..., 0]  # (G, R) the query's bucket and slot per round
        chunk = torch.div(slot, bs, rounding_mode="floor")
        ar = torch.arange(bs, device=qk.device)
        slots = torch.cat(
            (torch.remainder(chunk - 1, n_chunks)[..., None] * bs + ar, chunk[..., None] * bs + ar), dim=-1
        )  # (G, R, 2 * bs): the look-back chunk, then the query's own
        win = ordered.gather(-1, slots.clamp(max=n - 1))
        p = win & low
        pos = torch.where(p >= mem_at, p - mem_at, p + n_mem)  # cache slot of each window key
        forbid = slots >= n
        if valid is not None:
            forbid |= ~valid.gather(1, pos.view(g, -1)).view_as(pos)
        if not self.attend_across_buckets:
            forbid |= (win >> 32) != bq[..., None]
        extra = None
        if not self.allow_duplicate_attention:
            flat = pos.view(g, 1, -1).expand(-1, buckets.shape[1], -1)  # every window key, in every round
            kb = buckets.gather(-1, flat)
            k_chunk = torch.div(torch.searchsorted(ordered, (kb << 32) | code(flat)), bs, rounding_mode="floor")
            same = torch.remainder(chunk[..., None] - k_chunk, n_chunks) <= 1
            if not self.attend_across_buckets:
                same &= kb == bq[..., None]
            extra = -torch.log(same.sum(1).clamp(min=1).to(_acc(q.dtype)))
        own = slots == slot[..., None]
        rows = (pos * g + torch.arange(g, device=qk.device)[:, None, None]).view(-1)
        kw, vw = _take(k.view(n * g, d), rows).view(g, -1, d), _take(v.view(n * g, -1), rows).view(g, -1, v.shape[-1])
        return _attend_one(q, kw, vw, own.view(g, -1), forbid.view(g, -1), extra)

    # forward ------------------------------------------------------------------------------------------
    def forward(
        self,
        qk: Tensor,
        v: Tensor,
        query_len: int | None = None,
        input_mask: Tensor | None = None,
        input_attn_mask: Tensor | None = None,
        pos_emb: Tensor | None = None,
        *,
        rotary: tuple[Tensor, Tensor] | None = None,
        **kwargs,
    ):
        unknown = set(kwargs) - {"_reverse", "_depth"}
        if unknown:
            raise TypeError(f"LSHAttention.forward got unexpected argument(s) {', '.join(sorted(unknown))}")
        if qk.dim() != 3 or v.dim() != 3 or qk.shape[:2] != v.shape[:2]:
            raise ValueError(
                f"qk and v must be (batch, n, dim) with the same batch and length, got {tuple(qk.shape)} "
                f"and {tuple(v.shape)}"
            )
        b, n, d = qk.shape
        query_len = n if query_len is None else query_len
        if not 0 < query_len <= n:
            raise ValueError(f"query_len must be in [1, {n}] (the sequence length), got {query_len}")
        if pos_emb is not None:
            if rotary is not None:
                raise ValueError(
                    "pass positions once: either pos_emb (reformer-pytorch table) or rotary=(cos, sin)"
                )
            rotary = _rotary_from_pos_emb(pos_emb)
        valid = torch.ones(b, n, dtype=torch.bool, device=qk.device)
        if input_mask is not None:
            check_bool_mask("input_mask", input_mask, None, "True = real token")
            if input_mask.dim() != 2 or input_mask.shape[0] != b or input_mask.shape[1] > n:
                raise ValueError(
                    f"input_mask has shape {tuple(input_mask.shape)}; it must be ({b}, m) with m <= {n} "
                    "(True = real token; missing trailing positions count as real)"
                )
            valid[:, : input_mask.shape[1]] = _as_bool_mask("input_mask", input_mask, tuple(input_mask.shape))
        attn_mask = None
        if input_attn_mask is not None:
            check_bool_mask("input_attn_mask", input_attn_mask, None, "True = may attend")
            m = input_attn_mask.shape[-1]
            attn_mask = _attn_mask_tensor("input_attn_mask", input_attn_mask, b, m)
        out, attn, buckets = self._attend(qk, v, valid, attn_mask, query_len, rotary, masked=input_mask is not None)
        return out, attn, buckets

    def _attend(
        self, qk, v, valid, attn_mask, query_len, rotary, full=False, mask_div=1, chunks=1, masked=True
    ):
        """Pads, hashes, sorts and runs the chunked attention; ``full`` uses one window over everything.
        ``masked=False`` promises that ``valid`` is all True (no padding mask to apply)."""
        b, n, d = qk.shape
        bs = self.bucket_size
        if full:
            lp, rounds = n, 1
        else:
            lp, hashed_buckets, n_buckets = self.layout(n)
            rounds = self.n_hashes
        pad = lp - n
        valid_p = F.pad(valid, (0, pad), value=False) if pad else valid
        qk_p = F.pad(qk, (0, 0, 0, pad)) if pad else qk
        v_p = F.pad(v, (0, 0, 0, pad)) if pad else v
        if full:
            buckets = torch.empty(b, 0, dtype=torch.long, device=qk.device)
            order = torch.arange(lp, device=qk.device).expand(b, lp)
            sort_buckets = None
        else:
            raw = self.hash_vectors(hashed_buckets, qk_p)  # (b, R, lp)
            # padding and masked tokens go to an extra bucket after every real one
            sort_buckets = torch.where(valid_p[:, None], raw, n_buckets)
            pos = torch.arange(lp, device=qk.device)
            order = (sort_buckets * lp + pos).argsort(dim=-1)  # keys are unique: a total order
            offsets = torch.arange(rounds, device=qk.device)[None, :, None] * n_buckets
            buckets = (raw[..., :n] + offsets).reshape(b, -1)
        if rotary is not None:
            qk_p = _apply_rotary(qk_p, rotary)
        sorted_buckets = slot_chunks = None
        if not full and not self.attend_across_buckets:
            sorted_buckets = torch.gather(sort_buckets, 2, order)
        if not full and not self.allow_duplicate_attention:
            slot = order.argsort(dim=-1)  # slot of each position in each round's sorted order
            slot_chunks = torch.div(slot, bs, rounding_mode="floor").permute(0, 2, 1)
        dropout_seed = _dropout_seed(self.training, self.dropout)
        qk_p, v_p = qk_p.contiguous(), v_p.contiguous()
        # attn_chunks: groups are processed in pieces (hashing above is shared, so results do not change);
        # a piece never splits the groups that share one attention-mask entry
        per_mask = mask_div if attn_mask is not None and attn_mask.shape[0] > 1 else 1
        step = math.ceil(math.ceil(b / max(1, chunks)) / per_mask) * per_mask
        outs, attns = [], []
        for g0 in range(0, b, step):
            g1 = min(b, g0 + step)
            m = g1 - g0
            am = attn_mask
            if am is not None and am.shape[0] > 1:
                am = am[g0 // mask_div : math.ceil(g1 / mask_div)]
            plan = _Plan(
                order=order[g0:g1].reshape(m * rounds, lp).contiguous(),
                rounds=rounds,
                chunk=lp if full else bs,
                back=not full,
                forward=False,
                wrap=True,
                valid=valid_p[g0:g1].reshape(-1),
                all_valid=not masked and pad == 0,
                causal=self.causal,
                query_len=query_len,
                scale=d**-0.5,
                attn_mask=am,
                mask_div=mask_div,
                dropout=self.dropout if self.training else 0.0,
                dropout_seed=dropout_seed + g0,
                acc_dtype=_acc(qk.dtype),
            )
            if sorted_buckets is not None:
                plan.buckets = sorted_buckets[g0:g1].reshape(m * rounds, lp)
            if slot_chunks is not None:
                plan.dup_chunks = slot_chunks[g0:g1].reshape(m * lp, rounds)
                if sorted_buckets is not None:
                    plan.dup_buckets = sort_buckets[g0:g1].permute(0, 2, 1).reshape(m * lp, rounds)
            out, attn = _ChunkedAttention.apply(qk_p[g0:g1], v_p[g0:g1], plan, self.return_attn)
            outs.append(out[:, :query_len])
            attns.append(attn[:, :query_len, :n] if self.return_attn else attn)
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        attn = torch.cat(attns) if len(attns) > 1 else attns[0]
        return out, attn, buckets


def _signed_argmax(p: Tensor) -> Tensor:
    """``argmax([p ; -p], -1)`` without building it: the larger of ``max(p)`` and ``-min(p)``, ties to ``p``."""
    hi, lo = p.max(dim=-1), p.min(dim=-1)
    return torch.where(hi.values >= -lo.values, hi.indices, lo.indices + p.shape[-1])


def _local_attend(qk, v, valid, *, window, causal, rotary, dropout, training, masked=True):
    """Shared-QK local attention: position chunks of ``window``, each seeing itself and the previous chunk
    (and the next one unless causal), no wrap-around; same logits and self rule as the LSH heads."""
    b, n, d = qk.shape
    lp = math.ceil(n / window) * window
    pad = lp - n
    qk_p, v_p = F.pad(qk, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
    if rotary is not None:
        qk_p = _apply_rotary(qk_p, rotary)
    plan = _Plan(
        order=torch.arange(lp, device=qk.device).expand(b, lp).contiguous(),
        rounds=1,
        chunk=window,
        back=True,
        forward=not causal,
        wrap=False,
        valid=F.pad(valid, (0, pad), value=False).reshape(-1),
        all_valid=not masked and pad == 0,
        causal=causal,
        query_len=lp,
        scale=d**-0.5,
        dropout=dropout if training else 0.0,
        dropout_seed=_dropout_seed(training, dropout),
        acc_dtype=_acc(qk.dtype),
    )
    out, _ = _ChunkedAttention.apply(qk_p.contiguous(), v_p.contiguous(), plan, False)
    return out[:, :n]


# ---------------------------------------------------------------------------------------------------------
# the multi-head layer


@ATTENTIONS.register("lsh")
class LSHSelfAttention(Configurable, nn.Module):
    """Multi-head shared-QK attention: LSH heads, optional local heads, full attention for short inputs.

    ``qk = x W_qk`` serves as queries and (L2-normalised) keys; ``v = x W_v``;
    ``out = concat_h(o_h) W_o + b``.
    The sequence attended over is ``[x ; memory key/values ; context keys]``; only ``x``'s positions are
    queries. Heads ``0 .. n_local_attn_heads - 1`` use local windows of ``2 * bucket_size`` over ``x``
    (look one window back, and one ahead unless causal); the others use :class:`LSHAttention`, or full
    shared-QK attention when ``use_full_attn`` or the attended length is at most ``full_attn_thres``.

    Built from :class:`LSHSelfAttention.Config` plus ``dim``, ``heads``, ``dim_head``, ``causal`` and ``ctx``
    (``ATTENTIONS.build("lsh", ...)``, ``LSHSelfAttention(LSHSelfAttention.Config(n_hashes=8), dim=512,
    heads=8)`` or ``LSHSelfAttention.make(dim=512, heads=8, n_hashes=8)``), and called like every attention
    kind: ``attn(x, mask=, attn_mask=, context=, context_mask=, rotary=, cache=)``. Masks use True = real
    token / may attend. Rotary positions reach every head and every path. reformer-pytorch's signature,
    defaults and call style (``keys=``, ``input_mask=``, ``pos_emb=``) are
    :class:`anydepth.compat.reformer.LSHSelfAttention`.
    """

    @dataclass(kw_only=True)
    class Config:
        bucket_size: int = 64  # chunk length of the sorted order; 64 is the paper's choice
        n_hashes: int = 4  # hashing rounds: quality vs linear cost (8 best, 4 permissible per the authors)
        attend_across_buckets: bool = True  # reformer-pytorch default; False keeps each query in its bucket
        allow_duplicate_attention: bool = True  # False counts a key seen in several rounds once
        rehash_each_round: bool = True  # False: one rotation, each token's top buckets as the rounds
        drop_for_hash_rate: float = 0.0  # dropout on the vectors fed to the hash only
        random_rotations_per_head: bool = False  # one rotation per (batch, head) instead of one shared
        dropout: float = 0.0  # dropout on attention probabilities
        post_attn_dropout: float = 0.0  # dropout on the layer output
        attn_chunks: int = 1  # process batch x heads in this many chunks (bounds memory further)
        num_mem_kv: int = 0  # learned persistent memory key/values (all-attention, arXiv 1907.01470)
        one_value_head: bool = False  # one value head shared by all heads (smaller value projection)
        use_full_attn: bool = False  # always full shared-QK attention (exact; for comparison)
        full_attn_thres: int | None = (
            None  # full attention when the attended length is <= this (None: bucket_size)
        )
        n_local_attn_heads: int = 0  # heads using local windows instead of LSH
        seed: int | None = None  # rotations from this seed also in training (None: fresh in training)

        def __post_init__(self) -> None:
            owner = "LSHSelfAttention.Config"
            for name in ("bucket_size", "n_hashes", "attn_chunks"):
                _check_positive_int(name, getattr(self, name), owner)
            for name in ("dropout", "drop_for_hash_rate", "post_attn_dropout"):
                _check_rate(name, getattr(self, name), owner)
            if not self.rehash_each_round and not self.allow_duplicate_attention:
                raise ValueError(
                    f"{owner}: rehash_each_round=False with allow_duplicate_attention=False is not defined (the "
                    "rounds share one rotation, so their windows cannot be counted apart); set "
                    "allow_duplicate_attention=True or rehash_each_round=True"
                )
            m = self.num_mem_kv
            if isinstance(m, bool) or not isinstance(m, int) or m < 0:
                raise ValueError(f"{owner}: num_mem_kv must be an int >= 0, got {m!r}")
            t = self.full_attn_thres
            if t is not None and (isinstance(t, bool) or not isinstance(t, int)):
                raise ValueError(f"{owner}: full_attn_thres must be an int or None, got {t!r}")
            if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
                raise TypeError(f"{owner}: seed must be an int or None, got {self.seed!r}")

    def __init__(
        self,
        cfg: LSHSelfAttention.Config | None = None,
        *,
        dim: int,
        heads: int,
        dim_head: int | None = None,
        causal: bool = False,
        cross: bool = False,
        ctx=None,
    ):
        if cross:
            raise ValueError(
                "attention kind 'lsh' is self-attention over [x ; memory ; context] and cannot be a separate "
                "cross-attention layer; pass encoder outputs as context= to the self-attention, or use "
                "attention='full' for cross-attention"
            )
        super().__init__()
        cfg = self.config_of(cfg)
        owner = type(self).__name__
        _check_positive_int("dim", dim, owner)
        _check_positive_int("heads", heads, owner)
        if dim_head is None:
            if dim % heads:
                raise ValueError(
                    f"{owner}: dim={dim} is not divisible by heads={heads}; choose heads dividing dim "
                    f"or pass dim_head explicitly (e.g. dim_head={max(1, dim // heads)})"
                )
            dim_head = dim // heads
        _check_positive_int("dim_head", dim_head, owner)
        n_local = cfg.n_local_attn_heads
        if isinstance(n_local, bool) or not isinstance(n_local, int) or not (0 <= n_local < heads):
            raise ValueError(
                f"{owner}: n_local_attn_heads={n_local!r} must be in [0, heads={heads}); at least one head must "
                f"use LSH attention (use n_local_attn_heads <= {heads - 1})"
            )
        self.dim, self.heads, self.dim_head = dim, heads, dim_head
        self.causal = causal
        self.attn_chunks = cfg.attn_chunks
        self.bucket_size = cfg.bucket_size
        self.num_mem_kv = num_mem_kv = cfg.num_mem_kv
        self.one_value_head = cfg.one_value_head
        self.use_full_attn = cfg.use_full_attn
        self.full_attn_thres = cfg.bucket_size if cfg.full_attn_thres is None else cfg.full_attn_thres
        self.n_local_attn_heads = n_local
        self.dropout = float(cfg.dropout)
        inner = heads * dim_head
        self.toqk = nn.Linear(dim, inner, bias=False)
        self.tov = nn.Linear(dim, dim_head if cfg.one_value_head else inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        # distinct, reproducible rotations per layer
        self.lsh_attn = LSHAttention(cfg, causal=causal, layer_index=ctx.index if ctx is not None else 0)
        self.post_attn_dropout = nn.Dropout(cfg.post_attn_dropout)
        self.mem_kv = nn.Parameter(torch.randn(1, num_mem_kv, dim)) if num_mem_kv > 0 else None
        self.callback = None  # called with (attn, buckets) after each forward; used by Recorder

    def reset_parameters(self, beta: float = 1.0) -> None:
        """Xavier-normal init: gain ``beta`` on the value and output projections (DeepNorm's depth scaling,
        arXiv 2203.00555), gain 1 on the shared query/key projection; zero output bias."""
        nn.init.xavier_normal_(self.toqk.weight, gain=1.0)
        nn.init.xavier_normal_(self.tov.weight, gain=beta)
        nn.init.xavier_normal_(self.to_out.weight, gain=beta)
        nn.init.zeros_(self.to_out.bias)

    def no_weight_decay(self) -> list[nn.Parameter]:
        return []

    @property
    def return_attn(self) -> bool:
        return self.lsh_attn.return_attn

    @return_attn.setter
    def return_attn(self, value: bool) -> None:
        self.lsh_attn.return_attn = bool(value)

    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        rotary: tuple[Tensor, Tensor] | None = None,
        cache: dict | None = None,
        **kwargs,
    ) -> Tensor:
        unknown = set(kwargs) - {"_reverse", "_depth"}
        if unknown:
            raise TypeError(
                f"LSHSelfAttention.forward got unexpected argument(s) {', '.join(sorted(unknown))}; it takes "
                "mask=, attn_mask=, context=, context_mask=, rotary=, cache= (reformer-pytorch's keys=, "
                "input_mask=, input_attn_mask=, pos_emb= are anydepth.compat.reformer.LSHSelfAttention's)"
            )
        keys, input_mask, input_attn_mask = context, mask, attn_mask
        # checked before any shape is read
        check_bool_mask("mask", mask, None, "True = real token")
        check_bool_mask("attn_mask", attn_mask, None, "True = may attend")
        check_bool_mask("context_mask", context_mask, None, "True = real token")
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be (batch, length, dim={self.dim}), got {shape}")
        if cache is not None:
            if attn_mask is not None:
                # the cached step computes the last position of the full forward, over every cached key
                raise ValueError(
                    "attn_mask cannot be combined with cache= in LSH attention: cached decoding attends over "
                    "every cached position; mask padding with mask= or decode without the cache (use_cache=False)"
                )
            return self._forward_cached(x, keys, input_mask, context_mask, rotary, cache)
        return self._forward(x, keys, input_mask, input_attn_mask, context_mask, rotary)

    def _forward(self, x, keys, input_mask, input_attn_mask, context_mask, rotary, query_from: int = 0):
        b, t, _ = x.shape
        h, dh, m, l_h = self.heads, self.dim_head, self.num_mem_kv, self.n_local_attn_heads
        if keys is not None:
            if keys.dim() != 3 or keys.shape[0] != b or keys.shape[-1] != self.dim:
                raise ValueError(
                    f"keys/context has shape {tuple(keys.shape)}; "
                    f"it must be (batch={b}, length, dim={self.dim}) "
                    f"(project encoder outputs to dim={self.dim} first)"
                )
        c = 0 if keys is None else keys.shape[1]
        parts = [x]
        if m:
            parts.append(self.mem_kv.to(x.dtype).expand(b, m, -1))
        if c:
            parts.append(keys.to(x.dtype))
        seq = torch.cat(parts, dim=1) if len(parts) > 1 else x
        kv = t + m + c
        valid = torch.ones(b, kv, dtype=torch.bool, device=x.device)
        if input_mask is not None:
            valid[:, :t] = _as_bool_mask("input_mask (mask)", input_mask, (b, t))
        if context_mask is not None:
            if c == 0:
                raise ValueError("context_mask was given without keys/context; pass the context it masks")
            valid[:, t + m :] = _as_bool_mask("context_mask", context_mask, (b, c))
        if input_attn_mask is not None:
            input_attn_mask = _attn_mask_tensor("input_attn_mask (attn_mask)", input_attn_mask, b, t)
        if rotary is not None:
            cos, sin = rotary
            if cos.shape[-2] != t:
                raise ValueError(
                    f"rotary tables cover {cos.shape[-2]} positions but x has {t}; "
                    f"build them for positions 0..{t - 1}"
                )

        qk = self.toqk(seq).view(b, kv, h, dh).transpose(1, 2)
        v = self.tov(seq)
        v = (
            v[:, :, None, :].expand(b, kv, h, dh) if self.one_value_head else v.view(b, kv, h, dh)
        ).transpose(1, 2)

        outs = []
        if l_h:
            lqk = qk[:, :l_h, :t].reshape(b * l_h, t, dh)
            lv = v[:, :l_h, :t].reshape(b * l_h, t, dh)
            local_valid = valid[:, None, :t].expand(b, l_h, t).reshape(b * l_h, t)
            local = _local_attend(
                lqk,
                lv,
                local_valid,
                window=2 * self.bucket_size,
                causal=self.causal,
                rotary=rotary,
                dropout=self.dropout,
                training=self.training,
                masked=input_mask is not None,
            )
            outs.append(local.view(b, l_h, t, dh))
        lsh_h = h - l_h
        qk_l = qk[:, l_h:].reshape(b * lsh_h, kv, dh)
        v_l = v[:, l_h:].reshape(b * lsh_h, kv, dh)
        valid_l = valid[:, None].expand(b, lsh_h, kv).reshape(b * lsh_h, kv)
        full = self.use_full_attn or kv <= self.full_attn_thres
        out, attn, buckets = self.lsh_attn._attend(
            qk_l,
            v_l,
            valid_l,
            input_attn_mask,
            t,
            rotary,
            full=full,
            mask_div=lsh_h,
            chunks=self.attn_chunks,
            masked=input_mask is not None or context_mask is not None,
        )
        if self.callback is not None:
            self.callback(attn.reshape(b, lsh_h, t, -1), buckets.reshape(b, lsh_h, -1))
        outs.append(out.view(b, lsh_h, t, dh))
        out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
        out = out.transpose(1, 2).reshape(b, t, h * dh)[:, query_from:]
        return self.post_attn_dropout(self.to_out(out))

    # Single-token steps with a cache take the incremental path (:meth:`_decode_step`); False recomputes the
    # layer over the cached inputs at every step (the reference that path is tested and timed against).
    fast_decoding: bool = True

    def _forward_cached(self, x, keys, input_mask, context_mask, rotary, cache):
        """Incremental decoding: the new positions attend over the cached positions plus themselves.

        The cache keeps the layer's inputs and rotary tables. A step of one new token takes :meth:`_decode_step`,
        which computes exactly what the full forward over the cached inputs gives the newest position, in
        ``O(n_hashes * bucket_size * dim_head)`` attention plus ``O(n)`` index work. The prompt (any call with
        several new tokens) and the cases that path does not cover -- a ``mask`` that masks the new token,
        ``context``/``keys`` or ``context_mask`` other than the previous call's, training mode (fresh rotations,
        dropout), ``return_attn`` or a callback set, ``fast_decoding = False`` -- recompute the layer over the
        whole cached input (hashing, sorting and chunked attention) and return the new positions.

        Either way the newest position gets the output an uncached forward over the same layer inputs
        gives it. Earlier positions are not revisited: in a full forward their outputs change when a token
        is appended (the bucket count, the rotations and the sort depend on the length). So a model decodes
        with a cache token for token as without one when no layer reads an LSH layer's outputs at earlier
        positions, e.g. when its only LSH layer is its last attention layer; with more LSH layers cached
        decoding is exact given the cached inputs (the incremental path equals the recompute path), and
        differs from recomputing the whole stack.
        """
        past = cache["x"][1] if "x" in cache else 0
        if input_mask is not None and input_mask.shape[1] != past + x.shape[1]:
            raise ValueError(
                f"with a cache, mask must cover the cached and the new positions ({past + x.shape[1]}), "
                f"got {tuple(input_mask.shape)}"
            )
        if input_mask is not None:
            input_mask = _as_bool_mask("input_mask (mask)", input_mask, (x.shape[0], past + x.shape[1]))
        x_all = _append(cache, "x", x, dim=1)
        if rotary is not None:
            table = InterleavedRotaryTable if getattr(rotary, "interleaved", False) else RotaryTable
            rotary = table(_append(cache, "cos", rotary[0], dim=0), _append(cache, "sin", rotary[1], dim=0))
        # the context (checked by the recompute path) must be the previous call's for the cached projections
        same_context = _same(cache.get("keys"), keys) and _same(cache.get("context_mask"), context_mask)
        if not same_context:
            cache["keys"] = None if keys is None else keys.detach().clone()
            cache["context_mask"] = None if context_mask is None else context_mask.clone()
        incremental = (
            self.fast_decoding
            and past > 0
            and same_context
            and x.shape[1] == 1
            and not self.training
            and (input_mask is None or bool(input_mask[:, -1].all()))
            and self.callback is None
            and not self.return_attn
        )
        if incremental:
            state = cache.setdefault("decode", {})
            return self._decode_step(x_all, rotary, input_mask, keys, context_mask, state)
        cache.pop("decode", None)  # rebuilt from the cached inputs at the next incremental step
        return self._forward(
            x_all, keys, input_mask, None, context_mask, rotary, query_from=x_all.shape[1] - x.shape[1]
        )

    def _project(self, seq: Tensor) -> tuple[Tensor, Tensor]:
        """``qk, v`` of ``seq (b, s, dim)``, each ``(b, heads, s, dim_head)``."""
        b, s, _ = seq.shape
        h, dh = self.heads, self.dim_head
        qk = self.toqk(seq).view(b, s, h, dh).transpose(1, 2)
        v = self.tov(seq)
        v = v[:, :, None, :].expand(b, s, h, dh) if self.one_value_head else v.view(b, s, h, dh)
        return qk, v.transpose(1, 2)

    def _decode_step(self, x_all, rotary, mask, context, context_mask, state: dict) -> Tensor:
        """Output ``(b, 1, dim)`` of the newest of the ``t`` positions of ``x_all``, from cached keys.

        ``state`` keeps, per LSH head group, the sequence ``[memory ; context ; x]``'s shared-QK vectors
        ``qk`` (to rehash them when the bucket count changes), keys ``k = rot(qk) / |rot(qk)|`` (memory and
        context unrotated) and values, plus :meth:`LSHAttention.decode_newest`'s buckets and sort; per local
        head the keys and values of ``x``. The first step projects the whole cached input, later ones only
        the new position. The query ``q = rot(qk_t)`` attends as the full forward's last position does:
        over every position when that forward uses full attention (``use_full_attn`` or
        ``t + num_mem_kv + context length <= full_attn_thres``), over its LSH windows otherwise, and, in the
        local heads, over its own and the previous window of ``2 * bucket_size`` positions; its own key
        counts ``TOKEN_SELF_ATTN_VALUE`` everywhere, and keys that ``mask (b, t)`` or ``context_mask``
        mark False are excluded (they sort after every real key, as in the full pass).
        """
        b, t, _ = x_all.shape
        h, dh, l_h = self.heads, self.dim_head, self.n_local_attn_heads
        lsh_h = h - l_h
        new = x_all if "t" not in state else x_all[:, -1:]
        qk, v = self._project(new)
        q = qk
        if rotary is not None:
            s = new.shape[1]
            table = (rotary[0][t - s :], rotary[1][t - s :])
            q = _apply_rotary(qk, table, interleaved=bool(getattr(rotary, "interleaved", False)))
        k = F.normalize(q, dim=-1, eps=_norm_eps(q.dtype))
        lsh_qk, lsh_k, lsh_v = qk[:, l_h:], k[:, l_h:], v[:, l_h:]
        if "t" not in state:  # memory and context sit before x in the cache, unrotated
            extra = [self.mem_kv.to(x_all.dtype).expand(b, -1, -1)] if self.num_mem_kv else []
            extra += [context.to(x_all.dtype)] if context is not None else []
            state["extra"] = sum(e.shape[1] for e in extra)
            if extra:
                e_qk, e_v = self._project(torch.cat(extra, dim=1) if len(extra) > 1 else extra[0])
                e_qk, e_v = e_qk[:, l_h:], e_v[:, l_h:]
                e_k = F.normalize(e_qk, dim=-1, eps=_norm_eps(qk.dtype))
                lsh_qk, lsh_k, lsh_v = (torch.cat(p, dim=2) for p in ((e_qk, lsh_qk), (e_k, lsh_k), (e_v, lsh_v)))
        elif _changed(state.get("mask"), None if mask is None else mask[:, :-1]):
            state.pop("hashed", None)  # cached keys changed validity: sort them again
        state["mask"] = None if mask is None else mask.clone()  # the caller may edit its mask in place
        n_extra = state["extra"]
        valid = local_valid = None
        if mask is not None or context_mask is not None:
            ones = torch.ones(b, n_extra + t, dtype=torch.bool, device=x_all.device)
            parts = [ones[:, : self.num_mem_kv]]
            parts.append(ones[:, self.num_mem_kv : n_extra] if context_mask is None else context_mask)
            parts.append(ones[:, n_extra:] if mask is None else mask)
            kv = n_extra + t
            valid = torch.cat(parts, dim=1)[:, None].expand(b, lsh_h, kv).reshape(b * lsh_h, kv)
        if mask is not None:
            local_valid = mask[:, None].expand(b, l_h, t).reshape(b * l_h, t)
        state["t"] = t

        def groups(z: Tensor) -> Tensor:  # (b, heads, s, dh) -> (s, b * heads, dh)
            return z.permute(2, 0, 1, 3).reshape(z.shape[2], -1, z.shape[3])

        outs = []
        q = q[:, :, -1]
        if l_h:
            lk = _append(state, "local_k", groups(k[:, :l_h]), dim=0)
            lv = _append(state, "local_v", groups(v[:, :l_h]), dim=0)
            window = 2 * self.bucket_size
            start = max(0, ((t - 1) // window - 1) * window)
            lk, lv = lk[start:].transpose(0, 1), lv[start:].transpose(0, 1)
            forbid = None if local_valid is None else ~local_valid[:, start:]
            local = _attend_one(q[:, :l_h].reshape(-1, dh), lk, lv, lk.shape[1] - 1, forbid)
            outs.append(local.view(b, l_h, dh))
        vectors = _append(state, "qk", groups(lsh_qk), dim=0)
        keys = _append(state, "k", groups(lsh_k), dim=0)
        values = _append(state, "v", groups(lsh_v), dim=0)
        q_lsh = q[:, l_h:].reshape(-1, dh)
        if self.use_full_attn or t + n_extra <= self.full_attn_thres:
            forbid = None if valid is None else ~valid
            out = _attend_one(q_lsh, keys.transpose(0, 1), values.transpose(0, 1), t + n_extra - 1, forbid)
        else:
            out = self.lsh_attn.decode_newest(q_lsh, vectors, keys, values, state, n_mem=n_extra, valid=valid)
        outs.append(out.view(b, lsh_h, dh))
        out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
        return self.post_attn_dropout(self.to_out(out.reshape(b, 1, h * dh)))


def _append(cache: dict, name: str, new: Tensor, dim: int) -> Tensor:
    """Appends ``new`` to ``cache[name]`` along ``dim`` and returns everything appended so far (a view).

    The buffer doubles its capacity when full, so that ``n`` one-position steps copy ``O(n)`` elements in
    all, where concatenating at every step would copy ``O(n^2)``."""
    buf, n = cache.get(name, (None, 0))
    s = new.shape[dim]
    if buf is None or n + s > buf.shape[dim]:
        shape = list(new.shape)
        shape[dim] = max(16, 2 * (n + s))
        grown = new.new_empty(shape)
        if buf is not None:
            grown.narrow(dim, 0, n).copy_(buf.narrow(dim, 0, n))
        buf = grown
    buf.narrow(dim, n, s).copy_(new)
    cache[name] = (buf, n + s)
    return buf.narrow(dim, 0, n + s)


def _same(before: Tensor | None, now: Tensor | None) -> bool:
    """Whether an optional tensor equals the one kept from the previous call."""
    if before is None or now is None:
        return before is None and now is None
    return before.shape == now.shape and torch.equal(before, now.to(before.dtype))


def _changed(before: Tensor | None, now: Tensor | None) -> bool:
    """Whether two optional masks differ (``None`` means all True)."""
    if before is None or now is None:
        return before is not now and not bool((now if before is None else before).all())
    return not torch.equal(before, now)


def _attend_one(q: Tensor, k: Tensor, v: Tensor, own, forbid: Tensor | None = None, extra: Tensor | None = None):
    """One query per group: ``softmax(s) v`` with ``s_j = q . k_j / sqrt(d) + extra_j``, ``-inf`` where
    ``forbid``, and ``TOKEN_SELF_ATTN_VALUE`` at the query's own key(s) ``own`` (a column or a bool mask).

    ``q (G, d)``, ``k (G, W, d)``, ``v (G, W, dv)`` -> ``(G, dv)``; the softmax runs in the accumulation
    dtype (:func:`_acc`), as the chunked attention's does."""
    s = torch.matmul(k, q[:, :, None])[..., 0].to(_acc(q.dtype)) * q.shape[-1] ** -0.5
    if extra is not None:
        s = s + extra
    if forbid is not None:
        s = s.masked_fill(forbid, float("-inf"))
    if isinstance(own, int):
        s[:, own] = TOKEN_SELF_ATTN_VALUE
    else:
        s = s.masked_fill(own, TOKEN_SELF_ATTN_VALUE)
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p[:, None, :].to(v.dtype), v)[:, 0]

