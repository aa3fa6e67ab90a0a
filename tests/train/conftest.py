"""Fixtures of the trainer tests (the tiny model, settings and corpus are in tiny_runs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_runs import tiny_model, tiny_train, write_corpus

from anydepth.train.config import DataConfig, RunConfig


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus.txt")


@pytest.fixture
def make_run(tmp_path, corpus):
    def make(out: str = "run", model=None, data=None, **train_kw) -> RunConfig:
        return RunConfig(
            model=model or tiny_model(),
            train=tiny_train(**train_kw),
            data=data or DataConfig(path=str(corpus), cache_dir=str(tmp_path / "cache")),
            out=str(tmp_path / out),
        )

    return make
