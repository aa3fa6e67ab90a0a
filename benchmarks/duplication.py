"""The Reformer paper's duplication task (Kitaev et al. 2020, arXiv 2001.04451, section 5), small enough for CPU.

Each sequence is ``0 w 0 w`` with ``w`` a random string of ``--half`` symbols from ``1 .. vocab - 1``: the
second copy is predictable only by attending back ``half + 1`` positions. A causal LM (reversible stack,
shared-QK attention, rotary positions) is trained on fresh batches and scored by next-token accuracy on the
second copy of held-out sequences, as in the paper's Table 2, for full shared-QK attention and for LSH
attention with each ``--hashes`` count. Models are evaluated with the rounds they were trained with and,
like the paper's table, with every other round count too.

    flock /tmp/anydepth-timing.lock python benchmarks/duplication.py --steps 300       # ~10+ min on 2 cores
    python benchmarks/duplication.py --steps 5 --hashes 1 2                            # smoke run
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from anydepth.model import presets
from anydepth.model.build import build_model
from anydepth.registry import ATTENTIONS


def batch(n: int, half: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    w = torch.randint(1, vocab, (n, half), generator=gen)
    zero = torch.zeros(n, 1, dtype=torch.long)
    return torch.cat((zero, w, zero, w), dim=1)


def make(args, n_hashes: int | None):
    fields = dict(bucket_size=args.bucket_size, n_hashes=n_hashes or 1, use_full_attn=n_hashes is None)
    cfg = presets.reformer(
        vocab_size=args.vocab,
        dim=args.dim,
        depth=args.depth,
        heads=args.heads,
        max_seq_len=2 * args.half + 2,
        attention=ATTENTIONS.config("lsh", **fields),
    )
    return build_model(cfg)


def accuracy(model, x: torch.Tensor, half: int, n_hashes: int | None) -> float:
    for m in model.modules():
        if hasattr(m, "lsh_attn"):  # evaluate with full shared-QK attention or with this many rounds
            m.use_full_attn = n_hashes is None
            m.lsh_attn.n_hashes = n_hashes or m.lsh_attn.n_hashes
    model.eval()
    with torch.no_grad():
        pred = model(x[:, :-1]).argmax(-1)
    model.train()
    # positions half + 2 .. 2 half + 1 hold the copy; logits at t predict token t + 1
    return (pred[:, half + 1 :] == x[:, half + 2 :]).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--half", type=int, default=63, help="length of w (sequence 2 * half + 2)")
    p.add_argument("--vocab", type=int, default=32)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--bucket-size", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--hashes", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--eval-size", type=int, default=256)
    args = p.parse_args()
    torch.set_num_threads(2)
    held_out = batch(args.eval_size, args.half, args.vocab, torch.Generator().manual_seed(1))
    variants = [None, *args.hashes]
    names = ["full" if h is None else f"LSH-{h}" for h in variants]
    rows = []
    for trained, name in zip(variants, names):
        torch.manual_seed(0)
        model = make(args, trained)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
        gen = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            x = batch(args.batch, args.half, args.vocab, gen)
            loss = F.cross_entropy(model(x[:, :-1]).transpose(1, 2), x[:, 1:])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        accs = [accuracy(model, held_out, args.half, h) for h in variants]
        rows.append((name, accs, time.perf_counter() - t0, loss.item()))
        print(f"trained {name:7s} loss {loss.item():.3f}  {time.perf_counter() - t0:.0f} s", flush=True)
    print("\naccuracy on the copied half (rows: trained with, columns: evaluated with)")
    print(" " * 10 + "".join(f"{n:>9s}" for n in names))
    for name, accs, _, _ in rows:
        print(f"{name:10s}" + "".join(f"{a:9.1%}" for a in accs))


if __name__ == "__main__":
    main()
