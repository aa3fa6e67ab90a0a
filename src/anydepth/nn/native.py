"""Small C++ kernels compiled on first use and loaded with ``ctypes``.

Used where a CPU op is bound by memory traffic that eager torch spends in several passes (RMSNorm,
the hyper-connection width and depth connections). Each kernel is one self-contained C++ source with
``extern "C"`` entry points over raw pointers; it is compiled once per machine with the system
compiler (``$CXX``, else ``g++``/``c++``; about 2 s) with OpenMP, which resolves to torch's own
OpenMP runtime inside the process. The shared object is cached under
``$ANYDEPTH_CACHE/kernels`` (default ``~/.cache/anydepth/kernels``), keyed by the source, the
compiler, the flags and the CPU's ISA flags. Where it cannot be built (no compiler, not Linux) the
callers use their eager torch formula, which computes the same thing; each kernel can also be
switched off with its environment variable (``=0``).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["HUGE_PAGE_ADVICE", "NativeKernel", "plain_cpu_op", "plain_cpu_tensor"]

_PLAIN = (torch.Tensor, torch.nn.Parameter)  # subclasses beyond these override ops the kernel would skip

log = logging.getLogger(__name__)

# C++ shared by the kernel sources (prepended to them): anydepth_native::advise_huge(p, bytes).
# glibc serves every allocation of 32 MiB or more (its largest mmap threshold) with a fresh mapping, so
# such an output is page-faulted 4 KiB at a time on first write, which can cost more than the kernel
# that writes it. Asking for transparent huge pages on the fresh range faults it in 2 MiB pages
# instead. Smaller outputs come from glibc's heap, already faulted, and are left alone.
HUGE_PAGE_ADVICE = r"""
#include <cstdint>
#include <sys/mman.h>

namespace anydepth_native {
constexpr int64_t kHugeBytes = int64_t(32) << 20;

inline void advise_huge(void* p, int64_t bytes) {
#ifdef MADV_HUGEPAGE
  if (bytes < kHugeBytes) return;
  constexpr uintptr_t huge = uintptr_t(2) << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + huge - 1) & ~(huge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes)) & ~(huge - 1);
  // advice only: where THP is off or the range is not a mapping of its own, the kernel says no and
  // nothing changes
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}
}  // namespace anydepth_native
"""

# -march=native: the library is built on the machine that runs it, and the cache key includes the CPU
CXX_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")


class NativeKernel:
    """One compiled kernel, loaded on first use; ``lib`` stays None where it cannot be built.

    ``bind(lib)`` declares the ctypes signatures of the entry points. ``enabled`` starts from the
    environment variable ``env`` (anything but ``"0"`` enables) and can be toggled with :meth:`use`.
    """

    def __init__(self, name: str, source: str, env: str, bind: Callable[[ctypes.CDLL], None]) -> None:
        self.name, self.source, self.env, self.bind = name, source, env, bind
        self.enabled = os.environ.get(env, "1") != "0"
        self.lib = None
        self.error: str | None = None
        self._tried = False
        self._lock = threading.Lock()

    def get(self):
        if not self._tried:
            with self._lock:
                if not self._tried:
                    try:
                        self.lib = self._load()
                    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
                        self.error = f"{type(e).__name__}: {e}"
                        log.info("%s kernel unavailable, using the eager formula (%s)", self.name, self.error)
                    self._tried = True
        return self.lib

    def available(self) -> bool:
        """True if the kernel is enabled and built (building it on the first call)."""
        return self.enabled and self.get() is not None

    @contextlib.contextmanager
    def use(self, enabled: bool):
        """Turn the kernel on or off inside the block (e.g. to time or test the eager path)."""
        previous = self.enabled
        self.enabled = bool(enabled)
        try:
            yield
        finally:
            self.enabled = previous

    @staticmethod
    def cache_dir() -> Path:
        # the package's one cache root (datasets live there too)
        return Path(os.environ.get("ANYDEPTH_CACHE") or Path.home() / ".cache" / "anydepth") / "kernels"

    @staticmethod
    def _cpu_id() -> str:
        # the ISA flags decide what -march=native emitted; a cache shared between machines must not mix them
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("flags"):
                    return line
        return platform.processor() + platform.machine()

    def _load(self):
        if not sys.platform.startswith("linux"):
            raise RuntimeError(f"the {self.name} kernel is built for Linux only, this is {sys.platform}")
        cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
        if not cxx:
            raise RuntimeError("no C++ compiler found (set CXX or install g++)")
        key = hashlib.sha256("\0".join([self.source, cxx, *CXX_FLAGS, self._cpu_id()]).encode()).hexdigest()[:16]
        cache = self.cache_dir()
        so = cache / f"{self.name}_{key}.so"
        if not so.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                src = Path(tmp) / f"{self.name}.cpp"
                src.write_text(self.source)
                out = Path(tmp) / f"{self.name}.so"
                proc = subprocess.run(
                    [cxx, *CXX_FLAGS, str(src), "-o", str(out)], capture_output=True, text=True, timeout=300
                )
                if proc.returncode != 0:
                    raise RuntimeError(f"{cxx} failed: {proc.stderr.strip()[-2000:]}")
                os.replace(out, so)  # atomic: concurrent builders race harmlessly
        lib = ctypes.CDLL(str(so))
        self.bind(lib)
        return lib


def _has_storage(t: torch.Tensor) -> bool:
    # torch.func's wrappers (vmap's batched tensors, grad's tracking tensors) are Tensors without storage
    # of their own: a kernel reading memory would bypass the transform
    try:
        t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return False
    return True


def plain_cpu_tensor(t: torch.Tensor) -> bool:
    """A CPU tensor that is a plain ``Tensor`` or ``Parameter`` with storage, whose memory a kernel may read."""
    return type(t) in _PLAIN and t.is_cpu and _has_storage(t)


def plain_cpu_op(*tensors: torch.Tensor | None) -> bool:
    """True where a kernel over raw CPU pointers may replace torch ops: plain CPU tensors with storage
    (not wrapped by a ``torch.func`` transform), and no tracer or autocast that needs to see torch ops
    (``torch.compile`` fuses the eager formula itself; autocast must act on each op)."""
    for t in tensors:
        if t is not None and not plain_cpu_tensor(t):
            return False
    return not (torch.compiler.is_compiling() or torch.jit.is_scripting() or torch.is_autocast_enabled("cpu"))
