"""Feed-forward kinds against formulas written here; chunking is exact and lowers peak activations."""

from __future__ import annotations

import math

import pytest
import torch

from anydepth.nn.feedforward import GLU, MLP
from anydepth.registry import FFS

F64 = torch.float64

FORMULAS = {
    "gelu": lambda h: 0.5 * h * (1 + torch.erf(h / math.sqrt(2))),
    "gelu_tanh": lambda h: 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3))),
    "relu": lambda h: h.clamp(min=0),
    "relu_squared": lambda h: h.clamp(min=0) ** 2,
    "swish": lambda h: h / (1 + torch.exp(-h)),
    "silu": lambda h: h / (1 + torch.exp(-h)),
    "sigmoid": lambda h: 1 / (1 + torch.exp(-h)),
    "tanh": lambda h: (torch.exp(h) - torch.exp(-h)) / (torch.exp(h) + torch.exp(-h)),
    "identity": lambda h: h,
}


def build(kind, dim=6, **fields):
    return FFS.build(FFS.config(kind, **fields), dim=dim).double()


@pytest.mark.parametrize("act", sorted(FORMULAS))
def test_mlp_formula(act):
    torch.manual_seed(0)
    ff = build("mlp", activation=act, mult=2)
    x = torch.randn(2, 5, 6, dtype=F64)
    w1, b1, w2, b2 = ff.proj_in.weight, ff.proj_in.bias, ff.proj_out.weight, ff.proj_out.bias
    torch.manual_seed(1)
    with torch.no_grad():  # give the biases values so that the test sees them
        b1.normal_(), b2.normal_()
    expected = FORMULAS[act](x @ w1.T + b1) @ w2.T + b2
    torch.testing.assert_close(ff(x), expected, rtol=1e-12, atol=1e-12)
    assert w1.shape == (12, 6)


@pytest.mark.parametrize("act", ["swish", "gelu", "sigmoid", "identity"])
def test_glu_formula(act):
    torch.manual_seed(0)
    ff = build("glu", activation=act, mult=1.5, bias=False)
    x = torch.randn(3, 4, 6, dtype=F64)
    w, v = ff.proj_in.weight[:9], ff.proj_in.weight[9:]
    expected = (FORMULAS[act](x @ w.T) * (x @ v.T)) @ ff.proj_out.weight.T
    torch.testing.assert_close(ff(x), expected, rtol=1e-12, atol=1e-12)
    assert ff.proj_in.bias is None and ff.hidden == 9


def test_dropout_on_hidden_only_in_training():
    torch.manual_seed(0)
    ff = build("mlp", dropout=0.5)
    x = torch.randn(2, 8, 6, dtype=F64)
    ff.eval()
    clean = ff(x)
    expected = FORMULAS["gelu"](x @ ff.proj_in.weight.T + ff.proj_in.bias) @ ff.proj_out.weight.T
    torch.testing.assert_close(clean, expected + ff.proj_out.bias, rtol=1e-12, atol=1e-12)
    ff.train()
    assert not torch.allclose(ff(x), clean)


@pytest.mark.parametrize("kind", ["mlp", "glu"])
@pytest.mark.parametrize("chunks,n", [(2, 8), (3, 8), (4, 5), (16, 5)])
def test_chunked_equals_unchunked(kind, chunks, n):
    torch.manual_seed(0)
    whole = build(kind)
    chunked = build(kind, chunks=chunks)
    chunked.load_state_dict(whole.state_dict())
    x = torch.randn(2, n, 6, dtype=F64, requires_grad=True)
    y1, y2 = whole(x), chunked(x)
    # the same arithmetic per row; only BLAS's choice of kernel per matrix shape can move the last ulp
    torch.testing.assert_close(y2, y1, rtol=0, atol=1e-14)
    g = torch.randn_like(y1)
    g1 = torch.autograd.grad(y1, [x, *whole.parameters()], g)
    g2 = torch.autograd.grad(y2, [x, *chunked.parameters()], g)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def _hidden_sizes(ff, x, grad):
    """Largest hidden activation (elements) and bytes saved for backward during one forward."""
    sizes, saved = [], [0]
    hook = ff.proj_in.register_forward_hook(lambda m, i, o: sizes.append(o.numel()))

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.set_grad_enabled(grad), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ff(x)
    hook.remove()
    return max(sizes), saved[0]


@pytest.mark.parametrize("kind", ["mlp", "glu"])
def test_chunking_lowers_peak_activation_memory(kind):
    torch.manual_seed(0)
    x = torch.randn(2, 64, 6, dtype=F64, requires_grad=True)
    whole, chunked = build(kind), build(kind, chunks=4)
    nograd_whole, _ = _hidden_sizes(whole, x, grad=False)
    nograd_chunked, _ = _hidden_sizes(chunked, x, grad=False)
    assert nograd_chunked * 4 == nograd_whole  # one slice of the hidden activations at a time
    _, saved_whole = _hidden_sizes(whole, x, grad=True)
    _, saved_chunked = _hidden_sizes(chunked, x, grad=True)
    # under autograd, recomputing slices in backward keeps only inputs saved: far less than the hidden
    # activations (width mult * dim) the unchunked layer saves
    assert saved_chunked < saved_whole / 3
    no_ckpt = build(kind, chunks=4, checkpoint=False)
    _, saved_plain = _hidden_sizes(no_ckpt, x, grad=True)
    assert saved_plain >= saved_whole  # without recomputation chunking saves nothing in training


def test_reset_parameters_scales_by_beta():
    for kind in ("mlp", "glu"):
        ff = build(kind, dim=16)
        torch.manual_seed(5)
        ff.reset_parameters(1.0)
        ref = {k: v.clone() for k, v in ff.state_dict().items()}
        torch.manual_seed(5)
        ff.reset_parameters(0.25)
        for name, p in ff.state_dict().items():
            scale = 0.0 if name.endswith("bias") else 0.25
            torch.testing.assert_close(p, ref[name] * scale, rtol=0, atol=1e-15)


def test_xavier_std_per_projection():
    torch.manual_seed(0)
    ff = GLU.make(dim=128, mult=2, bias=False)
    ff.reset_parameters(2.0)
    w = ff.proj_in.weight[:256]  # the gate W alone: fans (128, 256)
    assert w.std().item() == pytest.approx(2.0 * math.sqrt(2 / (128 + 256)), rel=0.03)
    assert ff.proj_out.weight.std().item() == pytest.approx(2.0 * math.sqrt(2 / (256 + 128)), rel=0.03)
    assert (ff.proj_in.weight.shape, MLP(dim=8).proj_in.weight.shape) == ((512, 128), (32, 8))


def test_bad_input():
    with pytest.raises(ValueError, match="activation='gleu'.*gelu"):
        FFS.build(FFS.config("mlp", activation="gleu"), dim=8)
    with pytest.raises(ValueError, match="chunks must be an int >= 1.*0"):
        FFS.build(FFS.config("glu", chunks=0), dim=8)
    with pytest.raises(ValueError, match="mult must be a positive number.*-1"):
        MLP.make(dim=8, mult=-1)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\).*1.0"):
        MLP.make(dim=8, dropout=1.0)
    with pytest.raises(ValueError, match="dim must be a positive int.*0"):
        GLU(dim=0)
    with pytest.raises(ValueError, match=r"end in dim=8, got \(2, 3, 7\)"):
        MLP(dim=8)(torch.randn(2, 3, 7))
    with pytest.raises(TypeError, match="no option"):
        FFS.config("mlp", glu=True)


@pytest.mark.parametrize("glu", [False, True])
def test_matches_reformer_pytorch_feedforward_with_the_same_weights(glu):
    rp = pytest.importorskip("reformer_pytorch.reformer_pytorch")
    torch.manual_seed(0)
    theirs = rp.FeedForward(8, mult=4, glu=glu).double()  # GELU; GLU gates the first half
    ours = build("glu" if glu else "mlp", dim=8, activation="gelu", mult=4)
    ours.load_state_dict(
        {
            "proj_in.weight": theirs.w1.weight,
            "proj_in.bias": theirs.w1.bias,
            "proj_out.weight": theirs.w2.weight,
            "proj_out.bias": theirs.w2.bias,
        }
    )
    x = torch.randn(2, 5, 8, dtype=F64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["mlp", "glu"])
@pytest.mark.parametrize("sizing", [dict(chunk_size=3), dict(chunk_size=7), dict(chunk_mib=1e-4)])
def test_pieces_by_size_equal_unchunked(kind, sizing):
    torch.manual_seed(0)
    whole, sized = build(kind), build(kind, **sizing)
    sized.load_state_dict(whole.state_dict())
    x = torch.randn(2, 9, 6, dtype=F64, requires_grad=True)
    y1, y2 = whole(x), sized(x)
    torch.testing.assert_close(y2, y1, rtol=0, atol=1e-14)
    g = torch.randn_like(y1)
    g1 = torch.autograd.grad(y1, [x, *whole.parameters()], g)
    g2 = torch.autograd.grad(y2, [x, *sized.parameters()], g)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["mlp", "glu"])
def test_piece_size_is_fixed_by_rows_or_budget_not_by_length(kind):
    ff = build(kind, chunk_size=16)
    for n in (8, 40, 400):
        largest, _ = _hidden_sizes(ff, torch.randn(1, n, 6, dtype=F64), grad=False)
        assert largest == min(n, 16) * ff.proj_in.out_features
    # a budget of B MiB holds floor(B * 2^20 / (width * 8 bytes)) float64 rows of hidden activations
    budget = build(kind, chunk_mib=0.01)
    rows = int(0.01 * 2**20) // (budget.proj_in.out_features * 8)
    largest, _ = _hidden_sizes(budget, torch.randn(1, 400, 6, dtype=F64), grad=False)
    assert largest == rows * budget.proj_in.out_features
    # a count bounds the memory to 1/chunks unless the budget is larger: pieces are the larger of the two
    both = build(kind, chunks=100, chunk_mib=0.01)
    assert both.piece_rows(400, F64) == rows
    assert both.piece_rows(100 * rows * 3, F64) == 3 * rows


def test_bad_piece_sizes_name_the_argument():
    with pytest.raises(ValueError, match="chunk_size must be a positive int.*0"):
        MLP.make(dim=8, chunk_size=0)
    with pytest.raises(ValueError, match="chunk_mib must be a positive number.*-1"):
        GLU.make(dim=8, chunk_mib=-1)
    with pytest.raises(ValueError, match="chunk_size=4 and chunk_mib=1 both size the pieces"):
        MLP.make(dim=8, chunk_size=4, chunk_mib=1)
