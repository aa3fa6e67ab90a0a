"""The reversible executor against ordinary autograd of the same coupling (exact invariants)."""

import pytest
import torch
from torch import nn

from anydepth.nn.reversible import reversible_apply, reversible_inverse


@pytest.fixture(autouse=True)
def float64():
    # exact comparisons; restored afterwards so other test modules in this process keep float32
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


class Branch(nn.Module):
    """A small branch with dropout (exercises RNG replay) and an optional context tensor."""

    def __init__(self, d, p=0.0):
        super().__init__()
        self.lin1, self.lin2, self.drop = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), nn.Dropout(p)

    def forward(self, x, context=None):
        h = torch.tanh(self.lin1(x))
        if context is not None:
            h = h + context.mean(1, keepdim=True)
        return self.lin2(self.drop(h))


def make(depth=4, d=8, p=0.0):
    torch.manual_seed(0)
    return nn.ModuleList([nn.ModuleList([Branch(d, p), Branch(d, p)]) for _ in range(depth)])


def plain(x, blocks, context=None):
    x1 = x2 = x
    for f, g in blocks:
        x1 = x1 + f(x2, context)
        x2 = x2 + g(x1)
    return x1, x2


def rev(x, blocks, context=None, training=True):
    fs = [lambda t, f=f: f(t, context) for f, _ in blocks]
    gs = [g for _, g in blocks]
    extra = [context] if context is not None else []
    return reversible_apply(x, x, fs, gs, list(blocks.parameters()), extra=extra, training=training)


def grads(blocks, *tensors):
    return [p.grad.clone() for p in blocks.parameters()] + [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradients_equal_plain_autograd(p):
    blocks = make(p=p)
    x = torch.randn(2, 5, 8, requires_grad=True)
    ctx = torch.randn(2, 3, 16, requires_grad=True)
    gy1, gy2 = torch.randn(2, 5, 8), torch.randn(2, 5, 8)

    torch.manual_seed(123)
    y1, y2 = plain(x, blocks, ctx)
    torch.autograd.backward([y1, y2], [gy1, gy2])
    ref = grads(blocks, x, ctx)
    ref_out = (y1.detach(), y2.detach())
    blocks.zero_grad()
    x.grad = ctx.grad = None

    torch.manual_seed(123)
    r1, r2 = rev(x, blocks, ctx)
    torch.autograd.backward([r1, r2], [gy1, gy2])
    got = grads(blocks, x, ctx)
    torch.testing.assert_close(r1, ref_out[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(r2, ref_out[1], rtol=0, atol=1e-12)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-8)


def test_parameters_get_gradients_when_input_does_not_require_grad():
    blocks = make()
    x = torch.randn(2, 5, 8)  # e.g. embeddings of a frozen table
    y1, y2 = rev(x, blocks)
    (y1.sum() + y2.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in blocks.parameters())


def test_backward_does_not_disturb_the_rng_stream():
    blocks = make(p=0.5)
    x = torch.randn(2, 5, 8, requires_grad=True)
    torch.manual_seed(7)
    y1, y2 = rev(x, blocks)
    after_forward = torch.get_rng_state()
    (y1.sum() + y2.sum()).backward()
    assert torch.equal(torch.get_rng_state(), after_forward)


def test_inverse_reconstructs_inputs():
    blocks = make()
    x1, x2 = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    fs = [f for f, _ in blocks]
    gs = [g for _, g in blocks]
    with torch.no_grad():
        y1, y2 = x1, x2
        for f, g in blocks:
            y1 = y1 + f(y2)
            y2 = y2 + g(y1)
    r1, r2 = reversible_inverse(y1, y2, fs, gs)
    torch.testing.assert_close(r1, x1, rtol=0, atol=1e-12)
    torch.testing.assert_close(r2, x2, rtol=0, atol=1e-12)


def test_no_grad_runs_plain_coupling():
    blocks = make()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        a = rev(x, blocks)
        b = plain(x, blocks)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)


@pytest.mark.parametrize("dropout,records", [(0.0, False), (0.1, True)])
def test_the_stack_records_rng_states_only_where_a_block_draws_random_numbers(monkeypatch, dropout, records):
    from anydepth import ModelConfig, build_model
    from anydepth.nn import reversible
    from anydepth.registry import FFS

    seen = []
    real = reversible._RNGState
    monkeypatch.setattr(reversible, "_RNGState", lambda devices: seen.append(1) or real(devices))
    ff = FFS.config("mlp", dropout=dropout)
    cfg = ModelConfig(vocab_size=32, dim=16, depth=2, heads=2, max_seq_len=32, stack="reversible", ff=ff)
    model = build_model(cfg).train()
    model(torch.randint(0, 32, (2, 8))).sum().backward()
    assert bool(seen) is records
