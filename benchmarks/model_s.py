"""Model S's training step per depth on this machine, and what the study's budgets cost with it.

Times the depth study's own model (``anydepth.study.runner.calibrate``: the runner's model, Adam, two
untimed and three timed steps, median) for a few schemes at 12, 64 and 256 layers, at the batch each
plan uses there, with 1 and 2 torch threads, then prints the quick and full plans' training time from
those figures (2 workers x 1 thread, or 1 worker x 2 threads).

    python benchmarks/model_s.py
    python benchmarks/model_s.py --schemes preln,deepnorm --depths 12,64
"""

from __future__ import annotations

import argparse

import torch

from anydepth.study.runner import TrainerRunner, calibrate, estimate_seconds
from anydepth.study.sweep import RunSpec, full_plan, quick_plan


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schemes", default="preln,deepnorm,rezero,hyper4")
    p.add_argument("--depths", default="12,64,256")
    args = p.parse_args()
    schemes = args.schemes.split(",")
    depths = [int(d) for d in args.depths.split(",")]
    runner = TrainerRunner()
    timed: dict[tuple[str, int, int], dict[int, float]] = {}  # (scheme, depth, batch) -> {threads: s/step}
    print(f"{'scheme':10s} {'layers':>6s} {'batch':>5s} {'1 thread (s)':>13s} {'2 threads (s)':>14s}")
    plans = (("quick", quick_plan()), ("full", full_plan()))
    for depth in depths:
        for batch in sorted({plan.batch(depth) for _, plan in plans}, reverse=True):
            for scheme in schemes:
                spec = RunSpec(scheme=scheme, depth=depth, seed=0, steps=1, batch_size=batch)
                row = {}
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    row[threads] = calibrate([spec], runner)[(scheme, depth)]
                timed[(scheme, depth, batch)] = row
                print(f"{scheme:10s} {depth:6d} {batch:5d} {row[1]:13.3f} {row[2]:14.3f}", flush=True)
    for name, plan in plans:
        specs = plan.runs() + plan.follow_placeholders()
        rates = {(s, d): timed[(s, d, b)] for (s, d, b) in timed if b == plan.batch(d)}
        known = [s for s in specs if (s.scheme, s.depth) in rates]
        one = estimate_seconds(known, 2, {k: v[1] for k, v in rates.items()})
        two = estimate_seconds(known, 1, {k: v[2] for k, v in rates.items()})
        print(f"{name} plan, the {len(known)} of {len(specs)} runs timed here: {one / 60:.0f} min with 2 workers x 1 "
              f"thread, {two / 60:.0f} min with 1 worker x 2 threads")


if __name__ == "__main__":
    main()
