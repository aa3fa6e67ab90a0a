"""Every attention path sees positions: a model without positions is permutation-equivariant
(full bidirectional attention), so permuting the tokens just permutes the outputs; with positions it
must not. reformer-pytorch's full-attention fallback silently drops rotary positions; this catches it."""

import pytest
import torch

from anydepth import ModelConfig, build_model
from anydepth.registry import ATTENTIONS

ATTENTION_PATHS = {
    "full": "full",
    "local": ATTENTIONS.config("local", window=4),
    "lsh": ATTENTIONS.config("lsh", bucket_size=4, n_hashes=2),
    "lsh-full-fallback": ATTENTIONS.config("lsh", use_full_attn=True),
    "lsh-local-heads": ATTENTIONS.config("lsh", bucket_size=4, n_hashes=2, n_local_attn_heads=1),
}


def equivariance_gap(attention, position, seed=0):
    torch.manual_seed(seed)
    model = build_model(
        ModelConfig(vocab_size=32, dim=16, depth=1, heads=2, max_seq_len=16, causal=False,
                    attention=attention, position=position)
    ).eval()
    tokens = torch.randint(0, 32, (1, 16))
    perm = torch.randperm(16)
    with torch.no_grad():
        return (model(tokens[:, perm]) - model(tokens)[:, perm]).abs().max().item()


def test_without_positions_full_attention_is_equivariant():
    # the control: shows the measurement can tell a position-blind layer from one that sees positions
    assert equivariance_gap("full", "none") < 1e-5


@pytest.mark.parametrize("position", ["learned", "sinusoidal", "axial", "rotary"])
@pytest.mark.parametrize("path", list(ATTENTION_PATHS))
def test_attention_path_sees_positions(path, position):
    assert equivariance_gap(ATTENTION_PATHS[path], position) > 1e-3
