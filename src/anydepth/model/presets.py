"""Named configurations as functions: ``presets.rezero(depth=64)`` returns a :class:`ModelConfig`.

Each preset sets only what defines the scheme; every other field keeps the ModelConfig default and
any field can be overridden by keyword. Schemes that normalise after the sum (post-LN, Admin,
DeepNorm) end normalised already, so they use no extra final norm, as in their papers; ReZero has no
norm at all (Bachlechner et al. 2020).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from anydepth.model.config import ModelConfig


def prenorm(**kw: Any) -> ModelConfig:
    """Pre-LN: ``x + F(LN(x))`` with a final LN (GPT-2, Xiong et al. 2020)."""
    return ModelConfig(**{"residual": "prenorm", "norm": "layer", **kw})


def postnorm(**kw: Any) -> ModelConfig:
    """Post-LN: ``LN(x + F(x))`` (Vaswani et al. 2017); needs warm-up and fails at depth."""
    return ModelConfig(**{"residual": "postnorm", "norm": "layer", "final_norm": False, **kw})


def rezero(**kw: Any) -> ModelConfig:
    """ReZero: ``x + a*F(x)``, ``a = 0`` at init, no norms anywhere (Bachlechner et al. 2020)."""
    return ModelConfig(**{"residual": "rezero", "final_norm": False, **kw})


def admin(**kw: Any) -> ModelConfig:
    """Admin: ``LN(w*x + F(x))``, ``w`` from the number of residual sublayers (Liu et al. 2020)."""
    return ModelConfig(**{"residual": "admin", "norm": "layer", "final_norm": False, **kw})


def deepnorm(**kw: Any) -> ModelConfig:
    """DeepNorm: ``LN(alpha*x + F(x))`` with beta-scaled init (Wang et al. 2022)."""
    return ModelConfig(**{"residual": "deepnorm", "norm": "layer", "final_norm": False, **kw})


def layerscale(**kw: Any) -> ModelConfig:
    """LayerScale: ``x + diag(g)*F(LN(x))``, ``g`` small at init (Touvron et al. 2021)."""
    return ModelConfig(**{"residual": "layerscale", "norm": "layer", **kw})


def hyper(**kw: Any) -> ModelConfig:
    """Hyper-connections with 4 dynamic residual streams (Zhu et al. 2025), pre-LN branches."""
    from anydepth.registry import RESIDUALS

    return ModelConfig(**{"residual": RESIDUALS.config("hyper", streams=4), "norm": "layer", **kw})


def rms(**kw: Any) -> ModelConfig:
    """Pre-LN with RMSNorm in place of LayerNorm (Zhang & Sennrich 2019)."""
    return ModelConfig(**{"residual": "prenorm", "norm": "rms", **kw})


def prms(**kw: Any) -> ModelConfig:
    """Pre-LN with partial RMSNorm, statistic from the first 1/16 of the features (pRMSNorm)."""
    from anydepth.registry import NORMS

    return ModelConfig(**{"residual": "prenorm", "norm": NORMS.config("prms", p=0.0625), **kw})


def reformer(**kw: Any) -> ModelConfig:
    """Reformer: LSH attention, reversible stack, chunked feed-forward, rotary positions (Kitaev et al. 2020)."""
    from anydepth.registry import FFS

    return ModelConfig(
        **{
            "residual": "prenorm",
            "attention": "lsh",
            "stack": "reversible",
            "ff": FFS.config("mlp", chunks=4),
            "position": "rotary",
            **kw,
        }
    )


PRESETS: dict[str, Callable[..., ModelConfig]] = {
    f.__name__: f for f in (prenorm, postnorm, rezero, admin, deepnorm, layerscale, hyper, rms, prms, reformer)
}


def get(name: str, **overrides: Any) -> ModelConfig:
    """The preset ``name`` with ``overrides`` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name](**overrides)
