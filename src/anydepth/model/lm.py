"""``TransformerLM``: token embedding -> positions -> stack of blocks -> final norm -> logits.

::

    tokens (b, n)
      -> tok_emb (vocab x emb_dim) -> emb_proj (emb_dim -> dim, identity unless factorised)
      -> + absolute positions (learned / sinusoidal / axial)      rotary: passed to attention instead
      -> stack (sequential or reversible) of blocks
      -> final norm -> head (tied to tok_emb by default)  -> logits (b, n, vocab)

The model returns logits; loss, optimiser and checkpoints live in ``anydepth.train``.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anydepth.model.config import EncoderDecoderConfig, ModelConfig, config_from_any_dict
from anydepth.nn.context import Arch
from anydepth.registry import NORMS, POSITIONS

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


@dataclass
class KVCache:
    """Per-block key/value caches and the number of positions already processed."""

    layers: list[dict] = field(default_factory=list)
    length: int = 0


class TransformerLM(nn.Module):
    """A decoder-only (causal) or encoder-only language model; see :func:`anydepth.build_model`."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        arch: Arch | None = None,
        cross: bool = False,
        n_enc_layers: int = 0,
        n_dec_layers: int = 0,
        head: bool = True,
    ):
        super().__init__()
        from anydepth.model.build import build_stack

        self.config = cfg
        arch = arch or ("decoder" if cfg.causal else "encoder")
        emb_dim = cfg.emb_dim or cfg.dim
        self.tok_emb = nn.Embedding(cfg.vocab_size, emb_dim)
        self.emb_proj = nn.Linear(emb_dim, cfg.dim, bias=False) if emb_dim != cfg.dim else nn.Identity()
        self.pos = POSITIONS.build(cfg.position, dim=cfg.dim, dim_head=cfg.head_dim, max_seq_len=cfg.max_seq_len)
        self.drop = nn.Dropout(cfg.emb_dropout)
        self.stack = build_stack(cfg, arch=arch, cross=cross, n_enc_layers=n_enc_layers, n_dec_layers=n_dec_layers)
        self.norm = NORMS.build(cfg.norm, dim=cfg.dim) if cfg.final_norm else nn.Identity()
        self.cross = cross
        if not head:
            self.head = None
        elif cfg.tie_embeddings:
            # Factorised and tied: project back to emb_dim, then score against the embedding table.
            self.head = nn.Linear(cfg.dim, emb_dim, bias=False) if emb_dim != cfg.dim else nn.Identity()
        else:
            self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self._init_embeddings()

    def _init_embeddings(self) -> None:
        std = self.config.init_std
        nn.init.normal_(self.tok_emb.weight, std=std)
        for m in (self.emb_proj, self.head):
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.stack.blocks

    @property
    def supports_cache(self) -> bool:
        """Whether every attention layer can decode incrementally from a key/value cache."""
        return all("cache" in inspect.signature(b.attn.forward).parameters for b in self.blocks)

    def new_cache(self) -> KVCache:
        return KVCache(layers=[{} for _ in self.blocks])

    def _check_inputs(self, tokens: Tensor, mask: Tensor | None, attn_mask: Tensor | None, cache) -> int:
        """Checks the forward's inputs (``anydepth.validate``); returns the position offset of ``tokens``."""
        from anydepth.validate import check_bool_mask, check_tokens

        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache from model.new_cache() or None, got {type(cache).__name__}")
        offset = cache.length if cache is not None else 0
        check_tokens(tokens, vocab_size=self.config.vocab_size, max_seq_len=self.config.max_seq_len, offset=offset)
        b, n = tokens.shape
        keys = offset + n
        check_bool_mask("mask", mask, ((b, n), (b, keys)), "True = real token")
        check_bool_mask("attn_mask", attn_mask, None, "True = may attend")  # the layers check its shape
        return offset

    def embed(self, tokens: Tensor, offset: int = 0) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Token (+ absolute position) embeddings, and the rotary tables if positions are rotary."""
        x = self.emb_proj(self.tok_emb(tokens))
        positions = torch.arange(offset, offset + tokens.shape[1], device=tokens.device)
        rotary = None
        if getattr(self.pos, "absolute", False):
            x = x + self.pos(positions).to(x.dtype)
        elif getattr(self.pos, "rotary", False):
            rotary = self.pos(positions)
        return self.drop(x), rotary

    def forward(
        self,
        tokens: Tensor,
        mask: Tensor | None = None,
        *,
        attn_mask: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        cache: KVCache | None = None,
        return_embeddings: bool = False,
    ) -> Tensor:
        """Logits ``(b, n, vocab)`` for ``tokens`` ``(b, n)``.

        Args:
            tokens: int64 or int32 token ids in ``[0, vocab_size)``, ``b, n >= 1``.
            mask: bool ``(b, n)``, True for real tokens (key padding mask).
            attn_mask: bool ``(n, n)`` or ``(b, n, n)``, True where a query may attend to a key, on top
                of causality.
            context, context_mask: encoder output ``(b, m, dim)`` and its padding mask, for decoders
                with cross-attention.
            cache: a :class:`KVCache` from :meth:`new_cache` for incremental decoding; ``tokens`` then
                holds only the new positions and the cache is extended.
            return_embeddings: return the final hidden states ``(b, n, dim)`` instead of logits.
        """
        offset = self._check_inputs(tokens, mask, attn_mask, cache)
        x, rotary = self.embed(tokens, offset)
        kw = {"mask": mask, "attn_mask": attn_mask, "rotary": rotary}
        if self.cross:
            if context is None:
                raise ValueError("this decoder has cross-attention: pass context=<encoder output (b, m, dim)>")
            kw.update(context=context, context_mask=context_mask)
        elif context is not None or context_mask is not None:
            raise ValueError(
                "context was given but this model has no cross-attention; build an encoder-decoder "
                "(EncoderDecoderConfig) to attend to another sequence"
            )
        x = self.stack(x, cache=cache.layers if cache is not None else None, **kw)
        x = self.norm(x)
        if cache is not None:
            cache.length += tokens.shape[1]
        if return_embeddings or self.head is None:
            return x
        return self.logits(x)

    def logits(self, h: Tensor) -> Tensor:
        if self.config.tie_embeddings:
            return F.linear(self.head(h), self.tok_emb.weight)
        return self.head(h)

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, **kw) -> Tensor:
        """Samples a continuation; see :func:`anydepth.generate.generate` for the arguments."""
        from anydepth.generate import generate

        return generate(self, prompt, max_new_tokens, **kw)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **kw):
        return from_pretrained(directory, **kw)


def save_pretrained(model: nn.Module, directory: str | os.PathLike) -> None:
    """Writes ``model.safetensors`` and ``config.json`` (tied weights stored once)."""
    from safetensors.torch import save_model

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_model(model, str(d / WEIGHTS_NAME))
    (d / CONFIG_NAME).write_text(json.dumps(model.config.to_dict(), indent=2, sort_keys=True))


def from_pretrained(directory: str | os.PathLike, *, map_location: str = "cpu"):
    """Rebuilds the model from ``config.json`` and loads ``model.safetensors``; never unpickles."""
    from safetensors.torch import load_model

    from anydepth.model.build import build_model

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
    try:
        missing, unexpected = load_model(model, str(d / WEIGHTS_NAME), strict=False, device=map_location)
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise ValueError(f"{d / WEIGHTS_NAME} could not be loaded: {str(e).splitlines()[0]}") from e
    if missing or unexpected:
        raise ValueError(f"{d / WEIGHTS_NAME} does not match {d / CONFIG_NAME}: {key_mismatch(missing, unexpected)}")
    return model


def key_mismatch(missing, unexpected, shown: int = 6) -> str:
    """``missing [a, b, ... (+3 more)]; unexpected [...]``: a state-dict mismatch on one line."""

    def listed(keys) -> str:
        keys = sorted(keys)
        more = f", ... (+{len(keys) - shown} more)" if len(keys) > shown else ""
        return "[" + ", ".join(keys[:shown]) + more + "]"

    return f"missing {listed(missing)}; unexpected {listed(unexpected)}"


__all__ = ["TransformerLM", "KVCache", "save_pretrained", "from_pretrained", "EncoderDecoderConfig"]
