"""``ModelConfig``: everything that decides what a model computes, serialisable to JSON.

Each component field (``residual``, ``norm``, ``attention``, ``ff``, ``stack``, ``position``) takes a
kind name (``"rezero"``, ``"rms"``, ``"full"``, ``"reversible"``...) or that kind's own ``Config``
object; names are resolved to config objects at construction, so ``cfg.residual`` is always a
config. ``to_dict``/``from_dict`` write each component as ``{"kind": ..., **fields}``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from anydepth.registry import (
    ATTENTIONS,
    FFS,
    NORMS,
    POSITIONS,
    RESIDUALS,
    STACKS,
    config_from_dict,
    config_to_dict,
)

COMPONENTS = {
    "residual": RESIDUALS,
    "norm": NORMS,
    "attention": ATTENTIONS,
    "ff": FFS,
    "stack": STACKS,
    "position": POSITIONS,
}


INIT_SCHEMES = ("default", "depth_scaled", "zero_out")


@dataclass(kw_only=True)
class ModelConfig:
    """A decoder-only (``causal=True``) or encoder-only language model built by ``build_model``."""

    vocab_size: int = 256  # byte-level by default: no tokenizer to ship, any text file is data
    dim: int = 256  # residual stream width
    depth: int = 6  # number of blocks (each has an attention and a feed-forward residual sublayer)
    heads: int = 4  # attention heads; dim must divide by heads unless dim_head is set
    dim_head: int | None = None  # per-head width; None means dim // heads
    max_seq_len: int = 1024  # longest input; sizes learned/axial position tables and bounds inputs
    residual: Any = "prenorm"  # residual scheme: owns norm placement and depth-dependent init
    norm: Any = "layer"  # norm kind used by the residual scheme and the final norm
    attention: Any = "full"  # attention kind (full SDPA, local window, LSH)
    ff: Any = "mlp"  # feed-forward kind (MLP/GLU, with optional sequence chunking)
    stack: Any = "sequential"  # executor over the blocks: sequential, or reversible (O(1) activations in depth)
    position: Any = "learned"  # positions: learned, sinusoidal, axial, rotary, none
    causal: bool = True  # autoregressive LM; False gives a bidirectional encoder
    emb_dim: int | None = None  # factorised embedding: a vocab x emb_dim table projected to dim (None: dim)
    tie_embeddings: bool = True  # output head shares the token embedding (fewer parameters, better small LMs)
    final_norm: bool = True  # norm after the stack; pre-norm residuals need it to bound the output scale
    emb_dropout: float = 0.0  # dropout on token + position embeddings
    init_std: float = 0.02  # std of the normal init of embeddings and projections (GPT-2 convention)
    init: str = "default"  # output projections: "default", "depth_scaled" (x 1/sqrt(2N), GPT-2) or "zero_out"

    def __post_init__(self) -> None:
        from anydepth.validate import check_config

        for name, reg in COMPONENTS.items():
            setattr(self, name, reg.resolve(getattr(self, name)))
            check_config(getattr(self, name))  # again: a component config may have been edited in place
        check_config(self, "ModelConfig")
        if self.init not in INIT_SCHEMES:
            raise ValueError(
                f"ModelConfig.init={self.init!r} is not one of {', '.join(map(repr, INIT_SCHEMES))}; use 'default' "
                "(the branches' own init), 'depth_scaled' (output projections times 1/sqrt(2N), GPT-2) or "
                "'zero_out' (output projections zero, SkipInit-style)"
            )
        if self.dim_head is None and self.dim % self.heads:
            raise ValueError(
                f"ModelConfig.dim={self.dim} is not divisible by heads={self.heads}; "
                f"choose heads dividing dim (e.g. {_divisors_hint(self.dim)}) or set dim_head explicitly"
            )

    @property
    def head_dim(self) -> int:
        return self.dim_head if self.dim_head is not None else self.dim // self.heads

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = config_to_dict(v) if f.name in COMPONENTS else v
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        if not isinstance(d, dict):
            raise TypeError(f"ModelConfig.from_dict expects a dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(
                f"unknown ModelConfig key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(names))}"
            )
        kw = dict(d)
        for name, reg in COMPONENTS.items():
            if isinstance(kw.get(name), dict):
                kw[name] = config_from_dict(kw[name], reg)
        return cls(**kw)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with ``changes`` applied (component fields accept kind names)."""
        return dataclasses.replace(self, **changes)


@dataclass(kw_only=True)
class EncoderDecoderConfig:
    """An encoder-decoder model: a bidirectional encoder and a causal decoder with cross-attention."""

    encoder: ModelConfig = field(default_factory=lambda: ModelConfig(causal=False))  # reads the source
    decoder: ModelConfig = field(default_factory=ModelConfig)  # writes the target, attending to the encoder

    def __post_init__(self) -> None:
        for name in ("encoder", "decoder"):
            if not isinstance(getattr(self, name), (ModelConfig, dict)):
                raise TypeError(
                    f"EncoderDecoderConfig.{name} must be a ModelConfig or its dict, "
                    f"got {type(getattr(self, name)).__name__}"
                )
        if isinstance(self.encoder, dict):
            self.encoder = ModelConfig.from_dict(self.encoder)
        if isinstance(self.decoder, dict):
            self.decoder = ModelConfig.from_dict(self.decoder)
        if self.encoder.dim != self.decoder.dim:
            raise ValueError(
                f"encoder.dim={self.encoder.dim} and decoder.dim={self.decoder.dim} differ; "
                "cross-attention needs the same width (set both dims equal)"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"arch": "encdec", "encoder": self.encoder.to_dict(), "decoder": self.decoder.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderDecoderConfig:
        if not isinstance(d, dict):
            raise TypeError(f"EncoderDecoderConfig.from_dict expects a dict, got {type(d).__name__}")
        unknown = sorted(set(d) - {"arch", "encoder", "decoder"})
        if unknown:
            raise ValueError(f"unknown EncoderDecoderConfig key(s) {', '.join(unknown)}; known keys: encoder, decoder")
        d = {k: v for k, v in d.items() if k != "arch"}
        return cls(**d)


def config_from_any_dict(d: dict[str, Any]) -> ModelConfig | EncoderDecoderConfig:
    """Reads either config kind back from its ``to_dict`` form."""
    if not isinstance(d, dict):
        raise TypeError(f"a model config must be a JSON object (a dict), got {type(d).__name__}")
    if d.get("arch") == "encdec":
        return EncoderDecoderConfig.from_dict(d)
    return ModelConfig.from_dict(d)


def _divisors_hint(n: int) -> str:
    return ", ".join(str(h) for h in (1, 2, 4, 8, 16) if n % h == 0)
