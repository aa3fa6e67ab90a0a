"""Corpora, split, cache and batches."""

from __future__ import annotations

import math
import os
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from anydepth.train.config import DataConfig
from anydepth.train.data import eval_batch, load_corpus, sample_batch, stdlib_files, unigram_entropy_bits


def test_unigram_entropy_matches_formula():
    # 'aab' repeated: p(a) = 2/3, p(b) = 1/3.
    toks = np.frombuffer(b"aab" * 100, dtype=np.uint8)
    h = -(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3)
    assert unigram_entropy_bits(toks) == pytest.approx(h, abs=1e-12)
    assert unigram_entropy_bits(torch.arange(16)) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="empty"):
        unigram_entropy_bits(np.zeros(0, dtype=np.uint8))


def test_text_file_split_is_contiguous_and_memory_mapped(tmp_path):
    raw = bytes(range(1, 256)) * 40  # every byte value but NUL, which marks a binary file
    p = tmp_path / "t.txt"
    p.write_bytes(raw)
    train, val = load_corpus(DataConfig(path=str(p), val_fraction=0.25, cache_dir=str(tmp_path / "c")))
    assert isinstance(train, np.memmap) and train.dtype == np.uint8
    n_val = round(len(raw) * 0.25)
    assert bytes(train) == raw[: len(raw) - n_val] and bytes(val) == raw[len(raw) - n_val :]
    train, val = load_corpus(DataConfig(path=str(p), max_bytes=1000, val_fraction=0.1))
    assert bytes(train) + bytes(val) == raw[:1000] and len(val) == 100


def test_directory_is_concatenated_in_sorted_order_and_cached(tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_bytes(b"second file\n" * 20)
    (d / "a.txt").write_bytes(b"first file\n" * 20)
    (d / "sub" / "c.txt").write_bytes(b"third\n" * 20)
    (d / "blob.bin").write_bytes(b"\0\1\2" * 10)  # binary: skipped
    cache = tmp_path / "cache"
    cfg = DataConfig(path=str(d), val_fraction=0.1, cache_dir=str(cache))
    train, val = load_corpus(cfg)
    expected = b"first file\n" * 20 + b"second file\n" * 20 + b"third\n" * 20
    assert bytes(train) + bytes(val) == expected
    (cached,) = cache.iterdir()
    mtime = cached.stat().st_mtime_ns
    load_corpus(cfg)
    assert cached.stat().st_mtime_ns == mtime  # second run reads the cache, does not rebuild it


def test_stdlib_corpus_excludes_tests_and_site_packages():
    files = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and len(rel) > 100
    assert all(r.endswith(".py") for r in rel)
    for r in rel:
        dirs = r.split("/")[:-1]
        assert not any(d in ("site-packages", "idlelib") or d.startswith("test") for d in dirs), r
        assert not r.split("/")[-1].startswith("test"), r
    assert "os.py" in rel and "json/decoder.py" in rel


def test_npy_token_arrays(tmp_path):
    toks = (np.arange(5000) % 1000).astype(np.uint16)
    p = tmp_path / "toks.npy"
    np.save(p, toks)
    train, val = load_corpus(DataConfig(path=str(p), val_fraction=0.2))
    assert train.dtype == np.uint16
    np.testing.assert_array_equal(np.concatenate([train, val]), toks)


@pytest.mark.parametrize(
    "make, needle", [(lambda p: p / "missing.txt", "does not exist"), (None, "is empty")]
)
def test_missing_or_empty_path_names_it(tmp_path, make, needle):
    if make is None:
        path = tmp_path / "empty.txt"
        path.write_bytes(b"")
    else:
        path = make(tmp_path)
    with pytest.raises(ValueError, match=needle) as e:
        load_corpus(DataConfig(path=str(path)))
    assert str(path) in str(e.value)


def test_sample_batch_is_a_function_of_seed_and_step_and_shards_by_rank():
    toks = np.arange(10_000, dtype=np.int64) % 251
    toks = toks.astype(np.uint8)
    x, y = sample_batch(toks, step=5, seed=1, batch_size=8, seq_len=12)
    x2, y2 = sample_batch(toks, step=5, seed=1, batch_size=8, seq_len=12)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert x.shape == (8, 12) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one position
    assert not torch.equal(x, sample_batch(toks, step=6, seed=1, batch_size=8, seq_len=12)[0])
    shards = [
        sample_batch(toks, step=5, seed=1, batch_size=8, seq_len=12, rank=r, world=2)[0] for r in range(2)
    ]
    assert torch.equal(torch.cat(shards), x)


def test_eval_batches_are_fixed_and_evenly_spaced():
    toks = (np.arange(1000) % 256).astype(np.uint8)
    x0, y0 = eval_batch(toks, index=0, n_batches=2, batch_size=3, seq_len=10)
    x1, _ = eval_batch(toks, index=1, n_batches=2, batch_size=3, seq_len=10)
    starts = np.linspace(0, 1000 - 11, num=6).astype(np.int64)
    assert [int(v) for v in torch.cat([x0, x1])[:, 0]] == [int(s % 256) for s in starts]
    assert torch.equal(x0[:, 1:], y0[:, :-1])


def test_default_corpus_size_and_entropy_are_as_documented(tmp_path):
    train, val = load_corpus(DataConfig(cache_dir=str(tmp_path)))
    total = train.size + val.size
    assert total == sum(os.path.getsize(f) for f in stdlib_files())
    assert val.size == round(total * 0.05)
    assert 4.3 < unigram_entropy_bits(train) < 5.0
