"""Corpora as memory-mapped token arrays (bytes, or the ids of a tokenizer), and the batches drawn from them.

Sources (``DataConfig.path``):

- ``None``: the default corpus, the Python standard library's own ``.py`` files on this machine
  (``sysconfig.get_paths()["stdlib"]``; ``test``/``tests`` packages, ``idlelib`` and
  ``site-packages`` excluded; sorted relative paths; raw bytes, concatenated). On CPython 3.11 it is
  about 11 MB with a unigram entropy of about 4.7 bits per byte, the bpc of a model that only learnt
  byte frequencies; anything well below that is learnt structure.
- a text file (read as bytes, mapped directly), a directory (its regular files that contain no NUL
  byte in their first 8 KiB, and its ``.jsonl``/``.parquet`` files, sorted by path, concatenated),
  ``enwik8`` or ``enwik8.zip`` (the standard 90M/5M/5M train/validation/test split), or a ``.npy``
  array of uint8/uint16 token ids.
- a ``.jsonl`` file (one JSON object per line; the string field ``DataConfig.text_field``) or a
  ``.parquet`` file (that column, read with pyarrow): the documents in file order, UTF-8 encoded,
  separated by a blank line (``"\n\n"``).

Concatenated sources are written once to a cache file keyed by the source's paths, sizes and
modification times, then memory-mapped, so a second run starts at once.

The split is contiguous: the last ``val_fraction`` of the (optionally ``max_bytes``-truncated)
corpus is validation. Bits per character (byte) is the cross-entropy in nats divided by ln 2.
It depends only on the files (sorted paths, records in file order), never on the seed.

With ``DataConfig.tokenizer`` the split is made on the bytes (moved forward to the next character
boundary) and each side is encoded on its own (:func:`anydepth.train.tokenizer.encode_to_cache`),
so a tokenized run validates on exactly the text of the byte-level run of the same corpus; the id
arrays are cached under a key of the source, the byte range and the tokenizer's SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import torch

from anydepth.train.atomic import atomic_write
from anydepth.train.config import DataConfig

__all__ = [
    "load_corpus",
    "raw_split",
    "unigram_entropy_bits",
    "stdlib_files",
    "sample_batch",
    "eval_batch",
    "ENWIK8_SPLIT",
]

RECORD_SEPARATOR = b"\n\n"  # between the documents of a .jsonl or .parquet file
RECORD_SUFFIXES = (".jsonl", ".parquet")
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


def load_corpus(
    cfg: DataConfig | None = None, tokenizer=None, *, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """``(train_tokens, val_tokens)``: read-only memory-mapped arrays of uint8 bytes, or of the ids
    of ``tokenizer`` (an :class:`~anydepth.train.tokenizer.Tokenizer`; default: the file
    ``cfg.tokenizer``, if set). ``progress`` shows a bar while a corpus is encoded the first time.

    Raises ``ValueError`` naming the path for a missing or empty source, or a corpus too short to
    split.
    """
    cfg = cfg or DataConfig()
    if not isinstance(cfg, DataConfig):
        raise TypeError(f"load_corpus expects a DataConfig, got {type(cfg).__name__}")
    if tokenizer is None and cfg.tokenizer is not None:
        from anydepth.train.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_file(cfg.tokenizer)
    tokens, split = _source_tokens(cfg)
    n_train = _split_point(cfg, tokens, split)
    if tokenizer is None or tokens.dtype != np.uint8 or (cfg.path or "").endswith(".npy"):
        n_val = split[1] if split is not None and cfg.max_bytes is None else None
        end = n_train + n_val if n_val is not None else min(tokens.size, cfg.max_bytes or tokens.size)
        return tokens[:n_train], tokens[n_train:end]
    return _encoded_split(cfg, tokens, split, tokenizer, progress)


def raw_split(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """The corpus's ``(train, validation)`` bytes as a tokenized run splits them: the split of
    :func:`load_corpus` with both ends moved to character boundaries."""
    tokens, split = _source_tokens(cfg)
    if tokens.dtype != np.uint8 or (cfg.path or "").endswith(".npy"):
        raise ValueError(
            f"data.path {cfg.path!r} holds token ids, not text; pass a text file, a directory, .jsonl or .parquet"
        )
    lo, end = _byte_bounds(cfg, tokens, split)
    return tokens[:lo], tokens[lo:end]


def _byte_bounds(cfg: DataConfig, tokens: np.ndarray, split) -> tuple[int, int]:
    n_train = _split_point(cfg, tokens, split)
    if split is not None and cfg.max_bytes is None:
        end = n_train + split[1]
    else:
        end = min(tokens.size, cfg.max_bytes or tokens.size)
    lo = _char_boundary(tokens, n_train)
    while lo < end < tokens.size and (int(tokens[end]) & 0xC0) == 0x80:
        end -= 1
    return lo, end


def _split_point(cfg: DataConfig, tokens: np.ndarray, split) -> int:
    """Where validation starts (tokens before it train); checks the corpus is long enough."""
    if split is not None and cfg.max_bytes is None:
        n_train, n_val, _ = split
        if tokens.size < n_train + n_val:
            raise ValueError(
                f"data.path={cfg.path!r} looks like enwik8 but has {tokens.size} bytes, fewer than the "
                f"{n_train + n_val} of its standard split; pass the full 100 MB file"
            )
        return n_train
    size = tokens.size if cfg.max_bytes is None else min(tokens.size, cfg.max_bytes)
    n_val = int(round(size * cfg.val_fraction))
    if size - n_val < 2 or n_val < 2:
        raise ValueError(
            f"the corpus at {cfg.path or 'the stdlib'} has {size} tokens (after max_bytes), too few "
            f"for a split with val_fraction={cfg.val_fraction}; use a larger file or raise data.max_bytes"
        )
    return size - n_val


def _char_boundary(data: np.ndarray, i: int) -> int:
    # UTF-8 continuation bytes are 10xxxxxx: step over them so that no character is cut in two.
    while i < data.size and (int(data[i]) & 0xC0) == 0x80:
        i += 1
    return i


def _encoded_split(cfg: DataConfig, raw: np.ndarray, split, tok, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    from anydepth.train.tokenizer import encode_to_cache

    lo, end = _byte_bounds(cfg, raw, split)
    src = getattr(raw, "filename", None) or cfg.path
    st = Path(src).stat() if src and Path(src).exists() else None
    ident = f"{src}\0{st.st_size if st else raw.size}\0{st.st_mtime_ns if st else 0}\0{tok.sha256}"
    out = []
    for a, b in ((0, lo), (lo, end)):
        key = hashlib.sha256(f"{ident}\0{a}\0{b}".encode()).hexdigest()[:16]
        out.append(encode_to_cache(raw[a:b], tok, _cache_dir(cfg) / f"ids-{key}.bin", progress=progress))
    for name, ids in zip(("training", "validation"), out):
        if ids.size < 2:
            raise ValueError(
                f"the {name} split of {cfg.path or 'the stdlib'} encodes to {ids.size} tokens; use more text"
            )
    return out[0], out[1]


def _cache_dir(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("ANYDEPTH_CACHE") or Path.home() / ".cache" / "anydepth")


def _source_tokens(cfg: DataConfig) -> tuple[np.ndarray, tuple[int, int, int] | None]:
    cache = _cache_dir(cfg)
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
            (p for p in path.rglob("*") if p.is_file() and (p.suffix in RECORD_SUFFIXES or _is_text(p))),
            key=lambda p: p.as_posix(),
        )
        if not files or all(p.stat().st_size == 0 for p in files):
            raise ValueError(
                f"data.path {str(path)!r} contains no non-empty text files; point it at text data"
            )
        return _cached_concat(files, cache, "dir", cfg.text_field), None
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
    if path.suffix in RECORD_SUFFIXES:
        return _cached_concat([path], cache, "records", cfg.text_field), None
    if path.suffix == ".zip":
        return _cached_zip(path, cache), (ENWIK8_SPLIT if path.stem == "enwik8" else None)
    if not _is_text(path):
        raise ValueError(
            f"data.path {str(path)!r} is a binary file (it holds NUL bytes); pass a text file, a directory of "
            "text files or a .npy token array"
        )
    tokens = np.memmap(path, dtype=np.uint8, mode="r")
    return tokens, (ENWIK8_SPLIT if path.name == "enwik8" else None)


def _is_text(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" not in f.read(8192)


def _cached_concat(files: list[Path], cache: Path, tag: str, text_field: str = "text") -> np.ndarray:
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    if any(p.suffix in RECORD_SUFFIXES for p in files):
        h.update(f"field={text_field}".encode())
    target = cache / f"{tag}-{h.hexdigest()[:16]}.u8"
    if not target.exists():

        def write(f) -> None:
            for p in files:
                if p.suffix in RECORD_SUFFIXES:
                    for i, doc in enumerate(_records(p, text_field)):
                        f.write(RECORD_SEPARATOR + doc if i else doc)
                else:
                    f.write(p.read_bytes())

        atomic_write(target, write)
    if target.stat().st_size == 0:
        raise ValueError(f"data.path {str(files[0])!r} holds no text in field {text_field!r}; point it at text data")
    return np.memmap(target, dtype=np.uint8, mode="r")


def _records(path: Path, field: str):
    """UTF-8 bytes of each document's ``field`` in a .jsonl or .parquet file, in file order."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(
                        f"data.path {str(path)!r} line {n} is not JSON ({e}); one object per line"
                    ) from None
                text = rec.get(field) if isinstance(rec, dict) else None
                if not isinstance(text, str):
                    keys = ", ".join(sorted(rec)) if isinstance(rec, dict) else type(rec).__name__
                    raise ValueError(
                        f"data.path {str(path)!r} line {n} has no string field {field!r} (it has {keys}); "
                        "set --data.text_field"
                    )
                yield text.encode("utf-8")
        return
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow reports a damaged file with its own exception types
        raise ValueError(f"data.path {str(path)!r} is not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise ValueError(
            f"data.path {str(path)!r} has no column {field!r} (columns: {', '.join(names)}); set --data.text_field"
        )
    for batch in pf.iter_batches(columns=[field]):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield (text if isinstance(text, str) else str(text)).encode("utf-8")


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

                atomic_write(target, write)
        except zipfile.BadZipFile as e:
            raise ValueError(f"data.path {str(path)!r} is not a readable zip archive ({e})") from None
    return np.memmap(target, dtype=np.uint8, mode="r")


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
