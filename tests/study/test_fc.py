"""The deep fully connected experiment: the four variants against their formulas, and the teacher data."""

import math

import pytest
import torch
import torch.nn.functional as F

from anydepth.study.fc import FCNet, teacher_data, train_fc


def test_teacher_labels_follow_the_stated_formula():
    x, y = teacher_data(n=50, dim=8, classes=3, seed=1)
    g = torch.Generator().manual_seed(10_000 + 1)
    x2 = torch.randn(50, 8, generator=g)
    u, v = torch.randn(8, 8, generator=g), torch.randn(8, 3, generator=g)
    assert torch.equal(x, x2)
    assert torch.equal(y, (torch.tanh(x2 @ u / math.sqrt(8)) @ v).argmax(-1))
    assert set(y.tolist()) <= {0, 1, 2}


def test_variants_compute_their_formulas():
    torch.manual_seed(0)
    x = torch.randn(5, 16)
    for variant in ("vanilla", "residual", "layernorm", "rezero"):
        net = FCNet(variant, depth=3, width=16, classes=4)
        if net.alpha is not None:
            net.alpha.data = torch.tensor([0.5, -1.0, 2.0])
        h = x
        for i, layer in enumerate(net.layers):
            r = torch.relu(h @ layer.weight.T + layer.bias)
            h = {"vanilla": r, "residual": h + r, "layernorm": F.layer_norm(r, (16,)),
                 "rezero": h + [0.5, -1.0, 2.0][i] * r}[variant]
        torch.testing.assert_close(net(x), h @ net.head.weight.T + net.head.bias)


def test_rezero_is_the_identity_at_init_and_gains_match_the_notebook():
    torch.manual_seed(0)
    net = FCNet("rezero", depth=4, width=32)
    x = torch.randn(3, 32)
    torch.testing.assert_close(net(x), net.head(x))
    # xavier_normal std = gain * sqrt(2 / (fan_in + fan_out)); residual uses gain sqrt(0.25) = 0.5.
    # 262,144 samples: the std's relative standard error is 0.14%, so 1% is a 7-sigma bound.
    for variant, gain in (("residual", 0.5), ("vanilla", math.sqrt(2))):
        w = FCNet(variant, depth=1, width=512).layers[0].weight
        assert w.std().item() == pytest.approx(gain * math.sqrt(2 / 1024), rel=0.01)


def test_training_lowers_the_loss_and_stops_at_a_blow_up():
    data = teacher_data(n=400, dim=32, seed=0)
    losses = train_fc("rezero", 4, steps=30, width=32, batch_size=50, lr=0.05, data=data)
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < losses[0]
    # lr 1e30: the first update makes the weights overflow, so the second loss is NaN and training stops.
    exploded = train_fc("residual", 4, steps=5, width=32, batch_size=50, lr=1e30, data=data)
    assert len(exploded) == 2 and math.isfinite(exploded[0]) and math.isnan(exploded[1])


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="variant='relu' is not a fully connected variant"):
        FCNet("relu", depth=2)
    with pytest.raises(ValueError, match="depth must be a positive integer.*0"):
        FCNet("rezero", depth=0)
    with pytest.raises(ValueError, match="steps must be a positive integer, got 0"):
        train_fc("rezero", 2, steps=0)


def test_layer_lr_is_the_hidden_layers_rate_and_the_classifier_keeps_lr():
    """With the hidden layers' rate at 0, ReZero stays the identity, so its losses are those of the
    classifier alone trained by Adagrad at ``lr`` on the same batches."""
    data = teacher_data(n=400, dim=8, seed=0)
    losses = train_fc("rezero", 5, steps=6, width=8, batch_size=50, lr=0.05, layer_lr=0.0, data=data)
    torch.manual_seed(0)
    head = FCNet("rezero", 5, width=8).head
    opt = torch.optim.Adagrad(head.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(400, generator=g)
    expected = []
    for i in range(6):
        idx = order[50 * i : 50 * (i + 1)]
        loss = F.cross_entropy(head(data[0][idx]), data[1][idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        expected.append(loss.item())
    assert losses == pytest.approx(expected, rel=1e-6)
    # and the rate does reach the layers: with layer_lr = lr the curve differs
    assert train_fc("rezero", 5, steps=6, width=8, batch_size=50, lr=0.05, data=data) != pytest.approx(
        expected, rel=1e-6
    )
