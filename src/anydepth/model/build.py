"""``build_model(cfg)``: the rule table, the per-layer context, and the init.

Every combination of residual x norm x attention x stack x position that the rule table accepts
builds and trains; every combination it rejects raises :class:`InvalidCombination` with a message
that says why and what to use instead. The rules live in one list, :data:`RULES`, so reading it
tells you everything the builder refuses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from anydepth.model.block import Block, CrossBlock
from anydepth.model.config import EncoderDecoderConfig, ModelConfig, config_from_any_dict
from anydepth.model.encdec import EncoderDecoder
from anydepth.model.lm import TransformerLM
from anydepth.nn.context import Arch, LayerContext
from anydepth.registry import ATTENTIONS, FFS, NORMS, POSITIONS, RESIDUALS, STACKS


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


def _schemes(wanted: Callable[[type], bool]) -> str:
    """The registered residual kinds whose class attributes satisfy ``wanted``, for the messages."""
    kinds = [k for k in RESIDUALS.kinds() if wanted(RESIDUALS.get(k))]
    return ", ".join(repr(k) for k in kinds) or "(none registered)"


def _reversible_ok(cls: type) -> bool:
    return cls.additive and getattr(cls, "streams", 1) == 1 and "streams" not in _fields(cls)


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls.Config)}


def _value_residual(cfg: ModelConfig) -> bool:
    return getattr(cfg.attention, "value_residual", None) is not None


def _has_statistics(kind: str) -> bool:
    return getattr(NORMS.get(kind), "has_statistics", True)


def _stats_norm(cfg: ModelConfig) -> bool:
    return _has_statistics(cfg.norm.kind)


def _stats_norms() -> str:
    return ", ".join(f"norm={k!r}" for k in NORMS.kinds() if _has_statistics(k))


RULES: list[Rule] = [
    Rule(
        "reversible-single-stream",
        lambda c: c.stack.kind == "reversible" and _streams(c) > 1,
        lambda c: (
            f"the reversible stack splits one residual into two halves (y1 = x1 + F(x2), y2 = x2 + G(y1)); "
            f"residual {c.residual.kind!r} carries {_streams(c)} mixed streams, whose update cannot be "
            f"inverted that way. Use stack='sequential' with {c.residual.kind!r}, or a single-stream additive "
            f"residual ({_schemes(_reversible_ok)}) with stack='reversible'."
        ),
    ),
    Rule(
        "reversible-additive",
        lambda c: c.stack.kind == "reversible" and not _residual_cls(c).additive,
        lambda c: (
            f"the reversible stack recovers each block's input by subtracting its update (x = y - F(.)), which "
            f"needs x + F(x); residual {c.residual.kind!r} (norm placement {_residual_cls(c).placement!r}) "
            "normalises after the sum, and a norm is not invertible. Use one of "
            f"{_schemes(_reversible_ok)} with stack='reversible', or keep this residual with stack='sequential'."
        ),
    ),
    Rule(
        "value-residual-reversible",
        lambda c: c.stack.kind == "reversible" and _value_residual(c),
        lambda c: (
            "value_residual mixes the first layer's values into every later layer (v_l = lam v_1 + (1 - lam) v_l); "
            "the reversible stack recomputes each block on its own in backward, so the gradient through v_1 "
            "would never reach the first layer. Use stack='sequential' or 'dense' with value_residual, or "
            "drop value_residual to keep the reversible stack."
        ),
    ),
    Rule(
        "value-residual-layer-dropout",
        lambda c: _value_residual(c) and getattr(c.stack, "layer_dropout", 0.0) > 0,
        lambda c: (
            "value_residual reads the first layer's values in every later layer; LayerDrop "
            f"(layer_dropout={c.stack.layer_dropout}) may skip the first block, leaving no v_1 to mix. "
            "Set layer_dropout=0 or drop value_residual."
        ),
    ),
    Rule(
        "post-norm-needs-statistics",
        lambda c: _residual_cls(c).needs_norm_statistics and not _stats_norm(c),
        lambda c: (
            f"{c.residual.kind} up-weights the skip (w*x + F(x), w > 1) and relies on the norm after the sum to divide "
            f"the scale back out; norm {c.norm.kind!r} has no statistics (tanh(alpha x) does not undo w), so the "
            f"skip only saturates it. Use a norm with statistics ({_stats_norms()}) with {c.residual.kind}, or keep "
            f"norm={c.norm.kind!r} "
            f"with a pre-norm residual ({_schemes(lambda r: r.placement == 'pre')})."
        ),
    ),
    Rule(
        "zero-out-gated",
        lambda c: c.init == "zero_out" and _residual_cls(c).gate_starts_at_zero,
        lambda c: (
            f"init='zero_out' zeroes each branch's output projection while {c.residual.kind}'s gate starts at 0 too: "
            "the gate's gradient is F(x) = 0 and that of the projection is proportional to the gate = 0, so neither "
            "ever moves and every block stays the identity. Use init='default' with "
            f"{c.residual.kind} (its gate already starts each block as the identity), or init='zero_out' with "
            f"another residual ({_schemes(lambda r: r.additive and not r.gate_starts_at_zero)})."
        ),
    ),
    Rule(
        "init-owned-by-scheme",
        lambda c: c.init != "default" and _residual_cls(c).owns_branch_init,
        lambda c: (
            f"{c.residual.kind} initialises the branch weights itself (init_branch_); init={c.init!r} would scale "
            "the output projections a second time and break the bound the scheme is derived for. Use "
            f"init='default' with {c.residual.kind}, or init={c.init!r} with another residual."
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
    stack_shared: dict[str, Any] = {}
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
                stack=stack_shared,
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
            init_output_projection_(branch, cfg.init, len(block.residuals()) * cfg.depth)
        blocks.append(block)
    return STACKS.build(cfg.stack, blocks=nn.ModuleList(blocks), dim=cfg.dim)


def output_projections(branch: nn.Module) -> list[nn.Linear]:
    """The linear layers whose output is the branch's output (attention ``to_out``, feed-forward
    ``proj_out``): what depth-scaled init scales and :func:`anydepth.model.reparam.reparameterize` divides."""
    out = [m for name in ("to_out", "proj_out") if isinstance(m := getattr(branch, name, None), nn.Linear)]
    if not out:
        raise TypeError(
            f"{type(branch).__name__} has no output projection (an nn.Linear named to_out or proj_out); a branch "
            "used with init='depth_scaled'/'zero_out' or reparameterize() must end in one"
        )
    return out


def init_output_projection_(branch: nn.Module, init: str, n_residual: int) -> None:
    """``init="depth_scaled"``: the branch's output projection times ``1/sqrt(n_residual)`` (GPT-2,
    Radford et al. 2019: ``1/sqrt(2N)`` for N blocks of two sublayers); ``"zero_out"``: zero (each
    branch starts as the zero map, SkipInit-style, De & Smith 2020); ``"default"``: untouched. Biases are
    zero after every branch's own init and stay so. Applied once at build, after the residual's own
    branch init."""
    if init == "default":
        return
    with torch.no_grad():
        for lin in output_projections(branch):
            if init == "zero_out":
                lin.weight.zero_()
            else:
                lin.weight.mul_(n_residual**-0.5)


def build_lm(
    cfg: ModelConfig,
    *,
    arch: Arch | None = None,
    cross: bool = False,
    n_enc_layers: int = 0,
    n_dec_layers: int = 0,
    head: bool = True,
) -> TransformerLM:
    """A :class:`TransformerLM` of ``cfg`` (not checked against :data:`RULES`; :func:`build_model` does
    that): its embeddings, positions, stack, final norm and head built here and handed to the model. ``arch``
    defaults to ``"decoder"`` for a causal ``cfg`` and ``"encoder"`` otherwise."""
    arch = arch or ("decoder" if cfg.causal else "encoder")
    emb_dim = cfg.emb_dim or cfg.dim
    # Built in this order so that a seed gives the same weights whatever builds the model.
    tok_emb = nn.Embedding(cfg.vocab_size, emb_dim)
    emb_proj = nn.Linear(emb_dim, cfg.dim, bias=False) if emb_dim != cfg.dim else nn.Identity()
    position = POSITIONS.build(cfg.position, dim=cfg.dim, dim_head=cfg.head_dim, max_seq_len=cfg.max_seq_len)
    stack = build_stack(cfg, arch=arch, cross=cross, n_enc_layers=n_enc_layers, n_dec_layers=n_dec_layers)
    norm = NORMS.build(cfg.norm, dim=cfg.dim) if cfg.final_norm else nn.Identity()
    if not head:
        head_module = None
    elif cfg.tie_embeddings:
        # Factorised and tied: project back to emb_dim, then score against the embedding table.
        head_module = nn.Linear(cfg.dim, emb_dim, bias=False) if emb_dim != cfg.dim else nn.Identity()
    else:
        head_module = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
    return TransformerLM(
        cfg,
        tok_emb=tok_emb,
        emb_proj=emb_proj,
        position=position,
        stack=stack,
        norm=norm,
        head=head_module,
        cross=cross,
    )


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
    if isinstance(cfg, dict):
        cfg = config_from_any_dict(cfg)
    if isinstance(cfg, EncoderDecoderConfig):
        check(cfg.encoder)
        check(cfg.decoder)
        n_enc, n_dec = cfg.encoder.depth, cfg.decoder.depth
        enc_cfg = cfg.encoder if not cfg.encoder.causal else cfg.encoder.replace(causal=False)
        depths = {"n_enc_layers": n_enc, "n_dec_layers": n_dec}
        return EncoderDecoder(
            cfg,
            encoder=build_lm(enc_cfg, arch="encdec_encoder", head=False, **depths),
            decoder=build_lm(cfg.decoder, arch="encdec_decoder", cross=True, **depths),
        )
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"build_model expects a ModelConfig or EncoderDecoderConfig, got {type(cfg).__name__}")
    check(cfg)
    return build_lm(cfg)
