"""Sampling: temperature, top-k and top-p (nucleus) filtering, with a key/value cache where possible."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Sets to -inf every logit outside the top ``k`` and outside the smallest set of tokens whose
    probability mass reaches ``top_p`` (Holtzman et al. 2020). The most likely token always survives."""
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0:
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p: keeps at least the first.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token ids ``(b,)`` from last-position logits ``(b, vocab)``; temperature 0 is greedy."""
    from anydepth.validate import check_generate_args

    check_generate_args(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p)
    if temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    logits_processor: Callable[[Tensor, Tensor], Tensor] | None = None,
    **forward_kw,
) -> Tensor:
    """Appends up to ``max_new_tokens`` sampled tokens to ``prompt`` ``(b, n)``.

    With ``use_cache`` and a model whose attention supports it, the prompt is encoded once and each
    new token costs one position (keys and values of the prefix are cached; LSH layers also keep their
    buckets and sort). Causal full attention gives the tokens of ``use_cache=False``; so does a
    model whose only LSH layer is its last attention layer. With more LSH layers the cached layers' inputs
    are the outputs each earlier position got when it was last, whereas an uncached forward recomputes
    them at the full length (bucket count and sort change as the sequence grows), so the tokens can
    differ (see :class:`~anydepth.nn.lsh.LSHSelfAttention`). Sequences that produce
    ``eos_token`` are padded with it afterwards; generation stops when all have. When the sequence
    would exceed ``max_seq_len`` the context is cropped to the last ``max_seq_len`` tokens and
    re-encoded. ``logits_processor(logits, tokens)`` may rewrite the last-position logits ``(b, vocab)``
    given the tokens so far ``(b, n)`` before sampling (e.g. set disallowed tokens to -inf).
    """
    from anydepth.validate import check_generate_args, check_prompt

    check_generate_args(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token=eos_token,
        vocab_size=model.config.vocab_size,
    )
    prompt = check_prompt(prompt)
    was_training = model.training
    model.eval()
    max_len = model.config.max_seq_len
    out = prompt
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    cache = model.new_cache() if use_cache and model.supports_cache else None
    pending = out[:, -max_len:]
    try:
        for _ in range(max_new_tokens):
            if cache is not None:
                if cache.length + pending.shape[1] > max_len:
                    cache = model.new_cache()
                    pending = out[:, -max_len:]
                logits = model(pending, cache=cache, **forward_kw)[:, -1]
            else:
                logits = model(out[:, -max_len:], **forward_kw)[:, -1]
            if logits_processor is not None:
                logits = logits_processor(logits, out)
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            if eos_token is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token), nxt)
                done |= nxt == eos_token
            out = torch.cat([out, nxt[:, None]], dim=1)
            pending = nxt[:, None]
            if eos_token is not None and bool(done.all()):
                break
    finally:
        model.train(was_training)
    return out
