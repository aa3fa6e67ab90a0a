"""LSH attention side by side: anydepth vs reformer-pytorch 1.4.4 vs full causal SDPA (CPU).

One layer, ``LSHSelfAttention(dim=256, heads=4, bucket_size=64, n_hashes=4, causal=True)``, forward +
backward (input grad included) at batch 1. Each (implementation, length) runs in its own process with
``torch.set_num_threads(2)``; the child reports the median and minimum wall time per step and the peak
extra resident memory (VmHWM after resetting it, minus the resident size before the steps: activations,
gradients and allocator slack; parameters and inputs excluded), plus the CPU time other processes used
meanwhile (``other load``, in cores), since timings on a shared machine are only meaningful when it is low.

    python benchmarks/lsh.py                                   # 4096, 16384, 32768 tokens
    python benchmarks/lsh.py --lengths 4096 --runs 3
    python benchmarks/lsh.py --workload lm --depths 2 12       # ReformerLM training-step memory vs depth
    python benchmarks/lsh.py --workload stack --depths 4 16 --n-hashes 2 --repeats 3
        # the Reformer stack with the original's defaults (ff_chunks=100, ...) against reformer-pytorch's,
        # forward + backward at --lm-len tokens; the implementations alternate, --repeats times
    python benchmarks/lsh.py --workload decode --depths 2 --lm-len 4096 --runs 8
        # per-token greedy decoding time of a ReformerLM after a --lm-len-token prompt, the incremental LSH
        # cache against recomputing each layer over its cached inputs, both in one process, interleaved
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

IMPLS = ("anydepth", "reformer_pytorch", "sdpa_full")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _cpu_jiffies() -> int:
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    busy = [int(p) for i, p in enumerate(parts) if i not in (3, 4)]  # all but idle and iowait
    return sum(busy)


def _build(impl: str, dim: int, heads: int, bucket: int, n_hashes: int):
    import torch
    import torch.nn.functional as F

    if impl == "anydepth":
        from anydepth.nn.lsh import LSHSelfAttention

        return LSHSelfAttention.make(dim=dim, heads=heads, bucket_size=bucket, n_hashes=n_hashes, causal=True)
    if impl == "reformer_pytorch":
        from reformer_pytorch import LSHSelfAttention

        return LSHSelfAttention(dim=dim, heads=heads, bucket_size=bucket, n_hashes=n_hashes, causal=True)
    if impl == "sdpa_full":

        class Full(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.qkv = torch.nn.Linear(dim, 3 * dim, bias=False)
                self.out = torch.nn.Linear(dim, dim)

            def forward(self, x):
                b, n, _ = x.shape
                q, k, v = self.qkv(x).view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                return self.out(o.transpose(1, 2).reshape(b, n, dim))

        return Full()
    raise ValueError(f"unknown impl {impl!r}; choose from {', '.join(IMPLS)}")


def child_attention(impl: str, length: int, runs: int, warmup: int, args) -> dict:
    import gc

    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = _build(impl, args.dim, args.heads, args.bucket_size, args.n_hashes)
    x = torch.randn(1, length, args.dim, requires_grad=True)
    gy = torch.randn(1, length, args.dim)

    def step():
        x.grad = None
        model.zero_grad(set_to_none=True)
        model(x).backward(gy)

    return _measure(step, runs, warmup, gc)


def child_stack(impl: str, depth: int, runs: int, warmup: int, args) -> dict:
    import gc

    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
    kw = dict(dim=args.dim, depth=depth, heads=args.heads, bucket_size=args.bucket_size, n_hashes=args.n_hashes)
    if impl == "anydepth":
        from anydepth.compat.reformer import Reformer
    elif impl == "reformer_pytorch":
        from reformer_pytorch import Reformer
    else:
        raise ValueError(f"stack workload: impl must be anydepth or reformer_pytorch, got {impl!r}")
    model = Reformer(**kw, causal=True)
    x = torch.randn(1, args.lm_len, args.dim, requires_grad=True)
    gy = torch.randn(1, args.lm_len, args.dim)

    def step():
        x.grad = None
        model.zero_grad(set_to_none=True)
        model(x).backward(gy)

    return _measure(step, runs, warmup, gc)


def child_lm(depth: int, runs: int, warmup: int, args) -> dict:
    import gc

    import torch

    from anydepth.compat.reformer import ReformerLM

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = ReformerLM(
        num_tokens=256,
        dim=args.dim,
        depth=depth,
        heads=args.heads,
        max_seq_len=args.lm_len,
        causal=True,
        bucket_size=args.bucket_size,
        n_hashes=args.n_hashes,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, 256, (1, args.lm_len + 1))

    def step():
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _measure(step, runs, warmup, gc)


def child_decode(depth: int, runs: int, args) -> dict:
    """One process, two caches of the same prompt: every round times one recompute step, then
    ``2 * bucket_size / runs`` incremental steps, so that the incremental steps span one full cycle of the
    bucket count (one rehash of the cached keys) and their mean includes it. Each step appends the next
    token of a fixed sequence; the two paths' logits at the positions both computed are compared."""
    import torch

    from anydepth.compat.reformer import ReformerLM
    from anydepth.nn.lsh import LSHSelfAttention

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = ReformerLM(
        num_tokens=256,
        dim=args.dim,
        depth=depth,
        heads=args.heads,
        max_seq_len=2 * args.lm_len,
        causal=True,
        bucket_size=args.bucket_size,
        n_hashes=args.n_hashes,
    ).eval()
    layers = [m for m in model.modules() if isinstance(m, LSHSelfAttention)]
    burst = max(1, 2 * args.bucket_size // runs)
    tokens = torch.randint(0, 256, (1, args.lm_len + runs * burst + 2))
    state = {}
    for fast in (True, False):
        cache = model.new_cache()
        with torch.no_grad():
            model(tokens[:, : args.lm_len], cache=cache)
        state[fast] = {"cache": cache, "n": args.lm_len, "times": [], "logits": {}}

    def step(fast: bool) -> None:
        for m in layers:
            m.fast_decoding = fast
        s = state[fast]
        n = s["n"]
        t = time.perf_counter()
        with torch.no_grad():
            logits = model(tokens[:, n : n + 1], cache=s["cache"], offset=n)
        s["times"].append(time.perf_counter() - t)
        s["logits"][n] = logits
        s["n"] = n + 1

    step(True)  # the first incremental step projects the whole cached prompt: warm-up, not timed below
    step(False)
    for s in state.values():
        s["times"].clear()
    cpu0, own0, wall0 = _cpu_jiffies(), os.times(), time.perf_counter()
    for _ in range(runs):
        step(False)
        for _ in range(burst):
            step(True)
    cpu1, own1, wall = _cpu_jiffies(), os.times(), time.perf_counter() - wall0
    own = (own1.user - own0.user) + (own1.system - own0.system)
    common = state[True]["logits"].keys() & state[False]["logits"].keys()
    diff = max(float((state[True]["logits"][n] - state[False]["logits"][n]).abs().max()) for n in common)
    fast, slow = state[True]["times"], state[False]["times"]
    return {
        "recompute_median_s": statistics.median(slow),
        "incremental_median_s": statistics.median(fast),
        "incremental_mean_s": statistics.mean(fast),
        "incremental_max_s": max(fast),
        "steps": [len(slow), len(fast)],
        "max_logit_diff": diff,
        "other_load_cores": max(0.0, (cpu1 - cpu0) / os.sysconf("SC_CLK_TCK") - own) / wall,
    }


def _measure(step, runs: int, warmup: int, gc) -> dict:
    for _ in range(warmup):
        step()
    gc.collect()
    base = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    times = []
    cpu0, own0 = _cpu_jiffies(), os.times()
    for _ in range(runs):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    cpu1, own1 = _cpu_jiffies(), os.times()
    wall = sum(times)
    hz = os.sysconf("SC_CLK_TCK")
    own = (own1.user - own0.user) + (own1.system - own0.system)
    other = max(0.0, (cpu1 - cpu0) / hz - own) / wall
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "peak_extra_mib": (_rss_kib("VmHWM") - base) / 1024,
        "other_load_cores": other,
        "runs": runs,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=("attention", "lm", "stack", "decode"), default="attention")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768])
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--depths", type=int, nargs="+", default=[2, 12], help="lm workload: depths to compare")
    p.add_argument("--lm-len", type=int, default=4096, help="lm workload: sequence length")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=1, help="rounds over all cases, interleaved; medians over them")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--bucket-size", type=int, default=64)
    p.add_argument("--n-hashes", type=int, default=4)
    p.add_argument("--threads", type=int, default=2, help="decode workload: torch threads")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        kind, a, b = args.child.split(":")
        if kind == "attention":
            res = child_attention(a, int(b), args.runs, args.warmup, args)
        elif kind == "stack":
            res = child_stack(a, int(b), args.runs, args.warmup, args)
        elif kind == "decode":
            res = child_decode(int(b), args.runs, args)
        else:
            res = child_lm(int(b), args.runs, args.warmup, args)
        print("RESULT " + json.dumps(res))
        return

    if args.workload == "attention":
        cases = [("attention", impl, n) for n in args.lengths for impl in args.impls]
    elif args.workload == "stack":
        impls = [i for i in args.impls if i != "sdpa_full"]
        cases = [("stack", impl, d) for d in args.depths for impl in impls]
    elif args.workload == "decode":
        cases = [("decode", "anydepth", d) for d in args.depths]
    else:
        cases = [("lm", "anydepth", d) for d in args.depths]
    common = [
        f"--runs={args.runs}",
        f"--warmup={args.warmup}",
        f"--dim={args.dim}",
        f"--heads={args.heads}",
        f"--bucket-size={args.bucket_size}",
        f"--n-hashes={args.n_hashes}",
        f"--lm-len={args.lm_len}",
        f"--threads={args.threads}",
    ]
    rounds: dict[tuple, list[dict]] = {}
    for rep, (kind, impl, size) in ((r, c) for r in range(args.repeats) for c in cases):
        cmd = [sys.executable, __file__, f"--child={kind}:{impl}:{size}", *common]
        # freed large buffers go back to the OS, so that the peak counts live memory, not heap slack
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"} if kind == "stack" else None
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            print(f"{impl} {size}: failed\n{proc.stderr[-2000:]}", flush=True)
            continue
        res = json.loads(line[0][len("RESULT ") :])
        if kind == "decode":
            r, f = res["recompute_median_s"], res["incremental_median_s"]
            print(
                f"decode depth {size}, {args.lm_len} cached tokens, {args.threads} threads, per token: "
                f"recompute {1e3 * r:.1f} ms, "
                f"incremental {1e3 * f:.2f} ms (mean {1e3 * res['incremental_mean_s']:.2f} ms with one rehash, "
                f"max {1e3 * res['incremental_max_s']:.1f} ms); speed-up x{r / f:.1f} (medians), "
                f"x{r / res['incremental_mean_s']:.1f} (recompute median / incremental mean); steps {res['steps']}; "
                f"max logit difference {res['max_logit_diff']:.1e}; other load {res['other_load_cores']:.2f}",
                flush=True,
            )
            continue
        rounds.setdefault((impl, size), []).append(res)
        print(
            f"{kind:9s} {impl:17s} {size:6d}  round {rep}  median {res['median_s']:8.3f} s  min {res['min_s']:8.3f} s  "
            f"peak extra {res['peak_extra_mib']:8.1f} MiB  other load {res['other_load_cores']:.2f}",
            flush=True,
        )
    results = {
        key: {f: statistics.median(r[f] for r in rs) for f in ("median_s", "min_s", "peak_extra_mib")}
        for key, rs in rounds.items()
    }
    if args.repeats > 1:
        print("\nmedians over rounds")
        for (impl, size), res in results.items():
            print(f"  {impl:17s} {size:6d}  {res['median_s']:8.3f} s  peak extra {res['peak_extra_mib']:8.1f} MiB")
    if args.workload == "stack":
        print("\nratios (reformer_pytorch / anydepth): speed-up = time ratio, memory = peak extra MiB ratio")
        for d in args.depths:
            ours, theirs = results.get(("anydepth", d)), results.get(("reformer_pytorch", d))
            if ours and theirs:
                print(
                    f"  depth {d:3d}  speed-up x{theirs['median_s'] / ours['median_s']:.2f}  "
                    f"memory ours/theirs x{ours['peak_extra_mib'] / max(theirs['peak_extra_mib'], 1e-9):.2f}"
                )
    elif args.workload == "attention":
        print("\nratios (anydepth / other): time = median s, memory = peak extra MiB")
        for n in args.lengths:
            ours = results.get(("anydepth", n))
            for other in ("reformer_pytorch", "sdpa_full"):
                theirs = results.get((other, n))
                if ours and theirs:
                    print(
                        f"  {n:6d} vs {other:17s} time x{ours['median_s'] / theirs['median_s']:.2f}  "
                        f"memory x{ours['peak_extra_mib'] / max(theirs['peak_extra_mib'], 1e-9):.2f}"
                    )
    else:
        lo, hi = min(args.depths), max(args.depths)
        if ("anydepth", lo) in results and ("anydepth", hi) in results:
            r = results[("anydepth", hi)]["peak_extra_mib"] / results[("anydepth", lo)]["peak_extra_mib"]
            print(f"\npeak memory depth {hi} / depth {lo}: x{r:.2f}")


if __name__ == "__main__":
    main()
