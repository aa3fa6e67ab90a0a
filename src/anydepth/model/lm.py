"""``TransformerLM``: token embedding -> positions -> stack of blocks -> final norm -> logits.

::

    tokens (b, n)
      -> tok_emb (vocab x emb_dim) -> emb_proj (emb_dim -> dim, identity unless factorised)
      -> + absolute positions (learned / sinusoidal / axial)      rotary: passed to attention instead
      -> stack (sequential or reversible) of blocks
      -> final norm -> head (tied to tok_emb by default)  -> logits (b, n, vocab)

The parts are built by :func:`anydepth.build_model` (``anydepth.model.build``), which hands them to
the constructor; this module imports neither the builder nor the registries. The model returns logits
(and, given ``targets``, the next-token loss beside them); optimiser and checkpoints live in
``anydepth.train``, saving and loading in ``anydepth.model.pretrained``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anydepth.model.config import ModelConfig


@dataclass
class KVCache:
    """Per-block key/value caches and the number of positions already processed."""

    layers: list[dict] = field(default_factory=list)
    length: int = 0


class LMOutput(NamedTuple):
    """What a model returns when given ``targets`` or ``labels``: ``logits, loss = model(x, targets=y)``
    unpacks it (nanoGPT's form) and ``out.loss`` / ``out.logits`` read it (Hugging Face's)."""

    logits: Tensor
    loss: Tensor


def next_token_loss(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy ``-log softmax(logits)[targets]`` over the positions whose target is not
    ``ignore_index``, computed in float32 whatever the logits' dtype. ``logits`` ``(..., vocab)``,
    ``targets`` the matching integer ids ``(...)``."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index
    )


def _targets_for(
    tokens: Tensor, targets: Tensor | None, labels: Tensor | None, vocab_size: int, ignore_index: int
) -> Tensor | None:
    """The per-position targets of ``tokens`` from ``targets`` (aligned) or ``labels`` (shifted here), checked."""
    if targets is not None and labels is not None:
        raise ValueError(
            "pass targets= (the next token of each position, nanoGPT's convention) or labels= (the tokens "
            "themselves, shifted by one inside, Hugging Face's convention), not both"
        )
    name, given = ("targets", targets) if targets is not None else ("labels", labels)
    if given is None:
        return None
    if not isinstance(given, Tensor) or given.dtype not in (torch.int64, torch.int32):
        got = f"a {given.dtype} tensor" if isinstance(given, Tensor) else type(given).__name__
        raise TypeError(f"{name} must be an int64 or int32 tensor of token ids, got {got}")
    if given.shape != tokens.shape:
        raise ValueError(f"{name} must have the shape of tokens {tuple(tokens.shape)}, got {tuple(given.shape)}")
    bad = (given != ignore_index) & ((given < 0) | (given >= vocab_size))
    if bool(bad.any()):
        raise ValueError(
            f"{name} holds id {int(given[bad][0])} outside [0, {vocab_size}); mark positions without a "
            f"target with ignore_index={ignore_index}"
        )
    if labels is not None:
        # labels[:, i + 1] is what position i predicts; the last position has nothing to predict.
        return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), ignore_index)], dim=1)
    return targets


def count_parameters(model: nn.Module, *, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
    """Number of distinct parameter elements of ``model`` (a tied tensor counts once). With
    ``exclude_embeddings``, the token embedding tables and position modules are left out."""
    skip: set[int] = set()
    if exclude_embeddings:
        for m in model.modules():
            if isinstance(m, TransformerLM):
                skip.update(id(p) for p in (*m.tok_emb.parameters(), *m.pos.parameters()))
    return sum(
        p.numel() for p in model.parameters() if id(p) not in skip and (p.requires_grad or not only_trainable)
    )


class TransformerLM(nn.Module):
    """A decoder-only (causal) or encoder-only language model; see :func:`anydepth.build_model`."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        tok_emb: nn.Embedding,
        emb_proj: nn.Module,
        position: nn.Module,
        stack: nn.Module,
        norm: nn.Module,
        head: nn.Module | None,
        cross: bool = False,
    ):
        """Wires the parts :func:`anydepth.build_model` built for ``cfg`` (``anydepth.model.build.build_lm``):
        the token table ``tok_emb`` (vocab x emb_dim), ``emb_proj`` (emb_dim -> dim, ``nn.Identity()``
        unless factorised), the ``position`` module, the ``stack`` of blocks, the final ``norm``
        (``nn.Identity()`` without one) and the ``head`` (dim -> emb_dim when tied to ``tok_emb``, dim ->
        vocab otherwise; None for an encoder whose forward returns hidden states). ``cross``: the blocks
        attend to an encoder's output. The embeddings and the head are initialised here, N(0, init_std)."""
        super().__init__()
        self.config = cfg
        self.tok_emb = tok_emb
        self.emb_proj = emb_proj
        self.pos = position
        self.drop = nn.Dropout(cfg.emb_dropout)
        self.stack = stack
        self.norm = norm
        self.cross = cross
        self.head = head
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
        targets: Tensor | None = None,
        labels: Tensor | None = None,
        ignore_index: int = -100,
    ) -> Tensor | LMOutput:
        """Logits ``(b, n, vocab)`` for ``tokens`` ``(b, n)``; given ``targets`` or ``labels``,
        ``LMOutput(logits, loss)``.

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
            targets: ``(b, n)`` ids, ``targets[:, i]`` the token that follows ``tokens[:, i]``
                (nanoGPT's convention); the loss is :func:`next_token_loss` of the logits.
            labels: ``(b, n)`` ids aligned with ``tokens``, usually ``tokens`` itself (Hugging Face's
                convention): position ``i`` is scored against ``labels[:, i + 1]``, the last position
                against nothing.
            ignore_index: a target or label equal to it is left out of the loss (-100, as in
                ``F.cross_entropy``).
        """
        offset = self._check_inputs(tokens, mask, attn_mask, cache)
        goal = _targets_for(tokens, targets, labels, self.config.vocab_size, ignore_index)
        if goal is not None and (return_embeddings or self.head is None):
            raise ValueError(
                "targets/labels need logits; this call returns hidden states "
                f"({'return_embeddings=True' if return_embeddings else 'the model has no head'})"
            )
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
        logits = self.logits(x)
        if goal is None:
            return logits
        return LMOutput(logits, next_token_loss(logits, goal, ignore_index))

    def num_parameters(self, *, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameter elements (the tied head counts once); see :func:`count_parameters`."""
        return count_parameters(self, only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)

    def logits(self, h: Tensor) -> Tensor:
        if self.config.tie_embeddings:
            return F.linear(self.head(h), self.tok_emb.weight)
        return self.head(h)

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, **kw) -> Tensor:
        """Samples a continuation; see :func:`anydepth.generate` for the arguments."""
        from anydepth.sampling import generate

        return generate(self, prompt, max_new_tokens, **kw)


__all__ = ["TransformerLM", "KVCache", "LMOutput", "count_parameters", "next_token_loss"]
