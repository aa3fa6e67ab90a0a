"""The rules that turn the study's measurements into verdicts, fixed before any run.

Each claim of ``docs/study.md`` (RZ-1..3, AD-1..2, DN-1, NR-2, HC-2) is one function from the
measurements to a :class:`Verdict` whose status is one of

- ``reproduced``: the stated rule holds;
- ``not reproduced at this scale``: the runs finished and the rule does not hold (or the gap is inside
  seed noise where the rule asks for a difference);
- ``failed to run``: a run the rule needs crashed (divergence is *not* a crash: it is a measurement);
- ``not run``: the study did not include the runs the rule needs (e.g. ``--quick``);
- ``undecided: budget too small``: the claim's reference scheme did not end at least
  ``DECIDE_MARGIN_BPC`` below the unigram entropy at that depth, so the runs were too short to say
  anything about training at depth (never reported as "not reproduced").

Shared definitions (docs/study.md, "Definitions"):

- EMA: exponential moving average of the per-step train bpc, ``e_t = 0.9 e_{t-1} + 0.1 b_t``, ``e_0 = b_0``.
- *Failed to train*: the run diverged (NaN/Inf), or its final EMA train bpc is at or above
  ``unigram - 0.15`` (it has learned little more than byte frequencies).
- *Steps-to-X*: first step whose EMA train bpc is at or below ``X``; ``X`` is the reference scheme's
  seed-mean EMA bpc at half its budget, fixed once per comparison.
- *Noise*: a difference of seed means counts only if it exceeds twice the larger seed standard
  deviation (sample std). With one seed the std is unknown and ``SINGLE_SEED_NOISE`` is used instead.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from anydepth.study.sweep import BASE_LR, SCHEMES, final_val  # BASE_LR: the claim runs' rate

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced at this scale"
FAILED = "failed to run"
NOT_RUN = "not run"
UNDECIDED = "undecided: budget too small"
STATUSES = (REPRODUCED, NOT_REPRODUCED, FAILED, NOT_RUN, UNDECIDED)

OUTPUT_CHANGE_SIGMA = 0.05  # relative weight perturbation of AD-2 (anydepth.study.output_change.measure)
DECIDE_MARGIN_BPC = 1.0  # a claim is decided only if its reference ended this far below the unigram entropy

EMA_DECAY = 0.9
FAIL_MARGIN_BPC = 0.15  # "failed to train": final EMA within this of the unigram entropy
SINGLE_SEED_NOISE = 0.10  # bpc; stands for "2 x seed std" when only one seed was run (std ~0.05 assumed)
CHANCE_FC = math.log(10.0)  # cross-entropy of guessing among the teacher's 10 classes


@dataclass
class Verdict:
    """One claim's outcome: the paper's number, what was measured, and the rule's decision."""

    claim: str  # id in docs/study.md, e.g. "RZ-2"
    title: str
    paper: str  # what the paper reports
    rule: str  # the rule, as fixed before the run
    status: str  # one of STATUSES
    measured: str = ""  # what this study measured, in words
    details: dict[str, Any] = field(default_factory=dict)  # the numbers behind ``measured``

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("claim", "title", "paper", "rule", "status", "measured", "details")}


def ema(values: list[float], decay: float = EMA_DECAY) -> list[float]:
    """EMA of ``values``; once a value is NaN every later value is NaN (a blown-up run stays blown up)."""
    out: list[float] = []
    e = math.nan
    for i, v in enumerate(values):
        v = math.nan if v is None else float(v)
        e = v if i == 0 else decay * e + (1 - decay) * v
        out.append(e)
    return out


def steps_to(curve: list[list[float]], target: float) -> float:
    """First step whose EMA train bpc is ``<= target``; ``inf`` if never."""
    smoothed = ema([b for _, b in curve])
    for (step, _), e in zip(curve, smoothed):
        if e <= target:
            return float(step)
    return math.inf


def final_ema(record: dict[str, Any]) -> float:
    curve = record.get("curve") or []
    return ema([b for _, b in curve])[-1] if curve else math.nan


def ema_at(record: dict[str, Any], step: int) -> float:
    """EMA train bpc at the last logged step ``<= step``."""
    curve = record.get("curve") or []
    smoothed = ema([b for _, b in curve])
    value = math.nan
    for (s, _), e in zip(curve, smoothed):
        if s > step:
            break
        value = e
    return value


def trained(record: dict[str, Any], unigram: float) -> bool:
    """The "failed to train" rule, negated."""
    if record.get("status") != "ok":
        return False
    e = final_ema(record)
    return math.isfinite(e) and e < unigram - FAIL_MARGIN_BPC


def noise(*groups: list[float]) -> float:
    """Twice the larger sample std over the groups; ``SINGLE_SEED_NOISE`` if any group has one value."""
    if any(len(g) < 2 for g in groups):
        return SINGLE_SEED_NOISE
    return 2 * max(statistics.stdev(g) for g in groups)


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values and all(math.isfinite(v) for v in values) else math.nan


def lr_sensitivity(final: dict[float, float], init: dict[float, float] | float) -> float:
    """LR sensitivity (Wortsman et al. 2023, arXiv 2309.14322, Sec. 3.2): ``E_lr[min(final[lr], init[lr]) - best]``
    with ``best = min_lr min(final[lr], init[lr])``; non-finite finals count as ``init``."""
    if not final:
        raise ValueError("final is empty: LR sensitivity needs at least one learning rate")
    inits = init if isinstance(init, dict) else {lr: float(init) for lr in final}
    capped = {lr: min(v, inits[lr]) if math.isfinite(v) else inits[lr] for lr, v in final.items()}
    best = min(capped.values())
    return sum(c - best for c in capped.values()) / len(capped)


def init_bpc(record: dict[str, Any], vocab_size: int = 256) -> float:
    """The bpc before the first update (the first logged train bpc), else the uniform ``log2(vocab)``."""
    curve = record.get("curve") or []
    if curve and curve[0][0] <= 1 and curve[0][1] is not None and math.isfinite(curve[0][1]):
        return float(curve[0][1])
    return math.log2(vocab_size)


def sweep_table(ev: Evidence) -> dict[int, dict[str, dict[str, Any]]]:
    """``{depth: {scheme: {"final": {lr: bpc}, "trained": [lrs], "best_lr", "best", "sensitivity"}}}``
    for every (scheme, depth) run at two or more rates (first seed of each rate)."""
    table: dict[int, dict[str, dict[str, Any]]] = {}
    for depth in ev.depths():
        for scheme in SCHEMES:
            runs: dict[float, dict[str, Any]] = {}
            for r in ev.runs:
                if r["scheme"] == scheme and r["depth"] == depth:
                    lr = float(r.get("lr", BASE_LR))
                    if lr not in runs or r["seed"] < runs[lr]["seed"]:
                        runs[lr] = r
            if len(runs) < 2:
                continue
            final = {lr: final_val(r) if r.get("status") == "ok" else math.nan for lr, r in sorted(runs.items())}
            init = {lr: init_bpc(r) for lr, r in runs.items()}
            ok = [lr for lr, r in sorted(runs.items()) if trained(r, ev.unigram)]
            finite = {lr: v for lr, v in final.items() if math.isfinite(v) and lr in ok}
            best_lr = min(finite, key=finite.get) if finite else None
            table.setdefault(depth, {})[scheme] = {
                "final": final,
                "trained": ok,
                "best_lr": best_lr,
                "best": finite.get(best_lr, math.nan) if best_lr is not None else math.nan,
                "sensitivity": lr_sensitivity(final, init),
            }
    return table


class Evidence:
    """Everything the rules read: run records, the unigram entropy, FC curves, output changes."""

    def __init__(
        self,
        runs: list[dict[str, Any]],
        *,
        unigram_bits: float,
        fc: dict[str, dict[str, list[float]]] | None = None,
        output_change: dict[str, dict[str, float]] | None = None,
    ):
        self.runs = runs
        self.unigram = float(unigram_bits)
        self.fc = fc or {}
        self.oc = output_change or {}

    def group(self, scheme: str, depth: int, lr: float = BASE_LR) -> list[dict[str, Any]]:
        """The runs of ``scheme`` at ``depth`` and learning rate ``lr`` (the claim runs by default)."""
        return sorted(
            (
                r
                for r in self.runs
                if r["scheme"] == scheme and r["depth"] == depth and math.isclose(r.get("lr", BASE_LR), lr)
            ),
            key=lambda r: r["seed"],
        )

    def budget(self, depth: int) -> int | None:
        """Steps per run at ``depth`` (equal for every run there), or None without runs."""
        steps = [r["steps"] for r in self.runs if r["depth"] == depth and "steps" in r]
        return max(steps) if steps else None

    def batch(self, depth: int) -> int | None:
        """Sequences per step at ``depth`` (equal for every run there), or None without runs."""
        sizes = [r["batch_size"] for r in self.runs if r["depth"] == depth and "batch_size" in r]
        return max(sizes) if sizes else None

    def reached(self, scheme: str, depth: int) -> bool:
        """Whether ``scheme``'s seed-mean final val bpc at ``depth`` is ``DECIDE_MARGIN_BPC`` under the unigram
        entropy: the runs were long enough to say something about training at that depth."""
        return mean(self.vals(scheme, depth)) <= self.unigram - DECIDE_MARGIN_BPC  # NaN (diverged) is False

    def undecided(self, v: Verdict, scheme: str, depth: int) -> Verdict | None:
        """``v`` marked undecided if ``scheme`` (the claim's reference) did not end at least
        ``DECIDE_MARGIN_BPC`` below the unigram entropy at ``depth`` (final val bpc, seed mean)."""
        ref = mean(self.vals(scheme, depth))
        v.details.setdefault("budgets", {})[str(depth)] = self.budget(depth)
        v.details.setdefault("reference", {})[f"{scheme}-L{depth}"] = ref
        if self.reached(scheme, depth):
            return None
        v.status = UNDECIDED
        others = sorted(
            (s, mean(self.vals(s, depth)))
            for s in {r["scheme"] for r in self.runs if r["depth"] == depth and r["scheme"] != scheme}
            if self.reached(s, depth)
        )
        v.measured = (
            f"reference {scheme} at {depth} layers ended at {_fmt(ref)} val bpc after {self.budget(depth)} steps, "
            f"not {DECIDE_MARGIN_BPC:.1f} below the unigram entropy {self.unigram:.3f}: the budget is too small "
            "to decide"
            + (f" (at the same budget {', '.join(f'{s} {_fmt(x)}' for s, x in others)} did get there)" if others
               else "")
        )
        return v

    def missing(self, cells: list[tuple[str, int]]) -> tuple[list[str], list[str]]:
        """``(not_run, crashed)`` among ``cells``: run ids the study lacks, and ones that errored."""
        not_run = [f"{s}-L{d}" for s, d in cells if not self.group(s, d)]
        crashed = [r["run_id"] for s, d in cells for r in self.group(s, d) if r.get("status") == "error"]
        return not_run, crashed

    def all_trained(self, scheme: str, depth: int) -> bool:
        return all(trained(r, self.unigram) for r in self.group(scheme, depth))

    def none_trained(self, scheme: str, depth: int) -> bool:
        return not any(trained(r, self.unigram) for r in self.group(scheme, depth))

    def vals(self, scheme: str, depth: int) -> list[float]:
        return [final_val(r) for r in self.group(scheme, depth)]

    def emas(self, scheme: str, depth: int) -> list[float]:
        return [final_ema(r) for r in self.group(scheme, depth)]

    def depths(self) -> list[int]:
        return sorted({r["depth"] for r in self.runs})


def _precheck(ev: Evidence, cells: list[tuple[str, int]], v: Verdict) -> Verdict | None:
    not_run, crashed = ev.missing(cells)
    if crashed:
        v.status, v.measured = FAILED, f"run(s) crashed: {', '.join(crashed)}"
        return v
    if not_run:
        v.status, v.measured = NOT_RUN, f"needs runs not in this study: {', '.join(not_run)}"
        return v
    return None


def _seeds_trained(ev: Evidence, scheme: str, depth: int) -> str:
    """``"k of n"``: the seeds of ``scheme`` at ``depth`` (claim rate) that trained."""
    group = ev.group(scheme, depth)
    return f"{sum(trained(r, ev.unigram) for r in group)} of {len(group)}"


def _holds(ok: bool) -> str:
    return "holds" if ok else "fails"


def _fmt(x: float) -> str:
    return "inf" if x == math.inf else ("n/a" if not math.isfinite(x) else f"{x:.3f}")


def _steps(x: float) -> str:
    """A step count: seed means can be fractional; ``never`` when the target was not reached."""
    if x == math.inf:
        return "never"
    return "n/a" if not math.isfinite(x) else (f"{x:.0f}" if x == int(x) else f"{x:.1f}")


# ------------------------------------------------------------------------------------------------------
# RZ-1: deep fully connected networks


def rz1(ev: Evidence) -> Verdict:
    v = Verdict(
        claim="RZ-1",
        title="ReZero trains deep fully connected networks much faster",
        paper="64L width-256 FC on CIFAR-10, 5,000 Adagrad steps: final train loss ReZero 0.52, "
        "Residual 1.87, Vanilla 2.02, LayerNorm 2.02; '1,500% faster'.",
        rule="At every FC depth: (a) ReZero's EMA loss reaches 1.0 within 1/4 of the steps of the best other "
        "variant (a variant that never reaches it counts as needing more than the budget); (c) ReZero's "
        "final EMA loss <= 0.5x the best other's. At 64 layers also (b) Vanilla and Residual each exceed "
        "10x chance (23.0) in the first 100 steps or end at EMA loss >= 1.8; at 1,000 layers and more instead (d) "
        "ReZero's final EMA loss is at most half of chance (1.15) and no other variant's is.",
        status=NOT_RUN,
    )
    if not ev.fc:
        v.measured = "the fully connected experiment was not run"
        return v
    holds, lines, details = [], [], {}
    for depth, curves in sorted(ev.fc.items(), key=lambda kv: int(kv[0])):
        budget = max(len(c) for c in curves.values())
        finals = {k: (ema(c)[-1] if c and math.isfinite(ema(c)[-1]) else math.inf) for k, c in curves.items()}
        reach = {k: steps_to([[i + 1, x] for i, x in enumerate(c)], 1.0) for k, c in curves.items()}
        others = [k for k in curves if k != "rezero"]
        best_steps = min(reach[k] for k in others)
        best_final = min(finals[k] for k in others)
        a = math.isfinite(reach["rezero"]) and 4 * reach["rezero"] <= min(best_steps, budget)
        c = finals["rezero"] <= 0.5 * best_final
        holds += [a, c]
        line = (
            f"L={depth}: steps to loss 1.0: ReZero {_steps(reach['rezero'])}, best other {_steps(best_steps)} "
            f"(budget {budget}); final EMA loss ReZero {_fmt(finals['rezero'])}, best other "
            f"{_fmt(best_final)}; (a) {'holds' if a else 'fails'}, (c) {'holds' if c else 'fails'}"
        )
        if int(depth) >= 1000:
            # the ReZero tutorial's 10,000 layers: only ReZero gets below half of chance
            d = finals["rezero"] <= CHANCE_FC / 2 and all(finals[k] > CHANCE_FC / 2 for k in others)
            holds.append(d)
            half = f"{CHANCE_FC / 2:.2f}"
            line += f", (d) only ReZero ends at or below half of chance ({half}): {'holds' if d else 'fails'}"
        elif int(depth) >= 64:
            b = all(
                any(not math.isfinite(x) or x > 10 * CHANCE_FC for x in curves[k][:100]) or finals[k] >= 1.8
                for k in ("vanilla", "residual")
            )
            holds.append(b)
            line += f", (b) {'holds' if b else 'fails'}"
        lines.append(line)
        details[depth] = {"steps_to_1": reach, "final_ema": finals, "budget": budget}
    v.status = REPRODUCED if all(holds) else NOT_REPRODUCED
    v.measured = "; ".join(lines)
    v.details = details
    return v


# ------------------------------------------------------------------------------------------------------
# RZ-2: 12-layer ReZero against post-LN


def rz2(ev: Evidence, depth: int = 12) -> Verdict:
    v = Verdict(
        claim="RZ-2",
        title=f"{depth}-layer ReZero converges faster than post-LN with warm-up",
        paper="12L enwik8: ReZero reaches 1.2 BPB in 8,800 iterations, post-LN + warm-up in 13,690 (0.64x, "
        "'56% faster'); pre-LN is slower (17,765); post-LN without warm-up diverges.",
        rule="X = the post-LN + warm-up seed-mean EMA bpc at half budget. Reproduced if ReZero's seed-mean "
        "steps-to-X <= 0.7x the reference's and pre-LN's is not below 0.9x the reference's.",
        status=NOT_RUN,
    )
    cells = [("postln-warmup", depth), ("rezero", depth), ("preln", depth)]
    if _precheck(ev, cells, v) or ev.undecided(v, "postln-warmup", depth):
        return v
    ref = ev.group("postln-warmup", depth)
    half = ref[0]["steps"] // 2
    x = mean([ema_at(r, half) for r in ref])
    if not math.isfinite(x):
        v.status = NOT_REPRODUCED
        v.measured = "the reference (post-LN + warm-up) has no finite bpc at half budget"
        return v
    steps = {s: mean([steps_to(r["curve"], x) for r in ev.group(s, depth)]) for s, _ in cells}
    steps = {k: (math.inf if math.isnan(val) else val) for k, val in steps.items()}
    ratio = steps["rezero"] / steps["postln-warmup"] if math.isfinite(steps["postln-warmup"]) else math.nan
    ok_rz = math.isfinite(steps["rezero"]) and steps["rezero"] <= 0.7 * steps["postln-warmup"]
    ok_pre = steps["preln"] >= 0.9 * steps["postln-warmup"]
    v.status = REPRODUCED if ok_rz and ok_pre else NOT_REPRODUCED
    v.measured = (
        f"X = {x:.3f} bpc; steps-to-X: post-LN + warm-up {_steps(steps['postln-warmup'])}, ReZero "
        f"{_steps(steps['rezero'])} (ratio {_fmt(ratio)}), pre-LN {_steps(steps['preln'])}"
    )
    v.details = {"target_bpc": x, "steps_to_target": steps, "rezero_ratio": ratio}
    return v


def rz2b(ev: Evidence, depth: int = 12) -> Verdict:
    v = Verdict(
        claim="RZ-2b",
        title=f"{depth}-layer post-LN without warm-up is the worst and ReZero much better",
        paper="ReZero notebook (WikiText-2, 12L): post-LN stays near the unigram (val ppl 845) while ReZero "
        "reaches 200; paper: post-LN without warm-up diverges.",
        rule="Plain post-LN has the highest seed-mean final EMA train bpc of the 12-layer schemes run, and "
        "ends >= 1 bpc above ReZero.",
        status=NOT_RUN,
    )
    if _precheck(ev, [("postln", depth), ("rezero", depth)], v) or ev.undecided(v, "rezero", depth):
        return v
    present = [s for s in ("postln", "postln-warmup", "preln", "rezero") if ev.group(s, depth)]
    finals = {s: mean(ev.emas(s, depth)) for s in present}
    finals = {s: (math.inf if math.isnan(x) else x) for s, x in finals.items()}
    worst = finals["postln"] >= max(finals.values())
    gap = finals["postln"] - finals["rezero"]
    v.status = REPRODUCED if worst and gap >= 1.0 else NOT_REPRODUCED
    v.measured = "final EMA train bpc: " + ", ".join(f"{s} {_fmt(x)}" for s, x in finals.items())
    v.details = {"final_ema": finals, "gap_postln_minus_rezero": gap}
    return v


# ------------------------------------------------------------------------------------------------------
# RZ-3, DN-1, AD-1: trainability at depth


def rz3(ev: Evidence, depth: int = 64) -> Verdict:
    v = Verdict(
        claim="RZ-3",
        title=f"At {depth} layers post-LN without warm-up fails and ReZero trains",
        paper="ReZero trains 64- and 128-layer Transformers ([U] test BPB ~1.11 / 1.08) where post-LN "
        "diverges.",
        rule="Post-LN (no warm-up) fails to train in every seed, and ReZero trains in every seed with a "
        "seed-mean final EMA bpc at least 0.5 below the unigram entropy.",
        status=NOT_RUN,
    )
    if _precheck(ev, [("postln", depth), ("rezero", depth)], v) or ev.undecided(v, "rezero", depth):
        return v
    rz = mean(ev.emas("rezero", depth))
    post_fails = ev.none_trained("postln", depth)
    rz_ok = ev.all_trained("rezero", depth) and rz <= ev.unigram - 0.5
    v.status = REPRODUCED if post_fails and rz_ok else NOT_REPRODUCED
    v.measured = (
        f"post-LN final EMA bpc {', '.join(_fmt(x) for x in ev.emas('postln', depth))} "
        f"({'failed' if post_fails else 'trained'}); ReZero {_fmt(rz)} vs unigram {ev.unigram:.3f}"
    )
    v.details = {"postln_fails": post_fails, "rezero_final_ema": rz, "unigram_bits": ev.unigram}
    return v


def dn1(ev: Evidence) -> Verdict:
    v = Verdict(
        claim="DN-1",
        title="DeepNorm trains at depth where post-LN fails",
        paper="DeepNet: 1,000-layer post-LN-style models train with x_{l+1} = LN(alpha x_l + G(x_l)), "
        "alpha = (2M)^(1/4), beta = (8M)^(-1/4) for decoder-only; post-LN diverges at 50L+.",
        rule="At 64 layers: post-LN (no warm-up) fails in every seed, DeepNorm trains in every seed and its "
        "seed-mean final val bpc is <= pre-LN's + 0.15. At 12 layers (if run): DeepNorm within 0.05 bpc "
        "of both post-LN and pre-LN.",
        status=NOT_RUN,
    )
    if _precheck(ev, [("postln", 64), ("deepnorm", 64), ("preln", 64)], v) or ev.undecided(v, "deepnorm", 64):
        return v
    dn, pre = mean(ev.vals("deepnorm", 64)), mean(ev.vals("preln", 64))
    post_failed = ev.none_trained("postln", 64)
    ok64 = post_failed and ev.all_trained("deepnorm", 64) and dn <= pre + 0.15
    # the seed counts and each part's outcome, so that a reader sees which condition decided
    measured = (
        f"64L: post-LN {'failed' if post_failed else 'trained'}, DeepNorm trained in "
        f"{_seeds_trained(ev, 'deepnorm', 64)} seeds, val {_fmt(dn)} vs pre-LN {_fmt(pre)} ({_holds(ok64)})"
    )
    ok12 = True
    if all(ev.group(s, 12) for s in ("deepnorm", "postln", "preln")):
        d12 = mean(ev.vals("deepnorm", 12))
        ok12 = all(abs(d12 - mean(ev.vals(s, 12))) <= 0.05 for s in ("postln", "preln"))
        measured += (
            f"; 12L: DeepNorm {_fmt(d12)}, post-LN {_fmt(mean(ev.vals('postln', 12)))}, "
            f"pre-LN {_fmt(mean(ev.vals('preln', 12)))} ({_holds(ok12)})"
        )
    else:
        measured += "; 12L part not run"
    v.status = REPRODUCED if ok64 and ok12 else NOT_REPRODUCED
    v.measured = measured
    v.details = {"deepnorm_64_val": dn, "preln_64_val": pre}
    return v


def ad1(ev: Evidence) -> Verdict:
    v = Verdict(
        claim="AD-1",
        title="Admin keeps post-LN trainable at depth and matches or beats pre-LN",
        paper="WMT14 En-De BLEU 6L/12L/18L: post-LN 27.80/failed/failed, pre-LN 27.27/28.26/28.38, "
        "Admin 27.90/28.58/29.03.",
        rule="(a) At 12 layers post-LN + warm-up, pre-LN and Admin all train and post-LN's seed-mean val "
        "bpc <= pre-LN's. (b) At 64 layers post-LN (with warm-up if run, else without) fails or ends >= 0.3 "
        "bpc above Admin, which trains; decided when pre-LN at 64 layers (else Admin) reached the budget bar. "
        "(c) Wherever Admin and pre-LN both train, Admin's val bpc is below "
        "pre-LN's by more than the noise; a gap inside noise is 'not reproduced at this scale'.",
        status=NOT_RUN,
    )
    parts: dict[str, bool] = {}
    lines: list[str] = []
    crashed_all: list[str] = []
    cells_a = [("postln-warmup", 12), ("preln", 12), ("admin", 12)]
    not_run, crashed = ev.missing(cells_a)
    crashed_all += crashed
    undecided_parts = []
    if not not_run and not crashed and not ev.reached("preln", 12):
        undecided_parts.append("a")
        lines.append(f"(a) undecided: pre-LN at 12 layers ended above unigram - {DECIDE_MARGIN_BPC:.1f}")
    elif not not_run and not crashed:
        trains = all(ev.all_trained(s, 12) for s, _ in cells_a)
        post, pre = mean(ev.vals("postln-warmup", 12)), mean(ev.vals("preln", 12))
        parts["a"] = trains and post <= pre
        seeds = ", ".join(f"{s} {_seeds_trained(ev, s, 12)}" for s, _ in cells_a)
        lines.append(f"(a) 12L seeds trained: {seeds}; val post-LN+wu {_fmt(post)} vs pre-LN {_fmt(pre)} "
                     f"({_holds(parts['a'])})")
    else:
        lines.append("(a) not run")
    post64 = "postln-warmup" if ev.group("postln-warmup", 64) else "postln"
    not_run, crashed = ev.missing([(post64, 64), ("admin", 64)])
    crashed_all += crashed
    # The budget reference at 64 layers is pre-LN where it ran (a scheme that trains at any depth at this
    # rate): if pre-LN got there, the budget sufficed and an Admin that did not is a failed claim, not an
    # undecided one. Without a pre-LN run, Admin itself is the reference.
    ref64 = "preln" if ev.group("preln", 64) else "admin"
    if not not_run and not crashed and not ev.reached(ref64, 64):
        undecided_parts.append("b")
        lines.append(f"(b) undecided: {ref64} at 64 layers ended above unigram - "
                     f"{DECIDE_MARGIN_BPC:.1f}")
    elif not not_run and not crashed:
        adm = mean(ev.emas("admin", 64))
        post = mean(ev.emas(post64, 64))
        post_bad = ev.none_trained(post64, 64) or not math.isfinite(post) or post >= adm + 0.3
        parts["b"] = ev.all_trained("admin", 64) and post_bad
        lines.append(f"(b) 64L {post64} final EMA {_fmt(post)} vs Admin {_fmt(adm)}, Admin trained in "
                     f"{_seeds_trained(ev, 'admin', 64)} seeds ({_holds(parts['b'])})")
    else:
        lines.append("(b) not run")
    c_results = []
    for d in ev.depths():
        if ev.group("admin", d) and ev.group("preln", d) and ev.all_trained("admin", d) and ev.all_trained(
            "preln", d
        ):
            a, p = ev.vals("admin", d), ev.vals("preln", d)
            if not ev.reached("preln", d):
                undecided_parts.append("c")
                lines.append(f"(c) {d}L undecided: pre-LN ended above unigram - {DECIDE_MARGIN_BPC:.1f}")
                continue
            n = noise(a, p)
            c_results.append(mean(p) - mean(a) > n)
            lines.append(f"(c) {d}L val Admin {_fmt(mean(a))} vs pre-LN {_fmt(mean(p))}, noise {n:.3f} "
                         f"({_holds(c_results[-1])})")
    if c_results:
        parts["c"] = all(c_results)
    if crashed_all:
        v.status, v.measured = FAILED, f"run(s) crashed: {', '.join(crashed_all)}"
        return v
    if not parts and undecided_parts:
        v.status, v.measured = UNDECIDED, "; ".join(lines) + f" (budget: {ev.budget(64)} steps at 64 layers)"
        return v
    if not parts:
        v.measured = "needs Admin, pre-LN and post-LN runs at 12 or 64 layers"
        return v
    v.status = REPRODUCED if all(parts.values()) else NOT_REPRODUCED
    v.measured = "; ".join(lines) + (f" (parts decided: {', '.join(sorted(parts))})")
    v.details = {"parts": parts}
    return v


# ------------------------------------------------------------------------------------------------------
# AD-2: output change at init


def loglog_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x (1 = linear growth, 0 = constant)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / den


def ad2(ev: Evidence) -> Verdict:
    from anydepth.study.output_change import theory_linear_chain

    v = Verdict(
        claim="AD-2",
        title="Output change at init grows O(N) for post-LN, O(log N) for Admin",
        paper="Admin (Liu et al. 2020, Sec. 4, Thm. 2, Fig. 4): the output change under a perturbation of the "
        "residual branches grows linearly with the number of sublayers for post-LN and logarithmically for "
        "pre-LN and Admin.",
        rule="Relative change of the final hidden state when every branch weight matrix is perturbed by "
        "N(0, (0.05 rms(W))^2). The exact construction (linear branches with LayerNorm) must match its "
        "closed form within 20% at every depth, else the measurement is broken (failed to run). On Model S, "
        "log-log slope against depth: post-LN >= 0.7 (about linear); Admin <= 0.6 and at least 0.3 below "
        "post-LN (clearly sub-linear).",
        status=NOT_RUN,
    )
    needed = ("postln", "admin", "preln")
    if not all(ev.oc.get(s) for s in needed):
        v.measured = "the output-change measurement was not run for post-LN, Admin and pre-LN"
        return v
    depths = sorted(int(d) for d in ev.oc["postln"])
    values = {s: [ev.oc[s][str(d)] for d in depths] for s in needed}
    if len(depths) < 2 or not all(math.isfinite(x) and x > 0 for vals in values.values() for x in vals):
        v.status, v.measured = FAILED, "needs a positive finite output change at two or more depths"
        return v
    chain = {}
    for s in needed:
        got = ev.oc.get(f"chain-{s}")
        if got:
            chain[s] = [got[str(d)] / theory_linear_chain(s, d, OUTPUT_CHANGE_SIGMA) for d in depths]
    off = [f"{s} {r:.2f}x" for s, rs in chain.items() for r in rs if not 0.8 <= r <= 1.2]
    if not chain or off:
        v.status = FAILED
        v.measured = "the exact construction does not match its closed form: " + (", ".join(off) or "not measured")
        return v
    slopes = {s: loglog_slope(depths, values[s]) for s in needed}
    ok = slopes["postln"] >= 0.7 and slopes["admin"] <= 0.6 and slopes["admin"] <= slopes["postln"] - 0.3
    v.status = REPRODUCED if ok else NOT_REPRODUCED
    v.measured = (
        f"depths {', '.join(map(str, depths))}; log-log slopes: "
        + ", ".join(f"{s} {slopes[s]:.2f}" for s in needed)
        + f"; at L={depths[-1]}: "
        + ", ".join(f"{s} {values[s][-1]:.3g}" for s in needed)
        + "; exact construction / closed form: "
        + ", ".join(f"{s} {min(r):.2f}-{max(r):.2f}" for s, r in chain.items())
    )
    v.details = {"slopes": slopes, "depths": depths, "values": values, "chain_over_theory": chain}
    return v


# ------------------------------------------------------------------------------------------------------
# NR-2 and HC-2: at the shallowest depth run


def nr2(ev: Evidence) -> Verdict:
    d = min(ev.depths(), default=12)
    v = Verdict(
        claim="NR-2",
        title="RMSNorm matches LayerNorm quality and is not slower",
        paper="RMSNorm: 7%-64% less running time than LayerNorm (6.9% on a Transformer), same BLEU "
        "(26.8 vs 26.6); pRMSNorm with p = 6.25% similar.",
        rule=f"At {d} layers (pre-LN): RMSNorm's seed-mean tokens/s >= LayerNorm's; |val bpc difference| "
        "<= 0.02 or inside noise; partial RMSNorm within 0.05 bpc of LayerNorm.",
        status=NOT_RUN,
    )
    if _precheck(ev, [("preln", d), ("rms", d), ("prms", d)], v) or ev.undecided(v, "preln", d):
        return v
    ln, rms, prms = ev.vals("preln", d), ev.vals("rms", d), ev.vals("prms", d)
    speed = {s: mean([r.get("tokens_per_s") or math.nan for r in ev.group(s, d)]) for s in ("preln", "rms")}
    fast = speed["rms"] >= speed["preln"]
    diff = abs(mean(rms) - mean(ln))
    same = diff <= 0.02 or diff <= noise(ln, rms)
    close = abs(mean(prms) - mean(ln)) <= 0.05
    v.status = REPRODUCED if fast and same and close else NOT_REPRODUCED
    v.measured = (
        f"tokens/s LayerNorm {speed['preln']:,.0f}, RMSNorm {speed['rms']:,.0f} "
        f"({speed['rms'] / speed['preln'] - 1:+.1%}); val bpc LayerNorm "
        f"{_fmt(mean(ln))}, RMSNorm {_fmt(mean(rms))}, partial {_fmt(mean(prms))}"
    )
    v.details = {"tokens_per_s": speed, "val": {"preln": ln, "rms": rms, "prms": prms}}
    return v


def hc2(ev: Evidence) -> Verdict:
    d = min(ev.depths(), default=12)
    v = Verdict(
        claim="HC-2",
        title="Hyper-connections (n = 4) beat the pre-LN baseline",
        paper="OLMo-1B, 500B tokens: DHCx4 val loss 2.781 vs 2.811 baseline (-1%); 1.8x faster on OLMoE.",
        rule=f"At {d} layers: hyper-connections n = 4 seed-mean val bpc below pre-LN's by more than the "
        "noise. (The DHCx1 / DHCx2 orderings of the paper are not part of this study.)",
        status=NOT_RUN,
    )
    if _precheck(ev, [("preln", d), ("hyper4", d)], v) or ev.undecided(v, "preln", d):
        return v
    base, hc = ev.vals("preln", d), ev.vals("hyper4", d)
    n = noise(base, hc)
    v.status = REPRODUCED if mean(base) - mean(hc) > n else NOT_REPRODUCED
    v.measured = f"val bpc pre-LN {_fmt(mean(base))}, hyper n=4 {_fmt(mean(hc))}, noise {n:.3f}"
    v.details = {"preln": base, "hyper4": hc, "noise": n}
    return v


def qk1(ev: Evidence) -> Verdict:
    v = Verdict(
        claim="QK-1",
        title="qk-LayerNorm lowers learning-rate sensitivity",
        paper="Wortsman et al. 2023 (Small-scale proxies, Fig. 1 and Sec. 3.1): without qk-layernorm, attention "
        "logits grow at high rates and the loss diverges; with it, LR sensitivity drops at every model size.",
        rule="At every depth where pre-LN and pre-LN + qk-LayerNorm were swept over the same rates: qk-norm's LR "
        f"sensitivity is at most 0.8x pre-LN's. Undecided where pre-LN's best rate did not end "
        f"{DECIDE_MARGIN_BPC:.0f} bpc under the unigram entropy, or where pre-LN's own sensitivity is under "
        "0.1 bpc (the grid found no unstable rate to remove).",
        status=NOT_RUN,
    )
    table = sweep_table(ev)
    depths = [d for d, t in table.items() if "preln" in t and "qknorm" in t
              and set(t["preln"]["final"]) == set(t["qknorm"]["final"])]
    if not depths:
        v.measured = "needs pre-LN and pre-LN + qk-norm swept over the same learning rates"
        return v
    holds, lines, undecided = [], [], []
    for d in depths:
        pre, qk = table[d]["preln"], table[d]["qknorm"]
        line = f"{d}L: sensitivity pre-LN {_fmt(pre['sensitivity'])}, qk-norm {_fmt(qk['sensitivity'])}"
        if not pre["best"] <= ev.unigram - DECIDE_MARGIN_BPC or pre["sensitivity"] < 0.1:
            undecided.append(d)
            lines.append(line + " (undecided)")
            continue
        holds.append(qk["sensitivity"] <= 0.8 * pre["sensitivity"])
        lines.append(line)
    v.measured = "; ".join(lines)
    v.details = {"depths": depths, "undecided": undecided}
    v.status = UNDECIDED if not holds else (REPRODUCED if all(holds) else NOT_REPRODUCED)
    return v


CLAIMS: tuple[Callable[[Evidence], Verdict], ...] = (rz1, rz2, rz2b, rz3, ad1, ad2, dn1, nr2, hc2, qk1)


def decide(ev: Evidence) -> list[Verdict]:
    """Every claim's verdict, in the order of docs/study.md."""
    return [claim(ev) for claim in CLAIMS]
