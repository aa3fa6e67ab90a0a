"""The library's one indirection: a small registry per family of leaf layers.

The leaf modules of :mod:`anydepth.nn` register their classes here when they are imported; this
module imports none of them. :mod:`anydepth.registry` is the same registries with every leaf module
loaded, which is what code outside ``anydepth.nn`` imports.

A variant is one class with a nested ``Config`` dataclass, registered under a short kind name. Each
option is stated once, as a field of ``Config``; the constructor takes the config plus the build
context (sizes the model decides, such as ``dim``) and reads the fields from it::

    @NORMS.register("rms")
    class RMSNorm(Configurable, nn.Module):
        @dataclass(kw_only=True)
        class Config:
            eps: float = 1e-6

        def __init__(self, cfg: Config | None = None, *, dim: int):
            cfg = self.config_of(cfg)
            ...

    RMSNorm(RMSNorm.Config(eps=1e-5), dim=64)   # or, the same layer:
    RMSNorm.make(dim=64, eps=1e-5)

``NORMS.build(cfg_or_kind, dim=...)`` turns a kind name or a config object into a module, and
``config_to_dict`` / ``config_from_dict`` serialise configs as ``{"kind": ..., **fields}``.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

__all__ = [
    "Registry",
    "Configurable",
    "NORMS",
    "RESIDUALS",
    "ATTENTIONS",
    "FFS",
    "STACKS",
    "POSITIONS",
    "FAMILIES",
    "registered",
    "config_to_dict",
    "config_from_dict",
]


class Registry:
    """Maps short kind names of one family (``"rms"``, ``"rezero"``, ...) to classes."""

    def __init__(self, family: str):
        self.family = family
        self._by_kind: dict[str, type] = {}

    def register(self, kind: str):
        def deco(cls):
            cfg = cls.__dict__.get("Config")
            if cfg is None or not dataclasses.is_dataclass(cfg):
                raise TypeError(f"{self.family} {cls.__name__!r} must define a nested dataclass `Config`")
            if kind in self._by_kind:
                raise ValueError(f"{self.family} kind {kind!r} is registered twice")
            cfg.kind = kind  # class attribute, not a field: read by config_to_dict
            cfg.family = self.family
            _validate_on_init(cfg)
            cls.kind = kind
            self._by_kind[kind] = cls
            return cls

        return deco

    def kinds(self) -> list[str]:
        return sorted(self._by_kind)

    def get(self, kind: str) -> type:
        if not isinstance(kind, str):
            raise TypeError(f"{self.family} kind must be a string, got {type(kind).__name__} {kind!r}")
        if kind not in self._by_kind:
            raise ValueError(
                f"unknown {self.family} kind {kind!r}; registered {self.family} kinds: {', '.join(self.kinds())}"
            )
        return self._by_kind[kind]

    def config(self, kind: str, **fields: Any):
        """``Config`` of ``kind`` with ``fields``; an unknown field raises ``TypeError`` naming it."""
        cfg_cls = self.get(kind).Config
        names = {f.name for f in dataclasses.fields(cfg_cls)}
        unknown = sorted(set(fields) - names)
        if unknown:
            raise TypeError(
                f"{self.family} {kind!r} has no option(s) {', '.join(unknown)}; "
                f"its options are: {', '.join(sorted(names)) or '(none)'}"
            )
        return cfg_cls(**fields)

    def resolve(self, cfg: Any):
        """A kind name, a ``{"kind": ...}`` dict or a config object -> config object of this family."""
        if isinstance(cfg, str):
            return self.config(cfg)
        if isinstance(cfg, dict):
            return config_from_dict(cfg, self)
        if dataclasses.is_dataclass(cfg) and getattr(type(cfg), "family", None) == self.family:
            return cfg
        raise TypeError(
            f"expected a {self.family} kind name ({', '.join(self.kinds())}) or its Config object, "
            f"got {type(cfg).__name__} {cfg!r}"
        )

    def build(self, cfg: Any, **context: Any):
        """Builds the module for ``cfg`` (kind name or config) via ``cls.from_config(cfg, **context)``."""
        cfg = self.resolve(cfg)
        return self.get(cfg.kind).from_config(cfg, **context)

    def __contains__(self, kind: str) -> bool:
        return kind in self._by_kind

    def __repr__(self) -> str:
        return f"Registry({self.family!r}, kinds={self.kinds()})"


def _validate_on_init(cfg_cls: type) -> None:
    """Every ``Config`` checks its fields when constructed (``anydepth.validate.check_config``): by
    type (a bool field takes only True/False) and by the bounds of ``FIELD_RANGES``. Wrapping
    ``__init__`` reaches configs built directly, from dicts, from checkpoints and by ``replace``."""
    init = cfg_cls.__dict__["__init__"]
    if getattr(init, "_validates", False):
        return

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from anydepth.validate import check_config

        init(self, *args, **kwargs)
        check_config(self)

    __init__._validates = True  # type: ignore[attr-defined]
    __init__.__wrapped__ = init  # type: ignore[attr-defined]
    __init__.__signature__ = inspect.signature(init)  # type: ignore[attr-defined]
    cfg_cls.__init__ = __init__


NORMS = Registry("norm")
RESIDUALS = Registry("residual")
ATTENTIONS = Registry("attention")
FFS = Registry("ff")
STACKS = Registry("stack")
POSITIONS = Registry("position")
FAMILIES = {r.family: r for r in (NORMS, RESIDUALS, ATTENTIONS, FFS, STACKS, POSITIONS)}


def registered() -> dict[str, list[str]]:
    """``{family: [kind, ...]}`` for every family (norm, residual, attention, ff, stack, position)."""
    return {family: reg.kinds() for family, reg in FAMILIES.items()}


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """``{"kind": kind, **fields}``; nested configs are tagged the same way."""
    out: dict[str, Any] = {"kind": type(cfg).kind} if hasattr(type(cfg), "kind") else {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            v = config_to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def config_from_dict(d: dict[str, Any], registry: Registry):
    """Inverse of :func:`config_to_dict` for one family; unknown kinds and keys raise."""
    if not isinstance(d, dict) or "kind" not in d:
        raise ValueError(f"a {registry.family} config dict needs a 'kind' key, got {d!r}")
    fields = {k: v for k, v in d.items() if k != "kind"}
    cfg_cls = registry.get(d["kind"]).Config
    # An option a kind no longer has because it could take one value only (``retired = {name: value}``
    # on its Config) is dropped from dicts saved before, when it holds that value.
    for name, value in getattr(cfg_cls, "retired", {}).items():
        if fields.get(name, value) == value:
            fields.pop(name, None)
    for f in dataclasses.fields(cfg_cls):
        v = fields.get(f.name)
        if isinstance(v, list) and (isinstance(f.default, tuple) or "tuple" in str(f.type)):
            fields[f.name] = tuple(v)
    return registry.config(d["kind"], **fields)


class Configurable:
    """Mixin of a registered layer built as ``Cls(cfg, **context)``.

    ``from_config`` (what :meth:`Registry.build` calls) is that constructor call; ``make`` takes the
    ``Config`` fields and the context as keywords in one call, so a layer built by hand states only
    what differs from the defaults, which live in ``Config`` alone.
    """

    Config: type

    @classmethod
    def from_config(cls, cfg: Any, **context: Any):
        return cls(cfg, **context)

    @classmethod
    def make(cls, **kwargs: Any):
        """``cls(cls.Config(**fields), **context)``: keywords naming a ``Config`` field fill the config,
        the others (``dim``, ``heads``, ...) go to the constructor."""
        names = {f.name for f in dataclasses.fields(cls.Config)}
        fields = {k: v for k, v in kwargs.items() if k in names}
        context = {k: v for k, v in kwargs.items() if k not in names}
        return cls(cls.Config(**fields), **context)

    def config_of(self, cfg: Any):
        """``cfg``, or the default ``Config`` for None; anything else raises ``TypeError`` naming the fix."""
        want = type(self).Config
        if cfg is None:
            return want()
        if not isinstance(cfg, want):
            name = type(self).__name__
            raise TypeError(
                f"{name} takes its config as the first argument: {name}({name}.Config(...), ...) or "
                f"{name}.make(...) with the options as keywords; got {type(cfg).__name__} {cfg!r}"
            )
        return cfg
