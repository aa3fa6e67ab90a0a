"""Per-sublayer time of the fused hyper-connection CPU kernels, called directly on cold buffers.

Each kernel runs on one of several buffer sets in turn (together far larger than the L3 cache), so
every call reads its inputs from memory as in a training step; the table gives the median time, the
bytes each call must move (inputs read plus outputs written) and the rate that makes, next to a
plain 8 MiB copy as the machine's reference.

    .venv/bin/python benchmarks/hyper_kernels.py        # the hyper benchmark's sublayer: 2048 tokens, n 4, d 256
    .venv/bin/python benchmarks/hyper_kernels.py --dim 512 --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch

from anydepth.nn import hyper_fused


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sets", type=int, default=6, help="buffer sets used in turn (keep their total above the L3)")
    p.add_argument("--calls", type=int, default=36)
    args = p.parse_args()
    lib = hyper_fused._KERNEL.get()
    if lib is None:
        raise SystemExit(f"fused kernel unavailable: {hyper_fused._KERNEL.error}")
    torch.set_num_threads(args.threads)
    m, n, d, th = args.tokens, args.streams, args.dim, args.threads
    t_, k_ = n + 1, n + 2
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    sets = [
        dict(h=rnd(m, n, d), G=rnd(m, n, d), out=torch.empty(m, n, d), dh=torch.empty(m, n, d), y=rnd(m, d),
             gin=rnd(m, d), hin=torch.empty(m, d), dy=torch.empty(m, d), yprev=rnd(m, d), dyprev=torch.empty(m, d),
             alpha=rnd(m, n, t_), beta=rnd(m, n), dbeta=rnd(m, n), bprev=rnd(m, n), dbprev=torch.empty(m, n),
             alpha2=torch.empty(m, n, t_), beta2=torch.empty(m, n),
             p=rnd(m, n, k_), pact=rnd(m, n, k_).tanh(), r=torch.rand(m, n, generator=g) + 1,
             mu=rnd(m), rstd=torch.rand(m, generator=g) + 0.5)
        for _ in range(args.sets)
    ]
    # the dynamic projection as the kernels take it: W_a (d, n+1), w_b (d), the norm's gamma (d), packed by
    # the width forward into wt (n+2, d); the width backward writes their gradients
    wa, wb, gamma, wt = rnd(d, t_), rnd(d), rnd(d), torch.empty(k_, d)
    dwa, dwb, dgamma = torch.empty(d, t_), torch.empty(d), torch.empty(d)
    a_s, b_s, da, db, ds = rnd(n, t_), rnd(n), torch.zeros(n, t_), torch.zeros(n), torch.zeros(2)
    ln_w, ln_b, dln_w, dln_b = rnd(d), rnd(d), torch.zeros(d), torch.zeros(d)

    def ptr(b, k):
        return b[k].data_ptr()

    def width_fwd(b, ln):
        norm = (ln_w.data_ptr(), ln_b.data_ptr(), 1e-5, ptr(b, "mu"), ptr(b, "rstd")) if ln else (None,) * 2 + (
            0.0, None, None)
        lib.anydepth_hc_width_forward(
            ptr(b, "h"), n * d, d, wt.data_ptr(), wa.data_ptr(), wb.data_ptr(), gamma.data_ptr(), 1.0, a_s.data_ptr(),
            b_s.data_ptr(), 0.01, 0.01, 1, ptr(b, "p"), ptr(b, "pact"), ptr(b, "r"), ptr(b, "alpha"), ptr(b, "beta"),
            ptr(b, "hin"), *norm, m, n, d, th,
        )

    def depth_then_width(b):
        lib.anydepth_hc_depth_forward(
            ptr(b, "h"), n * d, d, ptr(b, "alpha"), ptr(b, "beta"), ptr(b, "y"), ptr(b, "out"), m, n, d, th)
        lib.anydepth_hc_width_forward(
            ptr(b, "out"), n * d, d, wt.data_ptr(), wa.data_ptr(), wb.data_ptr(), gamma.data_ptr(), 1.0,
            a_s.data_ptr(), b_s.data_ptr(), 0.01, 0.01, 1, ptr(b, "p"), ptr(b, "pact"), ptr(b, "r"), ptr(b, "alpha2"),
            ptr(b, "beta2"), ptr(b, "hin"), ln_w.data_ptr(), ln_b.data_ptr(), 1e-5, ptr(b, "mu"), ptr(b, "rstd"), m, n,
            d, th,
        )

    def depth_width(b):
        # the builder's case between two sublayers: one kernel for the depth forward and the next width forward
        lib.anydepth_hc_depth_width_forward(
            ptr(b, "h"), n * d, d, ptr(b, "alpha"), ptr(b, "beta"), ptr(b, "y"), ptr(b, "out"), wt.data_ptr(),
            wa.data_ptr(), wb.data_ptr(), gamma.data_ptr(), 1.0, a_s.data_ptr(), b_s.data_ptr(), 0.01, 0.01, 1,
            ptr(b, "p"), ptr(b, "pact"), ptr(b, "r"), ptr(b, "alpha2"), ptr(b, "beta2"), ptr(b, "hin"),
            ln_w.data_ptr(), ln_b.data_ptr(), 1e-5, ptr(b, "mu"), ptr(b, "rstd"), m, n, d, th,
        )

    def width_bwd(b, linked, ln=False):
        link = (ptr(b, "bprev"), ptr(b, "yprev")) if linked else (None, None)
        outs = (ptr(b, "dyprev"), ptr(b, "dbprev")) if linked else (None, None)
        norm = (ln_w.data_ptr(), ptr(b, "mu"), ptr(b, "rstd"), dln_w.data_ptr(), dln_b.data_ptr()) if ln else (
            None,) * 5
        lib.anydepth_hc_width_backward(
            ptr(b, "gin"), ptr(b, "G"), ptr(b, "h"), n * d, d, wt.data_ptr(), ptr(b, "p"), ptr(b, "pact"), ptr(b, "r"),
            ptr(b, "alpha"), None, ptr(b, "dbeta"), 0.01, 0.01, 1, *link, ptr(b, "dh"), wa.data_ptr(),
            wb.data_ptr(), gamma.data_ptr(), 1.0, dwa.data_ptr(), dwb.data_ptr(), dgamma.data_ptr(), da.data_ptr(),
            db.data_ptr(), ds.data_ptr(), *outs, *norm, m, n, d, n * d, d, th,
        )

    stream, row = m * n * d * 4, m * d * 4
    kernels = [
        ("copy of the streams (reference)", 2 * stream, lambda b: b["out"].copy_(b["h"])),
        ("width forward", stream + row, lambda b: width_fwd(b, False)),
        ("width forward + LayerNorm", stream + row, lambda b: width_fwd(b, True)),
        ("depth forward", 2 * stream + row, lambda b: lib.anydepth_hc_depth_forward(
            ptr(b, "h"), n * d, d, ptr(b, "alpha"), ptr(b, "beta"), ptr(b, "y"), ptr(b, "out"), m, n, d, th)),
        ("depth forward, then width forward", 3 * stream + 2 * row, depth_then_width),
        ("the two as one kernel (builder)", 2 * stream + 2 * row, depth_width),
        ("width backward, linked", 3 * stream + 3 * row, lambda b: width_bwd(b, True)),
        ("width backward, linked + LayerNorm", 3 * stream + 3 * row, lambda b: width_bwd(b, True, True)),
        ("width backward, not linked", 3 * stream + row, lambda b: width_bwd(b, False)),
        ("depth backward, not linked", stream + 2 * row, lambda b: lib.anydepth_hc_depth_backward(
            ptr(b, "G"), ptr(b, "beta"), ptr(b, "y"), ptr(b, "dbeta"), ptr(b, "dy"), m, n, d, n * d, d, th)),
    ]
    print(f"tokens={m} streams={n} dim={d} threads={th}; {args.sets} buffer sets, median of {args.calls} calls")
    print(f"{'kernel':<34} {'MiB':>6} {'ms':>7} {'GiB/s':>7}")
    for name, nbytes, fn in kernels:
        for b in sets:  # touch every set once: page faults stay out of the timing
            fn(b)
        times = []
        for i in range(args.calls):
            t0 = time.perf_counter()
            fn(sets[i % len(sets)])
            times.append(time.perf_counter() - t0)
        med = sorted(times)[len(times) // 2]
        print(f"{name:<34} {nbytes / 2**20:>6.0f} {med * 1e3:>7.2f} {nbytes / 2**30 / med:>7.1f}")


if __name__ == "__main__":
    main()
