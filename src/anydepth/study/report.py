"""Writes the study's ``report.md``, its PNG plots and ``results.json``.

Plots (matplotlib, Agg backend, so no display is needed):

- ``curves_L{depth}.png``: EMA train bpc against step for every scheme at one depth (one line per seed);
- ``steps_to_target.png``: steps-to-X per scheme and depth, X fixed per depth from the reference run;
- ``final_bpc_vs_depth.png``: seed-mean final val bpc against depth, runs that failed to train marked;
- ``output_change.png``: Admin's output change at init against depth (log-log);
- ``fc_curves.png``: the deep fully connected experiment's train loss curves.
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anydepth.study.plots import _plt, _save
from anydepth.study.runner import json_safe
from anydepth.study.sweep import SCHEMES, budget_phrase, lr_label, plan_budgets
from anydepth.study.verdicts import (
    NOT_RUN,
    Evidence,
    Verdict,
    ema,
    ema_at,
    mean,
    steps_to,
    trained,
)

_STATUS_MARK = {"reproduced": "yes", "not reproduced at this scale": "no", "failed to run": "crash"}


def _title(scheme: str) -> str:
    return SCHEMES[scheme].title if scheme in SCHEMES else scheme


def reference_target(ev: Evidence, depth: int) -> tuple[str, float] | None:
    """``(reference scheme, X)`` for a depth: post-LN + warm-up's seed-mean EMA at half budget if it
    trained, else pre-LN's; ``None`` if neither trained."""
    for ref in ("postln-warmup", "preln"):
        group = ev.group(ref, depth)
        if group and all(trained(r, ev.unigram) for r in group):
            x = mean([ema_at(r, r["steps"] // 2) for r in group])
            if math.isfinite(x):
                return ref, x
    return None


def plot_curves(ev: Evidence, out: Path) -> list[Path]:
    plt = _plt()
    paths = []
    for depth in ev.depths():
        fig, ax = plt.subplots(figsize=(7, 4.2))
        failed = 0
        for i, scheme in enumerate(s for s in SCHEMES if ev.group(s, depth)):
            for j, r in enumerate(ev.group(scheme, depth)):
                curve = r.get("curve") or []
                if not curve:
                    continue
                ok = trained(r, ev.unigram)
                xs, ys = [s for s, _ in curve], ema([b for _, b in curve])
                ax.plot(
                    xs,
                    ys,
                    color=f"C{i}",
                    lw=1.2,
                    ls="-" if ok else "--",
                    alpha=0.9 if j == 0 else 0.5,
                    label=(_title(scheme) + ("" if ok else " (failed)")) if j == 0 else None,
                )
                if not ok:  # where a failed run ended (or blew up): an x on its last finite point, named
                    last = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
                    if last:
                        ax.plot(*last[-1], "x", color=f"C{i}", ms=8, mew=2)
                        # failed runs often end at the same place (the unigram entropy): stack their names
                        ax.annotate(scheme, last[-1], xytext=(-6, 10 + 11 * failed), textcoords="offset points",
                                    ha="right", fontsize=7, color=f"C{i}",
                                    arrowprops={"arrowstyle": "-", "color": f"C{i}", "lw": 0.6})
                        failed += 1
        ax.axhline(ev.unigram, color="gray", ls="--", lw=0.8, label="unigram entropy")
        ax.axhline(ev.unigram - 1.0, color="gray", ls=":", lw=0.8, label="unigram - 1 (decides a claim)")
        ax.set(xlabel="step", ylabel="train bpc (EMA 0.9)",
               title=f"{depth} layers, {ev.budget(depth)} steps of batch {ev.batch(depth)} at lr 1e-3 "
               "(dashed, x: failed to train)")
        ax.set_ylim(top=min(ax.get_ylim()[1], ev.unigram + 2.5))
        ax.legend(fontsize=7)
        paths.append(_save(fig, out / f"curves_L{depth}.png"))
    return paths


def steps_to_target_table(ev: Evidence) -> dict[int, dict[str, Any]]:
    """``{depth: {"reference", "target", "steps": {scheme: seed-mean steps-to-X (inf: never)}}}``."""
    table = {}
    for depth in ev.depths():
        ref = reference_target(ev, depth)
        if ref is None:
            continue
        steps = {}
        for scheme in (s for s in SCHEMES if ev.group(s, depth)):
            vals = [steps_to(r.get("curve") or [], ref[1]) for r in ev.group(scheme, depth)]
            steps[scheme] = sum(vals) / len(vals)
        table[depth] = {"reference": ref[0], "target": ref[1], "steps": steps}
    return table


def plot_steps_to_target(ev: Evidence, out: Path) -> Path | None:
    table = steps_to_target_table(ev)
    if not table:
        return None
    plt = _plt()
    schemes = [s for s in SCHEMES if any(s in t["steps"] for t in table.values())]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    width = 0.8 / max(1, len(table))
    for k, (depth, t) in enumerate(sorted(table.items())):
        budget = max(r["steps"] for r in ev.runs if r["depth"] == depth)
        heights = [t["steps"].get(s, math.nan) for s in schemes]
        bars = [min(h, budget * 1.05) if not math.isnan(h) else 0 for h in heights]
        xs = [i + k * width for i in range(len(schemes))]
        ax.bar(xs, bars, width=width, label=f"{depth}L: X = {t['target']:.2f} bpc ({t['reference']})")
        for x, h in zip(xs, heights):
            if h == math.inf:
                ax.text(x, budget * 1.05, "never", ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_xticks([i + width * (len(table) - 1) / 2 for i in range(len(schemes))])
    ax.set_xticklabels(schemes, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="steps to reach X (lower is faster)", title="Steps to the reference's half-budget bpc")
    ax.legend(fontsize=7)
    return _save(fig, out / "steps_to_target.png")


def plot_final_vs_depth(ev: Evidence, out: Path) -> Path | None:
    if not ev.runs:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    top = ev.unigram + 0.3
    for i, scheme in enumerate(s for s in SCHEMES if any(r["scheme"] == s for r in ev.runs)):
        xs, ys, fx = [], [], []
        for depth in ev.depths():
            group = ev.group(scheme, depth)
            if not group:
                continue
            if all(trained(r, ev.unigram) for r in group):
                xs.append(depth)
                ys.append(mean(ev.vals(scheme, depth)))
            else:
                fx.append(depth)
        ax.plot(xs, ys, "o-", color=f"C{i}", label=_title(scheme))
        # failed runs: one row of x per scheme above the plot's data, so none hides another
        ax.plot([d * 1.04 ** (i - 4) for d in fx], [top + 0.08 * i] * len(fx), "x", color=f"C{i}", ms=9, mew=2)
    ax.axhline(ev.unigram, color="gray", ls="--", lw=0.8, label="unigram entropy")
    ax.axhline(top - 0.05, color="gray", ls=":", lw=0.6)
    ax.text(0.02, 0.98, "x above the dotted line: failed to train (one row per scheme)", transform=ax.transAxes,
            va="top", fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ev.depths())
    ax.set_xticklabels([str(d) for d in ev.depths()])
    ax.set(xlabel="layers", ylabel="final val bpc (x: failed to train)", title="Final bpc against depth")
    ax.legend(fontsize=7)
    return _save(fig, out / "final_bpc_vs_depth.png")


def plot_output_change(oc: dict[str, dict[str, float]], out: Path) -> Path | None:
    if not oc:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    from anydepth.study.output_change import theory_linear_chain
    from anydepth.study.verdicts import OUTPUT_CHANGE_SIGMA

    for i, scheme in enumerate(s for s in oc if not s.startswith("chain-")):
        values = oc[scheme]
        depths = sorted(int(d) for d in values)
        ax.plot(depths, [values[str(d)] for d in depths], "o-", color=f"C{i}", label=f"Model S: {_title(scheme)}")
        chain = oc.get(f"chain-{scheme}")
        if chain:
            ax.plot(depths, [chain[str(d)] for d in depths], "s--", color=f"C{i}", ms=4, lw=0.8,
                    label=f"linear chain: {scheme}")
            ax.plot(depths, [theory_linear_chain(scheme, d, OUTPUT_CHANGE_SIGMA) for d in depths], ":",
                    color=f"C{i}", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(xlabel="layers", ylabel="relative change of the final hidden state",
           title="Output change at init (dotted: closed form of the chain)")
    ax.legend(fontsize=8)
    return _save(fig, out / "output_change.png")


def plot_fc(fc: dict[str, dict[str, list[float]]], out: Path) -> Path | None:
    if not fc:
        return None
    plt = _plt()
    depths = sorted(fc, key=int)
    fig, axes = plt.subplots(1, len(depths), figsize=(5 * len(depths), 3.8), squeeze=False)
    for ax, depth in zip(axes[0], depths):
        for i, (variant, losses) in enumerate(fc[depth].items()):
            bad = next((k for k, x in enumerate(losses) if not math.isfinite(x)), None)
            if bad is None:
                ax.plot(range(1, len(losses) + 1), ema(losses), color=f"C{i}", label=variant)
                continue
            # a run that blew up stops at its first non-finite loss: mark that step on the chance line,
            # or its curve (a point or two) would vanish under the others
            ax.plot(range(1, bad + 1), ema(losses[:bad]), color=f"C{i}", ls="--")
            ax.plot([bad + 1], [math.log(10)], color=f"C{i}", marker="x", ms=9, mew=2, ls="none",
                    label=f"{variant}: diverged at step {bad + 1}")
        ax.axhline(math.log(10), color="gray", ls="--", lw=0.8, label="chance")
        ax.set_yscale("log")
        ax.set(xlabel="step", ylabel="train loss (EMA 0.9)", title=f"fully connected, {depth} layers")
        ax.legend(fontsize=8)
    return _save(fig, out / "fc_curves.png")


def _run_table(ev: Evidence) -> list[str]:
    depths = ev.depths()
    schemes = [s for s in SCHEMES if any(r["scheme"] == s for r in ev.runs)]
    lines = [
        "| scheme | " + " | ".join(f"{d} layer{'s' if d != 1 else ''}" for d in depths) + " |",
        "|---|" + "---|" * len(depths),
    ]
    for s in schemes:
        cells = []
        for d in depths:
            group = ev.group(s, d)
            if not group:
                cells.append("")
                continue
            ok = sum(trained(r, ev.unigram) for r in group)
            val = mean(ev.vals(s, d))
            status = {r.get("status") for r in group} - {"ok"}
            note = f" ({'/'.join(sorted(status))})" if status else ""
            cells.append(f"{_num(val)} bpc, {ok}/{len(group)} trained{note}")
        lines.append(f"| {_title(s)} | " + " | ".join(cells) + " |")
    return lines


_CLAIM_DEPTHS = {"RZ-2": (12,), "RZ-2b": (12,), "RZ-3": (64,), "AD-1": (12, 64), "DN-1": (12, 64)}


def _budget_line(ev: Evidence, v: Verdict) -> str:
    """The steps per run (at lr 1e-3, batch x context tokens each) behind a claim."""
    if v.claim == "RZ-1":
        return "the fully connected experiment's steps (below)"
    if v.claim == "AD-2":
        return "no training: a measurement at initialisation"
    # QK-1 is decided at each depth where both schemes were swept, which only its verdict records
    depths = _CLAIM_DEPTHS.get(v.claim) or tuple(v.details.get("depths", ())) or tuple(ev.depths()[:1])
    parts = [budget_phrase(d, ev.budget(d), ev.batch(d)) for d in depths if ev.budget(d)]
    return ", ".join(parts) or "no runs"


def _num(x: float) -> str:
    return f"{x:.3f}" if isinstance(x, float) and math.isfinite(x) else "n/a"


def write_report(
    out: Path,
    *,
    ev: Evidence,
    verdicts: Sequence[Verdict],
    plan: dict[str, Any],
    command: str,
    fc_steps: int | None = None,
    elapsed_s: float | None = None,
    deep: list[dict[str, Any]] | None = None,
    failures: dict[str, Any] | None = None,
) -> Path:
    """Writes ``report.md``, the PNGs and ``results.json`` into ``out``; returns the report's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots: list[Path] = plot_curves(ev, out)
    from anydepth.study.deep import load_deep, plot_deep
    from anydepth.study.lr import choose_markdown, choose_table, plot_lr, sweep_table

    for p in (
        plot_deep(load_deep(out), out),
        plot_lr(ev, out),
        plot_steps_to_target(ev, out),
        plot_final_vs_depth(ev, out),
        plot_output_change(ev.oc, out),
        plot_fc(ev.fc, out),
    ):
        if p is not None:
            plots.append(p)

    lines = [
        "# Depth study",
        "",
        f"Regenerate with `{command}`. Plan: {plan.get('name', 'custom')}; depths "
        f"{', '.join(str(d) for d in plan.get('depths', ev.depths()))}; seeds {len(plan.get('seeds', [0]))}; "
        f"budgets: {plan_budgets(plan)}.",
        f"Machine: {platform.machine()}, {platform.system()}, Python {platform.python_version()}"
        + (f"; this invocation took {elapsed_s / 60:.1f} min (finished runs are reused)" if elapsed_s is not None
           else "")
        + (f"; the runs' own wall times add up to {sum(r.get('wall_s') or 0 for r in ev.runs) / 60:.1f} min"
           if ev.runs else "") + ".",
        f"Unigram entropy of the training bytes: {ev.unigram:.3f} bits/char. A run *failed to train* if it "
        "diverged or ended with EMA train bpc at or above the unigram entropy minus 0.15.",
        "Verdicts follow the rules fixed in `anydepth/study/verdicts.py` before any run (docs/study.md).",
        "",
        "## Verdicts",
        "",
        "| claim | verdict | measured |",
        "|---|---|---|",
    ]
    for v in verdicts:
        lines.append(f"| {v.claim}: {v.title} | **{v.status}** | {v.measured} |")
    choose = choose_table(ev, deep)
    if choose:
        lines += [
            "",
            "## Choosing a scheme",
            "",
            "Generated from `results.json` by `anydepth.study.lr.choose_table`: per depth, which schemes trained "
            "(ended below the unigram entropy minus 0.15) at the claim rate, at which rates of the "
            "sweep, their best validation bpc and what a step costs. The recommendation is the lowest best bpc "
            "among the schemes that trained in every seed at lr 1e-3 (where a scheme ran its own rates without "
            "1e-3: at two or more of them). The LR sensitivity is shown where a scheme ran every rate of its "
            "depth.",
            "",
            *choose_markdown(choose),
        ]
    lines += ["", "## Runs", "", "Seed-mean final val bpc at lr 1e-3, and how many seeds trained.", ""]
    lines += _run_table(ev) if ev.runs else ["No language-model runs."]
    if failures:
        lines += ["", "## Why runs failed", "",
                  "The depth diagnostics (`anydepth diagnose`) on each failed run's last checkpoint, two training "
                  "batches, no training (docs/diagnostics.md says what each finding means).", ""]
        for run_id, found in sorted(failures.items()):
            if isinstance(found, str):
                lines.append(f"- `{run_id}`: {found}")
            elif not found:
                lines.append(f"- `{run_id}`: no finding fired")
            else:
                lines.append(f"- `{run_id}`: " + "; ".join(f"**{f['name']}**: {f['message']}" for f in found))
    for v in verdicts:
        lines += [
            "",
            f"## {v.claim}: {v.title}",
            "",
            f"- **Paper:** {v.paper}",
            f"- **Rule:** {v.rule}",
            f"- **Budget:** {_budget_line(ev, v)}",
            f"- **Measured:** {v.measured or '-'}",
            f"- **Verdict:** {v.status}",
        ]
        if v.status == NOT_RUN:
            lines.append("- Run the full study (`anydepth study`) or add the schemes/depths it needs.")
    if fc_steps:
        lines += ["", f"The fully connected experiment ran {fc_steps} Adagrad steps per variant."]
    lines += ["", "## Plots", ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")

    results = {
        "choose": choose,
        "lr_sweep": {str(d): {sc: {**row, "final": {lr_label(k): x for k, x in row["final"].items()}}
                              for sc, row in t.items()} for d, t in sweep_table(ev).items()},
        "deep": deep or [],
        "failures": failures or {},
        "plan": plan,
        "command": command,
        "unigram_bits": ev.unigram,
        "verdicts": [v.to_dict() for v in verdicts],
        "runs": [_rounded_curves(r) for r in ev.runs],
        "fc": ev.fc,
        "output_change": ev.oc,
        "steps_to_target": {str(k): v for k, v in steps_to_target_table(ev).items()},
    }
    (out / "results.json").write_text(dump_results(json_safe(results)))
    return report


def _rounded_curves(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with its curves' bpc to 4 decimals (the curves are most of results.json; the final
    figures the verdicts use keep every digit)."""
    def rnd(curve):
        return [[s, round(v, 4) if isinstance(v, float) and math.isfinite(v) else v] for s, v in curve or []]

    return {**record, **{k: rnd(record[k]) for k in ("curve", "val_curve") if k in record}}


def dump_results(data: dict[str, Any]) -> str:
    """``results.json``'s text: one line per run, verdict, row or entry under each top-level key, so
    that it stays a few MB, and a regenerated study differs from the last one line by line."""
    def compact(x: Any) -> str:
        return json.dumps(x, separators=(",", ":"), default=str)

    parts = []
    for key, value in data.items():
        if isinstance(value, list) and value:
            body = "[\n" + ",\n".join(f"  {compact(x)}" for x in value) + "\n ]"
        elif isinstance(value, dict) and value:
            body = "{\n" + ",\n".join(f"  {json.dumps(k)}: {compact(x)}" for k, x in value.items()) + "\n }"
        else:
            body = compact(value)
        parts.append(f" {json.dumps(key)}: {body}")
    return "{\n" + ",\n".join(parts) + "\n}\n"
