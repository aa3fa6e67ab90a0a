"""Byte-level corpora as memory-mapped token arrays, and the batches drawn from them.

Sources (``DataConfig.path``):

- ``None``: the default corpus, the Python standard library's own ``.py`` files on this machine
  (``sysconfig.get_paths()["stdlib"]``; ``test``/``tests`` packages, ``idlelib`` and
  ``site-packages`` excluded; sorted relative paths; raw bytes, concatenated). On CPython 3.11 it is
  about 11 MB with a unigram entropy of about 4.7 bits per byte, the bpc of a model that only learnt
  byte frequencies; anything well below that is learnt structure.
- a text file (read as bytes, mapped directly), a directory (its regular files that contain no NUL
  byte in their first 8 KiB, sorted, concatenated), ``enwik8`` or ``enwik8.zip`` (the standard
  90M/5M/5M train/validation/test split), or a ``.npy`` array of uint8/uint16 token ids.

Concatenated sources are written once to a cache file keyed by the source's paths, sizes and
modification times, then memory-mapped, so a second run starts at once.

The split is contiguous: the last ``val_fraction`` of the (optionally ``max_bytes``-truncated)
corpus is validation. Bits per character (byte) is the cross-entropy in nats divided by ln 2.
"""

from __future__ import annotations

import hashlib
import math
import os
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import torch

from anydepth.train.config import DataConfig

__all__ = [
    "load_corpus",
    "unigram_entropy_bits",
    "stdlib_files",
    "sample_batch",
    "eval_batch",
    "ENWIK8_SPLIT",
]

ENWIK8_SPLIT = (90_000_000, 5_000_000, 5_000_000)  # train / validation / test bytes (Hutter prize convention)
_EXCLUDED_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__"}


def stdlib_files(root: str | None = None) -> list[Path]:
    """The default corpus's files: ``.py`` files of the stdlib, tests and site-packages excluded, sorted."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS and not d.startswith("test"))
        out.extend(Path(dirpath) / f for f in filenames if f.endswith(".py") and not f.startswith("test"))
    return sorted(out, key=lambda p: p.relative_to(base).as_posix())


def unigram_entropy_bits(tokens: np.ndarray | torch.Tensor) -> float:
    """Shannon entropy ``H = -sum_v p_v log2 p_v`` of the token frequencies, in bits per token.

    It is the cross-entropy of the best model that ignores context, so a bpc below it measures
    what a model learnt beyond byte frequencies.
    """
    arr = tokens.numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    if arr.size == 0:
        raise ValueError("unigram_entropy_bits needs at least one token, got an empty array")
    counts = np.bincount(arr.reshape(-1).astype(np.int64))
    p = counts[counts > 0] / arr.size
    return float(-(p * np.log2(p)).sum())


def load_corpus(cfg: DataConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(train_tokens, val_tokens)``: read-only memory-mapped uint8 (or uint16) arrays.

    Raises ``ValueError`` naming the path for a missing or empty source, or a corpus too short to
    split.
    """
    cfg = cfg or DataConfig()
    if not isinstance(cfg, DataConfig):
        raise TypeError(f"load_corpus expects a DataConfig, got {type(cfg).__name__}")
    tokens, split = _source_tokens(cfg)
    if split is not None and cfg.max_bytes is None:
        n_train, n_val, _ = split
        if tokens.size < n_train + n_val:
            raise ValueError(
                f"data.path={cfg.path!r} looks like enwik8 but has {tokens.size} bytes, fewer than the "
                f"{n_train + n_val} of its standard split; pass the full 100 MB file"
            )
        return tokens[:n_train], tokens[n_train : n_train + n_val]
    if cfg.max_bytes is not None:
        tokens = tokens[: cfg.max_bytes]
    n_val = int(round(tokens.size * cfg.val_fraction))
    if tokens.size - n_val < 2 or n_val < 2:
        raise ValueError(
            f"the corpus at {cfg.path or 'the stdlib'} has {tokens.size} tokens (after max_bytes), too few "
            f"for a split with val_fraction={cfg.val_fraction}; use a larger file or raise data.max_bytes"
        )
    return tokens[: tokens.size - n_val], tokens[tokens.size - n_val :]


def _source_tokens(cfg: DataConfig) -> tuple[np.ndarray, tuple[int, int, int] | None]:
    cache = Path(cfg.cache_dir or os.environ.get("ANYDEPTH_CACHE") or Path.home() / ".cache" / "anydepth")
    if cfg.path is None:
        files = stdlib_files()
        if not files:
            raise ValueError(
                f"no .py files found under the stdlib at {sysconfig.get_paths()['stdlib']!r}; "
                "pass a text file with --data PATH"
            )
        return _cached_concat(files, cache, "stdlib"), None
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise ValueError(f"data.path {str(path)!r} does not exist; pass an existing text file or directory")
    if path.is_dir():
        files = sorted(
            (p for p in path.rglob("*") if p.is_file() and _is_text(p)), key=lambda p: p.as_posix()
        )
        if not files or all(p.stat().st_size == 0 for p in files):
            raise ValueError(
                f"data.path {str(path)!r} contains no non-empty text files; point it at text data"
            )
        return _cached_concat(files, cache, "dir"), None
    if path.stat().st_size == 0:
        raise ValueError(f"data.path {str(path)!r} is empty; pass a file with text in it")
    if path.suffix == ".npy":
        arr = np.load(path, mmap_mode="r")
        if arr.dtype not in (np.uint8, np.uint16) or arr.ndim != 1:
            raise ValueError(
                f"data.path {str(path)!r} holds a {arr.ndim}-d {arr.dtype} array; token arrays must be "
                "1-d uint8 or uint16"
            )
        return arr, None
    if path.suffix == ".zip":
        return _cached_zip(path, cache), (ENWIK8_SPLIT if path.stem == "enwik8" else None)
    tokens = np.memmap(path, dtype=np.uint8, mode="r")
    return tokens, (ENWIK8_SPLIT if path.name == "enwik8" else None)


def _is_text(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" not in f.read(8192)


def _cached_concat(files: list[Path], cache: Path, tag: str) -> np.ndarray:
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    target = cache / f"{tag}-{h.hexdigest()[:16]}.u8"
    if not target.exists():
        _atomic_write(target, lambda f: [f.write(p.read_bytes()) for p in files])
    return np.memmap(target, dtype=np.uint8, mode="r")


def _cached_zip(path: Path, cache: Path) -> np.ndarray:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache / f"zip-{key}.u8"
    if not target.exists():
        try:
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if not n.endswith("/")]
                if not names:
                    raise ValueError(
                        f"data.path {str(path)!r} is an empty zip archive; pass a zip with a text file"
                    )

                def write(f):
                    with z.open(names[0]) as src:
                        while chunk := src.read(1 << 22):
                            f.write(chunk)

                _atomic_write(target, write)
        except zipfile.BadZipFile as e:
            raise ValueError(f"data.path {str(path)!r} is not a readable zip archive ({e})") from None
    return np.memmap(target, dtype=np.uint8, mode="r")


def _atomic_write(target: Path, write) -> None:
    # Concurrent runs (torchrun ranks, a sweep) may build the same cache: each writes its own temp
    # file and renames it into place, so readers never see a partial file.
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


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> torch.Tensor:
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    return torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))


def sample_batch(
    tokens: np.ndarray, *, step: int, seed: int, batch_size: int, seq_len: int, rank: int = 0, world: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training batch ``step``: ``(x, y)`` of shape ``(batch_size // world, seq_len)``, ``y`` = ``x`` shifted.

    The global batch of ``batch_size`` uniformly random windows is a pure function of
    ``(seed, step)``; process ``rank`` of ``world`` takes its contiguous slice. So the data
    position of a run is its step (resume needs nothing else), and ``world`` processes see exactly
    the batch one process would.
    """
    span = tokens.size - seq_len - 1
    if span < 0:
        raise ValueError(
            f"the training split has {tokens.size} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
            "lower --train.seq_len or use more data"
        )
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, span + 1, size=batch_size)
    per = batch_size // world
    w = _windows(tokens, starts[rank * per : (rank + 1) * per], seq_len)
    return w[:, :-1], w[:, 1:]


def eval_batch(
    tokens: np.ndarray, *, index: int, n_batches: int, batch_size: int, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation batch ``index`` of ``n_batches``: windows at evenly spaced fixed positions.

    Every pass scores the same windows, so validation curves are comparable across steps and runs.
    """
    span = tokens.size - seq_len - 1
    if span < 0:
        raise ValueError(
            f"the validation split has {tokens.size} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
            "lower --train.seq_len or raise --data.val_fraction"
        )
    total = n_batches * batch_size
    starts = np.linspace(0, span, num=total).astype(np.int64)
    return _xy(_windows(tokens, starts[index * batch_size : (index + 1) * batch_size], seq_len))


def _xy(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return w[:, :-1], w[:, 1:]


def bits(nats: float) -> float:
    """Nats to bits: ``nats / ln 2``."""
    return nats / math.log(2)
