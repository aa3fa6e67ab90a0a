"""Resume has no dead ends: a run killed early restarts, a torn log line is dropped, an older
checkpoint branches into a new directory, leftovers of interrupted writes are cleaned, and a
checkpoint's run.json never decides which paths a resume reads or writes."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest

from anydepth.cli import main
from anydepth.train import checkpoint as C
from anydepth.train.checkpoint import _digest, latest_checkpoint, list_checkpoints
from anydepth.train.loop import run


def _lines(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _ckpt_files(run_dir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(run_dir)): p.read_bytes() for p in sorted((run_dir / "checkpoints").rglob("*")) if p.is_file()
    }


def test_run_killed_before_its_first_checkpoint_restarts(make_run, capsys):
    cfg = make_run()
    out = Path(cfg.out)
    out.mkdir()
    (out / "run.json").write_text(json.dumps(cfg.to_dict()))
    (out / "metrics.jsonl").write_text('{"step": 1, "train_loss": 5.0}\n{"step": 2, "tr')
    # rerunning the same command no longer says "already holds a run"
    s = run(cfg)
    assert s["steps"] == 6 and [r["step"] for r in _lines(out) if "train_loss" in r] == [1, 2, 3, 4, 5, 6]
    assert "stopped before its first checkpoint" in capsys.readouterr().err
    # and --resume of such a run (no checkpoint) starts it again instead of "no checkpoint found"
    shutil.rmtree(out / "checkpoints")
    for name in ("summary.json", "loss.png"):
        (out / name).unlink()
    assert run(dataclasses.replace(cfg, out=None, resume=str(out)))["steps"] == 6
    assert latest_checkpoint(out).name == "step_00000006"


def test_cli_resume_of_a_run_without_checkpoint(make_run, corpus, capsys):
    cfg = make_run(steps=3)
    out = Path(cfg.out)
    out.mkdir()
    (out / "run.json").write_text(json.dumps(cfg.to_dict()))
    (out / "metrics.jsonl").write_text('{"step": 1, "train_loss": 5.0}\n')
    assert main(["train", f"--resume={out}", f"--data={corpus}", f"--data.cache_dir={out.parent / 'c'}"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


def test_torn_last_log_line_is_dropped_with_a_warning(make_run, capsys):
    cfg = make_run(steps=3, checkpoint_every=3)
    run(cfg)
    metrics = Path(cfg.out) / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 4, "train_lo')
    capsys.readouterr()
    s = run(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=4), resume=cfg.out))
    assert s["steps"] == 4
    assert "torn last line" in capsys.readouterr().err
    steps = [r["step"] for r in _lines(cfg.out) if "train_loss" in r]  # every line parses
    assert steps == [1, 2, 3, 4]


def test_a_bad_line_inside_the_log_names_the_file(make_run):
    cfg = make_run(steps=3, checkpoint_every=3)
    run(cfg)
    metrics = Path(cfg.out) / "metrics.jsonl"
    metrics.write_text("not json\n" + metrics.read_text())
    with pytest.raises(ValueError, match=r"metrics.jsonl line 1 is not a JSON object"):
        run(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=4), resume=cfg.out))


def test_resume_from_an_older_checkpoint_branches_into_a_new_directory(make_run, capsys):
    cfg = make_run(steps=6, checkpoint_every=3, keep_last=1)
    run(cfg)
    out = Path(cfg.out)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, keep_last=3))
    run(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=9), resume=str(out)))
    before = _ckpt_files(out)
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [6, 9]  # keep_last=1 left 6; 9 added
    older = out / "checkpoints" / "step_00000006"
    assert older.is_dir()
    capsys.readouterr()
    branch_cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, steps=9, lr=1e-4, keep_last=1), out=None, resume=str(older)
    )
    s = run(branch_cfg)
    branch = Path(s["out"])
    assert branch == out.with_name(f"{out.name}-from-step_00000006")
    assert "not the newest checkpoint" in capsys.readouterr().err
    assert _ckpt_files(out) == before  # the run it branched off is neither pruned nor rewritten
    assert [r["step"] for r in _lines(branch) if "train_loss" in r] == list(range(1, 10))
    assert [r["lr"] for r in _lines(branch) if r.get("step") == 7][0] <= 1e-4
    # `--resume RUN` still continues the original run's newest checkpoint, not the branch
    assert latest_checkpoint(out).name == "step_00000009"
    # continuing the older checkpoint inside the same directory is refused
    with pytest.raises(ValueError, match="would mix two branches"):
        run(dataclasses.replace(branch_cfg, out=str(out)))


def test_newest_means_last_written(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    for step, t in ((6, 1_000_000), (3, 2_000_000)):
        d = root / f"step_{step:08d}"
        d.mkdir(parents=True)
        (d / "manifest.json").write_text("{}")
        os.utime(d / "manifest.json", (t, t))
    assert latest_checkpoint(tmp_path / "run").name == "step_00000003"
    assert [s for s, _ in list_checkpoints(root)] == [6, 3]


def test_leftovers_of_interrupted_writes_are_cleaned_at_start(make_run):
    cfg = make_run(steps=3, checkpoint_every=3)
    run(cfg)
    root = Path(cfg.out) / "checkpoints"
    step = root / "step_00000003"
    weights = (step / "model.safetensors").read_bytes()
    # a kill between the two renames of a rewrite: the step is only in .old-, a new copy in .tmp-
    os.rename(step, root / ".old-step_00000003-4242")
    shutil.copytree(root / ".old-step_00000003-4242", root / ".tmp-step_00000003-4243")
    done = C.clean_leftovers(root)
    assert any("restored" in d for d in done)
    assert step.is_dir() and (step / "model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003"]
    # and a resume does the same by itself
    shutil.copytree(step, root / ".old-step_00000003-4244")
    (root / ".tmp-step_00000006-4245").mkdir()
    run(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=4), resume=cfg.out))
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


def _edit_run_json(ck: Path, **data) -> None:
    r = json.loads((ck / "run.json").read_text())
    r["data"].update(data)
    (ck / "run.json").write_text(json.dumps(r))
    m = json.loads((ck / "manifest.json").read_text())
    m["run.json"] = _digest(ck / "run.json")  # anyone can recompute the checksum
    (ck / "manifest.json").write_text(json.dumps(m))


def test_an_edited_run_json_does_not_redirect_a_resume(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.setenv("ANYDEPTH_CACHE", str(tmp_path / "my-cache"))
    out = tmp_path / "r"
    tiny = ["--model.dim=32", "--model.depth=2", "--model.heads=2", "--model.max_seq_len=64", "--train.steps=3"]
    tiny += ["--train.batch_size=2", "--train.seq_len=16", "--train.eval_batches=1", "--train.progress=False"]
    tiny += ["--train.checkpoint_every=3", "--train.sample_tokens=0", "--train.threads=1"]
    assert main(["train", *tiny, f"--data={corpus}", f"--out={out}"]) == 0
    ck = latest_checkpoint(out)
    evil_data, evil_cache = tmp_path / "attacker-data", tmp_path / "attacker-cache"
    evil_data.mkdir()
    (evil_data / "x.txt").write_text("attacker text " * 1000)
    _edit_run_json(ck, path=str(evil_data), cache_dir=str(evil_cache))
    capsys.readouterr()
    # without --data the resume refuses rather than read the directory the checkpoint names
    assert main(["train", f"--resume={out}", "--train.steps=4"]) == 2
    assert "takes no paths from a checkpoint" in capsys.readouterr().err
    assert main(["train", f"--resume={out}", "--train.steps=4", f"--data={corpus}"]) == 0
    err = capsys.readouterr().err
    assert f"data from {corpus}" in err and "my-cache" in err  # it says what it uses
    assert not evil_cache.exists()
    assert json.loads((out / "run.json").read_text())["data"]["cache_dir"] is None
    assert latest_checkpoint(out).name == "step_00000004"
