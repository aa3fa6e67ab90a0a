"""AdamW with decay/no-decay parameter groups, and the learning-rate schedule as a pure function.

Decoupled weight decay (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019)
pulls weights toward 0. That is right for projection matrices but wrong for gains, biases and the
scalars that deep-residual schemes learn (ReZero's ``a``, Admin's ``w``, DeepNorm/LayerScale gains,
hyper-connection mixing): decaying them drags the network back toward its init. So the no-decay
group holds every parameter with ``ndim < 2`` plus every parameter any module lists in its
``no_weight_decay()`` hook.
"""

from __future__ import annotations

import math
from itertools import repeat
from operator import attrgetter, is_, itemgetter

import torch
from torch import nn
from torch._utils import _unflatten_dense_tensors

from anydepth.train.config import TrainConfig

__all__ = ["AdamW", "param_groups", "build_optimizer", "lr_at", "set_lr", "clip_grad_norm"]


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


def _unhooked_step(cls: type[torch.optim.Optimizer]):
    # torch wraps a class's step in its hook runner the first time one of its instances is built;
    # AdamW.step below is called from inside our own (already wrapped) step, so hooks run once
    step = cls.step
    return step.__wrapped__ if getattr(step, "hooked", False) else step


_FLAT_DTYPES = (torch.float32, torch.float64)
_PLAIN = (torch.Tensor, nn.Parameter)


class _Flat:
    """One group's small tensors' AdamW state as flat buffers: the first and second moments and the
    step counts, which ``state[p]`` holds views of (so torch's own code, ``state_dict`` or its update
    where this one does not apply, reads and moves the same numbers), and the gradients and
    parameters, gathered each step. Built by :meth:`AdamW._flat` where :meth:`fits` holds."""

    __slots__ = ("group", "params", "shapes", "states", "moments", "exp_avg", "exp_avg_sq", "steps", "grads", "values")

    def __init__(self, group: dict, params: list, state) -> None:
        self.group, self.params, self.shapes = group, params, list(map(_shape, params))
        states = [state[p] for p in params]
        numel = sum(p.numel() for p in params)
        like = params[0].detach()
        # buffers of their own, filled through views (torch._utils._flatten_dense_tensors of a single
        # tensor would be a view of that tensor)
        exp_avg, exp_avg_sq, grads, values = (like.new_zeros(numel) for _ in range(4))
        m = list(_unflatten_dense_tensors(exp_avg, params))
        v = list(_unflatten_dense_tensors(exp_avg_sq, params))
        # torch's step count: a float32 scalar per parameter, on the CPU (non-capturable AdamW)
        steps = torch.zeros(len(params), dtype=torch.float32)
        if any(states):
            with torch.no_grad():
                torch._foreach_copy_(m, [st["exp_avg"] for st in states])
                torch._foreach_copy_(v, [st["exp_avg_sq"] for st in states])
                steps.copy_(torch.stack([st["step"].detach().reshape(()).cpu() for st in states]))
        t = list(steps.unbind())
        for st, *views in zip(states, m, v, t):
            st["exp_avg"], st["exp_avg_sq"], st["step"] = views
        self.states, self.moments = states, (m, v, t)
        self.exp_avg, self.exp_avg_sq, self.steps = exp_avg, exp_avg_sq, steps
        # filled by _foreach_copy_ through views shaped like the parameters: one call each way, where
        # a cat would first make a flat view of every tensor
        self.grads = (grads, list(_unflatten_dense_tensors(grads, params)))
        self.values = (values, list(_unflatten_dense_tensors(values, params)))

    @staticmethod
    def fits(group: dict, params: list, state) -> bool:
        """Whether the flat update computes torch's for ``params`` this step: plain AdamW
        hyper-parameters; every tensor contiguous, with a dense gradient of its dtype, all on the CPU
        and of one floating dtype (float32 or float64); and a state that is empty for all of them or
        holds one step count for all."""
        if (
            group.get("amsgrad") or group.get("maximize") or group.get("capturable")
            or not isinstance(group["weight_decay"], float | int)
            or not all(isinstance(b, float | int) for b in group["betas"])
        ):
            return False
        p0 = params[0]
        dtype, device = p0.dtype, p0.device
        # on CPU torch's foreach is a per-tensor loop; elsewhere it is a real multi-tensor kernel
        if dtype not in _FLAT_DTYPES or device.type != "cpu":
            return False
        for p in params:
            g = p.grad
            # plain tensors only: a subclass (FSDP's DTensor shards, say) has its own ops
            if (
                type(p) not in _PLAIN or type(g) is not torch.Tensor or g.layout != torch.strided
                or p.dtype != dtype or g.dtype != dtype or p.device != device or not p.is_contiguous()
            ):
                return False
        states = [state.get(p) for p in params]
        if all(not st for st in states):
            return True
        keys = {"step", "exp_avg", "exp_avg_sq"}
        if any(not st or st.keys() != keys or not torch.is_tensor(st["step"]) for st in states):
            return False
        steps = torch.stack([st["step"].detach().reshape(()).cpu() for st in states])
        return bool((steps == steps[0]).all())

    def current(self, group: dict, params: list, state) -> bool:
        """Whether these buffers still apply: the same group and tensors, each with a gradient of
        the dtype it had, and each ``state[p]`` still the views handed out (a loaded state dict, or
        an assignment, replaces them). All loops in C: this runs every step."""
        if self.group is not group or len(params) != len(self.params) or not all(map(is_, params, self.params)):
            return False
        if list(map(_shape, params)) != self.shapes:  # a parameter's .data swapped for another shape
            return False
        grads = list(map(_grad, params))
        if not all(map(is_, map(type, grads), repeat(torch.Tensor))):  # a missing one is NoneType
            return False
        dtype = self.exp_avg.dtype
        if not all(map(is_, map(_dtype, grads), repeat(dtype))) or not all(
            map(is_, map(_layout, grads), repeat(torch.strided))
        ):
            return False
        states = list(map(state.get, params))
        if not all(map(is_, states, self.states)):
            return False
        m, v, t = self.moments
        return (
            all(map(is_, map(_exp_avg, states), m))
            and all(map(is_, map(_exp_avg_sq, states), v))
            and all(map(is_, map(_step, states), t))
        )

    @torch.no_grad()
    def update(self, group: dict) -> None:
        """torch's single-tensor AdamW update (decoupled weight decay) on the concatenation: every
        operation is element-wise with the same Python scalars, so each element comes out bitwise
        as torch's loop leaves it."""
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        params = self.params
        grad, grad_views = self.grads
        flat, value_views = self.values
        torch._foreach_copy_(grad_views, [p.grad for p in params])
        torch._foreach_copy_(value_views, params)
        self.steps.add_(1)
        step = self.steps[0].item()
        if wd != 0:
            flat.mul_(1 - lr * wd)
        self.exp_avg.lerp_(grad, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        denom = (self.exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
        flat.addcdiv_(self.exp_avg, denom, value=-(lr / bias_correction1))
        torch._foreach_copy_(params, value_views)


_grad, _dtype, _layout, _shape = attrgetter("grad"), attrgetter("dtype"), attrgetter("layout"), attrgetter("shape")
_exp_avg, _exp_avg_sq, _step = itemgetter("exp_avg"), itemgetter("exp_avg_sq"), itemgetter("step")


class AdamW(torch.optim.AdamW):
    """torch's AdamW (Loshchilov & Hutter, ICLR 2019) with the same result, updating each group's
    small tensors together.

    On CPU torch's default updates the tensors one at a time, a dozen small ops each: for a tensor of
    a few hundred elements that is dispatch, not arithmetic, and torch's multi-tensor (``foreach``)
    path on CPU is the same loop moved into C++. Here each group's tensors of at most
    ``foreach_max_numel`` elements (gains, biases, per-sublayer scalars, hyper-connection mixing) are
    updated as one concatenated tensor: their moments and step counts live in flat buffers that
    ``state[p]`` holds views of, gradients and parameters are gathered with one ``_foreach_copy_``
    each (and the parameters written back with a third), and the update is a handful of element-wise
    ops over the lot. The large tensors go through the per-tensor loop, which keeps a tensor's
    parameter, gradient and moments in cache across its ops (``foreach`` for every tensor streams
    each through memory once per op: slower). ``benchmarks/optim.py``, 12 layers of dim 256: the
    whole step of the 4-stream hyper-connection model (304 tensors, 254 small) takes 36.9 ms against
    56.4 ms for torch's default and 41.5 ms with its small tensors through ``foreach``; pre-LN (136,
    86 small) 36.4 against 39.5 and 37.5 ms.

    Every path computes the same element-wise formula with the same scalars, and the parameters and
    moments are bitwise equal to ``torch.optim.AdamW``'s (``tests/train/test_optim.py``). Where the
    flat update does not apply in a step (a small tensor without a gradient, so that step counts
    part, AMSGrad, ``maximize``, another dtype) those tensors go through torch's ``foreach`` path
    instead. Groups, state and ``state_dict`` are torch's (``state_dict`` copies the views out, so
    that a checkpoint holds tensors of their own). A group given ``foreach`` or ``fused`` explicitly,
    or a tensor learning rate, is left to torch's own choice.
    """

    def __init__(self, params, *args, foreach_max_numel: int = 4096, **kwargs):
        if isinstance(foreach_max_numel, bool) or not isinstance(foreach_max_numel, int) or foreach_max_numel < 0:
            raise ValueError(
                f"foreach_max_numel must be an int >= 0, got {foreach_max_numel!r}; 0 updates every tensor "
                "one at a time, as torch.optim.AdamW does on CPU"
            )
        super().__init__(params, *args, **kwargs)
        self.foreach_max_numel = foreach_max_numel

    def _flat(self, group: dict, small: list) -> _Flat | None:
        flats = self.__dict__.setdefault("_flats", {})
        key = id(group)
        flat = flats.get(key)
        if flat is not None and flat.current(group, small, self.state):
            return flat
        flats.pop(key, None)
        if not _Flat.fits(group, small, self.state):
            return None
        flat = flats[key] = _Flat(group, small, self.state)
        return flat

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.param_groups
        split, flat = [], []
        for group in groups:
            explicit = group.get("foreach") is not None or group.get("fused") or group.get("differentiable")
            # torch's foreach path takes a tensor learning rate only when capturable
            if explicit or torch.is_tensor(group["lr"]):
                split.append(group)
                continue
            small, large = [], []
            for p in group["params"]:
                # torch skips a tensor without a gradient (frozen, or unused this step), and so do we
                if p.numel() > self.foreach_max_numel:
                    large.append(p)
                elif p.grad is not None:
                    small.append(p)
            together = self._flat(group, small) if small else None
            if together is not None:
                flat.append((together, group))
            elif small:
                # copies of the group: the update reads its hyper-parameters and writes nothing to it
                split.append({**group, "params": small, "foreach": True})
            if large:
                split.append({**group, "params": large})
        flats = self.__dict__.get("_flats")
        if flats and len(flats) > len(flat):
            # buffers of groups gone (load_state_dict builds new group dicts) or updated otherwise
            # this step: dropped, not kept alive with the optimizer
            live = {id(together) for together, _ in flat}
            for key in [k for k, v in flats.items() if id(v) not in live]:
                del flats[key]
        self.param_groups = split
        try:
            _unhooked_step(torch.optim.AdamW)(self)
        finally:
            self.param_groups = groups
        for together, group in flat:
            together.update(group)
        return loss

    def state_dict(self) -> dict:
        sd = super().state_dict()
        if not self.__dict__.get("_flats"):
            return sd
        # views of the flat buffers: copied out, as a checkpoint (safetensors) wants tensors that own
        # their memory, and inner dicts of their own, which are the live state's otherwise
        sd["state"] = {
            i: {k: v.clone() if isinstance(v, torch.Tensor) and v._base is not None else v for k, v in st.items()}
            for i, st in sd["state"].items()
        }
        return sd


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> AdamW:
    """:class:`AdamW` over :func:`param_groups`; the learning rate is set each step by :func:`set_lr`.

    The update is torch's default AdamW, bitwise (the small tensors batched, see :class:`AdamW`). The
    fused implementation runs a 12-layer dim-256 model's optimizer step 3.4x faster on CPU and agrees
    with this one to 6e-8 per step, but the default run's trajectory separates from this one at its
    early loss spike and ended worse or equal on all four seeds tried (docs/training.md), so it is not
    the default until that is understood.
    """
    return AdamW(param_groups(model, cfg.weight_decay), lr=lr_at(0, cfg), betas=cfg.betas, eps=cfg.eps)


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


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """Scales gradients by ``max_norm / (||g|| + 1e-6)`` when the global 2-norm ``||g||`` exceeds
    ``max_norm`` (Pascanu et al., 2013); returns ``||g||`` before clipping.

    Same result as ``torch.nn.utils.clip_grad_norm_``, computed with one fused per-tensor norm and
    a multiply only when clipping applies: on CPU the general version costs about 40x more (120 ms
    against 3 ms of CPU time for the 2.4M-parameter default model), which alone would be a 3-4%
    trainer overhead. Gradients must be plain tensors (sharded DTensor gradients: use torch's).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
    if total > max_norm:
        torch._foreach_mul_(grads, max_norm / (total + 1e-6))
    return total
