"""LSH attention against independent formulas written here, reformer-pytorch (same weights) and invariants."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from anydepth.compat.reformer import LSHAttention, LSHSelfAttention
from anydepth.nn import lsh
from anydepth.nn.lsh import TOKEN_SELF_ATTN_VALUE
from anydepth.nn.positional import RotaryEmbedding, apply_rotary
from anydepth.registry import ATTENTIONS

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------------------
# independent references


def full_shared_qk(qk, v, causal, valid=None, query_len=None):
    """Dense shared-QK attention: k = qk/|qk|, logits q.k/sqrt(d), own key at -5e4 unless alone."""
    b, n, d = qk.shape
    t = n if query_len is None else query_len
    s = qk[:, :t] @ F.normalize(qk, dim=-1).transpose(1, 2) * d**-0.5
    i, j = torch.arange(t)[:, None], torch.arange(n)[None, :]
    allowed = torch.ones(b, t, n, dtype=torch.bool)
    if causal:
        allowed &= (j <= i) | (j >= t)
    if valid is not None:
        allowed &= valid[:, :t, None] & valid[:, None, :]
    s = s.masked_fill(~allowed, float("-inf"))
    s[:, torch.arange(t), torch.arange(t)] = TOKEN_SELF_ATTN_VALUE
    return s.softmax(-1) @ v


def brute_force_lsh(qk, v, buckets, bucket_size, n_hashes, causal, valid=None, dedup=False, across=True):
    """The documented algorithm, written with Python loops over explicit windows.

    Per round: sort real tokens by (bucket, position), then padding/masked tokens; cut into chunks of
    bucket_size; each chunk sees itself and the previous chunk of the same round (cyclic). Rounds merge as
    one softmax over (round, key) entries; with dedup each distinct key counts once.
    """
    b, n, d = qk.shape
    lp = max(2, math.ceil(n / bucket_size)) * bucket_size
    nc = lp // bucket_size
    n_buckets = nc + nc % 2
    valid = torch.ones(b, n, dtype=torch.bool) if valid is None else valid
    k = F.normalize(qk, dim=-1)
    out = torch.zeros(b, n, v.shape[-1], dtype=qk.dtype)
    buckets = buckets.view(b, n_hashes, n) - torch.arange(n_hashes)[None, :, None] * n_buckets
    for bi in range(b):
        windows = []  # per round: dict query -> list of keys in its window
        bucket_of = []
        for r in range(n_hashes):
            key = [
                (int(buckets[bi, r, p]) if valid[bi, p] else n_buckets, p) if p < n else (n_buckets, p)
                for p in range(lp)
            ]
            order = [p for _, p in sorted(key)]
            chunks = [order[c * bucket_size : (c + 1) * bucket_size] for c in range(nc)]
            win = {}
            for c in range(nc):
                keys = chunks[c - 1] + chunks[c]
                for q in chunks[c]:
                    win[q] = keys
            windows.append(win)
            bucket_of.append({p: key[p][0] for p in range(lp)})
        for i in range(n):
            logits, values = [], []
            for r in range(n_hashes):
                for j in windows[r][i]:
                    if j >= n:
                        continue
                    if j == i:
                        logit = TOKEN_SELF_ATTN_VALUE
                    else:
                        ok = bool(valid[bi, i] and valid[bi, j]) and not (causal and j > i)
                        if not across:
                            ok = ok and bucket_of[r][i] == bucket_of[r][j]
                        if not ok:
                            continue
                        logit = float(qk[bi, i] @ k[bi, j]) * d**-0.5
                        if dedup:
                            count = sum(
                                j in windows[r2][i] and (across or bucket_of[r2][i] == bucket_of[r2][j])
                                for r2 in range(n_hashes)
                            )
                            logit -= math.log(count)
                    logits.append(logit)
                    values.append(v[bi, j])
            w = torch.tensor(logits, dtype=qk.dtype).softmax(0)
            out[bi, i] = (w[:, None] * torch.stack(values)).sum(0)
    return out


# ----------------------------------------------------------------------------------------------------------
# the core


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_hashes", [1, 3])
@pytest.mark.parametrize("dv", [6, 5])  # equal widths run the fused kernel, unequal ones the plain ops
def test_two_chunks_equal_full_shared_qk_attention(causal, n_hashes, dv):
    # every round's window holds every key, so the merged softmax is exactly full attention
    torch.manual_seed(0)
    attn = LSHAttention(bucket_size=8, n_hashes=n_hashes, causal=causal).eval()
    qk, v = torch.randn(2, 16, 6, dtype=torch.float64), torch.randn(2, 16, dv, dtype=torch.float64)
    out, _, buckets = attn(qk, v)
    torch.testing.assert_close(out, full_shared_qk(qk, v, causal), rtol=1e-10, atol=1e-10)
    assert buckets.shape == (2, n_hashes * 16)


@pytest.mark.parametrize(
    "kw",
    [
        dict(causal=False),
        dict(causal=True),
        dict(causal=True, allow_duplicate_attention=False),
        dict(causal=False, attend_across_buckets=False),
        dict(causal=True, attend_across_buckets=False, allow_duplicate_attention=False),
    ],
)
def test_matches_brute_force_any_length_with_padding_mask(kw):
    torch.manual_seed(1)
    n, bs, r = 37, 4, 3  # 37 is not a multiple of the bucket size: the layer pads to 40
    attn = LSHAttention(bucket_size=bs, n_hashes=r, **kw).eval()
    qk, v = torch.randn(2, n, 5, dtype=torch.float64), torch.randn(2, n, 5, dtype=torch.float64)
    valid = torch.rand(2, n) > 0.2
    out, _, buckets = attn(qk, v, input_mask=valid)
    ref = brute_force_lsh(
        qk,
        v,
        buckets,
        bs,
        r,
        kw["causal"],
        valid,
        dedup=not kw.get("allow_duplicate_attention", True),
        across=kw.get("attend_across_buckets", True),
    )
    real = valid[..., None].expand_as(out)  # masked queries' outputs are unspecified
    torch.testing.assert_close(out[real], ref[real], rtol=1e-9, atol=1e-9)


def test_hash_is_angular_lsh_with_seeded_rotations():
    attn = LSHAttention(bucket_size=4, n_hashes=2, seed=123)
    x = torch.randn(3, 16, 6)
    gen = torch.Generator().manual_seed(123)
    rot = torch.randn((1, 6, 2, 2), generator=gen)  # (shared, d, rounds, n_buckets / 2)
    proj = torch.einsum("btd,drk->brtk", x, rot[0])
    expected = torch.cat((proj, -proj), dim=-1).argmax(-1)
    assert torch.equal(attn.hash_vectors(4, x), expected)


def test_rehash_each_round_false_uses_top_buckets_of_one_rotation():
    attn = LSHAttention(bucket_size=4, n_hashes=3, rehash_each_round=False, seed=5)
    x = torch.randn(2, 32, 6)
    gen = torch.Generator().manual_seed(5)
    rot = torch.randn((1, 6, 1, 4), generator=gen)
    proj = torch.einsum("btd,dk->btk", x, rot[0, :, 0])
    proj = torch.cat((proj, -proj), -1)
    top3 = proj.argsort(-1)[..., -3:]  # weakest of the three first, as in the original
    assert torch.equal(attn.hash_vectors(8, x), top3.permute(0, 2, 1))
    with pytest.raises(ValueError, match="n_hashes"):
        LSHAttention(bucket_size=16, n_hashes=3, rehash_each_round=False).hash_vectors(2, x)


def test_dedup_equals_union_softmax_and_has_no_cross_round_boost():
    # reformer-pytorch section 4.1: keys reached through the cross-round look-back got +20.7 logits
    torch.manual_seed(2)
    n, bs, r = 32, 4, 4
    attn = LSHAttention(bucket_size=bs, n_hashes=r, allow_duplicate_attention=False).eval()
    qk, v = torch.randn(1, n, 6, dtype=torch.float64), torch.randn(1, n, 6, dtype=torch.float64)
    out, _, buckets = attn(qk, v)
    # union of the windows, each key once, written directly
    lp, nc = n, n // bs
    b = buckets.view(r, n) - torch.arange(r)[:, None] * nc
    union = [set() for _ in range(n)]
    for rr in range(r):
        order = sorted(range(n), key=lambda p: (int(b[rr, p]), p))
        chunks = [order[c * bs : (c + 1) * bs] for c in range(lp // bs)]
        for c in range(nc):
            for q in chunks[c]:
                union[q].update(chunks[c - 1] + chunks[c])
    k = F.normalize(qk[0], dim=-1)
    for i in range(n):
        keys = sorted(union[i])
        logits = torch.stack([qk[0, i] @ k[j] * 6**-0.5 if j != i else torch.tensor(-5e4).double() for j in keys])
        expected = logits.softmax(0) @ v[0, keys]
        torch.testing.assert_close(out[0, i], expected, rtol=1e-9, atol=1e-9)


def test_padding_and_masked_tokens_take_no_real_slots():
    # 97 and 100 tokens pad to the same 112 (7 chunks, 8 buckets) with bucket 16, so hashing is identical;
    # masking the last 3 of 100 tokens must give exactly the outputs of the first 97 alone
    torch.manual_seed(3)
    attn = LSHAttention(bucket_size=16, n_hashes=2, causal=False).eval()
    qk, v = torch.randn(2, 100, 8, dtype=torch.float64), torch.randn(2, 100, 8, dtype=torch.float64)
    mask = torch.ones(2, 100, dtype=torch.bool)
    mask[:, 97:] = False
    out_masked, _, _ = attn(qk, v, input_mask=mask)
    out_short, _, _ = attn(qk[:, :97], v[:, :97])
    torch.testing.assert_close(out_masked[:, :97], out_short, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(causal=True),
        dict(allow_duplicate_attention=False),
        dict(attend_across_buckets=False, causal=True),
        dict(dropout=0.3),
        dict(causal=True, dv=3),  # unequal widths: the plain-ops path
    ],
)
def test_gradients_match_finite_differences(kw):
    dv = kw.pop("dv", 4)
    attn = LSHAttention(bucket_size=4, n_hashes=3, seed=1, **kw)  # training mode: dropout is live
    qk = torch.randn(2, 15, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 15, dv, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 15, dtype=torch.bool)
    mask[1, -3:] = False

    def f(qk, v):
        torch.manual_seed(0)  # same dropout pattern in every evaluation
        return attn(qk, v, query_len=13, input_mask=mask)[0]

    assert torch.autograd.gradcheck(f, (qk, v), fast_mode=True)


def test_dropout_drops_and_rescales_probabilities():
    torch.manual_seed(0)
    attn = LSHAttention(bucket_size=8, n_hashes=1, dropout=0.5, seed=0)
    qk, v = torch.randn(1, 16, 4, dtype=torch.float64), torch.eye(16, dtype=torch.float64)[None]
    out, _, _ = attn(qk, v)  # with identity values the output rows are the (dropped) attention rows
    probs = full_shared_qk(qk, v, False)
    kept = out != 0
    assert 0.2 < kept.double().mean() < 0.8
    torch.testing.assert_close(out[kept], 2 * probs[kept])


def test_eval_is_deterministic_and_training_resamples_unless_seeded():
    # reformer-pytorch section 4.8: rotations were resampled on every call, also in eval
    qk, v = torch.randn(1, 64, 8), torch.randn(1, 64, 8)
    attn = LSHAttention(bucket_size=4, n_hashes=2).eval()
    assert torch.equal(attn(qk, v)[2], attn(qk, v)[2])
    attn.train()
    draws = {tuple(attn(qk, v)[2].flatten().tolist()) for _ in range(4)}
    assert len(draws) > 1
    seeded = LSHAttention(bucket_size=4, n_hashes=2, seed=7)
    assert torch.equal(seeded(qk, v)[2], seeded(qk, v)[2])


def test_return_attn_is_the_merged_dense_attention():
    torch.manual_seed(4)
    attn = LSHAttention(bucket_size=4, n_hashes=3, causal=True, return_attn=True).eval()
    qk, v = torch.randn(2, 24, 6, dtype=torch.float64), torch.randn(2, 24, 6, dtype=torch.float64)
    out, dense, buckets = attn(qk, v, query_len=20)
    assert dense.shape == (2, 20, 24)
    torch.testing.assert_close(dense.sum(-1), torch.ones(2, 20, dtype=torch.float64))
    torch.testing.assert_close(dense @ v, out)
    assert torch.all(dense[:, torch.arange(20)[:, None] < torch.arange(24)[None, :] * (torch.arange(24) < 20)] == 0)


def test_rotary_is_applied_after_hashing_and_reformer_pos_emb_matches_tables():
    torch.manual_seed(5)
    attn = LSHAttention(bucket_size=4, n_hashes=2, seed=3).eval()
    qk, v = torch.randn(1, 16, 8, dtype=torch.float64), torch.randn(1, 16, 8, dtype=torch.float64)
    rot = RotaryEmbedding.make(dim_head=8, interleaved=True)(torch.arange(16))
    cos, sin = rot.cos.double(), rot.sin.double()
    out, _, buckets = attn(qk, v, rotary=rot)
    _, _, plain_buckets = attn(qk, v)
    assert torch.equal(buckets, plain_buckets)  # hashing sees un-rotated vectors
    # reformer-pytorch's pos_emb: cat(sin(p w), cos(p w)) with w_i = 10000^(-2i/d)
    w = 1.0 / 10000 ** (torch.arange(0, 8, 2).double() / 8)
    ang = torch.arange(16).double()[:, None] * w
    table = torch.cat((ang.sin(), ang.cos()), -1)[None]
    out_table, _, _ = attn(qk, v, pos_emb=table)
    torch.testing.assert_close(out, out_table)
    rotated = apply_rotary(qk, cos, sin, interleaved=True)
    ref = brute_force_lsh(rotated, v, buckets, 4, 2, False)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(causal=True, allow_duplicate_attention=False),  # section 4.2: crashed in half precision
        dict(attend_across_buckets=False, rehash_each_round=True, drop_for_hash_rate=0.1),
        dict(rehash_each_round=False, random_rotations_per_head=True, dropout=0.1, return_attn=True),
    ],
)
def test_half_precision_runs_every_option(dtype, kw):
    attn = LSHAttention(bucket_size=4, n_hashes=2, **kw)
    qk = torch.randn(2, 30, 8, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 30, 8, dtype=dtype, requires_grad=True)
    out, _, _ = attn(qk, v, input_mask=torch.rand(2, 30) > 0.1)
    out.float().sum().backward()
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert torch.isfinite(qk.grad).all() and torch.isfinite(v.grad).all()


def test_core_bad_arguments():
    with pytest.raises(ValueError, match="bucket_size"):
        LSHAttention(bucket_size=0)
    with pytest.raises(ValueError, match="n_hashes"):
        LSHAttention(n_hashes=-1)
    with pytest.raises(ValueError, match="dropout"):
        LSHAttention(dropout=1.0)
    with pytest.raises(ValueError, match="allow_duplicate_attention"):
        LSHAttention(rehash_each_round=False, allow_duplicate_attention=False)
    attn = LSHAttention(bucket_size=4)
    with pytest.raises(ValueError, match="input_mask"):
        attn(torch.randn(2, 16, 4), torch.randn(2, 16, 4), input_mask=torch.ones(3, 16, dtype=torch.bool))
    with pytest.raises(TypeError, match="unexpected"):
        attn(torch.randn(2, 16, 4), torch.randn(2, 16, 4), bogus=1)


# ----------------------------------------------------------------------------------------------------------
# the multi-head layer


def _reformer():
    rp = pytest.importorskip("reformer_pytorch")
    return rp


def _copy_from_reformer(ours: LSHSelfAttention, theirs) -> None:
    with torch.no_grad():
        ours.toqk.weight.copy_(theirs.toqk.weight)
        ours.tov.weight.copy_(theirs.tov.weight)
        ours.to_out.weight.copy_(theirs.to_out.weight)
        ours.to_out.bias.copy_(theirs.to_out.bias)
        if theirs.mem_kv is not None:
            ours.mem_kv.copy_(theirs.mem_kv)


@pytest.mark.parametrize(
    "kw",
    [
        dict(causal=False),
        dict(causal=True, num_mem_kv=3),
        dict(causal=True, one_value_head=True),
        dict(causal=False, num_mem_kv=2, n_local_attn_heads=1),
        dict(causal=True, n_local_attn_heads=2),
    ],
)
def test_full_attention_path_matches_reformer_pytorch(kw):
    rp = _reformer()
    torch.manual_seed(0)
    theirs = rp.LSHSelfAttention(dim=32, heads=4, bucket_size=8, use_full_attn=True, **kw).eval()
    ours = LSHSelfAttention(dim=32, heads=4, bucket_size=8, use_full_attn=True, **kw).eval()
    _copy_from_reformer(ours, theirs)
    x, keys = torch.randn(2, 32, 32), torch.randn(2, 5, 32)
    mask = torch.ones(2, 32, dtype=torch.bool)
    mask[0, 20:] = False
    cmask = torch.tensor([[True] * 5, [True, True, False, True, True]])
    if kw.get("n_local_attn_heads"):  # local heads see no context or masks in the original
        keys = cmask = mask = None
    with torch.no_grad():
        expected = theirs(x, keys=keys, input_mask=mask, context_mask=cmask)
        got = ours(x, keys=keys, input_mask=mask, context_mask=cmask)
    rows = torch.ones(2, 32, dtype=torch.bool) if mask is None else mask  # masked queries: unspecified
    torch.testing.assert_close(got[rows], expected[rows], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_lsh_path_matches_reformer_pytorch_with_the_same_rotations(causal):
    # one round: reformer-pytorch's cross-round look-back does not arise, so bucketing, sorting, chunking,
    # masks and merging must agree exactly given the same random rotations
    rp = _reformer()
    torch.manual_seed(1)
    theirs = rp.LSHSelfAttention(dim=32, heads=2, bucket_size=8, n_hashes=1, causal=causal).eval()
    ours = LSHSelfAttention(dim=32, heads=2, bucket_size=8, n_hashes=1, causal=causal).eval()
    _copy_from_reformer(ours, theirs)
    x = torch.randn(2, 64, 32)
    rot = ours.lsh_attn._rotations(4, 16, 8, x.device)  # (1, dim_head, n_hashes, n_buckets / 2)
    with torch.no_grad(), mock.patch("torch.randn", return_value=rot):
        expected = theirs(x)
    with torch.no_grad():
        got = ours(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _layer_with_dense_reference(x, layer, rotary, causal):
    b, t, _ = x.shape
    qk = layer.toqk(x).view(b, t, layer.heads, -1).transpose(1, 2).reshape(b * layer.heads, t, -1)
    v = layer.tov(x).view(b, t, layer.heads, -1).transpose(1, 2).reshape(b * layer.heads, t, -1)
    if rotary is not None:
        qk = apply_rotary(qk, rotary.cos, rotary.sin, rotary.interleaved)
    o = full_shared_qk(qk, v, causal).view(b, layer.heads, t, -1).transpose(1, 2).reshape(b, t, -1)
    return layer.to_out(o)


def test_full_attention_fallback_keeps_positions():
    # reformer-pytorch section 4.6: the full-attention path dropped rotary positions
    torch.manual_seed(2)
    layer = LSHSelfAttention(dim=16, heads=2, bucket_size=8, full_attn_thres=64, causal=True).eval()
    x = torch.randn(1, 20, 16)
    rot = RotaryEmbedding(dim_head=8)(torch.arange(20))
    with torch.no_grad():
        torch.testing.assert_close(layer(x, rotary=rot), _layer_with_dense_reference(x, layer, rot, True))


@pytest.mark.parametrize(
    "kw",
    [dict(use_full_attn=True), dict(n_local_attn_heads=1, use_full_attn=True), dict(seed=0, n_hashes=2)],
)
def test_every_path_sees_positions(kw):
    # non-causal shared-QK attention without positions is permutation-equivariant on the full and local
    # paths; with rotary it must not be
    torch.manual_seed(3)
    layer = LSHSelfAttention(dim=16, heads=2, bucket_size=4, causal=False, **kw).eval()
    x = torch.randn(1, 16, 16)
    perm = torch.randperm(16)
    rot = RotaryEmbedding(dim_head=8)(torch.arange(16))
    with torch.no_grad():
        if "seed" not in kw and not kw.get("n_local_attn_heads"):
            torch.testing.assert_close(layer(x[:, perm]), layer(x)[:, perm])
        moved = (layer(x[:, perm], rotary=rot) - layer(x, rotary=rot)[:, perm]).abs().max()
    assert moved > 1e-3
    if kw.get("n_local_attn_heads"):  # the local head alone must also depend on positions
        lqk = torch.randn(1, 16, 8)
        from anydepth.nn.lsh import _local_attend

        args = dict(window=4, causal=False, dropout=0.0, training=False)
        ones = torch.ones(1, 16, dtype=torch.bool)
        plain = _local_attend(lqk, lqk, ones, rotary=None, **args)
        rotated = _local_attend(lqk, lqk, ones, rotary=RotaryEmbedding(dim_head=8)(torch.arange(16)), **args)
        assert (plain - rotated).abs().max() > 1e-3


def test_attn_chunks_and_one_value_head_do_not_change_results():
    torch.manual_seed(4)
    a = LSHSelfAttention(dim=32, heads=4, bucket_size=4, n_hashes=2, causal=True, attn_chunks=1).eval()
    b = LSHSelfAttention(dim=32, heads=4, bucket_size=4, n_hashes=2, causal=True, attn_chunks=3).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 30, 32)
    mask = torch.rand(2, 30, 30) > 0.3
    with torch.no_grad():
        torch.testing.assert_close(a(x, input_attn_mask=mask), b(x, input_attn_mask=mask), rtol=0, atol=0)


def test_cached_decoding_equals_recomputing_the_prefix():
    torch.manual_seed(5)
    layer = LSHSelfAttention(dim=16, heads=2, bucket_size=4, n_hashes=2, causal=True, num_mem_kv=2).eval()
    x = torch.randn(1, 23, 16)
    rot = RotaryEmbedding(dim_head=8)(torch.arange(23))
    cache: dict = {}
    with torch.no_grad():
        first = layer(x[:, :17], rotary=type(rot)(rot.cos[:17], rot.sin[:17]), cache=cache)
        torch.testing.assert_close(first, layer(x[:, :17], rotary=type(rot)(rot.cos[:17], rot.sin[:17])))
        for i in range(17, 23):
            step = layer(x[:, i : i + 1], rotary=type(rot)(rot.cos[i : i + 1], rot.sin[i : i + 1]), cache=cache)
            prefix = layer(x[:, : i + 1], rotary=type(rot)(rot.cos[: i + 1], rot.sin[: i + 1]))
            torch.testing.assert_close(step, prefix[:, -1:])


def test_cached_decoding_refuses_an_attention_mask_it_could_not_apply():
    layer = ATTENTIONS.build(ATTENTIONS.config("lsh", bucket_size=4, n_hashes=2), dim=16, heads=2,
                             causal=True).eval()
    x = torch.randn(1, 9, 16)
    cache: dict = {}
    with torch.no_grad():
        layer(x[:, :8], cache=cache)
        with pytest.raises(ValueError, match="attn_mask cannot be combined with cache="):
            layer(x[:, 8:], attn_mask=torch.ones(1, 9, 9, dtype=torch.bool), cache=cache)
        assert layer(x[:, 8:], cache=cache).shape == (1, 1, 16)  # the cache is still usable


DECODE_CONFIGS = [
    dict(n_hashes=2),
    dict(n_hashes=1, causal=False),
    dict(n_hashes=3, attend_across_buckets=False),
    dict(n_hashes=3, allow_duplicate_attention=False),
    dict(n_hashes=3, allow_duplicate_attention=False, attend_across_buckets=False),
    dict(n_hashes=3, rehash_each_round=False),
    dict(n_hashes=2, num_mem_kv=3, n_local_attn_heads=1),
    dict(n_hashes=2, one_value_head=True, random_rotations_per_head=True),
    dict(n_hashes=2, full_attn_thres=10),
    dict(n_hashes=2, use_full_attn=True),
    dict(n_hashes=2, factor_above=4),  # product hashes: 6 and more buckets
]


@pytest.mark.parametrize("kw", DECODE_CONFIGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("rotary", [False, True])
def test_incremental_decoding_equals_the_full_forwards_last_position(kw, rotary):
    """Token by token from 3 to 44 positions (bucket count 2 -> 12, so the cached keys are rehashed five times,
    and full attention below bucket_size + 1 positions): the one-token step equals the last position of
    an uncached forward over the same inputs, and the layer is not recomputed."""
    kw = dict(kw)
    factor_above = kw.pop("factor_above", None)
    torch.manual_seed(6)
    layer = LSHSelfAttention(dim=24, heads=3, bucket_size=4, **{"causal": True, **kw}).double().eval()
    if factor_above is not None:
        layer.lsh_attn.FACTOR_ABOVE = factor_above
    n = 44
    x = torch.randn(2, n, 24, dtype=torch.float64)
    table = RotaryEmbedding(dim_head=8)(torch.arange(n)) if rotary else None

    def rot(a, b):
        return None if table is None else type(table)(table.cos[a:b].double(), table.sin[a:b].double())

    cache: dict = {}
    counts = set()
    with torch.no_grad():
        layer(x[:, :3], rotary=rot(0, 3), cache=cache)
        with mock.patch.object(LSHSelfAttention, "_forward", side_effect=AssertionError("recomputed")):
            steps = []
            for i in range(3, n):
                steps.append(layer(x[:, i : i + 1], rotary=rot(i, i + 1), cache=cache))
                counts.add(cache["decode"].get("hashed"))
        for i, step in zip(range(3, n), steps, strict=True):
            torch.testing.assert_close(step, layer(x[:, : i + 1], rotary=rot(0, i + 1))[:, -1:], rtol=1e-9, atol=1e-9)
    if not (layer.use_full_attn or kw.get("full_attn_thres")):
        assert len(counts - {None}) >= 5  # every bucket count was met, each after a rehash


@pytest.mark.parametrize(
    "kw",
    [
        dict(n_hashes=2, full_attn_thres=24),
        dict(n_hashes=3, num_mem_kv=2, n_local_attn_heads=1),
        dict(n_hashes=2, num_mem_kv=1, context=True),
    ],
    ids=["full-then-lsh", "memory-and-local-heads", "context"],
)
def test_decoding_with_masks_and_context_and_falling_back(kw):
    """Masked cached keys (and context keys) are excluded, and re-sorted when an earlier position's flag
    changes; a step whose new token is masked, or whose context differs from the previous call's,
    recomputes the layer and drops the incremental state, which the next step rebuilds. Every step equals
    the uncached forward's last position under the same masks and context."""
    kw = dict(kw)
    with_context = kw.pop("context", False)
    torch.manual_seed(7)
    layer = LSHSelfAttention(dim=24, heads=3, bucket_size=4, causal=True, **kw).double().eval()
    n = 34
    x = torch.randn(2, n, 24, dtype=torch.float64)
    mask = torch.rand(2, n, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[:, 12:] = True
    ctx = {}
    if with_context:
        ctx = dict(context=torch.randn(2, 7, 24, dtype=torch.float64), context_mask=torch.rand(2, 7) > 0.3)
    cache: dict = {}
    with torch.no_grad():
        layer(x[:, :12], mask=mask[:, :12], cache=cache, **ctx)
        for i in range(12, n):
            if i == 20:
                mask[0, 3] = ~mask[0, 3]  # an earlier position changes its flag
            if i in (16, 27):
                mask[1, i] = False  # the new token itself is masked in one row
            if with_context and i == 23:
                ctx["context"] = ctx["context"] + 1
            m = mask[:, : i + 1]
            step = layer(x[:, i : i + 1], mask=m, cache=cache, **ctx)
            assert ("decode" in cache) == (bool(m[:, -1].all()) and not (with_context and i == 23))
            torch.testing.assert_close(step, layer(x[:, : i + 1], mask=m, **ctx)[:, -1:], rtol=1e-9, atol=1e-9)
        layer.fast_decoding = False
        cache = {}
        layer(x[:, :5], cache=cache, **ctx)
        layer(x[:, 5:6], cache=cache, **ctx)
        assert "decode" not in cache


def _lsh_lm(depth: int, position: str):
    from anydepth import ModelConfig, build_model

    torch.manual_seed(8)
    cfg = ModelConfig(
        vocab_size=32,
        dim=16,
        depth=depth,
        heads=2,
        max_seq_len=64,
        position=position,
        attention=ATTENTIONS.config("lsh", bucket_size=4, n_hashes=2),
    )
    return build_model(cfg).eval()


def _greedy(model, prompt, fast: bool, use_cache: bool = True):
    for m in model.modules():
        if isinstance(m, LSHSelfAttention):
            m.fast_decoding = fast
    return model.generate(prompt, 36, temperature=0, use_cache=use_cache)


@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_greedy_generation_with_the_incremental_path_gives_the_recompute_paths_tokens(position):
    """Two LSH layers, greedy, fixed (eval) hashing, 5 -> 41 tokens: the incremental path's tokens equal the
    recompute path's token for token; with one LSH layer both also equal uncached decoding."""
    prompt = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(0))
    model = _lsh_lm(2, position)
    fast = _greedy(model, prompt, True)
    assert torch.equal(fast, _greedy(model, prompt, False))
    assert fast.shape == (2, 41)
    one = _lsh_lm(1, position)
    fast = _greedy(one, prompt, True)
    assert torch.equal(fast, _greedy(one, prompt, False))
    assert torch.equal(fast, _greedy(one, prompt, True, use_cache=False))


def test_registered_kind_and_reset_parameters():
    from anydepth.nn.context import LayerContext
    from anydepth.registry import config_from_dict, config_to_dict

    cfg = ATTENTIONS.config("lsh", bucket_size=16, n_hashes=2, num_mem_kv=4, seed=3)
    assert config_from_dict(config_to_dict(cfg), ATTENTIONS) == cfg
    layer = ATTENTIONS.build(cfg, dim=256, heads=4, dim_head=64, causal=True, ctx=LayerContext(layer=2))
    assert isinstance(layer, lsh.LSHSelfAttention) and layer.causal and layer.bucket_size == 16
    assert layer.lsh_attn.seed == 3 + LayerContext(layer=2).index  # distinct rotations per layer
    layer.reset_parameters(beta=0.5)
    xavier = math.sqrt(2.0 / (256 + 256))
    assert abs(layer.toqk.weight.std().item() / xavier - 1.0) < 0.05
    assert abs(layer.to_out.weight.std().item() / (0.5 * xavier) - 1.0) < 0.05
    assert abs(layer.tov.weight.std().item() / (0.5 * xavier) - 1.0) < 0.05
    assert torch.all(layer.to_out.bias == 0)
    with pytest.raises(ValueError, match="cross-attention"):
        ATTENTIONS.build("lsh", dim=32, heads=4, dim_head=8, causal=True, ctx=None, cross=True)
    out = layer(torch.randn(1, 40, 256), mask=torch.ones(1, 40, dtype=torch.bool))
    assert out.shape == (1, 40, 256)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layer_half_precision_every_option(dtype):
    torch.manual_seed(6)
    for kw in (
        dict(num_mem_kv=2, n_local_attn_heads=1, one_value_head=True, post_attn_dropout=0.1, dropout=0.1),
        dict(allow_duplicate_attention=False, attend_across_buckets=False, attn_chunks=2),
        dict(rehash_each_round=False, random_rotations_per_head=True, drop_for_hash_rate=0.2),
        dict(use_full_attn=True, return_attn=True),
    ):
        layer = LSHSelfAttention(dim=16, heads=2, bucket_size=4, n_hashes=2, causal=True, **kw).to(dtype)
        x = torch.randn(2, 21, 16, dtype=dtype, requires_grad=True)
        keys = torch.randn(2, 3, 16, dtype=dtype)
        rot = RotaryEmbedding(dim_head=8)(torch.arange(21))
        out = layer(x, keys=keys, input_mask=torch.rand(2, 21) > 0.1, rotary=rot)
        out.float().sum().backward()
        assert out.dtype == dtype and torch.isfinite(out).all() and torch.isfinite(x.grad).all(), kw


def test_layer_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="heads"):
        LSHSelfAttention(dim=30, heads=4)
    with pytest.raises(ValueError, match="n_local_attn_heads"):
        LSHSelfAttention(dim=32, heads=4, n_local_attn_heads=4)
    with pytest.raises(ValueError, match="bucket_size"):
        LSHSelfAttention(dim=32, heads=4, bucket_size=0)
    with pytest.raises(ValueError, match="n_hashes"):
        LSHSelfAttention(dim=32, heads=4, n_hashes=0)
    layer = LSHSelfAttention(dim=32, heads=4, bucket_size=4)
    x = torch.randn(2, 16, 32)
    with pytest.raises(ValueError, match="input_mask"):
        layer(x, input_mask=torch.ones(2, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="context_mask"):
        layer(x, keys=torch.randn(2, 3, 32), context_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="keys"):
        layer(x, keys=torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match="input_attn_mask"):
        layer(x, input_attn_mask=torch.ones(2, 16, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="x must be"):
        layer(torch.randn(2, 16, 8))
    with pytest.raises(ValueError, match="only one"):
        layer(x, mask=torch.ones(2, 16, dtype=torch.bool), input_mask=torch.ones(2, 16, dtype=torch.bool))


def test_reversible_gradients_equal_plain_autograd_with_chunks_dropout_masks_memory_and_context():
    # reformer-pytorch section 4.3: with attn_chunks > 1 the reversible backward reused the last chunk's
    # buckets for every chunk (about 1 % gradient error); here the hash replays from the recorded RNG state
    from anydepth.nn.reversible import reversible_apply

    torch.manual_seed(7)
    dim = 16
    attn = LSHSelfAttention(
        dim, heads=2, bucket_size=4, n_hashes=2, causal=True, attn_chunks=3, dropout=0.2, num_mem_kv=2
    ).double()
    ff = torch.nn.Sequential(torch.nn.Linear(dim, 32), torch.nn.GELU(), torch.nn.Dropout(0.1), torch.nn.Linear(32, dim))
    ff = ff.double()
    x = torch.randn(2, 22, dim, dtype=torch.float64)
    keys = torch.randn(2, 5, dim, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 22) > 0.2
    cmask = torch.rand(2, 5) > 0.3
    f = lambda h: attn(h, keys=keys, input_mask=mask, context_mask=cmask)  # noqa: E731
    g = lambda h: ff(h)  # noqa: E731
    params = list(attn.parameters()) + list(ff.parameters())

    def run(reversible: bool):
        for p in params + [keys]:
            p.grad = None
        torch.manual_seed(11)
        if reversible:
            y1, y2 = reversible_apply(x, x, [f, f], [g, g], params, extra=[keys])
        else:
            y1, y2 = x, x
            for _ in range(2):
                y1 = y1 + f(y2)
                y2 = y2 + g(y1)
        ((y1 + y2) ** 2).sum().backward()
        return [p.grad.clone() for p in params + [keys]]

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


# ----------------------------------------------------------------------------------------------------------
# every accepted configuration at every length


def _sweep_configs():
    """Each hashing option with few and many rounds (more rounds than a short input has buckets), the other
    options alternating so that every value meets both hashing modes."""
    out = []
    for i, (n_hashes, rehash) in enumerate((h, r) for h in (1, 3, 8) for r in (True, False)):
        for j in range(2):
            k = 2 * i + j
            out.append(
                dict(
                    n_hashes=n_hashes,
                    rehash_each_round=rehash,
                    allow_duplicate_attention=not rehash or bool(j),
                    attend_across_buckets=bool((k // 2) % 2),
                    n_local_attn_heads=k % 2,
                    num_mem_kv=2 * ((k // 3) % 2),
                    dropout=0.1 if k % 5 == 0 else 0.0,
                )
            )
    return out


@pytest.mark.parametrize("fields", _sweep_configs(), ids=lambda f: "-".join(f"{v}" for v in f.values()))
@pytest.mark.parametrize("causal", [True, False])
def test_every_accepted_configuration_runs_at_every_length_up_to_four_buckets(fields, causal):
    bs = 4
    cfg = ATTENTIONS.config("lsh", bucket_size=bs, **fields)
    layer = ATTENTIONS.build(cfg, dim=8, heads=2, causal=causal)
    full = ATTENTIONS.build(
        ATTENTIONS.config("lsh", bucket_size=bs, **{**fields, "use_full_attn": True}), dim=8, heads=2, causal=causal
    )
    full.load_state_dict(layer.state_dict())
    torch.manual_seed(0)
    for n in range(1, 4 * bs + 1):
        layer.train(n % 2 == 0)
        x = torch.randn(1, n, 8, requires_grad=True)
        y = layer(x)
        y.sum().backward()
        assert y.shape == x.shape and torch.isfinite(y).all() and torch.isfinite(x.grad).all(), n
        if bs < n <= 2 * bs - fields["num_mem_kv"] and fields["attend_across_buckets"] and not layer.training:
            # two chunks: every round's window holds every key, so LSH heads are exactly full attention
            with torch.no_grad():
                torch.testing.assert_close(y, full.eval()(x), atol=1e-5, rtol=1e-5)


def test_configuration_without_a_meaning_is_rejected_with_the_config():
    with pytest.raises(ValueError, match="rehash_each_round=False with allow_duplicate_attention=False"):
        cfg = ATTENTIONS.config("lsh", bucket_size=4, rehash_each_round=False, allow_duplicate_attention=False)
        ATTENTIONS.build(cfg, dim=8, heads=2, causal=True)


def test_one_rotation_with_more_rounds_than_buckets_runs_at_short_lengths():
    # 17 to 32 tokens with bucket_size=16 give two chunks, i.e. two buckets, for four rounds
    torch.manual_seed(1)
    layer = LSHSelfAttention(dim=8, heads=2, bucket_size=16, n_hashes=4, causal=True, rehash_each_round=False)
    ref = LSHSelfAttention(dim=8, heads=2, bucket_size=16, causal=True, use_full_attn=True)
    ref.load_state_dict(layer.state_dict())
    layer.eval()
    with torch.no_grad():
        for n in range(1, 65):
            x = torch.randn(2, n, 8)
            y = layer(x)
            assert torch.isfinite(y).all(), n
            if n <= 32:  # at most two chunks: exactly full shared-QK attention
                torch.testing.assert_close(y, ref(x), atol=1e-5, rtol=1e-5)
        assert layer.lsh_attn.hash_vectors(4, torch.randn(1, 32, 4)).unique().numel() <= 4


def test_many_buckets_hash_as_a_product_of_two_angular_hashes():
    attn = LSHAttention(bucket_size=4, n_hashes=2, seed=7)
    attn.FACTOR_ABOVE = 8
    assert attn.bucket_factors(8) is None and attn.bucket_factors(30) == (6, 6) and attn.bucket_count(40) == 48
    x = torch.randn(2, 40, 6)
    gen = torch.Generator().manual_seed(7)
    rot = torch.randn((1, 6, 2, 3 + 3), generator=gen)  # (shared, d, rounds, b1 / 2 + b2 / 2)
    proj = torch.einsum("btd,drk->brtk", x, rot[0])
    h1 = torch.cat((proj[..., :3], -proj[..., :3]), -1).argmax(-1)
    h2 = torch.cat((proj[..., 3:], -proj[..., 3:]), -1).argmax(-1)
    assert torch.equal(attn.hash_vectors(30, x), h1 * 6 + h2)
    # in the layer: brute force over the same buckets, with the product's bucket count
    qk, v = torch.randn(2, 120, 6, dtype=torch.float64), torch.randn(2, 120, 5, dtype=torch.float64)
    attn.eval()
    out, _, buckets = attn(qk, v)
    assert buckets.max() < 2 * 36 and buckets.view(2, 2, 120)[:, 1].min() >= 36  # round offsets of 6 x 6
    ref = brute_force_lsh(qk, v, buckets.view(2, 2, 120) % 36, 4, 2, causal=False)
    torch.testing.assert_close(out, ref)


def test_library_kind_has_one_call_style_and_the_seed_class_translates_to_it():
    # reformer-pytorch's defaults (n_hashes=8) live in the compat class; the lsh kind's own (4) in its Config
    assert LSHSelfAttention(dim=16, heads=2).lsh_attn.n_hashes == 8
    assert lsh.LSHSelfAttention(dim=16, heads=2).lsh_attn.n_hashes == lsh.LSHSelfAttention.Config().n_hashes == 4
    assert LSHAttention().n_hashes == 8 and lsh.LSHAttention().n_hashes == 4
    torch.manual_seed(0)
    seed = LSHSelfAttention(dim=16, heads=2, bucket_size=4, n_hashes=2, causal=True, num_mem_kv=1).eval()
    ours = lsh.LSHSelfAttention.make(dim=16, heads=2, bucket_size=4, n_hashes=2, causal=True, num_mem_kv=1).eval()
    ours.load_state_dict(seed.state_dict())
    x, keys = torch.randn(2, 13, 16), torch.randn(2, 3, 16)
    mask = torch.rand(2, 13) > 0.2
    torch.testing.assert_close(seed(x, keys=keys, input_mask=mask), ours(x, context=keys, mask=mask), rtol=0, atol=0)
    with pytest.raises(TypeError, match="input_mask.*compat.reformer.LSHSelfAttention"):
        ours(x, input_mask=mask)
    with pytest.raises(TypeError):
        ours(x, keys)  # the library's keywords only
