"""The sweep definition: which runs the quick and full studies contain, and input checks."""

import pytest

from anydepth.study.sweep import QUICK_BUDGETS, SCHEMES, RunSpec, full_plan, quick_plan


def test_quick_plan_covers_the_claims_it_must_decide():
    runs = quick_plan().runs()
    cells = {(r.scheme, r.depth) for r in runs}
    # RZ-2: 12-layer ReZero vs post-LN (with the warm-up reference and pre-LN)
    assert {("rezero", 12), ("postln", 12), ("postln-warmup", 12), ("preln", 12)} <= cells
    # RZ-3 / DN-1 / AD-1(b): the 64-layer trainability comparison
    assert {("postln", 64), ("rezero", 64), ("admin", 64), ("deepnorm", 64)} <= cells
    assert {r.seed for r in runs} == {0}


def test_equal_budget_per_depth_and_unique_ids():
    plan = full_plan(seeds=2)
    runs = plan.runs()
    assert len(runs) == len(SCHEMES) * 3 * 2
    assert len({r.run_id for r in runs}) == len(runs)
    for depth in plan.depths:
        at = [r for r in runs if r.depth == depth]
        assert len({(r.steps, r.batch_size, r.seq_len) for r in at}) == 1
    assert [r.run_id for r in runs][0] == "postln-L12-s0"  # cheapest first, scheme order within


def test_warmup_only_for_the_warmup_reference():
    steps = QUICK_BUDGETS[12]
    assert RunSpec(scheme="postln-warmup", depth=12, seed=0, steps=steps).warmup == round(0.1 * steps)
    for s in SCHEMES:
        if s != "postln-warmup":
            assert RunSpec(scheme=s, depth=12, seed=0, steps=steps).warmup == 0


def test_custom_plan_and_run_id():
    plan = full_plan(schemes=["rezero", "postln"], depths=[4, 2], seeds=1, budgets={2: 5, 4: 7})
    assert plan.name == "custom"
    assert [(r.run_id, r.steps) for r in plan.runs()] == [
        ("postln-L2-s0", 5),
        ("rezero-L2-s0", 5),
        ("postln-L4-s0", 7),
        ("rezero-L4-s0", 7),
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
