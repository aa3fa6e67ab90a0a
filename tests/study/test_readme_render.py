"""The README's study blocks are rewritten from results.json and nothing else changes."""

import json
import math

import pytest

from anydepth.study.readme import blocks, render, shortlist, update


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


def _row(depth, scheme, best, ok=True, recommended=False):
    return {"depth": depth, "scheme": scheme, "trained_seeds": "3/3" if ok else "0/3", "all_seeds_trained": ok,
            "trained_lrs": ["1e-3"] if ok else [], "best_bpc": best, "best_lr": "1e-3", "sensitivity": None,
            "step_ms": 100.0, "recommended": recommended}


def test_readme_table_keeps_the_best_three_and_the_baselines_per_depth():
    """A depth with 18 schemes shows the three best that trained in every seed (the recommended one first
    among them) and pre-LN and post-LN; a depth with few schemes shows them all; the order is the table's."""
    many = [_row(64, "postln", math.nan, ok=False), _row(64, "preln", 3.6), _row(64, "rezero", 2.7),
            _row(64, "admin", 2.0, ok=False),  # lowest bpc, but not in every seed: not shortlisted
            _row(64, "deepnorm", 2.66), _row(64, "hyper4", 2.55, recommended=True), _row(64, "rms", 3.9),
            _row(64, "vres", 2.87)]
    few = [_row(1000, "postln", 5.8, ok=False), _row(1000, "rezero", 3.5, recommended=True)]
    short = shortlist(many + few)
    assert [(r["depth"], r["scheme"]) for r in short] == [
        (64, "postln"), (64, "preln"), (64, "rezero"), (64, "deepnorm"), (64, "hyper4"),
        (1000, "postln"), (1000, "rezero")]
    results = {"plan": {}, "verdicts": [], "choose": many + few}
    table = render(results, "docs/study/full")["choose-scheme"]
    assert table.startswith("From [docs/study/full/results.json](docs/study/full/results.json); where a depth "
                            "has more than 5 schemes, its 3 best that trained in every seed, pre-LN and post-LN "
                            "(all 10 rows: "
                            "[docs/study/full/report.md](docs/study/full/report.md)):")
    assert table.count("\n| 64 |") == 5 and "Admin" not in table
    assert "**Hyper-connections, n = 4** (recommended)" in table
    # nothing left out: the table says only where it comes from
    assert render({"plan": {}, "verdicts": [], "choose": few})["choose-scheme"].startswith(
        "From [docs/study/results.json](docs/study/results.json):\n")


def test_render_reads_the_nulls_results_json_writes_for_nan():
    """json_safe writes a NaN best bpc or step time as null; the README renders it as "-" instead of failing."""
    from anydepth.study.runner import json_safe

    rows = [_row(256, "postln", math.nan, ok=False), _row(256, "vres", 2.9, recommended=True)]
    rows[0]["step_ms"] = math.nan
    results = json.loads(json.dumps(json_safe({"choose": rows})))
    assert results["choose"][0]["best_bpc"] is None and results["choose"][0]["step_ms"] is None
    table = render(results)["choose-scheme"]
    assert "| 256 | Post-LN, no warm-up | 0/3 | - | - | - | - |" in table
    assert "**Pre-LN + value residual** (recommended)" in table
