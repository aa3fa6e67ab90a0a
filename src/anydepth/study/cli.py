"""``anydepth study``: train the sweep, run the FC and output-change experiments, write the report.

    anydepth study --quick                       # under 10 minutes on 2 CPU cores
    anydepth study --workers 2                   # the full study, two runs at a time
    anydepth study --schemes rezero,postln --depths 12,64 --seeds 2 --out runs/mine

Every output lands in ``--out``; starting the same command again skips finished runs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from anydepth.study import fc as fc_mod
from anydepth.study import output_change as oc_mod
from anydepth.study.report import write_report
from anydepth.study.runner import Runner, TrainerRunner, estimate_seconds, execute
from anydepth.study.sweep import SCHEMES, Plan, full_plan, quick_plan
from anydepth.study.verdicts import Evidence, decide

# Seconds per FC step per layer (width 256, batch 100) and per output-change forward per layer,
# measured on 2 contended cores; only for the estimate printed up front.
SEC_PER_FC_LAYER_STEP = 0.0012
SEC_PER_OC_LAYER = 0.15


def _cached(path: Path, compute: Callable[[], Any]) -> Any:
    """``compute()`` once: its JSON result is kept in ``path`` so a restarted study reuses it."""
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)
    return value


def estimate_total_seconds(plan: Plan, workers: int = 1, *, fc: bool = True, oc: bool = True) -> float:
    total = estimate_seconds(plan.runs(), workers)
    if fc:
        total += len(fc_mod.VARIANTS) * plan.fc_steps * sum(plan.fc_depths) * SEC_PER_FC_LAYER_STEP
    if oc:
        total += len(oc_mod.OUTPUT_CHANGE_SCHEMES) * sum(plan.output_change_depths) * SEC_PER_OC_LAYER
    return total


def run_study(
    plan: Plan,
    out: Path,
    *,
    runner: Runner,
    unigram_bits: float,
    workers: int = 1,
    progress: bool = True,
    fc: bool = True,
    output_change: bool = True,
    command: str = "anydepth study",
    oc_build: Callable | None = None,
) -> dict[str, Any]:
    """Runs ``plan`` into ``out`` (resuming) and writes the report; returns ``{"verdicts", "report"}``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    records = execute(plan.runs(), out, runner, workers=workers, progress=progress)
    fc_curves = (
        _cached(
            out / f"fc_L{'-'.join(map(str, plan.fc_depths))}_{plan.fc_steps}steps.json",
            lambda: fc_mod.run_fc(plan.fc_depths, plan.fc_steps, progress=progress),
        )
        if fc and plan.fc_depths
        else {}
    )
    oc_values = (
        _cached(
            out / f"output_change_L{'-'.join(map(str, plan.output_change_depths))}.json",
            lambda: oc_mod.measure(plan.output_change_depths, build=oc_build),
        )
        if output_change and plan.output_change_depths
        else {}
    )
    ev = Evidence(records, unigram_bits=unigram_bits, fc=fc_curves, output_change=oc_values)
    verdicts = decide(ev)
    plan_info = {
        "name": plan.name,
        "depths": list(plan.depths),
        "schemes": list(plan.schemes),
        "seeds": list(plan.seeds),
        "budgets": {str(k): v for k, v in plan.budgets.items()},
        "batch_size": plan.batch_size,
        "seq_len": plan.seq_len,
        "fc_depths": list(plan.fc_depths) if fc else [],
        "fc_steps": plan.fc_steps if fc else 0,
        "output_change_depths": list(plan.output_change_depths) if output_change else [],
    }
    report = write_report(
        out,
        ev=ev,
        verdicts=verdicts,
        plan=plan_info,
        command=command,
        fc_steps=plan.fc_steps if fc else None,
        elapsed_s=time.perf_counter() - t0,
    )
    return {"verdicts": verdicts, "report": report}


def _int_list(text: str, name: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--{name} takes comma-separated integers such as 12,64,128; got {text!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="anydepth study",
        description="Which residual schemes train at 12, 64 and 128 layers: sweep, experiments, report.",
    )
    p.add_argument("--quick", action="store_true", help="the small study (under 10 minutes on 2 cores)")
    p.add_argument("--data", default=None, help="training text file (default: bytes of the Python stdlib)")
    p.add_argument("--out", default="runs/study", help="output folder (default: runs/study)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per run (default: 3, quick: 1)")
    p.add_argument("--depths", type=lambda s: _int_list(s, "depths"), default=None, help="e.g. 12,64,128")
    p.add_argument(
        "--schemes",
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
        default=None,
        help=f"comma-separated subset of: {', '.join(SCHEMES)}",
    )
    p.add_argument("--steps", type=int, default=None, help="steps per run at every depth (overrides budgets)")
    p.add_argument("--workers", type=int, default=1, help="runs trained at once in separate processes")
    p.add_argument("--fc-steps", type=int, default=None, help="steps of the fully connected experiment")
    p.add_argument("--fc-depths", type=lambda s: _int_list(s, "fc-depths"), default=None, help="e.g. 32,64")
    p.add_argument(
        "--output-change-depths",
        type=lambda s: _int_list(s, "output-change-depths"),
        default=None,
        help="depths of the output-change measurement, e.g. 6,12,24,48",
    )
    p.add_argument("--no-fc", action="store_true", help="skip the fully connected experiment")
    p.add_argument("--no-output-change", action="store_true", help="skip the output-change measurement")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--publish",
        default=None,
        help="also copy report.md, the PNGs and results.json here (e.g. docs/study for the README)",
    )
    return p


def plan_from_args(args: argparse.Namespace) -> Plan:
    if args.quick and (args.depths or args.schemes):
        raise ValueError("--quick fixes its schemes and depths; drop --quick to choose --depths/--schemes")
    if args.quick:
        plan = quick_plan(seeds=args.seeds or 1)
    else:
        plan = full_plan(schemes=args.schemes, depths=args.depths, seeds=args.seeds or 3)
    changes: dict[str, Any] = {}
    if args.steps is not None:
        if args.steps < 1:
            raise ValueError(f"--steps must be a positive integer, got {args.steps}")
        changes["budgets"] = {d: args.steps for d in plan.budgets}
    if args.fc_steps is not None:
        if args.fc_steps < 1:
            raise ValueError(f"--fc-steps must be a positive integer, got {args.fc_steps}")
        changes["fc_steps"] = args.fc_steps
    for name in ("fc_depths", "output_change_depths"):
        depths = getattr(args, name)
        if depths is not None:
            flag = "--" + name.replace("_", "-")
            if not depths or any(d < 1 for d in depths):
                raise ValueError(f"{flag} takes positive integers such as 6,12,24; got {depths!r}")
            if name == "output_change_depths" and len(depths) < 2:
                raise ValueError(f"{flag} needs at least two depths to fit a growth rate; got {depths!r}")
            changes[name] = tuple(depths)
    if changes:
        import dataclasses

        plan = dataclasses.replace(plan, **changes)
    return plan


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        plan = plan_from_args(args)
        if args.workers < 1:
            raise ValueError(f"--workers must be a positive integer, got {args.workers}")
    except (ValueError, TypeError) as e:
        print(f"anydepth study: error: {e}", file=sys.stderr)
        return 2
    fc, oc = not args.no_fc, not args.no_output_change
    runs = plan.runs()
    est = estimate_total_seconds(plan, args.workers, fc=fc, oc=oc)
    print(
        f"anydepth study ({plan.name}): {len(runs)} runs ({', '.join(plan.schemes)} at depths "
        f"{', '.join(map(str, plan.depths))}, {len(plan.seeds)} seed(s)), "
        f"{'FC experiment, ' if fc else ''}{'output change, ' if oc else ''}"
        f"estimated {est / 60:.0f} min with {args.workers} worker(s); output in {args.out}",
        flush=True,
    )
    threads = 0
    if args.workers > 1:
        import os

        threads = max(1, (os.cpu_count() or 1) // args.workers)
    runner = TrainerRunner(data_path=args.data, threads=threads)
    from anydepth.train.data import load_corpus, unigram_entropy_bits

    train_tokens, _ = load_corpus(runner.data_config())
    unigram = float(unigram_entropy_bits(train_tokens))
    command = "anydepth study " + shlex.join(argv) if argv else "anydepth study"
    result = run_study(
        plan,
        Path(args.out),
        runner=runner,
        unigram_bits=unigram,
        workers=args.workers,
        progress=not args.no_progress,
        fc=fc,
        output_change=oc,
        command=command.strip(),
    )
    for v in result["verdicts"]:
        print(f"{v.claim:6s} {v.status:30s} {v.title}")
    print(f"report: {result['report']}")
    if args.publish:
        print(f"published: {publish(Path(args.out), Path(args.publish))}")
    return 0


def publish(out: Path, dest: Path) -> Path:
    """Copies the report, its plots and results.json (not the runs) to ``dest``."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.png"):
        old.unlink()  # plots of depths no longer in the study must not linger next to the new report
    for path in [out / "report.md", out / "results.json", *sorted(out.glob("*.png"))]:
        shutil.copy2(path, dest / path.name)
    return dest / "report.md"


if __name__ == "__main__":
    raise SystemExit(main())
