"""Every config field is checked by type and range where it is set, with a message naming the field."""

import json
import math

import pytest
import torch

from anydepth import ModelConfig, build_model
from anydepth.model.pretrained import from_pretrained, save_pretrained
from anydepth.registry import ATTENTIONS, FFS, NORMS, POSITIONS, RESIDUALS, STACKS

TINY = dict(vocab_size=32, dim=16, depth=2, heads=2, max_seq_len=16)


@pytest.mark.parametrize(
    "field, value",
    [
        ("causal", None),
        ("causal", 0),
        ("causal", "false"),
        ("final_norm", "no"),
        ("tie_embeddings", 1),
        ("init_std", "0.02"),
        ("init_std", -1),
        ("init_std", 0.0),
        ("init_std", math.inf),
        ("init_std", math.nan),
        ("max_seq_len", 10**12),
        ("depth", 100_000),
        ("dim", 2.0),
        ("vocab_size", True),
        ("emb_dropout", "0.1"),
        ("emb_dropout", 1.0),
        ("emb_dim", 0),
    ],
)
def test_model_config_field_rejected_naming_it(field, value):
    with pytest.raises((TypeError, ValueError), match=rf"ModelConfig\.{field}\b") as e:
        ModelConfig(**{**TINY, field: value})
    assert repr(value) in str(e.value)  # the message shows the value it got


def test_causal_none_no_longer_builds_a_model_that_sees_the_future():
    # The reproduction: causal=None built a bidirectional model; now it is refused.
    with pytest.raises(TypeError, match="causal must be True or False"):
        ModelConfig(**TINY, causal=None)
    # and causal=True really is causal: changing a later token leaves position 0 unchanged
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY, causal=True)).eval()
    x = torch.randint(0, 32, (1, 8))
    y = x.clone()
    y[0, 5] = (y[0, 5] + 1) % 32
    assert torch.equal(model(x)[0, 0], model(y)[0, 0])


@pytest.mark.parametrize(
    "registry, kind, field, value",
    [
        (RESIDUALS, "mhc", "sinkhorn_iters", 10**9),
        (RESIDUALS, "hyper", "streams", 0),
        (RESIDUALS, "hyper", "dynamic", None),
        (RESIDUALS, "rezero", "shared", "yes"),
        (RESIDUALS, "rezero", "init", math.nan),
        (NORMS, "rms", "eps", "1e-6"),
        (NORMS, "layer", "bias", 0),
        (ATTENTIONS, "full", "dropout", 1.5),
        (ATTENTIONS, "lsh", "n_hashes", 10**6),
        (ATTENTIONS, "lsh", "attend_across_buckets", "false"),
        (ATTENTIONS, "local", "window", 0),
        (FFS, "mlp", "mult", math.inf),
        (FFS, "glu", "checkpoint", None),
        (STACKS, "reversible", "layer_dropout", -0.1),
        (POSITIONS, "rotary", "interleaved", 1),
        (POSITIONS, "learned", "init_std", -0.02),
    ],
)
def test_component_config_field_rejected_naming_it(registry, kind, field, value):
    with pytest.raises((TypeError, ValueError), match=rf"\b{field}\b") as e:
        registry.config(kind, **{field: value})
    assert repr(value) in str(e.value)
    # the nested Config is checked the same way when built directly, not only through the registry
    with pytest.raises((TypeError, ValueError), match=field):
        registry.get(kind).Config(**{field: value})


def test_component_config_from_a_dict_is_checked():
    with pytest.raises(TypeError, match=r"residual\[hyper\]\.dynamic must be True or False"):
        ModelConfig(**TINY, residual={"kind": "hyper", "dynamic": None})


def test_config_read_from_a_checkpoint_is_checked(tmp_path):
    model = build_model(ModelConfig(**TINY))
    save_pretrained(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["causal"] = None
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json.*causal must be True or False"):
        from_pretrained(tmp_path)
    cfg["causal"] = True
    cfg["residual"] = {"kind": "mhc", "sinkhorn_iters": 10**9}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"sinkhorn_iters must be an int >= 1 \(at most 1000\), got 1000000000"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json.*must be a JSON object"):
        from_pretrained(tmp_path)


def test_model_larger_than_the_machine_is_refused_before_allocating():
    cfg = ModelConfig(vocab_size=1 << 24, dim=1 << 16, depth=2, heads=16, max_seq_len=1 << 20)
    with pytest.raises(ValueError, match=r"GiB for its parameters alone.*lower dim"):
        build_model(cfg)


def test_replace_is_checked_too():
    with pytest.raises(TypeError, match="causal"):
        ModelConfig(**TINY).replace(causal="no")
