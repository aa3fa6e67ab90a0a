"""Keep freed memory in the process: glibc's heap is neither trimmed nor bypassed by mmap for tensors.

A training step allocates and frees the same few hundred MiB of activations and gradients every
step. With glibc's defaults, blocks above the (adaptive) mmap threshold are fresh mappings, and free
memory at the top of the heap is handed back to the kernel once it exceeds the trim threshold; the
next step then faults all of it in again, page by page (about 30 000 page faults per step for the
12-layer model of ``benchmarks/hyper.py``; up to 10% of its step on two cores, and a different
share in every process). GPU allocators keep what they have for the same reason, and PyTorch's CPU
tuning guides suggest jemalloc or tcmalloc; this does the glibc equivalent with ``mallopt``:

- ``M_MMAP_THRESHOLD = 32 MiB`` (glibc's largest): every block up to 32 MiB comes from the heap;
- ``M_TRIM_THRESHOLD = -1``: the heap is never trimmed, so the process keeps its peak footprint.

``anydepth train`` and ``anydepth study`` call :func:`retain_freed_memory` at start-up; importing
anydepth does not. ``ANYDEPTH_MALLOC_TUNING=0`` turns it off. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["retain_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit; mallopt refuses more


def retain_freed_memory() -> bool:
    """Sets glibc's mmap threshold to 32 MiB and turns heap trimming off for this process.

    Returns whether both settings took effect (False off glibc, or with ``ANYDEPTH_MALLOC_TUNING=0``).
    Process-wide and not undone: call it from a program's entry point, not from library code.
    """
    if os.environ.get("ANYDEPTH_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, -1) == 1
