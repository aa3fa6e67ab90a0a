"""Depth diagnostics (anydepth.diagnose) against independent computations."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from anydepth.diagnose import amax_gain, diagnose, findings, sublayers
from anydepth.model import presets
from anydepth.model.build import build_model
from anydepth.model.pretrained import save_pretrained
from anydepth.registry import RESIDUALS


def _batches(n=2, b=4, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = torch.randint(0, 256, (b, seq + 1), generator=g)
        out.append((t[:, :-1], t[:, 1:]))
    return out


def _model(preset="prenorm", depth=3, dim=32, seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(presets.get(preset, vocab_size=256, dim=dim, heads=4, max_seq_len=32, depth=depth, **kw))


def test_gradients_equal_autograd_of_the_same_loss():
    model = _model(emb_dropout=0.0)
    batches = _batches()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    r = diagnose(model, batches, output_change=False)
    # independent: the same mean cross-entropy, the model run block by block without hooks
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    h, _ = model.embed(x)
    streams = []
    for blk in model.blocks:
        for res, br in zip(blk.residuals(), blk.branches()):
            h = res(h, br)
            streams.append(h)
    logits = model.logits(model.norm(h))
    loss = F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))
    assert r.loss == pytest.approx(float(loss.detach()), rel=1e-6)
    for i, blk in enumerate(model.blocks):
        for j, (res, br) in enumerate(zip(blk.residuals(), blk.branches())):
            params = list(br.parameters()) + list(res.parameters())
            g = torch.autograd.grad(loss, params, retain_graph=True)
            want = torch.sqrt(sum(t.double().pow(2).sum() for t in g))
            assert r.grad_norm[2 * i + j] == pytest.approx(float(want), rel=1e-5)
    sg = torch.autograd.grad(loss, streams)
    for k, (t, g) in enumerate(zip(streams, sg)):
        assert r.stream_grad_rms[k] == pytest.approx(float(g.pow(2).mean().sqrt()), rel=1e-5)
        assert r.stream_rms[k] == pytest.approx(float(t.detach().pow(2).mean().sqrt()), rel=1e-6)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.grad is None, n


def test_diagnose_leaves_grad_and_rng_alone():
    model = _model()
    torch.manual_seed(5)
    diagnose(model, _batches(), output_change=True)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))
    assert all(p.grad is None for p in model.parameters())


def test_amax_gain_of_known_matrices():
    a = torch.tensor([[1.0, -2.0], [3.0, 0.5]])  # row sums 3, 3.5; column sums 4, 2.5
    assert float(amax_gain([a])) == 4.0
    b = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    p = b @ a  # applied a first, then b: [[3, 0.5], [2, -4]] -> rows 3.5, 6; columns 5, 4.5
    assert float(amax_gain([a, b])) == pytest.approx(6.0)
    ds = torch.tensor([[0.2, 0.8], [0.8, 0.2]])
    assert float(amax_gain([ds] * 10)) == pytest.approx(1.0)
    batched = torch.stack([a, p])
    assert amax_gain([batched]).tolist() == pytest.approx([4.0, 6.0])


def test_amax_gain_of_a_hyper_model_with_scaled_mixing():
    model = _model(residual=RESIDUALS.config("hyper", streams=2, dynamic=False), depth=2)
    with torch.no_grad():
        for s in sublayers(model):
            s.residual.static_alpha[:, 1:] = 1.5 * torch.eye(2)
    r = diagnose(model, _batches(1), output_change=False)
    assert r.amax_gain == pytest.approx(1.5**4, rel=1e-6)
    assert [f.name for f in r.findings] == []  # 5.06 < 10
    with torch.no_grad():
        for s in sublayers(model):
            s.residual.static_alpha[:, 1:] = 2.0 * torch.eye(2)
    assert "amax-gain" in [f.name for f in findings(model, _batches(1), output_change=False)]


@pytest.mark.slow
def test_xiong_last_layer_gradient_post_ln_keeps_its_scale_pre_ln_shrinks():
    # Xiong et al. 2020, Theorem 1: at init the last layer's gradient is O(d sqrt(ln d)) for post-LN,
    # independent of depth, and O(d sqrt(ln d / L)) for pre-LN: from 12 to 48 layers it halves.
    batches = _batches(1, b=8, seq=32)

    def top(preset, depth):
        r = diagnose(_model(preset, depth=depth), batches, output_change=False, attention_logits=False)
        return r.block_grad_norm()[-1]

    pre, post = top("prenorm", 48) / top("prenorm", 12), top("postnorm", 48) / top("postnorm", 12)
    assert pre < 0.7, pre  # measured 0.45 (1/sqrt(4) = 0.5)
    assert post > 0.85, post  # measured 1.41
    assert top("postnorm", 48) > 3 * top("prenorm", 48)


def _names(model, **kw):
    return [f.name for f in findings(model, _batches(2, b=4, seq=32), **kw)]


def test_a_healthy_12_layer_pre_ln_gets_no_finding():
    r = diagnose(_model("prenorm", depth=12), _batches(2, b=4, seq=32))
    assert r.findings == []
    assert r.output_change is not None and r.max_attention_logit is not None


def _growing_branches(depth):
    # every branch's output projection scaled by 1.5^i: late sublayers dominate the stream and the loss
    model = _model("prenorm", depth=depth)
    with torch.no_grad():
        for i, s in enumerate(sublayers(model)):
            out = s.branch.to_out if s.kind == "attn" else s.branch.proj_out
            out.weight.mul_(1.5**i)
    return model


def test_falling_gradient_fires_when_the_skip_is_drowned():
    # post-LN with a large constant (bias) in every feed-forward output: LN(x + F(x) + c) passes only
    # about |x| / |c| of the gradient down, so the lower blocks get almost none
    model = _model("postnorm", depth=6)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for s in sublayers(model):
            if s.kind == "ff":
                s.branch.proj_out.bias.copy_(10 * torch.randn(32, generator=g))
    r = diagnose(model, _batches(1), output_change=False)
    bg = r.block_grad_norm()
    assert bg[-1] > 10 * bg[0]
    assert "falling-gradient" in [f.name for f in r.findings]
    assert "falling-gradient" not in _names(_model("postnorm", depth=6), output_change=False)


def test_stream_growth_fires_when_branches_grow_with_depth():
    r = diagnose(_growing_branches(6), _batches(1), output_change=False)
    assert max(r.stream_rms) > 30 * r.stream_rms[0]
    assert "stream-growth" in [f.name for f in r.findings]


def test_attention_logits_fire_on_scaled_queries_and_keys():
    model = _model("prenorm", depth=2)
    with torch.no_grad():
        for s in sublayers(model):
            if s.kind == "attn":
                s.branch.to_qkv.weight[: 2 * 32].mul_(10.0)
    r = diagnose(model, _batches(1), output_change=False)
    assert r.max_attention_logit > 50
    assert "attention-logits" in [f.name for f in r.findings]


def test_output_change_fires_when_small_weights_carry_the_output():
    # every LayerNorm gain at 0.003: a 1e-3 perturbation is a third of each gain, and the post-LN
    # output (no final norm) is scaled by the last gain
    model = _model("postnorm", depth=2)
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ == "LayerNorm":
                m.weight.fill_(0.003)
    assert "output-change" in _names(model, attention_logits=False)
    assert "output-change" not in _names(_model("postnorm", depth=2), attention_logits=False)


def test_nonfinite_fires_on_a_broken_weight():
    model = _model("prenorm", depth=2)
    with torch.no_grad():
        model.blocks[1].ff.proj_in.weight[0, 0] = float("inf")
    assert "nonfinite" in _names(model, output_change=False)


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "anydepth", "diagnose", *args], capture_output=True, text=True, cwd=cwd
    )


def test_cli_writes_report_and_heatmap(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 400)
    out = tmp_path / "d"
    p = _cli(
        "--preset", "postnorm", "--model.depth=4", "--model.dim=32", "--train.seq_len=32", "--train.batch_size=4",
        "--batches", "2", f"--data.path={corpus}", f"--data.cache_dir={tmp_path / 'cache'}", f"--out={out}",
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    data = json.loads((out / "diagnose.json").read_text())
    assert len(data["grad_norm"]) == 8 and data["meta"]["residual"] == "postnorm"
    assert (out / "diagnose.png").stat().st_size > 1000
    assert "postnorm at 4 blocks" in p.stdout


def test_cli_config_that_does_not_build_gives_the_builders_error(tmp_path):
    p = _cli("--preset", "postnorm", "--model.stack=reversible", cwd=tmp_path)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "invalid model configuration [reversible-additive]" in lines[0]


def test_cli_diagnoses_a_saved_model_and_reports_a_config_that_does_not_build(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 400)
    model = _model("admin", depth=2)
    save_pretrained(model, tmp_path / "saved")
    data = [f"--data.path={corpus}", f"--data.cache_dir={tmp_path / 'cache'}", "--train.seq_len=16"]
    p = _cli("--checkpoint", str(tmp_path / "saved"), "--batches=1", *data, f"--out={tmp_path / 'd'}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    report = json.loads((tmp_path / "d" / "diagnose.json").read_text())
    assert report["meta"]["residual"] == "admin" and len(report["residual_weights"]) == 4
    assert report["residual_weights"][0]["w"] == pytest.approx(float(model.blocks[0].res_attn.omega))

    cfg = json.loads((tmp_path / "saved" / "config.json").read_text())
    cfg["stack"] = {"kind": "reversible"}
    (tmp_path / "saved" / "config.json").write_text(json.dumps(cfg))
    p = _cli("--checkpoint", str(tmp_path / "saved"), *data, cwd=tmp_path)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "invalid model configuration [reversible-additive]" in lines[0], p.stderr


def test_cli_model_overrides_do_not_apply_to_a_checkpoint(tmp_path):
    p = _cli("--checkpoint", str(tmp_path), "--model.depth=4", cwd=tmp_path)
    assert p.returncode == 2 and "--model.depth does not apply to --checkpoint" in p.stderr


def test_hyper_connection_gradients_equal_autograd_of_the_same_loss():
    # the diagnostics hold every stream's gradient (through the fused hyper-connection kernels), which
    # must come back as autograd computes it
    model = _model("hyper", depth=2)
    (x, y), = _batches(1, b=4, seq=32)
    r = diagnose(model, [(x, y)], output_change=False)
    first = model.blocks[0].first_residual
    h = first.expand(model.embed(x)[0])
    streams = []
    for blk in model.blocks:
        for res, br in zip(blk.residuals(), blk.branches()):
            h = res(h, br)
            streams.append(h)
    logits = model.logits(model.norm(first.reduce(h)))
    loss = F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))
    sg = torch.autograd.grad(loss, streams, retain_graph=True)
    assert r.stream_grad_rms == pytest.approx([float(g.pow(2).mean().sqrt()) for g in sg], rel=1e-5)
    blk = model.blocks[1]
    gp = torch.autograd.grad(loss, list(blk.attn.parameters()) + list(blk.res_attn.parameters()))
    assert r.grad_norm[2] == pytest.approx(float(torch.sqrt(sum(g.double().pow(2).sum() for g in gp))), rel=1e-5)
