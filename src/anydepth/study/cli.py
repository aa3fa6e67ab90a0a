"""``anydepth study``: train the sweep, run the FC and output-change experiments, write the report.

    anydepth study --quick                       # under 15 minutes on 2 idle CPU cores
    anydepth study                               # the full study, two runs at a time
    anydepth study --schemes rezero postln --depths 12 64 --seeds 2 --out runs/mine

Every output lands in ``--out``; starting the same command again skips finished runs. The options are
the fields of :class:`StudyArgs`, parsed by tyro like those of ``anydepth train``: lists are
space-separated, a bad option or value is one line on stderr with exit code 2.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import tyro

from anydepth.study import fc as fc_mod
from anydepth.study import output_change as oc_mod
from anydepth.study.deep import DeepPlan, deep_rows, load_deep, run_deep
from anydepth.study.explain import explain_failures
from anydepth.study.report import dump_results, write_report
from anydepth.study.runner import Runner, TrainerRunner, calibrate, estimate_seconds, execute, finished
from anydepth.study.sweep import SCHEMES, STUDY_WORKERS, Plan, RunSpec, full_plan, quick_plan, validate_schemes
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


def _fc_path(plan: Plan, out: Path) -> Path:
    name = f"fc_L{'-'.join(map(str, plan.fc_depths))}_{plan.fc_steps}steps"
    if (plan.fc_width, plan.fc_lr) != (256, 0.01):
        name += f"_w{plan.fc_width}_lr{plan.fc_lr:g}"
    if plan.fc_layer_lr is not None:
        name += f"_layerlr{plan.fc_layer_lr:g}"
    return Path(out) / f"{name}.json"


def _oc_path(plan: Plan, out: Path) -> Path:
    return Path(out) / f"output_change_L{'-'.join(map(str, plan.output_change_depths))}.json"


def to_train(plan: Plan, out: Path | None) -> list[RunSpec]:
    """The plan's runs not yet finished in ``out`` (all of them without ``out``), with stand-ins for the
    following depths' runs, whose rates are chosen later (3 per scheme)."""
    runs = plan.runs() + plan.follow_placeholders()
    return runs if out is None else [s for s in runs if finished(s, Path(out) / "runs") is None]


def estimate_total_seconds(
    plan: Plan, workers: int = 1, *, fc: bool = True, oc: bool = True, lm: bool = True,
    rates: dict[tuple[str, int], float] | None = None, fc_rates: dict[tuple[str, int], float] | None = None,
    out: Path | None = None,
) -> float:
    """Seconds the plan will take: calibrated step times (``rates``, ``fc_rates``) where measured. With
    ``out``, what a restarted study reuses from there (finished runs, the FC and output-change results)
    costs nothing."""
    total = 0.0
    fc = fc and not (out is not None and _fc_path(plan, out).exists())
    oc = oc and not (out is not None and _oc_path(plan, out).exists())
    if lm:
        total += estimate_seconds(to_train(plan, out), workers, rates)
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
    # without bars (a log file), a line per run trained
    log = None if progress else functools.partial(print, flush=True)
    records = execute(plan.runs(), out, runner, workers=workers, progress=progress, log=log) if lm else []
    if lm and plan.lr_follow:
        records += execute(plan.follow_runs(records), out, runner, workers=workers, progress=progress, log=log)
    fc_curves = (
        _cached(
            _fc_path(plan, out),
            lambda: fc_mod.run_fc(plan.fc_depths, plan.fc_steps, width=plan.fc_width, lr=plan.fc_lr,
                                  layer_lr=plan.fc_layer_lr, progress=progress),
        )
        if fc and plan.fc_depths
        else {}
    )
    oc_values = (
        _cached(
            _oc_path(plan, out),
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
        "batch_sizes": {str(d): plan.batch(d) for d in plan.depths},
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
    trained = sum(1 for r in records if not r.get("resumed"))
    return {"verdicts": verdicts, "report": report, "runs_trained": trained, "runs_reused": len(records) - trained}


def _timings(results_json: Path) -> list[dict[str, Any]]:
    """The ``timings`` of an earlier study in the same folder (none if there was none)."""
    try:
        return list(json.loads(results_json.read_text()).get("timings", []))
    except (OSError, ValueError):
        return []


def record_timing(results_json: Path, earlier: list[dict[str, Any]], entry: dict[str, Any]) -> None:
    """Appends this command's ``entry`` (estimate, wall time, runs trained and reused) to ``results.json``'s
    ``timings``, after those of the earlier commands in the same folder, so that the time of the command
    that trained the runs survives a later one that only republished them."""
    data = json.loads(results_json.read_text())
    data["timings"] = [*earlier, entry]
    tmp = results_json.with_suffix(".json.tmp")
    tmp.write_text(dump_results(data))
    tmp.replace(results_json)


_SCHEMES_HELP = f"subset of: {' '.join(SCHEMES)} (space-separated)"


@dataclass(kw_only=True)
class StudyArgs:
    """``anydepth study``: which residual schemes train at 12, 64 and 256 layers, and at which learning
    rates: sweep, experiments, report. Lists are space-separated: ``--depths 12 64 --schemes rezero postln``."""

    quick: bool = False  # the small study (under 15 minutes on 2 cores)
    data: str | None = None  # training text file (None: bytes of the Python stdlib)
    out: str = "runs/study"  # output folder
    seeds: int | None = None  # seeds per claim run (None: 3, quick: 1)
    depths: tuple[int, ...] | None = None  # e.g. 12 64 256
    schemes: Annotated[tuple[str, ...] | None, tyro.conf.arg(help=_SCHEMES_HELP)] = None
    steps: int | None = None  # steps per run at every depth (overrides the budgets)
    lr_sweep: bool = True  # the learning-rate sweep (--no-lr-sweep: only the claim runs at lr 1e-3)
    lrs: tuple[float, ...] | None = None  # the sweep's learning rates (None: 1e-4 to 3e-2, half a decade apart)
    lm: bool = True  # the language-model runs (--no-lm skips them)
    workers: int | None = None  # runs trained at once in separate processes (None: 2, the deep runs 1)
    threads: int | None = None  # torch threads per run (None: cores // workers)
    fc: bool = True  # the fully connected experiment (--no-fc skips it)
    fc_steps: int | None = None  # steps of the fully connected experiment
    fc_depths: tuple[int, ...] | None = None  # depths of the fully connected experiment, e.g. 32 64 10000
    fc_width: int | None = None  # width of the fully connected layers (None: 256)
    fc_lr: float | None = None  # Adagrad rate of the FC experiment (None: 0.01)
    # Adagrad rate of the FC hidden layers and gates (None: --fc-lr); 1e-4 at 10,000 layers
    fc_layer_lr: float | None = None
    output_change: bool = True  # the output-change measurement (--no-output-change skips it)
    output_change_depths: tuple[int, ...] | None = None  # depths of the output-change measurement, e.g. 6 12 24 48
    deep: bool = False  # also train the deep transformer (1,000 blocks by default) and post-LN as its control
    deep_depth: int | None = None  # blocks of the deep run (None: 1000)
    deep_minutes: float | None = None  # training minutes per deep scheme
    # deep schemes, the recommended one first and the control last (None: rezero postln)
    deep_schemes: tuple[str, ...] | None = None
    deep_lr: float | None = None  # learning rate of the deep runs (None: 1e-3)
    progress: bool = True  # progress bars (--no-progress: none)
    readme: str | None = None  # with --publish: rewrite this README's study tables from the published results.json
    publish: str | None = None  # also copy report.md, the PNGs, results.json and the deep runs' JSON here


_LIST_OPTIONS = tuple(
    "--" + f.name.replace("_", "-") for f in dataclasses.fields(StudyArgs) if "tuple" in str(f.type)
)


def parse_args(argv: list[str]) -> StudyArgs:
    """``anydepth study`` arguments -> :class:`StudyArgs` (raises :class:`~anydepth.cli.CliError`)."""
    from anydepth.cliparse import CliError, _check_keys, _option_names, _tyro_cli

    if "-h" not in argv and "--help" not in argv:
        _check_keys(argv, _option_names(StudyArgs), "study")
    # `--depths 12,64` is an easy slip (and the form of older versions): name the form tyro reads.
    flag = None
    for tok in argv:
        if tok.startswith("--"):
            flag, _, value = tok.partition("=")
            values = [value] if value else []
        else:
            values = [tok]
        if flag in _LIST_OPTIONS and any("," in v for v in values):
            parts = [x for v in values for x in v.split(",") if x]
            raise CliError(f"{flag} takes space-separated values: {flag} {' '.join(parts)}")
    return _tyro_cli(StudyArgs, argv, None, "anydepth study", flags=True)


def _positive(name: str, value, kind=int):
    if value is not None and (isinstance(value, bool) or not value > 0):
        raise ValueError(f"--{name} must be a positive {'integer' if kind is int else 'number'}, got {value}")
    return value


def plan_from_args(args: StudyArgs) -> Plan:
    if args.quick and (args.depths or args.schemes or args.lrs):
        raise ValueError("--quick fixes its schemes, depths and rates; drop --quick to choose --depths/--schemes/--lrs")
    if args.quick:
        plan = quick_plan(seeds=args.seeds or 1)
        if not args.lr_sweep:
            plan = dataclasses.replace(plan, lr_sweep={})
    else:
        plan = full_plan(
            schemes=list(args.schemes) if args.schemes is not None else None,
            depths=list(args.depths) if args.depths is not None else None,
            seeds=args.seeds or 3,
            lr_sweep=args.lr_sweep,
            lrs=list(args.lrs) if args.lrs is not None else None,
        )
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
                raise ValueError(f"{flag} takes positive integers such as 6 12 24; got {' '.join(map(str, depths))!r}")
            if name == "output_change_depths" and len(depths) < 2:
                raise ValueError(f"{flag} needs at least two depths to fit a growth rate; got {list(depths)!r}")
            changes[name] = tuple(depths)
    if changes:
        plan = dataclasses.replace(plan, **changes)
    return plan


def deep_plan_from_args(args: StudyArgs) -> DeepPlan | None:
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
        changes["schemes"] = tuple(validate_schemes(list(args.deep_schemes)))
    return DeepPlan(**changes)


def lock_out(out: Path) -> Any:
    """Holds ``<out>/.lock`` (an advisory ``flock``, freed by the system however the process ends) so
    that a second study cannot train the same runs into the same folder; ValueError if another holds it.
    Returns the open lock file (keep it). Where ``fcntl`` is missing (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:
        return None
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / ".lock", "w")  # noqa: SIM115 - held open for the life of the study
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise ValueError(
            f"--out {out} is in use by another anydepth study (it holds {out / '.lock'}); let it finish, stop "
            "it (a stopped study continues where it was when started again), or choose another --out"
        ) from None
    return f


def main(argv: list[str] | None = None) -> int:
    from anydepth.cliparse import CliError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
        plan = plan_from_args(args)
        deep_plan = deep_plan_from_args(args)
        if args.readme and not args.publish:
            raise ValueError("--readme needs --publish (the README follows the published results.json)")
        if args.workers is not None and args.workers < 1:
            raise ValueError(f"--workers must be a positive integer, got {args.workers}")
        _positive("threads", args.threads)
        lock = lock_out(Path(args.out))  # held while the study runs
    except (CliError, ValueError, TypeError) as e:
        print(f"anydepth study: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    try:
        return _study(args, argv, plan, deep_plan)
    finally:
        if lock is not None:
            lock.close()


def _study(args: StudyArgs, argv: list[str], plan: Plan, deep_plan: DeepPlan | None) -> int:
    fc, oc, lm = args.fc, args.output_change, args.lm
    # Model S runs train two at a time, one thread each; the deep runs go one after another, so that the
    # recommended scheme has the machine to itself (its 30-minute goal). --workers sets both.
    workers = args.workers or STUDY_WORKERS
    deep_workers = args.workers or 1
    threads = args.threads or max(1, (os.cpu_count() or 1) // workers)
    runner = TrainerRunner(data_path=args.data, threads=threads)
    progress = args.progress
    # The estimate is calibrated: a few timed steps of every model the study will train, on this machine.
    t_start = t_cal = time.perf_counter()
    with torch_threads(threads):
        rates = calibrate(to_train(plan, Path(args.out)), runner) if lm else {}
        fc_rates = ({(v, d): fc_mod.time_fc_step(v, d, width=plan.fc_width) for d in plan.fc_depths
                     for v in fc_mod.VARIANTS} if fc and not _fc_path(plan, Path(args.out)).exists() else {})
    t_cal = time.perf_counter() - t_cal
    # the whole command, calibration included: what a user waits for
    est = t_cal + estimate_total_seconds(plan, workers, fc=fc, oc=oc, lm=lm, rates=rates, fc_rates=fc_rates,
                                         out=Path(args.out))
    if deep_plan:  # each deep scheme trains for its minutes, plus its build, calibration and evaluation
        est += math.ceil(len(deep_plan.schemes) / deep_workers) * (60 * deep_plan.minutes + 30)
    runs = plan.runs() if lm else []
    deep_what = (f"{deep_plan.depth}-block deep runs ({deep_workers} at a time, {args.threads or 1} thread each), "
                 if deep_plan else "")
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
        f"{deep_what}"
        f"estimated {est / 60:.0f} min with {workers} worker(s) x {threads} thread(s) "
        f"(calibrated on this machine in {t_cal:.0f} s); output in {args.out}",
        flush=True,
    )
    from anydepth.train.data import load_corpus, unigram_entropy_bits

    train_tokens, _ = load_corpus(runner.data_config())
    unigram = float(unigram_entropy_bits(train_tokens))

    def explain(records, out):
        return explain_failures(records, out, unigram_bits=unigram, tokens=train_tokens)

    command = "anydepth study " + shlex.join(argv) if argv else "anydepth study"
    earlier = _timings(Path(args.out) / "results.json")
    with torch_threads(threads):
        if deep_plan:
            # one thread per deep run unless told otherwise: a step of a narrow 1,000-block model is a few
            # hundred thousand tiny ops, as fast on one thread as on two, and a second thread only waits for
            # a core whenever anything else runs (docs/benchmarks.md, "Deep narrow models")
            run_deep(deep_plan, Path(args.out), runner=dataclasses.replace(runner, threads=args.threads or 1),
                     unigram_bits=unigram, progress=progress, workers=deep_workers)
        result = run_study(
            plan,
            Path(args.out),
            runner=runner,
            unigram_bits=unigram,
            workers=workers,
            progress=progress,
            fc=fc,
            output_change=oc,
            command=command.strip(),
            lm=lm,
            deep=load_deep(Path(args.out)),
            explain=explain,
        )
    elapsed = time.perf_counter() - t_start
    record_timing(Path(args.out) / "results.json", earlier, {
        "command": command.strip(), "estimated_s": round(est, 1), "elapsed_s": round(elapsed, 1),
        "runs_trained": result["runs_trained"], "runs_reused": result["runs_reused"],
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    })
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
