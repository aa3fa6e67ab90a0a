"""Encoder-decoder model: a bidirectional encoder and a causal decoder with cross-attention."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from anydepth.model.config import EncoderDecoderConfig
from anydepth.model.lm import LMOutput, TransformerLM, count_parameters


class EncoderDecoder(nn.Module):
    """``logits = decoder(tgt, context=encoder(src))``.

    :func:`anydepth.build_model` builds both parts and hands them over. Depth-dependent schemes see the
    encoder-decoder architecture: DeepNorm, for instance, takes its encoder and decoder constants from
    both depths (``LayerContext.arch`` is ``encdec_encoder`` / ``encdec_decoder``).
    """

    def __init__(self, cfg: EncoderDecoderConfig, *, encoder: TransformerLM, decoder: TransformerLM):
        super().__init__()
        self.config = cfg
        self.encoder = encoder
        self.decoder = decoder

    def encode(self, src: Tensor, src_mask: Tensor | None = None) -> Tensor:
        return self.encoder(src, src_mask, return_embeddings=True)

    def forward(
        self,
        src: Tensor,
        tgt: Tensor,
        src_mask: Tensor | None = None,
        tgt_mask: Tensor | None = None,
        *,
        targets: Tensor | None = None,
        labels: Tensor | None = None,
        ignore_index: int = -100,
    ) -> Tensor | LMOutput:
        """Decoder logits ``(b, n_tgt, vocab)``; masks are bool key-padding masks, True = real token.
        ``targets``/``labels`` of ``tgt`` give ``LMOutput(logits, loss)`` as in
        :meth:`TransformerLM.forward`."""
        context = self.encode(src, src_mask)
        return self.decoder(
            tgt,
            tgt_mask,
            context=context,
            context_mask=src_mask,
            targets=targets,
            labels=labels,
            ignore_index=ignore_index,
        )

    def num_parameters(self, *, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameter elements of both parts; see :func:`count_parameters`."""
        return count_parameters(self, only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)

    @torch.no_grad()
    def generate(self, src: Tensor, prompt: Tensor, max_new_tokens: int, src_mask: Tensor | None = None, **kw):
        from anydepth.sampling import generate

        context = self.encode(src, src_mask)
        return generate(self.decoder, prompt, max_new_tokens, context=context, context_mask=src_mask, **kw)
