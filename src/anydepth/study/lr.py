"""Learning-rate sensitivity and the "Choosing a scheme" table, both computed from the study's runs.

LR sensitivity (Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer training
instabilities", arXiv 2309.14322, Sec. 3.2):

    S = E_lr[ min(loss(lr), loss_init) - best ],   best = min_lr min(loss(lr), loss_init)

over the grid of rates tried, with ``loss`` the final validation bpc and ``loss_init`` the bpc before
the first update. A run that diverged (no finite final loss) counts as ``loss_init``. ``S = 0``: every
rate gave the best result; large ``S``: most rates are far from it. The table and the formula live in
:mod:`anydepth.study.verdicts`, whose QK-1 claim is decided on them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from anydepth.study.plots import _plt, _save
from anydepth.study.sweep import BASE_LR, SCHEMES, lr_label
from anydepth.study.verdicts import Evidence, init_bpc, lr_sensitivity, mean, sweep_table, trained

__all__ = ["lr_sensitivity", "init_bpc", "sweep_table", "step_ms", "choose_table", "choose_markdown", "plot_lr"]


def step_ms(record: dict[str, Any]) -> float:
    tps = record.get("tokens_per_s")
    if not tps:
        return math.nan
    return 1000.0 * record["batch_size"] * record["seq_len"] / tps


def choose_table(ev: Evidence, deep: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One row per (depth, scheme): trained at the claim rate (seeds), the rates it trained at, its best
    val bpc, its step time and whether it is the depth's recommendation.

    The recommendation (rule fixed in code): among the schemes that trained in every seed at the claim
    rate, the lowest best val bpc over the rates tried. Where a scheme ran its own rates without the
    claim rate (the full study's 256 layers: its best rate at 64 layers and the two neighbours), it
    qualifies by training at two or more of them. The LR sensitivity is given only for the schemes run
    over every rate of their depth: over a scheme's own three rates it would not compare with the
    others'. ``deep`` adds the deep runs' records (``anydepth.study.deep``): trained there means at
    least 1 bpc below the unigram entropy.
    """
    sweep = sweep_table(ev)
    rows: list[dict[str, Any]] = []
    for depth in ev.depths():
        grid = {float(r.get("lr", BASE_LR)) for r in ev.runs if r["depth"] == depth}
        for scheme in SCHEMES:
            group = ev.group(scheme, depth)
            swept = sweep.get(depth, {}).get(scheme)
            if not group and not swept:
                continue
            claim_ok = sum(trained(r, ev.unigram) for r in group)
            best = swept["best"] if swept else mean(ev.vals(scheme, depth))
            rows.append(
                {
                    "depth": depth,
                    "scheme": scheme,
                    "trained_seeds": f"{claim_ok}/{len(group)}" if group else "",
                    "all_seeds_trained": claim_ok == len(group) if group else len(swept["trained"]) >= 2,
                    "trained_lrs": [lr_label(x) for x in swept["trained"]] if swept else [],
                    "best_bpc": best,
                    "best_lr": lr_label(swept["best_lr"]) if swept and swept["best_lr"] else
                    (lr_label(BASE_LR) if claim_ok else None),
                    "sensitivity": swept["sensitivity"] if swept and set(swept["final"]) == grid else None,
                    "step_ms": mean([step_ms(r) for r in group] or [step_ms(r) for r in ev.runs
                                    if r["scheme"] == scheme and r["depth"] == depth]),
                    "recommended": False,
                }
            )
    for row in deep or []:
        rows.append({**row, "recommended": False})
    for depth in sorted({r["depth"] for r in rows}):
        cands = [r for r in rows if r["depth"] == depth and r["all_seeds_trained"] and math.isfinite(r["best_bpc"])]
        if cands:
            min(cands, key=lambda r: r["best_bpc"])["recommended"] = True
    return rows


def choose_markdown(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| layers | scheme | trained at lr 1e-3 (seeds) | trained at rates | best val bpc (rate) | LR sensitivity |"
        " step (ms) |",
        "|---:|---|---|---|---|---:|---:|",
    ]
    for r in rows:
        title = SCHEMES[r["scheme"]].title if r["scheme"] in SCHEMES else r["scheme"]
        if r["recommended"]:
            title = f"**{title}** (recommended)"
        best = f"{r['best_bpc']:.3f} ({r['best_lr']})" if math.isfinite(r["best_bpc"]) and r["best_lr"] else "-"
        sens = f"{r['sensitivity']:.2f}" if r.get("sensitivity") is not None else "-"
        step = f"{r['step_ms']:.0f}" if math.isfinite(r["step_ms"]) else "-"
        lines.append(
            f"| {r['depth']} | {title} | {r['trained_seeds'] or '-'} | {', '.join(r['trained_lrs']) or '-'} | "
            f"{best} | {sens} | {step} |"
        )
    return lines


def plot_lr(ev: Evidence, out: Path) -> Path | None:
    """Final val bpc against learning rate, one panel per depth, one line per scheme; runs that failed to
    train are drawn as an x above the panel's top line, offset per scheme so that none hide another."""
    table = sweep_table(ev)
    if not table:
        return None
    plt = _plt()
    depths = sorted(table)
    fig, axes = plt.subplots(1, len(depths), figsize=(5.2 * len(depths), 4), squeeze=False)
    schemes = list(SCHEMES)
    for ax, depth in zip(axes[0], depths):
        top = ev.unigram + 0.4
        for scheme, row in table[depth].items():
            i = schemes.index(scheme)
            lrs = sorted(row["final"])
            ok = [lr for lr in lrs if lr in row["trained"]]
            ax.plot(ok, [row["final"][lr] for lr in ok], "o-", color=f"C{i}", label=SCHEMES[scheme].title)
            bad = [lr for lr in lrs if lr not in row["trained"]]
            # a small per-scheme offset in bpc and rate keeps the failed markers of different schemes apart
            ax.plot([lr * 1.06 ** (i - 4) for lr in bad], [top + 0.05 * i] * len(bad), "x", color=f"C{i}", ms=8,
                    mew=2)
        ax.axhline(ev.unigram, color="gray", ls="--", lw=0.8, label="unigram entropy")
        ax.axhline(top - 0.05, color="gray", ls=":", lw=0.6)
        ax.text(0.02, 0.98, "x above the dotted line: failed to train", transform=ax.transAxes, va="top", fontsize=7)
        ax.set_xscale("log")
        ax.set(xlabel="learning rate", ylabel="final val bpc", title=f"{depth} layers")
        ax.legend(fontsize=6, loc="lower right")
    return _save(fig, out / "lr_sensitivity.png")
