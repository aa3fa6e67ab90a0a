"""Optimizer step alone: ``anydepth.train.optim.AdamW`` against torch's AdamW, same tensors.

For each model (built by the builder, the trainer's two parameter groups) and each optimizer, random
gradients are set once and ``opt.step()`` is timed alone. The optimizers take turns step by step in
one process, so the host's drift over the run falls on all of them alike; the table gives the median
over ``--steps`` steps after 3 of warm-up, and the ratio to torch's default (on CPU the per-tensor
loop). Every row computes the same update: ``tests/train/test_optim.py`` checks that ours is bitwise
torch's. The rows:

    torch          torch.optim.AdamW(...)                  the per-tensor loop (torch's CPU default)
    torch foreach  torch.optim.AdamW(..., foreach=True)    every tensor through the multi-tensor path
    torch split    small tensors (at most 4,096 elements) through the multi-tensor path, the rest through
                   the per-tensor loop: on CPU the multi-tensor path is itself a loop over the tensors
    anydepth       anydepth.train.optim.AdamW(...)         small tensors as one flat tensor, large ones
                                                           through the per-tensor loop

    .venv/bin/python benchmarks/optim.py
    .venv/bin/python benchmarks/optim.py --steps 50 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from anydepth import ModelConfig, build_model
from anydepth.registry import RESIDUALS
from anydepth.train.optim import AdamW, param_groups

# the benchmarks/hyper.py builder pair: 12 layers, dim 256, 4 heads, byte vocabulary
SIZE = dict(vocab_size=256, dim=256, depth=12, heads=4, max_seq_len=256)
MODELS = {
    "prenorm": lambda: ModelConfig(**SIZE, residual="prenorm"),
    "hyper4": lambda: ModelConfig(**SIZE, residual=RESIDUALS.config("hyper", streams=4)),  # 4 dynamic streams
}
SMALL = 4096  # AdamW's default foreach_max_numel


def _split(groups: list[dict]) -> list[dict]:
    """Each group as two: its tensors of at most SMALL elements with foreach, the rest without."""
    out = []
    for g in groups:
        small = [p for p in g["params"] if p.numel() <= SMALL]
        large = [p for p in g["params"] if p.numel() > SMALL]
        out += [{**g, "params": small, "foreach": True}, {**g, "params": large, "foreach": False}]
    return [g for g in out if g["params"]]


OPTIMIZERS = {
    "torch": lambda groups: torch.optim.AdamW(groups, lr=3e-4),
    "torch foreach": lambda groups: torch.optim.AdamW(groups, lr=3e-4, foreach=True),
    "torch split": lambda groups: torch.optim.AdamW(_split(groups), lr=3e-4),
    "anydepth": lambda groups: AdamW(groups, lr=3e-4, foreach_max_numel=SMALL),
}


def time_model(name: str, steps: int) -> None:
    torch.manual_seed(0)
    model = build_model(MODELS[name]())
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opts = {k: make(param_groups(model, 0.1)) for k, make in OPTIMIZERS.items()}
    small = sum(p.numel() <= SMALL for p in params)
    times: dict[str, list[float]] = {k: [] for k in opts}
    for i in range(steps + 3):
        for k, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            if i >= 3:
                times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["torch"])
    print(f"\n{name}: {len(params)} tensors, {small} of at most 4,096 elements")
    print(f"  {'optimizer':14s} {'median ms':>10s} {'vs torch':>9s}")
    for k, ts in times.items():
        med = statistics.median(ts)
        print(f"  {k:14s} {med * 1e3:10.2f} {med / base:8.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="timed steps per optimizer")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS)}")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads={args.threads}, steps={args.steps}")
    for name in args.models.split(","):
        if name not in MODELS:
            raise SystemExit(f"--models: unknown model {name!r}; choose from {', '.join(MODELS)}")
        time_model(name, args.steps)


if __name__ == "__main__":
    main()
