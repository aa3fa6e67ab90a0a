"""Named configurations as functions: ``presets.rezero(depth=64)`` returns a :class:`ModelConfig`.

Each preset sets only what defines the scheme; every other field keeps the ModelConfig default and
any field can be overridden by keyword. Whether the model gets a norm after the stack is the residual
scheme's own declaration (its ``final_norm`` class attribute): a scheme that normalises after the sum
ends normalised already, as in its paper, and ReZero has no norm at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from anydepth.model.config import ModelConfig
from anydepth.registry import RESIDUALS


def _preset(scheme: Any, /, **fields: Any) -> ModelConfig:
    """A ModelConfig with the residual ``scheme`` and ``fields`` (which may override any field, the residual
    included); ``final_norm`` follows what ``scheme`` declares unless given."""
    kind = scheme if isinstance(scheme, str) else scheme.kind
    return ModelConfig(**{"residual": scheme, "final_norm": RESIDUALS.get(kind).final_norm, **fields})


def prenorm(**kw: Any) -> ModelConfig:
    """Pre-LN: ``x + F(LN(x))`` with a final LN (GPT-2, Xiong et al. 2020)."""
    return _preset("prenorm", **{"norm": "layer", **kw})


def postnorm(**kw: Any) -> ModelConfig:
    """Post-LN: ``LN(x + F(x))`` (Vaswani et al. 2017); needs warm-up and fails at depth."""
    return _preset("postnorm", **{"norm": "layer", **kw})


def rezero(**kw: Any) -> ModelConfig:
    """ReZero: ``x + a*F(x)``, ``a = 0`` at init, no norms anywhere (Bachlechner et al. 2020)."""
    return _preset("rezero", **kw)


def admin(**kw: Any) -> ModelConfig:
    """Admin: ``LN(w*x + F(x))``, ``w`` from the number of residual sublayers (Liu et al. 2020)."""
    return _preset("admin", **{"norm": "layer", **kw})


def deepnorm(**kw: Any) -> ModelConfig:
    """DeepNorm: ``LN(alpha*x + F(x))`` with beta-scaled init (Wang et al. 2022)."""
    return _preset("deepnorm", **{"norm": "layer", **kw})


def layerscale(**kw: Any) -> ModelConfig:
    """LayerScale: ``x + diag(g)*F(LN(x))``, ``g`` small at init (Touvron et al. 2021)."""
    return _preset("layerscale", **{"norm": "layer", **kw})


def hyper(**kw: Any) -> ModelConfig:
    """Hyper-connections with 4 dynamic residual streams (Zhu et al. 2025), pre-LN branches."""
    return _preset(RESIDUALS.config("hyper", streams=4), **{"norm": "layer", **kw})


def rms(**kw: Any) -> ModelConfig:
    """Pre-LN with RMSNorm in place of LayerNorm (Zhang & Sennrich 2019)."""
    return _preset("prenorm", **{"norm": "rms", **kw})


def prms(**kw: Any) -> ModelConfig:
    """Pre-LN with partial RMSNorm, statistic from the first 1/16 of the features (pRMSNorm)."""
    from anydepth.registry import NORMS

    return _preset("prenorm", **{"norm": NORMS.config("prms", p=0.0625), **kw})


def reformer(**kw: Any) -> ModelConfig:
    """Reformer: LSH attention, reversible stack, chunked feed-forward, rotary positions (Kitaev et al. 2020)."""
    from anydepth.registry import FFS

    return _preset(
        "prenorm",
        **{
            "attention": "lsh",
            "stack": "reversible",
            "ff": FFS.config("mlp", chunks=4),
            "position": "rotary",
            **kw,
        },
    )


def periln(**kw: Any) -> ModelConfig:
    """Peri-LN (sandwich norm): ``x + LN(F(LN(x)))`` with a final LN (Kim et al. 2025; Gemma 2/3)."""
    return _preset("periln", **{"norm": "layer", **kw})


def dyt(**kw: Any) -> ModelConfig:
    """Pre-LN placement with DyT, ``gamma*tanh(alpha*x) + beta``, in place of every LayerNorm (Zhu et al. 2025)."""
    return _preset("prenorm", **{"norm": "dyt", **kw})


def layer_scaling(**kw: Any) -> ModelConfig:
    """Pre-LN with LayerNorm Scaling: the norm output times ``1/sqrt(l)`` at block l (Sun et al. 2025)."""
    return _preset(RESIDUALS.config("prenorm", layer_scaling=True), **{"norm": "layer", **kw})


def mhc_lite(**kw: Any) -> ModelConfig:
    """mHC-lite with 4 streams: residual mixing as a convex combination of the 24 permutation matrices
    (arXiv 2601.05732), pre-LN branches."""
    return _preset(RESIDUALS.config("mhc_lite", streams=4), **{"norm": "layer", **kw})


def denseformer(**kw: Any) -> ModelConfig:
    """Pre-LN blocks in the DenseFormer stack: a learned depth-weighted average after each block
    (Pagliardini et al. 2024)."""
    return _preset("prenorm", **{"norm": "layer", "stack": "dense", **kw})


def qk_norm(**kw: Any) -> ModelConfig:
    """Pre-LN with qk-layernorm: q and k normalised per head (Dehghani et al. 2023; Wortsman et al. 2023)."""
    from anydepth.registry import ATTENTIONS

    attention = ATTENTIONS.config("full", qk_norm="layer")
    return _preset("prenorm", **{"norm": "layer", "attention": attention, **kw})


def value_residual(**kw: Any) -> ModelConfig:
    """Pre-LN with value residual learning, ``v_l = 0.5 v_1 + 0.5 v_l`` (ResFormer, Zhou et al. 2024)."""
    from anydepth.registry import ATTENTIONS

    attention = ATTENTIONS.config("full", value_residual=True)
    return _preset("prenorm", **{"norm": "layer", "attention": attention, **kw})


def depth_scaled(**kw: Any) -> ModelConfig:
    """Pre-LN with output projections times ``1/sqrt(2N)`` at init (GPT-2, Radford et al. 2019)."""
    return _preset("prenorm", **{"norm": "layer", "init": "depth_scaled", **kw})


def zero_out(**kw: Any) -> ModelConfig:
    """Pre-LN with zero output projections at init: every block starts as the identity (SkipInit-style)."""
    return _preset("prenorm", **{"norm": "layer", "init": "zero_out", **kw})


PRESETS: dict[str, Callable[..., ModelConfig]] = {
    f.__name__: f
    for f in (
        prenorm,
        postnorm,
        rezero,
        admin,
        deepnorm,
        layerscale,
        hyper,
        rms,
        prms,
        reformer,
        periln,
        dyt,
        layer_scaling,
        mhc_lite,
        denseformer,
        qk_norm,
        value_residual,
        depth_scaled,
        zero_out,
    )
}


def get(name: str, **overrides: Any) -> ModelConfig:
    """The preset ``name`` with ``overrides`` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name](**overrides)
