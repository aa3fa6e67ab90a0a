"""Fixtures shared by the layer tests."""

from __future__ import annotations

import pytest


def _vma_flags(addr: int) -> set[str]:
    """The VmFlags of the mapping that holds ``addr``, from /proc/self/smaps."""
    current = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                current = lo <= addr < hi
            elif current and head == "VmFlags:":
                return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {addr:#x}")


@pytest.fixture
def vma_flags():
    """``vma_flags(addr)``: the kernel's VmFlags of the mapping holding ``addr`` ("hg": huge pages advised)."""
    return _vma_flags
