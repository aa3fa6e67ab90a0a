"""Runs the study's training runs through the trainer, resumably and optionally in parallel.

Each run lives in ``<out>/runs/<run_id>/``: the trainer writes its curve there as it goes
(``train/metrics.jsonl``), and ``result.json`` is written last, atomically. A run whose
``result.json`` exists and records the same settings (steps, batch, sequence length, lr, warm-up) is
finished and is skipped when the study is started again. A run without one was interrupted: it
continues from its last checkpoint (``CHECKPOINTS_PER_RUN`` per run; the trainer's resume is bit for
bit) if ``spec.json`` records the same settings, else it is trained again from scratch.

Divergence is a result, not a crash: the trainer's ``TrainingDiverged`` becomes a record with
``status = "diverged"``. Any other exception becomes ``status = "error"`` (reported as "failed to
run"); such a record is not saved as finished, so a later start retries it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from anydepth.study.sweep import MODEL_S, SCHEMES, RunSpec
from anydepth.train.malloc import retain_freed_memory

Runner = Callable[[RunSpec, Path, bool], dict[str, Any]]
"""``runner(spec, run_dir, progress) -> record``; the record holds at least ``status`` and ``curve``."""

RESULT_FILE = "result.json"

# Fallback cost model for the estimate when no calibration is available (seconds per block-step and per
# step of Model S on 2 idle CPU cores, docs/study.md "Budgets and time"). `anydepth study` calibrates on
# the machine it runs on instead (`calibrate`): a few timed steps of every (scheme, depth) it will train.
SEC_PER_BLOCK_STEP = 0.0045
SEC_PER_STEP = 0.02
SEC_PER_RUN = 3.0  # model build, corpus load, final evaluation and checkpoint of one run
# An interrupted run loses at most 1/6 of its steps (about 2 minutes of a 256-layer run), for one
# checkpoint write per 100 steps of a 600-step run (under 1% of its time).
CHECKPOINTS_PER_RUN = 6
SPEC_FILE = "spec.json"


def calibrate(specs: Iterable[RunSpec], runner: Any, *, steps: int = 3) -> dict[tuple[str, int], float]:
    """Seconds per training step of each distinct (scheme, depth) in ``specs``, timed on this machine.

    Each model is built as ``runner`` builds it and trained with the trainer's own optimizer for two
    untimed (allocation, optimizer state) and ``steps`` timed steps on random bytes; the median step is
    kept. Runners without ``model_config`` get no calibration.
    """
    import torch

    if not hasattr(runner, "model_config"):
        return {}
    from anydepth.model.build import build_model
    from anydepth.train.optim import build_optimizer

    rates: dict[tuple[str, int], float] = {}
    for spec in specs:
        key = (spec.scheme, spec.depth)
        if key in rates:
            continue
        cfg = runner.model_config(spec)
        torch.manual_seed(0)
        model = build_model(cfg)
        opt = build_optimizer(model, runner.train_config(spec, False))
        x = torch.randint(0, cfg.vocab_size, (spec.batch_size, spec.seq_len + 1))
        times = []
        for i in range(steps + 2):
            t0 = time.perf_counter()
            logits = model(x[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i > 1:
                times.append(time.perf_counter() - t0)
        rates[key] = sorted(times)[len(times) // 2]
        del model, opt
    return rates


def estimate_seconds(
    specs: Iterable[RunSpec], workers: int = 1, rates: dict[tuple[str, int], float] | None = None
) -> float:
    """Wall-clock estimate of training ``specs`` with ``workers`` processes sharing the cores, from the
    calibrated ``rates`` (seconds per step) where given, else the fallback cost model."""
    rates = rates or {}
    total = 0.0
    for s in specs:
        per_step = rates.get((s.scheme, s.depth), s.depth * SEC_PER_BLOCK_STEP + SEC_PER_STEP)
        total += s.steps * per_step + SEC_PER_RUN
    cores = os.cpu_count() or 1
    # Processes beyond the core count only share the same cores.
    return total / max(1, min(workers, cores))


def read_metrics(path: Path) -> tuple[list[list[float]], list[list[float]]]:
    """``(train_curve, val_curve)`` from a trainer ``metrics.jsonl``: ``[[step, bpc], ...]`` each.

    Non-finite losses are kept as ``nan`` (JSON has no Inf), so a curve shows where a run blew up.
    A truncated last line (the process was killed mid-write) is ignored.
    """
    train: list[list[float]] = []
    val: list[list[float]] = []
    if not path.exists():
        return train, val
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "train_bpc" in row:
            train.append([int(row["step"]), _finite_or_nan(row["train_bpc"])])
        elif "val_bpc" in row:
            val.append([int(row["step"]), _finite_or_nan(row["val_bpc"])])
    return train, val


def _finite_or_nan(v: Any) -> float:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


@dataclass(frozen=True)
class TrainerRunner:
    """The real runner: builds the scheme's preset at the run's depth and calls ``anydepth.train.loop.run``.

    Picklable (a frozen dataclass of plain fields) so a process pool can ship it to workers.
    """

    data_path: str | None = None  # None: the trainer's default corpus (bytes of the Python stdlib)
    max_bytes: int | None = 4_000_000  # Model S setup: the first 4 MB of the corpus (None: all of it)
    eval_batches: int = 8  # validation batches at the end of each run
    threads: int = 0  # torch threads per run; 0 leaves torch's default
    model: tuple[tuple[str, Any], ...] = ()  # ModelConfig fields replacing Model S's (the deep runs' width)

    def model_config(self, spec: RunSpec):
        from anydepth.model import presets

        scheme = SCHEMES[spec.scheme]
        overrides = {**MODEL_S, **dict(self.model), "max_seq_len": spec.seq_len, **scheme.overrides,
                     "depth": spec.depth}
        return presets.get(scheme.preset, **overrides)

    def data_config(self):
        from anydepth.train.config import DataConfig

        return DataConfig(path=self.data_path, max_bytes=self.max_bytes)

    def train_config(self, spec: RunSpec, progress: bool):
        from anydepth.train.config import TrainConfig

        return TrainConfig(
            steps=spec.steps,
            batch_size=spec.batch_size,
            seq_len=spec.seq_len,
            lr=spec.lr,
            warmup=spec.warmup,
            schedule="constant",
            weight_decay=0.0,  # the papers' comparisons are about the residual scheme, not regularisation
            betas=(0.9, 0.98),
            clip=0.0,  # Model S is plain Adam: clipping would hide the instability the study measures
            seed=spec.seed,
            threads=self.threads or None,
            eval_every=0,  # one validation pass, at the end
            eval_batches=self.eval_batches,
            log_every=1,  # steps-to-target needs the whole curve
            checkpoint_every=max(1, spec.steps // CHECKPOINTS_PER_RUN),
            keep_last=1,
            on_nan="stop",
            progress=progress,
            sample_tokens=0,
        )

    def __call__(self, spec: RunSpec, run_dir: Path, progress: bool) -> dict[str, Any]:
        from anydepth.train.config import RunConfig
        from anydepth.train.loop import TrainingDiverged, run

        train_dir = run_dir / "train"
        model_cfg = self.model_config(spec)
        cfg = RunConfig(
            model=model_cfg,
            train=self.train_config(spec, progress),
            data=self.data_config(),
            out=str(train_dir),
            # run_one leaves an interrupted run in place only if it has the same settings
            resume=str(train_dir) if (train_dir / "run.json").exists() else None,
        )
        record: dict[str, Any] = {"model": model_cfg.to_dict()}
        try:
            summary = run(cfg)
        except TrainingDiverged as e:
            record.update(status="diverged", diverged_step=int(e.step))
        else:
            record.update(
                status="diverged" if summary.get("diverged") else "ok",
                diverged_step=summary.get("diverged_step"),
                final_val_bpc=_finite_or_nan(summary.get("final_val_bpc")),
                tokens_per_s=summary.get("tokens_per_s"),
            )
        curve, val_curve = read_metrics(train_dir / "metrics.jsonl")
        record.update(curve=curve, val_curve=val_curve)
        return record


def finished(spec: RunSpec, runs_dir: Path) -> dict[str, Any] | None:
    """The saved record of ``spec`` if it finished with the same budget and settings, else None (a changed
    plan retrains the run)."""
    done = Path(runs_dir) / spec.run_id / RESULT_FILE
    if not done.exists():
        return None
    saved = json.loads(done.read_text())
    return saved if _same_settings(saved, spec) else None


def _same_settings(saved: Any, spec: RunSpec) -> bool:
    """Whether a saved record (``result.json``, ``spec.json``) is of ``spec``'s settings."""
    return isinstance(saved, dict) and all(saved.get(k) == v for k, v in spec.to_dict().items())


def run_one(runner: Runner, spec: RunSpec, runs_dir: Path, progress: bool) -> dict[str, Any]:
    """Trains one run (or loads it if finished) and returns its record."""
    run_dir = runs_dir / spec.run_id
    done = run_dir / RESULT_FILE
    saved = finished(spec, runs_dir)
    if saved is not None:
        return {**saved, "resumed": True}
    before = _interrupted_wall_s(spec, run_dir)
    if before is None and run_dir.exists():
        shutil.rmtree(run_dir)  # other settings, or from an older version: its partial curve would mislead
    run_dir.mkdir(parents=True, exist_ok=True)
    before = before or 0.0
    (run_dir / SPEC_FILE).write_text(json.dumps({**spec.to_dict(), "wall_s_before": before, "started": time.time()}))
    t0 = time.perf_counter()
    try:
        record = dict(runner(spec, run_dir, progress))
    except Exception as e:  # a crash of one run is a "failed to run" result of the study, not its end
        record = {"status": "error", "error": f"{type(e).__name__}: {e}", "curve": [], "val_curve": []}
    record = {**spec.to_dict(), **record, "wall_s": before + time.perf_counter() - t0}
    if record["status"] in ("ok", "diverged"):
        tmp = run_dir / (RESULT_FILE + ".tmp")
        tmp.write_text(json.dumps(json_safe(record)))
        tmp.replace(done)
    return record


def _interrupted_wall_s(spec: RunSpec, run_dir: Path) -> float | None:
    """The useful seconds an interrupted run of ``spec`` already spent (up to its newest checkpoint,
    0.0 without one), or None if ``run_dir`` holds no interrupted run of these settings."""
    from anydepth.train.checkpoint import list_checkpoints

    try:
        saved = json.loads((run_dir / SPEC_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not _same_settings(saved, spec):
        return None
    found = list_checkpoints(run_dir / "train" / "checkpoints")
    if not found:
        return 0.0
    written = (found[-1][1] / "manifest.json").stat().st_mtime
    return float(saved.get("wall_s_before", 0.0)) + max(0.0, written - float(saved.get("started", written)))


def _init_worker(parent: int) -> None:
    """A pool worker keeps freed memory like the parent, and ends when the parent is gone: a killed
    `anydepth study` must not leave its runs training on (spawned workers are not its process group's
    foreground children, so a kill of the parent alone does not reach them)."""
    import threading

    retain_freed_memory()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="anydepth-parent-watch").start()


def json_safe(obj: Any) -> Any:
    """JSON without NaN/Inf tokens (strict parsers reject them): non-finite floats become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def execute(
    specs: list[RunSpec],
    out: Path,
    runner: Runner,
    *,
    workers: int = 1,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Runs every spec (skipping finished ones) and returns their records in ``specs`` order.

    ``workers > 1`` trains independent runs in separate processes (each with its own torch threads);
    the per-run progress bar is shown only with one worker, where it does not interleave. ``log``, if
    given, gets one line per run trained (for a log file, where bars do not show).
    """
    from tqdm.auto import tqdm

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer (processes running at once), got {workers!r}")
    runs_dir = Path(out) / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=len(specs), desc="study runs", unit="run", disable=not progress)

    def done(spec: RunSpec, record: dict[str, Any]) -> None:
        records[spec.run_id] = record
        if log is not None and not record.get("resumed"):
            val = record.get("final_val_bpc")
            val = f", val bpc {val:.3f}" if isinstance(val, float) and math.isfinite(val) else ""
            log(f"[{len(records)}/{len(specs)}] {spec.run_id}: {record['status']}{val}, "
                f"{record.get('wall_s', 0.0):.0f} s")

    if workers == 1:
        for spec in specs:
            bar.set_postfix_str(spec.run_id)
            done(spec, run_one(runner, spec, runs_dir, progress))
            bar.update()
    else:
        import multiprocessing

        # spawn, not fork: a forked child of a process that already ran OpenMP-threaded torch ops can hang.
        ctx = multiprocessing.get_context("spawn")
        # the workers keep freed memory like the parent (`anydepth study` calls this at start-up)
        init = partial(_init_worker, os.getpid())
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=init) as pool:
            futures = {pool.submit(run_one, runner, spec, runs_dir, False): spec for spec in specs}
            for fut in as_completed(futures):
                spec = futures[fut]
                done(spec, fut.result())
                bar.set_postfix_str(spec.run_id)
                bar.update()
    bar.close()
    return [records[s.run_id] for s in specs]
