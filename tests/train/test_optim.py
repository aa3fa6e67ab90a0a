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


def _small_params(sizes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in sizes]


def _step_both(ours, theirs, opt_ours, opt_theirs, gen, skip=()):
    for i, (a, b) in enumerate(zip(ours, theirs)):
        g = None if i in skip else torch.randn(a.shape, generator=gen, dtype=a.dtype) * 10.0 ** (i % 5 - 2)
        a.grad, b.grad = (None, None) if g is None else (g.clone(), g.clone())
    opt_ours.step()
    opt_theirs.step()


def _assert_same(ours, theirs, opt_ours, opt_theirs):
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
        sa, sb = opt_ours.state[a], opt_theirs.state[b]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


def _flat_buffer(opt, p):
    """The flat buffer that ``p``'s first moment is a view of, or None (updated one tensor at a time)."""
    return opt.state[p]["exp_avg"]._base


# sizes straddling every vector width, a 0-d scalar, and a lone tensor (a flat copy of one tensor
# must not be a view of it)
@pytest.mark.parametrize("sizes", [[(), 1, 3, 7, 15, 16, 17, 33, 129, 257, (5, 13), 4096], [(4, 4)]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adamw_small_tensors_update_together_bitwise_as_torchs(sizes, dtype):
    ours, theirs = _small_params(sizes, dtype), _small_params(sizes, dtype)
    kw = dict(lr=0.05, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt, ref = AdamW(ours, **kw), torch.optim.AdamW(theirs, **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(7):
        _step_both(ours, theirs, opt, ref, gen)
    _assert_same(ours, theirs, opt, ref)
    # the update did go through one flat buffer, not one tensor at a time
    buffers = {id(_flat_buffer(opt, p)) for p in ours}
    assert len(buffers) == 1 and _flat_buffer(opt, ours[0]) is not None


def test_adamw_flat_update_follows_torch_when_a_gradient_is_missing():
    # torch skips a tensor without a gradient, whose step count then lags: the group's tensors no
    # longer share one step, and the update falls back to torch's per-tensor arithmetic for good
    sizes = [3, 17, 64, 5]
    ours, theirs = _small_params(sizes), _small_params(sizes)
    opt, ref = AdamW(ours, lr=0.05), torch.optim.AdamW(theirs, lr=0.05)
    gen = torch.Generator().manual_seed(2)
    for t in range(8):
        _step_both(ours, theirs, opt, ref, gen, skip={2} if t == 3 else ())
        _assert_same(ours, theirs, opt, ref)
    assert float(opt.state[ours[2]]["step"]) == 7 and float(opt.state[ours[0]]["step"]) == 8


def test_adamw_flat_state_round_trips_through_torchs_and_owns_its_memory():
    from safetensors.torch import save_file

    sizes = [3, 17, 64]
    ours, theirs = _small_params(sizes), _small_params(sizes)
    opt, ref = AdamW(ours, lr=0.05), torch.optim.AdamW(theirs, lr=0.05)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        _step_both(ours, theirs, opt, ref, gen)
    sd = opt.state_dict()
    tensors = {f"{i}/{k}": v for i, st in sd["state"].items() for k, v in st.items()}
    assert all(v._base is None for v in tensors.values())
    save_file(tensors, "/dev/null")  # refuses tensors that share memory
    # the state dict is a copy: a step does not move it
    before = copy.deepcopy(sd)
    _step_both(ours, theirs, opt, ref, gen)
    assert all(torch.equal(before["state"][i]["exp_avg"], sd["state"][i]["exp_avg"]) for i in sd["state"])
    # either optimizer resumes from the other's state to the same trajectory
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))
    for _ in range(3):
        _step_both(ours, theirs, opt, ref, gen)
    _assert_same(ours, theirs, opt, ref)
    assert _flat_buffer(opt, ours[0]) is not None


def test_adamw_flat_state_follows_an_assignment_to_the_state():
    sizes = [3, 17]
    ours, theirs = _small_params(sizes), _small_params(sizes)
    opt, ref = AdamW(ours, lr=0.05), torch.optim.AdamW(theirs, lr=0.05)
    gen = torch.Generator().manual_seed(4)
    _step_both(ours, theirs, opt, ref, gen)
    for o, p in ((opt, ours[1]), (ref, theirs[1])):
        o.state[p]["exp_avg"] = torch.full((17,), 0.5)
    for _ in range(2):
        _step_both(ours, theirs, opt, ref, gen)
    _assert_same(ours, theirs, opt, ref)


def test_adamw_flat_update_leaves_a_frozen_tensor_alone():
    sizes = [3, 17, 64]
    ours, theirs = _small_params(sizes), _small_params(sizes)
    for params in (ours, theirs):
        params[1].requires_grad_(False)
    opt, ref = AdamW(ours, lr=0.05, weight_decay=0.1), torch.optim.AdamW(theirs, lr=0.05, weight_decay=0.1)
    gen = torch.Generator().manual_seed(5)
    frozen = ours[1].detach().clone()
    for _ in range(4):
        _step_both(ours, theirs, opt, ref, gen, skip={1})
    _assert_same(ours, theirs, opt, ref)
    assert torch.equal(ours[1], frozen) and not opt.state[ours[1]]
    assert _flat_buffer(opt, ours[0]) is not None and _flat_buffer(opt, ours[0]) is _flat_buffer(opt, ours[2])


def test_adamw_keeps_no_flat_buffers_of_groups_it_no_longer_has():
    sizes = [3, 17]
    ours = _small_params(sizes)
    opt = AdamW(ours, lr=0.05)
    gen = torch.Generator().manual_seed(6)
    for _ in range(3):
        for p in ours:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # new group dicts each time
    assert len(opt._flats) == 1
