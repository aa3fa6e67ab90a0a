"""`--train.timeout` bounds how long a process waits in a collective for a stalled peer."""

from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import time

import pytest
from tiny_runs import PYTHON, REPO

from anydepth.train import distributed as D
from anydepth.train.config import TrainConfig


def test_timeout_is_checked_and_defaults_to_minutes():
    assert 60 <= TrainConfig().timeout <= 600
    for bad in (0, -1, float("inf"), float("nan"), True, "5"):
        with pytest.raises((ValueError, TypeError), match="train.timeout must be a"):
            TrainConfig(timeout=bad)


def test_setup_passes_the_timeout_to_init_process_group(monkeypatch):
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(D.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(D.dist, "init_process_group", lambda **kw: seen.update(kw))
    D.setup("cpu", timeout=7.5)
    assert seen["timeout"] == datetime.timedelta(seconds=7.5) and seen["backend"] == "gloo"


def test_collective_failure_names_the_ranks():
    info = D.DistInfo(rank=0, world=2)
    e = D.collective_failure(RuntimeError("[gloo] Timed out waiting 5000ms for recv from rank 1"), info, 5)
    assert isinstance(e, D.CollectiveTimeout)
    assert str(e).startswith("rank 0 of 2: a collective failed after at most train.timeout=5s because rank 1")
    assert D.collective_failure(RuntimeError("shape mismatch"), info, 5) is None
    assert D.collective_failure(RuntimeError("Timed out"), D.DistInfo(), 5) is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_stopped_rank_makes_the_other_fail_within_the_timeout(tmp_path, corpus):
    port = _free_port()
    args = [PYTHON, "-m", "anydepth", "train", "--model.dim=32", "--model.depth=2", "--model.heads=2"]
    args += ["--model.max_seq_len=64", "--train.steps=100000", "--train.batch_size=2", "--train.seq_len=16"]
    args += ["--train.eval_every=0", "--train.checkpoint_every=0", "--train.progress=False", "--train.threads=1"]
    args += ["--train.timeout=4", "--train.device=cpu", f"--data={corpus}", f"--data.cache_dir={tmp_path / 'c'}"]
    args += [f"--out={tmp_path / 'run'}"]
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, PYTHONPATH=str(REPO / "src"), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
        env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.stat().st_size > 0):
            assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].stderr.read()[-2000:]
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        _, err = procs[0].communicate(timeout=90)
        waited = time.monotonic() - stopped
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    lines = err.decode().strip().splitlines()
    assert procs[0].returncode == 2, lines[-5:]
    assert "rank 0 of 2: a collective failed after at most train.timeout=4s" in lines[-1]
    assert waited < 60  # torch's default would be 30 minutes
