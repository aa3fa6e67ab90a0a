"""TransformerLM: inputs, generation, persistence, compilation, depth."""

import pytest
import torch
import torch.nn.functional as F

from anydepth import ModelConfig, build_model
from anydepth.model import presets
from anydepth.model.pretrained import from_pretrained, save_pretrained
from anydepth.registry import ATTENTIONS, FFS, STACKS
from anydepth.sampling import filter_logits, sample_next

TINY = dict(vocab_size=32, dim=16, depth=2, heads=2, max_seq_len=32)


def lm(**kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(**{**TINY, **kw})).eval()


def test_bad_tokens_are_named():
    model = lm()
    with pytest.raises(ValueError, match="token id 32 is outside the vocabulary"):
        model(torch.tensor([[1, 32]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="max_seq_len=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(batch, seq\)"):
        model(torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("kw", [{}, {"position": "rotary"}, {"emb_dim": 8}, {"tie_embeddings": False}])
def test_kv_cached_generation_equals_uncached(kw):
    model = lm(**kw)
    prompt = torch.randint(0, 32, (2, 5))
    a = model.generate(prompt, 12, temperature=0, use_cache=True)
    b = model.generate(prompt, 12, temperature=0, use_cache=False)
    assert model.supports_cache
    assert torch.equal(a, b)
    assert a.shape == (2, 17) and torch.equal(a[:, :5], prompt)


def test_cached_logits_equal_full_forward():
    model = lm(position="rotary")
    tokens = torch.randint(0, 32, (2, 9))
    full = model(tokens)
    cache = model.new_cache()
    steps = [model(tokens[:, :4], cache=cache)] + [model(tokens[:, i : i + 1], cache=cache) for i in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_generation_beyond_max_seq_len_crops_context():
    model = lm()
    out = model.generate(torch.randint(0, 32, (1, 30)), 10, temperature=0)
    assert out.shape == (1, 40)


def test_eos_stops_and_pads():
    model = lm()
    prompt = torch.randint(0, 32, (1, 3))
    greedy = model.generate(prompt, 1, temperature=0)[0, -1].item()
    out = model.generate(prompt, 8, temperature=0, eos_token=greedy)
    assert out.shape == (1, 4) and out[0, -1] == greedy


def test_top_k_and_top_p_filter_as_defined():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    assert torch.isfinite(filter_logits(logits, top_k=2)[0, :2]).all()
    # nucleus 0.7: 0.5 < 0.7 so the second token is needed; 0.75 >= 0.7 so the third is dropped
    kept = torch.isfinite(filter_logits(logits, top_p=0.7))[0].tolist()
    assert kept == [True, True, False, False]
    assert torch.isfinite(filter_logits(logits, top_p=0.1))[0].tolist() == [True, False, False, False]
    assert sample_next(logits, temperature=0).item() == 0
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, top_k=1, generator=g) for _ in range(20)])
    assert (draws == 0).all()
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(logits, top_p=0.0)


def test_save_load_round_trip_reproduces_logits(tmp_path):
    model = lm(residual="rezero", norm="rms", emb_dim=8)
    tokens = torch.randint(0, 32, (2, 7))
    save_pretrained(model, tmp_path)
    again = from_pretrained(tmp_path).eval()
    assert torch.equal(model(tokens), again(tokens))
    assert again.config == model.config


def test_corrupt_checkpoint_names_the_file(tmp_path):
    save_pretrained(lm(), tmp_path)
    w = tmp_path / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(ValueError, match="model.safetensors"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("name", ["prenorm", "postnorm", "rezero", "admin", "deepnorm", "layerscale", "hyper", "rms"])
def test_100_layer_narrow_model_takes_a_finite_training_step(name):
    torch.manual_seed(0)
    model = build_model(presets.get(name, vocab_size=32, dim=32, depth=100, heads=2, max_seq_len=16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 32, (2, 16))
    for _ in range(2):
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        assert torch.isfinite(loss), name
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()


def test_reversible_gradients_equal_irreversible_gradients(float64):
    """The reversible executor against ordinary autograd of the same coupling, with dropout, padding
    masks, memory key/values and a chunked feed-forward (all the options that complicate recompute)."""
    cfg = dict(
        **TINY,
        attention=ATTENTIONS.config("full", dropout=0.1, num_mem_kv=2),
        ff=FFS.config("mlp", chunks=3, dropout=0.1),
        position="rotary",
    )
    tokens = torch.randint(0, 32, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 9:] = False
    results = []
    for thres in (0, 10**9):  # 0: reversible executor; 1e9: the same coupling with plain autograd
        torch.manual_seed(0)
        model = build_model(ModelConfig(**cfg, stack=STACKS.config("reversible", reverse_thres=thres))).train()
        torch.manual_seed(1)
        logits = model(tokens, mask)
        logits.square().mean().backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l0, l1, rtol=0, atol=1e-10)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], rtol=0, atol=1e-8, msg=n)


def test_layer_drop_keeps_gradients_on_every_kept_block():
    torch.manual_seed(3)
    model = build_model(ModelConfig(**{**TINY, "depth": 6}, stack=STACKS.config("reversible", layer_dropout=0.5)))
    model.train()
    model(torch.randint(0, 32, (2, 8))).sum().backward()
    with_grad = [any(p.grad is not None and p.grad.abs().sum() > 0 for p in b.parameters()) for b in model.blocks]
    assert 1 <= sum(with_grad) < 6  # some blocks dropped, and every kept one learns


def test_torch_compile_on_cpu():
    model = lm()
    tokens = torch.randint(0, 32, (2, 8))
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(tokens), model(tokens), rtol=1e-4, atol=1e-4)


def test_encoder_decoder_trains_and_generates():
    from anydepth.model.config import EncoderDecoderConfig

    torch.manual_seed(0)
    cfg = EncoderDecoderConfig(encoder=ModelConfig(**TINY, causal=False), decoder=ModelConfig(**TINY))
    model = build_model(cfg)
    src, tgt = torch.randint(0, 32, (2, 10)), torch.randint(0, 32, (2, 6))
    src_mask = torch.ones(2, 10, dtype=torch.bool)
    src_mask[0, 7:] = False
    logits = model(src, tgt, src_mask=src_mask)
    assert logits.shape == (2, 6, 32)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.encoder.parameters())
    out = model.generate(src, tgt[:, :1], 5, src_mask=src_mask, temperature=0)
    ref = model.generate(src, tgt[:, :1], 5, src_mask=src_mask, temperature=0, use_cache=False)
    assert torch.equal(out, ref)
