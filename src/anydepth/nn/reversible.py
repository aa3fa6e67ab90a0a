"""Reversible execution of a stack of blocks (RevNet coupling, Gomez et al. 2017; Reformer, Kitaev et al. 2020).

Each block is split into two additive functions ``F`` (attention, and cross-attention if present) and
``G`` (feed-forward). The residual is carried as two halves and updated as::

    y1 = x1 + F(x2)
    y2 = x2 + G(y1)

which is inverted exactly by ``x2 = y2 - G(y1)``, ``x1 = y1 - F(x2)``. The forward pass keeps only the
last block's output; the backward pass walks the blocks in reverse, reconstructs each block's input
from its output and recomputes its activations, so activation memory does not grow with depth.

Guarantees this module makes (each has a test):

- gradients equal those of running the same coupling with ordinary autograd (float64, 1e-8);
- dropout and any other randomness match between forward and recomputation: the RNG state in force
  before each ``F`` and ``G`` call is recorded and replayed (CPU and, where used, CUDA);
- parameters (and tensor arguments such as an encoder's output) receive gradients even when the
  input does not require grad: they are inputs of the autograd function, and their gradients are
  returned by it rather than accumulated by hand, which also keeps DistributedDataParallel's
  gradient hooks firing exactly once per parameter;
- autocast in force at the forward is re-entered for the recomputation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor, nn

DeltaFn = Callable[..., Tensor]


def _rng_devices(x: Tensor) -> list[int]:
    return [x.device.index or 0] if x.is_cuda else []


class _RNGState:
    """The RNG state in force at one point of the forward, restorable in the backward."""

    __slots__ = ("cpu", "cuda", "devices")

    def __init__(self, devices: list[int]):
        self.devices = devices
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in devices]

    @contextmanager
    def fork(self):
        # fork_rng restores the caller's state on exit, so replaying does not disturb the RNG stream
        # of the surrounding backward pass.
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            for d, s in zip(self.devices, self.cuda):
                torch.cuda.set_rng_state(s, d)
            yield


class _Autocast:
    """Captures the autocast state of the forward so the backward's recomputation matches it."""

    def __init__(self, device_type: str):
        self.device_type = device_type
        self.enabled = torch.is_autocast_enabled(device_type)
        self.dtype = torch.get_autocast_dtype(device_type) if self.enabled else None

    def __call__(self):
        if not self.enabled:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


class _ReversibleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x1: Tensor, x2: Tensor, runner: _Runner, *inputs: Tensor):
        ctx.runner = runner
        with torch.no_grad():
            y1, y2 = runner.forward(x1, x2)
        ctx.save_for_backward(y1, y2)
        return y1, y2

    @staticmethod
    def backward(ctx, dy1: Tensor, dy2: Tensor):
        y1, y2 = ctx.saved_tensors
        dx1, dx2, grads = ctx.runner.backward(y1, y2, dy1, dy2)
        ctx.runner = None
        return (dx1, dx2, None, *grads)


class _Runner:
    """State shared between the forward and backward of one reversible call."""

    def __init__(self, fs: Sequence[DeltaFn], gs: Sequence[DeltaFn], inputs: list[Tensor], training: bool):
        self.fs, self.gs, self.inputs, self.training = fs, gs, inputs, training
        self.states: list[tuple[_RNGState | None, _RNGState | None]] = []
        self.autocast: _Autocast | None = None

    def forward(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        self.autocast = _Autocast(x1.device.type)
        devices = _rng_devices(x1)
        for f, g in zip(self.fs, self.gs):
            sf = _RNGState(devices) if self.training else None
            y1 = x1 + f(x2)
            sg = _RNGState(devices) if self.training else None
            x2 = x2 + g(y1)
            x1 = y1
            self.states.append((sf, sg))
        return x1, x2

    def _grad(self, out: Tensor, wrt: Tensor, grad_out: Tensor) -> tuple[Tensor, list[Tensor | None]]:
        targets = [wrt, *self.inputs]
        grads = torch.autograd.grad(out, targets, grad_out, allow_unused=True)
        return grads[0], list(grads[1:])

    def _accumulate(self, acc: list[Tensor | None], new: list[Tensor | None]) -> None:
        for i, g in enumerate(new):
            if g is not None:
                acc[i] = g if acc[i] is None else acc[i] + g

    def backward(self, y1: Tensor, y2: Tensor, dy1: Tensor, dy2: Tensor):
        acc: list[Tensor | None] = [None] * len(self.inputs)
        for f, g, (sf, sg) in zip(reversed(self.fs), reversed(self.gs), reversed(self.states)):
            with torch.enable_grad():
                y1_ = y1.detach().requires_grad_()
                with (sg.fork() if sg is not None else nullcontext()), self.autocast():
                    gy = g(y1_)
                d, grads = self._grad(gy, y1_, dy2)
                self._accumulate(acc, grads)
                dy1 = dy1 + d
                x2 = (y2 - gy).detach()
                del gy, y1_

                x2_ = x2.detach().requires_grad_()
                with (sf.fork() if sf is not None else nullcontext()), self.autocast():
                    fx = f(x2_)
                d, grads = self._grad(fx, x2_, dy1)
                self._accumulate(acc, grads)
                dy2 = dy2 + d
                x1 = (y1 - fx).detach()
                del fx, x2_
            y1, y2 = x1, x2
        return dy1, dy2, acc


def reversible_apply(
    x1: Tensor,
    x2: Tensor,
    fs: Sequence[DeltaFn],
    gs: Sequence[DeltaFn],
    params: Sequence[nn.Parameter],
    extra: Sequence[Tensor] = (),
    training: bool = True,
) -> tuple[Tensor, Tensor]:
    """Runs the coupling over ``zip(fs, gs)`` keeping only the final halves for backward.

    Args:
        x1, x2: the two halves of the residual, ``(b, n, d)`` each.
        fs, gs: per block, the additive functions ``F`` and ``G`` (closures over their modules and
            the call's keyword arguments).
        params: every parameter the functions use (deduplicated); they receive gradients.
        extra: other tensors the functions close over that need gradients (e.g. encoder output).
        training: record and replay RNG states (dropout); off in eval to save the copies.
    """
    inputs = [t for t in (*params, *extra) if t.requires_grad]
    if not torch.is_grad_enabled() or not (x1.requires_grad or x2.requires_grad or inputs):
        # Nothing to differentiate: plain coupling, no bookkeeping.
        for f, g in zip(fs, gs):
            x1 = x1 + f(x2)
            x2 = x2 + g(x1)
        return x1, x2
    runner = _Runner(fs, gs, inputs, training)
    return _ReversibleFunction.apply(x1, x2, runner, *inputs)


def reversible_inverse(y1: Tensor, y2: Tensor, fs: Sequence[DeltaFn], gs: Sequence[DeltaFn]) -> tuple[Tensor, Tensor]:
    """Recovers the input halves from the output halves: ``x2 = y2 - G(y1)``, ``x1 = y1 - F(x2)``, in reverse."""
    with torch.no_grad():
        for f, g in zip(reversed(fs), reversed(gs)):
            y2 = y2 - g(y1)
            y1 = y1 - f(y2)
    return y1, y2
