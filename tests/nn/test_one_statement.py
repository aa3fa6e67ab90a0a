"""Every registered kind states each option once: as a field of its ``Config``.

The constructor takes the config first, plus the build context, and reads the fields from it; neither it
nor a base class's constructor repeats a field as a parameter (with or without a default), so there is
nothing for a ``from_config`` to map. Seed classes in ``compat/`` translate the originals' keywords,
defaults included.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from torch import nn

from anydepth.nn.context import LayerContext
from anydepth.registry import FAMILIES

# the build context each family's layers take besides their config (model/build.py passes the same)
CONTEXT = {
    "norm": lambda: {"dim": 16},
    "ff": lambda: {"dim": 8},
    "position": lambda: {"dim": 8, "dim_head": 4, "max_seq_len": 16},
    "attention": lambda: {"dim": 8, "heads": 2},
    "stack": lambda: {"blocks": nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)]), "dim": 8},
    "residual": lambda: {"dim": 8, "ctx": LayerContext(n_layers=2), "norm": "layer"},
}

KINDS = [pytest.param(family, kind, id=f"{family}-{kind}") for family, reg in FAMILIES.items() for kind in reg.kinds()]


def _repeated(cls) -> list[str]:
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    found = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object or klass.__module__.startswith("torch"):
            continue
        for p in inspect.signature(init).parameters.values():
            if p.name in fields:
                default = "" if p.default is inspect.Parameter.empty else f"={p.default!r}"
                found.append(f"{klass.__name__}.__init__({p.name}{default})")
    return found


@pytest.mark.parametrize(("family", "kind"), KINDS)
def test_constructor_repeats_no_config_field(family, kind):
    cls = FAMILIES[family].get(kind)
    assert _repeated(cls) == [], f"{family} {kind!r}: options stated again outside {cls.__name__}.Config"
    first = list(inspect.signature(cls.__init__).parameters)[1:2]
    assert first in (["cfg"], ["config"]), f"{family} {kind!r}: {cls.__name__}(...) does not take its Config first"


@pytest.mark.parametrize(
    ("family", "kind"), [(f, k) for f, reg in FAMILIES.items() if f in CONTEXT for k in reg.kinds()]
)
def test_config_constructor_make_and_registry_agree(family, kind):
    """``Cls(Cls.Config(), **ctx)``, ``Cls.make(**ctx)`` and the registry build the same layer."""
    reg, cls = FAMILIES[family], FAMILIES[family].get(kind)
    built = []
    for make in (lambda c: cls(cls.Config(), **c), lambda c: cls.make(**c), lambda c: reg.build(kind, **c)):
        torch.manual_seed(0)
        built.append(make(CONTEXT[family]()))
    shapes = [{k: tuple(v.shape) for k, v in m.state_dict().items()} for m in built]
    assert shapes[0] == shapes[1] == shapes[2]
    for m in built[1:]:
        for (name, a), b in zip(built[0].state_dict().items(), m.state_dict().values(), strict=True):
            assert torch.equal(a, b), f"{family} {kind!r}: {name} differs"
    with pytest.raises(TypeError, match=r"\.Config\("):
        cls("not a config", **CONTEXT[family]())
