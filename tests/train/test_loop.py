"""The training loop: outputs, exact resume, divergence handling, checkpoint damage, bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tiny_runs import tiny_model

from anydepth.model.pretrained import from_pretrained
from anydepth.train import loop
from anydepth.train.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint
from anydepth.train.data import load_corpus
from anydepth.train.loop import TrainingDiverged, run


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _weights(ckpt_dir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(ckpt_dir) / "model.safetensors"))


def test_run_writes_metrics_plot_summary_and_checkpoints(make_run):
    cfg = make_run(keep_last=1)
    s = run(cfg)
    out = Path(cfg.out)
    for name in ("metrics.jsonl", "loss.png", "summary.json", "run.json"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [step for step, _ in list_checkpoints(out / "checkpoints")] == [6]  # keep_last=1 pruned step 3
    for key in ("out", "steps", "final_train_loss", "final_val_bpc", "tokens_per_s", "peak_mem_mb", "sample"):
        assert key in s
    assert s["steps"] == 6 and s["diverged"] is False and s["diverged_step"] is None
    assert s["sample"].startswith("def ") and s["tokens_per_s"] > 0 and s["peak_mem_mb"] > 0
    assert json.loads((out / "summary.json").read_text()) == s

    lines = _metrics(out)
    train = [r for r in lines if "train_loss" in r]
    val = [r for r in lines if "val_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in val] == [3, 6]
    for r in train:
        assert r["train_bpc"] == pytest.approx(r["train_loss"] / math.log(2))
        assert {"lr", "tokens_per_s"} <= set(r)
    assert train[0]["lr"] == pytest.approx(cfg.train.lr / 2)  # warmup=2: first update at lr/2
    assert s["final_val_bpc"] == pytest.approx(val[-1]["val_loss"] / math.log(2))

    # The reported validation loss, recomputed independently from the saved checkpoint.
    model = from_pretrained(latest_checkpoint(out)).eval()
    _, val_tokens = load_corpus(cfg.data)
    n, L = 2 * cfg.train.batch_size, cfg.train.seq_len
    # Validation windows start at evenly spaced positions over the split, the last one at its end.
    starts = [int(torch.linspace(0, val_tokens.size - L - 1, n, dtype=torch.float64)[i]) for i in range(n)]
    w = torch.stack([torch.from_numpy(val_tokens[s0 : s0 + L + 1].astype("int64")) for s0 in starts])
    with torch.no_grad():
        logits = model(w[:, :-1])
    ref = F.cross_entropy(logits.reshape(-1, 256), w[:, 1:].reshape(-1)).item()
    assert s["final_val_loss"] == pytest.approx(ref, rel=1e-5)


def test_resume_from_a_checkpoint_matches_uninterrupted_run_bit_for_bit(make_run):
    # Dropout makes the result depend on the restored RNG state, not only on weights and optimizer.
    model = tiny_model(emb_dropout=0.1)
    full = make_run("full", model=model)
    run(full)
    mid = Path(full.out) / "checkpoints" / "step_00000003"
    resumed = dataclasses.replace(make_run("resumed", model=model), resume=str(mid))
    s = run(resumed)
    assert s["steps"] == 6
    a, b = _weights(latest_checkpoint(full.out)), _weights(latest_checkpoint(resumed.out))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # Resuming the whole run directory picks its newest checkpoint and appends to its metrics.
    again = dataclasses.replace(make_run("full", model=model, steps=8), resume=full.out)
    run(again)
    steps = [r["step"] for r in _metrics(full.out) if "train_loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]


def test_a_checkpoint_of_the_per_tensor_optimizer_resumes_with_the_fused_one(make_run, monkeypatch):
    # Checkpoints written before the trainer used torch's fused AdamW hold the per-tensor AdamW's state
    # dict (groups with fused=None); such a run resumes with the fused update and the saved moments.
    from anydepth.train.optim import lr_at, param_groups

    def per_tensor(model, tc):
        return torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=lr_at(0, tc), betas=tc.betas, eps=tc.eps)

    old = make_run("old", steps=3)
    with monkeypatch.context() as m:
        m.setattr(loop, "build_optimizer", per_tensor)
        run(old)
    ck = load_checkpoint(latest_checkpoint(old.out))
    assert {g["fused"] for g in ck.trainer["optimizer"]["param_groups"]} == {None}
    resumed = dataclasses.replace(make_run("new"), resume=str(ck.path))
    trainer = loop._Trainer(resumed, loop.D.setup(resumed.train.device))
    opt = trainer.optimizer
    assert {g["fused"] for g in opt.param_groups} == {True}
    names = {p: n for n, p in trainer.model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state[p]
            assert float(st["step"]) == 3
            assert torch.equal(st["exp_avg"], ck.state[f"opt/{names[p]}/exp_avg"])
            assert torch.equal(st["exp_avg_sq"], ck.state[f"opt/{names[p]}/exp_avg_sq"])
    assert trainer.fit()["steps"] == 6


def _nan_at(monkeypatch, bad_step: int):
    calls = {"n": 0}
    original = loop._loss

    def poisoned(model, x, y, device, dtype):
        loss = original(model, x, y, device, dtype)
        if model.training:
            calls["n"] += 1
            if calls["n"] == bad_step:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(loop, "_loss", poisoned)


def test_nan_loss_stops_naming_step_and_last_checkpoint(make_run, monkeypatch):
    _nan_at(monkeypatch, 5)
    cfg = make_run()
    with pytest.raises(TrainingDiverged) as e:
        run(cfg)
    assert e.value.step == 5
    assert e.value.last_checkpoint.endswith("step_00000003")
    assert "step 5" in str(e.value) and "step_00000003" in str(e.value)
    summary = json.loads((Path(cfg.out) / "summary.json").read_text())
    assert summary["diverged"] is True and summary["diverged_step"] == 5
    assert [r["step"] for r in _metrics(cfg.out) if "train_loss" in r] == [1, 2, 3, 4, 5]


def test_nan_loss_can_skip_the_update(make_run, monkeypatch):
    _nan_at(monkeypatch, 2)
    s = run(make_run(on_nan="skip"))
    assert s["skipped_steps"] == 1 and s["diverged"] is False and math.isfinite(s["final_val_bpc"])
    assert any(r.get("skipped") and r["step"] == 2 for r in _metrics(s["out"]))


def test_bad_config_raises_before_anything_is_written(make_run, tmp_path):
    cfg = make_run("never", seq_len=128)  # tiny model has max_seq_len=64
    with pytest.raises(ValueError, match=r"train.seq_len=128 exceeds model.max_seq_len=64"):
        run(cfg)
    assert not Path(cfg.out).exists()


def test_resume_with_a_different_model_is_refused(make_run):
    first = make_run("a")
    run(first)
    other = dataclasses.replace(make_run("b", model=tiny_model(depth=3)), resume=first.out)
    with pytest.raises(ValueError, match=r"model.depth: checkpoint 2 != 3"):
        run(other)
    assert not Path(other.out).exists()
    with pytest.raises(ValueError, match="already holds a run"):
        run(make_run("a"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    from tiny_runs import tiny_train, write_corpus

    from anydepth.train.config import DataConfig, RunConfig

    tmp = tmp_path_factory.mktemp("finished")
    data = DataConfig(path=str(write_corpus(tmp / "c.txt")), cache_dir=str(tmp / "cache"))
    cfg = RunConfig(model=tiny_model(), train=tiny_train(steps=3), data=data, out=str(tmp / "run"))
    run(cfg)
    return cfg


@pytest.mark.parametrize(
    "victim", ["model.safetensors", "state.safetensors", "trainer.json", "manifest.json"]
)
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_checkpoint_names_the_file(finished, victim, damage, tmp_path):
    src = latest_checkpoint(finished.out)
    copy = tmp_path / "checkpoints" / src.name
    shutil.copytree(src, copy)
    f = copy / victim
    data = bytearray(f.read_bytes())
    if damage == "truncate":
        f.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 2] ^= 0x5A
        f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=re.escape(str(f))):
        load_checkpoint(tmp_path)


def test_resume_from_a_damaged_checkpoint_fails_before_writing(finished, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished.out, copy)
    f = latest_checkpoint(copy) / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=re.escape(str(f))):
        run(dataclasses.replace(finished, resume=str(copy), out=str(tmp_path / "next")))
    assert not (tmp_path / "next").exists()


def test_unfinished_temporary_checkpoint_is_ignored_and_cleaned(make_run):
    cfg = make_run("tmp", steps=3, checkpoint_every=3)
    run(cfg)
    root = Path(cfg.out) / "checkpoints"
    stale = root / ".tmp-step_00000009-999999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(cfg.out).name == "step_00000003"
    run(dataclasses.replace(make_run("tmp", steps=6, checkpoint_every=3), resume=cfg.out))
    assert not stale.exists()
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003", "step_00000006"]


@pytest.mark.parametrize("preset", ["prenorm", "hyper"])
def test_bfloat16_autocast_trains_with_float32_loss(make_run, preset):
    from anydepth.model import presets

    model = getattr(presets, preset)(vocab_size=256, dim=32, depth=2, heads=2, max_seq_len=64)
    s = run(make_run("bf16", model=model, dtype="bfloat16", steps=2, eval_every=0, checkpoint_every=0, sample_tokens=0))
    assert math.isfinite(s["final_val_bpc"]) and s["steps"] == 2
    # Weights stay float32 under autocast; only the matmuls run in bfloat16.
    assert all(t.dtype == torch.float32 for t in _weights(s["checkpoint"]).values())


def test_compiled_training_matches_the_eager_run(make_run, monkeypatch):
    # torch.compile of the training forward, with a backend that generates no code to keep the test short
    eager = run(make_run("eager", steps=2, eval_every=0, checkpoint_every=0, sample_tokens=0))
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m: real(m, backend="aot_eager"))
    compiled = run(make_run("compiled", steps=2, eval_every=0, checkpoint_every=0, sample_tokens=0, compile=True))
    a, b = _weights(eager["checkpoint"]), _weights(compiled["checkpoint"])
    assert a.keys() == b.keys()  # the module's own names, not the compiled wrapper's
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
    with pytest.raises(TypeError, match="train.compile"):
        make_run("bad", compile="yes")
