"""Post-norm residual, ``N(x + F(x))`` (Vaswani et al. 2017)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from anydepth.nn.context import LayerContext
from anydepth.nn.registry import RESIDUALS
from anydepth.nn.residual.base import Residual, _build_norm, _call_branch, _check_dim

__all__ = ["PostNorm"]


@RESIDUALS.register("postnorm")
class PostNorm(Residual):
    """Post-norm residual: ``N(x + F(x))`` (Vaswani et al. 2017, "Attention Is All You Need").

    Its output change under a weight update grows as O(N) with the number of sublayers (Liu et al.
    2020), which is why deep post-norm stacks need warm-up; ``admin`` and ``deepnorm`` fix this. It
    ends normalised, so the model needs no final norm.
    """

    placement = "post"
    final_norm = False

    @dataclass(kw_only=True)
    class Config:
        pass

    def __init__(self, cfg: Config | None = None, *, dim: int, ctx: LayerContext | None = None, norm: Any = "layer"):
        super().__init__()
        self.config_of(cfg)
        self.dim = _check_dim(dim, "PostNorm")
        self.norm = _build_norm(norm, self.dim)

    def forward(self, x: Tensor, f, *args, **kwargs) -> Tensor:
        return self.norm(x + _call_branch(self, f, x, args, kwargs))
