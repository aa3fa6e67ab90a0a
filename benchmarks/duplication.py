"""The Reformer paper's duplication task (Kitaev et al. 2020, arXiv 2001.04451, section 5), small enough for CPU.

Each sequence is ``0 w 0 w`` with ``w`` a random string of ``--half`` symbols from ``1 .. vocab - 1``: the
second copy is predictable only by attending back ``half + 1`` positions. A one-layer causal LM (reversible
stack, shared-QK attention) is trained on fresh batches and scored by next-token accuracy on the second copy
of held-out sequences, as in the paper's Table 2, for full shared-QK attention and for LSH attention with each
``--hashes`` count. Every model is evaluated with full attention and with every round count (rows: trained
with, columns: evaluated with), like the paper's table.

Two choices differ from the library's Reformer preset, on purpose:

- positions are learned and added to the token embeddings (``--position learned``), as in the paper's models.
  LSH hashes the shared query/key before rotary positions are applied, so with rotary positions a one-layer
  model's hash sees token content only, and the symbol to copy (unrelated in content to the query) shares a
  window with its query only by chance;
- the loss covers the copied half only (``--loss copy``). The first half is uniform noise; with its loss
  included (``--loss all``) LSH-trained models stayed at chance for the few hundred steps that fit in minutes.

Training variants can be split across runs with ``--train``; ``--json`` accumulates their rows in one file,
and ``--plot`` draws the table from it.

    python benchmarks/duplication.py --threads 1 --json dup.json --plot docs/duplication.png
    python benchmarks/duplication.py --steps 5 --hashes 1 2 --eval-size 8                # smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from anydepth.model import presets
from anydepth.model.build import build_model
from anydepth.registry import ATTENTIONS


def batch(n: int, half: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """``(n, 2 half + 2)`` sequences ``0 w 0 w`` with ``w`` uniform over ``1 .. vocab - 1``."""
    w = torch.randint(1, vocab, (n, half), generator=gen)
    zero = torch.zeros(n, 1, dtype=torch.long)
    return torch.cat((zero, w, zero, w), dim=1)


def make(args, n_hashes: int | None):
    """The model trained with ``n_hashes`` LSH rounds, or with full shared-QK attention when None."""
    fields = dict(bucket_size=args.bucket_size, n_hashes=n_hashes or 1, use_full_attn=n_hashes is None)
    cfg = presets.reformer(
        vocab_size=args.vocab,
        dim=args.dim,
        depth=args.depth,
        heads=args.heads,
        max_seq_len=2 * args.half + 2,
        position=args.position,
        attention=ATTENTIONS.config("lsh", **fields),
    )
    return build_model(cfg)


def copy_logits(logits: torch.Tensor, half: int) -> torch.Tensor:
    """Logits of the predictions of the second copy. The input is ``x[:, :-1]`` and logits at ``t`` predict
    ``x[t + 1]``; the copy sits at ``half + 2 .. 2 half + 1``, so its predictions are at ``half + 1 ..``."""
    return logits[:, half + 1 :]


def loss_fn(model, x: torch.Tensor, half: int, copy_only: bool) -> torch.Tensor:
    logits = model(x[:, :-1])
    if copy_only:
        return F.cross_entropy(copy_logits(logits, half).transpose(1, 2), x[:, half + 2 :])
    return F.cross_entropy(logits.transpose(1, 2), x[:, 1:])


def accuracy(model, x: torch.Tensor, half: int, n_hashes: int | None) -> float:
    """Next-token accuracy on the second copy of ``x``, with full attention (None) or ``n_hashes`` rounds.
    The model's own attention settings are restored afterwards."""
    layers = [m for m in model.modules() if hasattr(m, "lsh_attn")]
    saved = [(m.use_full_attn, m.lsh_attn.n_hashes) for m in layers]
    for m in layers:
        m.use_full_attn = n_hashes is None
        m.lsh_attn.n_hashes = n_hashes or m.lsh_attn.n_hashes
    was_training = model.training
    model.eval()  # eval rotations come from a fixed seed: every count is scored on the same hashing
    try:
        with torch.no_grad():
            pred = copy_logits(model(x[:, :-1]), half).argmax(-1)
    finally:
        model.train(was_training)
        for m, (full, rounds) in zip(layers, saved):
            m.use_full_attn, m.lsh_attn.n_hashes = full, rounds
    return (pred == x[:, half + 2 :]).float().mean().item()


def name(n_hashes: int | None) -> str:
    return "full" if n_hashes is None else f"LSH-{n_hashes}"


def train(args, trained: int | None, held_out: torch.Tensor, variants: list) -> dict:
    torch.manual_seed(args.seed)
    model = make(args, trained)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    bar = tqdm(range(args.steps), desc=f"train {name(trained)}", leave=False, mininterval=5)
    for _ in bar:
        x = batch(args.batch, args.half, args.vocab, gen)
        loss = loss_fn(model, x, args.half, args.loss == "copy")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    seconds = time.perf_counter() - t0
    accs = {name(h): accuracy(model, held_out, args.half, h) for h in variants}
    return {"loss": loss.item(), "seconds": seconds, "accuracy": accs}


def table(rows: dict, columns: list[str]) -> str:
    lines = [" " * 10 + "".join(f"{c:>9s}" for c in columns)]
    for r, row in rows.items():
        cells = "".join(f"{row['accuracy'][c]:9.1%}" if c in row["accuracy"] else " " * 9 for c in columns)
        lines.append(f"{r:10s}{cells}")
    return "\n".join(lines)


def plot(rows: dict, columns: list[str], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [[row["accuracy"].get(c, float("nan")) * 100 for c in columns] for row in rows.values()]
    fig, ax = plt.subplots(figsize=(1.2 * len(columns) + 1.8, 0.6 * len(rows) + 1.4))
    ax.imshow(data, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for i, r in enumerate(data):
        for j, v in enumerate(r):
            ax.text(j, i, f"{v:.1f}%", ha="center", va="center", color="black" if v > 60 else "white")
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(rows)), list(rows))
    ax.set_xlabel("evaluated with")
    ax.set_ylabel("trained with")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_variant(s: str) -> int | None:
    if s == "full":
        return None
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--train takes 'full' or a round count, got {s!r}") from None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--half", type=int, default=63, help="length of w (sequence 2 * half + 2)")
    p.add_argument("--vocab", type=int, default=128, help="symbols 0 .. vocab - 1 (the paper: 128)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--bucket-size", type=int, default=8)
    p.add_argument("--position", default="learned", help="learned | axial | sinusoidal | rotary | none")
    p.add_argument("--loss", choices=("copy", "all"), default="copy", help="loss on the copied half or all")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hashes", type=int, nargs="+", default=[1, 2, 4, 8], help="LSH round counts")
    p.add_argument("--train", type=parse_variant, nargs="+", help="variants to train (default: full and --hashes)")
    p.add_argument("--eval-size", type=int, default=256, help="held-out sequences")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="results file: rows are added to it (one per trained variant)")
    p.add_argument("--plot", help="PNG of the table of every row in --json (or of this run)")
    args = p.parse_args()
    if args.half < 1 or args.vocab < 2:
        p.error(f"--half must be >= 1 and --vocab >= 2, got {args.half} and {args.vocab}")
    torch.set_num_threads(args.threads)
    held_out = batch(args.eval_size, args.half, args.vocab, torch.Generator().manual_seed(args.seed + 1))
    variants = [None, *sorted(set(args.hashes), reverse=True)]  # the paper's column order: full, 8, 4, 2, 1
    columns = [name(h) for h in variants]
    setup = {k: v for k, v in vars(args).items() if k not in ("train", "json", "plot", "threads", "hashes")}
    rows = {}
    if args.json and Path(args.json).exists():
        saved = json.loads(Path(args.json).read_text())
        if saved["setup"] != setup:
            p.error(f"--json {args.json} holds results of another setup ({saved['setup']}); use a new file")
        rows = saved["rows"]
    for trained in args.train or variants:
        row = train(args, trained, held_out, variants)
        rows[name(trained)] = row
        print(f"trained {name(trained):7s} loss {row['loss']:.3f}  {row['seconds']:.0f} s", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"setup": setup, "rows": rows}, indent=1) + "\n")
    order = [c for c in columns if c in rows] + [r for r in rows if r not in columns]
    rows = {r: rows[r] for r in order}
    print("\naccuracy on the copied half (rows: trained with, columns: evaluated with)")
    print(table(rows, columns))
    if args.plot:
        title = (
            f"duplication, |w|={args.half}, vocab {args.vocab}, {args.depth} layer, dim {args.dim}, "
            f"bucket {args.bucket_size}, {args.steps} steps"
        )
        plot(rows, columns, args.plot, title)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
