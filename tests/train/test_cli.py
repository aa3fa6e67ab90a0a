"""`anydepth train|generate|study`: parsing, one-line errors with exit code 2, and a real run."""

from __future__ import annotations

import json
import sys

import pytest

from anydepth.cli import main, parse_train_args

TINY = [
    "--model.dim=32",
    "--model.depth=2",
    "--model.heads=2",
    "--model.max_seq_len=64",
    "--train.steps=3",
    "--train.batch_size=2",
    "--train.seq_len=16",
    "--train.eval_batches=1",
    "--train.checkpoint_every=3",
    "--train.progress=False",
    "--train.threads=1",
    "--train.sample_tokens=6",
]


def test_defaults_and_dotted_overrides():
    cfg = parse_train_args([])
    assert cfg.model.residual.kind == "prenorm" and cfg.model.depth == 12 and cfg.train.seq_len == 128
    assert cfg.model.final_norm and cfg.model.dim == 128
    assert cfg.data.path is None and cfg.out is None
    cfg = parse_train_args(
        ["--model.depth=4", "--model.residual", "admin", "--train.lr=5e-4", "--train.betas", "0.8", "0.9"]
    )
    assert cfg.model.depth == 4 and cfg.model.residual.kind == "admin" and cfg.model.dim == 128
    assert cfg.train.lr == 5e-4 and cfg.train.betas == (0.8, 0.9)
    assert parse_train_args(["--data", "x.txt"]).data.path == "x.txt"


def test_preset_keeps_its_component_options_and_default_size():
    cfg = parse_train_args(["--preset", "hyper", "--model.depth=3"])
    assert cfg.model.residual.kind == "hyper" and cfg.model.residual.streams == 4
    assert cfg.model.depth == 3 and cfg.model.dim == 128


def test_config_file_model_or_run(tmp_path):
    from anydepth.model import presets

    model = presets.deepnorm(dim=64, depth=5)
    p = tmp_path / "m.json"
    p.write_text(model.to_json())
    cfg = parse_train_args(["--config", str(p), "--train.steps=9"])
    assert cfg.model.to_dict() == model.to_dict() and cfg.train.steps == 9
    run_file = tmp_path / "r.json"
    run_file.write_text(json.dumps({"model": model.to_dict(), "train": {"steps": 4, "lr": 1e-4}}))
    cfg = parse_train_args([f"--config={run_file}"])
    assert cfg.train.steps == 4 and cfg.train.lr == 1e-4 and cfg.model.depth == 5


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--model.dept=3"], "unknown option --model.dept; did you mean --model.depth?"),
        (["--train.stepz", "3"], "unknown option --train.stepz; did you mean --train.steps?"),
        (["--train.steps=abc"], "--train.steps"),
        (["--train.schedule=linear"], "'linear' for --train.schedule; choose one of: cosine, constant"),
        (["--model.residual=magic"], "'magic' for --model.residual"),
        (["--preset", "nope"], "unknown --preset 'nope'"),
        (["--train.lr=-1"], "train.lr must be a positive number"),
        (["--model.dim=30", "--model.heads=4"], "not divisible by heads=4"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(argv, needle, capsys, tmp_path):
    out = tmp_path / "never"
    code = main(["train", *argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("anydepth train: error: ") and needle in lines[0], lines[0]
    assert not out.exists()


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--data", "/nonexistent/file.txt"], "does not exist"),
        (["--train.seq_len=128"], "exceeds model.max_seq_len=64"),
    ],
)
def test_bad_data_or_length_is_one_line_and_writes_nothing(extra, needle, capsys, tmp_path, corpus):
    out = tmp_path / "never"
    argv = ["train", *TINY, f"--data={corpus}", *extra, f"--out={out}", f"--data.cache_dir={tmp_path}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_resume_with_other_model_is_one_line_error(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    common = [*TINY, f"--data={corpus}", f"--data.cache_dir={tmp_path}"]
    assert main(["train", *common, f"--out={out}"]) == 0
    capsys.readouterr()
    assert main(["train", *common, "--model.depth=3", f"--resume={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.depth: checkpoint 2 != 3" in err[0]
    # With no model options a resume takes the model and settings from the run itself; never its paths.
    assert main(["train", f"--resume={out}", "--train.steps=4"]) == 2
    assert "pass --data.path" in capsys.readouterr().err
    assert main(["train", f"--resume={out}", "--train.steps=4", f"--data={corpus}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4
    capsys.readouterr()

    assert main(["generate", "--checkpoint", str(out), "--prompt", "def ", "--max-new-tokens", "5"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("def ")
    assert main(["generate", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_unknown_command_and_missing_study(capsys, monkeypatch):
    assert main(["trian"]) == 2
    assert "did you mean `anydepth train`" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "anydepth.study.cli", None)  # simulate an install without the study
    assert main(["study"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "study" in err[0]
