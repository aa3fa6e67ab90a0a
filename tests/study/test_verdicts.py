"""Verdict rules on synthetic curves: each rule is checked on a case that must pass and one that must not."""

import math
import re

import pytest

from anydepth.study import verdicts as V
from anydepth.study.report import _budget_line


def curve(start, rate, steps, floor=1.0):
    """Exponential approach to ``floor``: bpc_t = floor + (start - floor) * exp(-rate * t)."""
    return [[t, floor + (start - floor) * math.exp(-rate * t)] for t in range(1, steps + 1)]


def rec(scheme, depth, seed=0, *, c=None, status="ok", val=None, steps=100, **kw):
    c = c if c is not None else curve(5.0, 0.05, steps)
    val = val if val is not None else (c[-1][1] if c else math.nan)
    return {"scheme": scheme, "depth": depth, "seed": seed, "steps": steps, "status": status,
            "run_id": f"{scheme}-L{depth}-s{seed}", "curve": c, "final_val_bpc": val, **kw}


UNIGRAM = 4.74


def test_ema_matches_the_recurrence_written_out():
    xs = [4.0, 3.0, 2.0]
    assert V.ema(xs) == pytest.approx([4.0, 0.9 * 4.0 + 0.1 * 3.0, 0.9 * (0.9 * 4.0 + 0.1 * 3.0) + 0.1 * 2.0])
    assert math.isnan(V.ema([1.0, math.nan, 1.0])[-1])  # a blow-up is not smoothed away


def test_steps_to_and_failed_to_train():
    c = [[10, 5.0], [20, 5.0], [30, 1.0]]
    # EMA: 5.0, 5.0, 4.6
    assert V.steps_to(c, 4.6) == 30 and V.steps_to(c, 4.5) == math.inf
    assert V.trained(rec("x", 1, c=curve(5.0, 0.05, 100)), UNIGRAM)
    flat = [[t, UNIGRAM - 0.1] for t in range(1, 50)]  # within 0.15 of the unigram entropy
    assert not V.trained(rec("x", 1, c=flat), UNIGRAM)
    assert not V.trained(rec("x", 1, status="diverged"), UNIGRAM)


def test_noise_rule():
    assert V.noise([1.0], [2.0, 3.0]) == V.SINGLE_SEED_NOISE
    assert V.noise([1.0, 1.2], [2.0, 2.1]) == pytest.approx(2 * 0.2 / math.sqrt(2))


def _rz2_runs(rezero_rate):
    return [rec("postln-warmup", 12, c=curve(5, 0.05, 100)), rec("preln", 12, c=curve(5, 0.04, 100)),
            rec("rezero", 12, c=curve(5, rezero_rate, 100)), rec("postln", 12, c=curve(5, 0.01, 100, 3.5))]


def _first_step_ema_below(c, x):
    e = None
    for t, b in c:
        e = b if e is None else 0.9 * e + 0.1 * b
        if e <= x:
            return t
    return math.inf


def test_rz2_decides_on_the_step_ratio():
    runs = _rz2_runs(0.10)
    yes = V.rz2(V.Evidence(runs, unigram_bits=UNIGRAM))
    ref = runs[0]["curve"]
    e = ref[0][1]
    for _, b in ref[1:50]:
        e = 0.9 * e + 0.1 * b  # the reference's EMA at half budget (step 50) is the target X
    assert yes.details["target_bpc"] == pytest.approx(e)
    expected = _first_step_ema_below(runs[2]["curve"], e) / _first_step_ema_below(ref, e)
    assert yes.details["rezero_ratio"] == pytest.approx(expected) and expected < 0.7
    assert yes.status == V.REPRODUCED
    no = V.rz2(V.Evidence(_rz2_runs(0.06), unigram_bits=UNIGRAM))
    assert no.status == V.NOT_REPRODUCED and 0.7 < no.details["rezero_ratio"] < 1.0


def test_rz2b_and_missing_or_crashed_runs():
    ev = V.Evidence(_rz2_runs(0.10), unigram_bits=UNIGRAM)
    assert V.rz2b(ev).status == V.REPRODUCED  # post-LN ends near 3.5, ReZero near 1.0
    assert V.rz2(V.Evidence(_rz2_runs(0.1)[:2], unigram_bits=UNIGRAM)).status == V.NOT_RUN
    crashed = _rz2_runs(0.1)[:3] + [rec("rezero", 12, seed=1, status="error", c=[])]
    assert V.rz2(V.Evidence(crashed, unigram_bits=UNIGRAM)).status == V.FAILED


def test_rz3_and_dn1_trainability():
    div = rec("postln", 64, status="diverged", c=[[1, 5.5], [2, math.nan]], val=math.nan)
    good = [rec("rezero", 64), rec("deepnorm", 64, val=1.1), rec("preln", 64, val=1.0)]
    ev = V.Evidence([div, *good], unigram_bits=UNIGRAM)
    assert V.rz3(ev).status == V.REPRODUCED
    assert V.dn1(ev).status == V.REPRODUCED
    # DeepNorm more than 0.15 bpc worse than pre-LN: not reproduced.
    worse = [div, rec("rezero", 64), rec("deepnorm", 64, val=1.2), rec("preln", 64, val=1.0)]
    assert V.dn1(V.Evidence(worse, unigram_bits=UNIGRAM)).status == V.NOT_REPRODUCED
    assert "DeepNorm trained in 1 of 1 seeds" in V.dn1(ev).measured and "(holds)" in V.dn1(ev).measured
    # One DeepNorm seed stuck at the unigram entropy: the mean may still pass, the seed count does not.
    stuck = rec("deepnorm", 64, seed=1, c=[[t, UNIGRAM] for t in range(1, 100)], val=1.0)
    split = V.dn1(V.Evidence([div, *good, stuck], unigram_bits=UNIGRAM))
    assert split.status == V.NOT_REPRODUCED
    assert "DeepNorm trained in 1 of 2 seeds" in split.measured and "(fails)" in split.measured
    # Post-LN that trains breaks RZ-3.
    ev2 = V.Evidence([rec("postln", 64), rec("rezero", 64)], unigram_bits=UNIGRAM)
    assert V.rz3(ev2).status == V.NOT_REPRODUCED


def test_ad1_gap_inside_noise_is_not_reproduced():
    base = [rec("postln", 64, status="diverged", c=[[1, math.nan]], val=math.nan)]
    beyond = base + [rec("admin", 64, s, val=v) for s, v in enumerate((1.00, 1.01))] + [
        rec("preln", 64, s, val=v) for s, v in enumerate((1.10, 1.11))]
    assert V.ad1(V.Evidence(beyond, unigram_bits=UNIGRAM)).status == V.REPRODUCED
    inside = base + [rec("admin", 64, s, val=v) for s, v in enumerate((1.00, 1.10))] + [
        rec("preln", 64, s, val=v) for s, v in enumerate((1.05, 1.12))]
    assert V.ad1(V.Evidence(inside, unigram_bits=UNIGRAM)).status == V.NOT_REPRODUCED
    # each part's line ends with its outcome
    assert re.search(r"\(c\) 64L[^;]*\(fails\)", V.ad1(V.Evidence(inside, unigram_bits=UNIGRAM)).measured)
    assert re.search(r"\(c\) 64L[^;]*\(holds\)", V.ad1(V.Evidence(beyond, unigram_bits=UNIGRAM)).measured)


def test_ad1_a_names_the_seeds_that_trained_at_12_layers():
    """(a) needs all three schemes trained in every seed at 12 layers; one post-LN + warm-up seed stuck at the
    unigram entropy fails it however low the other seed ends, and the line says which seeds trained."""
    low = curve(5.0, 0.05, 100, floor=UNIGRAM - 2.0)
    stuck = [[t, UNIGRAM] for t in range(1, 100)]
    runs = [rec("postln-warmup", 12, 0, c=low, val=1.0), rec("postln-warmup", 12, 1, c=stuck, val=UNIGRAM)]
    runs += [rec(s, 12, seed, c=low, val=2.0) for s in ("preln", "admin") for seed in (0, 1)]
    v = V.ad1(V.Evidence(runs, unigram_bits=UNIGRAM))
    assert v.status == V.NOT_REPRODUCED and v.details["parts"]["a"] is False, v.measured
    assert "(a) 12L seeds trained: postln-warmup 1 of 2, preln 2 of 2, admin 2 of 2;" in v.measured
    # both post-LN seeds trained and below pre-LN: (a) holds
    runs[1] = rec("postln-warmup", 12, 1, c=low, val=1.0)
    v = V.ad1(V.Evidence(runs, unigram_bits=UNIGRAM))
    assert v.details["parts"]["a"] is True and "postln-warmup 2 of 2" in v.measured, v.measured


def test_ad2_slopes():
    depths = [6, 12, 24, 48]
    oc = {"postln": {str(L): 0.01 * L for L in depths},
          "admin": {str(L): 0.01 * math.log(L) for L in depths},
          "preln": {str(L): 0.005 for L in depths}}
    # the exact construction measured at 5% off its closed form: the measurement is sound
    s2 = V.OUTPUT_CHANGE_SIGMA**2
    oc |= {"chain-postln": {str(L): 1.05 * L * s2 / 2 for L in depths},
           **{f"chain-{k}": {str(L): 0.95 * s2 * sum(1 / (i + 1) for i in range(1, L + 1)) for L in depths}
              for k in ("admin", "preln")}}
    v = V.ad2(V.Evidence([], unigram_bits=UNIGRAM, output_change=oc))
    assert v.details["slopes"]["postln"] == pytest.approx(1.0)
    assert v.status == V.REPRODUCED, v.measured
    oc["admin"] = {str(L): 0.02 * L for L in depths}  # Admin also linear: not reproduced
    assert V.ad2(V.Evidence([], unigram_bits=UNIGRAM, output_change=oc)).status == V.NOT_REPRODUCED
    # a chain 30% off its closed form means the measurement itself is wrong: no verdict on the claim
    oc["chain-postln"] = {str(L): 1.3 * L * s2 / 2 for L in depths}
    broken = V.ad2(V.Evidence([], unigram_bits=UNIGRAM, output_change=oc))
    assert broken.status == V.FAILED and "postln 1.30x" in broken.measured
    assert V.ad2(V.Evidence([], unigram_bits=UNIGRAM)).status == V.NOT_RUN


def test_rz1_fully_connected_rules():
    n = 400
    def fc_curve(start, rate, floor):
        return [floor + (start - floor) * math.exp(-rate * t) for t in range(n)]
    fc = {"64": {"vanilla": [1e5] * 10 + [2.2] * (n - 10), "residual": [3e5] + [2.0] * (n - 1),
                 "layernorm": fc_curve(2.3, 0.005, 1.6), "rezero": fc_curve(2.3, 0.05, 0.3)}}
    v = V.rz1(V.Evidence([], unigram_bits=UNIGRAM, fc=fc))
    assert v.status == V.REPRODUCED, v.measured
    fc["64"]["rezero"] = fc_curve(2.3, 0.01, 0.9)  # reaches 1.0 late and ends close to the others
    assert V.rz1(V.Evidence([], unigram_bits=UNIGRAM, fc=fc)).status == V.NOT_REPRODUCED


def test_hc2_and_nr2():
    runs = [rec("preln", 12, s, val=1.5 + 0.01 * s, tokens_per_s=100) for s in range(2)]
    runs += [rec("hyper4", 12, s, val=1.4 + 0.01 * s) for s in range(2)]
    runs += [rec("rms", 12, s, val=1.505 + 0.01 * s, tokens_per_s=105) for s in range(2)]
    runs += [rec("prms", 12, s, val=1.53, tokens_per_s=110) for s in range(2)]
    ev = V.Evidence(runs, unigram_bits=UNIGRAM)
    assert V.hc2(ev).status == V.REPRODUCED
    assert V.nr2(ev).status == V.REPRODUCED
    slow = [r if r["scheme"] != "rms" else {**r, "tokens_per_s": 90} for r in runs]
    v = V.nr2(V.Evidence(slow, unigram_bits=UNIGRAM))
    assert v.status == V.NOT_REPRODUCED
    assert v.measured.startswith("tokens/s LayerNorm 100, RMSNorm 90 (-10.0%); val bpc LayerNorm 1.505,"), v.measured


def test_decide_returns_every_claim_once():
    out = V.decide(V.Evidence([], unigram_bits=UNIGRAM))
    assert [v.claim for v in out] == ["RZ-1", "RZ-2", "RZ-2b", "RZ-3", "AD-1", "AD-2", "DN-1", "NR-2", "HC-2", "QK-1"]
    assert all(v.status == V.NOT_RUN for v in out)


def test_budget_rule_undecided_is_not_not_reproduced():
    """A reference that ends less than 1 bpc under the unigram entropy leaves its claim undecided; the same
    curves shifted 1 bpc lower decide it (here: reproduced)."""
    def runs(floor):
        return [rec("postln", 64, c=curve(5.0, 0.05, 100, floor=5.0)),  # stays at the unigram: fails
                rec("rezero", 64, c=curve(5.0, 0.05, 100, floor=floor)),
                rec("deepnorm", 64, c=curve(5.0, 0.05, 100, floor=floor)),
                rec("preln", 64, c=curve(5.0, 0.05, 100, floor=floor)),
                rec("admin", 64, c=curve(5.0, 0.05, 100, floor=floor))]
    short = V.Evidence(runs(UNIGRAM - 0.8), unigram_bits=UNIGRAM)  # trained, but only 0.8 below
    for claim in (V.rz3, V.dn1, V.ad1):
        v = claim(short)
        assert v.status == V.UNDECIDED, (v.claim, v.measured)
        assert "budget" in v.measured
    assert V.rz3(short).details["budgets"] == {"64": 100}
    long = V.Evidence(runs(UNIGRAM - 1.2), unigram_bits=UNIGRAM)
    for claim in (V.rz3, V.dn1):
        assert claim(long).status == V.REPRODUCED, claim(long).measured
    # AD-1 is decided now: (b) holds, (c) does not (Admin equals pre-LN), so not reproduced
    assert V.ad1(long).status == V.NOT_REPRODUCED and "(parts decided: b, c)" in V.ad1(long).measured
    # a reference that diverged decides nothing either
    blown = runs(UNIGRAM - 1.2)
    blown[1] = rec("rezero", 64, status="diverged", c=[[1, 5.0], [2, math.nan]], val=math.nan)
    assert V.rz3(V.Evidence(blown, unigram_bits=UNIGRAM)).status == V.UNDECIDED


def test_claims_read_only_the_claim_rate():
    """Runs of the learning-rate sweep (other rates) do not enter a claim's seed groups."""
    runs = [rec("postln", 64, c=curve(5.0, 0.05, 100, floor=5.0)), rec("rezero", 64, c=curve(5.0, 0.05, 100))]
    runs += [{**rec("rezero", 64, c=curve(5.0, 0.05, 100, floor=5.0)), "lr": 1e-2}]
    ev = V.Evidence(runs, unigram_bits=UNIGRAM)
    assert len(ev.group("rezero", 64)) == 1 and len(ev.group("rezero", 64, lr=1e-2)) == 1
    assert V.rz3(ev).status == V.REPRODUCED


def test_qk1_lr_sensitivity_rule():
    def sweep(scheme, finals, depth=64):
        out = []
        for lr, val in finals.items():
            c = [[1, 8.0]] + [[t, val if math.isfinite(val) else 5.0] for t in range(2, 30)]
            out.append({**rec(scheme, depth, c=c, val=val, steps=29), "lr": lr,
                        "status": "ok" if math.isfinite(val) else "diverged"})
        return out

    lrs = (1e-3, 3e-3, 1e-2)
    runs = sweep("preln", dict(zip(lrs, (3.0, 3.2, math.nan)))) + sweep("qknorm", dict(zip(lrs, (3.0, 3.1, 3.3))))
    v = V.qk1(V.Evidence(runs, unigram_bits=UNIGRAM))
    # pre-LN: (0 + 0.2 + 5.0) / 3 = 1.73; qk-norm: (0 + 0.1 + 0.3) / 3 = 0.13
    assert v.status == V.REPRODUCED, v.measured
    runs = sweep("preln", dict(zip(lrs, (3.0, 3.2, 3.4)))) + sweep("qknorm", dict(zip(lrs, (3.0, 3.2, 3.4))))
    assert V.qk1(V.Evidence(runs, unigram_bits=UNIGRAM)).status == V.NOT_REPRODUCED
    flat = sweep("preln", dict(zip(lrs, (3.0, 3.05, 3.1)))) + sweep("qknorm", dict(zip(lrs, (3.0, 3.0, 3.0))))
    assert V.qk1(V.Evidence(flat, unigram_bits=UNIGRAM)).status == V.UNDECIDED  # nothing unstable to remove
    assert V.qk1(V.Evidence(runs[:3], unigram_bits=UNIGRAM)).status == V.NOT_RUN
    # swept at two depths: both decide, and the report's budget line names both
    runs += [{**r, "steps": 40} for r in sweep("preln", dict(zip(lrs, (3.0, 3.2, 3.4))), depth=12)
             + sweep("qknorm", dict(zip(lrs, (3.0, 3.2, 3.4))), depth=12)]
    ev = V.Evidence(runs, unigram_bits=UNIGRAM)
    v = V.qk1(ev)
    assert v.details["depths"] == [12, 64] and v.measured.startswith("12L: ") and "; 64L: " in v.measured
    assert _budget_line(ev, v) == "40 steps at 12 layers, 29 steps at 64 layers"


def test_ad1_b_is_decided_by_pre_ln_s_budget():
    """Admin stuck at the unigram entropy where pre-LN trained at the same budget is a failed (b), not an
    undecided one; without a pre-LN run at 64 layers Admin is its own reference and (b) stays undecided."""
    stuck = curve(5.0, 0.05, 100, floor=UNIGRAM + 0.1)
    runs = [rec("postln", 64, c=curve(5.0, 0.05, 100, floor=5.0)), rec("admin", 64, c=stuck),
            rec("preln", 64, c=curve(5.0, 0.05, 100, floor=UNIGRAM - 1.5))]
    v = V.ad1(V.Evidence(runs, unigram_bits=UNIGRAM))
    assert v.status == V.NOT_REPRODUCED and v.details["parts"] == {"b": False}, v.measured
    assert "Admin trained in 0 of 1 seeds (fails)" in v.measured  # the measured line says which part failed
    v = V.ad1(V.Evidence(runs[:2], unigram_bits=UNIGRAM))
    assert v.status == V.UNDECIDED and "(b) undecided: admin" in v.measured
