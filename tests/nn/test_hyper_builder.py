"""Hyper-connections inside the model builder: equal to pre-LN at init, and trainable."""

from __future__ import annotations

import pytest
import torch

import anydepth
from anydepth.registry import RESIDUALS

if not hasattr(anydepth, "build_model"):  # pragma: no cover - the builder ships with the model package
    pytest.skip("anydepth.build_model is not available", allow_module_level=True)


def _model(residual, seed=0):
    torch.manual_seed(seed)
    cfg = anydepth.ModelConfig(dim=32, depth=3, heads=2, max_seq_len=16, residual=residual)
    return anydepth.build_model(cfg)


@pytest.mark.parametrize("streams", [1, 2, 4])
def test_built_hyper_model_equals_prenorm_model_at_init(streams):
    # the hyper scheme draws no random numbers at init, so the same seed gives the same branches
    tokens = torch.randint(256, (2, 16), generator=torch.Generator().manual_seed(1))
    ref = _model("prenorm")(tokens)
    out = _model(RESIDUALS.config("hyper", streams=streams))(tokens)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["hyper", "mhc"])
def test_built_model_trains_and_reaches_the_mixing_weights(kind):
    model = _model(RESIDUALS.config(kind, streams=4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)  # moves only by gradient
    tokens = torch.randint(256, (2, 17), generator=torch.Generator().manual_seed(2))
    static = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("static_alpha")}
    assert static
    losses = []
    for _ in range(3):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    moved = [n for n, p in model.named_parameters() if n in static and not torch.equal(p, static[n])]
    assert set(moved) == set(static)
