"""benchmarks/duplication.py: the task's layout, and that accuracy and loss count the second copy only."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "duplication.py"


@pytest.fixture(scope="module")
def dup():
    spec = importlib.util.spec_from_file_location("duplication_benchmark", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Oracle(nn.Module):
    """Predicts ``seq[:, t + 1]`` at position ``t`` where ``right[t]``, a wrong symbol elsewhere."""

    def __init__(self, seq, right, vocab):
        super().__init__()
        self.seq, self.right, self.vocab = seq, right, vocab

    def forward(self, x):
        assert torch.equal(x, self.seq[:, :-1])
        target = self.seq[:, 1:]
        guess = torch.where(self.right, target, (target % (self.vocab - 1)) + 1)
        return F.one_hot(guess, self.vocab).float() * 2


def test_batch_is_zero_w_zero_w(dup):
    half, vocab = 5, 7
    x = dup.batch(64, half, vocab, torch.Generator().manual_seed(0))
    assert x.shape == (64, 2 * half + 2)
    assert (x[:, 0] == 0).all() and (x[:, half + 1] == 0).all()
    assert torch.equal(x[:, 1 : half + 1], x[:, half + 2 :])
    w = x[:, 1 : half + 1]
    assert w.min() >= 1 and w.max() == vocab - 1  # every symbol but 0 is drawn (384 draws of 6)
    assert not torch.equal(x[0], x[1])


def test_accuracy_and_loss_count_only_the_second_copy(dup):
    half, vocab = 6, 9
    x = dup.batch(4, half, vocab, torch.Generator().manual_seed(1))
    positions = torch.arange(2 * half + 1)
    first_only = (positions < half + 1).expand(4, -1)  # right up to the second 0, wrong on the whole copy
    assert dup.accuracy(_Oracle(x, first_only, vocab), x, half, None) == 0.0
    assert dup.accuracy(_Oracle(x, ~first_only, vocab), x, half, None) == 1.0
    one_wrong = ~first_only.clone()
    one_wrong[:, half + 1] = False  # the first symbol of the copy
    assert dup.accuracy(_Oracle(x, one_wrong, vocab), x, half, None) == pytest.approx((half - 1) / half)

    # the copy-only loss of a model exact on the copy is that of its one-hot logits of 2: first-half errors add 0
    exact = math.log(1 + (vocab - 1) * math.exp(-2))
    assert dup.loss_fn(_Oracle(x, ~first_only, vocab), x, half, True).item() == pytest.approx(exact, rel=1e-5)
    assert dup.loss_fn(_Oracle(x, ~first_only, vocab), x, half, False).item() > 1.0


def test_evaluation_with_other_round_counts_restores_the_model(dup):
    args = type("Args", (), dict(half=7, vocab=8, dim=16, heads=2, depth=1, bucket_size=4, position="learned"))
    x = dup.batch(3, args.half, args.vocab, torch.Generator().manual_seed(2))
    for trained in (None, 2):
        model = dup.make(args, trained)
        layers = [m for m in model.modules() if hasattr(m, "lsh_attn")]
        assert layers and all(m.use_full_attn == (trained is None) for m in layers)
        for h in (None, 1, 4):
            assert 0.0 <= dup.accuracy(model, x, args.half, h) <= 1.0
        assert all(m.use_full_attn == (trained is None) and m.lsh_attn.n_hashes == (trained or 1) for m in layers)
        assert model.training
