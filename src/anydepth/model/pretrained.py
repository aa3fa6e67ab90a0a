"""Saving and loading a model: ``model.safetensors`` + ``config.json`` in one directory.

:func:`save_pretrained` writes what :func:`from_pretrained` reads back by rebuilding the model with
:func:`anydepth.build_model` from the config and loading the weights; nothing is ever unpickled. A
training checkpoint (``anydepth.train.checkpoint``) holds the same two files, so ``from_pretrained``
reads one directly. The models themselves know nothing of files: this module imports the builder,
and the builder imports the models.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from anydepth.model.build import build_model
from anydepth.model.config import config_from_any_dict

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

__all__ = ["save_pretrained", "from_pretrained", "key_mismatch", "WEIGHTS_NAME", "CONFIG_NAME"]


def save_pretrained(model: nn.Module, directory: str | os.PathLike) -> None:
    """Writes ``model.safetensors`` and ``config.json`` (tied weights stored once) for a model
    :func:`anydepth.build_model` built; the directory is created if needed."""
    from safetensors.torch import save_model

    config = getattr(model, "config", None)
    if not hasattr(config, "to_dict"):
        raise TypeError(
            f"save_pretrained expects a model from build_model (with a .config), got {type(model).__name__}"
        )
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_model(model, str(d / WEIGHTS_NAME))
    (d / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))


def from_pretrained(
    directory: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
):
    """Rebuilds the model from ``config.json`` and loads ``model.safetensors``; never unpickles.

    Args:
        directory: written by :func:`save_pretrained`, or a training checkpoint directory.
        device: where the model's parameters and buffers go (``"cpu"``, ``"cuda:0"``, a
            ``torch.device``); the weights are read straight onto it. None: the CPU.
        dtype: a floating dtype (``torch.bfloat16``...) to cast the floating parameters and buffers
            to after loading; None keeps the stored dtype.

    Raises:
        FileNotFoundError: a file is missing. ValueError: the config or the weights are invalid or
        do not match. TypeError: ``dtype`` is not a floating ``torch.dtype``.
    """
    from safetensors.torch import load_model

    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype (e.g. torch.bfloat16) or None, got {dtype!r}")
    try:
        device = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a device: {e}; pass e.g. 'cpu' or 'cuda:0'") from None
    d = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d / name} not found; expected a directory written by save_pretrained()")
    try:
        cfg = config_from_any_dict(json.loads((d / CONFIG_NAME).read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"{d / CONFIG_NAME} is not a valid model config: {e}") from e
    try:
        model = build_model(cfg)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{d / CONFIG_NAME} is not a valid model config: {e}") from e
    model.to(device)
    try:
        missing, unexpected = load_model(model, str(d / WEIGHTS_NAME), strict=False, device=str(device))
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise ValueError(f"{d / WEIGHTS_NAME} could not be loaded: {str(e).splitlines()[0]}") from e
    if missing or unexpected:
        raise ValueError(f"{d / WEIGHTS_NAME} does not match {d / CONFIG_NAME}: {key_mismatch(missing, unexpected)}")
    if dtype is not None:
        model.to(dtype=dtype)
    return model


def key_mismatch(missing, unexpected, shown: int = 6) -> str:
    """``missing [a, b, ... (+3 more)]; unexpected [...]``: a state-dict mismatch on one line."""

    def listed(keys) -> str:
        keys = sorted(keys)
        more = f", ... (+{len(keys) - shown} more)" if len(keys) > shown else ""
        return "[" + ", ".join(keys[:shown]) + more + "]"

    return f"missing {listed(missing)}; unexpected {listed(unexpected)}"
