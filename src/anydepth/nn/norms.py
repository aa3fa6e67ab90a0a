"""Normalisation layers (placeholder; the full implementation replaces this file)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from anydepth.registry import NORMS


@NORMS.register("layer")
class LayerNorm(nn.Module):
    @dataclass(kw_only=True)
    class Config:
        eps: float = 1e-5
        bias: bool = True

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    @classmethod
    def from_config(cls, cfg, *, dim):
        return cls(dim, eps=cfg.eps, bias=cfg.bias)

    def forward(self, x):
        return F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)


@NORMS.register("rms")
class RMSNorm(nn.Module):
    @dataclass(kw_only=True)
    class Config:
        eps: float = 1e-8
        p: float = -1.0
        bias: bool = False

    def __init__(self, d: int, p: float = -1.0, eps: float = 1e-8, bias: bool = False):
        super().__init__()
        self.d, self.p, self.eps = d, p, eps
        self.scale = nn.Parameter(torch.ones(d))
        self.offset = nn.Parameter(torch.zeros(d)) if bias else None

    @classmethod
    def from_config(cls, cfg, *, dim):
        return cls(dim, p=cfg.p, eps=cfg.eps, bias=cfg.bias)

    def forward(self, x):
        rms = x.float().pow(2).mean(-1, keepdim=True).sqrt()
        y = (x.float() / (rms + self.eps)).to(x.dtype) * self.scale
        return y + self.offset if self.offset is not None else y
