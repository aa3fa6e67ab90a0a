"""One input check for the model's forward, its masks and generate: bad input says what and how to fix."""

import math

import pytest
import torch

from anydepth import ModelConfig, build_model
from anydepth.registry import ATTENTIONS
from anydepth.sampling import sample_next

TINY = dict(vocab_size=32, dim=16, depth=1, heads=2, max_seq_len=16)


def model(attention="full"):
    if attention == "lsh":
        attention = ATTENTIONS.config("lsh", bucket_size=4, n_hashes=2)
    elif attention == "local":
        attention = ATTENTIONS.config("local", window=4)
    torch.manual_seed(0)
    return build_model(ModelConfig(**TINY, attention=attention)).eval()


TOKENS = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16])
def test_small_integer_token_dtypes_are_rejected(dtype):
    msg = rf"integer token ids of dtype int64 or int32, got dtype {dtype}; use tokens.long\(\)"
    with pytest.raises(TypeError, match=msg):
        model()(TOKENS.to(dtype))


def test_int32_tokens_give_the_int64_logits():
    m = model()
    assert torch.equal(m(TOKENS.int()), m(TOKENS))


def test_cache_must_be_a_kv_cache():
    with pytest.raises(TypeError, match="cache must be a KVCache from model.new_cache"):
        model()(TOKENS, cache={})


@pytest.mark.parametrize("attention", ["full", "local", "lsh"])
@pytest.mark.parametrize("shape", [(2, 0), (0, 8)])
def test_empty_batch_or_length_is_one_clear_error(attention, shape):
    with pytest.raises(ValueError, match=rf"tokens has shape \({shape[0]}, {shape[1]}\): an empty batch or sequence"):
        model(attention)(torch.zeros(shape, dtype=torch.long))


@pytest.mark.parametrize("attention", ["full", "local", "lsh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.long])
def test_padding_masks_are_bool_everywhere(attention, dtype):
    m = model(attention)
    with pytest.raises(TypeError, match=rf"mask must be a bool tensor .*got dtype {dtype}"):
        m(TOKENS, mask=torch.ones(2, 8, dtype=dtype))
    with pytest.raises(TypeError, match="attn_mask must be a bool tensor"):
        m(TOKENS, attn_mask=torch.ones(8, 8, dtype=dtype))


def test_lsh_layer_rejects_a_float_padding_mask_as_full_attention_does():
    layer = model("lsh").blocks[0].attn
    x = torch.randn(2, 8, 16)
    with pytest.raises(TypeError, match="bool"):
        layer(x, mask=torch.ones(2, 8))


def test_generate_rejects_a_list_prompt_with_the_fix():
    with pytest.raises(TypeError, match=r"prompt must be a LongTensor.*got list; pass torch.tensor\(prompt"):
        model().generate([[1, 2]], 3)


@pytest.mark.parametrize(
    "kw, err, text",
    [
        ({"temperature": math.nan}, ValueError, "temperature must be a finite number >= 0"),
        ({"temperature": math.inf}, ValueError, "temperature must be a finite number >= 0"),
        ({"temperature": -1.0}, ValueError, "temperature must be a finite number >= 0"),
        ({"temperature": "hot"}, TypeError, "temperature must be a number >= 0 .* got str 'hot'"),
        ({"temperature": True}, TypeError, "temperature must be a number"),
        ({"top_k": 0}, ValueError, "top_k must be an int >= 1 or None"),
        ({"top_p": 2.0}, ValueError, r"top_p must be in \(0, 1\]"),
        ({"top_p": math.nan}, ValueError, r"top_p must be in \(0, 1\]"),
        ({"eos_token": 99}, ValueError, r"eos_token=99 is outside the vocabulary \[0, 32\)"),
    ],
)
def test_generate_arguments_are_checked(kw, err, text):
    with pytest.raises(err, match=text):
        model().generate(TOKENS[:1, :2], 3, **kw)
    if "eos_token" not in kw:
        with pytest.raises(err, match=text):
            sample_next(torch.randn(1, 32), **kw)


def test_temperature_zero_is_greedy():
    m = model()
    out = m.generate(TOKENS[:1, :3], 4, temperature=0)
    x = TOKENS[:1, :3]
    for _ in range(4):
        x = torch.cat([x, m(x)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, x)


def _mask_cases():
    """(layer, call) pairs for every attention layer called directly; ``call(layer, **masks)`` runs one forward."""
    from anydepth.compat import reformer as R
    from anydepth.nn.attention import FullAttention, LocalAttention

    def attn(kind, cross=False, **fields):
        torch.manual_seed(0)
        layer = ATTENTIONS.build(ATTENTIONS.config(kind, **fields), dim=8, heads=2, dim_head=4, causal=False,
                                 ctx=None, cross=cross)
        assert isinstance(layer, (FullAttention, LocalAttention)) or kind == "lsh"
        return layer

    x, ctx = torch.randn(2, 8, 8), torch.randn(2, 5, 8)
    torch.manual_seed(0)
    lsh_self = R.LSHSelfAttention(dim=8, heads=2, bucket_size=4, n_hashes=2)
    reformer = R.Reformer(dim=8, depth=1, heads=2, bucket_size=4, n_hashes=2)
    lm = R.ReformerLM(num_tokens=16, dim=8, depth=1, max_seq_len=8, heads=2, bucket_size=4, n_hashes=2)
    core = R.LSHAttention(bucket_size=4, n_hashes=2)
    pad, square, ctx_pad = (2, 8), (8, 8), (2, 5)
    return [
        ("full", attn("full"), lambda m, **kw: m(x, **kw), {"mask": pad, "attn_mask": square}),
        ("full-cross", attn("full", cross=True), lambda m, **kw: m(x, context=ctx, **kw),
         {"mask": pad, "context_mask": ctx_pad}),
        ("local", attn("local", window=4), lambda m, **kw: m(x, **kw), {"mask": pad, "attn_mask": square}),
        ("lsh-kind", attn("lsh", bucket_size=4, n_hashes=2), lambda m, **kw: m(x, **kw),
         {"mask": pad, "attn_mask": square}),
        ("LSHSelfAttention", lsh_self, lambda m, **kw: m(x, keys=ctx, **kw),
         {"input_mask": pad, "mask": pad, "input_attn_mask": square, "attn_mask": square, "context_mask": ctx_pad}),
        ("LSHAttention", core, lambda m, **kw: m(x, x, **kw)[0], {"input_mask": pad, "input_attn_mask": square}),
        ("Reformer", reformer, lambda m, **kw: m(x, keys=ctx, **kw),
         {"input_mask": pad, "input_attn_mask": square, "context_mask": ctx_pad}),
        ("ReformerLM", lm, lambda m, **kw: m(TOKENS.clamp(max=15), **kw),
         {"input_mask": pad, "input_attn_mask": square}),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.long])
def test_every_attention_layer_takes_bool_masks_only(dtype):
    """A 0/1 float or long mask is refused by every attention layer, under the argument's own name, with the
    dtype and the fix; the same mask as bool runs (so the refusal is about the dtype alone)."""
    for label, layer, call, masks in _mask_cases():
        layer.eval()
        for name, shape in masks.items():
            ones = torch.ones(shape, dtype=dtype)
            msg = rf"^{name} must be a bool tensor \(True = .*\), got dtype {dtype}; convert with {name}\.bool\(\)"
            with pytest.raises(TypeError, match=msg):
                call(layer, **{name: ones})
            out = call(layer, **{name: ones.bool()})
            assert torch.isfinite(out).all(), (label, name)
