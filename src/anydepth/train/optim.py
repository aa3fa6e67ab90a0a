"""AdamW with decay/no-decay parameter groups, and the learning-rate schedule as a pure function.

Decoupled weight decay (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019)
pulls weights toward 0. That is right for projection matrices but wrong for gains, biases and the
scalars that deep-residual schemes learn (ReZero's ``a``, Admin's ``w``, DeepNorm/LayerScale gains,
hyper-connection mixing): decaying them drags the network back toward its init. So the no-decay
group holds every parameter with ``ndim < 2`` plus every parameter any module lists in its
``no_weight_decay()`` hook. The update is torch's own AdamW (fused where torch has a kernel for
the device), and gradient clipping is ``torch.nn.utils.clip_grad_norm_(foreach=True)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from anydepth.train.config import TrainConfig

__all__ = ["param_groups", "build_optimizer", "convert_optimizer_state", "lr_at", "set_lr"]


# device types that torch's fused AdamW kernel covers (torch checks it only at the first step)
FUSED_DEVICES = ("cpu", "cuda", "mps", "xpu")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """``[{"params": decayed, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]``.

    Order within each group follows ``model.named_parameters()`` (deterministic, so optimizer
    state saved by index maps back to the same tensors). Shared (tied) parameters appear once.
    """
    exempt: set[int] = set()
    for module in model.modules():
        hook = getattr(module, "no_weight_decay", None)
        if callable(hook):
            got = hook()
            if not isinstance(got, (list, tuple, set)):
                raise TypeError(
                    f"{type(module).__name__}.no_weight_decay() must return a list of parameters, "
                    f"got {type(got).__name__}"
                )
            exempt.update(id(p) for p in got)
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or id(p) in exempt else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over :func:`param_groups`; the learning rate is set each step by :func:`set_lr`.

    Torch's fused implementation (one kernel over all tensors of a group) where torch has one for the
    parameters' device (:data:`FUSED_DEVICES`), else its multi-tensor (``foreach``) path.
    ``benchmarks/optim.py`` times it against the per-tensor loop.
    """
    groups = param_groups(model, cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    fused = all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)
    return torch.optim.AdamW(
        groups, lr=lr_at(0, cfg), betas=cfg.betas, eps=cfg.eps, fused=fused or None, foreach=None if fused else True
    )


def convert_optimizer_state(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """An optimizer state dict saved by an earlier trainer, made loadable into ``optimizer``.

    Checkpoints written before the trainer used torch's fused AdamW hold the state of the per-tensor
    AdamW: the same ``exp_avg``, ``exp_avg_sq`` and ``step`` per parameter, but groups saying
    ``fused=None, foreach=None``. ``load_state_dict`` takes a group's flags from the saved group (and
    decides from them where the step count lives), so the saved flags would switch the fused update
    off; they are replaced by ``optimizer``'s own. The tensors are left as they are: loading moves the
    step counts where the fused update wants them (float32 on the parameter's device).
    """
    own = optimizer.defaults
    groups = []
    for g in state["param_groups"]:
        g = dict(g)
        for key in ("fused", "foreach", "capturable", "differentiable"):
            if key in own:
                g[key] = own[key]
        groups.append(g)
    return {**state, "param_groups": groups}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of update ``step`` (0-based); the formula is in :class:`TrainConfig`'s docstring."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    r = cfg.min_lr_ratio
    return cfg.lr * (r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
