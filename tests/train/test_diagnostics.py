"""--train.diagnostics_every: the per-layer log, its findings, and an unchanged trajectory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file
from tiny_runs import tiny_model

from anydepth.train.config import TrainConfig
from anydepth.train.loop import run


def _weights(out):
    ck = sorted((out / "checkpoints").glob("step_*"))[-1]
    return load_file(str(ck / "model.safetensors"))


def test_logging_does_not_change_the_trajectory(make_run, tmp_path):
    # dropout on, so a diagnostics pass that drew from the RNG would change the weights
    model = tiny_model(depth=3, emb_dropout=0.1)
    run(make_run("plain", model=model))
    summary = run(make_run("logged", model=model, diagnostics_every=1))
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "logged")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].equal(b[k]), k
    lines = (tmp_path / "logged" / "diagnostics.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert len(recs[0]["names"]) == 6 and len(recs[0]["grad_norm"]) == 6
    # every=1: the weights are copied before each update, the first one included
    assert all(0 < u < 1 for r in recs for u in r["update_ratio"])
    assert summary["diagnostics"]["first_step"] == {}
    assert (tmp_path / "logged" / "diagnostics.png").stat().st_size > 1000


def test_update_ratio_matches_the_weights_it_moved(make_run, tmp_path):
    # steps 1..6, logged every 3: the ratio at step 6 is ||W6 - W5|| / ||W5|| over the sublayer's
    # parameters, both read back from the checkpoints of steps 5 and 6
    run(make_run("five", steps=6, diagnostics_every=3, checkpoint_every=5))
    recs = [json.loads(x) for x in (tmp_path / "five" / "diagnostics.jsonl").read_text().splitlines()]
    w5 = load_file(str(tmp_path / "five" / "checkpoints" / "step_00000005" / "model.safetensors"))
    w6 = _weights(tmp_path / "five")
    prefix = "stack.blocks.1.ff."
    du = sum(float((w6[k] - w5[k]).double().pow(2).sum()) for k in w6 if k.startswith(prefix))
    w = sum(float(w5[k].double().pow(2).sum()) for k in w5 if k.startswith(prefix))
    names = recs[0]["names"]
    i = names.index("stack.blocks.1.ff")
    # the sublayer's parameters are the branch's and its residual's norm (res_ff)
    du += sum(float((w6[k] - w5[k]).double().pow(2).sum()) for k in w6 if k.startswith("stack.blocks.1.res_ff."))
    w += sum(float(w5[k].double().pow(2).sum()) for k in w5 if k.startswith("stack.blocks.1.res_ff."))
    assert recs[1]["step"] == 6
    assert recs[1]["update_ratio"][i] == pytest.approx((du / w) ** 0.5, rel=1e-5)


def test_first_step_of_a_finding_is_in_the_summary(make_run):
    summary = run(make_run("hot", lr=5.0, warmup=0, clip=0.0, diagnostics_every=2))
    assert summary["diagnostics"]["first_step"].get("update-ratio") == 2


@pytest.mark.parametrize("every", [-1, 7])
def test_bad_diagnostics_every_names_the_flag(every):
    with pytest.raises(ValueError, match="diagnostics_every"):
        TrainConfig(steps=6, diagnostics_every=every)


def test_cli_bad_diagnostics_every_is_one_line_exit_2(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "anydepth", "train", "--train.steps=10", "--train.diagnostics_every=20"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "--train.diagnostics_every" in lines[0], p.stderr
