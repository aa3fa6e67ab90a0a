"""``hyper_connections.triton_sinkhorn``: the Sinkhorn projection behind the package's CUDA kernel's
signature. Here it is :func:`anydepth.nn.residual.hyper.sinkhorn` on every device (the eager iteration,
differentiated exactly by autograd); the package's Triton kernel computes the same in one launch on
CUDA, so ``use_triton_sinkhorn=True`` changes where the time goes, not the result."""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from anydepth.nn.residual.hyper import sinkhorn

__all__ = ["is_triton_available", "triton_sinkhorn"]


def is_triton_available() -> bool:
    """Whether Triton is importable and CUDA is present (the package's condition for its kernel)."""
    return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()


def triton_sinkhorn(log_alpha: Tensor, iters: int = 20) -> Tensor:
    """Sinkhorn-Knopp projection of ``exp(log_alpha)`` over the last two (square) dims, ``iters``
    column-then-row normalisations; ``iters <= 0`` returns ``log_alpha`` unchanged."""
    return log_alpha if iters <= 0 else sinkhorn(log_alpha, iters)
