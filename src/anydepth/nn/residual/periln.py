"""Peri-LN (sandwich norm), ``x + N_out(F(N_in(x)))`` (Kim et al. 2025)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from anydepth.nn.context import LayerContext
from anydepth.nn.registry import RESIDUALS
from anydepth.nn.residual.base import _build_norm, _call_branch
from anydepth.nn.residual.prenorm import PreNorm

__all__ = ["PeriLN"]


@RESIDUALS.register("periln")
class PeriLN(PreNorm):
    """Peri-LN (sandwich norm): ``x + N_out(F(N_in(x)))`` (Kim et al. 2025, "Peri-LN: Revisiting Layer
    Normalization in the Transformer Architecture", arXiv 2502.02732; Gemma 2/3; Ding et al. 2021's
    CogView sandwich-LN).

    A norm on both sides of the branch: the input norm as in pre-LN, and an output norm that bounds
    what each branch adds to the skip, so the residual's variance grows steadily (not
    exponentially with massive activations) while the skip itself is never normalised. Additive, so
    it runs in the reversible stack; like pre-LN it needs the final norm. ``layer_scaling`` scales
    the input norm's output by ``1/sqrt(l)`` as for :class:`PreNorm`.
    """

    @dataclass(kw_only=True)
    class Config:
        layer_scaling: bool = False  # LayerNorm Scaling on the input norm: times 1/sqrt(l) at block l

    def __init__(self, cfg: Config | None = None, *, dim: int, ctx: LayerContext | None = None, norm: Any = "layer"):
        super().__init__(cfg, dim=dim, ctx=ctx, norm=norm)
        self.norm_out = _build_norm(norm, self.dim)

    def delta(self, x: Tensor, f, *args, **kwargs) -> Tensor:
        return self.norm_out(_call_branch(self, f, self._branch_input(x), args, kwargs))
