"""The native kernels' build cache: a private directory, and no object loaded that others could have planted."""

from __future__ import annotations

import os
import shutil
import stat

import pytest

from anydepth.nn import norms
from anydepth.nn.native import NativeKernel

pytestmark = pytest.mark.skipif(
    not norms._KERNEL.available(), reason=f"no kernel can be built here: {norms._KERNEL.error}"
)


def _kernel() -> NativeKernel:
    return NativeKernel("rmsnorm", "rms_norm.cpp", "ANYDEPTH_FUSED_NORM", norms._bind)


def _cached(cache) -> list:
    return sorted((cache / "kernels").glob("rmsnorm_*.so"))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ANYDEPTH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_cache_directory_is_private(cache):
    (cache / "kernels").mkdir(parents=True, mode=0o777)
    os.chmod(cache / "kernels", 0o777)
    assert _kernel().get() is not None
    assert stat.S_IMODE(os.stat(cache / "kernels").st_mode) == 0o700
    (so,) = _cached(cache)
    st = os.stat(so)
    assert st.st_uid == os.getuid() and not st.st_mode & 0o077


def _plant(so, mode: int, uid: int | None = None) -> None:
    # what another user (or a writable-by-all file) could leave in its place: not a loadable library
    os.unlink(so)
    so.write_bytes(b"not a shared object")
    os.chmod(so, mode)
    if uid is not None:
        os.chown(so, uid, -1)


@pytest.mark.parametrize("case", ["writable by others", "writable by the group", "another user's"])
def test_a_planted_object_is_refused_and_rebuilt(cache, case):
    assert _kernel().get() is not None
    (so,) = _cached(cache)
    if case == "another user's":
        if os.getuid() != 0:
            pytest.skip("giving a file to another user needs root")
        _plant(so, 0o755, uid=65534)
    else:
        _plant(so, 0o666 if case == "writable by others" else 0o775)
    kernel = _kernel()
    assert kernel.get() is not None, kernel.error  # rebuilt: the planted bytes would not even load
    st = os.stat(so)
    assert st.st_uid == os.getuid() and not st.st_mode & 0o022
    assert so.read_bytes()[:4] == b"\x7fELF"


def test_a_symlink_in_place_of_the_object_is_refused(cache, tmp_path):
    assert _kernel().get() is not None
    (so,) = _cached(cache)
    elsewhere = tmp_path / "elsewhere.so"
    shutil.copy(so, elsewhere)
    os.unlink(so)
    so.symlink_to(elsewhere)
    assert _kernel().get() is not None
    assert not so.is_symlink()


def test_a_cache_directory_of_another_user_is_not_used(cache):
    if os.getuid() != 0:
        pytest.skip("giving a directory to another user needs root")
    (cache / "kernels").mkdir(parents=True)
    os.chown(cache / "kernels", 65534, -1)
    kernel = _kernel()
    assert kernel.get() is None
    assert "ANYDEPTH_CACHE" in kernel.error and "belongs to uid 65534" in kernel.error
