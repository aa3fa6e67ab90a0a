"""Expected failures of `anydepth train|generate` are one line on stderr and exit code 2."""

from __future__ import annotations

import json

import pytest
import torch

from anydepth import ModelConfig, build_model, save_pretrained
from anydepth.cli import main


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    d = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    save_pretrained(build_model(ModelConfig(vocab_size=256, dim=16, depth=1, heads=2, max_seq_len=32)), d)
    return d


def one_line_error(capsys, needle: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert needle in err[0], err[0]
    return err[0]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--top-k", "0"], "--top-k must be an int >= 1"),
        (["--top-p", "2"], "--top-p must be in (0, 1]"),
        (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
        (["--temperature", "inf"], "--temperature must be a finite number >= 0"),
        (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
        (["--seed", str(2**70)], "--seed must be an integer in [0, 2**63)"),
    ],
)
def test_generate_bad_sampling_arguments(args, needle, pretrained, capsys):
    assert main(["generate", "--checkpoint", str(pretrained), "--max-new-tokens", "3", *args]) == 2
    one_line_error(capsys, needle)


def test_generate_temperature_zero_is_greedy_like_model_generate(pretrained, capsys):
    from anydepth.model.pretrained import from_pretrained

    argv = ["generate", "--checkpoint", str(pretrained), "--prompt", "ab", "--max-new-tokens", "5"]
    assert main([*argv, "--temperature", "0", "--seed", "1"]) == 0
    a = capsys.readouterr().out
    assert main([*argv, "--temperature", "0", "--seed", "2"]) == 0
    assert capsys.readouterr().out == a  # greedy: the seed does not matter
    model = from_pretrained(pretrained).eval()
    ids = model.generate(torch.tensor([list(b"ab")]), 5, temperature=0)[0].tolist()
    assert a == bytes(ids).decode("utf-8", errors="replace") + "\n"


def test_generate_config_holding_a_list(tmp_path, pretrained, capsys):
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors").write_bytes((pretrained / "model.safetensors").read_bytes())
    (d / "config.json").write_text("[1, 2]")
    assert main(["generate", "--checkpoint", str(d)]) == 2
    line = one_line_error(capsys, "config.json")
    assert "must be a JSON object" in line


def test_generate_weights_config_mismatch_lists_the_keys(tmp_path, pretrained, capsys):
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors").write_bytes((pretrained / "model.safetensors").read_bytes())
    cfg = json.loads((pretrained / "config.json").read_text())
    cfg["depth"] = 2
    (d / "config.json").write_text(json.dumps(cfg))
    assert main(["generate", "--checkpoint", str(d)]) == 2
    line = one_line_error(capsys, "does not match")
    assert "missing" in line and "stack.blocks.1." in line


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
    "--train.sample_tokens=0",
]


@pytest.fixture
def common(tmp_path, corpus):
    return [*TINY, f"--data={corpus}", f"--data.cache_dir={tmp_path / 'cache'}"]


def test_unavailable_device_is_one_line(tmp_path, common, capsys):
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert main(["train", *common, f"--train.device=cuda:{n + 7}", f"--out={tmp_path / 'r'}"]) == 2
    one_line_error(capsys, f"train.device='cuda:{n + 7}'")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "option, needle",
    [
        ("--model.max_seq_len=1000000000000", "ModelConfig.max_seq_len must be an int >= 1"),
        ("--model.dim=1000000000000", "ModelConfig.dim must be an int >= 1"),
        ("--model.vocab_size=1000000000000", "ModelConfig.vocab_size must be an int >= 1"),
        ("--model.depth=1000000000000", "ModelConfig.depth must be an int >= 1"),
    ],
)
def test_huge_sizes_are_one_line(option, needle, tmp_path, common, capsys):
    assert main(["train", *common, option, f"--out={tmp_path / 'r'}"]) == 2
    one_line_error(capsys, needle)


def test_out_a_regular_file_or_below_one(tmp_path, common, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["train", *common, f"--out={f}"]) == 2
    one_line_error(capsys, "is a file, not a directory")
    assert main(["train", *common, f"--out={f / 'sub'}"]) == 2
    one_line_error(capsys, "lies below the file")
    assert f.read_text() == "x"


def test_unwritable_out_is_refused_before_building(tmp_path, common, capsys, monkeypatch):
    import os

    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real(p, mode))
    assert main(["train", *common, f"--out={tmp_path / 'r'}"]) == 2
    one_line_error(capsys, "is not writable")


@pytest.mark.parametrize("error", ["enospc", "eacces", "safetensors"])
def test_failed_checkpoint_write_is_one_line_and_leaves_no_tmp(error, tmp_path, common, capsys, monkeypatch):
    import errno

    import safetensors.torch

    def failing(*a, **k):
        if error == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
        if error == "eacces":
            raise PermissionError(errno.EACCES, "Permission denied")
        raise safetensors.SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    out = tmp_path / "r"
    assert main(["train", *common, f"--out={out}"]) == 2
    one_line_error(capsys, "could not write checkpoint")
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_trainer_json_with_a_bad_step_names_the_file(tmp_path, common, capsys):
    out = tmp_path / "r"
    assert main(["train", *common, f"--out={out}"]) == 0
    capsys.readouterr()
    ck = next((out / "checkpoints").glob("step_*"))
    t = json.loads((ck / "trainer.json").read_text())
    t["step"] = "six"
    (ck / "trainer.json").write_text(json.dumps(t))
    # the manifest is a checksum anyone can recompute: the content must still be checked
    from anydepth.train.checkpoint import _digest

    m = json.loads((ck / "manifest.json").read_text())
    m["trainer.json"] = _digest(ck / "trainer.json")
    (ck / "manifest.json").write_text(json.dumps(m))
    assert main(["train", *common, f"--resume={ck}", "--train.steps=4"]) == 2
    line = one_line_error(capsys, "trainer.json")
    assert "'six'" in line


def test_binary_data_file_is_rejected(tmp_path, capsys):
    b = tmp_path / "prog"
    b.write_bytes(b"\x7fELF\x00\x01" * 1000)
    assert main(["train", *TINY, f"--data={b}", f"--data.cache_dir={tmp_path}", f"--out={tmp_path / 'r'}"]) == 2
    one_line_error(capsys, "is a binary file")


def test_bad_json_config_names_its_file(tmp_path, capsys):
    p = tmp_path / "run.json"
    p.write_text(json.dumps({"model": {"causal": None}}))
    assert main(["train", f"--config={p}"]) == 2
    line = one_line_error(capsys, str(p))
    assert "causal" in line


def test_unexpected_errors_keep_their_traceback(tmp_path, common, monkeypatch):
    import anydepth.train.loop as loop

    def boom(cfg):
        raise KeyError("a bug")

    monkeypatch.setattr(loop, "run", boom)
    with pytest.raises(KeyError):
        main(["train", *common, f"--out={tmp_path / 'r'}"])


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"depth": 100_000}, "ModelConfig.depth must be an int >= 1 (at most 10000), got 100000"),
        ({"residual": {"kind": "mhc", "sinkhorn_iters": 1e9}}, "residual[mhc].sinkhorn_iters must be an int"),
        ({"residual": {"kind": "mhc", "sinkhorn_iters": 10**9}}, "sinkhorn_iters must be an int >= 1 (at most 1000)"),
        ({"max_seq_len": 10**12}, "ModelConfig.max_seq_len must be an int >= 1"),
    ],
)
def test_generate_refuses_a_config_asking_for_too_much(change, needle, tmp_path, pretrained, capsys):
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors").write_bytes((pretrained / "model.safetensors").read_bytes())
    cfg = json.loads((pretrained / "config.json").read_text())
    cfg.update(change)
    (d / "config.json").write_text(json.dumps(cfg))
    assert main(["generate", "--checkpoint", str(d)]) == 2
    one_line_error(capsys, needle)


@pytest.mark.parametrize("device, needle", [("cuda:7", "device='cuda:7' but"), ("bogus", "is not a device name")])
def test_generate_unavailable_device_is_one_line(device, needle, pretrained, capsys):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    assert main(["generate", "--checkpoint", str(pretrained), "--device", device]) == 2
    one_line_error(capsys, needle)
