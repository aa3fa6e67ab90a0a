"""Builder speed and memory, side by side with x-transformers in one run.

1. Training-step tokens/s of a 12-layer pre-LN byte-level LM (dim 256, 4 heads, sequence 256,
   batch 8, AdamW): anydepth ``build_model(presets.prenorm(...))`` vs x-transformers
   ``TransformerWrapper(Decoder(...))`` at the same configuration. Goal: ratio >= 1.0.
2. Peak memory of one training step of the reversible stack at depth 4, 8, 16 (sequence 2048,
   dim 256) against the sequential stack. Goal: reversible depth 16 <= 1.25x depth 4, while
   sequential grows >= 3x.

Each measurement runs in its own process (peak RSS = VmHWM after resetting it, minus the RSS after
building the model and inputs), with 2 threads.

    python benchmarks/model.py             # both parts
    python benchmarks/model.py --part speed --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _reset_peak() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss_kib("VmRSS")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def child(spec: dict) -> dict:
    import gc

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(2)
    torch.manual_seed(0)
    seq, batch, depth, dim = spec["seq"], spec["batch"], spec["depth"], spec["dim"]
    if spec["impl"] == "x-transformers":
        from x_transformers import Decoder, TransformerWrapper

        model = TransformerWrapper(
            num_tokens=256,
            max_seq_len=seq,
            attn_layers=Decoder(dim=dim, depth=depth, heads=4, attn_flash=True),
        )
    else:
        from anydepth import build_model
        from anydepth.model import presets

        model = build_model(
            presets.prenorm(vocab_size=256, dim=dim, depth=depth, heads=4, max_seq_len=seq, stack=spec["stack"])
        )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    tokens = torch.randint(0, 256, (batch, seq + 1))

    def step():
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 256), tokens[:, 1:].reshape(-1))
        loss.backward()
        if spec.get("optimizer", True):
            opt.step()
        # keep_grads: gradient buffers persist between steps (as with DDP's buckets), so the peak
        # measured after the warm-up step is the activations' alone
        opt.zero_grad(set_to_none=not spec.get("keep_grads", False))

    step()  # warm-up (allocates optimizer state)
    gc.collect()
    base = _reset_peak()
    times = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = _rss_kib("VmHWM") - base
    times.sort()
    med = times[len(times) // 2]
    return {"median_s": med, "tokens_per_s": batch * seq / med, "peak_mib": peak / 1024}


def run(spec: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        # A fixed mmap threshold makes large tensors go back to the OS when freed; with glibc's dynamic
        # threshold, freed 8 MiB buffers stay in the heap and RSS measures fragmentation, not tensors.
        env={**os.environ, "OMP_NUM_THREADS": "2", "MALLOC_MMAP_THRESHOLD_": "131072"},
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--part", choices=["speed", "memory", "all"], default="all")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--keep-grads", action="store_true", help="gradient buffers persist between steps")
    p.add_argument("--no-optimizer", action="store_true", help="measure forward+backward only (no AdamW step)")
    p.add_argument("--child")
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return
    if a.part in ("speed", "all"):
        print("## 12-layer pre-LN byte LM training step (dim 256, 4 heads, seq 256, batch 8, AdamW)")
        common = dict(seq=256, batch=8, depth=12, dim=256, steps=a.steps, stack="sequential")
        ours = run({**common, "impl": "anydepth"})
        xt = run({**common, "impl": "x-transformers"})
        for name, r in (("anydepth", ours), ("x-transformers", xt)):
            ms = r["median_s"] * 1e3
            print(f"{name:16s} {r['tokens_per_s']:8.0f} tok/s  {ms:7.0f} ms/step  {r['peak_mib']:6.0f} MiB")
        ratio = ours["tokens_per_s"] / xt["tokens_per_s"]
        print(f"tokens/s ratio anydepth / x-transformers = {ratio:.2f} (goal >= 1.0)")
    if a.part in ("memory", "all"):
        what = "gradient buffers kept" if a.keep_grads else "gradients re-allocated each step"
        what += ", forward+backward only" if a.no_optimizer else ", AdamW step included"
        print(f"\n## Peak memory of one training step vs depth (seq 2048, dim 256, batch 1; {what})")
        rows = {}
        for stack in ("reversible", "sequential"):
            for depth in (4, 8, 16):
                spec = dict(seq=2048, batch=1, depth=depth, dim=256, steps=1, stack=stack, impl="anydepth")
                r = run({**spec, "keep_grads": a.keep_grads, "optimizer": not a.no_optimizer})
                rows[stack, depth] = r["peak_mib"]
                print(f"{stack:10s} depth {depth:2d}: {r['peak_mib']:7.0f} MiB  {r['median_s']:.2f} s/step")
        for stack in ("reversible", "sequential"):
            print(f"{stack:10s} depth16/depth4 = {rows[stack, 16] / rows[stack, 4]:.2f}")
        print("goals: reversible <= 1.25, sequential >= 3")


if __name__ == "__main__":
    main()
