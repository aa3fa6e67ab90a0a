"""Per-block cost of a very deep, narrow model's training step: forward, backward and optimizer.

At 1,000 blocks of width 32 the step is bound by per-layer overhead (a few hundred small ops per block),
not by FLOPs. This measures where the time per block goes and what torch's own options change:

- optimizer: ``torch.optim.Adam`` (torch's default, ``foreach`` on CPU) against ``AdamW(fused=True)``
  (one fused kernel per step instead of ~25 ops per tensor);
- intra-op threads: 1 against 2 (tiny ops pay the thread pool's synchronisation).

Variants take turns step by step in one process; medians of ``--steps`` steps each.

    python benchmarks/deep_step.py                         # DeepNorm, 256 blocks, width 32
    python benchmarks/deep_step.py --preset deepnorm --depth 1000 --steps 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from anydepth.model import presets
from anydepth.model.build import build_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="deepnorm")
    p.add_argument("--depth", type=int, default=256)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=7)
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = presets.get(args.preset, dim=args.dim, heads=max(1, args.dim // 16), max_seq_len=args.seq,
                      vocab_size=256, depth=args.depth)
    x = torch.randint(0, 256, (args.batch, args.seq + 1))
    variants = {}
    for opt_name in ("adam-foreach", "adamw-fused"):
        for threads in (1, 2):
            model = build_model(cfg)
            opt = (torch.optim.Adam(model.parameters(), lr=1e-4, foreach=True) if opt_name == "adam-foreach"
                   else torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True))
            variants[(opt_name, threads)] = (model, opt, {"fwd": [], "bwd": [], "opt": []})
    for step in range(args.steps + 1):
        for (_, threads), (model, opt, times) in variants.items():
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            logits = model(x[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1))
            t1 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            t3 = time.perf_counter()
            if step:  # the first step builds the optimizer state
                times["fwd"].append(t1 - t0)
                times["bwd"].append(t2 - t1)
                times["opt"].append(t3 - t2)
    print(f"{args.preset}, {args.depth} blocks, width {args.dim}, batch {args.batch} x {args.seq}; "
          f"median of {args.steps} steps; ms per block")
    print(f"{'optimizer':14s} {'threads':>7s} {'forward':>8s} {'backward':>8s} {'optimizer':>9s} {'step':>8s}"
          f" {'step (s)':>8s}")
    base = None
    for (opt_name, threads), (_, _, t) in variants.items():
        med = {k: statistics.median(v) for k, v in t.items()}
        total = sum(med.values())
        base = base or total
        per = {k: 1000 * v / args.depth for k, v in med.items()}
        print(f"{opt_name:14s} {threads:7d} {per['fwd']:8.3f} {per['bwd']:8.3f} {per['opt']:9.3f} "
              f"{1000 * total / args.depth:8.3f} {total:8.2f}  ({total / base:.2f}x)")


if __name__ == "__main__":
    main()
