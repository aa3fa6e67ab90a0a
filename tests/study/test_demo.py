"""`anydepth demo` (make demo): both models trained through the study's runner, one summary."""

import json
from pathlib import Path

import pytest

from anydepth.cli import main
from anydepth.study.demo import DEMO_SCHEME

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.slow
def test_demo_trains_both_schemes_and_writes_its_summary(tmp_path, capsys):
    data = tmp_path / "corpus.txt"
    data.write_text("".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(400)))
    out = tmp_path / "demo"
    assert main(["demo", "--depth", "2", "--steps", "3", "--data", str(data), "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "demo.json").read_text())
    assert set(summary["runs"]) == {"hyper4", "postln"} and summary["depth"] == 2 and summary["steps"] == 3
    for r in summary["runs"].values():
        assert r["status"] in ("ok", "diverged")
        assert not r["trained"]  # 3 steps cannot get 1 bpc under the unigram entropy
    assert "Hyper-connections, n = 4" in printed and "Post-LN, no warm-up" in printed


def test_demo_rejects_bad_input(capsys):
    assert main(["demo", "--steps", "0"]) == 2
    assert "--steps must be a positive integer, got 0" in capsys.readouterr().err
    assert main(["demo", "--scheme", "nope"]) == 2
    assert "unknown --scheme 'nope'" in capsys.readouterr().err


def test_demo_shows_the_readme_recommendation_at_64_layers():
    """`make demo` trains what the README's "Choosing a scheme" table recommends at 64 layers: the
    recommendation of the published study the README's tables follow."""
    from anydepth.study.readme import REPORT_LINK, blocks

    where = REPORT_LINK.search(blocks(README.read_text())["study-verdicts"]).group(1)
    rows = json.loads((README.parent / where / "results.json").read_text())["choose"]
    assert [r["scheme"] for r in rows if r["depth"] == 64 and r["recommended"]] == [DEMO_SCHEME]
