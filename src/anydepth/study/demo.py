"""``anydepth demo`` (what ``make demo`` runs): depth, shown in a few minutes on 2 CPU cores.

Trains the study's recommended scheme at a depth where post-LN fails, then post-LN with exactly the same
model size, data, steps and learning rate (Model S of the depth study: constant rate, no warm-up, no
clipping), and prints one summary: the recommended scheme ends well under the unigram entropy of the
text, post-LN does not. The scheme is the 64-layer recommendation of the published study that the README's
"Choosing a scheme" table follows (``tests/study/test_demo.py`` checks that they agree).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from anydepth.study.runner import TrainerRunner, json_safe, run_one
from anydepth.study.sweep import SCHEMES, RunSpec
from anydepth.study.verdicts import DECIDE_MARGIN_BPC, final_val

DEMO_SCHEME = "hyper4"  # the README's recommendation at 64 layers
DEMO_DEPTH = 48
DEMO_STEPS = 400


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"anydepth demo: error: {message} (see anydepth demo --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="anydepth demo", description="Train the recommended scheme and post-LN at a depth where "
                "post-LN fails, and compare.")
    p.add_argument("--depth", type=int, default=DEMO_DEPTH, help=f"blocks (default {DEMO_DEPTH})")
    p.add_argument("--steps", type=int, default=DEMO_STEPS, help=f"steps per model (default {DEMO_STEPS})")
    p.add_argument("--scheme", default=DEMO_SCHEME, help=f"the scheme to show (default {DEMO_SCHEME})")
    p.add_argument("--data", default=None, help="training text (default: bytes of the Python stdlib)")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    for name in ("depth", "steps"):
        if getattr(args, name) < 1:
            print(f"anydepth demo: error: --{name} must be a positive integer, got {getattr(args, name)}",
                  file=sys.stderr)
            return 2
    if args.scheme not in SCHEMES:
        print(f"anydepth demo: error: unknown --scheme {args.scheme!r}; choose from {', '.join(SCHEMES)}",
              file=sys.stderr)
        return 2
    from anydepth.train.data import load_corpus, unigram_entropy_bits

    runner = TrainerRunner(data_path=args.data)
    unigram = float(unigram_entropy_bits(load_corpus(runner.data_config())[0]))
    out = Path(args.out)
    results: dict[str, Any] = {"depth": args.depth, "steps": args.steps, "unigram_bits": unigram, "runs": {}}
    t0 = time.perf_counter()
    for scheme in (args.scheme, "postln"):
        spec = RunSpec(scheme=scheme, depth=args.depth, seed=0, steps=args.steps)
        print(f"training {SCHEMES[scheme].title} at {args.depth} layers for {args.steps} steps", flush=True)
        rec = run_one(runner, spec, out / "runs", not args.no_progress)
        val = final_val(rec)
        results["runs"][scheme] = {"final_val_bpc": val, "status": rec.get("status"), "wall_s": rec.get("wall_s"),
                                   "trained": math.isfinite(val) and val <= unigram - DECIDE_MARGIN_BPC,
                                   "run_dir": str(out / "runs" / spec.run_id)}
    results["wall_s"] = time.perf_counter() - t0
    (out / "demo.json").write_text(json.dumps(json_safe(results), indent=1))
    good, post = results["runs"][args.scheme], results["runs"]["postln"]

    def verdict(r):
        margin = f"{DECIDE_MARGIN_BPC:.0f} bpc"
        return "trained" if r["trained"] else f"failed to train (not {margin} under the unigram entropy)"

    def show(r):
        v = r["final_val_bpc"]
        return "diverged" if not math.isfinite(v) else f"{v:.2f} bpc"

    print(
        f"\n{args.depth} layers, {args.steps} steps each, lr 1e-3, no warm-up (unigram entropy of the text: "
        f"{unigram:.2f} bits per byte):\n"
        f"  {SCHEMES[args.scheme].title:32s} {show(good):>12s}  {verdict(good)}\n"
        f"  {SCHEMES['postln'].title:32s} {show(post):>12s}  {verdict(post)}\n"
        f"in {results['wall_s'] / 60:.1f} min; details in {out / 'demo.json'}; why: docs/study/full/report.md"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
