"""Resume logic and metrics parsing of the study runner (with a fake runner, no training)."""

import dataclasses
import json
import math
import os

import pytest

from anydepth.study import runner as runner_mod
from anydepth.study.runner import execute, read_metrics
from anydepth.study.sweep import full_plan


def fake_runner(spec, run_dir, progress):
    """Writes a metrics file like the trainer and returns a record; 'postln' at depth 4 diverges."""
    (run_dir / "calls").write_text("1")
    if spec.scheme == "postln" and spec.depth == 4:
        return {"status": "diverged", "diverged_step": 2, "curve": [[1, 5.0], [2, math.nan]], "val_curve": []}
    return {"status": "ok", "curve": [[s, 5.0 - 0.1 * s] for s in range(1, spec.steps + 1)], "val_curve": []}


def crashing_runner(spec, run_dir, progress):
    raise RuntimeError("boom")


def _plan():
    return full_plan(schemes=["rezero", "postln"], depths=[2, 4], seeds=1, budgets={2: 3, 4: 3}, lr_sweep=False)


def test_finished_runs_are_skipped_and_interrupted_runs_restart(tmp_path, monkeypatch):
    specs = _plan().runs()
    calls = []

    def counting(spec, run_dir, progress):
        calls.append(spec.run_id)
        return fake_runner(spec, run_dir, progress)

    first = execute(specs, tmp_path, counting, progress=False)
    assert sorted(calls) == sorted(s.run_id for s in specs)
    assert [r["status"] for r in first] == ["ok", "ok", "diverged", "ok"]  # divergence is a saved result
    assert math.isnan(first[2]["curve"][1][1])

    # Simulate an interrupted run: the folder exists but result.json was never written.
    (tmp_path / "runs" / "rezero-L4-lr1e-3-s0" / "result.json").unlink()
    (tmp_path / "runs" / "rezero-L4-lr1e-3-s0" / "stale").write_text("partial")
    calls.clear()
    second = execute(specs, tmp_path, counting, progress=False)
    assert calls == ["rezero-L4-lr1e-3-s0"]
    assert not (tmp_path / "runs" / "rezero-L4-lr1e-3-s0" / "stale").exists()
    assert [r.get("resumed", False) for r in second] == [True, True, True, False]
    # NaN is stored as null (strict JSON) and the curve survives the round trip.
    saved = json.loads((tmp_path / "runs" / "postln-L4-lr1e-3-s0" / "result.json").read_text())
    assert saved["curve"] == [[1, 5.0], [2, None]]


def test_a_changed_budget_retrains_instead_of_resuming(tmp_path):
    specs = _plan().runs()[:1]
    execute(specs, tmp_path, fake_runner, progress=False)
    longer = [dataclasses.replace(specs[0], steps=5)]
    (rec,) = execute(longer, tmp_path, fake_runner, progress=False)
    assert "resumed" not in rec and rec["steps"] == 5 and len(rec["curve"]) == 5
    (rec,) = execute(longer, tmp_path, fake_runner, progress=False)
    assert rec["resumed"] is True


def test_crashed_runs_are_reported_and_retried(tmp_path):
    specs = _plan().runs()[:1]
    (rec,) = execute(specs, tmp_path, crashing_runner, progress=False)
    assert rec["status"] == "error" and "RuntimeError: boom" in rec["error"]
    assert not (tmp_path / "runs" / specs[0].run_id / "result.json").exists()
    (rec,) = execute(specs, tmp_path, fake_runner, progress=False)
    assert rec["status"] == "ok" and "resumed" not in rec


def test_parallel_workers_give_the_same_records(tmp_path):
    specs = _plan().runs()
    par = execute(specs, tmp_path / "a", fake_runner, workers=2, progress=False)
    seq = execute(specs, tmp_path / "b", fake_runner, workers=1, progress=False)
    strip = [{k: v for k, v in r.items() if k != "wall_s"} for r in par]
    assert json.dumps(strip) == json.dumps([{k: v for k, v in r.items() if k != "wall_s"} for r in seq])


def test_workers_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="workers must be a positive integer.*0"):
        execute([], tmp_path, fake_runner, workers=0)


def test_read_metrics_splits_train_and_val_and_tolerates_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [
        {"step": 1, "train_loss": 3.0, "train_bpc": 4.3, "lr": 1e-3, "tokens_per_s": 10},
        {"step": 2, "train_loss": None, "train_bpc": float("inf"), "lr": 1e-3, "tokens_per_s": 10},
        {"step": 2, "val_loss": 2.0, "val_bpc": 2.885},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"step": 3, "train_')
    train, val = read_metrics(path)
    assert train[0] == [1, 4.3] and train[1][0] == 2 and math.isnan(train[1][1])
    assert val == [[2, 2.885]]


def test_estimate_scales_with_steps_depth_and_workers():
    specs = _plan().runs()
    one = runner_mod.estimate_seconds(specs, 1)
    expected = sum(
        s.steps * (s.depth * runner_mod.SEC_PER_BLOCK_STEP + runner_mod.SEC_PER_STEP) + runner_mod.SEC_PER_RUN
        for s in specs
    )
    assert one == pytest.approx(expected)
    # calibrated step times replace the fallback cost model, per (scheme, depth)
    rates = {(s.scheme, s.depth): 0.5 for s in specs}
    assert runner_mod.estimate_seconds(specs, 1, rates) == pytest.approx(
        sum(s.steps * 0.5 + runner_mod.SEC_PER_RUN for s in specs))
    # Two workers share the cores: they divide the time only when there are at least two cores.
    assert runner_mod.estimate_seconds(specs, 2) == pytest.approx(one / min(2, os.cpu_count() or 1))


def test_calibrate_times_each_model_once():
    from anydepth.study.runner import TrainerRunner, calibrate

    specs = full_plan(schemes=["rezero", "postln"], depths=[1, 2], seeds=1, budgets={1: 3, 2: 3}).runs()
    rates = calibrate(specs, TrainerRunner(), steps=1)
    assert set(rates) == {(s, d) for s in ("rezero", "postln") for d in (1, 2)}
    assert all(0 < r < 10 for r in rates.values())
    assert calibrate(specs, lambda *a: {}) == {}  # a runner that builds no model is not calibrated


def test_pool_workers_end_with_their_parent(tmp_path):
    """A killed `anydepth study` leaves no worker training on."""
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "parent.py"
    script.write_text(
        "import time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "import multiprocessing, os, functools\n"
        "from anydepth.study.runner import _init_worker\n"
        "if __name__ == '__main__':\n"
        "    ctx = multiprocessing.get_context('spawn')\n"
        "    pool = ProcessPoolExecutor(1, mp_context=ctx, initializer=functools.partial(_init_worker, os.getpid()))\n"
        "    print(pool.submit(os.getpid).result(), flush=True)\n"
        "    pool.submit(time.sleep, 60)  # the worker is busy, as in the middle of a training run\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    worker = int(proc.stdout.readline())
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.kill(worker, signal.SIGKILL)
        raise AssertionError("the pool worker outlived its killed parent")
