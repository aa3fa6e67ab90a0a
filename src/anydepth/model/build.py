"""``build_model(cfg)``: the rule table, the per-layer context, and the init.

Every combination of residual x norm x attention x stack x position that the rule table accepts
builds and trains; every combination it rejects raises :class:`InvalidCombination` with a message
that says why and what to use instead. The rules live in one list, :data:`RULES`, so reading it
tells you everything the builder refuses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from anydepth.model.block import Block, CrossBlock
from anydepth.model.config import EncoderDecoderConfig, ModelConfig, config_from_any_dict
from anydepth.nn.context import Arch, LayerContext
from anydepth.registry import ATTENTIONS, FFS, RESIDUALS, STACKS


class InvalidCombination(ValueError):
    """A configuration the rule table rejects; ``rule`` names the rule."""

    def __init__(self, rule: str, message: str):
        super().__init__(f"invalid model configuration [{rule}]: {message}")
        self.rule = rule


@dataclass(frozen=True)
class Rule:
    name: str  # stable identifier, used in tests and in the error
    invalid: Callable[[ModelConfig], bool]  # True when the configuration breaks the rule
    message: Callable[[ModelConfig], str]  # why it is invalid and what to use instead


def _residual_cls(cfg: ModelConfig):
    return RESIDUALS.get(cfg.residual.kind)


def _streams(cfg: ModelConfig) -> int:
    return int(getattr(cfg.residual, "streams", getattr(_residual_cls(cfg), "streams", 1)))


RULES: list[Rule] = [
    Rule(
        "reversible-single-stream",
        lambda c: c.stack.kind == "reversible" and _streams(c) > 1,
        lambda c: (
            f"the reversible stack splits one residual into two halves (y1 = x1 + F(x2), y2 = x2 + G(y1)); "
            f"residual {c.residual.kind!r} carries {_streams(c)} mixed streams, whose update cannot be "
            "inverted that way. Use stack='sequential' with hyper-connections, or a single-stream additive "
            "residual (prenorm, rezero, layerscale) with stack='reversible'."
        ),
    ),
    Rule(
        "reversible-additive",
        lambda c: c.stack.kind == "reversible" and not _residual_cls(c).additive,
        lambda c: (
            f"the reversible stack recovers each block's input by subtracting its update (x = y - F(.)), which "
            f"needs x + F(x); residual {c.residual.kind!r} (norm placement {_residual_cls(c).placement!r}) "
            "normalises after the sum, and a norm is not invertible. Use residual='prenorm', 'rezero' or "
            "'layerscale' with stack='reversible', or keep this residual with stack='sequential'."
        ),
    ),
    Rule(
        "post-norm-schemes",
        lambda c: c.residual.kind in ("admin", "deepnorm") and getattr(c.residual, "placement", "post") != "post",
        lambda c: (
            f"{c.residual.kind} scales the skip (w*x + F(x), w > 1) to bound the output change of "
            "LN(w*x + F(x)); with pre-norm placement the skip is never normalised and w only inflates the "
            f"residual. Use placement='post' (the default) or residual='prenorm'."
        ),
    ),
    Rule(
        "multi-stream-final-norm",
        lambda c: _streams(c) > 1 and not c.final_norm,
        lambda c: (
            f"residual {c.residual.kind!r} sums its {_streams(c)} streams after the last block, which scales the "
            "output with the stream count; the final norm is what brings it back. Set final_norm=True."
        ),
    ),
]


def check(cfg: ModelConfig) -> None:
    """Raises :class:`InvalidCombination` for the first rule ``cfg`` breaks, and ``ValueError`` when
    its parameters would not fit this machine's memory."""
    from anydepth.validate import check_model_memory

    check_model_memory(cfg)
    for rule in RULES:
        if rule.invalid(cfg):
            raise InvalidCombination(rule.name, rule.message(cfg))


def build_stack(
    cfg: ModelConfig,
    *,
    arch: Arch = "decoder",
    cross: bool = False,
    n_enc_layers: int = 0,
    n_dec_layers: int = 0,
) -> nn.Module:
    """The blocks of ``cfg`` wrapped in its stack, each sublayer told its position for depth-aware init."""
    n_sub = 3 if cross else 2
    blocks = []
    for layer in range(cfg.depth):
        shared: dict[str, Any] = {}

        def ctx(sub: int, layer=layer, shared=shared) -> LayerContext:
            return LayerContext(
                layer=layer,
                n_layers=cfg.depth,
                sublayer=sub,
                n_sublayers=n_sub,
                arch=arch,
                n_enc_layers=n_enc_layers,
                n_dec_layers=n_dec_layers,
                shared=shared,
            )

        def attention(sub: int, is_cross: bool):
            return ATTENTIONS.build(
                cfg.attention if not is_cross or cfg.attention.kind == "full" else "full",
                dim=cfg.dim,
                heads=cfg.heads,
                dim_head=cfg.head_dim,
                causal=cfg.causal and not is_cross,
                ctx=ctx(sub),
                cross=is_cross,
            )

        def residual(sub: int):
            return RESIDUALS.build(cfg.residual, dim=cfg.dim, ctx=ctx(sub), norm=cfg.norm)

        ff_sub = n_sub - 1
        ff = FFS.build(cfg.ff, dim=cfg.dim)
        if cross:
            block = CrossBlock(attention(0, False), residual(0), attention(1, True), residual(1), ff, residual(2))
        else:
            block = Block(attention(0, False), residual(0), ff, residual(ff_sub))
        for res, branch in zip(block.residuals(), block.branches()):
            res.init_branch_(branch)
        blocks.append(block)
    return STACKS.build(cfg.stack, blocks=nn.ModuleList(blocks), dim=cfg.dim)


def build_model(cfg: ModelConfig | EncoderDecoderConfig | dict):
    """Builds the model a config describes.

    Args:
        cfg: a :class:`ModelConfig` (decoder-only or encoder-only LM), an
            :class:`EncoderDecoderConfig`, or either one's ``to_dict()`` form.

    Returns:
        ``TransformerLM`` or ``EncoderDecoder``; both return logits.

    Raises:
        InvalidCombination: the configuration breaks a rule of :data:`RULES`.
    """
    from anydepth.model.encdec import EncoderDecoder
    from anydepth.model.lm import TransformerLM

    if isinstance(cfg, dict):
        cfg = config_from_any_dict(cfg)
    if isinstance(cfg, EncoderDecoderConfig):
        check(cfg.encoder)
        check(cfg.decoder)
        return EncoderDecoder(cfg)
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"build_model expects a ModelConfig or EncoderDecoderConfig, got {type(cfg).__name__}")
    check(cfg)
    return TransformerLM(cfg)
