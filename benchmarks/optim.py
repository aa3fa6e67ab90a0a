"""Optimizer step alone: the trainer's AdamW (torch's fused kernel) against torch's other AdamW paths.

For each model (built by the builder, the trainer's two parameter groups) and each optimizer, random
gradients are set once and ``opt.step()`` is timed alone. The optimizers take turns step by step in
one process, so the host's drift over the run falls on all of them alike; the table gives the median
over ``--steps`` steps after 3 of warm-up, and the ratio to torch's default (on CPU the per-tensor
loop). Every row computes the same update, to float32 rounding. The rows:

    torch          torch.optim.AdamW(...)                  the per-tensor loop (torch's CPU default)
    torch foreach  torch.optim.AdamW(..., foreach=True)    every tensor through the multi-tensor path
    trainer        anydepth.train.optim.build_optimizer    torch.optim.AdamW(..., fused=True): one kernel
                                                           per group
    file           AdamW from ``--compare FILE``            another implementation's class, e.g. the
                                                           flat AdamW of anydepth 0.x (``git show
                                                           <rev>:src/anydepth/train/optim.py > old.py``)

    .venv/bin/python benchmarks/optim.py
    .venv/bin/python benchmarks/optim.py --steps 50 --threads 1
    .venv/bin/python benchmarks/optim.py --compare old.py
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch

from anydepth import ModelConfig, build_model
from anydepth.registry import RESIDUALS
from anydepth.train.config import TrainConfig
from anydepth.train.optim import build_optimizer, param_groups

# the benchmarks/hyper.py builder pair: 12 layers, dim 256, 4 heads, byte vocabulary
SIZE = dict(vocab_size=256, dim=256, depth=12, heads=4, max_seq_len=256)
MODELS = {
    "prenorm": lambda: ModelConfig(**SIZE, residual="prenorm"),
    "hyper4": lambda: ModelConfig(**SIZE, residual=RESIDUALS.config("hyper", streams=4)),  # 4 dynamic streams
}
SMALL = 4096  # tensors of at most this many elements are counted in the header line


OPTIMIZERS = {
    "torch": lambda model: torch.optim.AdamW(param_groups(model, 0.1), lr=3e-4),
    "torch foreach": lambda model: torch.optim.AdamW(param_groups(model, 0.1), lr=3e-4, foreach=True),
    "trainer": lambda model: build_optimizer(model, TrainConfig(lr=3e-4, warmup=0, weight_decay=0.1)),
}


def _compared(path: str):
    """The ``AdamW`` class of the Python file ``path``, built like the trainer's (its two groups)."""
    spec = importlib.util.spec_from_file_location("compared_optim", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--compare: {path!r} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "AdamW"):
        raise SystemExit(f"--compare: {path} defines no AdamW")
    return lambda model: module.AdamW(param_groups(model, 0.1), lr=3e-4)


def time_model(name: str, steps: int) -> None:
    torch.manual_seed(0)
    model = build_model(MODELS[name]())
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opts = {k: make(model) for k, make in OPTIMIZERS.items()}
    small = sum(p.numel() <= SMALL for p in params)
    times: dict[str, list[float]] = {k: [] for k in opts}
    for i in range(steps + 3):
        for k, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            if i >= 3:
                times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["torch"])
    print(f"\n{name}: {len(params)} tensors, {small} of at most {SMALL:,} elements")
    print(f"  {'optimizer':14s} {'median ms':>10s} {'vs torch':>9s}")
    for k, ts in times.items():
        med = statistics.median(ts)
        print(f"  {k:14s} {med * 1e3:10.2f} {med / base:8.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="timed steps per optimizer")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--compare", metavar="FILE", help="also time the AdamW class defined in this Python file")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS)}")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.compare:
        OPTIMIZERS["file"] = _compared(args.compare)
    print(f"torch {torch.__version__}, threads={args.threads}, steps={args.steps}")
    for name in args.models.split(","):
        if name not in MODELS:
            raise SystemExit(f"--models: unknown model {name!r}; choose from {', '.join(MODELS)}")
        time_model(name, args.steps)


if __name__ == "__main__":
    main()
