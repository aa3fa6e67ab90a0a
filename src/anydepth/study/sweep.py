"""What the depth study runs: residual schemes x depths x seeds on one token budget per depth.

A *scheme* is a named model preset plus the warm-up it trains with (post-LN is run both without and
with a linear warm-up over 10% of the steps, the reference of the ReZero paper's Table 2). A *run* is
one scheme at one depth and one seed. Every run at a given depth gets the same number of steps, batch
size and sequence length, so the comparison is at an equal token budget.

The shared model is "Model S" of ``docs/study.md``: causal byte-level decoder, d_model 64, 4 heads,
feed-forward 256, learned positions, context 64, batch 16, Adam(0.9, 0.98) at a constant lr 1e-3.
"""

from __future__ import annotations

import dataclasses
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
    )
}

# Model S: small enough that a 64-layer model takes about a second per step on 2 CPU cores.
MODEL_S: dict[str, Any] = {"dim": 64, "heads": 4, "max_seq_len": 64, "vocab_size": 256}


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """One training run of the study: a scheme at a depth and a seed, with its budget."""

    scheme: str  # key of SCHEMES
    depth: int  # number of blocks
    seed: int  # model init and data order
    steps: int  # optimiser steps (equal for every scheme at this depth)
    batch_size: int = 16
    seq_len: int = 64
    lr: float = 1e-3  # constant after warm-up, as in the ReZero paper's no-schedule comparison

    @property
    def run_id(self) -> str:
        return f"{self.scheme}-L{self.depth}-s{self.seed}"

    @property
    def warmup(self) -> int:
        return int(round(SCHEMES[self.scheme].warmup_frac * self.steps))

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "run_id": self.run_id, "warmup": self.warmup}


@dataclass(frozen=True, kw_only=True)
class Plan:
    """A study: which schemes at which depths, how many seeds and the step budget per depth."""

    name: str  # "quick", "full" or "custom"
    cells: tuple[tuple[str, int], ...]  # (scheme, depth) pairs that are run
    seeds: tuple[int, ...]
    budgets: dict[int, int]  # depth -> steps
    batch_size: int = 16
    seq_len: int = 64
    fc_depths: tuple[int, ...] = (32, 64)  # ReZero paper's deep fully connected experiment
    fc_steps: int = 2000
    output_change_depths: tuple[int, ...] = (6, 12, 24, 48)  # Admin's amplification measurement

    def runs(self) -> list[RunSpec]:
        """Runs ordered cheapest first, so a short session finishes whole comparisons early."""
        specs = [
            RunSpec(
                scheme=s,
                depth=d,
                seed=seed,
                steps=self.budgets[d],
                batch_size=self.batch_size,
                seq_len=self.seq_len,
            )
            for s, d in self.cells
            for seed in self.seeds
        ]
        return sorted(specs, key=lambda r: (r.depth * r.steps, r.seed, list(SCHEMES).index(r.scheme)))

    @property
    def depths(self) -> tuple[int, ...]:
        return tuple(sorted({d for _, d in self.cells}))

    @property
    def schemes(self) -> tuple[str, ...]:
        present = {s for s, _ in self.cells}
        return tuple(s for s in SCHEMES if s in present)


# Steps per depth: 600 at 12 layers as proposed in docs/study.md, fewer at depth where each step
# costs more, so the full study stays within an overnight run on 2 cores.
FULL_BUDGETS = {6: 600, 12: 600, 18: 400, 32: 300, 64: 200, 128: 120}


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
) -> Plan:
    """Every scheme at every depth (default 12, 64, 128) with ``seeds`` seeds."""
    schemes = validate_schemes(schemes or list(SCHEMES))
    depths = validate_depths(depths or [12, 64, 128])
    seeds = validate_seeds(seeds)
    budgets = {d: (budgets or {}).get(d, default_budget(d)) for d in depths}
    cells = tuple((s, d) for d in depths for s in schemes)
    name = "full" if len(schemes) == len(SCHEMES) and depths == [12, 64, 128] else "custom"
    return Plan(name=name, cells=cells, seeds=tuple(range(seeds)), budgets=budgets)


# The quick study: the smallest set of runs that still decides RZ-2 (12-layer ReZero against post-LN),
# RZ-3 and AD-1(b) (64-layer trainability), RZ-1 (fully connected, 64 layers) and AD-2 (output change).
# Sizing (docs/study.md, "Budgets"): 20 timed steps of Model S took about 1 s per step at 12 layers and
# 5 s at 64 on 2 cores shared with other jobs, roughly 4x slower than the FLOP count predicts for idle
# cores (0.25 s and 1.2 s). With idle cores the plan below is about 7 minutes.
QUICK_BUDGETS = {12: 120, 64: 50}
QUICK_CELLS: tuple[tuple[str, int], ...] = (
    ("postln", 12),
    ("postln-warmup", 12),
    ("preln", 12),
    ("rezero", 12),
    ("postln", 64),
    ("rezero", 64),
    ("admin", 64),
    ("deepnorm", 64),
)


def quick_plan(*, seeds: int = 1) -> Plan:
    """The ``--quick`` study (under 10 minutes on 2 idle CPU cores)."""
    return Plan(
        name="quick",
        cells=QUICK_CELLS,
        seeds=tuple(range(validate_seeds(seeds))),
        budgets=dict(QUICK_BUDGETS),
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
        raise ValueError(f"depths must be positive integers such as 12,64,128; got {depths!r}")
    return sorted(set(depths))


def validate_seeds(seeds: int) -> int:
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds <= 0:
        raise ValueError(f"seeds must be a positive integer (the number of seeds per run), got {seeds!r}")
    return seeds
