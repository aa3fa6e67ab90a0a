"""Learning-rate schedule against its formula; AdamW parameter groups; config validation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tiny_runs import tiny_model
from torch import nn

from anydepth.model.build import build_model
from anydepth.train.config import DataConfig, RunConfig, TrainConfig
from anydepth.train.optim import AdamW, build_optimizer, clip_grad_norm, lr_at, param_groups


def test_warmup_then_cosine_matches_formula():
    cfg = TrainConfig(steps=100, lr=1e-3, warmup=10, schedule="cosine", min_lr_ratio=0.1)
    # Independent statement of the schedule: linear ramp to lr over 10 updates, then a half cosine
    # from lr down to 0.1 * lr over the remaining 90.
    for t in (0, 4, 9):
        assert lr_at(t, cfg) == pytest.approx(1e-3 * (t + 1) / 10)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(55, cfg) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lr_at(100, cfg) == pytest.approx(1e-4)
    lrs = [lr_at(t, cfg) for t in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_constant_schedule_and_no_warmup():
    cfg = TrainConfig(steps=50, lr=2e-3, warmup=0, schedule="constant")
    assert {lr_at(t, cfg) for t in range(50)} == {2e-3}


class _Gated(nn.Module):
    """A matrix listed by the no_weight_decay hook must leave the decay group despite ndim == 2."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.mix = nn.Parameter(torch.eye(4))

    def no_weight_decay(self):
        return [self.mix]


def test_param_groups_exclude_vectors_and_hooked_params():
    m = nn.Sequential(_Gated(), nn.LayerNorm(4))
    decay, no_decay = param_groups(m, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]) == {id(m[0].proj.weight)}
    assert ids(no_decay["params"]) == {id(m[0].proj.bias), id(m[0].mix), id(m[1].weight), id(m[1].bias)}


def test_real_model_groups_cover_every_parameter_once():
    model = build_model(tiny_model(residual="rezero", final_norm=False))
    groups = param_groups(model, 0.1)
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)) == len(list(model.parameters()))
    no_decay = {id(p) for p in groups[1]["params"]}
    hooked = {
        id(p) for mod in model.modules() if hasattr(mod, "no_weight_decay") for p in mod.no_weight_decay()
    }
    assert hooked and hooked <= no_decay
    assert all(p.ndim >= 2 for p in groups[0]["params"])


def test_weight_decay_applies_only_to_decay_group():
    m = _Gated()
    opt = build_optimizer(m, TrainConfig(lr=0.1, warmup=0, weight_decay=0.5, betas=(0.9, 0.95)))
    before_w, before_mix = m.proj.weight.detach().clone(), m.mix.detach().clone()
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    # With zero gradients AdamW's update is the decoupled decay alone: w <- w * (1 - lr * wd).
    torch.testing.assert_close(m.proj.weight, before_w * (1 - 0.1 * 0.5))
    torch.testing.assert_close(m.mix, before_mix)


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"steps": 0}, "train.steps"),
        ({"lr": -1.0}, "train.lr"),
        ({"schedule": "linear"}, "train.schedule"),
        ({"betas": (0.9, 1.5)}, "train.betas"),
        ({"on_nan": "ignore"}, "train.on_nan"),
        ({"device": "tpu"}, "train.device"),
    ],
)
def test_train_config_rejects_bad_values_naming_the_field(kw, needle):
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        TrainConfig(**kw)


def test_data_config_rejects_bad_values():
    with pytest.raises(ValueError, match="data.val_fraction"):
        DataConfig(val_fraction=1.5)
    with pytest.raises(ValueError, match="data.max_bytes"):
        DataConfig(max_bytes=0)


def test_run_config_round_trips_through_dict():
    cfg = RunConfig(
        model=tiny_model(residual="admin", final_norm=False), train=TrainConfig(steps=7, betas=(0.8, 0.9))
    )
    again = RunConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    assert again.train.betas == (0.8, 0.9)
    with pytest.raises(ValueError, match="unknown train key"):
        RunConfig.from_dict({**cfg.to_dict(), "train": {"stepz": 3}})


@pytest.mark.parametrize("scale", [10.0, 1e-3])  # clipping applies / does not apply
def test_clip_grad_norm_matches_torch_and_the_formula(scale):
    torch.manual_seed(0)
    shapes = [(8, 4), (4,), (3, 3, 2)]
    grads = [torch.randn(s) * scale for s in shapes]
    ours = [nn.Parameter(torch.zeros(s)) for s in shapes]
    ref = [nn.Parameter(torch.zeros(s)) for s in shapes]
    for a, b, g in zip(ours, ref, grads):
        a.grad, b.grad = g.clone(), g.clone()
    total = clip_grad_norm(ours, 1.0)
    expected_total = torch.cat([g.reshape(-1) for g in grads]).norm()
    torch.testing.assert_close(total, expected_total)
    torch.testing.assert_close(total, torch.nn.utils.clip_grad_norm_(ref, 1.0))
    coef = min(1.0, 1.0 / (float(expected_total) + 1e-6))
    for a, b, g in zip(ours, ref, grads):
        torch.testing.assert_close(a.grad, g * coef)
        torch.testing.assert_close(a.grad, b.grad)


def _adamw_pair(foreach_max_numel=4096):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(80, 64), nn.LayerNorm(64), nn.Linear(64, 3))  # 5120, 64, 64, 64, 192, 3
    twin = nn.Sequential(nn.Linear(80, 64), nn.LayerNorm(64), nn.Linear(64, 3))
    twin.load_state_dict(model.state_dict())
    kw = dict(lr=0.05, betas=(0.9, 0.95), eps=1e-8)
    ours = AdamW(param_groups(model, 0.1), foreach_max_numel=foreach_max_numel, **kw)
    ref = torch.optim.AdamW(param_groups(twin, 0.1), **kw)
    return model, ours, twin, ref


def _train(model, opt, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 80, generator=gen)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("foreach_max_numel", [0, 64, 4096])
def test_adamw_is_bitwise_torchs_adamw(foreach_max_numel):
    model, ours, twin, ref = _adamw_pair(foreach_max_numel)
    _train(model, ours, 12)
    _train(twin, ref, 12)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name
    a, b = ours.state_dict(), ref.state_dict()
    assert [g["params"] for g in a["param_groups"]] == [g["params"] for g in b["param_groups"]]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(a["state"][i][key], b["state"][i][key]), (i, key)


def test_adamw_state_moves_to_and_from_torchs_and_groups_stay_whole():
    model, ours, twin, ref = _adamw_pair()
    _train(model, ours, 3)
    _train(twin, ref, 3)
    assert len(ours.param_groups) == 2 and [len(g["params"]) for g in ours.param_groups] == [2, 4]
    # a state dict saved by either optimizer resumes in the other to the same trajectory (a copy, as a
    # checkpoint is: load_state_dict keeps tensors of the right dtype and device as they are)
    ref.load_state_dict(copy.deepcopy(ours.state_dict()))
    twin.load_state_dict(model.state_dict())
    _train(model, ours, 4, seed=2)
    _train(twin, ref, 4, seed=2)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_adamw_runs_step_hooks_once_and_keeps_explicit_foreach():
    model, ours, _, _ = _adamw_pair()
    calls = []
    ours.register_step_pre_hook(lambda *a: calls.append("pre"))
    ours.register_step_post_hook(lambda *a: calls.append("post"))
    _train(model, ours, 2)
    assert calls == ["pre", "post"] * 2
    explicit = AdamW(model.parameters(), lr=0.1, foreach=False)
    seen = []
    orig = torch.optim.AdamW.step
    try:
        # the group keeps its own foreach setting: one group reaches torch's step, not split
        torch.optim.AdamW.step = lambda self, closure=None: seen.append([g.get("foreach") for g in self.param_groups])
        explicit.step()
    finally:
        torch.optim.AdamW.step = orig
    assert seen == [[False]]


def test_adamw_with_a_tensor_learning_rate_is_torchs():
    # torch's foreach path refuses a tensor lr unless capturable: such a group is not split
    model, _, twin, _ = _adamw_pair()
    ours = AdamW(model.parameters(), lr=torch.tensor(0.05))
    ref = torch.optim.AdamW(twin.parameters(), lr=torch.tensor(0.05))
    _train(model, ours, 3)
    _train(twin, ref, 3)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("bad", [-1, 2.5, True, "4096"])
def test_adamw_rejects_a_bad_threshold(bad):
    with pytest.raises(ValueError, match="foreach_max_numel"):
        AdamW([nn.Parameter(torch.zeros(2))], foreach_max_numel=bad)
