"""The README's study tables, rendered from ``results.json`` (``anydepth study --publish DIR --readme README.md``).

Two marked blocks of the README follow the published study, so prose and numbers cannot drift apart:
``<!-- study-verdicts -->`` (one row per claim) and ``<!-- choose-scheme -->`` (the "Choosing a scheme"
table of ``anydepth.study.lr.choose_markdown``). Both name the published folder they come from (the
quick study's ``docs/study`` or the full study's ``docs/study/full``), and ``tests/test_readme.py``
checks them against that folder's ``results.json``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from anydepth.study.lr import choose_markdown
from anydepth.study.sweep import plan_budgets

BLOCKS = ("study-verdicts", "choose-scheme")


REPORT_LINK = re.compile(r"Full report: \[([^\]]+)/report\.md\]")


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
    choose = choose_markdown(results.get("choose", [])) if results.get("choose") else ["(no runs)"]
    choose = [f"From [{where}/results.json]({where}/results.json):", "", *choose]
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
