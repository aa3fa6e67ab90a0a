"""The README's study blocks are rewritten from results.json and nothing else changes."""

import json

import pytest

from anydepth.study.readme import blocks, render, update


def test_update_rewrites_only_the_marked_blocks(tmp_path):
    results = {"command": "anydepth study --quick", "plan": {"name": "quick", "budgets": {"64": 300, "12": 300},
                                                              "batch_sizes": {"64": 8}, "seeds": [0]},
               "verdicts": [{"claim": "RZ-3", "title": "At 64 layers post-LN fails", "status": "reproduced"}],
               "choose": [{"depth": 64, "scheme": "deepnorm", "trained_seeds": "1/1", "all_seeds_trained": True,
                           "trained_lrs": ["1e-3"], "best_bpc": 3.1, "best_lr": "1e-3", "sensitivity": None,
                           "step_ms": 250.0, "recommended": True}]}
    (tmp_path / "results.json").write_text(json.dumps(results))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- study-verdicts -->\nold\n<!-- /study-verdicts -->\nmiddle\n"
                      "<!-- choose-scheme -->\nold\n<!-- /choose-scheme -->\nend\n")
    update(readme, tmp_path / "results.json")
    text = readme.read_text()
    assert text.startswith("intro\n") and "\nmiddle\n" in text and text.endswith("end\n")
    got = blocks(text)
    assert "| RZ-3: At 64 layers post-LN fails | reproduced |" in got["study-verdicts"]
    assert "300 steps at 12 layers, 300 steps of batch 8 at 64 layers" in got["study-verdicts"]
    assert "**DeepNorm (post-LN, alpha/beta)** (recommended)" in got["choose-scheme"]
    # both blocks name the folder the results were published in, relative to the README
    assert got == {k: v.strip() for k, v in render(results, ".").items()}
    assert got["choose-scheme"].startswith("From [./results.json](./results.json):")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "results.json").write_text(json.dumps(results))
    update(readme, tmp_path / "full" / "results.json")
    got = blocks(readme.read_text())
    assert "Full report: [full/report.md](full/report.md)" in got["study-verdicts"]
    assert got["choose-scheme"].startswith("From [full/results.json](full/results.json):")
    readme.write_text("no blocks here\n")
    with pytest.raises(ValueError, match="no <!-- study-verdicts --> .* block"):
        update(readme, tmp_path / "results.json")
