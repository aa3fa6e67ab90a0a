"""retain_freed_memory: glibc then serves tensor-sized blocks from its heap and never trims it."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

from anydepth.train import malloc

glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")

# a fresh process: allocate and free 16 MiB blocks, report the bytes glibc holds in mmapped blocks
# while one is live (mallinfo2().hblkhd) and the heap's size after the frees (arena)
PROBE = r"""
import ctypes, sys
from anydepth.train.malloc import retain_freed_memory
libc = ctypes.CDLL(None)
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
tuned = retain_freed_memory() if sys.argv[1] == "tuned" else False
p = libc.malloc(16 << 20)
ctypes.memset(p, 1, 16 << 20)
mapped = libc.mallinfo2().hblkhd
q = libc.malloc(16 << 20)
ctypes.memset(q, 1, 16 << 20)
libc.free(q)
libc.free(p)
print(int(tuned), mapped, libc.mallinfo2().arena)
"""


def _probe(mode: str) -> tuple[int, int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    tuned, mapped, arena = (int(v) for v in out.stdout.split())
    return tuned, mapped, arena


@glibc
def test_blocks_come_from_a_heap_that_is_not_trimmed():
    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    tuned, mapped, arena = _probe("tuned")
    assert tuned == 1
    assert mapped < 16 << 20  # the 16 MiB block is not a mapping of its own
    assert arena >= 32 << 20  # both freed blocks stay in the heap
    # glibc's defaults, for contrast: the first 16 MiB block is mmapped, so the heap stays small
    tuned, mapped, arena = _probe("default")
    assert tuned == 0 and mapped >= 16 << 20 and arena < 16 << 20


def test_switch_off(monkeypatch):
    monkeypatch.setenv("ANYDEPTH_MALLOC_TUNING", "0")
    assert malloc.retain_freed_memory() is False
