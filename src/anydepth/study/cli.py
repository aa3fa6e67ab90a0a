"""``anydepth study``: train the sweep, run the FC and output-change experiments, write the report.

    anydepth study --quick                       # under 10 minutes on 2 CPU cores
    anydepth study --workers 2                   # the full study, two runs at a time
    anydepth study --schemes rezero,postln --depths 12,64 --seeds 2 --out runs/mine

Every output lands in ``--out``; starting the same command again skips finished runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from anydepth.study import fc as fc_mod
from anydepth.study import output_change as oc_mod
from anydepth.study.deep import DeepPlan, deep_rows, load_deep, run_deep
from anydepth.study.explain import explain_failures
from anydepth.study.report import write_report
from anydepth.study.runner import Runner, TrainerRunner, calibrate, estimate_seconds, execute
from anydepth.study.sweep import QUICK_WORKERS, SCHEMES, Plan, full_plan, quick_plan, validate_schemes
from anydepth.study.verdicts import Evidence, decide

# Seconds per output-change forward per layer, and per FC step per layer where the FC step is not timed
# (2.2-3.7 s per step at 10,000 layers on one thread); only for the estimate printed up front.
SEC_PER_OC_LAYER = 0.05
SEC_PER_FC_LAYER_STEP = 3e-4


def _cached(path: Path, compute: Callable[[], Any]) -> Any:
    """``compute()`` once: its JSON result is kept in ``path`` so a restarted study reuses it."""
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)
    return value


def estimate_total_seconds(
    plan: Plan, workers: int = 1, *, fc: bool = True, oc: bool = True, lm: bool = True,
    rates: dict[tuple[str, int], float] | None = None, fc_rates: dict[tuple[str, int], float] | None = None,
) -> float:
    """Seconds the plan will take: calibrated step times (``rates``, ``fc_rates``) where measured."""
    total = 0.0
    if lm:
        # the following depths' runs are chosen later; their count is known (3 rates per scheme)
        total += estimate_seconds(plan.runs() + plan.follow_placeholders(), workers, rates)
    if fc:
        fc_rates = fc_rates or {}
        for d in plan.fc_depths:
            for v in fc_mod.VARIANTS:
                total += plan.fc_steps * fc_rates.get((v, d), SEC_PER_FC_LAYER_STEP * d)
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
    lm: bool = True,
    deep: list[dict[str, Any]] | None = None,
    explain: Callable[[list[dict[str, Any]], Path], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Runs ``plan`` into ``out`` (resuming) and writes the report; returns ``{"verdicts", "report"}``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    records = execute(plan.runs(), out, runner, workers=workers, progress=progress) if lm else []
    if lm and plan.lr_follow:
        records += execute(plan.follow_runs(records), out, runner, workers=workers, progress=progress)
    fc_name = f"fc_L{'-'.join(map(str, plan.fc_depths))}_{plan.fc_steps}steps"
    if (plan.fc_width, plan.fc_lr) != (256, 0.01):
        fc_name += f"_w{plan.fc_width}_lr{plan.fc_lr:g}"
    if plan.fc_layer_lr is not None:
        fc_name += f"_layerlr{plan.fc_layer_lr:g}"
    fc_curves = (
        _cached(
            out / f"{fc_name}.json",
            lambda: fc_mod.run_fc(plan.fc_depths, plan.fc_steps, width=plan.fc_width, lr=plan.fc_lr,
                                  layer_lr=plan.fc_layer_lr, progress=progress),
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
    failures = explain(records, out) if explain and records else {}
    plan_info = {
        "name": plan.name,
        "depths": list(plan.depths),
        "schemes": list(plan.schemes),
        "seeds": list(plan.seeds),
        "budgets": {str(k): v for k, v in plan.budgets.items()},
        "batch_size": plan.batch_size,
        "seq_len": plan.seq_len,
        "lr_sweep": {str(d): {"schemes": list(sc), "lrs": list(lrs)} for d, (sc, lrs) in plan.lr_sweep.items()},
        "lr_follow": {str(d): {"schemes": list(sc), "from_depth": src} for d, (sc, src) in plan.lr_follow.items()},
        "fc_depths": list(plan.fc_depths) if fc else [],
        "fc_steps": plan.fc_steps if fc else 0,
        "fc_width": plan.fc_width,
        "fc_lr": plan.fc_lr,
        "fc_layer_lr": plan.fc_layer_lr,
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
        deep=deep_rows(deep or []),
        failures=failures,
    )
    return {"verdicts": verdicts, "report": report}


def _float_list(text: str, name: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--{name} takes comma-separated numbers such as 1e-3,3e-3; got {text!r}"
        ) from None


def _int_list(text: str, name: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--{name} takes comma-separated integers such as 12,64,128; got {text!r}"
        ) from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, like `anydepth train`
        self.exit(2, f"anydepth study: error: {message} (see anydepth study --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="anydepth study",
        description="Which residual schemes train at 12, 64 and 256 layers, and at which learning rates: sweep, "
        "experiments, report.",
    )
    p.add_argument("--quick", action="store_true", help="the small study (under 15 minutes on 2 cores)")
    p.add_argument("--data", default=None, help="training text file (default: bytes of the Python stdlib)")
    p.add_argument("--out", default="runs/study", help="output folder (default: runs/study)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per claim run (default: 3, quick: 1)")
    p.add_argument("--depths", type=lambda s: _int_list(s, "depths"), default=None, help="e.g. 12,64,256")
    p.add_argument(
        "--schemes",
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
        default=None,
        help=f"comma-separated subset of: {', '.join(SCHEMES)}",
    )
    p.add_argument("--steps", type=int, default=None, help="steps per run at every depth (overrides budgets)")
    p.add_argument("--no-lr-sweep", action="store_true", help="only the claim runs at lr 1e-3")
    p.add_argument("--lrs", type=lambda s: _float_list(s, "lrs"), default=None,
                   help="the sweep's learning rates (default: 1e-4 to 3e-2, half a decade apart)")
    p.add_argument("--no-lm", action="store_true", help="skip the language-model runs")
    p.add_argument("--workers", type=int, default=None,
                   help="runs trained at once in separate processes (default 1, quick: 2)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per run (default: cores // workers)")
    p.add_argument("--fc-steps", type=int, default=None, help="steps of the fully connected experiment")
    p.add_argument("--fc-depths", type=lambda s: _int_list(s, "fc-depths"), default=None, help="e.g. 32,64,10000")
    p.add_argument("--fc-width", type=int, default=None, help="width of the fully connected layers (default 256)")
    p.add_argument("--fc-lr", type=float, default=None, help="Adagrad rate of the FC experiment (default 0.01)")
    p.add_argument("--fc-layer-lr", type=float, default=None,
                   help="Adagrad rate of the FC hidden layers and gates (default: --fc-lr); 1e-4 at 10,000 layers")
    p.add_argument(
        "--output-change-depths",
        type=lambda s: _int_list(s, "output-change-depths"),
        default=None,
        help="depths of the output-change measurement, e.g. 6,12,24,48",
    )
    p.add_argument("--no-fc", action="store_true", help="skip the fully connected experiment")
    p.add_argument("--no-output-change", action="store_true", help="skip the output-change measurement")
    p.add_argument("--deep", action="store_true",
                   help="also train the deep transformer (1,000 blocks by default) and post-LN as its control")
    p.add_argument("--deep-depth", type=int, default=None, help="blocks of the deep run (default 1000)")
    p.add_argument("--deep-minutes", type=float, default=None, help="training minutes per deep scheme")
    p.add_argument("--deep-schemes", type=lambda s: [x.strip() for x in s.split(",") if x.strip()], default=None,
                   help="deep schemes, the recommended one first and the control last (default deepnorm,postln)")
    p.add_argument("--deep-lr", type=float, default=None, help="learning rate of the deep runs (default 1e-3)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--readme", default=None,
                   help="with --publish: rewrite this README's study tables from the published results.json")
    p.add_argument(
        "--publish",
        default=None,
        help="also copy report.md, the PNGs, results.json and the deep runs' JSON here (e.g. docs/study)",
    )
    return p


def _positive(name: str, value, kind=int):
    if value is not None and (isinstance(value, bool) or not value > 0):
        raise ValueError(f"--{name} must be a positive {'integer' if kind is int else 'number'}, got {value}")
    return value


def plan_from_args(args: argparse.Namespace) -> Plan:
    if args.quick and (args.depths or args.schemes or args.lrs):
        raise ValueError("--quick fixes its schemes, depths and rates; drop --quick to choose --depths/--schemes/--lrs")
    if args.quick:
        plan = quick_plan(seeds=args.seeds or 1)
        if args.no_lr_sweep:
            plan = dataclasses.replace(plan, lr_sweep={})
    else:
        plan = full_plan(schemes=args.schemes, depths=args.depths, seeds=args.seeds or 3,
                         lr_sweep=not args.no_lr_sweep, lrs=args.lrs)
    changes: dict[str, Any] = {}
    if _positive("steps", args.steps) is not None:
        changes["budgets"] = {d: args.steps for d in plan.budgets}
    if _positive("fc-steps", args.fc_steps) is not None:
        changes["fc_steps"] = args.fc_steps
    if _positive("fc-width", args.fc_width) is not None:
        changes["fc_width"] = args.fc_width
    if _positive("fc-lr", args.fc_lr, float) is not None:
        changes["fc_lr"] = args.fc_lr
    if _positive("fc-layer-lr", args.fc_layer_lr, float) is not None:
        changes["fc_layer_lr"] = args.fc_layer_lr
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
        plan = dataclasses.replace(plan, **changes)
    return plan


def deep_plan_from_args(args: argparse.Namespace) -> DeepPlan | None:
    if not args.deep:
        for flag in ("deep_depth", "deep_minutes", "deep_schemes", "deep_lr"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} needs --deep")
        return None
    changes: dict[str, Any] = {}
    if _positive("deep-depth", args.deep_depth) is not None:
        changes["depth"] = args.deep_depth
    if _positive("deep-minutes", args.deep_minutes, float) is not None:
        changes["minutes"] = args.deep_minutes
    if _positive("deep-lr", args.deep_lr, float) is not None:
        changes["lr"] = args.deep_lr
    if args.deep_schemes is not None:
        changes["schemes"] = tuple(validate_schemes(args.deep_schemes))
    return DeepPlan(**changes)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        plan = plan_from_args(args)
        deep_plan = deep_plan_from_args(args)
        if args.readme and not args.publish:
            raise ValueError("--readme needs --publish (the README follows the published results.json)")
        if args.workers is None:
            # the quick study's runs and the deep runs train two single-thread processes at a time
            args.workers = QUICK_WORKERS if args.quick or deep_plan else 1
        if args.workers < 1:
            raise ValueError(f"--workers must be a positive integer, got {args.workers}")
        _positive("threads", args.threads)
    except (ValueError, TypeError) as e:
        print(f"anydepth study: error: {e}", file=sys.stderr)
        return 2
    fc, oc, lm = not args.no_fc, not args.no_output_change, not args.no_lm
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    runner = TrainerRunner(data_path=args.data, threads=threads)
    progress = not args.no_progress
    # The estimate is calibrated: a few timed steps of every model the study will train, on this machine.
    t_cal = time.perf_counter()
    with torch_threads(threads):
        rates = calibrate(plan.runs() + plan.follow_placeholders(), runner) if lm else {}
        fc_rates = ({(v, d): fc_mod.time_fc_step(v, d, width=plan.fc_width) for d in plan.fc_depths
                     for v in fc_mod.VARIANTS} if fc else {})
    t_cal = time.perf_counter() - t_cal
    est = estimate_total_seconds(plan, args.workers, fc=fc, oc=oc, lm=lm, rates=rates, fc_rates=fc_rates)
    if deep_plan:  # each deep scheme trains for its minutes, plus its build, calibration and evaluation
        est += math.ceil(len(deep_plan.schemes) / args.workers) * (60 * deep_plan.minutes + 30)
    runs = plan.runs() if lm else []
    what = (
        f"{len(runs) + plan.follow_count()} runs ({', '.join(plan.schemes)} at depths "
        f"{', '.join(map(str, plan.depths))}, {len(plan.seeds)} seed(s), learning-rate sweep at "
        f"{', '.join(map(str, plan.lr_sweep)) or 'none'}), "
        if lm
        else "no language-model runs, "
    )
    print(
        f"anydepth study ({plan.name if lm else 'custom'}): {what}"
        f"{'FC experiment, ' if fc else ''}{'output change, ' if oc else ''}"
        f"{f'{deep_plan.depth}-block deep runs, ' if deep_plan else ''}"
        f"estimated {est / 60:.0f} min with {args.workers} worker(s) x {threads} thread(s) "
        f"(calibrated on this machine in {t_cal:.0f} s); output in {args.out}",
        flush=True,
    )
    from anydepth.train.data import load_corpus, unigram_entropy_bits

    train_tokens, _ = load_corpus(runner.data_config())
    unigram = float(unigram_entropy_bits(train_tokens))

    def explain(records, out):
        return explain_failures(records, out, unigram_bits=unigram, tokens=train_tokens)

    command = "anydepth study " + shlex.join(argv) if argv else "anydepth study"
    t0 = time.perf_counter()
    with torch_threads(threads):
        if deep_plan:
            run_deep(deep_plan, Path(args.out), runner=runner, unigram_bits=unigram, progress=progress,
                     workers=args.workers)
        result = run_study(
            plan,
            Path(args.out),
            runner=runner,
            unigram_bits=unigram,
            workers=args.workers,
            progress=progress,
            fc=fc,
            output_change=oc,
            command=command.strip(),
            lm=lm,
            deep=load_deep(Path(args.out)),
            explain=explain,
        )
    elapsed = time.perf_counter() - t0
    for v in result["verdicts"]:
        print(f"{v.claim:6s} {v.status:30s} {v.title}")
    print(f"report: {result['report']}")
    print(f"time: {elapsed / 60:.1f} min (estimated {est / 60:.1f} min)")
    if args.publish:
        print(f"published: {publish(Path(args.out), Path(args.publish))}")
        if args.readme:
            from anydepth.study.readme import update

            print(f"updated: {update(Path(args.readme), Path(args.publish) / 'results.json')}")
    return 0


class torch_threads:
    """``with torch_threads(n):`` sets torch's intra-op threads for the block (the study's own processes)."""

    def __init__(self, n: int):
        import torch

        self.n, self.old = n, torch.get_num_threads()

    def __enter__(self):
        import torch

        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.old)


def publish(out: Path, dest: Path) -> Path:
    """Copies the report, its plots and results.json (not the runs) to ``dest``."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.png"):
        old.unlink()  # plots of depths no longer in the study must not linger next to the new report
    for path in [out / "report.md", out / "results.json", *sorted(out.glob("*.png"))]:
        shutil.copy2(path, dest / path.name)
    if (out / "deep").is_dir():
        (dest / "deep").mkdir(exist_ok=True)
        for path in sorted((out / "deep").glob("*.json")):
            shutil.copy2(path, dest / "deep" / path.name)
    return dest / "report.md"


if __name__ == "__main__":
    raise SystemExit(main())
