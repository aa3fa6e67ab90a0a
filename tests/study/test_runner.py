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


def test_finished_runs_are_skipped_and_interrupted_runs_continue(tmp_path, monkeypatch):
    specs = _plan().runs()
    calls = []

    def counting(spec, run_dir, progress):
        calls.append(spec.run_id)
        return fake_runner(spec, run_dir, progress)

    first = execute(specs, tmp_path, counting, progress=False)
    assert sorted(calls) == sorted(s.run_id for s in specs)
    assert [r["status"] for r in first] == ["ok", "ok", "diverged", "ok"]  # divergence is a saved result
    assert math.isnan(first[2]["curve"][1][1])

    # Simulate an interrupted run: the folder exists but result.json was never written. With the same
    # settings in spec.json its folder is kept, for the trainer to continue from its checkpoint.
    run_dir = tmp_path / "runs" / "rezero-L4-lr1e-3-s0"
    (run_dir / "result.json").unlink()
    (run_dir / "partial").write_text("step 2")
    calls.clear()
    second = execute(specs, tmp_path, counting, progress=False)
    assert calls == ["rezero-L4-lr1e-3-s0"]
    assert (run_dir / "partial").exists()
    assert [r.get("resumed", False) for r in second] == [True, True, True, False]
    # A folder without spec.json (or with other settings) is not this run's: it is replaced.
    for spec_file in (None, {**specs[3].to_dict(), "lr": 3e-3}):
        (run_dir / "result.json").unlink()
        (run_dir / "spec.json").unlink()
        if spec_file:
            (run_dir / "spec.json").write_text(json.dumps(spec_file))
        (run_dir / "stale").write_text("partial")
        execute(specs, tmp_path, counting, progress=False)
        assert not (run_dir / "stale").exists() and (run_dir / "result.json").exists()
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


def test_a_continued_run_counts_the_time_up_to_its_checkpoint(tmp_path):
    """wall_s of a run continued after a kill: the earlier segments' time up to the newest checkpoint
    (the steps after it are trained again) plus this segment's."""
    import time

    (spec,) = _plan().runs()[:1]
    run_dir = tmp_path / "runs" / spec.run_id
    manifest = run_dir / "train" / "checkpoints" / "step_00000002" / "manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text("{}")
    now = time.time()
    os.utime(manifest, (now - 95.0, now - 95.0))
    (run_dir / "spec.json").write_text(json.dumps({**spec.to_dict(), "wall_s_before": 10.0, "started": now - 100.0}))
    (rec,) = execute([spec], tmp_path, fake_runner, progress=False)
    assert 15.0 <= rec["wall_s"] < 20.0


def test_an_interrupted_trainer_run_continues_bit_for_bit(tmp_path):
    """A run killed after a checkpoint continues from it (its logged steps are kept, not retrained)
    and ends exactly as an uninterrupted run."""
    from anydepth.study.runner import TrainerRunner
    from anydepth.train.config import RunConfig
    from anydepth.train.loop import run

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(800)))
    runner = TrainerRunner(data_path=str(corpus), max_bytes=None, eval_batches=2, threads=1,
                           model=(("dim", 32), ("heads", 2)))
    (spec,) = full_plan(schemes=["preln"], depths=[2], seeds=1, budgets={2: 12}, lr_sweep=False).runs()
    (whole,) = execute([spec], tmp_path / "whole", runner, progress=False)
    assert whole["status"] == "ok"

    # the first segment: the same run, killed right after its checkpoint at step 6
    run_dir = tmp_path / "cut" / "runs" / spec.run_id
    run_dir.mkdir(parents=True)
    (run_dir / "spec.json").write_text(json.dumps({**spec.to_dict(), "wall_s_before": 0.0, "started": 0.0}))
    tc = dataclasses.replace(runner.train_config(spec, False), steps=6)
    assert runner.train_config(spec, False).checkpoint_every == 12 // runner_mod.CHECKPOINTS_PER_RUN
    run(RunConfig(model=runner.model_config(spec), train=tc, data=runner.data_config(), out=str(run_dir / "train")))
    metrics = run_dir / "train" / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    rows = [r for r in rows if "train_bpc" in r]
    rows[0]["train_bpc"] = 99.0  # a marker: a retrained run would log step 1 again
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))

    (cut,) = execute([spec], tmp_path / "cut", runner, progress=False)
    assert cut["curve"][0] == [1, 99.0]
    assert cut["curve"][1:] == whole["curve"][1:] and len(cut["curve"]) == 12
    assert cut["final_val_bpc"] == whole["final_val_bpc"]


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
