"""`anydepth demo` (make demo): both models trained through the study's runner, one summary."""

import json

import pytest

from anydepth.cli import main


@pytest.mark.slow
def test_demo_trains_both_schemes_and_writes_its_summary(tmp_path, capsys):
    data = tmp_path / "corpus.txt"
    data.write_text("".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(400)))
    out = tmp_path / "demo"
    assert main(["demo", "--depth", "2", "--steps", "3", "--data", str(data), "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "demo.json").read_text())
    assert set(summary["runs"]) == {"deepnorm", "postln"} and summary["depth"] == 2 and summary["steps"] == 3
    for r in summary["runs"].values():
        assert r["status"] in ("ok", "diverged")
        assert not r["trained"]  # 3 steps cannot get 1 bpc under the unigram entropy
    assert "DeepNorm (post-LN, alpha/beta)" in printed and "Post-LN, no warm-up" in printed


def test_demo_rejects_bad_input(capsys):
    assert main(["demo", "--steps", "0"]) == 2
    assert "--steps must be a positive integer, got 0" in capsys.readouterr().err
    assert main(["demo", "--scheme", "nope"]) == 2
    assert "unknown --scheme 'nope'" in capsys.readouterr().err
