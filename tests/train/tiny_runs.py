"""Tiny runs shared by the trainer tests: dim 32, depth 2, a 40 KB text file written per test."""

from __future__ import annotations

import sys
from pathlib import Path

from anydepth.model import presets
from anydepth.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def tiny_model(**kw):
    return presets.prenorm(**{"vocab_size": 256, "dim": 32, "depth": 2, "heads": 2, "max_seq_len": 64, **kw})


def tiny_train(**kw) -> TrainConfig:
    base = dict(
        steps=6,
        batch_size=4,
        seq_len=16,
        lr=3e-3,
        warmup=2,
        eval_every=3,
        eval_batches=2,
        log_every=1,
        checkpoint_every=3,
        keep_last=2,
        progress=False,
        sample_tokens=8,
        threads=1,
    )
    base.update(kw)
    return TrainConfig(**base)


def write_corpus(path: Path, n_bytes: int = 40_000) -> Path:
    # Deterministic text with structure a model can learn (repeated keywords and indentation).
    words = ["def ", "return ", "self", "(x)", ":\n", "    ", "import ", "for i in range(n)", " = ", "\n"]
    out, size, i = [], 0, 0
    while size < n_bytes:
        w = words[(i * 7 + i // 3) % len(words)]
        out.append(w)
        size += len(w)
        i += 1
    path.write_text("".join(out)[:n_bytes])
    return path
