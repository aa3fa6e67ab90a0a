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


@pytest.fixture(autouse=True)
def _look_ahead_at_any_size(monkeypatch):
    # these models are small: their streams are below the size from which the depth kernels look
    # ahead by default
    from anydepth.nn import hyper_fused

    monkeypatch.setattr(hyper_fused, "LOOK_AHEAD_MIN_ELEMENTS", 0)


def _perturbed_hyper_model(layer_dropout=0.0):
    from anydepth.model.config import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, depth=3, heads=2, max_seq_len=16, residual=RESIDUALS.config("hyper", streams=4))
    if layer_dropout:
        cfg.stack = anydepth.registry.STACKS.config("sequential", layer_dropout=layer_dropout)
    model = anydepth.build_model(cfg)
    with torch.no_grad():  # dynamic weights away from their zero init, so every term of the kernels counts
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _connections(model):
    from anydepth.nn.hyper import HyperConnection

    return [m for m in model.modules() if isinstance(m, HyperConnection)]


def _unlinked(model):
    import copy

    twin = copy.deepcopy(model)
    for hc in _connections(twin):
        hc.followed_by(None)
    return twin


def _run_counting_kernels(model, tokens, hook=None):
    from collections import Counter

    from anydepth.nn import hyper_fused

    lib, calls = hyper_fused._KERNEL.get(), Counter()

    class Counting:
        def __getattr__(self, name):
            fn = getattr(lib, name)
            return lambda *a: calls.update([name]) or fn(*a)

    handle = _connections(model)[1].register_forward_pre_hook(hook) if hook else None
    hyper_fused._KERNEL.lib = Counting()
    try:
        out = model(tokens)
        out.pow(2).mean().backward()
    finally:
        hyper_fused._KERNEL.lib = lib
        if handle:
            handle.remove()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}, calls


def _assert_same_run(a, b):
    assert torch.equal(a[0], b[0])
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        assert torch.equal(a[1][name], b[1][name]), name


def test_depth_kernel_doing_the_next_width_forward_changes_no_bit():
    # The sequential stack links consecutive connections: each depth kernel also runs the next width
    # forward on its output. Outputs and every gradient must be those of the unlinked model, bit for bit.
    from anydepth.nn import hyper_fused

    if not hyper_fused._KERNEL.available():
        pytest.skip(f"fused kernel unavailable: {hyper_fused._KERNEL.error}")
    model = _perturbed_hyper_model()
    hcs = _connections(model)
    assert len(hcs) == 6
    assert [hc.__dict__.get("_next_connection") for hc in hcs] == hcs[1:] + [None]
    tokens = torch.randint(256, (2, 16), generator=torch.Generator().manual_seed(3))
    linked = _run_counting_kernels(model, tokens)
    plain = _run_counting_kernels(_unlinked(model), tokens)
    assert linked[2]["anydepth_hc_depth_width_forward"] == 5 and linked[2]["anydepth_hc_width_forward"] == 1
    assert plain[2]["anydepth_hc_depth_width_forward"] == 0 and plain[2]["anydepth_hc_width_forward"] == 6
    _assert_same_run(linked, plain)


@pytest.mark.parametrize("change", ["parameter", "input", "parameter data", "input data"])
def test_next_width_forward_is_recomputed_when_its_inputs_changed(change):
    # A hook between two sublayers that changes the second's parameter or its input, in place or by
    # assigning new memory to ``.data`` (which leaves the version counter as it was): the width forward
    # the depth kernel did ahead is stale and must not be used.
    from anydepth.nn import hyper_fused

    if not hyper_fused._KERNEL.available():
        pytest.skip(f"fused kernel unavailable: {hyper_fused._KERNEL.error}")

    def hook(module, args):
        with torch.no_grad():
            if change == "parameter":
                module.static_alpha.mul_(1.5)
            elif change == "input":
                args[0].mul_(1.5)
            elif change == "parameter data":
                module.static_alpha.data = module.static_alpha.data * 1.5
            else:
                args[0].data = args[0].data * 1.5

    model = _perturbed_hyper_model()
    tokens = torch.randint(256, (2, 16), generator=torch.Generator().manual_seed(4))
    linked = _run_counting_kernels(model, tokens, hook)
    plain = _run_counting_kernels(_unlinked(_perturbed_hyper_model()), tokens, hook)
    # the second connection computes its own width forward
    assert linked[2]["anydepth_hc_width_forward"] == 2
    _assert_same_run(linked, plain)


def test_inference_mode_runs_linked_models_without_the_look_ahead():
    # Under inference mode the streams are inference tensors, which have no version counter to tell
    # the next width connection of an in-place change: the depth kernels then leave no look-ahead,
    # and the output is that of an ordinary forward.
    from collections import Counter

    from anydepth.nn import hyper_fused

    if not hyper_fused._KERNEL.available():
        pytest.skip(f"fused kernel unavailable: {hyper_fused._KERNEL.error}")
    model = _perturbed_hyper_model()
    tokens = torch.randint(256, (2, 16), generator=torch.Generator().manual_seed(5))
    expected = model(tokens).detach()
    lib, calls = hyper_fused._KERNEL.get(), Counter()

    class Counting:
        def __getattr__(self, name):
            fn = getattr(lib, name)
            return lambda *a: calls.update([name]) or fn(*a)

    hyper_fused._KERNEL.lib = Counting()
    try:
        with torch.inference_mode():
            out = model(tokens)
    finally:
        hyper_fused._KERNEL.lib = lib
    assert calls["anydepth_hc_depth_width_forward"] == 0 and calls["anydepth_hc_width_forward"] == 6
    assert torch.equal(out, expected)


def test_a_model_built_in_inference_mode_runs_linked_outside_it():
    # its parameters are inference tensors, without the version counter that the look-ahead's check
    # reads elsewhere (outside inference mode nothing may change them in place)
    from anydepth.nn import hyper_fused

    if not hyper_fused._KERNEL.available():
        pytest.skip(f"fused kernel unavailable: {hyper_fused._KERNEL.error}")
    expected = _perturbed_hyper_model()
    with torch.inference_mode():
        model = _perturbed_hyper_model()
    assert all(p.is_inference() for p in model.parameters())
    tokens = torch.randint(256, (2, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(model(tokens), expected(tokens))


def test_look_ahead_starts_at_its_size_threshold(monkeypatch):
    from anydepth.nn import hyper_fused

    if not hyper_fused._KERNEL.available():
        pytest.skip(f"fused kernel unavailable: {hyper_fused._KERNEL.error}")
    model = _perturbed_hyper_model()
    tokens = torch.randint(256, (2, 16), generator=torch.Generator().manual_seed(7))
    size = 2 * 16 * 4 * 32  # the streams' elements: batch, sequence, streams, dim
    monkeypatch.setattr(hyper_fused, "LOOK_AHEAD_MIN_ELEMENTS", size + 1)
    below = _run_counting_kernels(model, tokens)
    assert below[2]["anydepth_hc_depth_width_forward"] == 0 and below[2]["anydepth_hc_width_forward"] == 6
    model.zero_grad()
    monkeypatch.setattr(hyper_fused, "LOOK_AHEAD_MIN_ELEMENTS", size)
    at = _run_counting_kernels(model, tokens)
    assert at[2]["anydepth_hc_depth_width_forward"] == 5 and at[2]["anydepth_hc_width_forward"] == 1
    _assert_same_run(below, at)


def test_layer_dropout_links_no_connections():
    model = _perturbed_hyper_model(layer_dropout=0.2)
    assert all(hc.__dict__.get("_next_connection") is None for hc in _connections(model))


def test_a_copied_model_links_its_own_connections():
    # the link is a plain attribute, not a submodule: a deep copy must point at the copy's connections
    # (and a state dict must not list the next connection's parameters twice)
    import copy

    model = _perturbed_hyper_model()
    twin = copy.deepcopy(model)
    hcs, twins = _connections(model), _connections(twin)
    assert [hc.__dict__.get("_next_connection") for hc in twins] == twins[1:] + [None]
    assert not set(map(id, hcs)) & set(map(id, twins))
    assert list(model.state_dict()) == list(_unlinked(model).state_dict())
