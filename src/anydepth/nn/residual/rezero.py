"""ReZero residual, ``x + a * F(x)`` with ``a = 0`` at init and no norm (Bachlechner et al. 2020)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from anydepth.nn.context import LayerContext
from anydepth.nn.registry import RESIDUALS
from anydepth.nn.residual.base import Residual, _as_dtype, _call_branch, _check_dropout, _check_float

__all__ = ["ReZero", "SharedGate"]


class SharedGate:
    """A reference to the gate ``getattr(owner, name)`` of another module.

    A plain object rather than a submodule: the owner is usually the referring module's parent (an
    RZTX layer) or a sibling (the first ReZero of a block), and registering it as a child would make
    the module tree cyclic or write the gate twice into the state dict. ``deepcopy`` and pickling
    follow the reference like any attribute, so a copied model shares its copied gate.
    """

    __slots__ = ("owner", "name")

    def __init__(self, owner: nn.Module, name: str):
        if not isinstance(owner, nn.Module):
            raise TypeError(
                f"ReZero: shared_with must be the nn.Module that owns the shared gate, got {type(owner).__name__}"
            )
        if not isinstance(getattr(owner, name, None), Tensor):
            raise ValueError(
                f"ReZero: shared_with={type(owner).__name__} has no tensor attribute {name!r}; "
                "register the gate there first or pass shared_name"
            )
        self.owner = owner
        self.name = name

    def get(self) -> Tensor:
        return getattr(self.owner, self.name)


@RESIDUALS.register("rezero")
class ReZero(Residual):
    """ReZero residual: ``x + drop(a * F(x))`` with ``a = 0`` at init and no norm (Bachlechner et al.
    2020, "ReZero is All You Need: Fast Convergence at Large Depth").

    Every sublayer starts as the identity map (dynamical isometry), so deep stacks train without
    warm-up or norms; the model needs no final norm. ``a`` has shape ``[1]`` like the original's
    ``resweight``.

    Sharing: the original RZTX layers use one ``a`` per layer, shared by its attention and
    feed-forward sublayers. With ``shared=True`` the first ReZero of a block (``ctx.shared``) owns
    the gate and the others read it through a :class:`SharedGate`; ``shared_with=module`` reads
    ``getattr(module, shared_name)`` instead (the RZTX layers' ``resweight``). The owner holds the
    only copy, so the state dict has one entry and ``no_weight_decay()`` reports it only from the owner.

    ``dropout`` is applied to the gated branch, after the multiplication by ``a``, which is the
    order of the RZTX encoder layer; a branch that carries its own dropout gives ``x + a*drop(F(x))``.
    """

    additive = True
    placement = "none"
    final_norm = False
    gate_starts_at_zero = True

    @dataclass(kw_only=True)
    class Config:
        shared: bool = True  # one a per block shared by its sublayers (the original); False: one per sublayer
        init: float = 0.0  # a at init; 0 makes every block the identity (the paper)
        dropout: float = 0.0  # dropout on the gated branch a*F(x), as in the RZTX encoder layer

    def __init__(
        self,
        cfg: Config | None = None,
        *,
        dim: int | None = None,
        ctx: LayerContext | None = None,
        norm: Any = None,
        shared_with: nn.Module | None = None,
        shared_name: str = "a",
    ):
        super().__init__()
        cfg = self.config_of(cfg)
        self.init = _check_float(cfg.init, "init", "ReZero")
        p = _check_dropout(cfg.dropout, "ReZero")
        # An Identity rather than Dropout(0) so that p=0 draws nothing from the RNG stream.
        self.drop = nn.Dropout(p) if p > 0 else nn.Identity()
        if shared_with is None and cfg.shared and ctx is not None:
            shared_with = ctx.shared.get(self.kind)
            if shared_with is None:
                ctx.shared[self.kind] = self
        self.shared = None if shared_with is None else SharedGate(shared_with, shared_name)
        if self.shared is None:
            self.a = nn.Parameter(torch.empty(1))
            self.reset_parameters()

    @property
    def gate(self) -> Tensor:
        """The gate ``a`` this sublayer uses (its own, or the one it shares)."""
        return self.a if self.shared is None else self.shared.get()

    def reset_parameters(self) -> None:
        if self.shared is None:
            with torch.no_grad():
                self.a.fill_(self.init)

    def delta(self, x: Tensor, f, *args, **kwargs) -> Tensor:
        fx = _call_branch(self, f, x, args, kwargs)
        return self.drop(_as_dtype(self.gate, fx) * fx)

    def forward(self, x: Tensor, f, *args, **kwargs) -> Tensor:
        return x + self.delta(x, f, *args, **kwargs)

    def no_weight_decay(self) -> list[torch.nn.Parameter]:
        # Weight decay would pull a towards 0, i.e. back to the identity (rezero issue #14).
        return [self.a] if self.shared is None else []

    def extra_repr(self) -> str:
        if self.shared is None:
            return f"init={self.init}"
        return f"init={self.init}, shared_with={type(self.shared.owner).__name__}.{self.shared.name}"
