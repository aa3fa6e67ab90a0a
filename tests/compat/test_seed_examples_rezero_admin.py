"""Every usage example of the ReZero and Admin seed READMEs, run with only its imports changed.

ReZero README: ``from rezero.transformer import RZTXEncoderLayer`` becomes
``from anydepth import RZTXEncoderLayer`` (same for the decoder); the code is otherwise verbatim.

Admin README: its snippet does not run as written, so its own typos are fixed here:
``import admin-torch`` (not valid Python) becomes ``from anydepth.compat import admin_torch as admin``, and
``admin-torch.as_module(self, self.number_of_sub_layers)`` (an extra ``self`` argument the API does
not take) becomes ``admin.as_module(self.number_of_sub_layers)``; the diff's surrounding
``__init__``/``forward`` are filled in with a linear branch. The three examples in admin-torch's
docstrings (``as_module``, ``as_buffer``, ``as_parameter``) also run, with their typos fixed:
``nn.Linear(cfg.feedforward_dim)`` lacks its output size (``cfg.embed_dim``) and
``self.attn(x)`` lacks the key and value of ``nn.MultiheadAttention`` (``self.attn(x, x, x)``).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import admin_torch
import pytest
import torch
import torch.nn as nn


# torch warns that it cannot use its nested-tensor fast path for a layer that is not its own
# TransformerEncoderLayer; that is torch's remark about any custom layer.
@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
def test_rezero_readme_encoder():
    import torch
    import torch.nn as nn

    from anydepth import RZTXEncoderLayer

    encoder_layer = RZTXEncoderLayer(d_model=512, nhead=8)
    transformer_encoder = nn.TransformerEncoder(encoder_layer, num_layers=6)
    src = torch.rand(10, 32, 512)
    out = transformer_encoder(src)

    assert out.shape == (10, 32, 512)
    assert torch.equal(out, src)  # every ReZero layer is the identity at init


def test_rezero_readme_decoder():
    import torch
    import torch.nn as nn

    from anydepth import RZTXDecoderLayer

    decoder_layer = RZTXDecoderLayer(d_model=512, nhead=8)
    transformer_decoder = nn.TransformerDecoder(decoder_layer, num_layers=6)
    memory = torch.rand(10, 32, 512)
    tgt = torch.rand(20, 32, 512)
    out = transformer_decoder(tgt, memory)

    assert out.shape == (20, 32, 512)
    assert torch.equal(out, tgt)


def test_admin_readme_snippet():
    from anydepth.compat import admin_torch as admin

    class Layer(nn.Module):
        def __init__(self, dim, number_of_sub_layers):
            super().__init__()
            self.number_of_sub_layers = number_of_sub_layers
            self.f = nn.Linear(dim, dim)
            self.LN = nn.LayerNorm(dim)
            self.residual = admin.as_module(self.number_of_sub_layers)

        def forward(self, x):
            f, residual = self.f, self.residual
            x = residual(x, f(x))
            x = self.LN(x)
            return x

    torch.manual_seed(0)
    layer, x = Layer(16, 12), torch.randn(4, 16)
    w = math.sqrt(13 / math.log(13) - 1)
    with torch.no_grad():
        z = w * x + layer.f(x)
        expected = (z - z.mean(-1, keepdim=True)) / torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


CFG = SimpleNamespace(encoder_layers=6, embed_dim=16, num_heads=4, feedforward_dim=32)


def _docstring_layer(lib, mode: str):
    """admin-torch's docstring examples, one class per registration mode, on ``lib``."""

    class TransformerEncoderLayer(nn.Module):
        def __init__(self, cfg):
            super().__init__()

            num_layer = 2 * cfg.encoder_layers  # number of residual layers

            self.attn = nn.MultiheadAttention(cfg.embed_dim, cfg.num_heads)
            if mode == "module":
                self.residual_attn = lib.as_module(num_layer)
            elif mode == "buffer":
                lib.as_buffer(self, "attn_omega", num_layer)
            else:
                lib.as_parameter(self, "attn_omega", num_layer, cfg.embed_dim)
            self.ln_attn = nn.LayerNorm(cfg.embed_dim)

            self.ffn = nn.Sequential(
                nn.Linear(cfg.embed_dim, cfg.feedforward_dim),
                nn.ReLU(),
                nn.Linear(cfg.feedforward_dim, cfg.embed_dim),
            )
            if mode == "module":
                self.residual_ffn = lib.as_module(num_layer)
            elif mode == "buffer":
                lib.as_buffer(self, "ffn_omega", num_layer)
            else:
                lib.as_parameter(self, "ffn_omega", num_layer, cfg.embed_dim)
            self.ln_ffn = nn.LayerNorm(cfg.embed_dim)

        def forward(self, x):
            f_x, _ = self.attn(x, x, x)
            x = self.residual_attn(x, f_x) if mode == "module" else x * self.attn_omega + f_x
            x = self.ln_attn(x)

            f_x = self.ffn(x)
            x = self.residual_ffn(x, f_x) if mode == "module" else x * self.ffn_omega + f_x
            x = self.ln_ffn(x)

            return x

    return TransformerEncoderLayer(CFG)


@pytest.mark.parametrize("mode", ["module", "buffer", "parameter"])
def test_admin_docstring_examples_equal_admin_torch(mode):
    from anydepth.compat import admin_torch as admin

    ours, theirs = _docstring_layer(admin, mode), _docstring_layer(admin_torch, mode)
    theirs.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(5, 2, CFG.embed_dim)
    assert torch.equal(ours(x), theirs(x))
