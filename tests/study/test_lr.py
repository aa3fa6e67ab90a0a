"""Learning-rate sensitivity (Wortsman et al. 2023) and the "Choosing a scheme" table."""

import math

import pytest

from anydepth.study.lr import choose_markdown, choose_table, lr_sensitivity, sweep_table
from anydepth.study.sweep import LR_GRID
from anydepth.study.verdicts import Evidence

UNIGRAM = 4.7


def test_lr_sensitivity_by_hand():
    # losses 3.0, 2.5, 2.0, 6.0 (above the 5.5 at init: capped), diverged (counts as init 5.5)
    final = {1e-4: 3.0, 3e-4: 2.5, 1e-3: 2.0, 3e-3: 6.0, 1e-2: math.nan}
    # min(loss, init) - best: 1.0, 0.5, 0.0, 3.5, 3.5 -> mean 8.5 / 5
    assert lr_sensitivity(final, 5.5) == pytest.approx(8.5 / 5)
    # per-rate initial losses
    assert lr_sensitivity({1e-3: 2.0, 1e-2: math.nan}, {1e-3: 5.0, 1e-2: 8.0}) == pytest.approx((0 + 6.0) / 2)
    assert lr_sensitivity({1e-3: 2.0}, 5.0) == 0.0
    with pytest.raises(ValueError, match="final is empty"):
        lr_sensitivity({}, 5.0)


def _run(scheme, depth, lr, val, status="ok", seed=0, tps=1000.0):
    floor = val if math.isfinite(val) else 5.0
    curve = [[1, 8.0]] + [[t, floor] for t in range(2, 40)]
    return {"scheme": scheme, "depth": depth, "lr": lr, "seed": seed, "steps": 40, "status": status,
            "run_id": f"{scheme}-{depth}-{lr}-{seed}", "curve": curve, "final_val_bpc": val,
            "tokens_per_s": tps, "batch_size": 16, "seq_len": 64}


def test_sweep_and_choose_tables():
    runs = [_run("preln", 64, lr, v) for lr, v in zip(LR_GRID[1:4], (3.2, 3.0, math.nan))]
    runs[2]["status"] = "diverged"
    runs += [_run("deepnorm", 64, lr, v, tps=500.0) for lr, v in zip(LR_GRID[1:4], (3.1, 2.9, 3.3))]
    runs += [_run("postln", 64, 1e-3, 4.9)]
    ev = Evidence(runs, unigram_bits=UNIGRAM)
    sweep = sweep_table(ev)[64]
    assert set(sweep) == {"preln", "deepnorm"}  # post-LN ran at one rate only
    assert sweep["preln"]["trained"] == list(LR_GRID[1:3]) and sweep["preln"]["best_lr"] == LR_GRID[2]
    # preln: capped losses 3.2, 3.0, 8.0 (diverged -> its initial 8.0), best 3.0
    assert sweep["preln"]["sensitivity"] == pytest.approx((0.2 + 0 + 5.0) / 3)
    rows = choose_table(ev)
    rec = [r for r in rows if r["recommended"]]
    assert [(r["depth"], r["scheme"]) for r in rec] == [(64, "deepnorm")]  # lowest best bpc, trained at 1e-3
    post = [r for r in rows if r["scheme"] == "postln"][0]
    assert post["trained_seeds"] == "0/1" and not post["recommended"]
    assert [r for r in rows if r["scheme"] == "deepnorm"][0]["step_ms"] == pytest.approx(1000 * 16 * 64 / 500)
    text = "\n".join(choose_markdown(rows))
    assert "**DeepNorm (post-LN, alpha/beta)** (recommended)" in text and "3e-4, 1e-3, 3e-3" in text


def test_choose_table_at_a_depth_where_each_scheme_ran_its_own_rates():
    """The full study's 256 layers: each scheme at its best rate from 64 layers and the two neighbours."""
    runs = [_run("preln", 256, lr, v) for lr, v in zip(LR_GRID[1:4], (3.2, 3.0, 3.4))]  # 3e-4 .. 3e-3
    # no run at the claim rate: qualifies by training at two of its rates, and has the best bpc
    runs += [_run("rezero", 256, lr, v) for lr, v in zip(LR_GRID[3:6], (2.9, 2.7, 5.0))]
    # trains at one of its rates only
    runs += [_run("dyt", 256, lr, v) for lr, v in zip(LR_GRID[3:6], (2.5, 5.0, math.nan))]
    rows = {r["scheme"]: r for r in choose_table(Evidence(runs, unigram_bits=UNIGRAM))}
    assert rows["rezero"]["trained_seeds"] == "" and rows["rezero"]["all_seeds_trained"]
    assert not rows["dyt"]["all_seeds_trained"] and rows["dyt"]["best_bpc"] == 2.5
    assert rows["preln"]["trained_seeds"] == "1/1" and rows["preln"]["all_seeds_trained"]
    assert [s for s, r in rows.items() if r["recommended"]] == ["rezero"]
    # sensitivities over different rates do not compare: none is shown
    assert all(r["sensitivity"] is None for r in rows.values())
    # over the depth's common rates it is shown
    same = [_run(s, 256, lr, 3.0) for s in ("preln", "rezero") for lr in LR_GRID[1:4]]
    assert all(r["sensitivity"] == 0.0 for r in choose_table(Evidence(same, unigram_bits=UNIGRAM)))
