"""mHC-lite: hyper-connections whose residual mixing matrix is a convex combination of permutation matrices.

Yang & Gao 2026, "mHC-lite: You Don't Need 20 Sinkhorn-Knopp Iterations" (arXiv 2601.05732). By the
Birkhoff-von Neumann theorem every doubly stochastic n x n matrix is a convex combination of the n!
permutation matrices, so

    H_res = sum_k a_k P_k,      a = softmax(s_res * (Hbar W_res) + b_res)     (a over the n! permutations)

is doubly stochastic *exactly* (every row and column of every P_k holds one 1, so each row and column
sum of H_res is ``sum_k a_k = 1``) for any parameters and any input, with no Sinkhorn iterations and
no approximation gap accumulating over depth. Everything else is mHC (:class:`ManifoldHyperConnection`):
``H_pre = sigmoid(.)`` feeds the branch, ``H_post = 2 sigmoid(.)`` writes its output back.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from anydepth.nn.context import LayerContext
from anydepth.nn.registry import RESIDUALS
from anydepth.nn.residual.hyper import ManifoldHyperConnection

__all__ = ["LiteManifoldHyperConnection", "permutation_matrices", "MAX_STREAMS"]

MAX_STREAMS = 6  # n! weights per token: 720 at n = 6; beyond that the parameterisation stops being "lite"


def permutation_matrices(n: int) -> Tensor:
    """All ``n!`` permutation matrices ``(n!, n, n)``, the identity first (``P[k, i, sigma_k(i)] = 1``)."""
    perms = list(itertools.permutations(range(n)))
    p = torch.zeros(len(perms), n, n)
    for k, sigma in enumerate(perms):
        p[k, torch.arange(n), torch.tensor(sigma)] = 1.0
    return p


@RESIDUALS.register("mhc_lite")
class LiteManifoldHyperConnection(ManifoldHyperConnection):
    """mHC-lite (arXiv 2601.05732): mHC with ``H_res = sum_k softmax(logits)_k P_k`` over the n!
    permutation matrices instead of ``Sinkhorn(exp(.))``; exactly doubly stochastic for any parameters.

    Per token, with ``Hbar_s = rmsnorm(H_s)`` for each stream ``s`` (the mHC layout of this library)::

        H_pre[s]  = sigmoid(b_pre[s] + s_pre * Hbar_s . w_pre)
        logits    = b_res + s_res * sum_s Hbar_s W_res[s]               (n! values)
        H_res     = sum_k softmax(logits)_k P_k
        H_post[s] = 2 sigmoid(b_post[s] + s_post * Hbar_s . w_post)
        H_new     = H_post * f(norm(H_pre^T H)) + H_res^T H

    ``b_res`` starts at ``identity_logit`` for the identity permutation and 0 for the others (the
    streams are copies of ``x`` at init, so any doubly stochastic ``H_res`` gives the same output);
    the dynamic weights start at zero. Coefficients are computed in float32.

    Constraints: ``1 <= streams <= 6`` (n! weights per token), one fraction and one input view.
    """

    @dataclass(kw_only=True)
    class Config:
        streams: int = 4  # expansion rate n (24 permutations at n = 4)
        identity_logit: float = 1.0  # static logit of the identity permutation at init (others 0)
        dropout: float = 0.0  # dropout probability, applied where dropout_placement says
        dropout_placement: str = "branch"  # "branch": branch output only; "stream": whole stream
        reduce: str = "sum"  # how reduce() merges the streams: the paper's "sum", or "mean"

    def __init__(
        self,
        cfg: Config | None = None,
        *,
        dim: int,
        ctx: LayerContext | None = None,
        norm: Any = None,
        layer_index: int | None = None,
    ):
        cfg = self.config_of(cfg)
        streams, identity_logit = cfg.streams, cfg.identity_logit
        if isinstance(streams, bool) or not isinstance(streams, int) or not 1 <= streams <= MAX_STREAMS:
            raise ValueError(
                f"mhc_lite streams={streams!r} must be an int in [1, {MAX_STREAMS}]: H_res weighs all n! permutation "
                f"matrices ({math.factorial(MAX_STREAMS)} at n={MAX_STREAMS}); use residual='mhc' (Sinkhorn) for more"
            )
        if (
            isinstance(identity_logit, bool)
            or not isinstance(identity_logit, int | float)
            or not math.isfinite(identity_logit)
        ):
            raise ValueError(f"mhc_lite identity_logit must be a finite number, got {identity_logit!r}")
        super().__init__(cfg, dim=dim, ctx=ctx, norm=norm, layer_index=layer_index)
        n, d = self.streams, self.frac_dim
        # mHC's square logit matrix and its projection are replaced by the permutation weights
        del self.static_alpha, self.dynamic_alpha_fn
        self.identity_logit = float(identity_logit)
        self.register_buffer("perms", permutation_matrices(n), persistent=False)
        n_perm = self.perms.shape[0]
        pre = torch.zeros(n)
        pre[self.layer_index % n] = 1.0  # mHC's static H_pre logits: stream layer_index mod n feeds the branch
        self.static_pre = nn.Parameter(pre)
        self.dynamic_pre_fn = nn.Parameter(torch.zeros(d))
        self.static_perm = nn.Parameter(torch.zeros(n_perm))
        self.dynamic_perm_fn = nn.Parameter(torch.zeros(n, d, n_perm))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.static_perm.zero_()
            self.static_perm[0] = self.identity_logit  # permutation 0 is the identity

    def _coefficients(self, hs: Tensor) -> tuple[Tensor, Tensor]:
        n, d = self.streams, self.frac_dim
        n_perm = self.perms.shape[0]
        w = torch.cat(
            (
                self.dynamic_pre_fn.float().unsqueeze(-1),
                self.dynamic_perm_fn.float().permute(1, 0, 2).reshape(d, n * n_perm),
                self.dynamic_beta_fn.float().reshape(d, 1),
            ),
            dim=-1,
        )
        proj = self.norm.project(hs.float(), w).squeeze(-3)  # (..., n, 2 + n n!): one matmul for all
        pre = torch.sigmoid(proj[..., 0] * self.pre_branch_scale.float() + self.static_pre.float())
        per_stream = proj[..., 1:-1].unflatten(-1, (n, n_perm))  # (..., s, s', n!): stream s's own block s' = s
        logits = torch.diagonal(per_stream, dim1=-3, dim2=-2).sum(-1)  # (..., n!)
        weights = torch.softmax(logits * self.residual_scale.float() + self.static_perm.float(), dim=-1)
        h_res = torch.tensordot(weights, self.perms.float(), dims=1)  # (..., n, n), exactly doubly stochastic
        alpha = torch.cat((pre.unsqueeze(-1), h_res), dim=-1)  # (..., n, 1 + n)
        beta = 2 * torch.sigmoid(proj[..., -1] * self.h_post_scale.float() + self._static_beta().float().squeeze(0))
        return alpha, beta.unsqueeze(-2)

    def residual_matrix(self, h: Tensor) -> Tensor:
        """``H_res`` ``(..., n, n)`` for the expanded residual ``h`` ``(..., n, dim)``."""
        self._check_streams(h, "residual_matrix")
        return self._coefficients(self._split_fracs(h))[0][..., 1:]

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, streams={self.streams}, layer_index={self.layer_index}, "
            f"permutations={self.perms.shape[0]}, identity_logit={self.identity_logit}"
        )
