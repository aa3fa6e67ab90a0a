"""Checks of user input shared by the configs, the model, generation and the command line.

Every check raises ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, out of range)
with a message naming the field or argument, the value it got and what to pass instead.

Configs: :func:`check_config` checks each dataclass field against its annotation (a ``bool`` field
takes only ``True``/``False``, never ``None``, ``0`` or ``"false"``; an ``int`` field never a bool or
a float; a ``float`` field only finite numbers) and then against :data:`FIELD_RANGES`, the bounds a
field may take whatever config it belongs to. The upper bounds keep a config that was edited or
mistyped (``depth=100000``, ``sinkhorn_iters=1e9``, ``max_seq_len=10**12``) from allocating or
iterating without end; :func:`check_model_memory` compares a model's parameter count with the
memory of the machine.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from typing import Any, Literal, Union

__all__ = [
    "FIELD_RANGES",
    "check_config",
    "check_model_memory",
    "check_tokens",
    "check_bool_mask",
    "check_generate_args",
    "check_prompt",
]

_PROB = (0.0, 1.0, True, False)  # [0, 1)


def _int(lo: int, hi: int) -> tuple[int, int, bool, bool]:
    return (lo, hi, True, True)


# field name -> (low, high, low included, high included). A field of any config with this name is
# checked against it; names are shared on purpose (every dropout is a probability).
FIELD_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    # ModelConfig sizes: far above any model trained on one machine, far below an allocation failure
    "vocab_size": _int(1, 1 << 24),
    "dim": _int(1, 1 << 16),
    "depth": _int(1, 10_000),
    "heads": _int(1, 1024),
    "dim_head": _int(1, 1 << 14),
    "emb_dim": _int(1, 1 << 16),
    "max_seq_len": _int(1, 1 << 24),
    "init_std": (0.0, 10.0, False, True),
    # probabilities
    "dropout": _PROB,
    "emb_dropout": _PROB,
    "post_dropout": _PROB,
    "post_attn_dropout": _PROB,
    "layer_dropout": _PROB,
    "drop_for_hash_rate": _PROB,
    # component sizes and iteration counts
    "streams": _int(1, 64),
    "num_fracs": _int(1, 64),
    "sinkhorn_iters": _int(1, 1000),
    "bucket_size": _int(1, 1 << 16),
    "n_hashes": _int(1, 64),
    "attn_chunks": _int(1, 1 << 16),
    "chunks": _int(1, 1 << 16),
    "window": _int(1, 1 << 24),
    "num_mem_kv": _int(0, 1 << 12),
    "n_local_attn_heads": _int(0, 1024),
    "full_attn_thres": _int(0, 1 << 24),
    "reverse_thres": _int(0, 1 << 31),
    "seed": _int(0, (1 << 63) - 1),
    "mult": (0.0, 64.0, False, True),
    "eps": (0.0, 1.0, True, True),
    "base": (0.0, 1e12, False, True),
    "fraction": (0.0, 1.0, False, True),
}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a tuple of {_type_name(args[0])}"
        return f"a tuple ({', '.join(_type_name(a) for a in args)})"
    if tp is float:
        return "a finite number"
    if tp is bool:
        return "True or False"
    if tp is str:
        return "a string"
    if tp is int:
        return "an int"
    return getattr(tp, "__name__", str(tp))


def _matches(v: Any, tp: Any) -> bool:
    if tp is Any or isinstance(tp, typing.TypeVar):
        return True
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_matches(v, a) for a in typing.get_args(tp))
    if origin is Literal:
        return any(type(v) is type(a) and v == a for a in typing.get_args(tp))
    if tp is type(None):
        return v is None
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if tp is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if tp is str:
        return isinstance(v, str)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(v, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(x, args[0]) for x in v)
        return len(v) == len(args) and all(_matches(x, a) for x, a in zip(v, args))
    if isinstance(tp, type):
        return isinstance(v, tp)
    return True  # an annotation this checker does not know (a generic alias): left to the consumer


def _matches_kind(kind: type, tp: Any) -> bool:
    """Whether ``tp`` (or a member of its union) is a ``Literal`` of ``kind`` values."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_matches_kind(kind, a) for a in typing.get_args(tp))
    return origin is Literal and all(isinstance(a, kind) for a in typing.get_args(tp))


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation naming something not importable here: check nothing by type
        return {}


def _in_range(v: float, rng: tuple[float, float, bool, bool]) -> bool:
    lo, hi, lo_in, hi_in = rng
    return (v >= lo if lo_in else v > lo) and (v <= hi if hi_in else v < hi)


def _range_text(rng: tuple[float, float, bool, bool]) -> str:
    lo, hi, lo_in, hi_in = rng

    def num(x: float) -> str:
        return str(int(x)) if float(x).is_integer() else f"{x:g}"

    return f"{'[' if lo_in else '('}{num(lo)}, {num(hi)}{']' if hi_in else ')'}"


def check_value(owner: str, name: str, value: Any, tp: Any = Any) -> None:
    """Checks one field ``owner.name = value`` against its annotation ``tp`` and :data:`FIELD_RANGES`."""
    if not _matches(value, tp):
        real = isinstance(value, (int, float)) and not isinstance(value, bool)
        if real and not math.isfinite(value) and _matches(0.0, tp):
            raise ValueError(f"{owner}.{name} must be a finite number, got {value!r}")
        if isinstance(value, str) and _matches_kind(str, tp):  # a string, but not one of the choices
            raise ValueError(f"{owner}.{name} must be {_type_name(tp)}, got {value!r}")
        raise TypeError(
            f"{owner}.{name} must be {_type_name(tp)}, got {type(value).__name__} {value!r}; "
            f"pass {_type_name(tp)}"
        )
    rng = FIELD_RANGES.get(name)
    if rng is None or value is None or isinstance(value, (bool, str, tuple)):
        return
    if isinstance(value, (int, float)) and not _in_range(value, rng):
        lo, hi, lo_in, hi_in = rng
        if isinstance(value, int) and lo_in and hi_in and float(lo).is_integer():
            want = f"an int >= {int(lo)} (at most {int(hi)})"
        else:
            want = f"in {_range_text(rng)}"
        hint = ""
        if value > hi >= 1000:
            hint = "; the upper bound keeps a mistyped or edited config from exhausting memory or time"
        raise ValueError(f"{owner}.{name} must be {want}, got {value!r}{hint}")


def check_config(cfg: Any, owner: str | None = None) -> None:
    """Checks every field of the dataclass instance ``cfg`` (type, then range); raises naming the field."""
    cls = type(cfg)
    if owner is None:
        kind = getattr(cls, "kind", None)
        owner = f"{cls.family}[{kind}]" if kind and hasattr(cls, "family") else cls.__name__
    hints = _hints(cls)
    for f in dataclasses.fields(cfg):
        check_value(owner, f.name, getattr(cfg, f.name), hints.get(f.name, Any))


def physical_memory_bytes() -> int | None:
    """This machine's RAM, or None where the OS does not tell."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def estimate_parameters(cfg: Any) -> int:
    """An estimate (within a small factor) of the float parameters and tables of a ``ModelConfig``:
    embeddings, position tables, and per block ``4 * dim * heads * dim_head`` for attention plus
    ``3 * mult * dim**2`` for the feed-forward (GLU's three matrices)."""
    emb = cfg.vocab_size * (cfg.emb_dim or cfg.dim)
    pos = 0 if cfg.position.kind in ("none",) else cfg.max_seq_len * cfg.dim
    inner = cfg.heads * cfg.head_dim
    mult = float(getattr(cfg.ff, "mult", 4.0))
    block = 4 * cfg.dim * inner + int(3 * mult * cfg.dim * cfg.dim)
    return emb + pos + cfg.depth * block


def check_model_memory(cfg: Any, owner: str = "ModelConfig") -> None:
    """Raises ``ValueError`` if the parameters of ``cfg`` (4 bytes each) exceed this machine's memory."""
    total = physical_memory_bytes()
    if total is None:
        return
    need = 4 * estimate_parameters(cfg)
    if need > total:
        raise ValueError(
            f"{owner} (vocab_size={cfg.vocab_size}, dim={cfg.dim}, depth={cfg.depth}, "
            f"max_seq_len={cfg.max_seq_len}) needs about {need / 2**30:.1f} GiB for its parameters alone, "
            f"more than this machine's {total / 2**30:.1f} GiB of memory; lower dim, depth, vocab_size or max_seq_len"
        )


# --------------------------------------------------------------------------------- model inputs

TOKEN_DTYPES = ("torch.int64", "torch.int32")


def check_tokens(tokens: Any, *, vocab_size: int, max_seq_len: int, offset: int = 0, name: str = "tokens") -> None:
    """``tokens`` must be an int64/int32 ``(batch, seq)`` tensor with batch, seq >= 1, ids in
    ``[0, vocab_size)`` and ``offset + seq <= max_seq_len``."""
    import torch

    if not isinstance(tokens, torch.Tensor):
        raise TypeError(
            f"{name} must be a LongTensor of shape (batch, seq), got {type(tokens).__name__}; "
            f"pass torch.tensor({name}, dtype=torch.long)"
        )
    if tokens.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"{name} must hold integer token ids of dtype int64 or int32, got dtype {tokens.dtype}; use {name}.long()"
        )
    if tokens.dim() != 2:
        raise ValueError(f"{name} must have shape (batch, seq), got shape {tuple(tokens.shape)}")
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(
            f"{name} has shape {tuple(tokens.shape)}: an empty batch or sequence; pass at least one sequence "
            "of at least one token"
        )
    n = tokens.shape[1]
    if offset + n > max_seq_len:
        raise ValueError(
            f"sequence of {offset + n} positions exceeds max_seq_len={max_seq_len}; "
            "raise ModelConfig.max_seq_len or feed shorter sequences"
        )
    if torch.compiler.is_compiling():
        return
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"token id {bad} is outside the vocabulary [0, {vocab_size}); "
            "check the tokenizer or raise ModelConfig.vocab_size"
        )


def check_bool_mask(name: str, mask: Any, shapes: tuple[tuple[int, ...], ...] | None, meaning: str) -> None:
    """``mask`` must be None or a bool tensor (of one of ``shapes`` unless None); ``meaning`` says what
    True means. Masks are bool everywhere: a 0/1 float or long mask read as additive would let a
    padded key through with weight e^0 = 1."""
    import torch

    if mask is None:
        return
    want = " or ".join(str(s) for s in shapes) if shapes else "(see the docstring)"
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool tensor of shape {want}, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"{name} must be a bool tensor ({meaning}), got dtype {mask.dtype}; convert with {name}.bool() "
            "(for 0/1 masks) or build it from a comparison"
        )
    if shapes and tuple(mask.shape) not in {tuple(s) for s in shapes}:
        raise ValueError(f"{name} must have shape {want}, got {tuple(mask.shape)}")


# ------------------------------------------------------------------------------------ generation


def check_generate_args(
    *,
    max_new_tokens: Any,
    temperature: Any,
    top_k: Any = None,
    top_p: Any = None,
    eos_token: Any = None,
    vocab_size: int | None = None,
) -> None:
    """The sampling arguments of :func:`anydepth.generate` (and ``anydepth generate``).

    ``temperature`` is a finite number >= 0 (0: greedy); ``top_k`` None or an int >= 1; ``top_p``
    None or in (0, 1]; ``max_new_tokens`` an int >= 0; ``eos_token`` None or a token id.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(
            f"temperature must be a number >= 0 (0 = greedy), got {type(temperature).__name__} {temperature!r}"
        )
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(
            f"temperature must be a finite number >= 0 (0 = greedy, 1 = the model's distribution), "
            f"got {temperature!r}"
        )
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 or None (no top-k filtering), got {top_k!r}")
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)):
            raise TypeError(f"top_p must be a number in (0, 1] or None, got {type(top_p).__name__} {top_p!r}")
        if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] (1 keeps every token) or None, got {top_p!r}")
    if eos_token is not None:
        if isinstance(eos_token, bool) or not isinstance(eos_token, int) or eos_token < 0:
            raise ValueError(f"eos_token must be a token id (an int >= 0) or None, got {eos_token!r}")
        if vocab_size is not None and eos_token >= vocab_size:
            raise ValueError(f"eos_token={eos_token} is outside the vocabulary [0, {vocab_size})")


def check_prompt(prompt: Any):
    """``prompt`` as a ``(batch, n)`` tensor: a 1-d tensor gains a batch axis; other types raise."""
    import torch

    if not isinstance(prompt, torch.Tensor):
        raise TypeError(
            f"prompt must be a LongTensor of shape (batch, n) or (n,), got {type(prompt).__name__}; "
            "pass torch.tensor(prompt, dtype=torch.long)"
        )
    if prompt.dim() == 1:
        prompt = prompt[None]
    if prompt.dim() != 2 or prompt.shape[1] == 0 or prompt.shape[0] == 0:
        raise ValueError(f"prompt must have shape (batch, n) with n >= 1, got {tuple(prompt.shape)}")
    return prompt


# ------------------------------------------------------------------------------------ file system


def check_output_dir(path: Any, option: str = "--out") -> None:
    """``path`` must be a directory or creatable as one, and writable; nothing is created here.

    Raises ``ValueError`` naming ``option`` when it is a regular file, sits below one, or its
    nearest existing ancestor is not writable.
    """
    from pathlib import Path

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{option} {str(p)!r} is a file, not a directory; choose a directory (new or existing)")
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ValueError(f"{option} {str(p)!r} lies below the file {str(probe)!r}; choose a directory path")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {str(p)!r} is not writable ({str(probe)!r} denies writing); choose another place")
