"""Multi-process training under ``torchrun``: process group, device, DDP wrapping, reductions.

``torchrun --nproc_per_node=N -m anydepth train ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`setup` then joins the process group (gloo on CPU, nccl on CUDA). Each process
takes ``batch_size / N`` sequences of every global batch, DistributedDataParallel averages the
gradients, so N processes follow the same trajectory as one process with the whole batch. Only
rank 0 writes logs and checkpoints. Without those variables everything here is a no-op.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistInfo",
    "setup",
    "teardown",
    "wrap",
    "is_sharded",
    "mean_over_ranks",
    "sync_replicated_grads",
    "gather_objects",
    "resolve_device",
    "CollectiveTimeout",
    "collective_failure",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world`` processes, on ``device``."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def resolve_device(name: str, local_rank: int = 0, option: str = "train.device") -> torch.device:
    """``"auto"`` is CUDA (this process's local GPU) when available, else the CPU; a device this
    machine lacks (``cuda:7``, ``mps``) raises ``ValueError`` naming ``option``."""
    flag = "--" + option
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{option}='cuda' but no CUDA device is available; use {flag}=cpu")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{option}={name!r} is not a device name; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if dev.index is not None and dev.index >= count:
            have = f"this machine has {count} CUDA device(s)" if count else "no CUDA device is available"
            other = f" or a cuda:N with N < {count}" if count else ""
            raise ValueError(f"{option}={name!r} but {have}; use {flag}=cpu{other}")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"{option}={name!r} but MPS is not available; use {flag}=cpu")
    return dev


class CollectiveTimeout(RuntimeError):
    """A collective failed because another process stopped responding (``train.timeout`` passed)."""


def setup(device: str = "auto", timeout: float = 300.0) -> DistInfo:
    """Joins the torchrun process group if ``WORLD_SIZE > 1``; returns this process's :class:`DistInfo`.

    ``timeout`` (seconds) bounds every collective: a stalled or stopped process makes the others
    fail after that long instead of torch's default of 30 minutes (10 for NCCL).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
    return DistInfo(rank=rank, world=world, local_rank=local_rank, device=dev)


def collective_failure(e: BaseException, info: DistInfo, timeout: float) -> CollectiveTimeout | None:
    """A :class:`CollectiveTimeout` naming this rank, and the peer where torch's message tells, when
    ``e`` is a failed collective of a multi-process run; else None."""
    if not info.enabled:
        return None
    text = str(e)
    if not (isinstance(e, getattr(dist, "DistError", ())) or re.search(r"timed? ?out|closed by peer", text, re.I)):
        return None
    peer = re.search(r"\brank[ =:]*(\d+)", text, re.I)
    who = f"rank {peer.group(1)}" if peer and int(peer.group(1)) != info.rank else "another process"
    first = text.strip().splitlines()[0][:200] if text.strip() else type(e).__name__
    return CollectiveTimeout(
        f"rank {info.rank} of {info.world}: a collective failed after at most train.timeout={timeout:g}s because "
        f"{who} stopped responding ({first}); check that process, or raise --train.timeout"
    )


def teardown(info: DistInfo, *, completed: bool = True) -> None:
    """Leaves the process group; after a completed run, only once every rank has got there.

    Rank 0 still writes the last checkpoint and plots the loss curve when the other ranks are done;
    without the barrier they would destroy their process group and exit meanwhile. After a failure
    there is no barrier: a rank that failed alone would leave the others waiting in it for the
    collective timeout (30 minutes).
    """
    if not (info.enabled and dist.is_initialized()):
        return
    if completed:
        dist.barrier()
    dist.destroy_process_group()


def wrap(model: nn.Module, info: DistInfo, parallel: str = "ddp") -> nn.Module:
    """The module the training step calls: ``model`` itself when single-process, else DDP or FSDP2.

    ``"ddp"``: DistributedDataParallel with ``static_graph=True``. The reversible stack recomputes
    its blocks inside its own backward, which makes the default reducer see parameters becoming
    ready at unexpected times ("Expected to mark a variable ready only once"); with a static graph
    the reducer records the order once and accepts it.

    ``"fsdp"``: FSDP2, ``fully_shard`` on every block and then on the model (in place, so the
    returned module is ``model``): parameters, gradients and optimizer state are sharded over the
    processes and gathered block by block, for models that do not fit one device. Build the
    optimizer after this call, since sharding replaces the parameters. FSDP2 cannot shard 0-dim
    parameters; those are left whole on every process, and :func:`sync_replicated_grads` must
    average their gradients after each backward.
    """
    if not info.enabled:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # fully_shard rejects 0-dim parameters (hyper-connection and mHC scales, ScaleNorm's g): they
        # stay whole on every process, and sync_replicated_grads averages their gradients
        replicated = {p for p in model.parameters() if p.dim() == 0} or None
        for block in getattr(model, "blocks", []):
            fully_shard(block, ignored_params=replicated)
        fully_shard(model, ignored_params=replicated)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, static_graph=True)


def sync_replicated_grads(model: nn.Module, info: DistInfo) -> None:
    """Average over processes the gradients of the parameters that :func:`wrap` left unsharded in an
    FSDP2 model (its 0-dim ones), as FSDP2's reduce-scatter does for the others: one all-reduce of
    the gradients packed together with a has-gradient flag each, so that a parameter no process
    used keeps no gradient (AdamW then skips it, as in one process). Every process must call it
    after each backward."""
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.requires_grad and not isinstance(p, DTensor)]
    if not params or not info.enabled:
        return
    parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
    flags = torch.tensor([float(p.grad is not None) for p in params], dtype=parts[0].dtype)
    flat = torch.cat([*parts, flags.to(parts[0].device)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    at = 0
    for p, used in zip(params, flat[-len(params) :].tolist()):
        n = p.numel()
        p.grad = (flat[at : at + n] / info.world).view_as(p).to(p.dtype) if used else None
        at += n


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` was sharded by FSDP2's ``fully_shard``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


def mean_over_ranks(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Average of ``x`` over processes (``x`` itself when single-process)."""
    if not info.enabled:
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / info.world


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_flag(flag: bool, info: DistInfo) -> bool:
    """Rank 0's ``flag`` on every rank (so every process takes the same branch)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], device=info.device)
    dist.broadcast(t, src=0)
    return bool(t.item())
