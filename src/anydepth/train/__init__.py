"""Training: data, optimiser, loop, checkpoints, distributed.

``from anydepth.train import RunConfig, TrainConfig, DataConfig, run`` is the programmatic form of
``anydepth train``; see docs/training.md. Names load lazily so ``import anydepth.train`` stays cheap.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "RunConfig": "anydepth.train.config",
    "TrainConfig": "anydepth.train.config",
    "DataConfig": "anydepth.train.config",
    "run": "anydepth.train.loop",
    "evaluate": "anydepth.train.loop",
    "TrainingDiverged": "anydepth.train.loop",
    "load_corpus": "anydepth.train.data",
    "unigram_entropy_bits": "anydepth.train.data",
    "Tokenizer": "anydepth.train.tokenizer",
    "train_bpe": "anydepth.train.tokenizer",
    "CheckpointError": "anydepth.train.checkpoint",
    "load_checkpoint": "anydepth.train.checkpoint",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'anydepth.train' has no attribute {name!r}")


def __dir__():
    return __all__
