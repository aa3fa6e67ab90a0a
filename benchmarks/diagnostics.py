"""Cost of ``--train.diagnostics_every``: one logged step's diagnostics against a training step.

The training step is the trainer's: batch sampled from the corpus, forward, cross-entropy,
backward, gradient clipping, AdamW step. A logged step adds what ``TrainingDiagnostics.after_step``
does at that step: the copy of the weights before the update (taken once per logged step), the
diagnostics forward and ``autograd.grad`` on the step's batch, the update ratios and one line of
``diagnostics.jsonl``. With logging every N steps the overhead per step is
``t_log / (N * t_step)``. Rounds interleave 10 training steps and 2 logged calls; process CPU time
and wall time, medians over rounds.

    python benchmarks/diagnostics.py                     # the default run's model, batch 16 x 128
    python benchmarks/diagnostics.py --depth 64 --dim 64 --seq-len 64
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from anydepth.model import presets
from anydepth.model.build import build_model
from anydepth.train.config import DataConfig, TrainConfig
from anydepth.train.data import load_corpus, sample_batch
from anydepth.train.diagnostics import TrainingDiagnostics
from anydepth.train.optim import build_optimizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--preset", default="prenorm")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--every", type=int, default=100)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = presets.get(a.preset, vocab_size=256, dim=a.dim, depth=a.depth, heads=4, max_seq_len=a.seq_len)
    model = build_model(cfg)
    tc = TrainConfig(steps=10_000, batch_size=a.batch_size, seq_len=a.seq_len)
    opt = build_optimizer(model, tc)
    tokens, _ = load_corpus(DataConfig())
    out = tempfile.mkdtemp()
    diag = TrainingDiagnostics(model, 1, out)
    step = 0

    def train_step():
        nonlocal step
        x, y = sample_batch(tokens, step=step, seed=0, batch_size=a.batch_size, seq_len=a.seq_len)
        logits = model(x)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        return x, y

    def timed(fn):
        c, w = time.process_time(), time.perf_counter()
        fn()
        return time.process_time() - c, time.perf_counter() - w

    for _ in range(3):
        train_step()
    steps_cpu, steps_wall, log_cpu, log_wall = [], [], [], []
    for _ in range(a.rounds):
        for _ in range(10):
            c, w = timed(train_step)
            steps_cpu.append(c)
            steps_wall.append(w)
        for _ in range(2):
            batch = train_step()
            c, w = timed(lambda batch=batch: diag.after_step(step, *batch))
            log_cpu.append(c)
            log_wall.append(w)
    diag.finish()
    ts_c, ts_w = statistics.median(steps_cpu), statistics.median(steps_wall)
    tl_c, tl_w = statistics.median(log_cpu), statistics.median(log_wall)
    print(f"model: {a.preset} depth {a.depth} dim {a.dim}, batch {a.batch_size} x {a.seq_len}, threads {a.threads}")
    print(f"training step      cpu {ts_c * 1e3:8.1f} ms   wall {ts_w * 1e3:8.1f} ms   (median of {len(steps_cpu)})")
    print(f"logged diagnostics cpu {tl_c * 1e3:8.1f} ms   wall {tl_w * 1e3:8.1f} ms   (median of {len(log_cpu)})")
    for n in sorted({1, 10, a.every}):
        print(f"every {n:>4} steps: +{100 * tl_c / (n * ts_c):.2f}% cpu, +{100 * tl_w / (n * ts_w):.2f}% wall per step")


if __name__ == "__main__":
    main()
