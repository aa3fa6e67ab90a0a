"""The builder: every combination the rule table accepts trains; every one it rejects says why."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from anydepth import ModelConfig, build_model, registered
from anydepth.model.build import RULES, InvalidCombination, check
from anydepth.registry import ATTENTIONS, NORMS, RESIDUALS, STACKS

TINY = dict(vocab_size=32, dim=16, depth=2, heads=2, max_seq_len=64)


def tiny_attention(kind):
    # LSH needs buckets small enough for the tiny sequences used here.
    if kind == "lsh":
        return ATTENTIONS.config("lsh", bucket_size=4, n_hashes=2)
    if kind == "local":
        return ATTENTIONS.config("local", window=4)
    return kind


def combos():
    reg = registered()
    return list(itertools.product(reg["residual"], reg["norm"], reg["attention"], reg["stack"]))


def is_valid(cfg):
    try:
        check(cfg)
        return True
    except InvalidCombination:
        return False


def test_registered_lists_every_family():
    reg = registered()
    for family in ("norm", "residual", "attention", "ff", "stack", "position"):
        assert reg[family], family
    assert {"prenorm", "postnorm", "rezero", "admin", "deepnorm", "layerscale", "hyper"} <= set(reg["residual"])
    assert {"layer", "rms", "prms", "scale"} <= set(reg["norm"])
    assert {"sequential", "reversible"} <= set(reg["stack"])
    assert {"full", "local", "lsh"} <= set(reg["attention"])


@pytest.mark.parametrize("residual,norm,attention,stack", combos())
def test_every_combination_builds_and_trains_or_is_rejected(residual, norm, attention, stack):
    cfg = ModelConfig(**TINY, residual=residual, norm=norm, attention=tiny_attention(attention), stack=stack)
    if not is_valid(cfg):
        with pytest.raises(InvalidCombination) as e:
            build_model(cfg)
        assert " Use " in str(e.value) or "Set " in str(e.value)  # every rejection says what to use instead
        return
    torch.manual_seed(0)
    model = build_model(cfg)
    tokens = torch.randint(0, 32, (2, 16))
    logits = model(tokens)
    assert logits.shape == (2, 16, 32)
    loss = F.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_each_rule_rejects_its_combination_with_its_name():
    examples = {
        "reversible-single-stream": dict(residual=RESIDUALS.config("hyper", streams=4), stack="reversible"),
        "reversible-additive": dict(residual="postnorm", stack="reversible"),
        "multi-stream-final-norm": dict(residual=RESIDUALS.config("hyper", streams=2), final_norm=False),
        "value-residual-reversible": dict(attention=ATTENTIONS.config("full", value_residual=True), stack="reversible"),
        "value-residual-layer-dropout": dict(
            attention=ATTENTIONS.config("full", value_residual=True),
            stack=STACKS.config("sequential", layer_dropout=0.1),
        ),
        "post-norm-needs-statistics": dict(residual="admin", norm="dyt"),
        "zero-out-gated": dict(residual="rezero", init="zero_out"),
        "init-owned-by-scheme": dict(residual="deepnorm", init="depth_scaled"),
    }
    assert set(examples) == {r.name for r in RULES}, "every rule needs an example here"
    for name, kw in examples.items():
        with pytest.raises(InvalidCombination) as e:
            build_model(ModelConfig(**TINY, **kw))
        assert e.value.rule == name
        assert name in str(e.value)


@pytest.mark.parametrize("residual", ["admin", "deepnorm", "postnorm"])
def test_reversible_rejects_post_norm_schemes(residual):
    with pytest.raises(InvalidCombination, match="not invertible"):
        build_model(ModelConfig(**TINY, residual=residual, stack="reversible"))


def test_unknown_kinds_and_keys_are_named():
    with pytest.raises(ValueError, match="unknown residual kind 'resnet'.*prenorm"):
        ModelConfig(residual="resnet")
    with pytest.raises(ValueError, match="unknown norm kind"):
        ModelConfig(norm="batch")
    with pytest.raises(ValueError, match="unknown ModelConfig key.*n_layers"):
        ModelConfig.from_dict({"n_layers": 3})
    with pytest.raises(TypeError, match="has no option"):
        NORMS.config("rms", epsilon=1e-5)
    with pytest.raises(TypeError, match="kind name"):
        ModelConfig(stack=3)


def test_dim_not_divisible_by_heads_is_rejected():
    with pytest.raises(ValueError, match="dim=30 is not divisible by heads=4"):
        ModelConfig(dim=30, heads=4)
    ModelConfig(dim=30, heads=4, dim_head=8)  # explicit dim_head lifts the constraint


def test_config_round_trips_through_dict_and_json():
    cfg = ModelConfig(**TINY, residual=RESIDUALS.config("rezero"), norm=NORMS.config("rms", eps=1e-6))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    d = cfg.to_dict()
    assert d["norm"]["kind"] == "rms" and d["residual"]["kind"] == "rezero"


def test_sequential_and_reversible_share_parameter_names():
    seq = build_model(ModelConfig(**TINY, stack="sequential"))
    rev = build_model(ModelConfig(**TINY, stack="reversible"))
    assert list(seq.state_dict()) == list(rev.state_dict())
    rev.load_state_dict(seq.state_dict())
    # and the concat merge adds exactly its projection
    cat = build_model(ModelConfig(**TINY, stack=STACKS.config("reversible", merge="concat")))
    assert set(cat.state_dict()) - set(seq.state_dict()) == {"stack.merge.weight"}


def test_rules_and_presets_read_what_a_scheme_declares(monkeypatch):
    """A scheme registered here, named nowhere in build.py or presets.py, gets the rules its class
    attributes call for: the rule table and the presets read the attributes, not kind names."""
    import dataclasses

    from anydepth.model import presets
    from anydepth.nn.residual import PostNorm

    class SkipScaled(PostNorm):
        needs_norm_statistics = True
        owns_branch_init = True

        @dataclasses.dataclass(kw_only=True)
        class Config:
            pass

    SkipScaled.Config.kind, SkipScaled.Config.family, SkipScaled.kind = "skip_scaled", "residual", "skip_scaled"
    RESIDUALS.kinds()  # load the registry before adding to it
    monkeypatch.setitem(RESIDUALS._by_kind, "skip_scaled", SkipScaled)

    assert presets._preset("skip_scaled").final_norm is False  # PostNorm's declaration, inherited
    # a preset's own scheme decides; any field, the residual included, can still be overridden
    assert presets.prenorm(residual="skip_scaled").final_norm is True
    assert presets.prenorm(residual="skip_scaled").residual.kind == "skip_scaled"
    with pytest.raises(InvalidCombination) as e:
        build_model(ModelConfig(**TINY, residual="skip_scaled", norm="dyt"))
    assert e.value.rule == "post-norm-needs-statistics"
    with pytest.raises(InvalidCombination) as e:
        build_model(ModelConfig(**TINY, residual="skip_scaled", init="zero_out"))
    assert e.value.rule == "init-owned-by-scheme"
    with pytest.raises(InvalidCombination) as e:
        build_model(ModelConfig(**TINY, residual="skip_scaled", stack="reversible"))
    assert e.value.rule == "reversible-additive" and "'prenorm'" in str(e.value)
    build_model(ModelConfig(**TINY, residual="skip_scaled", final_norm=False))


def test_build_reparam_and_presets_name_no_residual_kind_outside_the_preset_that_selects_it():
    import inspect
    import re

    from anydepth.model import build, presets, reparam

    kinds = RESIDUALS.kinds()
    # reparam folds whichever schemes declare folds_to_postnorm into its one target, post-LN
    for module, target in ((build, None), (reparam, "postnorm")):
        src = inspect.getsource(module)
        assert not [k for k in kinds if k != target and re.search(rf"[\"']{k}[\"']", src)], module.__name__
    # nor a norm kind: norms declare what the rules need (DyT: has_statistics = False)
    build_src = inspect.getsource(build)
    assert not [k for k in NORMS.kinds() if re.search(rf"[\"']{k}[\"']", build_src)]
    for name, preset in presets.PRESETS.items():
        selected = preset().residual.kind
        named = [k for k in kinds if re.search(rf"[\"']{k}[\"']", inspect.getsource(preset))]
        assert named in ([], [selected]), (name, named)
