"""The README's study tables, rendered from ``results.json`` (``anydepth study --publish DIR --readme README.md``).

Two marked blocks of the README follow the published study, so prose and numbers cannot drift apart:
``<!-- study-verdicts -->`` (one row per claim) and ``<!-- choose-scheme -->`` (the "Choosing a scheme"
table of ``anydepth.study.lr.choose_markdown``; at a depth with many schemes only its best few and the
baselines, ``shortlist``). Both name the published folder they come from (the
quick study's ``docs/study`` or the full study's ``docs/study/full``), and ``tests/test_readme.py``
checks them against that folder's ``results.json``.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from anydepth.study.lr import choose_markdown
from anydepth.study.sweep import plan_budgets

BLOCKS = ("study-verdicts", "choose-scheme")
# The README lists per depth the best few schemes and the two baselines; the report keeps every row.
README_BEST = 3
README_BASELINES = ("preln", "postln")


REPORT_LINK = re.compile(r"Full report: \[([^\]]+)/report\.md\]")


def shortlist(rows: list[dict[str, Any]], best: int = README_BEST) -> list[dict[str, Any]]:
    """The README's rows of the "Choosing a scheme" table, in the table's order: at a depth with more rows
    than ``best`` plus the baselines, the ``best`` schemes with the lowest best val bpc among those that
    qualify for the recommendation (so the recommended one is among them) and the baselines, pre-LN and
    post-LN; a shorter depth keeps every row."""
    keep: list[dict[str, Any]] = []
    for depth in dict.fromkeys(r["depth"] for r in rows):
        at = [r for r in rows if r["depth"] == depth]
        if len(at) > best + len(README_BASELINES):
            ranked = sorted((r for r in at if r["all_seeds_trained"] and math.isfinite(r["best_bpc"])),
                            key=lambda r: r["best_bpc"])
            chosen = {r["scheme"] for r in ranked[:best]} | set(README_BASELINES)
            at = [r for r in at if r["scheme"] in chosen]
        keep += at
    return keep


def render(results: dict[str, Any], where: str = "docs/study") -> dict[str, str]:
    """``{block name: markdown}`` for the README from a study's ``results.json``, published in the folder
    ``where`` (relative to the README)."""
    plan = results.get("plan", {})
    budgets = plan_budgets(plan)
    verdicts = [
        f"From `{results.get('command', 'anydepth study')}` ({plan.get('name', 'custom')} plan: {budgets}; "
        f"{len(plan.get('seeds', [0]))} seed(s)). Full report: [{where}/report.md]({where}/report.md).",
        "",
        "| claim | verdict |",
        "|---|---|",
    ]
    verdicts += [f"| {v['claim']}: {v['title']} | {v['status']} |" for v in results.get("verdicts", [])]
    # results.json stores NaN as null (a run with no finite loss, a step never timed); the table reads NaN.
    rows = [{**r, **{k: math.nan for k in ("best_bpc", "step_ms") if r.get(k) is None}}
            for r in results.get("choose", [])]
    short = shortlist(rows)
    choose = choose_markdown(short) if rows else ["(no runs)"]
    source = f"From [{where}/results.json]({where}/results.json)"
    if len(short) < len(rows):
        source += (f"; where a depth has more than {README_BEST + len(README_BASELINES)} schemes, its "
                   f"{README_BEST} best that trained in every seed, pre-LN and post-LN "
                   f"(all {len(rows)} rows: [{where}/report.md]({where}/report.md))")
    choose = [f"{source}:", "", *choose]
    return {"study-verdicts": "\n".join(verdicts), "choose-scheme": "\n".join(choose)}


def blocks(text: str) -> dict[str, str]:
    """The marked blocks of a README's text (stripped)."""
    return {name: m.group(1).strip() for name in BLOCKS
            if (m := re.search(rf"<!-- {name} -->\n(.*?)<!-- /{name} -->", text, flags=re.S))}


def update(readme: Path, results_json: Path) -> Path:
    """Rewrites the README's marked blocks from ``results_json``; other text is left as it is."""
    text = readme.read_text()
    where = Path(os.path.relpath(Path(results_json).resolve().parent, Path(readme).resolve().parent)).as_posix()
    fresh = render(json.loads(results_json.read_text()), where)
    for name, body in fresh.items():
        pattern = rf"(<!-- {name} -->\n).*?(<!-- /{name} -->)"
        if not re.search(pattern, text, flags=re.S):
            raise ValueError(f"{readme} has no <!-- {name} --> ... <!-- /{name} --> block to update")
        text = re.sub(pattern, lambda m, b=body: m.group(1) + b + "\n" + m.group(2), text, flags=re.S)
    readme.write_text(text)
    return readme
