"""``RZTXEncoderLayer`` / ``RZTXDecoderLayer`` against the ``rezero`` package with the same weights.

The original layers raise ``TypeError`` inside today's ``nn.TransformerEncoder`` / ``TransformerDecoder``
(``is_causal`` / ``tgt_is_causal``), so stacks are compared layer by layer, calling the original
layers' ``forward`` directly. Our attention skips computing the unused attention weights (torch's
``need_weights=False`` path), which reorders float32 rounding: outputs agree to 1e-6, and a wrong
dropout mask or gate would differ by O(1).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from rezero.transformer import RZTXDecoderLayer as OrigDecoderLayer
from rezero.transformer import RZTXEncoderLayer as OrigEncoderLayer
from torch import nn

from anydepth.compat.rezero import RZTXDecoderLayer, RZTXEncoderLayer

D, H, FF = 16, 4, 32
S, T, B = 6, 5, 3
TOL = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(autouse=True)
def _one_thread():
    # The tensors here are tiny; intra-op threads only spin against other processes on a shared CPU.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pair(kind: str, dropout: float = 0.1, gate: float = 0.7, **kw):
    torch.manual_seed(0)
    orig = (OrigEncoderLayer if kind == "enc" else OrigDecoderLayer)(D, H, FF, dropout)
    ours = (RZTXEncoderLayer if kind == "enc" else RZTXDecoderLayer)(D, H, FF, dropout, **kw)
    ours.load_state_dict(orig.state_dict())
    with torch.no_grad():
        orig.resweight.fill_(gate)
        ours.resweight.fill_(gate)
    return orig, ours


def masks():
    causal = torch.ones(S, S, dtype=torch.bool).triu(1)  # True = may not attend (torch's bool convention)
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[0, -2:] = True
    return causal, pad


def test_state_dict_keys_equal_original_and_load_strictly():
    for kind in ("enc", "dec"):
        orig, ours = pair(kind)
        assert list(ours.state_dict()) == list(orig.state_dict())
        assert [n for n, _ in ours.named_parameters()] == [n for n, _ in orig.named_parameters()]


@pytest.mark.parametrize("train", [False, True])
def test_encoder_equals_original(train):
    orig, ours = pair("enc")
    orig.train(train), ours.train(train)
    causal, pad = masks()
    x = torch.randn(S, B, D)
    both = {"src_mask": causal, "src_key_padding_mask": pad}
    for kw in ({}, {"src_mask": causal}, {"src_key_padding_mask": pad}, both):
        torch.manual_seed(11)
        expected = orig(x, **kw)
        torch.manual_seed(11)
        torch.testing.assert_close(ours(x, **kw), expected, **TOL)


@pytest.mark.parametrize("train", [False, True])
def test_decoder_equals_original(train):
    orig, ours = pair("dec")
    orig.train(train), ours.train(train)
    causal, pad = masks()
    tgt, memory = torch.randn(S, B, D), torch.randn(T, B, D)
    mem_pad = torch.zeros(B, T, dtype=torch.bool)
    mem_pad[1, 0] = True
    kw = {"tgt_mask": causal, "tgt_key_padding_mask": pad, "memory_key_padding_mask": mem_pad}
    for args in ({}, kw):
        torch.manual_seed(11)
        expected = orig(tgt, memory, **args)
        torch.manual_seed(11)
        torch.testing.assert_close(ours(tgt, memory, **args), expected, **TOL)


def test_gradients_equal_original():
    for kind in ("enc", "dec"):
        orig, ours = pair(kind, dropout=0.0)
        x, memory = torch.randn(S, B, D), torch.randn(T, B, D)
        args = (x,) if kind == "enc" else (x, memory)
        orig(*args).pow(2).sum().backward()
        ours(*args).pow(2).sum().backward()
        for (name, p), q in zip(ours.named_parameters(), orig.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_callable_activation_matches_original_with_the_same_function():
    orig, ours = pair("enc", activation=F.silu)
    orig.activation = F.silu  # the original only accepts 'relu'/'gelu' by name
    orig.eval(), ours.eval()
    x = torch.randn(S, B, D)
    torch.testing.assert_close(ours(x), orig(x), **TOL)


def test_identity_at_init_and_only_resweight_learns_first():
    for cls in (RZTXEncoderLayer, RZTXDecoderLayer):
        layer = cls(D, H, FF)
        x, memory = torch.randn(S, B, D), torch.randn(T, B, D)
        out = layer(x) if cls is RZTXEncoderLayer else layer(x, memory)
        assert torch.equal(out, x)
        out.pow(2).sum().backward()
        assert torch.equal(layer.linear2.weight.grad, torch.zeros_like(layer.linear2.weight))
        assert layer.resweight.grad.abs().item() > 0
        assert layer.no_weight_decay() == [layer.resweight]


def test_one_resweight_shared_by_all_sublayers():
    dec = RZTXDecoderLayer(D, H, FF)
    assert dec.res_self.gate is dec.resweight and dec.res_ff.gate is dec.resweight
    assert sum(p is dec.resweight for p in dec.parameters()) == 1


def test_stack_inside_torch_transformer_encoder_equals_original_layer_by_layer():
    torch.manual_seed(0)
    layer = RZTXEncoderLayer(D, H, FF, dropout=0.0, batch_first=True)
    stack = nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False)
    for i, mod in enumerate(stack.layers):
        with torch.no_grad():
            mod.resweight.fill_(0.2 * (i + 1))  # clones own their gate
    causal, pad = masks()
    x = torch.randn(B, S, D)
    out = stack(x, mask=causal, src_key_padding_mask=pad, is_causal=True)

    y = x.transpose(0, 1)
    for mod in stack.layers:
        orig = OrigEncoderLayer(D, H, FF, dropout=0.0)
        orig.load_state_dict(mod.state_dict())
        y = orig.forward(y, src_mask=causal, src_key_padding_mask=pad)
    torch.testing.assert_close(out, y.transpose(0, 1), **TOL)


def test_stack_inside_torch_transformer_decoder_equals_original_layer_by_layer():
    torch.manual_seed(0)
    stack = nn.TransformerDecoder(RZTXDecoderLayer(D, H, FF, dropout=0.0), num_layers=2)
    for i, mod in enumerate(stack.layers):
        with torch.no_grad():
            mod.resweight.fill_(0.3 * (i + 1))
    causal, pad = masks()
    tgt, memory = torch.randn(S, B, D), torch.randn(T, B, D)
    out = stack(tgt, memory, tgt_mask=causal, tgt_key_padding_mask=pad, tgt_is_causal=True)

    y = tgt
    for mod in stack.layers:
        orig = OrigDecoderLayer(D, H, FF, dropout=0.0)
        orig.load_state_dict(mod.state_dict())
        y = orig.forward(y, memory, tgt_mask=causal, tgt_key_padding_mask=pad)
    torch.testing.assert_close(out, y, **TOL)


def test_original_fails_inside_torch_stacks():
    with pytest.raises(TypeError, match="is_causal"):
        nn.TransformerEncoder(OrigEncoderLayer(D, H, FF), 2, enable_nested_tensor=False)(torch.randn(S, B, D))
    with pytest.raises(TypeError, match="tgt_is_causal"):
        nn.TransformerDecoder(OrigDecoderLayer(D, H, FF), 2)(torch.randn(S, B, D), torch.randn(T, B, D))


def test_batch_first_equals_sequence_first():
    for cls in (RZTXEncoderLayer, RZTXDecoderLayer):
        torch.manual_seed(0)
        seq = cls(D, H, FF, dropout=0.0)
        bf = cls(D, H, FF, dropout=0.0, batch_first=True)
        bf.load_state_dict(seq.state_dict())
        with torch.no_grad():
            seq.resweight.fill_(0.5), bf.resweight.fill_(0.5)
        x, memory = torch.randn(S, B, D), torch.randn(T, B, D)
        if cls is RZTXEncoderLayer:
            a, b = seq(x), bf(x.transpose(0, 1))
        else:
            a, b = seq(x, memory), bf(x.transpose(0, 1), memory.transpose(0, 1))
        torch.testing.assert_close(b.transpose(0, 1), a, **TOL)


def test_causal_hint_without_mask_builds_the_causal_mask():
    _, enc = pair("enc", dropout=0.0)
    _, dec = pair("dec", dropout=0.0)
    x, memory = torch.randn(S, B, D), torch.randn(S, B, D)
    causal = torch.ones(S, S, dtype=torch.bool).triu(1)
    torch.testing.assert_close(enc(x, is_causal=True), enc(x, src_mask=causal), **TOL)
    torch.testing.assert_close(
        dec(x, memory, tgt_is_causal=True, memory_is_causal=True),
        dec(x, memory, tgt_mask=causal, memory_mask=causal),
        **TOL,
    )


def test_transformer_encoder_clones_have_independent_gates():
    stack = nn.TransformerEncoder(RZTXEncoderLayer(D, H, FF), 2, enable_nested_tensor=False)
    a, b = stack.layers
    assert a.resweight is not b.resweight
    assert a.res_attn.gate is a.resweight and b.res_ff.gate is b.resweight
    clone = copy.deepcopy(a)
    assert clone.res_attn.gate is clone.resweight


def test_bad_input():
    with pytest.raises(ValueError, match="d_model=10 is not divisible by nhead=4"):
        RZTXEncoderLayer(10, 4)
    with pytest.raises(ValueError, match="activation='tanh' is not supported"):
        RZTXDecoderLayer(D, H, activation="tanh")
    with pytest.raises(TypeError, match="activation must be 'relu', 'gelu' or a callable"):
        RZTXEncoderLayer(D, H, activation=3)
    with pytest.raises(ValueError, match=r"dropout must lie in \[0, 1\), got 1.5"):
        RZTXEncoderLayer(D, H, dropout=1.5)
    with pytest.raises(ValueError, match="nhead must be a positive int, got 0"):
        RZTXEncoderLayer(D, 0)
    with pytest.raises(ValueError, match=r"d_model=16; got shape \(6, 3, 8\)"):
        RZTXEncoderLayer(D, H)(torch.randn(S, B, 8))
    with pytest.raises(ValueError, match="memory must have shape"):
        RZTXDecoderLayer(D, H)(torch.randn(S, B, D), torch.randn(T, B, 3))
