"""Trainer overhead: `anydepth.train.loop.run` against a bare forward/backward/step loop, same model.

Both sides train the same model on batches of the same shape with AdamW at the same threads. The
bare loop is ``logits = model(x); F.cross_entropy(...).backward(); opt.step(); opt.zero_grad()``
on pre-built batches. The trainer adds batch sampling from the memory-mapped corpus, the learning
rate schedule, the process-averaged loss check, gradient clipping (``--clip``), logging and the
progress bar. Tokens/s of the trainer is the median of its metrics.jsonl intervals (the first one,
which includes warm-up, is dropped); rounds alternate bare/trainer to spread machine noise evenly
and the best round of each side is reported.

    python benchmarks/trainer.py                       # default model and 12-layer dim-256
    python benchmarks/trainer.py --models default --steps 20 --rounds 1 --threads 2

A second measurement times the trainer's per-step additions on their own in process CPU time
(robust to other jobs on the machine) against the bare step's CPU time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from anydepth.model import presets
from anydepth.model.build import build_model
from anydepth.train.config import DataConfig, RunConfig, TrainConfig, default_model
from anydepth.train.loop import run
from anydepth.train.optim import build_optimizer

MODELS = {
    "default": default_model,
    "12L-d256": lambda: presets.prenorm(dim=256, depth=12, heads=4, max_seq_len=256),
}


def bare_tokens_per_s(model_cfg, train: TrainConfig, steps: int) -> float:
    torch.manual_seed(0)
    model = build_model(model_cfg)
    opt = build_optimizer(model, train)
    g = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, model_cfg.vocab_size, (train.batch_size, train.seq_len + 1), generator=g)
        for _ in range(4)
    ]
    times = []
    for i in range(steps + 2):
        w = batches[i % len(batches)]
        t0 = time.perf_counter()
        logits = model(w[:, :-1])
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    per_step = statistics.median(times[2:])  # the first two include allocator and kernel warm-up
    return train.batch_size * train.seq_len / per_step


def extras_cpu_fraction(model_cfg, train: TrainConfig, steps: int) -> tuple[float, float]:
    """``(bare CPU s/step, extra CPU s/step)``: the trainer's per-step additions timed on their own.

    Process CPU time (all threads) instead of wall time, so other jobs on a shared machine inflate
    both parts alike instead of whichever happened to run while they were busy. The additions are
    the trainer's: batch sampling from the memory-mapped corpus, the schedule, the loss read-back
    with its finiteness check, gradient clipping and the progress-bar update.
    """
    import math

    from tqdm.auto import tqdm

    from anydepth.train.data import load_corpus, sample_batch
    from anydepth.train.optim import lr_at, set_lr

    tokens, _ = load_corpus(DataConfig(max_bytes=2_000_000))
    torch.manual_seed(0)
    model = build_model(model_cfg)
    opt = build_optimizer(model, train)
    bar = tqdm(total=steps + 2, disable=True)
    bare, extra = [], []
    for step in range(steps + 2):
        t0 = time.process_time()
        set_lr(opt, lr_at(step, train))
        x, y = sample_batch(tokens, step=step, seed=0, batch_size=train.batch_size, seq_len=train.seq_len)
        t1 = time.process_time()
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        t2 = time.process_time()
        finite = math.isfinite(float(loss.detach()))
        if finite and train.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.clip, foreach=True)
        bar.update(1)
        t3 = time.process_time()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t4 = time.process_time()
        bare.append((t2 - t1) + (t4 - t3))
        extra.append((t1 - t0) + (t3 - t2))
    return statistics.median(bare[2:]), statistics.median(extra[2:])


def trainer_tokens_per_s(model_cfg, train: TrainConfig, steps: int, tmp: Path, tag: str) -> float:
    cfg = RunConfig(
        model=model_cfg,
        train=TrainConfig(
            **{
                **train.__dict__,
                "steps": steps,
                "eval_every": 0,
                "eval_batches": 1,
                "checkpoint_every": 0,
                "sample_tokens": 0,
                "log_every": max(1, steps // 6),
            }
        ),
        data=DataConfig(max_bytes=2_000_000),
        out=str(tmp / tag),
    )
    run(cfg)
    lines = [json.loads(x) for x in (tmp / tag / "metrics.jsonl").read_text().splitlines()]
    rates = [x["tokens_per_s"] for x in lines if "tokens_per_s" in x][1:]
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="default,12L-d256", help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--clip", type=float, default=1.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train = TrainConfig(
        batch_size=args.batch_size, seq_len=args.seq_len, clip=args.clip, threads=args.threads, progress=False
    )
    print(
        f"torch {torch.__version__}, {args.threads} threads, batch {args.batch_size} x {args.seq_len} tokens"
    )
    print(f"{'model':<10} {'bare tok/s':>11} {'trainer tok/s':>14} {'overhead':>9}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name in args.models.split(","):
            model_cfg = MODELS[name]()
            bare, trainer = [], []
            for r in range(args.rounds):
                bare.append(bare_tokens_per_s(model_cfg, train, args.steps))
                trainer.append(trainer_tokens_per_s(model_cfg, train, args.steps, tmp, f"{name}-{r}"))
            # Best round of each: on a shared machine other jobs only ever slow a round down.
            b, t = max(bare), max(trainer)
            cpu_bare, cpu_extra = extras_cpu_fraction(model_cfg, train, args.steps)
            print(
                f"{name:<10} {b:>11.0f} {t:>14.0f} {b / t - 1:>+9.1%}   "
                f"CPU/step: bare {cpu_bare * 1e3:.0f} ms, trainer additions {cpu_extra * 1e3:.1f} ms "
                f"({cpu_extra / cpu_bare:+.2%})"
            )


if __name__ == "__main__":
    main()
