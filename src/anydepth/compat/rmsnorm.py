"""The RMSNorm reference code's PyTorch class, ``rmsnorm_torch.RMSNorm(d, p=-1., eps=1e-8, bias=False)``.

A translation to :class:`anydepth.nn.norms.RMSNorm`: the original's keywords and defaults become a
``RMSNorm.Config`` (eps added outside the square root, as the original computes it), so the layer,
its parameter names (``scale``, ``offset``) and its state dicts are the library's.
"""

from __future__ import annotations

from anydepth.nn import norms

__all__ = ["RMSNorm"]


class RMSNorm(norms.RMSNorm):
    """``RMSNorm(d, p=-1., eps=1e-8, bias=False)``: ``x / (RMS(x) + eps) * scale (+ offset)``, the statistic
    from the first ``floor(d*p)`` features for ``0 < p <= 1`` (partial RMSNorm). ``eps_placement="inside"``
    gives ``torch.nn.RMSNorm``'s ``sqrt(mean(x^2) + eps)`` instead."""

    def __init__(
        self, d: int, p: float = -1.0, eps: float = 1e-8, bias: bool = False, *, eps_placement: str = "outside"
    ):
        cfg = norms.RMSNorm.Config(p=p, eps=eps, bias=bias, eps_placement=eps_placement)
        super().__init__(cfg, dim=d)
