"""Leaf-layer benchmarks: attention vs x-transformers, local vs full cost, chunked feed-forward memory.

    .venv/bin/python benchmarks/leaf_layers.py            # full sizes
    .venv/bin/python benchmarks/leaf_layers.py --small    # quick check

Memory is reported as two deterministic counts instead of a noisy process peak: the largest tensor any
operator produced during the call, and the bytes autograd saved for backward. Prints ratios; nothing here
asserts a speed.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from anydepth.registry import ATTENTIONS, FFS


class _Largest(TorchDispatchMode):
    """Records the size of the largest tensor any operator returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def _median_time(fn, steps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def _memory(fn_forward, grad: bool) -> tuple[float, float]:
    """(largest intermediate MB, saved-for-backward MB) of one forward."""
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.set_grad_enabled(grad), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with _Largest() as mode:
            fn_forward()
    return mode.largest / 2**20, saved[0] / 2**20


def attention_throughput(batch: int, seq: int, dim: int, heads: int, steps: int) -> None:
    """Forward + backward of one causal attention layer: anydepth 'full' vs x-transformers Attention."""
    from x_transformers.x_transformers import Attention as XAttention

    torch.manual_seed(0)
    ours = ATTENTIONS.build("full", dim=dim, heads=heads, dim_head=dim // heads, causal=True, ctx=None)
    theirs = XAttention(dim, dim_head=dim // heads, heads=heads, causal=True)
    x = torch.randn(batch, seq, dim, requires_grad=True)

    def step(layer):
        def run():
            layer.zero_grad(set_to_none=True)
            layer(x).sum().backward()

        return run

    t_ours, t_theirs = _median_time(step(ours), steps), _median_time(step(theirs), steps)
    tok = batch * seq
    print(
        f"attention fwd+bwd b={batch} n={seq} dim={dim} h={heads}: anydepth {tok / t_ours:,.0f} tok/s, "
        f"x-transformers {tok / t_theirs:,.0f} tok/s, anydepth/x-transformers {t_theirs / t_ours:.2f}x"
    )


def local_vs_full(seq: int, window: int, dim: int, steps: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, seq, dim)
    # a padding mask keeps full attention off SDPA's mask-free causal path, as in padded batches
    mask = torch.ones(1, seq, dtype=torch.bool)
    rows = []
    for kind, extra in (("full", {}), ("local", {"window": window})):
        layer = ATTENTIONS.build(
            ATTENTIONS.config(kind, **extra), dim=dim, heads=4, dim_head=dim // 4, causal=True, ctx=None
        )
        with torch.no_grad():
            t = _median_time(lambda layer=layer: layer(x, mask=mask), steps)
        largest, _ = _memory(lambda layer=layer: layer(x, mask=mask), grad=False)
        rows.append((kind, t, largest))
    (_, tf, mf), (_, tl, ml) = rows
    print(
        f"attention forward n={seq} dim={dim} h=4 causal+padding mask: full {tf:.3f} s (largest tensor "
        f"{mf:.1f} MB), local window={window} {tl:.3f} s ({ml:.1f} MB); full/local time {tf / tl:.2f}x"
    )


def ff_chunks(seq: int, dim: int, chunks: int, steps: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, seq, dim, requires_grad=True)
    for kind in ("mlp", "glu"):
        out = {}
        for c in (1, chunks):
            layer = FFS.build(FFS.config(kind, chunks=c), dim=dim)
            largest, _ = _memory(lambda layer=layer: layer(x), grad=False)
            _, saved = _memory(lambda layer=layer: layer(x), grad=True)
            t = _median_time(lambda layer=layer: layer(x).sum().backward(), steps)
            out[c] = (largest, saved, t)
        (l1, s1, t1), (lc, sc, tc) = out[1], out[chunks]
        print(
            f"{kind} n={seq} dim={dim}: largest tensor in no-grad forward {l1:.1f} -> {lc:.1f} MB "
            f"({l1 / lc:.1f}x less), saved for backward {s1:.1f} -> {sc:.1f} MB ({s1 / sc:.1f}x less), "
            f"fwd+bwd time {t1:.3f} -> {tc:.3f} s ({tc / t1:.2f}x) with chunks={chunks}"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="reduced sizes for a quick check")
    args = parser.parse_args()
    if args.small:
        attention_throughput(batch=2, seq=128, dim=128, heads=4, steps=3)
        local_vs_full(seq=2048, window=64, dim=64, steps=3)
        ff_chunks(seq=2048, dim=128, chunks=8, steps=3)
    else:
        attention_throughput(batch=8, seq=256, dim=256, heads=4, steps=10)
        local_vs_full(seq=4096, window=128, dim=256, steps=3)
        ff_chunks(seq=16384, dim=256, chunks=16, steps=3)


if __name__ == "__main__":
    main()
