"""Expected failures of `anydepth train|generate` are one line on stderr and exit code 2."""

from __future__ import annotations

import json

import pytest
import torch

from anydepth import ModelConfig, build_model
from anydepth.cli import main


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    d = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    build_model(ModelConfig(vocab_size=256, dim=16, depth=1, heads=2, max_seq_len=32)).save_pretrained(d)
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
    from anydepth.model.lm import from_pretrained

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
