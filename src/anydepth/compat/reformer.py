"""reformer-pytorch's API (``LSHSelfAttention``, ``LSHAttention``, ``Reformer``, ``ReformerLM``,
``ReformerEncDec``, ``Recorder``, ``Autopadder``, ``TrainingWrapper``) as configurations of the library's
layers and builder (Kitaev et al. 2020, arXiv 2001.04451). The two attention classes keep the original's
keywords, defaults (``n_hashes=8``) and call style, and build the ``lsh`` kind from them.

``ReformerLM(...)`` is ``ModelConfig(attention=LSHSelfAttention.Config(...), stack="reversible",
ff=MLP.Config(chunks=ff_chunks, chunk_mib=32), position="rotary", residual="prenorm")`` built by the
library: the blocks, the reversible stack, the chunked feed-forward and the positions are the library's own
layers (``ff_chunks`` bounds the feed-forward's hidden activations to ``1 / ff_chunks`` of the layer's, but
never cuts pieces below 32 MiB, where they only slow the matrix products down). What this
module adds is the original call style (``keys=``, ``input_mask=``, ``input_attn_mask=``,
``context_mask=``), its output head (an untied, optionally factorised projection, or the L2-normalised tied
embedding), and the wrappers.

Differences from reformer-pytorch 1.4.4, on purpose: any sequence length works (the LSH layers pad and mask
themselves, so ``Autopadder`` only forwards); ``post_attn_dropout`` is honoured by ``ReformerLM``; LayerDrop
and inputs without ``requires_grad`` keep every gradient (the library's reversible stack); inference hashes
deterministically; positions reach the full-attention and local paths; ``top_p``'s threshold is the nucleus
probability (the original kept ``1 - thres``); ``ReformerEncDec``'s decoder uses the encoder's bucket size
unless told otherwise (the original silently doubled it); ``pkm_layers`` (product-key memory) is not
provided.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anydepth.model.config import ModelConfig
from anydepth.nn import lsh
from anydepth.nn.lsh import _rotary_from_pos_emb
from anydepth.registry import ATTENTIONS, FFS, POSITIONS, RESIDUALS, STACKS
from anydepth.validate import check_bool_mask

__all__ = [
    "LSHAttention",
    "LSHSelfAttention",
    "Reformer",
    "ReformerLM",
    "ReformerEncDec",
    "Recorder",
    "Autopadder",
    "TrainingWrapper",
    "top_k",
    "top_p",
    "from_reformer_pytorch",
]


class LSHAttention(lsh.LSHAttention):
    """reformer-pytorch's ``LSHAttention(dropout=0., bucket_size=64, n_hashes=8, causal=False, ...)``: its
    keywords and defaults as the ``lsh`` kind's options (:class:`anydepth.nn.lsh.LSHAttention`)."""

    def __init__(
        self,
        dropout: float = 0.0,
        bucket_size: int = 64,
        n_hashes: int = 8,
        causal: bool = False,
        allow_duplicate_attention: bool = True,
        attend_across_buckets: bool = True,
        rehash_each_round: bool = True,
        drop_for_hash_rate: float = 0.0,
        random_rotations_per_head: bool = False,
        return_attn: bool = False,
        seed: int | None = None,
    ):
        cfg = lsh.LSHSelfAttention.Config(
            dropout=dropout,
            bucket_size=bucket_size,
            n_hashes=n_hashes,
            allow_duplicate_attention=allow_duplicate_attention,
            attend_across_buckets=attend_across_buckets,
            rehash_each_round=rehash_each_round,
            drop_for_hash_rate=drop_for_hash_rate,
            random_rotations_per_head=random_rotations_per_head,
            seed=seed,
        )
        super().__init__(cfg, causal=causal)
        self.return_attn = return_attn


class LSHSelfAttention(lsh.LSHSelfAttention):
    """reformer-pytorch's ``LSHSelfAttention(dim, heads=8, bucket_size=64, n_hashes=8, causal=False, ...)``
    and call style ``attn(x, keys=, input_mask=, input_attn_mask=, context_mask=, pos_emb=)``, translated to
    the ``lsh`` kind (:class:`anydepth.nn.lsh.LSHSelfAttention`). The library's keywords (``rotary=``,
    ``cache=``, ...) pass through; ``pos_emb`` (reformer-pytorch's ``(1, n, dim_head)`` sinusoid table)
    becomes interleaved rotary phases."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        bucket_size: int = 64,
        n_hashes: int = 8,
        causal: bool = False,
        dim_head: int | None = None,
        attn_chunks: int | None = 1,
        random_rotations_per_head: bool = False,
        attend_across_buckets: bool = True,
        allow_duplicate_attention: bool = True,
        num_mem_kv: int = 0,
        one_value_head: bool = False,
        use_full_attn: bool = False,
        full_attn_thres: int | None = None,
        return_attn: bool = False,
        post_attn_dropout: float = 0.0,
        dropout: float = 0.0,
        n_local_attn_heads: int = 0,
        drop_for_hash_rate: float = 0.0,
        rehash_each_round: bool = True,
        seed: int | None = None,
    ):
        cfg = lsh.LSHSelfAttention.Config(
            bucket_size=bucket_size,
            n_hashes=n_hashes,
            attn_chunks=1 if attn_chunks is None else attn_chunks,
            random_rotations_per_head=random_rotations_per_head,
            attend_across_buckets=attend_across_buckets,
            allow_duplicate_attention=allow_duplicate_attention,
            num_mem_kv=num_mem_kv,
            one_value_head=one_value_head,
            use_full_attn=use_full_attn,
            full_attn_thres=full_attn_thres,
            post_attn_dropout=post_attn_dropout,
            dropout=dropout,
            n_local_attn_heads=n_local_attn_heads,
            drop_for_hash_rate=drop_for_hash_rate,
            rehash_each_round=rehash_each_round,
            seed=seed,
        )
        super().__init__(cfg, dim=dim, heads=heads, dim_head=dim_head, causal=causal)
        self.return_attn = return_attn

    def forward(
        self,
        x: Tensor,
        keys: Tensor | None = None,
        input_mask: Tensor | None = None,
        input_attn_mask: Tensor | None = None,
        context_mask: Tensor | None = None,
        pos_emb: Tensor | None = None,
        **kwargs,
    ) -> Tensor:
        # reformer-pytorch's names are checked under those names (the layer checks mask= and attn_mask=)
        check_bool_mask("input_mask", input_mask, None, "True = real token")
        check_bool_mask("input_attn_mask", input_attn_mask, None, "True = may attend")
        kwargs["context"] = _one_of("keys", keys, "context", kwargs.get("context"))
        kwargs["mask"] = _one_of("input_mask", input_mask, "mask", kwargs.get("mask"))
        kwargs["attn_mask"] = _one_of("input_attn_mask", input_attn_mask, "attn_mask", kwargs.get("attn_mask"))
        if pos_emb is not None:
            if kwargs.get("rotary") is not None:
                raise ValueError("pass positions once: pos_emb (reformer-pytorch table) or rotary=(cos, sin)")
            kwargs["rotary"] = _rotary_from_pos_emb(pos_emb)
        return super().forward(x, context_mask=context_mask, **kwargs)


def _one_of(name_a: str, a, name_b: str, b):
    if a is not None and b is not None:
        raise ValueError(f"{name_a} and {name_b} are the same argument under two names; pass only one of them")
    return a if a is not None else b


_ACTIVATIONS = {nn.GELU: "gelu", nn.ReLU: "relu", nn.SiLU: "silu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}


def _activation_name(act) -> str:
    if act is None:
        return "gelu"
    if isinstance(act, str):
        return act
    if isinstance(act, type) and act in _ACTIVATIONS:
        return _ACTIVATIONS[act]
    raise ValueError(
        f"ff_activation={act!r} is not supported; pass one of nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid "
        "or an activation name such as 'gelu'"
    )


# Smallest feed-forward piece, in MiB of hidden activations, that ff_chunks may cut (4,096 rows at
# width 2,048): 100 pieces of 41 rows made the step ~10x slower than one piece on a 2-core CPU.
FF_MIN_PIECE_MIB = 32


def _config(
    *,
    vocab_size: int,
    dim: int,
    depth: int,
    max_seq_len: int,
    heads: int,
    dim_head: int | None,
    bucket_size: int,
    n_hashes: int,
    ff_chunks: int,
    attn_chunks: int | None,
    causal: bool,
    lsh_dropout: float,
    ff_dropout: float,
    ff_activation,
    ff_mult: int,
    ff_glu: bool,
    post_attn_dropout: float,
    layer_dropout: float,
    lsh_attend_across_buckets: bool,
    lsh_allow_duplicate_attention: bool,
    random_rotations_per_head: bool,
    use_scale_norm: bool,
    use_rezero: bool,
    use_full_attn: bool,
    full_attn_thres: int,
    reverse_thres: int,
    num_mem_kv: int,
    one_value_head: bool,
    n_local_attn_heads: int,
    pkm_layers,
    position: Any,
    emb_dim: int | None,
    seed: int | None,
) -> ModelConfig:
    if tuple(pkm_layers or ()):
        raise ValueError(
            f"pkm_layers={pkm_layers!r}: product-key memory layers are not provided; use pkm_layers=() "
            "(every layer keeps its feed-forward)"
        )
    if dim_head is None and dim % heads:
        raise ValueError(f"dim={dim} is not divisible by heads={heads}; choose heads dividing dim or pass dim_head")
    attention = ATTENTIONS.config(
        "lsh",
        bucket_size=bucket_size,
        n_hashes=n_hashes,
        attend_across_buckets=lsh_attend_across_buckets,
        allow_duplicate_attention=lsh_allow_duplicate_attention,
        random_rotations_per_head=random_rotations_per_head,
        dropout=lsh_dropout,
        post_attn_dropout=post_attn_dropout,
        attn_chunks=1 if attn_chunks is None else attn_chunks,
        num_mem_kv=num_mem_kv,
        one_value_head=one_value_head,
        use_full_attn=use_full_attn,
        full_attn_thres=full_attn_thres,
        n_local_attn_heads=n_local_attn_heads,
        seed=seed,
    )
    ff = FFS.config(
        "glu" if ff_glu else "mlp",
        mult=float(ff_mult),
        activation=_activation_name(ff_activation),
        dropout=ff_dropout,
        chunks=max(1, int(ff_chunks or 1)),
        # ff_chunks bounds the feed-forward's hidden activations to 1/ff_chunks of the layer's, as in the
        # original, but pieces stay at least this large: smaller ones only slow the matrix products down
        chunk_mib=FF_MIN_PIECE_MIB,
    )
    residual = RESIDUALS.config("rezero", shared=False) if use_rezero else "prenorm"
    return ModelConfig(
        vocab_size=vocab_size,
        dim=dim,
        depth=depth,
        heads=heads,
        dim_head=dim_head,
        max_seq_len=max_seq_len,
        residual=residual,
        norm="scale" if use_scale_norm else "layer",
        attention=attention,
        ff=ff,
        stack=STACKS.config("reversible", merge="mean", layer_dropout=layer_dropout, reverse_thres=reverse_thres),
        position=position,
        causal=causal,
        emb_dim=emb_dim,
        tie_embeddings=False,
    )


def _config_from_args(args: dict[str, Any], **given) -> ModelConfig:
    """``_config`` from a seed constructor's arguments (its ``locals()``): every parameter of ``_config``
    not in ``given`` is the constructor's argument of the same name."""
    names = [name for name in inspect.signature(_config).parameters if name not in given]
    return _config(**{name: args[name] for name in names}, **given)


def _tie_layers(stack: nn.Module) -> None:
    """ALBERT-style weight tying (reformer-pytorch's ``weight_tie``): every block reuses block 0's attention
    and feed-forward; norms and gates stay per block."""
    blocks = stack.blocks
    for block in list(blocks)[1:]:
        block.attn = blocks[0].attn
        block.ff = blocks[0].ff


def _attn_kwargs(keys, input_mask, input_attn_mask, context_mask, rotary, kwargs) -> dict:
    unknown = set(kwargs) - {"_reverse", "_depth"}
    if unknown:
        raise TypeError(f"unexpected argument(s) {', '.join(sorted(unknown))}")
    # checked under reformer-pytorch's names: the layers below know them as mask/attn_mask
    check_bool_mask("input_mask", input_mask, None, "True = real token")
    check_bool_mask("input_attn_mask", input_attn_mask, None, "True = may attend")
    check_bool_mask("context_mask", context_mask, None, "True = real token")
    kw: dict[str, Any] = {"mask": input_mask, "attn_mask": input_attn_mask, "rotary": rotary}
    if keys is not None:
        kw["context"] = keys
    if context_mask is not None:
        kw["context_mask"] = context_mask
    return kw


class Reformer(nn.Module):
    """Reversible stack of LSH attention and chunked feed-forward on embeddings ``(b, n, dim)``.

    ``y1 = x1 + Attn(N(x2)); y2 = x2 + FF(N(y1))`` per layer from ``x1 = x2 = x``; output ``(y1 + y2) / 2``
    (reformer-pytorch's merge). No positions unless ``pos_emb`` (reformer-pytorch's sinusoid table) or
    ``rotary=(cos, sin)`` is passed. Arguments and defaults are reformer-pytorch 1.4.4's ``Reformer``.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int = 8,
        dim_head: int | None = None,
        bucket_size: int = 64,
        n_hashes: int = 8,
        ff_chunks: int = 100,
        attn_chunks: int | None = None,
        causal: bool = False,
        weight_tie: bool = False,
        lsh_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        ff_activation=None,
        ff_mult: int = 4,
        ff_glu: bool = False,
        post_attn_dropout: float = 0.0,
        layer_dropout: float = 0.0,
        lsh_attend_across_buckets: bool = True,
        lsh_allow_duplicate_attention: bool = True,
        random_rotations_per_head: bool = False,
        use_scale_norm: bool = False,
        use_rezero: bool = False,
        use_full_attn: bool = False,
        full_attn_thres: int = 0,
        reverse_thres: int = 0,
        num_mem_kv: int = 0,
        one_value_head: bool = False,
        n_local_attn_heads: int = 0,
        pkm_layers=(),
        pkm_num_keys: int = 128,
        max_seq_len: int | None = None,
        seed: int | None = None,
    ):
        super().__init__()
        from anydepth.model.build import build_stack

        # max_seq_len: accepted because the seed README passes it; a Reformer has no length limit
        self.config = _config_from_args(
            locals(), vocab_size=1, max_seq_len=max_seq_len or 1, position="none", emb_dim=None
        )
        self.dim, self.depth, self.bucket_size, self.num_mem_kv = dim, depth, bucket_size, num_mem_kv
        self.full_attn_thres = full_attn_thres
        self.stack = build_stack(self.config, arch="decoder" if causal else "encoder")
        if weight_tie:
            _tie_layers(self.stack)

    def forward(
        self,
        x: Tensor,
        keys: Tensor | None = None,
        input_mask: Tensor | None = None,
        input_attn_mask: Tensor | None = None,
        context_mask: Tensor | None = None,
        pos_emb: Tensor | None = None,
        *,
        rotary=None,
        cache: list | None = None,
        **kwargs,
    ) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"Reformer input must be (batch, length, dim={self.dim}) embeddings, got {shape}")
        if pos_emb is not None:
            rotary = _rotary_from_pos_emb(pos_emb)
        kw = _attn_kwargs(keys, input_mask, input_attn_mask, context_mask, rotary, kwargs)
        return self.stack(x, cache=cache, **kw)


class ReformerLM(nn.Module):
    """Token language model (or encoder, ``causal=False``) with reformer-pytorch 1.4.4's arguments.

    ``tokens -> embedding (num_tokens x emb_dim) [+ axial | absolute | fixed positions] -> Linear(emb_dim,
    dim) if factorised -> Reformer (rotary positions on every layer unless an absolute kind is chosen) ->
    LayerNorm -> Linear(dim, emb_dim) if factorised -> Linear(emb_dim, num_tokens)`` (or, with
    ``weight_tie_embedding``, logits against the L2-normalised embedding rows). ``return_embeddings``
    returns the normalised hidden states; ``rotary_position_emb=False`` (ours) leaves the model without
    positions when no absolute kind is chosen. ``forward(x, keys=None, input_mask=None, input_attn_mask=None,
    context_mask=None)``; ``keys`` (e.g. an encoder's output) join the LSH self-attention as extra keys.
    Absolute positions are added after the factorised projection (in ``dim``, not ``emb_dim``).
    """

    def __init__(
        self,
        num_tokens: int,
        dim: int,
        depth: int,
        max_seq_len: int,
        heads: int = 8,
        dim_head: int | None = 64,
        bucket_size: int = 64,
        n_hashes: int = 4,
        ff_chunks: int = 100,
        attn_chunks: int | None = 1,
        causal: bool = False,
        weight_tie: bool = False,
        lsh_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        ff_mult: int = 4,
        ff_activation=None,
        ff_glu: bool = False,
        post_attn_dropout: float = 0.0,
        layer_dropout: float = 0.0,
        random_rotations_per_head: bool = False,
        use_scale_norm: bool = False,
        use_rezero: bool = False,
        use_full_attn: bool = False,
        full_attn_thres: int = 0,
        reverse_thres: int = 0,
        num_mem_kv: int = 0,
        one_value_head: bool = False,
        emb_dim: int | None = None,
        return_embeddings: bool = False,
        weight_tie_embedding: bool = False,
        fixed_position_emb: bool = False,
        absolute_position_emb: bool = False,
        axial_position_emb: bool = False,
        axial_position_shape: tuple[int, int] | None = None,
        n_local_attn_heads: int = 0,
        pkm_layers=(),
        pkm_num_keys: int = 128,
        twin_attention: bool = False,
        lsh_attend_across_buckets: bool = True,
        lsh_allow_duplicate_attention: bool = True,
        rotary_position_emb: bool = True,
        seed: int | None = None,
    ):
        super().__init__()
        from anydepth.model.build import build_lm

        if twin_attention:
            raise ValueError(
                "twin_attention=True (both reversible branches attention) was removed from reformer-pytorch "
                "in "
                "1.2.6 because feed-forwards are needed (Dong et al. 2021); use twin_attention=False"
            )
        if axial_position_emb:
            shape = axial_position_shape or (math.ceil(max_seq_len / bucket_size), bucket_size)
            position = POSITIONS.config("axial", shape=tuple(shape), combine="sum")
        elif absolute_position_emb:
            position = "learned"
        elif fixed_position_emb:
            position = "sinusoidal"
        elif rotary_position_emb:
            position = POSITIONS.config("rotary", interleaved=True)  # reformer-pytorch's pairing
        else:
            position = "none"
        self.config = _config_from_args(locals(), vocab_size=num_tokens, position=position)
        self.max_seq_len, self.num_tokens, self.dim = max_seq_len, num_tokens, dim
        self.bucket_size, self.num_mem_kv, self.full_attn_thres = bucket_size, num_mem_kv, full_attn_thres
        self.lm = build_lm(self.config, arch="decoder" if causal else "encoder", head=False)
        self.lm.norm = nn.LayerNorm(dim)  # reformer-pytorch's final norm is a LayerNorm even with ScaleNorm
        if weight_tie:
            _tie_layers(self.lm.stack)
        e = emb_dim or dim
        self.return_embeddings = return_embeddings
        self.weight_tie_embedding = weight_tie_embedding
        self.to_emb = nn.Linear(dim, e) if (e != dim and not return_embeddings) else nn.Identity()
        self.to_logits = nn.Linear(e, num_tokens) if not (return_embeddings or weight_tie_embedding) else nn.Identity()

    @property
    def token_emb(self) -> nn.Embedding:
        return self.lm.tok_emb

    def forward(
        self,
        x: Tensor,
        keys: Tensor | None = None,
        input_mask: Tensor | None = None,
        input_attn_mask: Tensor | None = None,
        context_mask: Tensor | None = None,
        *,
        cache: list | None = None,
        offset: int = 0,
        **kwargs,
    ) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 2 or x.dtype.is_floating_point:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"ReformerLM input must be (batch, length) token ids, got {shape}")
        h, rotary = self.lm.embed(x, offset)
        kw = _attn_kwargs(keys, input_mask, input_attn_mask, context_mask, rotary, kwargs)
        h = self.lm.norm(self.lm.stack(h, cache=cache, **kw))
        if self.return_embeddings:
            return h
        h = self.to_emb(h)
        if self.weight_tie_embedding:
            return h @ F.normalize(self.lm.tok_emb.weight, dim=-1).t()
        return self.to_logits(h)

    def new_cache(self) -> list[dict]:
        """Per-layer caches for incremental decoding (see :meth:`TrainingWrapper.generate`)."""
        return [{} for _ in self.lm.stack.blocks]


class Autopadder(nn.Module):
    """Kept for reformer-pytorch's API: the LSH layers already pad any length to their bucket multiple and
    mask the padding (which never takes a real token's bucket slot), so this only forwards."""

    def __init__(self, net: nn.Module):
        super().__init__()
        if not isinstance(net, (lsh.LSHSelfAttention, Reformer, ReformerLM)):
            raise TypeError(f"Autopadder wraps an LSHSelfAttention, Reformer or ReformerLM, got {type(net).__name__}")
        self.net = net

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        return self.net(x, **kwargs)


def top_k(logits: Tensor, thres: float = 0.9) -> Tensor:
    """Keeps the ``k = max(1, int((1 - thres) * vocab))`` largest logits (reformer-pytorch's meaning:
    ``thres=0.9`` keeps the top 10 %); the rest become ``-inf``."""
    if not 0.0 <= thres < 1.0:
        raise ValueError(f"top_k thres must be in [0, 1) (fraction of the vocabulary dropped), got {thres!r}")
    k = max(1, int((1 - thres) * logits.shape[-1]))
    val, ind = logits.topk(k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter(-1, ind, val)


def top_p(logits: Tensor, thres: float = 0.9) -> Tensor:
    """Nucleus filtering (Holtzman et al. 2020): keeps the smallest set of tokens whose probability reaches
    ``thres`` (so ``thres=0.9`` keeps the 90 % nucleus; reformer-pytorch used ``1 - thres``)."""
    if not 0.0 < thres <= 1.0:
        raise ValueError(f"top_p thres must be in (0, 1] (nucleus probability), got {thres!r}")
    sorted_logits, idx = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum - sorted_logits.softmax(-1) >= thres  # mass before this token already reaches thres
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)


class TrainingWrapper(nn.Module):
    """Loss and sampling around a :class:`ReformerLM` (reformer-pytorch's ``generative_tools``).

    ``forward(x, return_loss=False, **kw)``: ``x`` is a ``(b, n)`` tensor or a list of 1-D tensors (padded
    with ``pad_value``); with ``return_loss`` the inputs are ``x[:, :-1]``, the targets ``x[:, 1:]`` and the
    result is the cross-entropy (``ignore_index`` skipped). ``generate(start_tokens, seq_len, eos_token=None,
    temperature=1.0, filter_logits_fn=top_k, filter_thres=0.9, use_cache=True, **kw)`` returns the new
    tokens ``(b, seq_len)``; each step feeds only the new token to every layer (the layers keep their inputs),
    and stops early once every row has produced ``eos_token``.
    """

    def __init__(self, net: ReformerLM, ignore_index: int = -100, pad_value: int = 0):
        super().__init__()
        if not isinstance(net, ReformerLM):
            raise TypeError(f"TrainingWrapper wraps a ReformerLM, got {type(net).__name__}")
        self.net = Autopadder(net)
        self.ignore_index, self.pad_value = ignore_index, pad_value
        self.max_seq_len = net.max_seq_len

    def forward(self, x, return_loss: bool = False, **kwargs):
        if isinstance(x, (list, tuple)):
            x = nn.utils.rnn.pad_sequence(list(x), batch_first=True, padding_value=self.pad_value)
        if not return_loss:
            return self.net(x, **kwargs)
        xi, xo = x[:, :-1], x[:, 1:]
        if "input_mask" in kwargs and kwargs["input_mask"] is not None:
            kwargs["input_mask"] = kwargs["input_mask"][:, :-1]
        logits = self.net(xi, **kwargs)
        return F.cross_entropy(logits.transpose(1, 2), xo, ignore_index=self.ignore_index)

    @torch.no_grad()
    def generate(
        self,
        start_tokens: Tensor,
        seq_len: int,
        eos_token: int | None = None,
        temperature: float = 1.0,
        filter_logits_fn: Callable[[Tensor, float], Tensor] = top_k,
        filter_thres: float = 0.9,
        use_cache: bool = True,
        **kwargs,
    ) -> Tensor:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        net: ReformerLM = self.net.net
        was_training = net.training
        net.eval()
        squeeze = start_tokens.dim() == 1
        out = start_tokens[None] if squeeze else start_tokens
        t = out.shape[1]
        input_mask = kwargs.pop("input_mask", None)
        cache = net.new_cache() if use_cache else None
        fed = 0  # tokens already in the cache
        for _ in range(seq_len):
            window = out[:, -self.max_seq_len :]
            if cache is not None and window.shape[1] == out.shape[1]:
                new = out[:, fed:]
                mask = None if input_mask is None else input_mask[:, : out.shape[1]]
                logits = net(new, input_mask=mask, cache=cache, offset=fed, **kwargs)[:, -1]
                fed = out.shape[1]
            else:  # beyond max_seq_len: re-encode the last max_seq_len tokens
                mask = None if input_mask is None else input_mask[:, -window.shape[1] :]
                logits = net(window, input_mask=mask, **kwargs)[:, -1]
            probs = F.softmax(filter_logits_fn(logits, thres=filter_thres) / temperature, dim=-1)
            sample = torch.multinomial(probs, 1)
            out = torch.cat((out, sample), dim=-1)
            if input_mask is not None:
                input_mask = F.pad(input_mask, (0, 1), value=True)
            if eos_token is not None and bool((sample == eos_token).all()):
                break
        net.train(was_training)
        out = out[:, t:]
        return out[0] if squeeze else out


class ReformerEncDec(nn.Module):
    """Encoder-decoder of two :class:`ReformerLM` s: ``enc_*`` / ``dec_*`` keyword arguments configure each;
    the encoder returns embeddings, which join the causal decoder's LSH self-attention as keys (its
    ``enc_input_mask`` becomes the decoder's ``context_mask``). Both are wrapped in :class:`TrainingWrapper`.
    """

    def __init__(self, dim: int, ignore_index: int = 0, pad_value: int = 0, **kwargs):
        super().__init__()
        enc = {k[4:]: v for k, v in kwargs.items() if k.startswith("enc_")}
        dec = {k[4:]: v for k, v in kwargs.items() if k.startswith("dec_")}
        other = sorted(k for k in kwargs if not k.startswith(("enc_", "dec_")))
        if other:
            raise TypeError(f"ReformerEncDec arguments must start with enc_ or dec_, got {', '.join(other)}")
        if "return_embeddings" in enc:
            raise ValueError("enc_return_embeddings is always True for the encoder; drop the argument")
        if "causal" in dec and not dec["causal"]:
            raise ValueError("the decoder is always causal; drop dec_causal=False")
        enc.update(return_embeddings=True)
        dec.update(causal=True)
        dec.setdefault("bucket_size", enc.get("bucket_size", 64))
        self.enc = TrainingWrapper(ReformerLM(dim=dim, **enc), ignore_index=ignore_index, pad_value=pad_value)
        self.dec = TrainingWrapper(ReformerLM(dim=dim, **dec), ignore_index=ignore_index, pad_value=pad_value)

    @staticmethod
    def _split(kwargs):
        enc = {k[4:]: v for k, v in kwargs.items() if k.startswith("enc_")}
        dec = {k[4:]: v for k, v in kwargs.items() if k.startswith("dec_")}
        if "input_mask" in enc:
            dec.setdefault("context_mask", enc["input_mask"])
        return enc, dec

    def forward(self, seq_in: Tensor, seq_out: Tensor, return_loss: bool = False, **kwargs):
        enc_kw, dec_kw = self._split(kwargs)
        keys = self.enc(seq_in, **enc_kw)
        return self.dec(seq_out, return_loss=return_loss, keys=keys, **dec_kw)

    @torch.no_grad()
    def generate(self, seq_in: Tensor, seq_out_start: Tensor, seq_len: int, **kwargs) -> Tensor:
        enc_kw, dec_kw = self._split(kwargs)
        keys = self.enc(seq_in, **enc_kw)
        return self.dec.generate(seq_out_start, seq_len, keys=keys, **dec_kw)


class Recorder(nn.Module):
    """Records each forward's LSH attention weights and buckets, per layer (reformer-pytorch's ``Recorder``).

    ``recordings[i]`` is a list with one ``{"attn": (b, lsh_heads, t, kv), "buckets": (b, lsh_heads,
    n_hashes * kv)}`` per attention layer of the ``i``-th recorded forward (detached, on CPU). Dense weights
    cost ``O(n^2)`` memory. ``turn_on`` / ``turn_off`` / ``clear``; ``eject()`` returns the wrapped model.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.on = True
        self.ejected = False
        self.recordings: list[list[dict]] = []
        self._current: list[dict] = []

    def _layers(self):
        return [m for m in self.net.modules() if isinstance(m, lsh.LSHSelfAttention)]

    def _callback(self, attn: Tensor, buckets: Tensor) -> None:
        self._current.append({"attn": attn.detach().cpu(), "buckets": buckets.detach().cpu()})

    def turn_on(self) -> None:
        self.on = True

    def turn_off(self) -> None:
        self.on = False

    def clear(self) -> None:
        self.recordings.clear()

    def eject(self) -> nn.Module:
        self.ejected = True
        self.clear()
        return self.net

    def forward(self, x, **kwargs):
        if self.ejected:
            raise RuntimeError("this Recorder was ejected; call the model returned by eject() instead")
        if not self.on:
            return self.net(x, **kwargs)
        layers = self._layers()
        for layer in layers:
            layer.return_attn, layer.callback = True, self._callback
        self._current = []
        try:
            out = self.net(x, **kwargs)
        finally:
            # unwired before any reversible backward recomputes the layers, so nothing is recorded twice
            for layer in layers:
                layer.return_attn, layer.callback = False, None
        self.recordings.append(self._current)
        return out


# ---------------------------------------------------------------------------------------------------------
# conversion


def from_reformer_pytorch(model: nn.Module, seed: int | None = None) -> ReformerLM:
    """A :class:`ReformerLM` with the weights and hyperparameters of a reformer-pytorch 1.4.4 ``ReformerLM``.

    Supported: pre-LayerNorm, ScaleNorm or ReZero blocks, rotary (default), absolute or fixed positions,
    memory key/values, local heads, one value head, weight tying, untied or normalised-tied output,
    ``emb_dim == dim``. With ``use_full_attn=True`` (no hashing randomness) the logits agree within
    floating-point error; LSH layers hash deterministically here in eval, unlike the original. A model
    with ``use_full_attn=True`` and default (rotary) positions never saw positions in reformer-pytorch (its
    full attention ignores them), so it converts to a model without positions, with a warning.
    """
    try:
        import reformer_pytorch.reformer_pytorch as rp
    except ImportError as e:  # pragma: no cover - optional dependency
        raise ImportError("from_reformer_pytorch needs the reformer_pytorch package installed") from e
    if not isinstance(model, rp.ReformerLM):
        raise TypeError(f"from_reformer_pytorch expects a reformer_pytorch ReformerLM, got {type(model).__name__}")
    if not isinstance(model.to_model_dim, nn.Identity) and type(model.to_model_dim).__name__ != "Identity":
        raise ValueError(
            "emb_dim != dim (factorised embedding) is not converted: our projection has no bias; "
            "rebuild with "
            "emb_dim=None"
        )
    reformer = model.reformer
    blocks = reformer.layers.blocks
    first_f = blocks[0].f.net
    use_rezero = isinstance(first_f, rp.ReZero)
    attn0 = first_f.fn
    ff_chunk = blocks[0].g.net.fn
    ff0 = ff_chunk.fn
    if not isinstance(ff0, rp.FeedForward):
        raise ValueError("product-key memory layers (pkm_layers) are not converted")
    use_scale_norm = not use_rezero and isinstance(first_f.norm, rp.ScaleNorm)
    lsh = attn0.lsh_attn
    pos = model.pos_emb
    absolute = isinstance(pos, rp.AbsolutePositionalEmbedding)
    fixed = isinstance(pos, rp.FixedPositionalEmbedding)
    if type(pos).__name__ == "AxialPositionalEmbedding":
        raise ValueError("axial position embeddings are not converted; use rotary, absolute or fixed positions")
    out = model.out
    return_embeddings = not isinstance(out, nn.Sequential)
    tied = not return_embeddings and isinstance(out[1], rp.MatrixMultiply)
    rotary = not (absolute or fixed)
    if rotary and attn0.use_full_attn:
        warnings.warn(
            "this reformer-pytorch model uses full attention with rotary positions, which its full attention "
            "ignores; it is converted without positions to compute the same function",
            stacklevel=2,
        )
    num_tokens, dim = model.token_emb.weight.shape
    act = type(ff0.act)
    ours = ReformerLM(
        num_tokens=num_tokens,
        dim=dim,
        depth=len(blocks),
        max_seq_len=model.max_seq_len,
        heads=attn0.heads,
        dim_head=attn0.dim_head,
        bucket_size=lsh.bucket_size,
        n_hashes=lsh.n_hashes,
        ff_chunks=ff_chunk.chunks,
        attn_chunks=attn0.attn_chunks,
        causal=lsh.causal,
        weight_tie=len(blocks) > 1 and blocks[1].f.net.fn is attn0,
        lsh_dropout=lsh.dropout.p,
        ff_dropout=ff0.dropout.p,
        ff_mult=ff0.w2.in_features // dim,
        ff_activation=act if act in _ACTIVATIONS else None,
        ff_glu=ff0.glu,
        post_attn_dropout=attn0.post_attn_dropout.p,
        layer_dropout=reformer.layers.layer_dropout,
        random_rotations_per_head=lsh._random_rotations_per_head,
        use_scale_norm=use_scale_norm,
        use_rezero=use_rezero,
        use_full_attn=attn0.use_full_attn,
        full_attn_thres=attn0.full_attn_thres,
        reverse_thres=reformer.layers.reverse_thres,
        num_mem_kv=attn0.num_mem_kv,
        one_value_head=attn0.v_head_repeats > 1,
        return_embeddings=return_embeddings,
        weight_tie_embedding=tied,
        fixed_position_emb=fixed,
        absolute_position_emb=absolute,
        n_local_attn_heads=attn0.n_local_attn_heads,
        lsh_attend_across_buckets=lsh._attend_across_buckets,
        lsh_allow_duplicate_attention=lsh._allow_duplicate_attention,
        rotary_position_emb=not attn0.use_full_attn,
        seed=seed,
    )
    if ours.config.ff.kind == "glu":
        raise ValueError("ff_glu=True is not converted (the gate layout differs); rebuild with ff_glu=False")
    with torch.no_grad():
        ours.lm.tok_emb.weight.copy_(model.token_emb.weight)
        if absolute:
            _copy_single(ours.lm.pos, pos.emb.weight)
        for block, theirs in zip(ours.lm.stack.blocks, blocks):
            f, g = theirs.f.net, theirs.g.net
            a, ff = f.fn, g.fn.fn
            block.attn.toqk.weight.copy_(a.toqk.weight)
            block.attn.tov.weight.copy_(a.tov.weight)
            block.attn.to_out.weight.copy_(a.to_out.weight)
            block.attn.to_out.bias.copy_(a.to_out.bias)
            if a.mem_kv is not None:
                block.attn.mem_kv.copy_(a.mem_kv)
            block.ff.proj_in.weight.copy_(ff.w1.weight)
            block.ff.proj_in.bias.copy_(ff.w1.bias)
            block.ff.proj_out.weight.copy_(ff.w2.weight)
            block.ff.proj_out.bias.copy_(ff.w2.bias)
            for res, wrapper in ((block.res_attn, f), (block.res_ff, g)):
                if use_rezero:
                    res.a.copy_(wrapper.g.reshape(res.a.shape))
                else:
                    for name, p in res.norm.named_parameters():
                        p.copy_(dict(wrapper.norm.named_parameters())[name].reshape(p.shape))
        ours.lm.norm.load_state_dict(model.norm.state_dict())
        if not return_embeddings and not tied:
            ours.to_logits.load_state_dict(out[1].state_dict())
    return ours


def _copy_single(module: nn.Module, weight: Tensor) -> None:
    params = list(module.parameters())
    if len(params) != 1 or params[0].shape != weight.shape:
        raise ValueError("cannot map the absolute position table onto this position module")
    params[0].copy_(weight)
