"""A tiny end-to-end study: two schemes, two depths, a few steps, a report with plots."""

import json
import math

import pytest

from anydepth.study.cli import main, run_study
from anydepth.study.report import dump_results
from anydepth.study.sweep import full_plan
from anydepth.study.verdicts import NOT_RUN, STATUSES


def synthetic_runner(spec, run_dir, progress):
    """Post-LN diverges at depth 4; everything else follows bpc = 1 + 4 exp(-0.2 t)."""
    if spec.scheme == "postln" and spec.depth == 4:
        return {"status": "diverged", "diverged_step": 3, "curve": [[1, 5.0], [2, 6.0], [3, math.nan]],
                "val_curve": []}
    c = [[t, 1 + 4 * math.exp(-0.2 * t)] for t in range(1, spec.steps + 1)]
    return {"status": "ok", "curve": c, "val_curve": [[spec.steps, c[-1][1]]], "final_val_bpc": c[-1][1]}


def _check_outputs(out, depths):
    report = (out / "report.md").read_text()
    for name in [f"curves_L{d}.png" for d in depths] + ["final_bpc_vs_depth.png"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in report
    results = json.loads((out / "results.json").read_text())
    assert {v["status"] for v in results["verdicts"]} <= set(STATUSES)
    assert sorted({(r["scheme"], r["depth"]) for r in results["runs"]}) == sorted(
        (s, d) for s in ("postln", "rezero") for d in depths)
    return report, results


def test_tiny_study_with_a_synthetic_runner_writes_report(tmp_path, capsys):
    plan = full_plan(schemes=["rezero", "postln"], depths=[2, 4], seeds=1, budgets={2: 6, 4: 6}, lr_sweep=False)
    res = run_study(plan, tmp_path, runner=synthetic_runner, unigram_bits=4.74, fc=False, output_change=False,
                    progress=False)
    # without bars, a line per run trained (and none for a run reused by a second start)
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[")]
    assert len(lines) == 4 and lines[0].startswith("[1/4] postln-L2-lr1e-3-s0: ok, val bpc 2.205, ")
    assert any(x.startswith("[3/4] postln-L4-lr1e-3-s0: diverged, ") for x in lines)
    run_study(plan, tmp_path, runner=synthetic_runner, unigram_bits=4.74, fc=False, output_change=False,
              progress=False)
    assert not [x for x in capsys.readouterr().out.splitlines() if x.startswith("[")]
    report, results = _check_outputs(tmp_path, [2, 4])
    # results.json: a line per run, its curves to 4 decimals, the final figures with every digit
    lines = (tmp_path / "results.json").read_text().splitlines()
    for r in results["runs"]:
        assert sum(f'"run_id":"{r["run_id"]}"' in line for line in lines) == 1
        exact = [[t, 1 + 4 * math.exp(-0.2 * t)] for t in range(1, 7)]
        if r["status"] == "ok":
            assert r["curve"] == [[t, round(v, 4)] for t, v in exact]
            assert r["final_val_bpc"] == exact[-1][1]
    data = {"a": [{"x": [1.5, None]}, 2], "b": {"k": "v"}, "c": [], "d": {}, "e": 3.25, "f": "s"}
    assert json.loads(dump_results(data)) == data
    assert "## RZ-2:" in report and "| Post-LN, no warm-up |" in report
    div = [r for r in results["runs"] if r["run_id"] == "postln-L4-lr1e-3-s0"][0]
    assert div["status"] == "diverged" and div["curve"][-1] == [3, None]
    assert "0/1 trained (diverged)" in report
    assert all(v.status == NOT_RUN for v in res["verdicts"])  # no claim is about depths 2 and 4


@pytest.mark.slow
def test_tiny_study_through_the_trainer(tmp_path, capsys):
    pytest.importorskip("anydepth.train.loop")
    out = tmp_path / "study"
    data = tmp_path / "corpus.txt"  # a small file keeps corpus loading out of the test's time
    data.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(800)))
    argv = ["--data", str(data), "--schemes", "rezero", "postln", "--depths", "1", "2", "--seeds", "1", "--steps", "3",
            "--lrs", "1e-3", "1e-2", "--fc-depths", "2", "--fc-steps", "3", "--output-change-depths", "1", "2",
            "--out", str(out), "--no-progress", "--deep", "--deep-depth", "3", "--deep-minutes", "0.02"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "estimated" in printed and "calibrated on this machine" in printed and "time: " in printed
    # by default the Model S runs train two at a time and the deep runs one after another
    assert "with 2 worker(s)" in printed and "deep runs (1 at a time" in printed
    report, results = _check_outputs(out, [1, 2])
    for name in ("fc_curves.png", "output_change.png", "lr_sensitivity.png", "deep_curves.png"):
        assert (out / name).exists() and f"]({name})" in report
    # the LR grid of two points: every scheme at both rates at every depth, and its sensitivity in the results
    assert {(r["scheme"], r["depth"], r["lr"]) for r in results["runs"]} == {
        (s, d, lr) for s in ("rezero", "postln") for d in (1, 2) for lr in (1e-3, 1e-2)}
    assert set(results["lr_sweep"]) == {"1", "2"}
    assert all(row["sensitivity"] >= 0 for t in results["lr_sweep"].values() for row in t.values())
    assert "## Choosing a scheme" in report and "- **Budget:** 3 steps of batch 16 at" in report
    # the deep runs: one JSON each, with the figures the docs quote
    deep = sorted((out / "deep").glob("*.json"))
    assert [p.name for p in deep] == ["postln-L3-lr1e-3-s0.json", "rezero-L3-lr1e-3-s0.json"]
    rec = json.loads(deep[1].read_text())
    assert {"depth", "steps", "wall_s", "final_val_bpc", "unigram_bits"} <= set(rec) and rec["depth"] == 3
    assert {r["status"] for r in results["runs"]} <= {"ok", "diverged"}
    assert len(results["deep"]) == 2
    # 3 steps train nothing: every run failed, and each got the diagnostics of its last checkpoint
    assert set(results["failures"]) == {r["run_id"] for r in results["runs"]}
    assert all(isinstance(f, list) and all({"name", "message"} <= set(x) for x in f)
               for f in results["failures"].values())
    assert "## Why runs failed" in report
    for r in results["runs"]:
        assert [s for s, _ in r["curve"]] == [1, 2, 3]  # every step logged, curve read from metrics.jsonl
    assert set(results["output_change"]) == {"postln", "preln", "admin", "chain-postln", "chain-preln", "chain-admin"}
    n_runs = len(results["runs"])
    [first] = results["timings"]
    assert first["runs_trained"] == n_runs and first["runs_reused"] == 0
    assert first["estimated_s"] > 0 and first["elapsed_s"] > 0 and first["command"].startswith("anydepth study --data")
    # A second start trains nothing: every run is loaded from its result.json.
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json")}
    assert main(argv) == 0
    assert mtimes == {p: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json")}
    # and its time is recorded after the first command's, which trained the runs
    timings = json.loads((out / "results.json").read_text())["timings"]
    assert timings[0] == first and (timings[1]["runs_trained"], timings[1]["runs_reused"]) == (0, n_runs)


def test_a_second_study_into_the_same_folder_is_refused(tmp_path, capsys):
    """Two studies in one folder would train the same runs into the same files."""
    from anydepth.study.cli import lock_out

    held = lock_out(tmp_path / "out")
    assert main(["--out", str(tmp_path / "out"), "--no-lm", "--no-fc", "--no-output-change"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {tmp_path / 'out'} is in use by another anydepth study" in err
    held.close()  # the first one ended: the folder is free again
    lock_out(tmp_path / "out").close()


def test_cli_rejects_bad_arguments(capsys):
    assert main(["--quick", "--depths", "12"]) == 2
    assert "--quick fixes its schemes, depths and rates" in capsys.readouterr().err
    assert main(["--schemes", "nope"]) == 2
    assert "unknown scheme(s) ['nope']" in capsys.readouterr().err
    assert main(["--workers", "0"]) == 2
    assert "--workers must be a positive integer, got 0" in capsys.readouterr().err
    assert main(["--lrs", "1e-3", "2"]) == 2
    assert "lrs must be learning rates in (0, 1)" in capsys.readouterr().err
    assert main(["--deep-minutes", "5"]) == 2
    assert "--deep-minutes needs --deep" in capsys.readouterr().err
    # an unknown flag: one line, exit 2 (argparse's own usage block was seven lines), with the option it resembles
    assert main(["--bogus"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown option --bogus" in err
    assert main(["--quik"]) == 2
    assert capsys.readouterr().err == "anydepth study: error: unknown option --quik; did you mean --quick?\n"
    # lists are space-separated, as tyro reads them; the comma form is named with its replacement
    assert main(["--depths", "12,64"]) == 2
    assert capsys.readouterr().err == "anydepth study: error: --depths takes space-separated values: --depths 12 64\n"
    assert main(["--schemes=rezero,postln"]) == 2
    assert "--schemes takes space-separated values: --schemes rezero postln" in capsys.readouterr().err
    # a value of the wrong type, a missing value: one line each
    for argv in (["--workers", "x"], ["--seeds"], ["--fc-lr", "fast"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"anydepth study: error: {argv[0]}"), err


def test_cli_parses_every_option_into_the_plan():
    """Each option reaches the plan it describes (lists space-separated, --no-X flags turning parts off)."""
    from anydepth.study.cli import deep_plan_from_args, parse_args, plan_from_args

    args = parse_args(["--schemes", "rezero", "postln", "--depths", "3", "5", "--lrs", "1e-3", "3e-3", "--seeds", "2",
                       "--steps", "7", "--fc-depths", "4", "8", "--fc-steps", "9", "--fc-width", "16", "--fc-lr",
                       "0.5", "--fc-layer-lr", "1e-4", "--output-change-depths", "2", "4", "--no-lm", "--no-fc",
                       "--no-output-change",
                       "--no-progress", "--workers", "3", "--threads", "1", "--deep", "--deep-depth", "6",
                       "--deep-minutes", "0.5", "--deep-schemes", "rezero", "postln", "--deep-lr", "2e-3",
                       "--data", "c.txt", "--out", "o", "--publish", "p", "--readme", "R.md"])
    assert (args.lm, args.fc, args.output_change, args.progress, args.lr_sweep) == (False, False, False, False, True)
    assert (args.workers, args.threads, args.data, args.out, args.publish, args.readme) == (3, 1, "c.txt", "o", "p",
                                                                                            "R.md")
    plan = plan_from_args(args)
    assert set(plan.schemes) == {"rezero", "postln"} and tuple(plan.depths) == (3, 5) and len(plan.seeds) == 2
    assert set(plan.budgets.values()) == {7} and (plan.fc_depths, plan.fc_steps) == ((4, 8), 9)
    assert (plan.fc_width, plan.fc_lr, plan.fc_layer_lr, plan.output_change_depths) == (16, 0.5, 1e-4, (2, 4))
    assert {lr for _, lrs in plan.lr_sweep.values() for lr in lrs} == {1e-3, 3e-3}
    deep = deep_plan_from_args(args)
    assert (deep.depth, deep.minutes, deep.schemes, deep.lr) == (6, 0.5, ("rezero", "postln"), 2e-3)
    assert not plan_from_args(parse_args(["--no-lr-sweep"])).lr_sweep


def test_the_estimate_leaves_out_what_a_restart_reuses(tmp_path):
    from anydepth.study.cli import _fc_path, estimate_total_seconds
    from anydepth.study.runner import SEC_PER_RUN

    plan = full_plan(schemes=["rezero", "postln"], depths=[2], seeds=1, budgets={2: 10}, lr_sweep=False)
    rates = {(s, 2): 1.0 for s in ("rezero", "postln")}

    def est(**kw):
        return estimate_total_seconds(plan, 1, oc=False, rates=rates, fc_rates={}, out=tmp_path, **kw)

    fresh = est(fc=False)
    assert fresh == pytest.approx(2 * (10 * 1.0 + SEC_PER_RUN))
    spec = plan.runs()[0]
    run_dir = tmp_path / "runs" / spec.run_id
    run_dir.mkdir(parents=True)
    (run_dir / "result.json").write_text(json.dumps({**spec.to_dict(), "status": "ok"}))
    assert est(fc=False) == pytest.approx(fresh - (10 * 1.0 + SEC_PER_RUN))
    # a finished run of another budget is trained again, so it still counts
    (run_dir / "result.json").write_text(json.dumps({**spec.to_dict(), "steps": 5}))
    assert est(fc=False) == pytest.approx(fresh)
    # the FC experiment costs nothing once its result is in the folder
    with_fc = est(fc=True)
    assert with_fc > fresh
    _fc_path(plan, tmp_path).write_text("{}")
    assert est(fc=True) == pytest.approx(fresh)
