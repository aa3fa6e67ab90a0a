"""Very deep runs: a transformer of 1,000 blocks and the 10,000-layer fully connected ReZero network.

DeepNet (Wang et al. 2022) trained 1,000-layer post-LN-style transformers with DeepNorm on GPUs; the
ReZero paper's tutorial trains 10,000 fully connected layers. ``anydepth study --deep`` does both on a
CPU: each scheme trains a narrow byte-level LM of ``depth`` blocks for as many steps as fit its time
budget on this machine (the step is timed first, so the budget is in minutes, not steps), and post-LN
runs at the same settings as the control. Every run writes one JSON record (depth, steps, wall time,
final validation bpc, unigram entropy) beside its training folder, so the docs' figures can be checked.

A deep run *trained* if its final validation bpc is at least ``DECIDE_MARGIN_BPC`` below the unigram
entropy, the same bar that decides a claim in the study.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anydepth.study.runner import TrainerRunner, calibrate, execute, json_safe
from anydepth.study.sweep import RunSpec
from anydepth.study.verdicts import DECIDE_MARGIN_BPC, FAIL_MARGIN_BPC, final_val

# The deep model: narrow, so that the step is bounded by the per-layer overhead, which is what depth costs.
DEEP_MODEL: dict[str, Any] = {"dim": 32, "heads": 2}


@dataclass(frozen=True, kw_only=True)
class DeepPlan:
    # the scheme the study recommends at 1,000 blocks (docs/study.md, "Very deep runs"), then the control
    schemes: tuple[str, ...] = ("rezero", "postln")
    depth: int = 1000
    minutes: float = 22.0  # training budget per scheme (the step is timed, then steps = budget / step)
    lr: float = 1e-3
    batch_size: int = 8
    seq_len: int = 64
    max_steps: int = 5000


def plan_steps(seconds_per_step: float, plan: DeepPlan) -> int:
    """Steps that fit ``plan.minutes`` at the measured step time (the final evaluation takes the rest)."""
    return max(1, min(plan.max_steps, int(0.95 * plan.minutes * 60 / seconds_per_step)))


def run_deep(plan: DeepPlan, out: Path, *, runner: TrainerRunner, unigram_bits: float, progress: bool = True,
             seed: int = 0, workers: int = 1) -> list[dict[str, Any]]:
    """Trains every scheme of ``plan``; returns and writes (``<out>/deep/<run_id>.json``) one record each.

    The steps are set once, from the first scheme's timed step, and shared by every scheme of the plan, so
    the control sees the same tokens. ``workers`` schemes train at once, each in its own process with the
    runner's threads (two single-thread runs use two cores better than one run with two threads: the
    step is a few hundred thousand tiny ops).
    """
    deep_dir = Path(out) / "deep"
    deep_dir.mkdir(parents=True, exist_ok=True)
    runner = dataclasses.replace(runner, model=tuple(DEEP_MODEL.items()))
    probe = RunSpec(scheme=plan.schemes[0], depth=plan.depth, seed=seed, steps=1, lr=plan.lr,
                    batch_size=plan.batch_size, seq_len=plan.seq_len)
    sec = calibrate([probe], runner, steps=2)[(probe.scheme, probe.depth)]
    steps = plan_steps(sec, plan)
    specs = [RunSpec(scheme=scheme, depth=plan.depth, seed=seed, steps=steps, lr=plan.lr,
                     batch_size=plan.batch_size, seq_len=plan.seq_len) for scheme in plan.schemes]
    t0 = time.perf_counter()
    records = []
    for spec, rec in zip(specs, execute(specs, deep_dir, runner, workers=workers, progress=progress)):
        scheme = spec.scheme
        val = final_val(rec)
        summary = {
            "scheme": scheme,
            "depth": plan.depth,
            "model": {**DEEP_MODEL, "max_seq_len": plan.seq_len},
            "steps": steps,
            "lr": plan.lr,
            "batch_size": plan.batch_size,
            "seq_len": plan.seq_len,
            "seconds_per_step_timed": sec,
            "wall_s": rec.get("wall_s", time.perf_counter() - t0),
            "status": rec.get("status"),
            "final_val_bpc": val,
            "unigram_bits": unigram_bits,
            "trained": math.isfinite(val) and val <= unigram_bits - DECIDE_MARGIN_BPC,
            "tokens_per_s": rec.get("tokens_per_s"),
            "curve": rec.get("curve", []),
            "val_curve": rec.get("val_curve", []),
        }
        (deep_dir / f"{spec.run_id}.json").write_text(json.dumps(json_safe(summary), indent=1))
        records.append(summary)
    return records


def load_deep(out: Path) -> list[dict[str, Any]]:
    """The deep records written into ``<out>/deep/`` (none if the deep runs were not made)."""
    return [json.loads(p.read_text()) for p in sorted((Path(out) / "deep").glob("*.json"))]


def deep_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the "Choosing a scheme" table (``anydepth.study.lr.choose_table``) for the deep runs."""
    from anydepth.study.sweep import lr_label

    rows = []
    for r in records:
        val = r.get("final_val_bpc")
        val = math.nan if val is None else float(val)
        # the table's "trained" is the study's (under the unigram entropy minus FAIL_MARGIN_BPC), here on
        # the validation bpc; the record's own "trained" is the deep target, DECIDE_MARGIN_BPC under it
        trained = math.isfinite(val) and val <= r["unigram_bits"] - FAIL_MARGIN_BPC
        rows.append({
            "depth": r["depth"],
            "scheme": r["scheme"],
            "trained_seeds": f"{int(trained)}/1",
            "all_seeds_trained": trained,
            "trained_lrs": [lr_label(r["lr"])] if trained else [],
            "best_bpc": val,
            "best_lr": lr_label(r["lr"]),
            "sensitivity": None,
            "step_ms": 1000.0 * r["wall_s"] / max(1, r["steps"]),
        })
    return rows


def plot_deep(records: list[dict[str, Any]], out: Path) -> Path | None:
    """``deep_curves.png``: train bpc (EMA) against step of every deep run, with the unigram entropy and
    the line 1 bpc under it that the run must cross; a run that did not is dashed."""
    if not records:
        return None
    from anydepth.study.plots import _plt, _save
    from anydepth.study.verdicts import ema

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, r in enumerate(records):
        curve = r.get("curve") or []
        if not curve:
            continue
        xs = [s for s, _ in curve]
        ys = ema([math.nan if b is None else b for _, b in curve])
        val = r.get("final_val_bpc")
        label = (f"{r['scheme']}: {r['steps']} steps, val {val:.2f} bpc" if val is not None
                 else f"{r['scheme']}: diverged")
        ax.plot(xs, ys, color=f"C{i}", ls="-" if r.get("trained") else "--", label=label)
    unigram = records[0]["unigram_bits"]
    ax.axhline(unigram, color="gray", ls="--", lw=0.8, label="unigram entropy")
    ax.axhline(unigram - DECIDE_MARGIN_BPC, color="gray", ls=":", lw=0.8, label="unigram - 1")
    r0 = records[0]
    ax.set(xlabel="step", ylabel="train bpc (EMA 0.9)",
           title=f"{r0['depth']} blocks, width {r0['model']['dim']}, lr {r0['lr']:g} (dashed: did not train)")
    ax.set_ylim(top=min(ax.get_ylim()[1], unigram + 3))
    ax.legend(fontsize=7)
    return _save(fig, Path(out) / "deep_curves.png")
