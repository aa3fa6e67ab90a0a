"""Residual schemes: where the norm goes and how the skip and the branch are combined.

Every scheme is a registered :class:`Residual` subclass. It is told its position (``LayerContext``:
layer index and total count), builds its own norm from the norm config it is given, owns its
depth-dependent init, and is called as ``x = residual(x, branch, *args, **kwargs)``, which evaluates
``branch(h, *args, **kwargs)`` once.

========== ============================== ==========================================================
kind       update of one sublayer         paper
========== ============================== ==========================================================
prenorm    ``x + F(N(x))``                Xiong et al. 2020, "On Layer Normalization in the
                                          Transformer Architecture" (GPT-2 placement)
postnorm   ``N(x + F(x))``                Vaswani et al. 2017, "Attention Is All You Need"
rezero     ``x + a * F(x)``, ``a = 0``    Bachlechner et al. 2020, "ReZero is All You Need"
admin      ``N(w * x + F(x))``            Liu et al. 2020, "Understanding the Difficulty of
                                          Training Transformers"
deepnorm   ``N(alpha * x + F(x))``        Wang et al. 2022, "DeepNet: Scaling Transformers to
                                          1,000 Layers"
layerscale ``x + g * F(N(x))``, small g   Touvron et al. 2021, "Going deeper with Image
                                          Transformers" (CaiT)
periln     ``x + N(F(N(x)))``             Kim et al. 2025, "Peri-LN" (sandwich norm, Gemma 2/3)
========== ============================== ==========================================================

``N`` is the norm the model is configured with (``NORMS.build(norm, dim=dim)``).
"""

from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from anydepth.nn.context import LayerContext
from anydepth.nn.registry import NORMS, RESIDUALS

__all__ = [
    "Residual",
    "PreNorm",
    "PeriLN",
    "PostNorm",
    "ReZero",
    "Admin",
    "DeepNorm",
    "LayerScale",
    "ADMIN_SCALES",
    "admin_omega",
    "admin_profile_",
    "deepnorm_constants",
    "layerscale_init",
    "layer_scaling_factor",
]


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

    Every scheme here also offers ``reset_parameters()``, which re-applies its own init (``a``, ``w``,
    ``g``), so a model built on the meta device can be materialised with ``to_empty()``.
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


def _check_placement(placement: Any, who: str, what: str) -> None:
    if placement != "post":
        raise ValueError(
            f"{who}: placement={placement!r} is not supported; {what} > 1 on the skip is derived for "
            f"LN({what}*x + F(x)) (norm after the sum), and with pre-norm placement the skip is never "
            "normalised, so it would only inflate the residual. Use placement='post' (the default), "
            "or residual='prenorm' for pre-norm placement."
        )


def _build_norm(norm: Any, dim: int) -> nn.Module:
    return NORMS.build(norm, dim=dim)


def _call_branch(who: Residual, f, h: Tensor, args, kwargs) -> Tensor:
    # Calling a tensor fails deep inside torch with "'Tensor' object is not callable"; the usual cause
    # is the admin-torch habit of passing f(x) instead of f, so the message names that fix.
    if not callable(f) or isinstance(f, Tensor):
        raise TypeError(
            f"{type(who).__name__}(x, f) takes the branch f as a callable and evaluates f(h) itself "
            f"(h is the normed or raw input, depending on the scheme); got {type(f).__name__}. To combine an "
            "already computed branch output use anydepth.admin.OmegaResidual()(x, f_x)."
        )
    return f(h, *args, **kwargs)


def _as_dtype(t: Tensor, x: Tensor) -> Tensor:
    # Scales are stored in the module's dtype; casting to the input's dtype keeps a bf16/fp16
    # residual stream in its dtype instead of promoting it to fp32 through a [1]-shaped fp32 tensor.
    return t if t.dtype == x.dtype else t.to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# pre- and post-norm


def layer_scaling_factor(layer: int) -> float:
    """LayerNorm Scaling's factor ``1/sqrt(l)`` for block ``l = layer + 1`` (Sun et al. 2025,
    "The Curse of Depth in Large Language Models", arXiv 2502.05795)."""
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or layer < 0:
        raise ValueError(f"layer_scaling_factor: layer must be a 0-based block index >= 0, got {layer!r}")
    return 1.0 / math.sqrt(layer + 1)


def _check_scale(scale: Any, who: str) -> float:
    scale = _check_float(scale, "scale", who)
    if scale <= 0:
        raise ValueError(f"{who}: scale must be > 0 (1/sqrt(l) for LayerNorm Scaling, 1 without), got {scale!r}")
    return scale


@RESIDUALS.register("prenorm")
class PreNorm(Residual):
    """Pre-norm residual: ``x + F(N(x))`` (Xiong et al. 2020; the GPT-2 placement).

    The skip path never passes through a norm, so the residual grows with depth and the model needs
    a final norm after the stack (``ModelConfig.final_norm``).

    ``layer_scaling=True`` is LayerNorm Scaling (Sun et al. 2025, arXiv 2502.05795):
    ``x + F(N(x) / sqrt(l))`` at block ``l = 1..L``, which keeps the variance of deep pre-LN layers
    from growing so fast that they become near-identities.
    """

    additive = True
    placement = "pre"

    @dataclass(kw_only=True)
    class Config:
        layer_scaling: bool = False  # LayerNorm Scaling: the norm's output times 1/sqrt(l) at block l

    def __init__(self, dim: int, *, norm: Any = "layer", scale: float = 1.0):
        super().__init__()
        self.dim = _check_dim(dim, type(self).__name__)
        self.norm = _build_norm(norm, self.dim)
        self.scale = _check_scale(scale, type(self).__name__)

    @classmethod
    def from_config(cls, cfg, *, dim: int, ctx: LayerContext | None = None, norm: Any = "layer"):
        ctx = ctx or LayerContext()
        scale = layer_scaling_factor(ctx.layer) if _layer_scaling(cfg) else 1.0
        return cls(dim, norm=norm, scale=scale)

    def _branch_input(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        return h if self.scale == 1.0 else h * self.scale

    def delta(self, x: Tensor, f, *args, **kwargs) -> Tensor:
        return _call_branch(self, f, self._branch_input(x), args, kwargs)

    def forward(self, x: Tensor, f, *args, **kwargs) -> Tensor:
        return x + self.delta(x, f, *args, **kwargs)


@RESIDUALS.register("postnorm")
class PostNorm(Residual):
    """Post-norm residual: ``N(x + F(x))`` (Vaswani et al. 2017).

    Its output change under a weight update grows as O(N) with the number of sublayers (Liu et al.
    2020), which is why deep post-norm stacks need warm-up; ``admin`` and ``deepnorm`` fix this.
    """

    placement = "post"

    @dataclass(kw_only=True)
    class Config:
        pass

    def __init__(self, dim: int, *, norm: Any = "layer"):
        super().__init__()
        self.dim = _check_dim(dim, "PostNorm")
        self.norm = _build_norm(norm, self.dim)

    @classmethod
    def from_config(cls, cfg, *, dim: int, ctx: LayerContext | None = None, norm: Any = "layer"):
        return cls(dim, norm=norm)

    def forward(self, x: Tensor, f, *args, **kwargs) -> Tensor:
        return self.norm(x + _call_branch(self, f, x, args, kwargs))


def _layer_scaling(cfg) -> bool:
    value = cfg.layer_scaling
    if not isinstance(value, bool):
        raise ValueError(
            f"{type(cfg).kind}: layer_scaling must be True (norm output times 1/sqrt(l) at block l) or False, "
            f"got {value!r}"
        )
    return value


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

    def __init__(self, dim: int, *, norm: Any = "layer", scale: float = 1.0):
        super().__init__(dim, norm=norm, scale=scale)
        self.norm_out = _build_norm(norm, self.dim)

    def delta(self, x: Tensor, f, *args, **kwargs) -> Tensor:
        return self.norm_out(_call_branch(self, f, self._branch_input(x), args, kwargs))


# ---------------------------------------------------------------------------------------------------
# ReZero


@RESIDUALS.register("rezero")
class ReZero(Residual):
    """ReZero residual: ``x + drop(a * F(x))`` with ``a = 0`` at init and no norm (Bachlechner et al. 2020).

    Every sublayer starts as the identity map (dynamical isometry), so deep stacks train without
    warm-up or norms. ``a`` has shape ``[1]`` like the original's ``resweight``.

    Sharing: the original RZTX layers use one ``a`` per layer, shared by its attention and
    feed-forward sublayers. A ReZero built with ``shared_with=module`` reads its gate from
    ``getattr(module, shared_name)`` instead of owning one; the owner holds the only copy, so the
    state dict has one entry and ``no_weight_decay()`` reports it only from the owner.

    ``dropout`` is applied to the gated branch, after the multiplication by ``a``, which is the
    order of the RZTX encoder layer; a branch that carries its own dropout gives ``x + a*drop(F(x))``.
    """

    additive = True
    placement = "none"

    @dataclass(kw_only=True)
    class Config:
        shared: bool = True  # one a per block shared by its sublayers (the original); False: one per sublayer
        init: float = 0.0  # a at init; 0 makes every block the identity (the paper)
        dropout: float = 0.0  # dropout on the gated branch a*F(x), as in the RZTX encoder layer

    def __init__(
        self,
        init: float = 0.0,
        *,
        dropout: float = 0.0,
        shared_with: nn.Module | None = None,
        shared_name: str = "a",
    ):
        super().__init__()
        self.init = _check_float(init, "init", "ReZero")
        p = _check_dropout(dropout, "ReZero")
        # An Identity rather than Dropout(0) so that p=0 draws nothing from the RNG stream.
        self.drop = nn.Dropout(p) if p > 0 else nn.Identity()
        if shared_with is None:
            self.a = nn.Parameter(torch.empty(1))
            self._owner = None
            self.reset_parameters()
        else:
            if not isinstance(shared_with, nn.Module):
                raise TypeError(
                    f"ReZero: shared_with must be the nn.Module that owns the shared gate, "
                    f"got {type(shared_with).__name__}"
                )
            if not isinstance(getattr(shared_with, shared_name, None), Tensor):
                raise ValueError(
                    f"ReZero: shared_with={type(shared_with).__name__} has no tensor attribute "
                    f"{shared_name!r}; register the gate there first or pass shared_name"
                )
            # Kept out of _modules: the owner is registered elsewhere in the model (possibly as this
            # module's parent), and registering it here would duplicate its state-dict entries.
            object.__setattr__(self, "_owner", shared_with)
        self._shared_name = shared_name

    @classmethod
    def from_config(cls, cfg, *, dim: int | None = None, ctx: LayerContext | None = None, norm: Any = None):
        ctx = ctx or LayerContext()
        if cfg.shared:
            owner = ctx.shared.get("rezero")
            if owner is not None:
                return cls(cfg.init, dropout=cfg.dropout, shared_with=owner, shared_name="a")
            res = cls(cfg.init, dropout=cfg.dropout)
            ctx.shared["rezero"] = res
            return res
        return cls(cfg.init, dropout=cfg.dropout)

    @property
    def gate(self) -> Tensor:
        """The gate ``a`` this sublayer uses (its own, or the one it shares)."""
        if self._owner is None:
            return self.a
        return getattr(self._owner, self._shared_name)

    def reset_parameters(self) -> None:
        if self._owner is None:
            with torch.no_grad():
                self.a.fill_(self.init)

    def delta(self, x: Tensor, f, *args, **kwargs) -> Tensor:
        fx = _call_branch(self, f, x, args, kwargs)
        return self.drop(_as_dtype(self.gate, fx) * fx)

    def forward(self, x: Tensor, f, *args, **kwargs) -> Tensor:
        return x + self.delta(x, f, *args, **kwargs)

    def no_weight_decay(self) -> list[torch.nn.Parameter]:
        # Weight decay would pull a towards 0, i.e. back to the identity (rezero issue #14).
        return [self.a] if self._owner is None else []

    def extra_repr(self) -> str:
        shared = (
            "" if self._owner is None else f", shared_with={type(self._owner).__name__}.{self._shared_name}"
        )
        return f"init={self.init}{shared}"


# ---------------------------------------------------------------------------------------------------
# Admin

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
        self.ratio[group] = math.sqrt(
            skip.var(unbiased=False).item() + fx.double().var(unbiased=False).item()
        )


@RESIDUALS.register("admin")
class Admin(Residual):
    """Admin residual: ``N(w * x + F(x))`` (Liu et al. 2020, "Understanding the Difficulty of
    Training Transformers").

    ``w`` scales the skip, not the branch, so the output change of a post-norm stack under an update
    grows as O(log N) (default) or O(1) instead of O(N); see :func:`admin_omega` for the closed
    forms. ``w`` is a ``[1]`` buffer (admin-torch's default) or, with ``as_parameter=True``, a
    trainable per-channel ``[dim]`` vector (the original Admin). :func:`admin_profile_` replaces the
    closed form by the original paper's data-dependent profiled init.

    Constraints: post-norm placement only (``w > 1`` is derived for a norm after the sum), and
    ``num_res_layers >= 1``. ``w`` is created in the module's device and dtype (it follows
    ``torch.device(...)`` contexts and ``.to()``) and :meth:`reset_parameters` refills it, so
    ``to_empty()`` works. The multiplication runs in the input's dtype.

    Exactly one of ``num_res_layers`` (closed form) and ``init_value`` (explicit ``w``) is given.
    ``norm=None`` leaves the sum un-normalised, for hosts that apply their own norm
    (``anydepth.admin.OmegaResidual``).
    """

    placement = "post"

    @dataclass(kw_only=True)
    class Config:
        output_change_scale: str = "O(logn)"  # output change growth: "O(logn)", "O(1)" or "O(n)"
        as_parameter: bool = False  # trainable per-channel w (the original Admin) instead of a fixed scalar
        placement: str = "post"  # only "post": w > 1 on the skip is derived for LN(w*x + F(x))

    def __init__(
        self,
        dim: int | None = None,
        num_res_layers: int | None = None,
        output_change_scale: str = "O(logn)",
        *,
        as_parameter: bool = False,
        norm: Any = "layer",
        init_value: float | None = None,
        placement: str = "post",
    ):
        super().__init__()
        who = type(self).__name__
        _check_placement(placement, who, "w")
        if (num_res_layers is None) == (init_value is None):
            raise ValueError(
                f"{who}: give exactly one of num_res_layers (closed-form w) and init_value (explicit w); "
                f"got num_res_layers={num_res_layers!r}, init_value={init_value!r}"
            )
        if init_value is None:
            init_value = admin_omega(num_res_layers, output_change_scale)
        self.init_value = _check_float(init_value, "init_value", who)
        self.num_res_layers = num_res_layers
        self.output_change_scale = output_change_scale
        needs_dim = as_parameter or norm is not None
        if needs_dim:
            reason = "as_parameter=True makes w a per-channel vector" if as_parameter else "the norm needs it"
            if dim is None:
                raise ValueError(f"{who}: dim is required ({reason}); pass the width of the residual")
            dim = _check_dim(dim, who)
        self.dim = dim
        self.as_parameter = bool(as_parameter)
        if self.as_parameter:
            self.omega = nn.Parameter(torch.empty(dim))
        else:
            self.register_buffer("omega", torch.empty(1))
        self.norm = nn.Identity() if norm is None else _build_norm(norm, dim)
        self.profile_group = (
            "default"  # chain of admin_profile_'s recurrence (the encoder and decoder differ)
        )
        self._profile: _AdminProfile | None = None
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg, *, dim: int, ctx: LayerContext | None = None, norm: Any = "layer"):
        ctx = ctx or LayerContext()
        res = cls(
            dim,
            ctx.total,
            cfg.output_change_scale,
            as_parameter=cfg.as_parameter,
            norm=norm,
            placement=cfg.placement,
        )
        res.profile_group = ctx.arch
        return res

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
        raise ValueError(
            "admin_profile_: the model has no Admin residual to profile; build it with residual='admin'"
        )
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


# ---------------------------------------------------------------------------------------------------
# DeepNorm


def deepnorm_constants(arch: str, n_layers: int, n_enc_layers: int = 0, n_dec_layers: int = 0):
    """DeepNorm's ``(alpha, beta)`` (Wang et al. 2022, "DeepNet: Scaling Transformers to 1,000 Layers").

    ============== ========================== ==========================
    arch           alpha (skip scale)         beta (init gain)
    ============== ========================== ==========================
    encoder        ``(2N)^(1/4)``             ``(8N)^(-1/4)``
    decoder        ``(2M)^(1/4)``             ``(8M)^(-1/4)``
    encdec_encoder ``0.81 (N^4 M)^(1/16)``    ``0.87 (N^4 M)^(-1/16)``
    encdec_decoder ``(3M)^(1/4)``             ``(12M)^(-1/4)``
    ============== ========================== ==========================

    N is the encoder depth and M the decoder depth, in blocks. For ``encoder`` and ``decoder`` that is
    ``n_layers``; for ``encdec_encoder`` N is ``n_enc_layers`` (``n_layers`` if 0) and M is
    ``n_dec_layers`` (required); for ``encdec_decoder`` M is ``n_dec_layers`` (``n_layers`` if 0).
    The encoder beta is the paper's 0.87, not torchscale's 1.15.
    """
    for name, v in (("n_layers", n_layers), ("n_enc_layers", n_enc_layers), ("n_dec_layers", n_dec_layers)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
            raise ValueError(f"deepnorm_constants: {name} must be a non-negative int, got {v!r}")
    if arch in ("encoder", "decoder"):
        if n_layers < 1:
            raise ValueError(f"deepnorm_constants: n_layers must be >= 1 for arch={arch!r}, got {n_layers!r}")
        return (2 * n_layers) ** 0.25, (8 * n_layers) ** -0.25
    if arch == "encdec_encoder":
        n = n_enc_layers or n_layers
        if n < 1 or n_dec_layers < 1:
            raise ValueError(
                "deepnorm_constants: arch='encdec_encoder' needs the encoder depth (n_enc_layers or "
                "n_layers) and the decoder depth n_dec_layers, both >= 1; "
                f"got n_enc_layers={n_enc_layers!r}, n_layers={n_layers!r}, n_dec_layers={n_dec_layers!r}"
            )
        base = (n**4 * n_dec_layers) ** (1 / 16)
        return 0.81 * base, 0.87 / base
    if arch == "encdec_decoder":
        m = n_dec_layers or n_layers
        if m < 1:
            raise ValueError(
                f"deepnorm_constants: arch='encdec_decoder' needs the decoder depth >= 1 (n_dec_layers or "
                f"n_layers), got n_dec_layers={n_dec_layers!r}, n_layers={n_layers!r}"
            )
        return (3 * m) ** 0.25, (12 * m) ** -0.25
    raise ValueError(
        f"deepnorm_constants: unknown arch {arch!r}; "
        "use 'encoder', 'decoder', 'encdec_encoder' or 'encdec_decoder'"
    )


@RESIDUALS.register("deepnorm")
class DeepNorm(Residual):
    """DeepNorm residual: ``N(alpha * x + F(x))`` (Wang et al. 2022, "DeepNet: Scaling Transformers to
    1,000 Layers").

    ``alpha > 1`` up-weights the skip and :meth:`init_branch_` initialises the branch with gain
    ``beta < 1``: it calls ``branch.reset_parameters(beta=beta)``, which every attention and
    feed-forward class of the library implements as xavier-normal with gain beta on the value, output
    and feed-forward weights and gain 1 on the query and key weights, per the paper. The constants
    come from :func:`deepnorm_constants` for the context's architecture and depth.

    Constraint: post-norm placement only (alpha > 1 is derived for a norm after the sum).
    """

    placement = "post"

    @dataclass(kw_only=True)
    class Config:
        alpha: float | None = None  # skip scale; None takes the paper's value for the architecture and depth
        beta: float | None = None  # branch init gain; None takes the paper's value for the depth
        placement: str = "post"  # only "post": alpha > 1 on the skip is derived for LN(alpha*x + F(x))

    def __init__(
        self, dim: int, alpha: float, beta: float = 1.0, *, norm: Any = "layer", placement: str = "post"
    ):
        super().__init__()
        _check_placement(placement, "DeepNorm", "alpha")
        self.dim = _check_dim(dim, "DeepNorm")
        self.alpha = _check_float(alpha, "alpha", "DeepNorm")
        self.beta = _check_float(beta, "beta", "DeepNorm")
        if self.alpha <= 0 or self.beta <= 0:
            raise ValueError(f"DeepNorm: alpha and beta must be > 0, got alpha={alpha!r}, beta={beta!r}")
        self.norm = _build_norm(norm, self.dim)

    @classmethod
    def from_config(cls, cfg, *, dim: int, ctx: LayerContext | None = None, norm: Any = "layer"):
        ctx = ctx or LayerContext()
        _check_placement(cfg.placement, "DeepNorm", "alpha")
        alpha, beta = deepnorm_constants(ctx.arch, ctx.n_layers, ctx.n_enc_layers, ctx.n_dec_layers)
        alpha = alpha if cfg.alpha is None else cfg.alpha
        beta = beta if cfg.beta is None else cfg.beta
        return cls(dim, alpha, beta, norm=norm, placement=cfg.placement)

    def forward(self, x: Tensor, f, *args, **kwargs) -> Tensor:
        return self.norm(self.alpha * x + _call_branch(self, f, x, args, kwargs))

    def init_branch_(self, branch: nn.Module) -> None:
        reset = getattr(branch, "reset_parameters", None)
        params = inspect.signature(reset).parameters if callable(reset) else {}
        takes_beta = "beta" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
        if not takes_beta:
            raise TypeError(
                f"DeepNorm.init_branch_: {type(branch).__name__} has no reset_parameters(beta=...); a "
                "DeepNorm branch must implement reset_parameters(self, beta: float = 1.0) (xavier-normal "
                "with gain beta on value, output and feed-forward weights, gain 1 on query and key)"
            )
        reset(beta=self.beta)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:.6g}, beta={self.beta:.6g}"


# ---------------------------------------------------------------------------------------------------
# LayerScale


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
    ``g`` is excluded from weight decay.
    """

    additive = True
    placement = "pre"

    @dataclass(kw_only=True)
    class Config:
        init: float | None = None  # g at init; None: CaiT's rule by depth (see layerscale_init)

    def __init__(self, dim: int, init: float = 0.1, *, norm: Any = "layer"):
        super().__init__()
        self.dim = _check_dim(dim, "LayerScale")
        self.init = _check_float(init, "init", "LayerScale")
        self.norm = _build_norm(norm, self.dim)
        self.g = nn.Parameter(torch.empty(self.dim))
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg, *, dim: int, ctx: LayerContext | None = None, norm: Any = "layer"):
        ctx = ctx or LayerContext()
        init = layerscale_init(ctx.n_layers) if cfg.init is None else cfg.init
        return cls(dim, init, norm=norm)

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
