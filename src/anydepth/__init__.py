"""anydepth: transformers that stay stable at any depth and efficient at any sequence length.

One builder composes any residual scheme (pre-/post-LN, ReZero, Admin, DeepNorm, LayerScale,
hyper-connections) with any norm (LayerNorm, RMSNorm, partial RMSNorm, ScaleNorm), any attention
(full, local, LSH) and a sequential or reversible stack. The seed-compatible APIs of the original
packages live in :mod:`anydepth.compat` (``anydepth.compat.admin_torch``,
``anydepth.compat.hyper_connections``, ``anydepth.compat.rmsnorm``, ...), each a translation to the
same layers; the ReZero and Reformer layer names are also exported here (``anydepth.RMSNorm`` is the
library's, built from its ``Config``).

Names are imported lazily (PEP 562) so ``import anydepth`` stays fast and a command-line call
loads only what it uses.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    # registry
    "registered": "anydepth.registry",
    "NORMS": "anydepth.registry",
    "RESIDUALS": "anydepth.registry",
    "ATTENTIONS": "anydepth.registry",
    "FFS": "anydepth.registry",
    "STACKS": "anydepth.registry",
    "POSITIONS": "anydepth.registry",
    # norms
    "LayerNorm": "anydepth.nn.norms",
    "RMSNorm": "anydepth.nn.norms",
    "PartialRMSNorm": "anydepth.nn.norms",
    "ScaleNorm": "anydepth.nn.norms",
    "DyT": "anydepth.nn.norms",
    # attention, feed-forward, positions
    "FullAttention": "anydepth.nn.attention",
    "LocalAttention": "anydepth.nn.attention",
    "MLP": "anydepth.nn.feedforward",
    "GLU": "anydepth.nn.feedforward",
    "LearnedPosition": "anydepth.nn.positional",
    "SinusoidalPosition": "anydepth.nn.positional",
    "AxialPosition": "anydepth.nn.positional",
    "RotaryEmbedding": "anydepth.nn.positional",
    "apply_rotary": "anydepth.nn.positional",
    # residual schemes
    "Residual": "anydepth.nn.residual",
    "PreNorm": "anydepth.nn.residual",
    "PostNorm": "anydepth.nn.residual",
    "ReZero": "anydepth.nn.residual",
    "Admin": "anydepth.nn.residual",
    "DeepNorm": "anydepth.nn.residual",
    "LayerScale": "anydepth.nn.residual",
    "PeriLN": "anydepth.nn.residual",
    "HyperConnection": "anydepth.nn.residual",
    "ManifoldHyperConnection": "anydepth.nn.residual",
    "LiteManifoldHyperConnection": "anydepth.nn.residual",
    "admin_profile_": "anydepth.nn.residual",
    "DenseStack": "anydepth.nn.stack",
    # the builder, the models, saving and sampling
    "ModelConfig": "anydepth.model.config",
    "EncoderDecoderConfig": "anydepth.model.config",
    "build_model": "anydepth.model.build",
    "InvalidCombination": "anydepth.model.build",
    "TransformerLM": "anydepth.model.lm",
    "KVCache": "anydepth.model.lm",
    "LMOutput": "anydepth.model.lm",
    "EncoderDecoder": "anydepth.model.encdec",
    "reparameterize": "anydepth.model.reparam",
    "save_pretrained": "anydepth.model.pretrained",
    "from_pretrained": "anydepth.model.pretrained",
    "generate": "anydepth.sampling",
    # training
    "RunConfig": "anydepth.train.config",
    "TrainConfig": "anydepth.train.config",
    "DataConfig": "anydepth.train.config",
    "TrainingDiverged": "anydepth.train.loop",
    "CheckpointError": "anydepth.train.checkpoint",
    # ReZero seed API
    "RZTXEncoderLayer": "anydepth.compat.rezero",
    "RZTXDecoderLayer": "anydepth.compat.rezero",
    # Reformer seed API
    "LSHAttention": "anydepth.compat.reformer",
    "LSHSelfAttention": "anydepth.compat.reformer",
    "Reformer": "anydepth.compat.reformer",
    "ReformerLM": "anydepth.compat.reformer",
    "ReformerEncDec": "anydepth.compat.reformer",
    "Recorder": "anydepth.compat.reformer",
    "Autopadder": "anydepth.compat.reformer",
    "TrainingWrapper": "anydepth.compat.reformer",
    "from_reformer_pytorch": "anydepth.compat.reformer",
}
_SUBMODULES = {"nn", "model", "train", "study", "compat", "registry", "sampling"}
_ALIASES = {"presets": "anydepth.model.presets"}

__all__ = sorted(_LAZY) + sorted(_SUBMODULES) + sorted(_ALIASES)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES or name in _ALIASES:
        module = importlib.import_module(_ALIASES.get(name, f"anydepth.{name}"))
        globals()[name] = module
        return module
    raise AttributeError(f"module 'anydepth' has no attribute {name!r}")


def __dir__():
    return __all__
