"""Attention kinds against ``softmax(Q K^T / sqrt(d) + mask) V`` written out here, with the same weights."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from anydepth.nn.attention import FullAttention, LocalAttention
from anydepth.registry import ATTENTIONS, POSITIONS

F64 = torch.float64
DIM, HEADS, DH = 12, 3, 4


def build(kind="full", *, causal=False, cross=False, dim=DIM, heads=HEADS, dim_head=DH, **fields):
    torch.manual_seed(0)
    attn = ATTENTIONS.build(
        ATTENTIONS.config(kind, **fields),
        dim=dim,
        heads=heads,
        dim_head=dim_head,
        causal=causal,
        ctx=None,
        cross=cross,
    ).double()
    with torch.no_grad():  # non-zero biases, so that the formula must place them right
        for name, p in attn.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    return attn.eval()


# ----------------------------------------------------------------------------- the formula, by hand


def rotate_half_split(t, positions, base=10000.0):
    """Half-split rotary as complex multiplication: (x_i + i x_{i+d/2}) * exp(i p base^(-2i/d))."""
    d = t.shape[-1]
    w = base ** (-torch.arange(d // 2, dtype=F64) * 2 / d)
    z = torch.complex(t[..., : d // 2], t[..., d // 2 :]) * torch.polar(
        torch.ones_like(w), positions.to(F64)[:, None] * w
    )
    return torch.cat((z.real, z.imag), dim=-1)


def reference(attn, x, *, context=None, allowed=None, positions=None):
    """``softmax(q k^T / sqrt(d), masked by allowed) v`` with memory first; empty rows -> 0."""
    h, d, hv = attn.heads, attn.dim_head, attn.value_heads
    if attn.cross:
        wq, bq = attn.to_q.weight, attn.to_q.bias
        wk, wv = attn.to_kv.weight.split([h * d, hv * d])
        bk, bv = attn.to_kv.bias.split([h * d, hv * d]) if attn.to_kv.bias is not None else (None, None)
    else:
        wq, wk, wv = attn.to_qkv.weight.split([h * d, h * d, hv * d])
        b3 = attn.to_qkv.bias.split([h * d, h * d, hv * d]) if attn.to_qkv.bias is not None else (None,) * 3
        bq, bk, bv = b3
    src = x if context is None else context
    b, n, m = x.shape[0], x.shape[1], src.shape[1]

    def proj(t, w, bias, heads):
        y = t @ w.T + (0 if bias is None else bias)
        return y.view(b, t.shape[1], heads, d).transpose(1, 2)

    q, k, v = proj(x, wq, bq, h), proj(src, wk, bk, h), proj(src, wv, bv, hv).expand(b, h, m, d)
    if positions is not None:
        q, k = rotate_half_split(q, positions), rotate_half_split(k, positions)
    if allowed is None:
        allowed = torch.ones(n, m, dtype=torch.bool)
    allowed = allowed.expand(b, h, n, m) if allowed.dim() < 4 else allowed.expand(b, h, n, m)
    if attn.num_mem_kv:
        mm = attn.num_mem_kv
        k = torch.cat((attn.mem_k.expand(b, h, mm, d), k), dim=2)
        v = torch.cat((attn.mem_v.expand(b, h, mm, d), v), dim=2)
        allowed = torch.cat((torch.ones(b, h, n, mm, dtype=torch.bool), allowed), dim=-1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    scores = scores.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no key: zeros, as the layer promises
    out = (p @ v).transpose(1, 2).reshape(b, n, h * d)
    return out @ attn.to_out.weight.T + (0 if attn.to_out.bias is None else attn.to_out.bias)


def tril(n):
    return torch.ones(n, n, dtype=torch.bool).tril()


def padding(b, n):
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, -2:] = False
    mask[0, :1] = False
    return mask


# ------------------------------------------------------------------------------ full attention


@pytest.mark.parametrize(
    "case",
    ["plain", "causal", "padding", "padding_causal", "bool_mask", "bool_mask_2d", "mem", "one_value", "rotary"],
)
def test_full_self_attention_matches_formula(case):
    causal = case in ("causal", "padding_causal", "mem", "rotary")
    fields = {"qkv_bias": True}
    if case == "mem":
        fields["num_mem_kv"] = 3
    if case == "one_value":
        fields["one_value_head"] = True
    attn = build(causal=causal, **fields)
    b, n = 2, 6
    torch.manual_seed(1)
    x = torch.randn(b, n, DIM, dtype=F64)
    kwargs, allowed, positions = {}, None, None
    if causal:
        allowed = tril(n)
    if case in ("padding", "padding_causal", "mem"):
        kwargs["mask"] = padding(b, n)
        key = kwargs["mask"][:, None, None, :]
        allowed = key if allowed is None else allowed & key
    if case == "bool_mask":
        kwargs["attn_mask"] = torch.rand(b, n, n) > 0.4
        allowed = kwargs["attn_mask"][:, None]
    if case == "bool_mask_2d":  # one (n, n) mask shared by the batch
        kwargs["attn_mask"] = torch.randn(n, n, dtype=F64) > -0.5
        allowed = kwargs["attn_mask"]
    if case == "rotary":
        positions = torch.arange(n) + 5
        kwargs["rotary"] = POSITIONS.build("rotary", dim=DIM, dim_head=DH, max_seq_len=64).double()(positions)
    out = attn(x, **kwargs)
    expected = reference(attn, x, allowed=allowed, positions=positions)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    if case == "one_value":
        assert attn.to_qkv.weight.shape == (2 * HEADS * DH + DH, DIM)


def test_four_dimensional_attn_mask_and_bool_plus_padding():
    attn = build(causal=True)
    b, n = 2, 5
    x = torch.randn(b, n, DIM, dtype=F64)
    am = torch.rand(b, HEADS, n, n) > 0.3
    out = attn(x, attn_mask=am, mask=padding(b, n))
    allowed = tril(n) & am & padding(b, n)[:, None, None, :]
    torch.testing.assert_close(out, reference(attn, x, allowed=allowed), rtol=1e-10, atol=1e-10)


def test_fully_masked_rows_give_zeros_not_nan():
    attn = build(causal=False)
    x = torch.randn(2, 4, DIM, dtype=F64, requires_grad=True)
    am = torch.ones(4, 4, dtype=torch.bool)
    am[2] = False  # query 2 may attend to nothing
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1] = False  # the second sequence has no real key at all
    out = attn(x, attn_mask=am, mask=mask)
    assert torch.isfinite(out).all()
    # an empty row's heads output zeros, so the layer outputs the output projection's bias
    torch.testing.assert_close(out[0, 2], attn.to_out.bias, rtol=0, atol=0)
    torch.testing.assert_close(out[1], attn.to_out.bias.expand(4, DIM), rtol=0, atol=0)
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in attn.parameters() if p.grad is not None)
    assert torch.isfinite(x.grad).all()
    # with a 2-D mask whose row 1 is all False, too
    fm = torch.ones(4, 4, dtype=torch.bool)
    fm[1] = False
    torch.testing.assert_close(attn(x, attn_mask=fm)[:, 1], attn.to_out.bias.expand(2, DIM), rtol=0, atol=0)


def test_cross_attention_matches_formula():
    attn = build(cross=True, causal=True, qkv_bias=True, num_mem_kv=2, one_value_head=True)
    b, n, m = 2, 3, 5
    x, ctx = torch.randn(b, n, DIM, dtype=F64), torch.randn(b, m, DIM, dtype=F64)
    cmask = padding(b, m)
    out = attn(x, context=ctx, context_mask=cmask)
    # never causal: every query sees every real context key (and the memory)
    expected = reference(attn, x, context=ctx, allowed=cmask[:, None, None, :])
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert not attn.causal


def test_attention_dropout_and_output_dropout():
    x = torch.randn(2, 8, DIM, dtype=F64)
    attn = build(post_dropout=0.5)
    clean = attn(x)
    torch.testing.assert_close(clean, reference(attn, x), rtol=1e-10, atol=1e-10)  # eval: no dropout
    attn.train()
    torch.manual_seed(3)
    noisy = attn(x)
    dropped = noisy == 0
    assert dropped.any() and (~dropped).any()
    torch.testing.assert_close(noisy[~dropped], 2 * clean[~dropped], rtol=1e-12, atol=1e-12)
    attn = build(dropout=0.5)
    clean = attn(x)
    attn.train()
    assert not torch.allclose(attn(x), clean)


# --------------------------------------------------------------------------------- local attention


def band(n, window, causal):
    rel = torch.arange(n)[:, None] - torch.arange(n)[None, :]
    return (rel >= 0) & (rel < window) if causal else rel.abs() < window


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window,n", [(1, 5), (3, 7), (3, 9), (4, 8), (6, 4)])
@pytest.mark.parametrize("extra", ["none", "padding_mem", "bool_mask", "bool_mask_2d"])
def test_local_equals_full_with_band_mask(causal, window, n, extra):
    fields = {"num_mem_kv": 2} if extra == "padding_mem" else {}
    local = build("local", causal=causal, window=window, **fields)
    full = build("full", causal=causal, **fields)
    full.load_state_dict(local.state_dict())
    b = 2
    x = torch.randn(b, n, DIM, dtype=F64)
    kw_local, kw_full = {}, {"attn_mask": band(n, window, causal)}
    if extra == "padding_mem":
        kw_local["mask"] = kw_full["mask"] = padding(b, n)
    if extra == "bool_mask":
        am = torch.rand(b, n, n) > 0.3
        kw_local["attn_mask"], kw_full["attn_mask"] = am, am & kw_full["attn_mask"]
    if extra == "bool_mask_2d":  # one (n, n) mask shared by the batch
        am = torch.randn(n, n, dtype=F64) > -0.5
        kw_local["attn_mask"], kw_full["attn_mask"] = am, am & kw_full["attn_mask"]
    torch.testing.assert_close(local(x, **kw_local), full(x, **kw_full), rtol=1e-10, atol=1e-10)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("causal", [True, False])
def test_local_attention_memory_is_linear_in_length(causal):
    attn = build("local", causal=causal, window=4, dim=8, heads=2, dim_head=4)
    sizes = {}
    for n in (128, 256):
        x = torch.randn(1, n, 8, dtype=F64)
        with torch.no_grad(), _LargestTensor() as mode:
            attn(x)
        sizes[n] = mode.largest
    assert sizes[256] == 2 * sizes[128]  # O(n * window): doubling n doubles the largest tensor
    assert sizes[256] < 2 * 256 * 256 / 8  # far below the (heads, n, n) score matrix


# ------------------------------------------------------------------------------------ KV cache


@pytest.mark.parametrize("kind", ["full", "local"])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("fields", [{}, {"num_mem_kv": 2, "one_value_head": True}])
def test_kv_cache_decoding_equals_full_forward(kind, interleaved, fields):
    extra = {"window": 3} if kind == "local" else {}
    attn = build(kind, causal=True, **extra, **fields)
    rot = POSITIONS.build(
        POSITIONS.config("rotary", interleaved=interleaved), dim=DIM, dim_head=DH, max_seq_len=32
    ).double()
    b, n = 2, 7
    x = torch.randn(b, n, DIM, dtype=F64)
    mask = padding(b, n)
    whole = attn(x, mask=mask, rotary=rot(torch.arange(n)))
    # prefill 3 positions, then 2, then one token at a time, each call with the padding of its new positions
    cache: dict = {}
    steps, start = [], 0
    for size in (3, 2, 1, 1):
        sl = slice(start, start + size)
        steps.append(
            attn(x[:, sl], mask=mask[:, sl], rotary=rot(torch.arange(start, start + size)), cache=cache)
        )
        start += size
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, rtol=1e-10, atol=1e-10)
    assert cache["k"].shape == (b, HEADS, n, DH)
    assert cache["v"].shape[1] == (1 if fields else HEADS)


def test_kv_cache_accepts_the_whole_padding_mask():
    attn = build(causal=True)
    x = torch.randn(2, 4, DIM, dtype=F64)
    mask = padding(2, 4)
    whole = attn(x, mask=mask)
    cache: dict = {}
    steps = [attn(x[:, t : t + 1], mask=mask[:, : t + 1], cache=cache) for t in range(4)]
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, rtol=1e-10, atol=1e-10)


def test_cross_attention_cache_reuses_the_context():
    attn = build(cross=True)
    x, ctx = torch.randn(2, 4, DIM, dtype=F64), torch.randn(2, 5, DIM, dtype=F64)
    cmask = padding(2, 5)
    whole = attn(x, context=ctx, context_mask=cmask)
    cache: dict = {}
    first = attn(x[:, :1], context=ctx, context_mask=cmask, cache=cache)
    rest = [attn(x[:, t : t + 1], cache=cache) for t in range(1, 4)]  # context projected once
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), whole, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------- positions are seen


POSITION_KINDS = {
    "learned": {},
    "sinusoidal": {},
    "axial_sum": {"shape": (2, 4)},
    "axial_concat": {"shape": (2, 4), "combine": "concat"},
    "rotary": {},
}


def _tiny_model(attention_kind, position_kind, fields):
    """Embedding + position + one non-causal attention layer, built by hand."""
    torch.manual_seed(0)
    dim, n = 8, 6
    emb = nn.Embedding(11, dim).double()
    kind = position_kind.split("_")[0]
    pos = POSITIONS.build(POSITIONS.config(kind, **fields), dim=dim, dim_head=4, max_seq_len=8).double()
    extra = (
        {"window": n} if attention_kind == "local" else {}
    )  # a window this wide is blind to order by itself
    attn = ATTENTIONS.build(
        ATTENTIONS.config(attention_kind, **extra), dim=dim, heads=2, dim_head=4, causal=False, ctx=None
    ).double()

    def model(tokens):
        h, rotary, positions = emb(tokens), None, torch.arange(tokens.shape[1])
        if pos.absolute:
            h = h + pos(positions)
        if pos.rotary:
            rotary = pos(positions)
        return attn(h, rotary=rotary)

    return model


@pytest.mark.parametrize("attention_kind", ["full", "local"])
@pytest.mark.parametrize("position_kind", [*POSITION_KINDS, "none"])
def test_permuting_tokens_shows_the_layer_sees_positions(attention_kind, position_kind):
    model = _tiny_model(attention_kind, position_kind, POSITION_KINDS.get(position_kind, {}))
    tokens = torch.tensor([[3, 1, 4, 1, 5, 9], [2, 6, 5, 3, 5, 8]])
    perm = torch.tensor([5, 2, 0, 4, 1, 3])
    moved = (model(tokens[:, perm]) - model(tokens)[:, perm]).abs().max().item()
    if position_kind == "none":
        assert moved < 1e-12  # a position-blind layer only permutes its outputs
    else:
        assert moved > 1e-3


# ----------------------------------------------------------------------------------------- init


@pytest.mark.parametrize("cross", [False, True])
def test_reset_parameters_scales_only_value_and_output(cross):
    attn = build(cross=cross, qkv_bias=True, num_mem_kv=2)
    torch.manual_seed(7)
    attn.reset_parameters()
    ref = {k: v.clone() for k, v in attn.state_dict().items()}
    torch.manual_seed(7)
    attn.reset_parameters(beta=0.5)
    inner = HEADS * DH
    for name, p in attn.state_dict().items():
        if name.endswith("bias"):
            assert not p.any()
            continue
        expected = ref[name].clone()
        if name in ("to_out.weight", "mem_v"):
            expected *= 0.5
        elif name == "to_qkv.weight":
            expected[2 * inner :] *= 0.5
        elif name == "to_kv.weight":
            expected[inner:] *= 0.5
        torch.testing.assert_close(p, expected, rtol=0, atol=1e-15, msg=name)


def test_xavier_std_of_each_fused_part():
    torch.manual_seed(0)
    attn = FullAttention.make(dim=128, heads=4, dim_head=64, one_value_head=True)
    attn.reset_parameters(beta=3.0)
    wq, wk, wv = attn.to_qkv.weight.split([256, 256, 64])
    assert wq.std().item() == pytest.approx(math.sqrt(2 / (128 + 256)), rel=0.03)
    assert wk.std().item() == pytest.approx(math.sqrt(2 / (128 + 256)), rel=0.03)
    assert wv.std().item() == pytest.approx(3.0 * math.sqrt(2 / (128 + 64)), rel=0.05)
    assert attn.to_out.weight.std().item() == pytest.approx(3.0 * math.sqrt(2 / (256 + 128)), rel=0.03)


# ------------------------------------------------------------------------------------ bad input


def test_bad_masks_name_the_argument_and_the_shape():
    attn = build(causal=True)
    x = torch.randn(2, 5, DIM, dtype=F64)
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 5\).*got \(2, 4\)"):
        attn(x, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"mask must be a bool .*dtype torch.int64.*mask.bool\(\)"):
        attn(x, mask=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attn_mask must have shape \(n, k\)=\(5, 5\).*got \(5, 6\)"):
        attn(x, attn_mask=torch.ones(5, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attn_mask must have shape .*got \(3, 5, 5\)"):
        attn(x, attn_mask=torch.ones(3, 5, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"attn_mask must be a bool tensor .*torch.int32.*attn_mask.bool\(\)"):
        attn(x, attn_mask=torch.ones(5, 5, dtype=torch.int32))
    with pytest.raises(TypeError, match="attn_mask must be a bool tensor"):
        attn(x, attn_mask=[[True]])


def test_bad_inputs_and_arguments():
    attn = build()
    with pytest.raises(ValueError, match=r"x must be \(batch, seq, dim=12\), got \(5, 12\)"):
        attn(torch.randn(5, DIM, dtype=F64))
    with pytest.raises(ValueError, match="cross=True"):
        attn(torch.randn(1, 5, DIM, dtype=F64), context=torch.randn(1, 3, DIM, dtype=F64))
    with pytest.raises(ValueError, match=r"rotary .* n=5 .*\(4, 4\)"):
        attn(
            torch.randn(1, 5, DIM, dtype=F64),
            rotary=POSITIONS.build("rotary", dim=1, dim_head=4, max_seq_len=1)(torch.arange(4)),
        )
    with pytest.raises(TypeError, match=r"rotary must be a \(cos, sin\) pair"):
        attn(torch.randn(1, 5, DIM, dtype=F64), rotary=torch.ones(5, 4))
    with pytest.raises(TypeError, match="cache must be a dict"):
        attn(torch.randn(1, 5, DIM, dtype=F64), cache=[])
    cross = build(cross=True)
    with pytest.raises(ValueError, match=r"context of shape \(batch, m, dim=12\), got NoneType"):
        cross(torch.randn(1, 5, DIM, dtype=F64))
    with pytest.raises(ValueError, match=r"context_mask must have shape \(1, 3\)"):
        cross(
            torch.randn(1, 5, DIM, dtype=F64),
            context=torch.randn(1, 3, DIM, dtype=F64),
            context_mask=torch.ones(1, 5, dtype=torch.bool),
        )
    with pytest.raises(ValueError, match="dim=10 is not divisible by heads=3"):
        FullAttention(dim=10, heads=3)
    with pytest.raises(ValueError, match="window must be an int >= 1, got 0"):
        LocalAttention.make(dim=8, heads=2, window=0)
    with pytest.raises(ValueError, match="self-attention only.*'full'"):
        ATTENTIONS.build("local", dim=8, heads=2, dim_head=4, causal=True, ctx=None, cross=True)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.5"):
        FullAttention.make(dim=8, heads=2, dropout=1.5)
    with pytest.raises(TypeError, match="no option"):
        ATTENTIONS.config("full", heads=4)


@pytest.mark.parametrize("kind", ["full", "local"])
def test_compiles_without_graph_breaks(kind):
    """torch.compile traces masks, rotary and memory without breaking the graph (eager backend: fast)."""
    extra = {"window": 3} if kind == "local" else {}
    attn = build(kind, causal=True, num_mem_kv=1, **extra)
    rot = POSITIONS.build(POSITIONS.config("rotary", interleaved=True), dim=DIM, dim_head=DH, max_seq_len=16)
    rot = rot.double()

    def f(x, mask):
        return attn(x, mask=mask, rotary=rot(torch.arange(x.shape[1])))

    x, mask = torch.randn(2, 5, DIM, dtype=F64), padding(2, 5)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, mask), f(x, mask), rtol=0, atol=0)
