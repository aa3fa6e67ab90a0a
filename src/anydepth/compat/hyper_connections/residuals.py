"""``hyper_connections.residuals``: alternative updates ``(branch_output x, residual r) -> new residual``,
for ``depth_residual_fn=`` of the hyper-connection classes (or any residual sublayer).

- :class:`GRUGatedResidual`: ``GRUCell(input=x, hidden=r)`` per token (GTrXL, Parisotto et al. 2019);
- :class:`GatedResidual`: ``x + g (r - x)`` with ``g = sigmoid(W [x; r] + b)``, one gate per token or
  per feature (``fine_gate``);
- :class:`OrthogonalResidualUpdate`: ``r + x - (x . u) u`` with ``u = r / ||r||``: only the part of
  the update orthogonal to the residual is added (in float64 by default);
- :class:`MVSplitResidualUpdate`: ``r + beta (x - mean(x)) + alpha (mean(x) - mean(r))``, means over
  dim -2 (the streams in ``(..., s, d)``), per-feature ``alpha`` (init 0) and ``beta`` (init 0.03).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GRUGatedResidual", "GatedResidual", "MVSplitResidualUpdate", "OrthogonalResidualUpdate"]


class GRUGatedResidual(nn.Module):
    """``new = GRUCell(x, r)`` over the last dim (torch's ``nn.GRUCell``, the package's parameters)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gru = nn.GRUCell(dim, dim)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        d = x.shape[-1]
        return self.gru(x.reshape(-1, d), residual.reshape(-1, d)).view(x.shape)


class GatedResidual(nn.Module):
    """``lerp(x, r, sigmoid(W [x; r] + b))``, the features of both concatenated after the first two dims."""

    def __init__(self, dim: int, fine_gate: bool = False):
        super().__init__()
        self.to_learned_mix = nn.Linear(dim * 2, dim if fine_gate else 1)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape != residual.shape:
            raise ValueError(
                f"GatedResidual: x and residual must have one shape (b, n, ...), got {tuple(x.shape)} "
                f"and {tuple(residual.shape)}"
            )
        both = torch.cat((x.flatten(2), residual.flatten(2)), dim=-1)
        return x.lerp(residual, self.to_learned_mix(both).sigmoid())


class OrthogonalResidualUpdate(nn.Module):
    """``r + (x - (x . u) u)``, ``u = r / ||r||`` over the last dim; the projection is computed in float64
    when ``double_precision`` (it cancels most of ``x`` when ``x`` is nearly parallel to ``r``). The
    result has the residual's dtype (the package returns float64 there)."""

    def __init__(self, double_precision: bool = True):
        super().__init__()
        self.double_precision = double_precision

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        r = residual
        if self.double_precision:
            x, r = x.double(), r.double()
        unit = F.normalize(r, dim=-1)
        orthogonal = x - (x * unit).sum(-1, keepdim=True) * unit
        return residual + orthogonal.to(residual.dtype)


class MVSplitResidualUpdate(nn.Module):
    """Mean/variation split update (Lu, arXiv 2605.06169): the centred update scaled by ``beta`` plus
    the drift of the mean scaled by ``alpha``, means over dim -2."""

    def __init__(self, dim: int, init_alpha: float = 0.0, init_beta: float = 0.03, **kwargs):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((dim,), float(init_alpha)))
        self.beta = nn.Parameter(torch.full((dim,), float(init_beta)))

    def prepare(self, residual: Tensor):
        """``(branch_input, residual, {})``: the residual passes unchanged."""
        return residual, residual, {}

    def forward(self, x: Tensor, residual: Tensor, **kwargs) -> Tensor:
        mean_x = x.mean(dim=-2, keepdim=True)
        mean_r = residual.mean(dim=-2, keepdim=True)
        return residual + (x - mean_x) * self.beta + (mean_x - mean_r) * self.alpha
