"""Training-step cost of the post-2023 options against pre-LN, and side by side with x-transformers.

One process, 2 threads, one AdamW training step of a causal byte LM (4 layers, dim 128, 4 heads,
sequence 64, batch 8) per variant. The variants are interleaved round by round (every variant gets
one timed step per round, in a rotated order), so a noisy neighbour slows all of them alike; the
figures are medians over the rounds, and each ratio is the median of the per-round ratios.

    flock /tmp/anydepth-timing.lock python benchmarks/beyond.py                  # both parts
    flock /tmp/anydepth-timing.lock python benchmarks/beyond.py --part options --rounds 15
    flock /tmp/anydepth-timing.lock python benchmarks/beyond.py --part x-transformers

Part ``options``: each option of ``presets`` (periln, dyt, layer_scaling, mhc_lite, denseformer, qk_norm,
value_residual, depth_scaled, zero_out) against ``presets.prenorm``. Part ``x-transformers``: pre-LN,
sandwich norm, qk-norm and value residual, anydepth against x-transformers ``TransformerWrapper(Decoder)``
at the same configuration (their ``sandwich_norm``, ``attn_qk_norm``, ``add_value_residual`` with the
fixed 0.5 mix; ``tests/model/test_beyond_x_transformers.py`` shows the two give the same logits from
the same weights).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

DIM, DEPTH, HEADS, SEQ, BATCH, VOCAB = 128, 4, 4, 64, 8, 256
OPTIONS = [
    "periln",
    "dyt",
    "layer_scaling",
    "mhc_lite",
    "denseformer",
    "qk_norm",
    "value_residual",
    "depth_scaled",
    "zero_out",
]


def ours(preset: str):
    from anydepth import build_model
    from anydepth.model import presets

    return build_model(presets.get(preset, vocab_size=VOCAB, dim=DIM, depth=DEPTH, heads=HEADS, max_seq_len=SEQ))


def ours_matching_x(technique: str):
    """Our model at x-transformers' configuration of ``technique`` (bias-free norms, no out bias, untied)."""
    from anydepth import ModelConfig, build_model
    from anydepth.registry import ATTENTIONS, NORMS

    attention = ATTENTIONS.config(
        "full",
        qk_norm="rms" if technique == "qk_norm" else None,
        value_residual=True if technique == "value_residual" else None,
        out_bias=False,
    )
    cfg = ModelConfig(
        vocab_size=VOCAB,
        dim=DIM,
        depth=DEPTH,
        heads=HEADS,
        max_seq_len=SEQ,
        residual="periln" if technique == "sandwich" else "prenorm",
        norm=NORMS.config("layer", bias=False),
        attention=attention,
        tie_embeddings=False,
    )
    return build_model(cfg)


def theirs(technique: str):
    from x_transformers import Decoder, TransformerWrapper

    return TransformerWrapper(
        num_tokens=VOCAB,
        max_seq_len=SEQ,
        attn_layers=Decoder(
            dim=DIM,
            depth=DEPTH,
            heads=HEADS,
            attn_dim_head=DIM // HEADS,
            attn_flash=True,
            sandwich_norm=technique == "sandwich",
            attn_qk_norm=technique == "qk_norm",
            add_value_residual=technique == "value_residual",
            learned_value_residual_mix=False,
        ),
    )


class Runner:
    def __init__(self, model):
        self.model = model
        self.opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
        self.tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))

    def step(self) -> float:
        t0 = time.perf_counter()
        logits = self.model(self.tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), self.tokens[:, 1:].reshape(-1))
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0


def interleaved(runners: dict[str, Runner], rounds: int) -> dict[str, list[float]]:
    for r in runners.values():  # warm-up: optimizer state, allocator, kernel caches
        r.step()
        r.step()
    names = list(runners)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(rounds):
        order = names[i % len(names) :] + names[: i % len(names)]
        for n in order:
            times[n].append(runners[n].step())
    return times


def options(rounds: int) -> None:
    print(f"## Training step of each option against pre-LN ({DEPTH} layers, dim {DIM}, seq {SEQ}, batch {BATCH})")
    torch.manual_seed(0)
    runners = {name: Runner(ours(name)) for name in ["prenorm", *OPTIONS]}
    times = interleaved(runners, rounds)
    base = times["prenorm"]
    print("| variant | ms/step (median) | / pre-LN (median of per-round ratios) |")
    print("|---|---:|---:|")
    for name, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, base))
        print(f"| {name} | {statistics.median(ts) * 1e3:.0f} | {ratio:.2f}x |")


def x_transformers(rounds: int) -> None:
    print(f"\n## anydepth vs x-transformers, same technique ({DEPTH} layers, dim {DIM}, seq {SEQ}, batch {BATCH})")
    torch.manual_seed(0)
    runners = {}
    for technique in ("pre-ln", "sandwich", "qk_norm", "value_residual"):
        runners[f"{technique} anydepth"] = Runner(ours_matching_x(technique))
        runners[f"{technique} x-transformers"] = Runner(theirs(technique))
    times = interleaved(runners, rounds)
    print("| technique | anydepth ms/step | x-transformers ms/step | x-transformers / anydepth |")
    print("|---|---:|---:|---:|")
    for technique in ("pre-ln", "sandwich", "qk_norm", "value_residual"):
        a, b = times[f"{technique} anydepth"], times[f"{technique} x-transformers"]
        ratio = statistics.median(tb / ta for ta, tb in zip(a, b))
        print(f"| {technique} | {statistics.median(a) * 1e3:.0f} | {statistics.median(b) * 1e3:.0f} | {ratio:.2f}x |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["options", "x-transformers", "all"], default="all")
    p.add_argument("--rounds", type=int, default=12)
    a = p.parse_args()
    torch.set_num_threads(2)
    if a.part in ("options", "all"):
        options(a.rounds)
    if a.part in ("x-transformers", "all"):
        x_transformers(a.rounds)


if __name__ == "__main__":
    main()
