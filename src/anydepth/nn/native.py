"""Small C++ kernels compiled on first use and loaded with ``ctypes``.

Used where a CPU op is bound by memory traffic that eager torch spends in several passes (RMSNorm,
the hyper-connection width and depth connections). The C++ lives only in the package's ``.cpp`` files
(``anydepth/csrc/*.cpp``, with the shared ``huge_pages.h``); this module compiles and loads them, and
the layers expose each kernel as a ``torch.library`` custom op. Each file's C-linkage entry points take
one pointer to a struct of named fields (a ``ctypes.Structure`` of the same layout on this side: no
argument can be passed in the wrong place). It is compiled once per machine with the system compiler
(``$CXX``, else ``g++``/``c++``; about 2 s) with OpenMP, which resolves to torch's own OpenMP runtime
inside the process. The shared object is cached under ``$ANYDEPTH_CACHE/kernels`` (default
``~/.cache/anydepth/kernels``), keyed by the sources, the compiler, the flags and the CPU's ISA flags.
That directory must belong to the user and is kept at mode 0700; a cached object that is not a
regular file owned by the user, or that others may write, is not loaded but built again. Where the
kernel cannot be built (no compiler, not Linux, a cache directory of someone else's) the callers use
their eager torch formula, which computes the same thing; each kernel can also be switched off with
its environment variable (``=0``).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from importlib import resources
from pathlib import Path

import torch

__all__ = ["NativeKernel", "kernel_source", "plain_cpu_op", "plain_cpu_tensor", "struct_args"]

_PLAIN = (torch.Tensor, torch.nn.Parameter)  # subclasses beyond these override ops the kernel would skip

log = logging.getLogger(__name__)

# -march=native: the library is built on the machine that runs it, and the cache key includes the CPU
CXX_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
_HEADERS = ("huge_pages.h",)


def kernel_source(name: str) -> str:
    """The text of ``anydepth/csrc/<name>`` (package data)."""
    return resources.files("anydepth").joinpath("csrc", name).read_text()


def struct_args(cls: type[ctypes.Structure], **values) -> ctypes.Structure:
    """``cls`` filled by field name; a name that is not a field raises (ctypes would add an attribute)."""
    fields = {f[0] for f in cls._fields_}
    unknown = set(values) - fields
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    return cls(**values)


def _private_dir(path: Path) -> Path:
    """``path``, created if missing, owned by this user and at mode 0700; else a RuntimeError."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = os.stat(path, follow_symlinks=False)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise RuntimeError(f"the kernel cache {path} is not a directory; remove it or set ANYDEPTH_CACHE")
    if st.st_uid != os.getuid():
        raise RuntimeError(
            f"the kernel cache {path} belongs to uid {st.st_uid}, not to this user ({os.getuid()}); "
            "set ANYDEPTH_CACHE to a directory of your own"
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def _trusted(fd: int) -> bool:
    """Whether the open file ``fd`` may be loaded: a regular file of this user that no one else may write."""
    st = os.fstat(fd)
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


class NativeKernel:
    """One compiled kernel, loaded on first use; ``lib`` stays None where it cannot be built.

    ``source`` names its file in ``anydepth/csrc``; ``bind(lib)`` declares the ctypes signatures of the
    entry points. ``enabled`` starts from the environment variable ``env`` (anything but ``"0"``
    enables) and can be toggled with :meth:`use`.
    """

    def __init__(self, name: str, source: str, env: str, bind) -> None:
        self.name, self.source_file, self.env, self.bind = name, source, env, bind
        self.enabled = os.environ.get(env, "1") != "0"
        self.lib = None
        self.error: str | None = None
        self._tried = False
        self._lock = threading.Lock()

    @property
    def source(self) -> str:
        return kernel_source(self.source_file)

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

    def _open_cached(self, so: Path) -> int | None:
        """A descriptor of ``so`` if it exists and may be loaded, else None (a planted or writable
        object is left for the build to replace)."""
        try:
            fd = os.open(so, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        if _trusted(fd):
            return fd
        os.close(fd)
        log.warning("ignoring %s: not a regular file of this user, or writable by others; building it again", so)
        return None

    def _load(self):
        if not sys.platform.startswith("linux"):
            raise RuntimeError(f"the {self.name} kernel is built for Linux only, this is {sys.platform}")
        cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
        if not cxx:
            raise RuntimeError("no C++ compiler found (set CXX or install g++)")
        sources = [self.source, *map(kernel_source, _HEADERS)]
        key = hashlib.sha256("\0".join([*sources, cxx, *CXX_FLAGS, self._cpu_id()]).encode()).hexdigest()[:16]
        cache = _private_dir(self.cache_dir())
        so = cache / f"{self.name}_{key}.so"
        fd = self._open_cached(so)
        if fd is None:
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                for name, text in zip([self.source_file, *_HEADERS], sources):
                    (Path(tmp) / name).write_text(text)
                out = Path(tmp) / f"{self.name}.so"
                proc = subprocess.run(
                    [cxx, *CXX_FLAGS, "-I", tmp, str(Path(tmp) / self.source_file), "-o", str(out)],
                    capture_output=True, text=True, timeout=300,
                )
                if proc.returncode != 0:
                    raise RuntimeError(f"{cxx} failed: {proc.stderr.strip()[-2000:]}")
                os.chmod(out, 0o700)
                os.replace(out, so)  # atomic: concurrent builders race harmlessly
            fd = self._open_cached(so)
            if fd is None:
                raise RuntimeError(f"the freshly built {so} is not this user's to load")
        try:
            # by its path (dlopen tells libraries apart by name): in a directory only this user may
            # write, the file checked above is the one loaded
            lib = ctypes.CDLL(str(so))
        finally:
            os.close(fd)
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
    # tracing first: under torch.compile the tensors are fake, and probing their storage would break the graph
    if torch.compiler.is_compiling() or torch.jit.is_scripting() or torch.is_autocast_enabled("cpu"):
        return False
    return all(t is None or plain_cpu_tensor(t) for t in tensors)
