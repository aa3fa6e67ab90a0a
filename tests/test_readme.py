"""The README is the truth: its kinds table matches the registry and its Python examples run."""

import re
from pathlib import Path

import pytest

from anydepth import registered

README = Path(__file__).resolve().parents[1] / "README.md"


def test_kinds_table_matches_the_registry():
    text = README.read_text()
    table = text.split("<!-- kinds-table")[1].split("<!-- /kinds-table -->")[0]
    rows = dict(re.findall(r"^\| (\w+) \| (.+) \|$", table, flags=re.M))
    rows.pop("family")  # the header row
    documented = {family: sorted(re.findall(r"`(\w+)`", kinds)) for family, kinds in rows.items()}
    assert documented == registered()


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_python_examples_run(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(python_blocks()[index], f"README.md block {index}", "exec"), {})


def test_readme_study_tables_follow_the_published_results():
    """The README's verdict and "Choosing a scheme" tables are what `anydepth study --publish DIR
    --readme README.md` renders from DIR/results.json, DIR being the folder the tables name."""
    import json

    from anydepth.study.readme import BLOCKS, REPORT_LINK, blocks, render

    found = blocks(README.read_text())
    assert set(found) == set(BLOCKS)
    where = REPORT_LINK.search(found["study-verdicts"]).group(1)
    results = json.loads((README.parent / where / "results.json").read_text())
    assert found == {k: v.strip() for k, v in render(results, where).items()}
