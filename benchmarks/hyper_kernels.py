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

from anydepth.nn.native import struct_args
from anydepth.nn.residual import hyper_fused


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
             gin=rnd(m, d), hin=torch.empty(m, d), dy=torch.empty(m, d),
             alpha=rnd(m, n, t_), beta=rnd(m, n), dbeta=rnd(m, n),
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

    W, D = hyper_fused._WidthArgs, hyper_fused._DepthArgs
    dyn = dict(wt=wt.data_ptr(), wa=wa.data_ptr(), wb=wb.data_ptr(), gamma=gamma.data_ptr(), scale=1.0,
               a_static=a_s.data_ptr(), b_static=b_s.data_ptr(), sa=0.01, sb=0.01, use_tanh=1, m_tokens=m, n=n, d=d,
               nthreads=th)

    def width_fwd(b, ln, h="h"):
        norm = dict(ln_w=ln_w.data_ptr(), ln_b=ln_b.data_ptr(), ln_eps=1e-5, ln_mu=ptr(b, "mu"),
                    ln_rstd=ptr(b, "rstd")) if ln else {}
        lib.anydepth_hc_width_forward(struct_args(
            W, h=ptr(b, h), h_ts=n * d, h_ss=d, p=ptr(b, "p"), pact=ptr(b, "pact"), r=ptr(b, "r"),
            alpha=ptr(b, "alpha2" if h == "out" else "alpha"), beta=ptr(b, "beta2" if h == "out" else "beta"),
            h_in=ptr(b, "hin"), **norm, **dyn))

    def depth_fwd(b):
        lib.anydepth_hc_depth_forward(struct_args(
            D, h=ptr(b, "h"), h_ts=n * d, h_ss=d, alpha=ptr(b, "alpha"), beta=ptr(b, "beta"), y=ptr(b, "y"),
            out=ptr(b, "out"), m_tokens=m, n=n, d=d, nthreads=th))

    def depth_then_width(b):
        depth_fwd(b)
        width_fwd(b, True, h="out")

    def width_bwd(b, ln=False):
        norm = dict(ln_w=ln_w.data_ptr(), ln_mu=ptr(b, "mu"), ln_rstd=ptr(b, "rstd"), dln_w=dln_w.data_ptr(),
                    dln_b=dln_b.data_ptr()) if ln else {}
        lib.anydepth_hc_width_backward(struct_args(
            W, gin=ptr(b, "gin"), gdepth=ptr(b, "G"), g_ts=n * d, g_ss=d, h=ptr(b, "h"), h_ts=n * d, h_ss=d,
            p=ptr(b, "p"), pact=ptr(b, "pact"), r=ptr(b, "r"), alpha=ptr(b, "alpha"), gbeta=ptr(b, "dbeta"),
            dh=ptr(b, "dh"), dwa=dwa.data_ptr(), dwb=dwb.data_ptr(), dgamma=dgamma.data_ptr(),
            da_static=da.data_ptr(), db_static=db.data_ptr(), dscale=ds.data_ptr(), **norm, **dyn))

    def depth_bwd(b):
        lib.anydepth_hc_depth_backward(struct_args(
            D, g=ptr(b, "G"), g_ts=n * d, g_ss=d, beta=ptr(b, "beta"), y=ptr(b, "y"), dbeta=ptr(b, "dbeta"),
            dy=ptr(b, "dy"), m_tokens=m, n=n, d=d, nthreads=th))

    stream, row = m * n * d * 4, m * d * 4
    kernels = [
        ("copy of the streams (reference)", 2 * stream, lambda b: b["out"].copy_(b["h"])),
        ("width forward", stream + row, lambda b: width_fwd(b, False)),
        ("width forward + LayerNorm", stream + row, lambda b: width_fwd(b, True)),
        ("depth forward", 2 * stream + row, depth_fwd),
        ("depth forward, then width forward", 3 * stream + 2 * row, depth_then_width),
        ("width backward", 3 * stream + row, lambda b: width_bwd(b)),
        ("width backward + LayerNorm", 3 * stream + row, lambda b: width_bwd(b, True)),
        ("depth backward", stream + 2 * row, depth_bwd),
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
