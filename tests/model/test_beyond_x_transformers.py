"""Sandwich norm, qk-norm and value residual against x-transformers, with its weights copied into ours.

x-transformers (installed from the dev extra) implements the same three techniques: ``sandwich_norm``
(Peri-LN), ``attn_qk_norm`` (l2-normalised q and k with a fixed logit scale) and ``add_value_residual``
(``v_l = v_1.lerp(v_l, 0.5)`` with the mix not learned). Its weights map onto ours one to one:
"""

import math

import pytest
import torch

from anydepth import ModelConfig, build_model
from anydepth.registry import ATTENTIONS, NORMS

x_transformers = pytest.importorskip("x_transformers")

DIM, HEADS, DIM_HEAD, DEPTH, VOCAB, SEQ = 32, 4, 8, 3, 64, 16
QK_NORM_SCALE = 10.0  # x-transformers' logit scale for l2-normalised q and k


def theirs(sandwich=False, qk_norm=False, value_residual=False):
    from x_transformers import Decoder, TransformerWrapper

    return TransformerWrapper(
        num_tokens=VOCAB,
        max_seq_len=SEQ,
        attn_layers=Decoder(
            dim=DIM,
            depth=DEPTH,
            heads=HEADS,
            attn_dim_head=DIM_HEAD,
            sandwich_norm=sandwich,
            attn_qk_norm=qk_norm,
            attn_qk_norm_scale=QK_NORM_SCALE,
            add_value_residual=value_residual,
            learned_value_residual_mix=False,
        ),
    )


def ours(sandwich=False, qk_norm=False, value_residual=False):
    # x-transformers' LayerNorm has a gain and no bias; its l2-normalised q.k times 10 is our RMS-normalised
    # q.k / sqrt(d) with gains c, c where c^2 sqrt(d) = 10 (set in copy_weights)
    norm = NORMS.config("layer", bias=False)
    attention = ATTENTIONS.config(
        "full", qk_norm="rms" if qk_norm else None, value_residual=True if value_residual else None, out_bias=False
    )
    cfg = ModelConfig(
        vocab_size=VOCAB,
        dim=DIM,
        depth=DEPTH,
        heads=HEADS,
        dim_head=DIM_HEAD,
        max_seq_len=SEQ,
        residual="periln" if sandwich else "prenorm",
        norm=norm,
        attention=attention,
        tie_embeddings=False,
    )
    return build_model(cfg)


@torch.no_grad()
def copy_weights(src, dst) -> None:
    """x-transformers TransformerWrapper(Decoder) -> anydepth TransformerLM of the same configuration."""
    dst.tok_emb.weight.copy_(src.token_emb.emb.weight)
    dst.pos.weight.copy_(src.pos_emb.emb.weight * src.pos_emb.scale)  # theirs scales positions by dim^-0.5
    layers = src.attn_layers.layers
    for i, block in enumerate(dst.blocks):
        (a_norms, attn, _), (f_norms, ff, _) = layers[2 * i], layers[2 * i + 1]
        block.attn.to_qkv.weight.copy_(torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]))
        block.attn.to_out.weight.copy_(attn.to_out.weight)
        if block.attn.qk_norm is not None:
            c = math.sqrt(QK_NORM_SCALE / math.sqrt(DIM_HEAD))
            block.attn.qk_norm.q_norm.scale.fill_(c)
            block.attn.qk_norm.k_norm.scale.fill_(c)
        block.ff.proj_in.weight.copy_(ff.ff[0][0].weight)
        block.ff.proj_in.bias.copy_(ff.ff[0][0].bias)
        block.ff.proj_out.weight.copy_(ff.ff[2].weight)
        block.ff.proj_out.bias.copy_(ff.ff[2].bias)
        for res, norms in ((block.res_attn, a_norms), (block.res_ff, f_norms)):
            res.norm.weight.copy_(_gain(norms[0]))
            if norms[1] is not None:
                res.norm_out.weight.copy_(_gain(norms[1]))
    dst.norm.weight.copy_(_gain(src.attn_layers.final_norm))
    dst.head.weight.copy_(src.to_logits.weight)


def _gain(norm):
    return norm.gamma + float(norm.unit_offset)  # its decoder stores the gain as gamma + 1 (gamma 0 at init)


def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize(
    "flags",
    [dict(), dict(sandwich=True), dict(qk_norm=True), dict(value_residual=True)]
    + [dict(sandwich=True, value_residual=True)],
    ids=["pre-ln", "sandwich", "qk-norm", "value-residual", "sandwich+value-residual"],
)
def test_same_logits_as_x_transformers_from_the_same_weights(flags):
    torch.manual_seed(0)
    src = theirs(**flags).eval()
    _perturb(src)
    dst = ours(**flags).eval()
    copy_weights(src, dst)
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    with torch.no_grad():
        expected, got = src(tokens), dst(tokens)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
