"""Property: every ModelConfig, with any component configs, either raises ValueError/TypeError naming
a field, or builds a model whose forward and backward give finite values at several lengths.

Field values are drawn from each field's annotation, mixing valid values with the mistakes a user
or an edited file makes (None, strings, negative or huge numbers, NaN, bools for numbers). Bounded
to about a minute on 2 CPU cores: small sizes, a fixed number of examples, derandomized."""

from __future__ import annotations

import dataclasses
import math
import typing

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from anydepth import ModelConfig, build_model
from anydepth.model.config import COMPONENTS
from anydepth.validate import _hints

BAD = st.sampled_from([None, "x", "1", -1, 10**9, math.nan, math.inf, True, 2.5, (1,)])


def _value(name: str, tp, default):
    """A strategy for one field: its default three times in four, else another value of its type."""
    other = _other(name, tp, default)
    if default is None or isinstance(default, (bool, int, float, str)):
        return st.one_of(st.just(default), st.just(default), st.just(default), other)
    return other


def _other(name: str, tp, default):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, __import__("types").UnionType):
        inner = [a for a in args if a is not type(None)]
        good = st.one_of(st.none(), *[_other(name, a, default) for a in inner])
    elif origin is typing.Literal:
        good = st.sampled_from(args)
    elif tp is bool:
        good = st.booleans()
    elif tp is int:
        good = st.integers(1, 6) if default is None or default >= 1 else st.integers(0, 3)
    elif tp is float:
        if "dropout" in name or name == "drop_for_hash_rate":
            good = st.sampled_from([0.0, 0.1, 0.5])
        else:
            good = st.sampled_from([0.02, 0.25, 0.5, 1.0, 2.0, 4.0, default if default is not None else 1.0])
    elif tp is str:
        good = st.sampled_from(sorted({default, "sum", "mean", "post", "gelu", "relu", "swish"} - {None}))
    elif origin is tuple:
        good = st.none() if default is None else st.just(default)
    else:
        good = st.just(default)
    return good


@st.composite
def component(draw, family: str):
    reg = COMPONENTS[family]
    kind = draw(st.sampled_from(reg.kinds()))
    cls = reg.get(kind).Config
    hints = _hints(cls)
    fields = {}
    for f in dataclasses.fields(cls):
        if draw(st.booleans()):  # leave about half of the fields at their defaults
            default = f.default if f.default is not dataclasses.MISSING else None
            fields[f.name] = draw(_value(f.name, hints.get(f.name, typing.Any), default))
    return kind, fields


@st.composite
def model_kwargs(draw):
    kw = {
        "vocab_size": draw(st.integers(2, 40)),
        "dim": draw(st.sampled_from([8, 12, 16, 24])),
        "depth": draw(st.integers(1, 3)),
        "heads": draw(st.sampled_from([1, 2, 4])),
        "max_seq_len": draw(st.sampled_from([8, 16, 24])),
    }
    for name, strategy in (
        ("dim_head", st.one_of(st.none(), st.sampled_from([2, 4, 6]))),
        ("emb_dim", st.one_of(st.none(), st.sampled_from([4, 8]))),
        ("causal", st.booleans()),
        ("tie_embeddings", st.booleans()),
        ("final_norm", st.booleans()),
        ("emb_dropout", st.sampled_from([0.0, 0.1])),
        ("init_std", st.sampled_from([0.02, 0.2, 1.0])),
    ):
        if draw(st.booleans()):
            kw[name] = draw(strategy)
    for family in COMPONENTS:
        kind, fields = draw(component(family))
        kw[family] = {"kind": kind, **fields}
    if draw(st.integers(0, 2)) == 0:  # one example in three carries one bad value somewhere
        where = draw(st.sampled_from(["model", *COMPONENTS]))
        if where == "model":
            name = draw(
                st.sampled_from(sorted(f.name for f in dataclasses.fields(ModelConfig) if f.name not in COMPONENTS))
            )
            kw[name] = draw(BAD)
        else:
            cls = COMPONENTS[where].get(kw[where]["kind"]).Config
            names = sorted(f.name for f in dataclasses.fields(cls))
            if names:
                kw[where][draw(st.sampled_from(names))] = draw(BAD)
    return kw


def _field_names() -> set[str]:
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    for reg in COMPONENTS.values():
        for kind in reg.kinds():
            names |= {f.name for f in dataclasses.fields(reg.get(kind).Config)}
    return names


FIELDS = _field_names()


@settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(model_kwargs(), st.data())
def test_every_config_is_refused_naming_a_field_or_trains(kw, data):
    try:
        cfg = ModelConfig(**kw)
        torch.manual_seed(0)
        model = build_model(cfg)
    except (ValueError, TypeError) as e:
        text = str(e)
        assert any(name in text for name in FIELDS), f"error names no field: {text}"
        event(f"refused: {type(e).__name__}")
        return
    event("built and ran")
    model.train()
    for n in sorted({1, cfg.max_seq_len // 2 + 1, cfg.max_seq_len}):
        tokens = torch.randint(0, cfg.vocab_size, (2, n), generator=torch.Generator().manual_seed(n))
        model.zero_grad(set_to_none=True)
        logits = model(tokens)
        assert logits.shape == (2, n, cfg.vocab_size)
        assert torch.isfinite(logits).all(), f"non-finite logits at length {n}: {cfg}"
        logits.float().logsumexp(-1).mean().backward()
        for name, p in model.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), f"non-finite gradient of {name} at length {n}"
