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


class _Chain:
    """Hands each block's reconstructed input to the backward of the block before it.

    Only the last block's output is saved; every other block's output is rebuilt by the backward
    of the block after it, so activation memory is independent of depth.
    """

    def __init__(self):
        self.outputs: dict[int, tuple[Tensor, Tensor]] = {}


class _Step:
    """One block of the chain: its F and G, and the RNG/autocast state of its forward."""

    def __init__(self, index: int, f: DeltaFn, g: DeltaFn, chain: _Chain, training: bool, last: bool):
        self.index, self.f, self.g, self.chain, self.training, self.last = index, f, g, chain, training, last
        self.sf: _RNGState | None = None
        self.sg: _RNGState | None = None
        self.autocast: _Autocast | None = None
        self.inputs: list[Tensor] = []


class _ReversibleBlock(torch.autograd.Function):
    """``y1 = x1 + F(x2); y2 = x2 + G(y1)`` for one block, recomputed from its output in backward.

    The block's parameters (and any other tensor it uses that needs a gradient) are inputs, and
    their gradients are returned here, one block at a time: the engine accumulates and frees them
    before the previous block's backward runs, so no full copy of the model's gradients is held.
    """

    @staticmethod
    def forward(ctx, x1: Tensor, x2: Tensor, step: _Step, *inputs: Tensor):
        ctx.step = step
        step.autocast = _Autocast(x1.device.type)
        devices = _rng_devices(x1)
        with torch.no_grad():
            step.sf = _RNGState(devices) if step.training else None
            y1 = x1 + step.f(x2)
            step.sg = _RNGState(devices) if step.training else None
            y2 = x2 + step.g(y1)
        if step.last:
            ctx.save_for_backward(y1, y2)
        return y1, y2

    @staticmethod
    def backward(ctx, dy1: Tensor, dy2: Tensor):
        step = ctx.step
        ctx.step = None
        y1, y2 = ctx.saved_tensors if step.last else step.chain.outputs.pop(step.index)
        targets = step.inputs
        with torch.enable_grad():
            y1_ = y1.detach().requires_grad_()
            with (step.sg.fork() if step.sg is not None else nullcontext()), step.autocast():
                gy = step.g(y1_)
            grads = torch.autograd.grad(gy, [y1_, *targets], dy2, allow_unused=True)
            dy1 = dy1 + grads[0]
            acc = list(grads[1:])
            x2 = (y2 - gy).detach()
            del gy, y1_

            x2_ = x2.detach().requires_grad_()
            with (step.sf.fork() if step.sf is not None else nullcontext()), step.autocast():
                fx = step.f(x2_)
            grads = torch.autograd.grad(fx, [x2_, *targets], dy1, allow_unused=True)
            dy2 = dy2 + grads[0]
            acc = [a if b is None else b if a is None else a + b for a, b in zip(acc, grads[1:])]
            x1 = (y1 - fx).detach()
            del fx, x2_
        if step.index > 0:
            step.chain.outputs[step.index - 1] = (x1, x2)
        return (dy1, dy2, None, *acc)


def reversible_apply(
    x1: Tensor,
    x2: Tensor,
    fs: Sequence[DeltaFn],
    gs: Sequence[DeltaFn],
    params: Sequence[nn.Parameter] | Sequence[Sequence[nn.Parameter]],
    extra: Sequence[Tensor] = (),
    training: bool = True,
) -> tuple[Tensor, Tensor]:
    """Runs the coupling over ``zip(fs, gs)``; only the final halves are kept for backward.

    Args:
        x1, x2: the two halves of the residual, ``(b, n, d)`` each.
        fs, gs: per block, the additive functions ``F`` and ``G`` (closures over their modules and
            the call's keyword arguments).
        params: per block, the parameters its F and G use (a list per block); a flat list means
            every block may use any of them. They receive gradients, block by block.
        extra: other tensors the functions close over that need gradients (e.g. encoder output).
        training: record and replay RNG states: on where the functions draw random numbers (dropout,
            LSH's rotations), off otherwise, which saves the copies and keeps ``torch.compile``'s graph
            whole (``torch.get_rng_state`` breaks it).
    """
    block_params = [list(p) for p in params] if params and isinstance(params[0], (list, tuple)) else None
    if block_params is None:
        block_params = [list(params)] * len(fs)
    extra = [t for t in extra if t.requires_grad]
    per_block = [[t for t in ps if t.requires_grad] + extra for ps in block_params]
    if not torch.is_grad_enabled() or not (x1.requires_grad or x2.requires_grad or any(per_block)):
        # Nothing to differentiate: plain coupling, no bookkeeping.
        for f, g in zip(fs, gs):
            x1 = x1 + f(x2)
            x2 = x2 + g(x1)
        return x1, x2
    chain = _Chain()
    n = len(fs)
    for i, (f, g, inputs) in enumerate(zip(fs, gs, per_block)):
        step = _Step(i, f, g, chain, training, last=i == n - 1)
        step.inputs = inputs
        x1, x2 = _ReversibleBlock.apply(x1, x2, step, *inputs)
    return x1, x2


def reversible_inverse(y1: Tensor, y2: Tensor, fs: Sequence[DeltaFn], gs: Sequence[DeltaFn]) -> tuple[Tensor, Tensor]:
    """Recovers the input halves from the output halves: ``x2 = y2 - G(y1)``, ``x1 = y1 - F(x2)``, in reverse."""
    with torch.no_grad():
        for f, g in zip(reversed(fs), reversed(gs)):
            y2 = y2 - g(y1)
            y1 = y1 - f(y2)
    return y1, y2
