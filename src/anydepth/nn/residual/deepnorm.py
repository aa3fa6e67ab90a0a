"""DeepNorm residual, ``N(alpha * x + F(x))`` with beta-scaled branch init (Wang et al. 2022)."""

from __future__ import annotations

import inspect
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from anydepth.nn.context import LayerContext
from anydepth.nn.registry import RESIDUALS
from anydepth.nn.residual.base import Residual, _build_norm, _call_branch, _check_dim, _check_float

__all__ = ["DeepNorm", "deepnorm_constants"]


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
        f"deepnorm_constants: unknown arch {arch!r}; use 'encoder', 'decoder', 'encdec_encoder' or 'encdec_decoder'"
    )


@RESIDUALS.register("deepnorm")
class DeepNorm(Residual):
    """DeepNorm residual: ``N(alpha * x + F(x))`` (Wang et al. 2022, "DeepNet: Scaling Transformers to
    1,000 Layers").

    ``alpha > 1`` up-weights the skip and :meth:`init_branch_` initialises the branch with gain
    ``beta < 1``: it calls ``branch.reset_parameters(beta=beta)``, which every attention and
    feed-forward class of the library implements as xavier-normal with gain beta on the value, output
    and feed-forward weights and gain 1 on the query and key weights, per the paper. The constants
    come from :func:`deepnorm_constants` for the context's architecture and depth, unless the
    config gives them.

    Constraints: post-norm placement only; ``alpha > 1`` is derived for a norm with statistics after
    the sum (``LN(alpha*x + F(x))``), so there is no placement option. The branch init is the
    scheme's own, so the model's ``init`` option stays ``"default"``.
    """

    placement = "post"
    final_norm = False
    needs_norm_statistics = True
    owns_branch_init = True
    folds_to_postnorm = True

    @dataclass(kw_only=True)
    class Config:
        alpha: float | None = None  # skip scale; None takes the paper's value for the architecture and depth
        beta: float | None = None  # branch init gain; None takes the paper's value for the depth

        # configs saved when placement was an option (with "post", its only legal value) still load
        retired: ClassVar[dict[str, Any]] = {"placement": "post"}

    def __init__(self, cfg: Config | None = None, *, dim: int, ctx: LayerContext | None = None, norm: Any = "layer"):
        super().__init__()
        cfg = self.config_of(cfg)
        ctx = ctx or LayerContext()
        self.dim = _check_dim(dim, "DeepNorm")
        alpha, beta = (None, None)
        if cfg.alpha is None or cfg.beta is None:
            alpha, beta = deepnorm_constants(ctx.arch, ctx.n_layers, ctx.n_enc_layers, ctx.n_dec_layers)
        alpha = alpha if cfg.alpha is None else cfg.alpha
        beta = beta if cfg.beta is None else cfg.beta
        self.alpha = _check_float(alpha, "alpha", "DeepNorm")
        self.beta = _check_float(beta, "beta", "DeepNorm")
        if self.alpha <= 0 or self.beta <= 0:
            raise ValueError(f"DeepNorm: alpha and beta must be > 0, got alpha={alpha!r}, beta={beta!r}")
        self.norm = _build_norm(norm, self.dim)

    def skip_scale(self) -> Tensor:
        """``w`` of ``LN(w*x + F(x))``: alpha."""
        return torch.tensor([float(self.alpha)])

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
