"""Norm speed, side by side in one process: anydepth's RMSNorm configurations against torch's norms.

Measures forward (under ``no_grad``) and forward+backward (``y.backward(dy)``, gradients reset to None
each step) on an (8192, 1024) input in float32 and bfloat16, with ``torch.set_num_threads(2)``:

- ``anydepth rms (builder default)``: ``NORMS.build("rms", dim=d)``, i.e. ``RMSNorm.Config()``
  (eps 1e-6 inside the root), on the fused CPU kernel;
- ``anydepth rms (seed placement)``: the configuration of ``anydepth.compat.rmsnorm.RMSNorm(d)``, the
  original's defaults (eps 1e-8 outside the root);
- ``anydepth prms p=1/16``: ``NORMS.build("prms", dim=d)``, the statistic from the first 64 features;
- ``anydepth rms (eager)``: the builder default with the fused kernel switched off;
- ``torch.compile(anydepth rms)``: the builder default compiled by inductor (``--inductor``; slow to build);
- ``nn.LayerNorm`` (with bias), ``nn.RMSNorm`` (eps 1e-6), and the naive formula
  ``x * rsqrt(mean(x^2) + eps) * w`` in eager torch.

Implementations run round-robin (a few steps of each, repeated), so load from other processes spreads
over all of them; the script reports the CPU time other processes used during the run and, per
implementation, the process CPU time per step next to the wall time. Bandwidth uses
the ideal-traffic model (forward reads x and writes y: 2 N bytes-per-element; forward+backward adds a
read of x and dy and a write of dx: 5 N) and is compared with ``out.copy_(x)`` of ``--copy-mib``
into a pre-faulted buffer (streaming bandwidth) and ``x.clone()`` (a fresh allocation, which pays the
same page faults as a norm's fresh output).

Run: ``.venv/bin/python benchmarks/norms.py`` (about a minute on 2 idle cores; ``--quick`` for a smoke
run, ``--inductor`` to add the compiled row).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

from anydepth.nn.norms import fused_rms_norm_available, use_fused_rms_norm
from anydepth.registry import NORMS


class NaiveRMSNorm(nn.Module):
    """The reference formula written naively in eager torch (eps inside, as torch.nn.RMSNorm)."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Eager(nn.Module):
    """Runs the wrapped norm with the fused kernel switched off."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        with use_fused_rms_norm(False):
            return self.inner(x)


def _busy_jiffies() -> int | None:
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    vals = [int(v) for v in fields]
    return sum(vals) - vals[3] - (vals[4] if len(vals) > 4 else 0)  # all but idle and iowait


class LoadMeter:
    """CPU-seconds per wall-second used by other processes while the benchmark ran."""

    def __enter__(self):
        self.t0, self.own0, self.busy0 = time.perf_counter(), time.process_time(), _busy_jiffies()
        return self

    def __exit__(self, *exc):
        busy1 = _busy_jiffies()
        wall = time.perf_counter() - self.t0
        own = time.process_time() - self.own0
        hz = os.sysconf("SC_CLK_TCK")
        self.other = None if busy1 is None else max(0.0, (busy1 - self.busy0) / hz - own) / wall


def copy_bandwidth(mib: int, reps: int) -> tuple[float, float]:
    """(copy_ GB/s into a pre-faulted buffer, clone GB/s), each counting a read and a write."""
    n = mib * 2**20 // 4
    src = torch.randn(n)
    dst = torch.empty_like(src)
    dst.copy_(src)
    moved = 2 * src.numel() * 4

    def best(fn):
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return moved / statistics.median(ts) / 1e9

    copy_gbs = best(lambda: dst.copy_(src))
    clone_gbs = best(lambda: src.clone())
    return copy_gbs, clone_gbs


def make_impls(d: int, dtype: torch.dtype, inductor: bool) -> dict[str, nn.Module]:
    impls = {
        "anydepth rms (builder default)": NORMS.build("rms", dim=d),
        "anydepth rms (seed placement)": NORMS.build(NORMS.config("rms", eps=1e-8, eps_placement="outside"), dim=d),
        "anydepth prms p=1/16": NORMS.build("prms", dim=d),
        "anydepth rms (eager)": Eager(NORMS.build("rms", dim=d)),
        "nn.LayerNorm": nn.LayerNorm(d),
        "nn.RMSNorm": nn.RMSNorm(d, eps=1e-6),
        "naive formula": NaiveRMSNorm(d),
    }
    if inductor:
        impls["torch.compile(anydepth rms)"] = torch.compile(NORMS.build("rms", dim=d), dynamic=False)
    return {k: m.to(dtype) for k, m in impls.items()}


def run_mode(impls, x, gy, mode: str, rounds: int, warmup: int, per_round: int):
    """{name: (wall seconds, process CPU seconds) per timed step}."""
    xs = {name: x.detach().clone().requires_grad_(mode == "fwd+bwd") for name in impls}

    def step(name, m):
        xi = xs[name]
        if mode == "fwd":
            with torch.no_grad():
                m(xi)
            return
        xi.grad = None
        for p in m.parameters():
            p.grad = None
        m(xi).backward(gy)

    for name, m in impls.items():
        t = time.perf_counter()
        for _ in range(warmup):
            step(name, m)
        if name.startswith("torch.compile"):
            print(f"  ({name} {mode}: warm-up incl. compilation {time.perf_counter() - t:.1f} s)")
    times = {name: ([], []) for name in impls}
    for _ in range(rounds):
        for name, m in impls.items():
            # one untimed step first: the allocator then recycles this implementation's own buffers,
            # so no implementation is timed on memory the previous one left behind
            step(name, m)
            for _ in range(per_round):
                t, c = time.perf_counter(), time.process_time()
                step(name, m)
                times[name][0].append(time.perf_counter() - t)
                times[name][1].append(time.process_time() - c)
    return times


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--rounds", type=int, default=8, help="round-robin rounds over the implementations")
    ap.add_argument("--per-round", type=int, default=2, help="timed steps per implementation per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--copy-mib", type=int, default=1024)
    ap.add_argument("--inductor", action="store_true", help="add torch.compile of the builder default")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1024 rows, 3 reps, 64 MiB copy")
    args = ap.parse_args(argv)
    if args.quick:
        args.rows, args.rounds, args.copy_mib = 1024, 2, 64
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fused kernel: {fused_rms_norm_available()}")
    print(
        f"input ({args.rows}, {args.dim}), {args.rounds} round-robin rounds of 1 untimed + {args.per_round} "
        f"timed steps per implementation, after {args.warmup} warm-up steps"
    )

    with LoadMeter() as load:
        copy_gbs, clone_gbs = copy_bandwidth(args.copy_mib, max(3, args.rounds))
        print(f"copy_ into a pre-faulted buffer: {copy_gbs:.1f} GB/s; clone (fresh allocation): {clone_gbs:.1f} GB/s")
        results = {}
        for dt_name in args.dtypes.split(","):
            dtype = getattr(torch, dt_name)
            x = torch.randn(args.rows, args.dim).to(dtype)
            gy = torch.randn(args.rows, args.dim).to(dtype)
            impls = make_impls(args.dim, dtype, args.inductor)
            for mode in ("fwd", "fwd+bwd"):
                times = run_mode(impls, x, gy, mode, args.rounds, args.warmup, args.per_round)
                results[(dt_name, mode)] = times
                report(dt_name, mode, times, x, copy_gbs, clone_gbs)
    if load.other is not None:
        print(f"\nother processes used {load.other:.2f} CPU cores on average during the run")


def report(dt_name, mode, times, x, copy_gbs, clone_gbs) -> None:
    nbytes = x.numel() * x.element_size() * (2 if mode == "fwd" else 5)
    med = {k: statistics.median(v[0]) for k, v in times.items()}
    low = {k: min(v[0]) for k, v in times.items()}
    cpu = {k: statistics.median(v[1]) for k, v in times.items()}
    print(f"\n### {dt_name} {mode}\n")
    print("| implementation | median ms | min ms | CPU ms (median) | GB/s (median) | of copy_ | of clone |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k in times:
        gbs = nbytes / med[k] / 1e9
        print(
            f"| {k} | {med[k] * 1e3:.1f} | {low[k] * 1e3:.1f} | {cpu[k] * 1e3:.1f} | {gbs:.1f} | "
            f"{gbs / copy_gbs:.0%} | {gbs / clone_gbs:.0%} |"
        )
    ours, seed, part = "anydepth rms (builder default)", "anydepth rms (seed placement)", "anydepth prms p=1/16"

    def ratio(a, b):
        return f"{med[a] / med[b]:.2f} (min {low[a] / low[b]:.2f}, CPU {cpu[a] / cpu[b]:.2f})"

    print()
    print(f"- builder default / nn.RMSNorm: {ratio(ours, 'nn.RMSNorm')}; goal <= 1.05")
    print(f"- nn.LayerNorm / builder default: {ratio('nn.LayerNorm', ours)}; goal >= 1.2 for fwd+bwd")
    print(f"- seed placement / nn.RMSNorm: {ratio(seed, 'nn.RMSNorm')}; goal <= 1.5")
    print(f"- prms p=1/16 / builder default (full): {ratio(part, ours)}; goal < 1")
    print(f"- builder default, eager / fused: {ratio('anydepth rms (eager)', ours)}")
    if "torch.compile(anydepth rms)" in med:
        print(f"- torch.compile / fused: {ratio('torch.compile(anydepth rms)', ours)}")


if __name__ == "__main__":
    main()
