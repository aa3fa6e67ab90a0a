"""The sweep definition: which runs the quick and full studies contain, and input checks."""

import pytest

from anydepth.study.sweep import (
    BASE_LR,
    LR_GRID,
    QUICK_BUDGETS,
    SCHEMES,
    RunSpec,
    full_plan,
    lr_label,
    quick_plan,
)


def test_quick_plan_covers_the_claims_it_must_decide():
    runs = quick_plan().runs()
    cells = {(r.scheme, r.depth) for r in runs if r.lr == BASE_LR}
    # RZ-2b and HC-2: 12-layer post-LN, ReZero, pre-LN and hyper-connections
    assert {("rezero", 12), ("postln", 12), ("preln", 12), ("hyper4", 12)} <= cells
    # RZ-3 / DN-1 / AD-1(b): the 64-layer trainability comparison, pre-LN included
    assert {("postln", 64), ("preln", 64), ("rezero", 64), ("admin", 64), ("deepnorm", 64)} <= cells
    assert {r.seed for r in runs} == {0}
    # a reduced learning-rate sweep at 64 layers: the same rates for every scheme swept there
    swept = {}
    for r in runs:
        if r.depth == 64:
            swept.setdefault(r.scheme, set()).add(r.lr)
    assert {s for s, g in swept.items() if len(g) > 1} == {"preln"}
    assert swept["preln"] == {LR_GRID[2], LR_GRID[4]}  # the claim rate and a decade above it
    # every run at a depth has the same budget: steps, batch and context
    plan = quick_plan()
    for depth in plan.depths:
        at = [r for r in runs if r.depth == depth]
        assert {(r.steps, r.batch_size, r.seq_len) for r in at} == {(plan.budgets[depth], plan.batch(depth), 64)}
    assert plan.batch(64) == 8 and plan.batch(12) == 16 and plan.fc_steps == 300


def test_full_plan_sweeps_the_grid_and_follows_at_256():
    plan = full_plan(seeds=2)
    runs = plan.runs()
    assert len({r.run_id for r in runs}) == len(runs)
    # the whole grid at 12 and 64 for every scheme; at 256 layers nothing until 64's results are in
    for d in (12, 64):
        for s in SCHEMES:
            assert {r.lr for r in runs if r.scheme == s and r.depth == d} == set(LR_GRID)
    assert not [r for r in runs if r.depth == 256]
    assert len(LR_GRID) >= 5 and all(b / a == pytest.approx(10**0.5) for a, b in zip(LR_GRID, LR_GRID[1:]))
    for depth in plan.depths:
        at = [r for r in runs if r.depth == depth]
        assert len({(r.steps, r.batch_size, r.seq_len) for r in at}) <= 1
    assert [r.run_id for r in runs][0] == "postln-L12-lr1e-4-s0"  # cheapest first, scheme order within
    # from 64 layers the compute-bound step takes half the batch; the follow runs at 256 too
    assert (plan.batch(12), plan.batch(64), plan.batch(256)) == (16, 8, 8)
    assert {r.batch_size for r in runs if r.depth == 64} == {8}
    # 256 layers: each scheme's best rate at 64 and its two grid neighbours (two at the grid's edge)
    records = [
        {"scheme": s, "depth": 64, "lr": lr, "status": "ok", "final_val_bpc": 3.0 + abs(i - (2 if s == "preln" else 0))}
        for s in SCHEMES for i, lr in enumerate(LR_GRID)
    ]
    follow = plan.follow_runs(records)
    assert {r.lr for r in follow if r.scheme == "preln"} == set(LR_GRID[1:4])
    assert {r.lr for r in follow if r.scheme == "rezero"} == set(LR_GRID[:2])
    assert {r.depth for r in follow} == {256} and plan.follow_count() == 3 * len(SCHEMES)
    assert {(r.steps, r.batch_size) for r in follow} == {(plan.budgets[256], 8)}


def test_lr_labels():
    assert [lr_label(x) for x in LR_GRID] == ["1e-4", "3e-4", "1e-3", "3e-3", "1e-2", "3e-2"]
    assert RunSpec(scheme="preln", depth=64, seed=1, steps=5, lr=LR_GRID[3]).run_id == "preln-L64-lr3e-3-s1"


def test_warmup_only_for_the_warmup_reference():
    steps = QUICK_BUDGETS[12]
    assert RunSpec(scheme="postln-warmup", depth=12, seed=0, steps=steps).warmup == round(0.1 * steps)
    for s in SCHEMES:
        if s != "postln-warmup":
            assert RunSpec(scheme=s, depth=12, seed=0, steps=steps).warmup == 0


def test_custom_plan_and_run_id():
    plan = full_plan(schemes=["rezero", "postln"], depths=[4, 2], seeds=1, budgets={2: 5, 4: 7}, lr_sweep=False)
    assert plan.name == "custom"
    assert [(r.run_id, r.steps) for r in plan.runs()] == [
        ("postln-L2-lr1e-3-s0", 5),
        ("rezero-L2-lr1e-3-s0", 5),
        ("postln-L4-lr1e-3-s0", 7),
        ("rezero-L4-lr1e-3-s0", 7),
    ]
    assert plan.schemes == ("postln", "rezero")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"schemes": ["rezeroo"]}, "unknown scheme.*rezeroo.*choose from"),
        ({"schemes": "rezero"}, "schemes must be a list"),
        ({"depths": [0]}, "depths must be positive"),
        ({"seeds": 0}, "seeds must be a positive integer"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        full_plan(**kwargs)
