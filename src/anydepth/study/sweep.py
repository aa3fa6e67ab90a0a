"""What the depth study runs: residual schemes x depths x learning rates x seeds, one budget per depth.

A *scheme* is a named model preset plus the warm-up it trains with (post-LN is run both without and
with a linear warm-up over 10% of the steps, the reference of the ReZero paper's Table 2). A *run* is
one scheme at one depth, one learning rate and one seed. Every run at a given depth gets the same number
of steps, batch size and sequence length, so the comparison is at an equal token budget.

Two kinds of runs make a plan:

- the *claim runs*: every scheme the claims need at ``BASE_LR`` with every seed of the plan;
- the *learning-rate sweep* (Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer
  training instabilities", arXiv 2309.14322): each scheme at every rate of ``LR_GRID`` (half a decade
  apart, the same grid for every scheme at a depth), first seed only. A depth may instead *follow* a
  shallower one: each scheme then runs the best rate it had there and that rate's two grid neighbours.

The shared model is "Model S" of ``docs/study.md``: causal byte-level decoder, d_model 64, 4 heads,
feed-forward 256, learned positions, context 64, batch 16 (8 from 64 layers), Adam(0.9, 0.98) at a
constant rate.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, kw_only=True)
class Scheme:
    """One residual/normalisation scheme of the study."""

    label: str  # short name used in run ids, plots and the report
    preset: str  # name in ``anydepth.model.presets.PRESETS``
    warmup_frac: float = 0.0  # linear warm-up length as a fraction of the run's steps (0: none)
    overrides: dict[str, Any] = field(default_factory=dict)  # extra ModelConfig fields for the preset
    title: str = ""  # human-readable name for the report


SCHEMES: dict[str, Scheme] = {
    s.label: s
    for s in (
        Scheme(label="postln", preset="postnorm", title="Post-LN, no warm-up"),
        Scheme(label="postln-warmup", preset="postnorm", warmup_frac=0.1, title="Post-LN + 10% warm-up"),
        Scheme(label="preln", preset="prenorm", title="Pre-LN (LayerNorm)"),
        Scheme(label="rezero", preset="rezero", title="ReZero (shared alpha, no norms)"),
        Scheme(label="admin", preset="admin", title="Admin (post-LN, omega init)"),
        Scheme(label="deepnorm", preset="deepnorm", title="DeepNorm (post-LN, alpha/beta)"),
        Scheme(label="hyper4", preset="hyper", title="Hyper-connections, n = 4"),
        Scheme(label="rms", preset="rms", title="Pre-LN with RMSNorm"),
        Scheme(label="prms", preset="prms", title="Pre-LN with partial RMSNorm"),
        # the techniques the field adopted since 2023 (docs/design.md, "Beyond the five papers")
        Scheme(label="qknorm", preset="qk_norm", title="Pre-LN + qk-LayerNorm"),
        Scheme(label="periln", preset="periln", title="Peri-LN (sandwich)"),
        Scheme(label="dyt", preset="dyt", title="Pre-LN with DyT (no statistics)"),
        Scheme(label="lns", preset="layer_scaling", title="Pre-LN + LayerNorm Scaling"),
        Scheme(label="vres", preset="value_residual", title="Pre-LN + value residual"),
        Scheme(label="mhclite", preset="mhc_lite", title="mHC-lite, n = 4"),
        Scheme(label="dense", preset="denseformer", title="DenseFormer (pre-LN, DWA)"),
        Scheme(label="gpt2init", preset="depth_scaled", title="Pre-LN, 1/sqrt(2N) output init"),
        Scheme(label="zeroout", preset="zero_out", title="Pre-LN, zero output init"),
    )
}

# Model S. Its step on 2 idle CPU cores is dominated by per-layer overhead, not FLOPs: the measured
# times per depth are in docs/study.md ("Budgets and time"); the estimate printed before a study is
# calibrated on the machine that runs it (`anydepth.study.runner.calibrate`).
MODEL_S: dict[str, Any] = {"dim": 64, "heads": 4, "max_seq_len": 64, "vocab_size": 256}

BASE_LR = 1e-3  # the claim runs' rate: the ReZero paper's no-schedule comparison
# Half a decade apart, 1e-4 .. 10^-1.5: the top rates are where pre-LN without warm-up or clipping diverges.
LR_GRID: tuple[float, ...] = tuple(10 ** (-4 + k / 2) for k in range(6))


def lr_label(lr: float) -> str:
    """``1e-3``, ``3e-3``: a grid rate as people write it (10^-2.5 = 3.16e-3 is written 3e-3)."""
    exp = math.floor(math.log10(lr) + 1e-9)
    mant = lr / 10**exp
    return f"{round(mant):d}e{exp:d}"


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """One training run of the study: a scheme at a depth, a learning rate and a seed, with its budget."""

    scheme: str  # key of SCHEMES
    depth: int  # number of blocks
    seed: int  # model init and data order
    steps: int  # optimiser steps (equal for every scheme at this depth)
    batch_size: int = 16
    seq_len: int = 64
    lr: float = BASE_LR  # constant after warm-up

    @property
    def run_id(self) -> str:
        return f"{self.scheme}-L{self.depth}-lr{lr_label(self.lr)}-s{self.seed}"

    @property
    def warmup(self) -> int:
        return int(round(SCHEMES[self.scheme].warmup_frac * self.steps))

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "run_id": self.run_id, "warmup": self.warmup}


@dataclass(frozen=True, kw_only=True)
class Plan:
    """A study: claim runs, the learning-rate sweep, the seeds and the step budget per depth."""

    name: str  # "quick", "full" or "custom"
    cells: tuple[tuple[str, int], ...]  # (scheme, depth) claim runs, at BASE_LR with every seed
    seeds: tuple[int, ...]
    budgets: dict[int, int]  # depth -> steps
    batch_size: int = 16
    seq_len: int = 64
    # depth -> batch size where it is not ``batch_size`` (from 64 layers: half the batch,
    # so that a run costs half as much and the reference schemes still end 1 bpc under the unigram entropy)
    batch_sizes: dict[int, int] = field(default_factory=dict)
    # depth -> (schemes, rates) of the sweep (first seed): every scheme at one depth gets the same rates
    lr_sweep: dict[int, tuple[tuple[str, ...], tuple[float, ...]]] = field(default_factory=dict)
    # depth -> (schemes, source depth): each scheme runs its best rate at the source depth and the two
    # neighbouring grid rates, once the source depth's sweep has finished.
    lr_follow: dict[int, tuple[tuple[str, ...], int]] = field(default_factory=dict)
    fc_depths: tuple[int, ...] = (32, 64)  # ReZero paper's deep fully connected experiment
    fc_steps: int = 2000
    fc_width: int = 256
    fc_lr: float = 0.01  # Adagrad, as in the paper's notebook
    fc_layer_lr: float | None = None  # the hidden layers' rate (None: fc_lr); see anydepth.study.fc
    output_change_depths: tuple[int, ...] = (6, 12, 24, 48)  # Admin's amplification measurement

    def batch(self, depth: int) -> int:
        """Sequences per step at ``depth`` (equal for every run there)."""
        return self.batch_sizes.get(depth, self.batch_size)

    def _spec(self, scheme: str, depth: int, seed: int, lr: float) -> RunSpec:
        return RunSpec(scheme=scheme, depth=depth, seed=seed, steps=self.budgets[depth], lr=lr,
                       batch_size=self.batch(depth), seq_len=self.seq_len)

    def runs(self) -> list[RunSpec]:
        """The runs known before any result: claim runs and fixed sweeps, cheapest first."""
        specs = {
            s.run_id: s
            for s in (
                *(self._spec(sc, d, seed, BASE_LR) for sc, d in self.cells for seed in self.seeds),
                *(self._spec(sc, d, self.seeds[0], lr) for d, (scs, lrs) in self.lr_sweep.items()
                  for sc in scs for lr in lrs),
            )
        }
        return _cheapest_first(specs.values())

    def follow_runs(self, records: list[dict[str, Any]]) -> list[RunSpec]:
        """The runs of the following depths, chosen from the finished ``records`` of their source depth."""
        specs: dict[str, RunSpec] = {}
        for depth, (schemes, source) in self.lr_follow.items():
            for scheme in schemes:
                for lr in follow_rates(records, scheme, source):
                    spec = self._spec(scheme, depth, self.seeds[0], lr)
                    specs[spec.run_id] = spec
        return _cheapest_first(specs.values())

    def follow_count(self) -> int:
        """Runs the following depths will add (3 per scheme; 2 where the best rate is at the grid's edge)."""
        return len(self.follow_placeholders())

    def follow_placeholders(self) -> list[RunSpec]:
        """Stand-ins for the following depths' runs before their rates are known (3 per scheme), for the
        time estimate."""
        return [
            self._spec(s, d, self.seeds[0], lr)
            for d, (schemes, _) in self.lr_follow.items()
            for s in schemes
            for lr in LR_GRID[:3]
        ]

    @property
    def depths(self) -> tuple[int, ...]:
        return tuple(sorted({d for _, d in self.cells} | set(self.lr_sweep) | set(self.lr_follow)))

    @property
    def schemes(self) -> tuple[str, ...]:
        present = {s for s, _ in self.cells}
        present |= {s for scs, _ in self.lr_sweep.values() for s in scs}
        present |= {s for scs, _ in self.lr_follow.values() for s in scs}
        return tuple(s for s in SCHEMES if s in present)


def budget_phrase(depth: int | str, steps: int, batch: int | None = None) -> str:
    """``600 steps of batch 8 at 64 layers``: a depth's budget as the report and the README state it."""
    return f"{steps} steps{f' of batch {batch}' if batch else ''} at {depth} layers"


def plan_budgets(plan: dict[str, Any]) -> str:
    """Every depth's budget of a ``results.json`` plan, shallowest first (``none`` without runs)."""
    batches = plan.get("batch_sizes", {})
    budgets = sorted(plan.get("budgets", {}).items(), key=lambda kv: int(kv[0]))
    return ", ".join(budget_phrase(d, n, batches.get(d)) for d, n in budgets) or "none"


def _cheapest_first(specs) -> list[RunSpec]:
    """Cheapest first, so a short session finishes whole comparisons early."""
    return sorted(specs, key=lambda r: (r.depth * r.steps, r.seed, r.lr, list(SCHEMES).index(r.scheme)))


def final_val(record: dict[str, Any]) -> float:
    """A run record's final validation bpc (the last point of its curve if the run did not finish); NaN if none."""
    v = record.get("final_val_bpc")
    if v is None and record.get("val_curve"):
        v = record["val_curve"][-1][1]
    return math.nan if v is None else float(v)


def follow_rates(records: list[dict[str, Any]], scheme: str, depth: int) -> list[float]:
    """The grid rate with ``scheme``'s lowest final val bpc at ``depth`` and its two grid neighbours."""
    scores = {}
    for r in records:
        if r.get("scheme") == scheme and r.get("depth") == depth and r.get("status") == "ok":
            v = final_val(r)
            if math.isfinite(v):
                scores[r["lr"]] = min(v, scores.get(r["lr"], math.inf))
    if not scores:
        return []
    best = min(scores, key=scores.get)
    i = min(range(len(LR_GRID)), key=lambda k: abs(math.log(LR_GRID[k] / best)))
    return [LR_GRID[k] for k in (i - 1, i, i + 1) if 0 <= k < len(LR_GRID)]


# Budgets in steps, from the measured Model S step on 2 idle cores (docs/study.md, "Budgets and time")
# and the steps a stable scheme needs to end 1 bpc below the unigram entropy at each depth.
FULL_BUDGETS = {12: 1000, 32: 600, 64: 600, 128: 600, 256: 600}
# From 64 layers a Model S step is compute-bound (0.24 s at batch 8, 0.50 s at batch 16 on one core), so
# those depths take half the batch: the quick study's 64-layer runs decide every claim there at batch 8.
DEEP_BATCH_FROM, DEEP_BATCH_SIZE = 64, 8


def default_budget(depth: int) -> int:
    """Budget of the full study for any depth: the nearest listed depth at or above it."""
    for d in sorted(FULL_BUDGETS):
        if depth <= d:
            return FULL_BUDGETS[d]
    return FULL_BUDGETS[max(FULL_BUDGETS)]


def full_plan(
    *,
    schemes: list[str] | None = None,
    depths: list[int] | None = None,
    seeds: int = 3,
    budgets: dict[int, int] | None = None,
    lr_sweep: bool = True,
    lrs: list[float] | None = None,
) -> Plan:
    """Every scheme at every depth (default 12, 64, 256) with ``seeds`` seeds at ``BASE_LR``; the whole
    learning-rate grid at every depth up to 64 and, deeper, each scheme's best rate at 64 layers (or the
    deepest swept depth) with its two neighbours."""
    schemes = validate_schemes(schemes or list(SCHEMES))
    depths = validate_depths(depths or [12, 64, 256])
    seeds = validate_seeds(seeds)
    budgets = {d: (budgets or {}).get(d, default_budget(d)) for d in depths}
    swept = [d for d in depths if d <= 64] or depths[:1]
    # The claim runs (all seeds) stop at 64 layers: deeper, one seed per rate is what 2 cores allow.
    cells = tuple((s, d) for d in depths for s in schemes if d in swept or not lr_sweep)
    grid = tuple(sorted(validate_lrs(lrs))) if lrs is not None else LR_GRID
    sweep = {d: (tuple(schemes), grid) for d in swept} if lr_sweep else {}
    follow = {d: (tuple(schemes), max(swept)) for d in depths if d not in swept} if lr_sweep else {}
    full = len(schemes) == len(SCHEMES) and depths == [12, 64, 256] and lr_sweep and grid == LR_GRID
    name = "full" if full else "custom"
    return Plan(name=name, cells=cells, seeds=tuple(range(seeds)), budgets=budgets, lr_sweep=sweep,
                lr_follow=follow, batch_sizes={d: DEEP_BATCH_SIZE for d in depths if d >= DEEP_BATCH_FROM})


# The quick study: the runs that decide RZ-2b and HC-2 (12 layers), RZ-3, AD-1(b) and DN-1 (64 layers,
# pre-LN included), RZ-1 (fully connected, 64 layers) and AD-2 (output change), plus a reduced
# learning-rate sweep at 64 layers. Sized from the measured step times to stay under 15 minutes on
# 2 idle cores (docs/study.md, "Budgets and time"): a 64-layer Model S step is compute-bound (about
# 0.25 s at batch 8 on one core), so the 64-layer runs take batch 8, where ReZero and pre-LN still end
# 1 bpc under the unigram entropy in 600 steps; at 12 layers ReZero needs batch 16 for that.
QUICK_BUDGETS = {12: 600, 64: 600}
QUICK_BATCH_SIZES = {12: 16, 64: DEEP_BATCH_SIZE}
QUICK_CELLS: tuple[tuple[str, int], ...] = (
    ("postln", 12),
    ("preln", 12),
    ("rezero", 12),
    ("hyper4", 12),
    ("postln", 64),
    ("preln", 64),
    ("rezero", 64),
    ("admin", 64),
    ("deepnorm", 64),
)
# pre-LN at the claim rate and a decade above it, where it stops training: every other rate of the grid
QUICK_LR_SWEEP = {64: (("preln",), (LR_GRID[2], LR_GRID[4]))}
STUDY_WORKERS = 2  # two runs at a time, one thread each: Model S's small products gain more that way


def quick_plan(*, seeds: int = 1) -> Plan:
    """The ``--quick`` study (under 15 minutes on 2 idle CPU cores)."""
    return Plan(
        name="quick",
        cells=QUICK_CELLS,
        seeds=tuple(range(validate_seeds(seeds))),
        budgets=dict(QUICK_BUDGETS),
        batch_sizes=dict(QUICK_BATCH_SIZES),
        lr_sweep=dict(QUICK_LR_SWEEP),
        fc_depths=(64,),
        fc_steps=300,
        output_change_depths=(6, 12, 24, 48),
    )


def validate_schemes(schemes: list[str]) -> list[str]:
    if isinstance(schemes, str):
        raise TypeError(f"schemes must be a list of names, got the string {schemes!r}; split it on commas")
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        raise ValueError(f"unknown scheme(s) {unknown!r} in schemes; choose from: {', '.join(SCHEMES)}")
    if not schemes:
        raise ValueError(f"schemes is empty; choose at least one of: {', '.join(SCHEMES)}")
    return list(dict.fromkeys(schemes))


def validate_depths(depths: list[int]) -> list[int]:
    bad = [d for d in depths if isinstance(d, bool) or not isinstance(d, int) or d <= 0]
    if bad or not depths:
        raise ValueError(f"depths must be positive integers such as 12,64,256; got {depths!r}")
    return sorted(set(depths))


def validate_lrs(lrs: list[float]) -> list[float]:
    bad = [x for x in lrs if isinstance(x, bool) or not isinstance(x, int | float) or not 0 < x < 1]
    if bad or not lrs:
        raise ValueError(f"lrs must be learning rates in (0, 1) such as [1e-3, 3e-3]; got {lrs!r}")
    return list(dict.fromkeys(float(x) for x in lrs))


def validate_seeds(seeds: int) -> int:
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds <= 0:
        raise ValueError(f"seeds must be a positive integer (the number of seeds per run), got {seeds!r}")
    return seeds
