"""Training-step cost of hyper-connections: plain pre-LN residual vs 4 dynamic streams.

One small byte-level LM (token + learned position embedding, pre-LN blocks of SDPA causal attention
and a GELU MLP, final LayerNorm, tied head, the trainer's AdamW) whose residual wiring is swappable:

    plain          x = x + f(LN(x))
    ours_seed      anydepth.compat.hyper_connections (the seed API), streams folded into the batch, LN inside f
    orig           hyper_connections 0.4.11 wired the same way
    ours_nn        anydepth.nn.residual.hyper.HyperConnection (streams as an explicit axis, LN applied to h_in)
    build_plain    anydepth.build_model(ModelConfig(residual="prenorm"))       (if the builder exists)
    build_hyper    anydepth.build_model(ModelConfig(residual=<hyper, streams=4>))

Each variant runs in its own process (``torch.set_num_threads(2)``): build, ``gc.collect()``, record
VmRSS, reset the kernel's RSS high-water mark (``echo 5 > /proc/self/clear_refs``), run warm-up and
timed steps, report the median step time and the peak extra RSS (VmHWM - baseline: activations,
gradients, optimizer state and allocator slack; parameters and inputs excluded). Step times differ by
up to 8% from one process to the next (memory placement, page faults), so ``--repeats`` rounds of
processes run, one per variant in each round (the order flips every round), and the tables give the
median over a variant's processes. The goals are judged on paired ratios: each round's own
``build_hyper / build_plain`` (and ``ours_nn / plain``, ``ours_seed / orig``), their geometric mean
and their 95% Student-t interval over rounds (``--repeats 5`` or more); a goal is met when the whole
interval is at or under it. A round's two processes run next to each other, so a change in the
host's speed over minutes cancels in their ratio, where it does not in medians pooled over rounds.

    .venv/bin/python benchmarks/hyper.py                       # the issue's sizes: 12 x 256, seq 256, batch 8
    .venv/bin/python benchmarks/hyper.py --depth 2 --seq 64    # a quick check
    .venv/bin/python benchmarks/hyper.py --variants build_plain,build_hyper --repeats 12
                                                               # the builder pair's goal, with an interval
    .venv/bin/python benchmarks/hyper.py --glibc-default       # glibc's allocator left as it is
    .venv/bin/python benchmarks/hyper.py --profile --variants build_plain,build_hyper --steps 3
                                                               # where the extra time goes, per operation

Each process first calls ``anydepth.train.malloc.retain_freed_memory()``, as ``anydepth train`` does
(and the ``interleave`` mode, whose models share one process, does too). With glibc's default
settings a step gives freed memory back to the kernel and faults it in again (about 30 000 page
faults per plain step here, 7 000-20 000 with hyper-connections), how many varies from process to
process, and the step times scatter by up to 10%; ``--glibc-default`` measures that setting.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time

VARIANTS = ("plain", "ours_seed", "orig", "ours_nn", "build_plain", "build_hyper")
# (variant, baseline, the goal for variant / baseline)
GOALS = (("build_hyper", "build_plain", 1.10), ("ours_nn", "plain", 1.10), ("ours_seed", "orig", 1.00))
MIN_ROUNDS_FOR_INTERVAL = 5


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _other_load(t0_total: float, t0_self: float, wall: float) -> float:
    """CPU cores used by other processes during the timed steps (from /proc/stat)."""
    total = _cpu_total() - t0_total
    own = time.process_time() - t0_self
    return max(0.0, (total - own) / wall) if wall > 0 else 0.0


def _cpu_total() -> float:
    with open("/proc/stat") as fh:
        fields = fh.readline().split()[1:]
    user, nice, system = (int(v) for v in fields[:3])
    return (user + nice + system) / os.sysconf("SC_CLK_TCK")


def build_step(args, variant: str):
    """``(step, model)`` for one variant, or a ``{"skipped": why}`` dict."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dim, heads, depth, seq, vocab = args.dim, args.heads, args.depth, args.seq, 256

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(dim, 3 * dim, bias=False)
            self.out = nn.Linear(dim, dim, bias=False)

        def forward(self, x):
            q, k, v = self.qkv(x).unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.out(o.transpose(1, 2).flatten(-2))

    def mlp():
        return nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    branches = [Attention() if i % 2 == 0 else mlp() for i in range(2 * depth)]

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in branches)
            self.branches = nn.ModuleList(branches)

        def forward(self, x):
            for norm, f in zip(self.norms, self.branches):
                x = x + f(norm(x))
            return x

    class SeedWired(nn.Module):
        """The seed README's wiring: expand, one wrapped branch per sublayer, reduce (sum)."""

        def __init__(self, get_fns):
            super().__init__()
            init, self.expand, self.reduce = get_fns(args.streams)
            self.layers = nn.ModuleList(
                init(dim=dim, branch=nn.Sequential(nn.LayerNorm(dim), f), layer_index=i)
                for i, f in enumerate(branches)
            )

        def forward(self, x):
            x = self.expand(x)
            for layer in self.layers:
                x = layer(x)
            return self.reduce(x)

    class NNWired(nn.Module):
        def __init__(self):
            super().__init__()
            from anydepth.nn.residual.hyper import HyperConnection

            self.res = nn.ModuleList(
                HyperConnection(
                    HyperConnection.Config(streams=args.streams), dim=dim, layer_index=i, norm=nn.LayerNorm(dim)
                )
                for i in range(len(branches))
            )
            self.branches = nn.ModuleList(branches)

        def forward(self, x):
            x = self.res[0].expand(x)
            for res, f in zip(self.res, self.branches):
                x = res(x, f)
            return self.res[0].reduce(x)

    class LM(nn.Module):
        def __init__(self, trunk):
            super().__init__()
            self.tok = nn.Embedding(vocab, dim)
            self.pos = nn.Embedding(seq, dim)
            self.trunk = trunk
            self.norm = nn.LayerNorm(dim)

        def forward(self, tokens):
            x = self.tok(tokens) + self.pos.weight[: tokens.shape[1]]
            return self.norm(self.trunk(x)) @ self.tok.weight.t()

    if variant == "plain":
        model = LM(Plain())
    elif variant == "ours_seed":
        from anydepth.compat.hyper_connections import get_init_and_expand_reduce_stream_functions

        model = LM(SeedWired(get_init_and_expand_reduce_stream_functions))
    elif variant == "orig":
        from hyper_connections import get_init_and_expand_reduce_stream_functions

        model = LM(SeedWired(get_init_and_expand_reduce_stream_functions))
    elif variant == "ours_nn":
        model = LM(NNWired())
    else:
        import anydepth

        if not hasattr(anydepth, "build_model"):
            return {"variant": variant, "skipped": "anydepth.build_model is not available"}
        try:
            from anydepth.registry import RESIDUALS

            residual = (
                "prenorm" if variant == "build_plain" else RESIDUALS.config("hyper", streams=args.streams)
            )
            cfg = anydepth.ModelConfig(
                vocab_size=vocab, dim=dim, depth=depth, heads=heads, max_seq_len=seq, residual=residual
            )
            model = anydepth.build_model(cfg)
        except Exception as e:  # the builder may not accept every option yet; report rather than fail
            return {"variant": variant, "skipped": f"{type(e).__name__}: {e}"}

    # the trainer's AdamW (torch's fused update) for every row alike
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    tokens = torch.randint(vocab, (args.batch, seq + 1), generator=torch.Generator().manual_seed(1))

    def step():
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step, model


def child(args) -> dict:
    if not args.glibc_default:
        from anydepth.train.malloc import retain_freed_memory

        retain_freed_memory()
    built = build_step(args, args.child)
    if isinstance(built, dict):
        return built
    step, model = built
    gc.collect()
    base = _rss_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    for _ in range(args.warmup):
        step()
    times, cpu = [], []
    t_total, t_self, t_wall = _cpu_total(), time.process_time(), time.perf_counter()
    for _ in range(args.steps):
        t, c = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    load = _other_load(t_total, t_self, time.perf_counter() - t_wall)
    times.sort()
    cpu.sort()
    return {
        "variant": args.child,
        "median_s": times[len(times) // 2],
        "min_s": times[0],
        "cpu_s": cpu[len(cpu) // 2],  # process CPU seconds (all threads): less sensitive to other load
        "peak_mib": (_rss_kib("VmHWM") - base) / 1024,
        "params": sum(p.numel() for p in model.parameters()),
        "other_load": load,
    }


def interleaved(args, variants: list[str]) -> dict:
    """All variants in one process, timed round-robin (one step of each per round), so a change in the
    machine's load hits every variant alike. Gives time only: the RSS peak would mix the variants."""
    steps, rows = {}, {}
    for v in variants:
        built = build_step(args, v)
        if isinstance(built, dict):
            rows[v] = built
        else:
            steps[v] = built[0]
            for _ in range(args.warmup):
                built[0]()
    times = {v: [] for v in steps}
    cpu = {v: [] for v in steps}
    for _ in range(args.steps):
        for v, step in steps.items():
            t, c = time.perf_counter(), time.process_time()
            step()
            times[v].append(time.perf_counter() - t)
            cpu[v].append(time.process_time() - c)
    for v in steps:
        ts, cs = sorted(times[v]), sorted(cpu[v])
        rows[v] = {
            "variant": v,
            "median_s": ts[len(ts) // 2],
            "min_s": ts[0],
            "cpu_s": cs[len(cs) // 2],
            "steps_s": times[v],  # in round order, for the paired ratios
        }
    return rows


# Student's t, 97.5th percentile, for 1-30 degrees of freedom (more: the Cornish-Fisher expansion)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def _t975(df: int) -> float:
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def _log_ratios(a: list[float], b: list[float]) -> list[float]:
    return [math.log(x / y) for x, y in zip(a, b, strict=True)]


def paired(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """``(geometric mean, low, high)`` of the per-round ratios ``a[i] / b[i]``: the mean of their logs
    and its 95% Student-t interval, ``mean +- t(0.975, n - 1) * sd / sqrt(n)``, taken back through exp.

    Why paired: a round's two measurements ran next to each other, so a change in the machine's speed
    over minutes (other tenants of the host) hits both, and the ratio cancels it where medians pooled
    over all rounds do not. Why logs: step times scatter multiplicatively. Why t rather than a
    bootstrap: with the 5-12 rounds a run affords, a percentile bootstrap's interval came out 16-30%
    narrower, too narrow for so few. The interval is one run's; runs on a host whose load changes
    between them can disagree by more than it (docs/benchmarks.md)."""
    logs = _log_ratios(a, b)
    if len(logs) < 2:
        raise ValueError(f"paired() needs at least 2 rounds for an interval, got {len(logs)}")
    mean = statistics.fmean(logs)
    half = _t975(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def print_paired(per_round: dict[str, list[float]], unit: str) -> None:
    """For each goal pair both of whose variants ran: the paired ratio, its interval, and whether the
    goal is met (the whole interval at or under it), missed (the whole interval above) or undecided."""
    shown = [(a, b, goal) for a, b, goal in GOALS if a in per_round and b in per_round]
    if not shown:
        return
    print(f"\npaired ratios (each {unit}'s own ratio; geometric mean and 95% t interval over {unit}s):")
    for a, b, goal in shown:
        n = len(per_round[a])
        if n < MIN_ROUNDS_FOR_INTERVAL:
            mean = math.exp(statistics.fmean(_log_ratios(per_round[a], per_round[b])))
            print(
                f"  {a:>11} / {b:<11} {mean:.3f}x over {n} {unit}s (goal <= {goal:.2f}; "
                f"{MIN_ROUNDS_FOR_INTERVAL} or more for an interval)"
            )
            continue
        mean, lo, hi = paired(per_round[a], per_round[b])
        verdict = "met" if hi <= goal else "missed" if lo > goal else "undecided: the interval holds it"
        print(
            f"  {a:>11} / {b:<11} {mean:.3f}x [{lo:.3f}, {hi:.3f}] over {n} {unit}s "
            f"(goal <= {goal:.2f}: {verdict})"
        )


def profiled(args, variants: list[str], top: int = 20) -> None:
    """``torch.profiler`` self CPU time per operation over ``args.steps`` steps of each variant (one
    process, after warm-up), per step, and the operations whose time differs most between the first
    two variants: where one wiring spends its extra time."""
    import torch

    per_op = {}
    for v in variants:
        built = build_step(args, v)
        if isinstance(built, dict):
            raise SystemExit(f"{v}: {built.get('skipped')}")
        step = built[0]
        for _ in range(max(1, args.warmup)):
            step()
        with torch.profiler.profile() as prof:
            for _ in range(args.steps):
                step()
        n = args.steps
        per_op[v] = {e.key: (e.self_cpu_time_total / 1e3 / n, e.count / n) for e in prof.key_averages()}
    for v, ops in per_op.items():
        print(f"{v}: {sum(t for t, _ in ops.values()):.1f} ms of self CPU time per step")
    if len(variants) < 2:
        return
    a, b = per_op[variants[0]], per_op[variants[1]]
    diff = sorted(((b.get(k, (0, 0))[0] - a.get(k, (0, 0))[0], k) for k in set(a) | set(b)), reverse=True)
    print(f"\nms per step: {variants[1]} - {variants[0]}, then each one's ms (calls) per step")
    shown = diff if len(diff) <= top + 5 else diff[:top] + diff[-5:]
    for d, k in shown:
        ta, na = a.get(k, (0, 0))
        tb, nb = b.get(k, (0, 0))
        print(f"  {d:+7.1f}  {k[:52]:52s} {ta:7.1f} ({na:.0f})  {tb:7.1f} ({nb:.0f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--repeats",
        type=int,
        default=MIN_ROUNDS_FOR_INTERVAL,
        help="rounds of one process per variant; medians and paired ratios with an interval are reported",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument(
        "--interleave", action="store_true", help="time all variants round-robin in one process (no memory)"
    )
    p.add_argument(
        "--glibc-default",
        action="store_true",
        help="leave glibc's allocator as it is, instead of retain_freed_memory() as `anydepth train` does",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="per-operation self CPU time of each variant in one process (torch.profiler), and the "
        "difference between the first two",
    )
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    if (args.interleave or args.profile) and not args.glibc_default:
        from anydepth.train.malloc import retain_freed_memory

        retain_freed_memory()
    if args.profile:
        profiled(args, args.variants.split(","))
        return
    if args.interleave:
        rows = interleaved(args, args.variants.split(","))
        print(
            f"interleaved, {args.steps} rounds; "
            f"depth={args.depth} dim={args.dim} seq={args.seq} batch={args.batch}"
        )
        for r in rows.values():
            print(json.dumps({k: v for k, v in r.items() if k != "steps_s"}))
        ratios = [
            ("ours_nn", "plain"),
            ("ours_seed", "orig"),
            ("ours_nn", "orig"),
            ("orig", "plain"),
            ("build_hyper", "build_plain"),
        ]
        for a, b in ratios:
            if "median_s" in rows.get(a, {}) and "median_s" in rows.get(b, {}):
                print(
                    f"  {a} / {b}: wall {rows[a]['median_s'] / rows[b]['median_s']:.2f}x, "
                    f"CPU {rows[a]['cpu_s'] / rows[b]['cpu_s']:.2f}x"
                )
        print_paired({v: r["steps_s"] for v, r in rows.items() if "steps_s" in r}, "round")
        return

    rows, runs = {}, {}
    sizes = ("depth", "dim", "heads", "seq", "batch", "streams", "steps", "warmup", "threads")
    variants = args.variants.split(",")
    for r in range(args.repeats):  # rounds of one process per variant: machine drift hits all alike
        # the order flips every round, so that neither of two neighbours always runs right after the other
        for v in variants if r % 2 == 0 else variants[::-1]:
            cmd = [sys.executable, __file__, "--child", v] + [f"--{k}={getattr(args, k)}" for k in sizes]
            cmd += ["--glibc-default"] if args.glibc_default else []
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                rows[v] = {"variant": v, "skipped": out.stderr.strip().splitlines()[-1]}
            else:
                runs.setdefault(v, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[v][-1] if v in runs else rows[v]), flush=True)
    for v, rs in runs.items():
        # per variant: the median over processes of each process's median step (and of the other columns)
        rows[v] = {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "variant"}
        rows[v]["min_s"] = min(r["min_s"] for r in rs)
        rows[v]["params"] = rs[0]["params"]

    print(
        f"\ndepth={args.depth} dim={args.dim} heads={args.heads} seq={args.seq} batch={args.batch} "
        f"streams={args.streams} steps={args.steps} repeats={args.repeats} threads={args.threads} "
        f"malloc={'glibc default' if args.glibc_default else 'retained (as anydepth train)'}"
    )
    print(
        f"{'variant':<12} {'median s':>9} {'min s':>8} {'CPU s':>8} {'peak MiB':>9} {'params':>10} "
        f"{'other load':>10}"
    )
    for v, r in rows.items():
        if "skipped" in r:
            print(f"{v:<12} skipped: {r['skipped']}")
            continue
        print(
            f"{v:<12} {r['median_s']:>9.3f} {r['min_s']:>8.3f} {r['cpu_s']:>8.3f} {r['peak_mib']:>9.0f} "
            f"{r['params']:>10,} {r['other_load']:>10.2f}"
        )

    def ratio(a, b, key="median_s"):
        ra, rb = rows.get(a, {}), rows.get(b, {})
        if key in ra and key in rb and rb[key]:
            return f"{ra[key] / rb[key]:.2f}x"
        return "n/a"

    print("\ntime ratios (median step):")
    print(f"  ours_nn   / plain       {ratio('ours_nn', 'plain')}   (goal <= 1.10)")
    print(f"  ours_seed / plain       {ratio('ours_seed', 'plain')}")
    print(f"  ours_seed / orig        {ratio('ours_seed', 'orig')}   (goal <= 1.00)")
    print(f"  ours_nn   / orig        {ratio('ours_nn', 'orig')}")
    print(f"  orig      / plain       {ratio('orig', 'plain')}")
    print(f"  build_hyper / build_plain {ratio('build_hyper', 'build_plain')}")
    print("CPU-time ratios (median process CPU s per step):")
    print(f"  ours_nn   / plain       {ratio('ours_nn', 'plain', 'cpu_s')}")
    print(f"  ours_seed / orig        {ratio('ours_seed', 'orig', 'cpu_s')}")
    print(f"  build_hyper / build_plain {ratio('build_hyper', 'build_plain', 'cpu_s')}")
    print("peak extra RSS ratios:")
    for a in ("ours_nn", "ours_seed", "orig"):
        print(f"  {a:<9} / plain       {ratio(a, 'plain', 'peak_mib')}")
    print(f"  build_hyper / build_plain {ratio('build_hyper', 'build_plain', 'peak_mib')}")
    complete = [v for v in variants if len(runs.get(v, ())) == args.repeats]
    print_paired({v: [r["median_s"] for r in runs[v]] for v in complete}, "round")


if __name__ == "__main__":
    main()
