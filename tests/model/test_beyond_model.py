"""The post-2023 techniques in whole models: deep training steps, DenseFormer's identity init, the
init options, value residual across layers, and reparameterize() from Admin/DeepNorm to post-LN."""

import math

import pytest
import torch
import torch.nn.functional as F

from anydepth import ModelConfig, build_model, registered, reparameterize
from anydepth.model import presets
from anydepth.model.config import EncoderDecoderConfig
from anydepth.model.lm import TransformerLM
from anydepth.model.pretrained import from_pretrained, save_pretrained
from anydepth.nn.attention import ValueResidual
from anydepth.registry import ATTENTIONS, NORMS, RESIDUALS, STACKS

TINY = dict(vocab_size=32, dim=16, depth=3, heads=2, max_seq_len=32)

NEW = {
    "periln": dict(residual="periln"),
    "dyt": dict(norm="dyt"),
    "layer_scaling": dict(residual=RESIDUALS.config("prenorm", layer_scaling=True)),
    "mhc_lite": dict(residual="mhc_lite"),
    "dense": dict(stack="dense"),
    "qk_norm": dict(attention=ATTENTIONS.config("full", qk_norm="layer")),
    "value_residual": dict(attention=ATTENTIONS.config("full", value_residual=ValueResidual.Config(learned=True))),
    "depth_scaled": dict(init="depth_scaled"),
    "zero_out": dict(init="zero_out"),
}


def test_registered_lists_the_new_kinds():
    reg = registered()
    assert {"periln", "mhc_lite"} <= set(reg["residual"])
    assert "dyt" in reg["norm"] and "dense" in reg["stack"]


def _step(model, tokens):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    opt.step()
    return loss, grads


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NEW))
def test_100_layer_width_32_model_takes_a_finite_training_step(name):
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=32, dim=32, depth=100, heads=4, max_seq_len=16, **NEW[name]))
    tokens = torch.randint(0, 32, (2, 9))
    loss, grads = _step(model, tokens)
    assert torch.isfinite(loss)
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(model(tokens[:, :-1])).all()


@pytest.mark.parametrize("name", list(NEW))
def test_each_new_option_round_trips_through_json(name):
    cfg = ModelConfig(**TINY, **NEW[name])
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    build_model(ModelConfig.from_json(cfg.to_json()))


def test_unknown_init_names_the_field_and_the_fix():
    with pytest.raises(ValueError, match=r"ModelConfig.init='gpt2' is not one of.*'depth_scaled'"):
        ModelConfig(init="gpt2")


# ------------------------------------------------------------------------------------------------ DenseFormer


@pytest.mark.parametrize("residual", ["prenorm", "mhc_lite"])
def test_dense_stack_at_init_is_exactly_the_sequential_stack(residual):
    torch.manual_seed(0)
    dense = build_model(ModelConfig(**TINY, residual=residual, stack="dense"))
    seq = build_model(ModelConfig(**TINY, residual=residual))
    seq.load_state_dict({k: v for k, v in dense.state_dict().items() if ".dwa." not in k})
    tokens = torch.randint(0, 32, (2, 12))
    assert torch.equal(dense(tokens), seq(tokens))


def test_dense_stack_is_the_depth_weighted_average_of_all_earlier_outputs():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY, stack="dense"))
    with torch.no_grad():
        for w in model.stack.dwa:
            w.copy_(torch.randn(w.shape))
    tokens = torch.randint(0, 32, (2, 10))
    x, _ = model.embed(tokens)
    outs, y = [x], x  # X_0 = x; X_i = block_i(Y_{i-1}); Y_i = sum_j alpha_ij X_j
    for i, block in enumerate(model.blocks):
        outs.append(block(y, mask=None, attn_mask=None, rotary=None))
        alpha = model.stack.dwa[i]
        y = sum(alpha[j] * outs[j] for j in range(i + 2))
    torch.testing.assert_close(model(tokens), model.logits(model.norm(y)), rtol=1e-5, atol=1e-5)


def test_dense_stack_dilation_and_period_keep_fewer_weights():
    blocks = 8
    model = build_model(ModelConfig(**{**TINY, "depth": blocks}, stack=STACKS.config("dense", dilation=2, period=4)))
    # averages after blocks 4 and 8 only, over X_j with (i + 1 - j) even
    assert model.stack.sources == [None, None, None, [0, 2, 4], None, None, None, [0, 2, 4, 6, 8]]
    with pytest.raises(ValueError, match="dense stack dilation must be an int >= 1"):
        build_model(ModelConfig(**TINY, stack=STACKS.config("dense", dilation=0)))


def test_dense_weights_stay_out_of_weight_decay():
    model = build_model(ModelConfig(**TINY, stack="dense"))
    assert {id(p) for p in model.stack.no_weight_decay()} == {id(p) for p in model.stack.dwa}


# ------------------------------------------------------------------------------------------------ init options


def _out_weights(model):
    return [lin.weight for b in model.blocks for lin in (b.attn.to_out, b.ff.proj_out)]


def test_depth_scaled_init_scales_output_projections_by_one_over_sqrt_2n():
    torch.manual_seed(0)
    default = build_model(ModelConfig(**TINY))
    torch.manual_seed(0)
    scaled = build_model(ModelConfig(**TINY, init="depth_scaled"))
    for a, b in zip(_out_weights(default), _out_weights(scaled)):
        torch.testing.assert_close(b, a / math.sqrt(2 * TINY["depth"]))
    # everything else is untouched
    sd_a, sd_b = default.state_dict(), scaled.state_dict()
    same = [k for k in sd_a if "to_out.weight" not in k and "proj_out.weight" not in k]
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in same)


def test_zero_out_init_makes_every_block_the_identity_at_init():
    model = build_model(ModelConfig(**TINY, init="zero_out"))
    assert all((w == 0).all() for w in _out_weights(model))
    tokens = torch.randint(0, 32, (2, 8))
    x, _ = model.embed(tokens)
    torch.testing.assert_close(model(tokens), model.logits(model.norm(x)))
    _, grads = _step(model, torch.randint(0, 32, (2, 9)))
    assert any(g.abs().sum() > 0 for g in (w.grad for w in _out_weights(model)))


# ------------------------------------------------------------------------------------------------ value residual


def test_value_residual_model_decodes_with_a_cache_like_the_full_forward():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY, attention=ATTENTIONS.config("full", value_residual=True)))
    tokens = torch.randint(0, 32, (1, 7))
    cache = model.new_cache()
    steps = torch.cat([model(tokens[:, i : i + 1], cache=cache) for i in range(7)], dim=1)
    torch.testing.assert_close(steps, model(tokens), rtol=1e-5, atol=1e-5)


def test_value_residual_lambda_one_gives_every_layer_the_first_layers_values():
    torch.manual_seed(0)
    cfg = ModelConfig(**TINY, attention=ATTENTIONS.config("full", value_residual=ValueResidual.Config(lam=1.0)))
    model = build_model(cfg)
    # with lam = 1 no layer after the first reads its own value projection: its gradient is exactly zero
    _step(model, torch.randint(0, 32, (2, 9)))
    inner = TINY["dim"]
    for i, block in enumerate(model.blocks):
        gv = block.attn.to_qkv.weight.grad[2 * inner :]
        assert (gv.abs().sum() > 0) == (i == 0)


def test_encoder_decoder_value_residual_keeps_encoder_and_decoder_apart():
    enc = ModelConfig(**TINY, causal=False, attention=ATTENTIONS.config("full", value_residual=True))
    dec = ModelConfig(**TINY, attention=ATTENTIONS.config("full", value_residual=True))
    model = build_model(EncoderDecoderConfig(encoder=enc, decoder=dec))
    holders = {id(b.attn.value_residual.holder) for b in model.encoder.blocks}
    holders_dec = {id(b.attn.value_residual.holder) for b in model.decoder.blocks}
    assert len(holders) == len(holders_dec) == 1 and holders != holders_dec
    assert all(b.cross.value_residual is None for b in model.decoder.blocks)
    out = model(torch.randint(0, 32, (2, 6)), torch.randint(0, 32, (2, 5)))
    assert out.shape == (2, 5, 32)


# ------------------------------------------------------------------------------------------------ presets


@pytest.mark.parametrize(
    "name",
    ["periln", "dyt", "layer_scaling", "mhc_lite", "denseformer", "qk_norm", "value_residual", "depth_scaled"]
    + ["zero_out"],
)
def test_presets_for_the_new_schemes_build(name):
    cfg = presets.get(name, **TINY)
    model = build_model(cfg)
    assert model(torch.randint(0, 32, (1, 4))).shape == (1, 4, 32)


# ------------------------------------------------------------------------------------------------ reparameterize


def _trained(model, seed=0):
    """Weights moved far from init, as training would (the skip scales included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
        for name, b in model.named_buffers():
            if name.endswith("omega"):
                b.mul_(1.5)
    return model.eval()


def _match_eps(plain, original):
    """Sets each norm's eps to eps / w^2 of its Admin/DeepNorm sublayer: then both compute the same up to rounding."""
    lms = [(plain, original)] if isinstance(plain, TransformerLM) else [
        (plain.encoder, original.encoder),
        (plain.decoder, original.decoder),
    ]
    for new_lm, old_lm in lms:
        for nb, ob in zip(new_lm.blocks, old_lm.blocks):
            for nr, orr in zip(nb.residuals(), ob.residuals()):
                w = float(orr.omega) if hasattr(orr, "omega") else orr.alpha
                nr.norm.eps = orr.norm.eps / w**2


def _models(residual, encdec):
    common = dict(TINY, final_norm=False, residual=residual)
    if encdec:
        cfg = EncoderDecoderConfig(encoder=ModelConfig(**common, causal=False), decoder=ModelConfig(**common))
        inputs = (torch.randint(0, 32, (2, 7)), torch.randint(0, 32, (2, 6)))
    else:
        cfg = ModelConfig(**common)
        inputs = (torch.randint(0, 32, (2, 9)),)
    return _trained(build_model(cfg)), inputs


@pytest.mark.parametrize("residual", ["admin", "deepnorm"])
@pytest.mark.parametrize("encdec", [False, True], ids=["decoder-only", "encoder-decoder"])
def test_reparameterize_gives_a_post_ln_model_of_the_same_function(residual, encdec, tmp_path):
    torch.manual_seed(0)
    model, inputs = _models(residual, encdec)
    plain = reparameterize(model)
    parts = [plain.config] if not encdec else [plain.config.encoder, plain.config.decoder]
    assert all(c.residual.kind == "postnorm" for c in parts)
    assert not any(n.endswith("omega") for n, _ in plain.named_buffers())
    with torch.no_grad():
        ref = model(*inputs)
        out = plain(*inputs)
        torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)  # LN(w z) = LN(z) up to eps
        _match_eps(plain, model)
        torch.testing.assert_close(plain(*inputs), ref, rtol=1e-5, atol=2e-5)  # exact once eps is matched
    # the skip scale really was > 1, so the fold did something
    first = (model.encoder if encdec else model).blocks[0].res_attn
    assert (float(first.omega) if residual == "admin" else first.alpha) > 1.1
    save_pretrained(plain, tmp_path / "plain")
    loaded = from_pretrained(tmp_path / "plain")
    assert type(loaded) is type(plain)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(*inputs), out, rtol=0, atol=0)


def test_reparameterize_leaves_the_original_alone():
    model, inputs = _models("admin", False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reparameterize(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("encdec", [False, True], ids=["decoder-only", "encoder-decoder"])
def test_reparameterize_folds_a_per_channel_admin_w(encdec):
    torch.manual_seed(0)
    res = RESIDUALS.config("admin", as_parameter=True)
    common = dict(TINY, final_norm=False, residual=res, tie_embeddings=False)
    if encdec:
        cfg = EncoderDecoderConfig(encoder=ModelConfig(**common, causal=False), decoder=ModelConfig(**common))
        inputs = (torch.randint(0, 32, (2, 7)), torch.randint(0, 32, (2, 6)))
    else:
        cfg = ModelConfig(**common, norm=NORMS.config("rms"))
        inputs = (torch.randint(0, 32, (2, 9)),)
    model = _trained(build_model(cfg))
    omegas = [m.omega for m in model.modules() if hasattr(m, "omega")]
    assert omegas and all(o.std() > 0.05 for o in omegas)  # really per channel
    plain = reparameterize(model)
    with torch.no_grad():
        torch.testing.assert_close(plain(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)


def test_reparameterize_per_channel_w_with_tied_embeddings_is_a_clear_error():
    res = RESIDUALS.config("admin", as_parameter=True)
    model = build_model(ModelConfig(**TINY, final_norm=False, residual=res))
    # an untrained per-channel w is one value repeated: a common factor, divided out like the scalar w
    reparameterize(model)
    model = _trained(model)
    with pytest.raises(ValueError, match="tied to the output head.*tie_embeddings=False.*as_parameter=False"):
        reparameterize(model)


def test_reparameterize_rejects_other_schemes():
    with pytest.raises(ValueError, match=r"residual is 'prenorm'; only \['admin', 'deepnorm'\]"):
        reparameterize(build_model(ModelConfig(**TINY)))
    with pytest.raises(TypeError, match="expects a TransformerLM or EncoderDecoder"):
        reparameterize(torch.nn.Linear(2, 2))
