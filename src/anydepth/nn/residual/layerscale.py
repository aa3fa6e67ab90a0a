"""LayerScale residual, ``x + diag(g) F(N(x))`` with a small ``g`` at init (Touvron et al. 2021)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from anydepth.nn.context import LayerContext
from anydepth.nn.registry import RESIDUALS
from anydepth.nn.residual.base import Residual, _as_dtype, _build_norm, _call_branch, _check_dim, _check_float

__all__ = ["LayerScale", "layerscale_init"]


def layerscale_init(depth: int) -> float:
    """CaiT's init of LayerScale's ``g`` by depth (Touvron et al. 2021, sec. 3): 0.1 up to 18 blocks,
    1e-5 up to 24, 1e-6 beyond."""
    if depth <= 18:
        return 0.1
    if depth <= 24:
        return 1e-5
    return 1e-6


@RESIDUALS.register("layerscale")
class LayerScale(Residual):
    """LayerScale residual: ``x + diag(g) F(N(x))`` with a small per-channel ``g`` at init (Touvron et
    al. 2021, "Going deeper with Image Transformers").

    Pre-norm placement with a learned per-channel gate: each block starts close to the identity,
    like ReZero, but keeps the norm on the branch input and lets each channel open separately.
    ``g`` is excluded from weight decay. ``init=None`` takes CaiT's value for ``ctx.n_layers``.
    """

    additive = True
    placement = "pre"

    @dataclass(kw_only=True)
    class Config:
        init: float | None = None  # g at init; None: CaiT's rule by depth (see layerscale_init)

    def __init__(self, cfg: Config | None = None, *, dim: int, ctx: LayerContext | None = None, norm: Any = "layer"):
        super().__init__()
        cfg = self.config_of(cfg)
        self.dim = _check_dim(dim, "LayerScale")
        init = layerscale_init((ctx or LayerContext()).n_layers) if cfg.init is None else cfg.init
        self.init = _check_float(init, "init", "LayerScale")
        self.norm = _build_norm(norm, self.dim)
        self.g = nn.Parameter(torch.empty(self.dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.g.fill_(self.init)

    def delta(self, x: Tensor, f, *args, **kwargs) -> Tensor:
        fx = _call_branch(self, f, self.norm(x), args, kwargs)
        return _as_dtype(self.g, fx) * fx

    def forward(self, x: Tensor, f, *args, **kwargs) -> Tensor:
        return x + self.delta(x, f, *args, **kwargs)

    def no_weight_decay(self) -> list[torch.nn.Parameter]:
        return [self.g]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, init={self.init:g}"
