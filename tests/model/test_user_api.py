"""The user-facing model API: loss from targets or labels, num_parameters, from_pretrained's device and
dtype, top-level generate and the exported names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import anydepth
from anydepth import EncoderDecoderConfig, LMOutput, ModelConfig, build_model, from_pretrained, save_pretrained

V = 37


def lm(**kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=V, dim=16, depth=2, heads=2, max_seq_len=32, **kw)).eval()


def tokens(b=2, n=9, seed=1):
    return torch.randint(0, V, (b, n), generator=torch.Generator().manual_seed(seed))


def test_plain_call_returns_logits_and_targets_add_the_cross_entropy():
    model, x = lm(), tokens()
    y = tokens(seed=2)
    logits = model(x)
    assert isinstance(logits, torch.Tensor) and not isinstance(logits, tuple) and logits.shape == (2, 9, V)
    out = model(x, targets=y)
    assert isinstance(out, LMOutput)
    got_logits, loss = out  # nanoGPT's unpacking
    torch.testing.assert_close(got_logits, logits, rtol=0, atol=0)
    # -log softmax at the target, averaged over every position
    logp = logits.double().log_softmax(-1)
    expected = -logp.gather(-1, y[..., None]).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)
    assert out.loss is loss and out.logits is got_logits


def test_labels_are_shifted_by_one_and_ignore_index_drops_positions():
    model, x = lm(), tokens()
    logits = model(x)
    loss = model(x, labels=x).loss
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected)
    # targets= with the shift done by hand is the same number
    shifted = torch.cat([x[:, 1:], torch.full((2, 1), -100)], dim=1)
    torch.testing.assert_close(model(x, targets=shifted).loss, expected)
    # ignored positions leave the mean over the rest
    y = tokens(seed=3)
    y[0, :4] = -1
    kept = y != -1
    manual = F.cross_entropy(logits[kept], y[kept])
    torch.testing.assert_close(model(x, targets=y, ignore_index=-1).loss, manual)


def test_loss_backpropagates_like_a_hand_written_loss():
    model, x, y = lm(), tokens(), tokens(seed=4)
    model.train()
    model(x, targets=y).loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    F.cross_entropy(model(x).reshape(-1, V), y.reshape(-1)).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, msg=n)


def test_encoder_decoder_takes_targets_for_its_decoder():
    torch.manual_seed(0)
    small = dict(vocab_size=V, dim=16, depth=1, heads=2, max_seq_len=32)
    model = build_model(EncoderDecoderConfig(encoder=ModelConfig(**small), decoder=ModelConfig(**small))).eval()
    src, tgt = tokens(), tokens(n=7, seed=5)
    logits = model(src, tgt)
    loss = model(src, tgt, labels=tgt).loss
    torch.testing.assert_close(loss, F.cross_entropy(logits[:, :-1].reshape(-1, V), tgt[:, 1:].reshape(-1)))


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"targets": "y", "labels": "y"}, ValueError, "not both"),
        ({"targets": "y_short"}, ValueError, r"targets must have the shape of tokens \(2, 9\)"),
        ({"labels": "y_float"}, TypeError, "labels must be an int64 or int32 tensor"),
        ({"targets": "y_big"}, ValueError, f"id {V} outside"),
        ({"targets": "y", "return_embeddings": True}, ValueError, "return_embeddings=True"),
    ],
)
def test_bad_targets_are_named(kw, error, match):
    model, x = lm(), tokens()
    y = tokens(seed=6)
    values = {"y": y, "y_short": y[:, :-1], "y_float": y.float(), "y_big": y.masked_fill(y == y[0, 0], V)}
    kw = {k: values.get(v, v) for k, v in kw.items()}
    with pytest.raises(error, match=match):
        model(x, **kw)


def test_num_parameters_counts_each_tensor_once():
    model = lm()  # tied head: the embedding table is also the output matrix
    seen = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[p.data_ptr()] = p.numel()
    assert model.num_parameters() == sum(seen.values())
    # tok_emb (V x dim) and the learned position table (max_seq_len x dim) are the embeddings
    assert model.num_parameters(exclude_embeddings=True) == sum(seen.values()) - V * 16 - 32 * 16
    model.tok_emb.weight.requires_grad_(False)
    assert model.num_parameters(only_trainable=True) == sum(seen.values()) - V * 16
    untied = lm(tie_embeddings=False)
    assert untied.num_parameters() == model.num_parameters() + 16 * V  # the separate head


def test_from_pretrained_takes_device_and_dtype(tmp_path):
    model, x = lm(), tokens()
    save_pretrained(model, tmp_path)
    again = from_pretrained(tmp_path, device="cpu")
    assert {p.device.type for p in again.parameters()} == {"cpu"} and again.training
    torch.testing.assert_close(again.eval()(x), model(x), rtol=0, atol=0)
    half = from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    ref = lm().to(torch.bfloat16)
    torch.testing.assert_close(half(x), ref(x), rtol=0, atol=0)
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        from_pretrained(tmp_path, dtype=torch.int64)
    with pytest.raises(ValueError, match="device='gpu0' is not a device"):
        from_pretrained(tmp_path, device="gpu0")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_from_pretrained_loads_straight_onto_the_gpu(tmp_path):
    model, x = lm(), tokens()
    save_pretrained(model, tmp_path)
    gpu = from_pretrained(tmp_path, device="cuda").eval()
    assert {p.device.type for p in gpu.parameters()} == {"cuda"}
    assert {b.device.type for b in gpu.buffers()} <= {"cuda"}
    torch.testing.assert_close(gpu(x.cuda()).cpu(), model(x), rtol=1e-4, atol=1e-4)


def test_top_level_generate_is_the_sampling_function():
    import anydepth.sampling  # importing the module must not shadow the function

    assert callable(anydepth.generate) and anydepth.generate is anydepth.sampling.generate
    model = lm()
    prompt = torch.tensor([[1, 2, 3]])
    torch.manual_seed(7)
    a = anydepth.generate(model, prompt, max_new_tokens=5, temperature=1.0, top_k=5)
    torch.manual_seed(7)
    b = model.generate(prompt, 5, temperature=1.0, top_k=5)
    assert a.shape == (1, 8) and torch.equal(a, b) and torch.equal(a[:, :3], prompt)


def test_exceptions_and_configs_users_need_are_top_level():
    from anydepth.model import build, config, lm, pretrained
    from anydepth.train import checkpoint, loop

    assert anydepth.InvalidCombination is build.InvalidCombination
    assert anydepth.EncoderDecoderConfig is config.EncoderDecoderConfig
    assert anydepth.KVCache is lm.KVCache
    assert anydepth.LMOutput is lm.LMOutput
    assert anydepth.CheckpointError is checkpoint.CheckpointError
    assert anydepth.TrainingDiverged is loop.TrainingDiverged
    assert anydepth.from_pretrained is pretrained.from_pretrained
    with pytest.raises(anydepth.InvalidCombination, match="reversible-additive"):
        build_model(ModelConfig(vocab_size=V, dim=16, depth=1, heads=2, residual="postnorm", stack="reversible"))
    assert set(anydepth.__all__) >= {"InvalidCombination", "EncoderDecoderConfig", "KVCache", "generate"}
