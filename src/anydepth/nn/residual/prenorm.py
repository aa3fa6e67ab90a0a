"""Pre-norm residual, ``x + F(N(x))`` (Xiong et al. 2020), with LayerNorm Scaling as an option."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from anydepth.nn.context import LayerContext
from anydepth.nn.registry import RESIDUALS
from anydepth.nn.residual.base import Residual, _build_norm, _call_branch, _check_dim

__all__ = ["PreNorm", "layer_scaling_factor"]


def layer_scaling_factor(layer: int) -> float:
    """LayerNorm Scaling's factor ``1/sqrt(l)`` for block ``l = layer + 1`` (Sun et al. 2025,
    "The Curse of Depth in Large Language Models", arXiv 2502.05795)."""
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or layer < 0:
        raise ValueError(f"layer_scaling_factor: layer must be a 0-based block index >= 0, got {layer!r}")
    return 1.0 / math.sqrt(layer + 1)


@RESIDUALS.register("prenorm")
class PreNorm(Residual):
    """Pre-norm residual: ``x + F(N(x))`` (Xiong et al. 2020; the GPT-2 placement).

    The skip path never passes through a norm, so the residual grows with depth and the model needs
    a final norm after the stack (``final_norm = True``).

    ``layer_scaling=True`` is LayerNorm Scaling (Sun et al. 2025, arXiv 2502.05795):
    ``x + F(N(x) / sqrt(l))`` at block ``l = ctx.layer + 1``, which keeps the variance of deep pre-LN
    layers from growing so fast that they become near-identities.
    """

    additive = True
    placement = "pre"

    @dataclass(kw_only=True)
    class Config:
        layer_scaling: bool = False  # LayerNorm Scaling: the norm's output times 1/sqrt(l) at block l

    def __init__(self, cfg: Config | None = None, *, dim: int, ctx: LayerContext | None = None, norm: Any = "layer"):
        super().__init__()
        cfg = self.config_of(cfg)
        if not isinstance(cfg.layer_scaling, bool):
            raise ValueError(
                f"{self.kind}: layer_scaling must be True (norm output times 1/sqrt(l) at block l) or False, "
                f"got {cfg.layer_scaling!r}"
            )
        self.dim = _check_dim(dim, type(self).__name__)
        self.norm = _build_norm(norm, self.dim)
        self.scale = layer_scaling_factor((ctx or LayerContext()).layer) if cfg.layer_scaling else 1.0

    def _branch_input(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        return h if self.scale == 1.0 else h * self.scale

    def delta(self, x: Tensor, f, *args, **kwargs) -> Tensor:
        return _call_branch(self, f, self._branch_input(x), args, kwargs)

    def forward(self, x: Tensor, f, *args, **kwargs) -> Tensor:
        return x + self.delta(x, f, *args, **kwargs)
