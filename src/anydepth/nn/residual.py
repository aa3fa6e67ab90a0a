"""Residual schemes: where the norm goes and how the skip and the branch are combined.

Every scheme is a registered :class:`Residual` subclass. It is told its position (``LayerContext``:
layer index and total count), builds its own norm from the norm config it is given, owns its
depth-dependent init, and is called as ``x = residual(x, branch, *args, **kwargs)``, which evaluates
``branch(h, *args, **kwargs)`` once.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from anydepth.nn.context import LayerContext
from anydepth.registry import RESIDUALS  # noqa: F401  (schemes below register here)


class Residual(nn.Module):
    """Base class of every residual scheme.

    Class attributes read by the model builder's rule table and the stacks:

    - ``additive``: ``forward(x, f) == x + delta(x, f)`` exactly, so the scheme can run inside the
      reversible stack (``y1 = x1 + F(x2)`` needs an invertible, additive update).
    - ``placement``: ``"pre"`` (norm on the branch input), ``"post"`` (norm after the sum) or
      ``"none"``.
    - ``streams``: number of residual streams; a scheme with more than one (hyper-connections)
      makes the stack call :meth:`expand` before the first block and :meth:`reduce` after the last.

    Constructor contract, used by ``RESIDUALS.build(cfg, dim=..., ctx=..., norm=...)``:
    ``from_config(cfg, *, dim, ctx: LayerContext, norm)`` where ``norm`` is a norm config (or kind
    name) the scheme builds with ``NORMS.build(norm, dim=dim)`` if it uses one.
    """

    additive: ClassVar[bool] = False
    placement: ClassVar[str] = "none"
    streams: int = 1

    def forward(self, x: Tensor, f, *args, **kwargs) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def delta(self, x: Tensor, f, *args, **kwargs) -> Tensor:
        """The additive update, for schemes with ``additive = True``: ``forward(x, f) = x + delta(x, f)``."""
        raise TypeError(f"{type(self).__name__} is not additive; it has no delta() for the reversible stack")

    def init_branch_(self, branch: nn.Module) -> None:
        """Depth-dependent init of the branch's weights (e.g. DeepNorm's beta); called once by the builder."""

    def expand(self, x: Tensor) -> Tensor:
        """Widen the residual into ``streams`` streams before the first block (identity for one stream)."""
        return x

    def reduce(self, x: Tensor) -> Tensor:
        """Merge the streams back after the last block (identity for one stream)."""
        return x

    @classmethod
    def from_config(cls, cfg, *, dim: int, ctx: LayerContext | None = None, norm="layer"):
        return cls(dim, cfg, ctx=ctx or LayerContext(), norm=norm)

    def no_weight_decay(self) -> list[torch.nn.Parameter]:
        """Parameters the trainer keeps out of weight decay (ReZero's a, Admin's w, mixing weights, ...)."""
        return []
