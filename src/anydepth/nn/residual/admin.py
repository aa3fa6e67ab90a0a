"""Admin residual, ``N(w * x + F(x))`` (Liu et al. 2020), its closed-form ``w`` and the profiled init."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from anydepth.nn.context import LayerContext
from anydepth.nn.registry import RESIDUALS
from anydepth.nn.residual.base import Residual, _as_dtype, _build_norm, _call_branch, _check_dim, _check_float

__all__ = ["Admin", "ADMIN_SCALES", "admin_omega", "admin_profile_"]

ADMIN_SCALES = ("O(logn)", "default", "O(n)", "O(1)")


def admin_omega(num_res_layers: int, output_change_scale: str = "O(logn)") -> float:
    """Admin's closed-form skip scale ``w`` for ``N = num_res_layers`` residual sublayers.

    From Liu et al. 2020 ("Understanding the Difficulty of Training Transformers") as closed-formed
    by admin-torch: the output change under a weight update of ``LN(w*x + F(x))`` stacked N times is

    - ``"O(n)"``: ``w = 1`` (plain post-LN),
    - ``"O(logn)"`` / ``"default"``: ``w = sqrt((N + 1) / ln(N + 1) - 1)``,
    - ``"O(1)"``: ``w = sqrt(N)``.

    ``N`` counts every residual sublayer: 2 per encoder or decoder-only layer, 3 per decoder layer
    with cross-attention. For ``N <= 2`` the O(logn) value exceeds the O(1) one (N=1: 1.373 > 1).
    """
    if isinstance(num_res_layers, bool) or not isinstance(num_res_layers, numbers.Integral):
        raise TypeError(
            "num_res_layers must be an int (the number of residual sublayers: 2 per encoder layer, 3 per "
            f"decoder layer with cross-attention), got {type(num_res_layers).__name__} {num_res_layers!r}"
        )
    if num_res_layers < 1:
        raise ValueError(
            f"num_res_layers must be >= 1, got {num_res_layers!r}; count every residual sublayer "
            "(an n-layer encoder has 2n, an n-layer decoder with cross-attention 3n)"
        )
    n = int(num_res_layers)
    if output_change_scale in ("O(logn)", "default"):
        return math.sqrt((n + 1) / math.log(n + 1) - 1)
    if output_change_scale == "O(n)":
        return 1.0
    if output_change_scale == "O(1)":
        return math.sqrt(n)
    raise ValueError(
        f"output_change_scale={output_change_scale!r} is not supported; use one of "
        f"{', '.join(repr(s) for s in ADMIN_SCALES)}"
    )


class _AdminProfile:
    """State of one profiling pass: the running ratio of each chain and the values it assigned."""

    def __init__(self) -> None:
        self.ratio: dict[str, float] = {}
        self.seen: set[int] = set()
        self.values: dict[str, list[float]] = {}

    def visit(self, module: Admin, x: Tensor, fx: Tensor) -> None:
        group = module.profile_group
        if id(module) not in self.seen:
            self.seen.add(id(module))
            ratio = self.ratio.get(group, 1.0)
            module.set_omega_(ratio)
            self.values.setdefault(group, []).append(ratio)
        skip = (x * _as_dtype(module.omega, x)).double()
        self.ratio[group] = math.sqrt(skip.var(unbiased=False).item() + fx.double().var(unbiased=False).item())


@RESIDUALS.register("admin")
class Admin(Residual):
    """Admin residual: ``N(w * x + F(x))`` (Liu et al. 2020, "Understanding the Difficulty of
    Training Transformers").

    ``w`` scales the skip, not the branch, so the output change of a post-norm stack under an update
    grows as O(log N) (default) or O(1) instead of O(N); see :func:`admin_omega` for the closed
    forms, with ``N = ctx.total`` residual sublayers. ``w`` is a ``[1]`` buffer (admin-torch's
    default) or, with ``as_parameter=True``, a trainable per-channel ``[dim]`` vector (the original
    Admin). :func:`admin_profile_` replaces the closed form by the original paper's data-dependent
    profiled init.

    Constraints: post-norm placement only; ``w > 1`` is derived for a norm with statistics after the
    sum (``LN(w*x + F(x))``), so there is no placement option and the rule table asks for LayerNorm or
    RMSNorm. ``w`` is created in the module's device and dtype (it follows ``torch.device(...)``
    contexts and ``.to()``) and :meth:`reset_parameters` refills it, so ``to_empty()`` works. The
    multiplication runs in the input's dtype.

    Exactly one of ``ctx`` (closed-form ``w`` for its depth) and ``init_value`` (explicit ``w``) is
    given. ``norm=None`` leaves the sum un-normalised, for hosts that apply their own norm
    (``anydepth.compat.admin_torch.OmegaResidual``).
    """

    placement = "post"
    final_norm = False
    needs_norm_statistics = True
    folds_to_postnorm = True

    @dataclass(kw_only=True)
    class Config:
        output_change_scale: str = "O(logn)"  # output change growth: "O(logn)", "O(1)" or "O(n)"
        as_parameter: bool = False  # trainable per-channel w (the original Admin) instead of a fixed scalar

        # configs saved when placement was an option (with "post", its only legal value) still load
        retired: ClassVar[dict[str, Any]] = {"placement": "post"}

    def __init__(
        self,
        cfg: Config | None = None,
        *,
        dim: int | None = None,
        ctx: LayerContext | None = None,
        norm: Any = "layer",
        init_value: float | None = None,
    ):
        super().__init__()
        cfg = self.config_of(cfg)
        who = type(self).__name__
        if (ctx is None) == (init_value is None):
            raise ValueError(
                f"{who}: give exactly one of ctx (closed-form w for ctx.total residual sublayers) and "
                f"init_value (explicit w); got ctx={ctx!r}, init_value={init_value!r}"
            )
        self.num_res_layers = None if ctx is None else ctx.total
        if init_value is None:
            init_value = admin_omega(self.num_res_layers, cfg.output_change_scale)
        self.init_value = _check_float(init_value, "init_value", who)
        self.output_change_scale = cfg.output_change_scale
        self.as_parameter = cfg.as_parameter
        if self.as_parameter or norm is not None:
            reason = "as_parameter=True makes w a per-channel vector" if self.as_parameter else "the norm needs it"
            if dim is None:
                raise ValueError(f"{who}: dim is required ({reason}); pass the width of the residual")
            dim = _check_dim(dim, who)
        self.dim = dim
        if self.as_parameter:
            self.omega = nn.Parameter(torch.empty(dim))
        else:
            self.register_buffer("omega", torch.empty(1))
        self.norm = nn.Identity() if norm is None else _build_norm(norm, dim)
        # chain of admin_profile_'s recurrence (the encoder and decoder of an encoder-decoder differ)
        self.profile_group = "default" if ctx is None else ctx.arch
        self._profile: _AdminProfile | None = None
        self.reset_parameters()

    def skip_scale(self) -> Tensor:
        """``w`` of ``LN(w*x + F(x))``: omega, one value or one per channel."""
        return self.omega.detach().float()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.omega.fill_(self.init_value)

    def set_omega_(self, value: float) -> None:
        """Sets ``w`` (and the value :meth:`reset_parameters` restores) to ``value``."""
        self.init_value = _check_float(value, "value", type(self).__name__)
        self.reset_parameters()

    def combine(self, x: Tensor, fx: Tensor) -> Tensor:
        """``w * x + f_x``, the un-normalised Admin sum (admin-torch's ``OmegaResidual``)."""
        if self.as_parameter and x.shape[-1] != self.omega.shape[0]:
            raise ValueError(
                f"{type(self).__name__}: per-channel w has {self.omega.shape[0]} channels but the input's "
                f"last dimension is {x.shape[-1]} (shape {tuple(x.shape)}); build it with the residual width"
            )
        if self._profile is not None:
            self._profile.visit(self, x, fx)
        return x * _as_dtype(self.omega, x) + fx

    def forward(self, x: Tensor, f, *args, **kwargs) -> Tensor:
        return self.norm(self.combine(x, _call_branch(self, f, x, args, kwargs)))

    def no_weight_decay(self) -> list[torch.nn.Parameter]:
        return [self.omega] if self.as_parameter else []

    def extra_repr(self) -> str:
        kind = "parameter" if self.as_parameter else "buffer"
        return f"w={self.init_value:.6g} ({kind}), output_change_scale={self.output_change_scale!r}"


def admin_profile_(model: nn.Module, *inputs: Any, **kwargs: Any) -> dict[str, list[float]]:
    """Data-dependent Admin init of the original paper (Liu et al. 2020, Transformer-Clinic's
    ``adaptive-profiling``): one forward pass ``model(*inputs, **kwargs)`` that sets every Admin ``w``.

    In the order the residuals run, with a ratio starting at 1 for each chain::

        w_i   = ratio
        ratio = sqrt(Var[w_i * x_{i-1}] + Var[F_i(x_{i-1})])     (population variance over all elements)

    so ``w_i ~ sqrt(sum_{j<i} Var F_j)``, and the forward pass continues with the new ``w_i``. Chains
    are kept apart by ``Admin.profile_group`` (the builder sets the architecture: an encoder-decoder's
    encoder and decoder are profiled separately, as in the original). The pass runs without gradients
    in the model's current mode (the original profiled in training mode, dropout included).
    Returns ``{group: [w_1, w_2, ...]}``. Raises ``ValueError`` if the model has no Admin residual or if
    the pass did not reach all of them.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"admin_profile_: model must be an nn.Module, got {type(model).__name__}")
    admins = [(name, m) for name, m in model.named_modules() if isinstance(m, Admin)]
    if not admins:
        raise ValueError("admin_profile_: the model has no Admin residual to profile; build it with residual='admin'")
    state = _AdminProfile()
    for _, m in admins:
        m._profile = state
    try:
        with torch.no_grad():
            model(*inputs, **kwargs)
    finally:
        for _, m in admins:
            m._profile = None
    missing = [name or "(model)" for name, m in admins if id(m) not in state.seen]
    if missing:
        raise ValueError(
            f"admin_profile_: the forward pass did not reach the Admin residual(s) {', '.join(missing)}; "
            "pass inputs (and keyword arguments) that run the whole model"
        )
    return state.values
