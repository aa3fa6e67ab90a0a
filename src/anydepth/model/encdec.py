"""Encoder-decoder model: a bidirectional encoder and a causal decoder with cross-attention."""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from anydepth.model.config import EncoderDecoderConfig
from anydepth.model.lm import TransformerLM, from_pretrained, save_pretrained


class EncoderDecoder(nn.Module):
    """``logits = decoder(tgt, context=encoder(src))``.

    Depth-dependent schemes see the encoder-decoder architecture: DeepNorm, for instance, takes its
    encoder and decoder constants from both depths (``LayerContext.arch`` is ``encdec_encoder`` /
    ``encdec_decoder``).
    """

    def __init__(self, cfg: EncoderDecoderConfig):
        super().__init__()
        self.config = cfg
        n_enc, n_dec = cfg.encoder.depth, cfg.decoder.depth
        enc_cfg = cfg.encoder if not cfg.encoder.causal else cfg.encoder.replace(causal=False)
        self.encoder = TransformerLM(
            enc_cfg, arch="encdec_encoder", n_enc_layers=n_enc, n_dec_layers=n_dec, head=False
        )
        self.decoder = TransformerLM(
            cfg.decoder, arch="encdec_decoder", cross=True, n_enc_layers=n_enc, n_dec_layers=n_dec
        )

    def encode(self, src: Tensor, src_mask: Tensor | None = None) -> Tensor:
        return self.encoder(src, src_mask, return_embeddings=True)

    def forward(
        self,
        src: Tensor,
        tgt: Tensor,
        src_mask: Tensor | None = None,
        tgt_mask: Tensor | None = None,
    ) -> Tensor:
        """Decoder logits ``(b, n_tgt, vocab)``; masks are bool key-padding masks, True = real token."""
        context = self.encode(src, src_mask)
        return self.decoder(tgt, tgt_mask, context=context, context_mask=src_mask)

    @torch.no_grad()
    def generate(self, src: Tensor, prompt: Tensor, max_new_tokens: int, src_mask: Tensor | None = None, **kw):
        from anydepth.generate import generate

        context = self.encode(src, src_mask)
        return generate(self.decoder, prompt, max_new_tokens, context=context, context_mask=src_mask, **kw)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **kw):
        return from_pretrained(directory, **kw)
