"""admin-torch's API (``import admin_torch``) on the library's Admin residual.

Admin (Liu et al. 2020, "Understanding the Difficulty of Training Transformers") rescales the skip
of a post-LN residual, ``x = LN(w * x + f(x))``, so the output change under an update grows as
O(log N) or O(1) in the number N of residual sublayers instead of O(N)::

    from anydepth.compat import admin_torch as admin

    class EncoderLayer(nn.Module):
        def __init__(self, dim, heads, n_layers):
            super().__init__()
            self.attn = nn.MultiheadAttention(dim, heads)
            self.residual_attn = admin.as_module(2 * n_layers)   # N counts every residual sublayer
            self.ln_attn = nn.LayerNorm(dim)

        def forward(self, x):
            f_x, _ = self.attn(x, x, x)
            return self.ln_attn(self.residual_attn(x, f_x))      # LN(w * x + f_x)

Same names, signatures and values as admin-torch 0.1.0. Differences: bad input raises ``ValueError`` /
``TypeError`` naming the argument instead of ``AssertionError`` or ``ZeroDivisionError``; ``w`` is
created in the device and dtype of the surrounding ``torch.device(...)`` context and default dtype
(admin-torch's lands on the CPU as float32); :class:`OmegaResidual` multiplies in the input's dtype
and has ``reset_parameters()`` for ``to_empty()``. The library's model builder uses the same class
through ``residual='admin'``; :func:`admin_profile_` adds the original paper's profiled init.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor, nn

from anydepth.nn.residual.admin import ADMIN_SCALES, Admin, admin_omega, admin_profile_

__all__ = [
    "OmegaResidual",
    "calculate_init",
    "as_module",
    "as_buffer",
    "as_parameter",
    "admin_profile_",
    "ADMIN_SCALES",
]


class OmegaResidual(Admin):
    """``forward(x, f_x) = x * omega + f_x``: the Admin sum without the norm, for hosts that apply
    their own post-LN (admin-torch's ``OmegaResidual``).

    ``omega`` is a ``[1]`` buffer filled with ``init_value``, or, with ``as_parameter=True``, a trainable
    ``[embed_dim]`` vector (``embed_dim`` required). It is the library's :class:`~anydepth.nn.residual.admin.Admin`
    with ``norm=None``; only the call signature differs (it takes the branch output, not the branch).
    """

    def __init__(self, init_value: float, as_parameter: bool = False, embed_dim: int | None = None):
        if as_parameter and embed_dim is None:
            raise ValueError(
                "OmegaResidual: embed_dim is required when as_parameter=True (omega is then a per-channel "
                "vector); pass embed_dim=<hidden size> or use as_parameter=False for a scalar buffer"
            )
        super().__init__(Admin.Config(as_parameter=as_parameter), dim=embed_dim, norm=None, init_value=init_value)

    def forward(self, x: Tensor, f_x: Tensor) -> Tensor:  # type: ignore[override]
        return self.combine(x, f_x)


def calculate_init(num_res_layers: int, output_change_scale: str = "O(logn)") -> float:
    """The initial ``omega`` for ``num_res_layers`` residual sublayers (2n for an n-layer encoder).

    ``'O(logn)'`` / ``'default'``: ``sqrt((N + 1) / ln(N + 1) - 1)``; ``'O(n)'``: 1; ``'O(1)'``: ``sqrt(N)``.
    """
    return admin_omega(num_res_layers, output_change_scale)


def as_module(
    num_res_layers: int,
    output_change_scale: str = "default",
    as_parameter: bool = False,
    embed_dim: int | None = None,
) -> OmegaResidual:
    """An :class:`OmegaResidual` with ``omega = calculate_init(num_res_layers, output_change_scale)``."""
    omega = calculate_init(num_res_layers, output_change_scale)
    if as_parameter and embed_dim is None:
        raise ValueError(
            "as_module: embed_dim is required when as_parameter=True (omega is then a per-channel vector); "
            "pass embed_dim=<hidden size>"
        )
    return OmegaResidual(omega, as_parameter=as_parameter, embed_dim=embed_dim)


def _check_network(network: Any, who: str) -> None:
    if not isinstance(network, nn.Module):
        raise TypeError(f"{who}: network must be a torch.nn.Module to register omega on, got {type(network).__name__}")


def _check_name(name: Any, who: str, arg: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"{who}: {arg} must be a non-empty attribute name without dots, got {name!r}")


def as_buffer(network: nn.Module, buffer_name: str, num_res_layers: int, output_change_scale: str = "default") -> None:
    """Registers ``omega`` on ``network`` as a ``[1]`` buffer ``buffer_name``; use ``x * omega + f_x``."""
    _check_network(network, "as_buffer")
    _check_name(buffer_name, "as_buffer", "buffer_name")
    omega = calculate_init(num_res_layers, output_change_scale)
    network.register_buffer(buffer_name, torch.full((1,), omega))


def as_parameter(
    network: nn.Module,
    parameter_name: str,
    num_res_layers: int,
    embed_dim: int,
    output_change_scale: str = "default",
) -> None:
    """Registers ``omega`` on ``network`` as a trainable ``[embed_dim]`` Parameter ``parameter_name``."""
    _check_network(network, "as_parameter")
    _check_name(parameter_name, "as_parameter", "parameter_name")
    if isinstance(embed_dim, bool) or not isinstance(embed_dim, numbers.Integral) or embed_dim <= 0:
        raise ValueError(f"as_parameter: embed_dim must be a positive int (the hidden size), got {embed_dim!r}")
    omega = calculate_init(num_res_layers, output_change_scale)
    network.register_parameter(parameter_name, nn.Parameter(torch.full((int(embed_dim),), omega)))
