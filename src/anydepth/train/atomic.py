"""Writing a file so that no reader ever sees it half written."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(target: Path, write: Callable[[BinaryIO], object]) -> None:
    """Creates ``target`` with the bytes ``write(f)`` puts into an open binary file, all at once: a
    reader sees the old file or the whole new one. Concurrent runs (torchrun ranks, a sweep) may build
    the same cache: each writes its own temp file and renames it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
