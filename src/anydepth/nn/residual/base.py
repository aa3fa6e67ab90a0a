"""The base class every residual scheme derives from, and the checks the schemes share.

A scheme declares what the model builder's rule table (``anydepth.model.build.RULES``) and the
presets need to know about it as class attributes (see :class:`Residual`); neither names a scheme.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from anydepth.nn.registry import NORMS, Configurable

__all__ = ["Residual"]


class Residual(Configurable, nn.Module):
    """Base class of every residual scheme.

    Class attributes, read by the rule table, the presets and the stacks:

    - ``additive``: ``forward(x, f) == x + delta(x, f)`` exactly, so the scheme can run inside the
      reversible stack (``y1 = x1 + F(x2)`` needs an invertible, additive update).
    - ``placement``: ``"pre"`` (norm on the branch input), ``"post"`` (norm after the sum) or
      ``"none"``.
    - ``streams``: number of residual streams; a scheme with more than one (hyper-connections)
      makes the stack call :meth:`expand` before the first block and :meth:`reduce` after the last.
      A scheme whose Config has a ``streams`` field reads it from there.
    - ``final_norm``: whether the model wants a norm after the stack with this scheme (a scheme that
      normalises after the sum ends normalised; ReZero has no norm at all). The presets read it.
    - ``needs_norm_statistics``: the scheme up-weights the skip and relies on a norm with statistics
      (LayerNorm, RMSNorm) after the sum to divide the scale back out.
    - ``gate_starts_at_zero``: the branch output is multiplied by a learned gate that is 0 at init,
      so a branch whose output projection is also zero (``init="zero_out"``) never gets a gradient.
    - ``owns_branch_init``: :meth:`init_branch_` sets the branch's weights itself, so the model's
      ``init`` option must stay ``"default"``.
    - ``folds_to_postnorm``: the scheme is ``LN(w*x + F(x))`` with a positive skip scale
      ``w = skip_scale()``, so ``anydepth.model.reparam`` can fold ``w`` into the branch weights and
      give a plain post-LN model of the same function.

    Constructor contract, used by ``RESIDUALS.build(cfg, dim=..., ctx=..., norm=...)``:
    ``Scheme(cfg, *, dim, ctx: LayerContext, norm)`` reads every option from ``cfg`` (its own
    ``Config``; ``None`` means the defaults) and its position from ``ctx``; ``norm`` is a norm config
    (or kind name) the scheme builds with ``NORMS.build(norm, dim=dim)`` if it uses one. Options are
    stated once, in ``Config``; ``Scheme.make(dim=..., ctx=..., **options)`` builds one by hand.

    Every scheme also offers ``reset_parameters()``, which re-applies its own init (``a``, ``w``,
    ``g``), so a model built on the meta device can be materialised with ``to_empty()``.
    """

    additive: ClassVar[bool] = False
    placement: ClassVar[str] = "none"
    streams: int = 1
    final_norm: ClassVar[bool] = True
    needs_norm_statistics: ClassVar[bool] = False
    gate_starts_at_zero: ClassVar[bool] = False
    owns_branch_init: ClassVar[bool] = False
    folds_to_postnorm: ClassVar[bool] = False

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

    def reset_parameters(self) -> None:
        """Re-applies the scheme's own init; schemes without parameters of their own have nothing to do."""

    def no_weight_decay(self) -> list[torch.nn.Parameter]:
        """Parameters the trainer keeps out of weight decay (ReZero's a, Admin's w, mixing weights, ...)."""
        return []


# ---------------------------------------------------------------------------------------------------
# shared checks


def _check_dim(dim: Any, who: str) -> int:
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim <= 0:
        raise ValueError(f"{who}: dim must be a positive int (the width of the residual), got {dim!r}")
    return int(dim)


def _check_float(value: Any, name: str, who: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{who}: {name} must be a finite number, got {value!r}")
    return float(value)


def _check_dropout(p: Any, who: str) -> float:
    p = _check_float(p, "dropout", who)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{who}: dropout must lie in [0, 1), got {p!r}; use 0.0 to disable it")
    return p


def _build_norm(norm: Any, dim: int) -> nn.Module:
    return NORMS.build(norm, dim=dim)


def _call_branch(who: Residual, f, h: Tensor, args, kwargs) -> Tensor:
    # Calling a tensor fails deep inside torch with "'Tensor' object is not callable"; the usual cause
    # is the admin-torch habit of passing f(x) instead of f, so the message names that fix.
    if not callable(f) or isinstance(f, Tensor):
        raise TypeError(
            f"{type(who).__name__}(x, f) takes the branch f as a callable and evaluates f(h) itself "
            f"(h is the normed or raw input, depending on the scheme); got {type(f).__name__}. To combine an "
            "already computed branch output use anydepth.compat.admin_torch.OmegaResidual()(x, f_x)."
        )
    return f(h, *args, **kwargs)


def _as_dtype(t: Tensor, x: Tensor) -> Tensor:
    # Scales are stored in the module's dtype; casting to the input's dtype keeps a bf16/fp16
    # residual stream in its dtype instead of promoting it to fp32 through a [1]-shaped fp32 tensor.
    return t if t.dtype == x.dtype else t.to(x.dtype)
