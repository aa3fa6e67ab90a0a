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
from anydepth.train.optim import build_optimizer, convert_optimizer_state, lr_at, param_groups


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


def _pair():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(80, 64), nn.LayerNorm(64), nn.Linear(64, 3))
    twin = nn.Sequential(nn.Linear(80, 64), nn.LayerNorm(64), nn.Linear(64, 3))
    twin.load_state_dict(model.state_dict())
    return model, twin


def _train(model, opt, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 80, generator=gen)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_build_optimizer_is_torchs_fused_adamw_with_the_trainers_groups():
    model, twin = _pair()
    cfg = TrainConfig(lr=0.05, warmup=0, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    opt = build_optimizer(model, cfg)
    assert type(opt) is torch.optim.AdamW
    assert [g["fused"] for g in opt.param_groups] == [True, True]
    assert [len(g["params"]) for g in opt.param_groups] == [2, 4]
    # the same update as torch's per-tensor loop, to float32 rounding
    ref = torch.optim.AdamW(param_groups(twin, 0.1), lr=0.05, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    _train(model, opt, 12)
    _train(twin, ref, 12)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_build_optimizer_falls_back_to_foreach_off_the_fused_devices():
    model, _ = _pair()
    model.to("meta")
    opt = build_optimizer(model, TrainConfig())
    assert [(g["fused"], g["foreach"]) for g in opt.param_groups] == [(None, True), (None, True)]


def test_a_per_tensor_adamw_state_resumes_in_the_fused_one():
    # what the trainer wrote before it used the fused update: torch's default AdamW state dict
    # (fused None, foreach None, step counts float32 on the CPU)
    model, twin = _pair()
    cfg = TrainConfig(lr=0.05, warmup=0, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    old = torch.optim.AdamW(param_groups(twin, 0.1), lr=0.05, betas=(0.9, 0.95), eps=1e-8)
    _train(twin, old, 3)
    saved = copy.deepcopy(old.state_dict())
    assert {g["fused"] for g in saved["param_groups"]} == {None}
    model.load_state_dict(twin.state_dict())
    opt = build_optimizer(model, cfg)
    # as it was, the saved groups' flags would switch the fused update off
    as_saved = build_optimizer(copy.deepcopy(model), cfg)
    as_saved.load_state_dict(copy.deepcopy(saved))
    assert {g["fused"] for g in as_saved.param_groups} == {None}
    opt.load_state_dict(convert_optimizer_state(saved, opt))
    assert {g["fused"] for g in opt.param_groups} == {True}
    for p, q in zip(model.parameters(), twin.parameters()):
        st, ref = opt.state[p], old.state[q]
        assert torch.equal(st["exp_avg"], ref["exp_avg"]) and torch.equal(st["exp_avg_sq"], ref["exp_avg_sq"])
        assert st["step"].dtype == torch.float32 and float(st["step"]) == 3
    # and the run goes on as the per-tensor optimizer would have taken it
    _train(model, opt, 4, seed=2)
    _train(twin, old, 4, seed=2)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
