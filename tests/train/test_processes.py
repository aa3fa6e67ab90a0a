"""Real processes: a run killed with SIGKILL resumes to the same weights; 2 gloo ranks match 1 process."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_runs import PYTHON, REPO, tiny_model, tiny_train

from anydepth.train.checkpoint import latest_checkpoint, list_checkpoints
from anydepth.train.config import DataConfig, RunConfig
from anydepth.train.loop import run


def _cli_args(cfg: RunConfig) -> list[str]:
    m, t, d = cfg.model, cfg.train, cfg.data
    args = [f"--model.{k}={getattr(m, k)}" for k in ("dim", "depth", "heads", "max_seq_len", "emb_dropout")]
    args.append(f"--model.stack={m.stack.kind}")
    args.append(f"--model.norm={m.norm.kind}")
    args += ["--preset=prenorm"]
    for f in dataclasses.fields(t):
        v = getattr(t, f.name)
        if f.name == "betas":
            args += ["--train.betas", *map(str, v)]
        elif v is not None:
            args.append(f"--train.{f.name}={v}")
    args += [f"--data.path={d.path}", f"--data.cache_dir={d.cache_dir}"]
    return args


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src")
    return env


def _final_weights(out) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(out) / "model.safetensors"))


@pytest.mark.parametrize(
    "argv, code, stream, needle",
    [
        (["--help"], 0, "stdout", "usage: anydepth {train,diagnose,generate,tokenize,study,demo}"),
        (["train", "--train.steps=-1"], 2, "stderr", "train.steps must be a positive integer, got -1"),
    ],
)
def test_a_rank_of_several_leaves_with_its_exit_code_and_its_output(argv, code, stream, needle):
    # One of several torchrun ranks skips the interpreter's finalization (os._exit in cli.entry):
    # stdout is a pipe here, block-buffered, so the text arrives only if entry() flushed it.
    env = _env() | {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    env.pop("PYTHONUNBUFFERED", None)
    r = subprocess.run(
        [PYTHON, "-m", "anydepth", *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == code, r.stderr[-2000:]
    assert needle in getattr(r, stream)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_identical_weights(tmp_path, corpus):
    model = tiny_model(emb_dropout=0.1)  # dropout: the resumed run must also restore the RNG
    train = tiny_train(steps=60, checkpoint_every=5, eval_every=0, log_every=1, sample_tokens=0)
    data = DataConfig(path=str(corpus), cache_dir=str(tmp_path / "cache"))
    ref = RunConfig(model=model, train=train, data=data, out=str(tmp_path / "uninterrupted"))
    killed = dataclasses.replace(ref, out=str(tmp_path / "killed"))

    proc = subprocess.Popen(
        [PYTHON, "-m", "anydepth", "train", *_cli_args(killed), f"--out={killed.out}"],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    ckpts = Path(killed.out) / "checkpoints"
    deadline = time.time() + 240
    # Kill as soon as a second checkpoint exists (so one was already pruned-around and the run is
    # mid-way), leaving 50 steps undone: a margin even on a fast machine polling every 10 ms.
    while time.time() < deadline and proc.poll() is None:
        found = list_checkpoints(ckpts)
        if found and found[-1][0] >= 10:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    proc.stderr.close()
    last_step = list_checkpoints(ckpts)[-1][0]
    assert 10 <= last_step < 60

    run(ref)  # the same run, uninterrupted, in this process
    summary = run(dataclasses.replace(killed, resume=killed.out, out=None))
    assert summary["steps"] == 60 and summary["out"] == killed.out
    a, b = _final_weights(ref.out), _final_weights(killed.out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after kill + resume"
    lines = [json.loads(x) for x in (Path(killed.out) / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if "train_loss" in r]
    assert steps == list(range(1, 61))  # lines logged after the checkpoint were dropped and redone


@pytest.mark.slow
@pytest.mark.parametrize(
    "parallel, stack, norm",
    [("ddp", "reversible", "layer"), ("fsdp", "sequential", "layer"), ("fsdp", "sequential", "scale")],
)
def test_two_gloo_processes_follow_the_single_process_trajectory(tmp_path, corpus, parallel, stack, norm):
    train = tiny_train(
        steps=6,
        batch_size=4,
        checkpoint_every=0,
        eval_every=3,
        log_every=1,
        sample_tokens=0,
        parallel=parallel,
    )
    data = DataConfig(path=str(corpus), cache_dir=str(tmp_path / "cache"))
    # The reversible stack recomputes activations inside its backward, the case DDP users of
    # reformer-pytorch hit "Expected to mark a variable ready only once" with. FSDP2 shards the
    # parameters and optimizer state; its checkpoint must still hold the full tensors. It cannot
    # shard 0-dim parameters (ScaleNorm's g here, hyper-connection scales), which stay whole on
    # every process with their gradients averaged by the trainer.
    model = tiny_model(stack=stack, norm=norm)
    single = RunConfig(model=model, train=train, data=data, out=str(tmp_path / "single"))
    double = dataclasses.replace(single, out=str(tmp_path / "double"))
    cmd = [
        PYTHON,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "anydepth",
        "train",
    ]
    r = subprocess.run(
        [*cmd, *_cli_args(double), f"--out={double.out}"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # Only rank 0 reports, through the `python -m anydepth` entry point.
    assert r.stdout.count(f"checkpoint: {double.out}/checkpoints/step_00000006") == 1, r.stdout
    assert f"loss curve: {double.out}/loss.png" in r.stdout
    s1 = run(single)
    s2 = json.loads((Path(double.out) / "summary.json").read_text())
    assert s2["world"] == 2 and s1["world"] == 1

    def losses(out, key):
        lines = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        return [(x["step"], x[key]) for x in lines if key in x]

    for key in ("train_loss", "val_loss"):
        one, two = losses(single.out, key), losses(double.out, key)
        assert [s for s, _ in one] == [s for s, _ in two] and len(one) >= 2
        for (step, a), (_, b) in zip(one, two):
            assert abs(a - b) <= 1e-5, f"{key} at step {step}: 1 process {a}, 2 processes {b}"
    a, b = _final_weights(single.out), _final_weights(double.out)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
