"""The training loop: ``run(RunConfig) -> summary``.

One update is: learning rate from the schedule, the batch of this step (a pure function of seed
and step), forward, next-token cross-entropy, backward (DDP averages gradients), a finiteness
check of the process-averaged loss, gradient clipping, ``AdamW.step``. Bits per byte (``bpb``) is
the loss in nats divided by ln 2, times tokens per byte of the scored text: the same unit for bytes
and for any tokenizer's ids; where the tokens are bytes it equals bits per character (``bpc``),
which is then logged too. Token ids without a tokenizer have no byte count: their loss alone is
logged (and plotted in bits per token).

Outputs under ``<out>/``: ``metrics.jsonl`` (one JSON object per line: train lines every
``log_every`` steps with the mean loss since the previous line; validation lines every
``eval_every`` steps and at the end), ``checkpoints/step_*/``, ``loss.png``, ``summary.json`` and
``run.json``. Only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anydepth.train import checkpoint as ckpt_io
from anydepth.train import distributed as D
from anydepth.train.config import RunConfig
from anydepth.train.data import eval_batch, load_corpus, sample_batch, unigram_entropy_bits
from anydepth.train.diagnostics import TrainingDiagnostics
from anydepth.train.optim import build_optimizer, convert_optimizer_state, lr_at, set_lr
from anydepth.train.tokenizer import Tokenizer, text_bytes
from anydepth.validate import check_output_dir

__all__ = ["run", "TrainingDiverged", "evaluate", "config_mismatch"]

LN2 = math.log(2.0)


class TrainingDiverged(RuntimeError):
    """A NaN or Inf loss with ``on_nan="stop"``; ``step`` is the update that produced it."""

    def __init__(self, step: int, last_checkpoint: str | None, loss: float = float("nan")):
        self.step = step
        self.last_checkpoint = last_checkpoint
        self.loss = loss
        where = (
            f"the last good checkpoint is {last_checkpoint}"
            if last_checkpoint
            else "no checkpoint was written"
        )
        super().__init__(
            f"training diverged at step {step} (loss {loss}); {where}. Lower --train.lr, add "
            "--train.warmup, or pass --train.on_nan=skip to skip such steps"
        )


def config_mismatch(saved: dict[str, Any], current: dict[str, Any], prefix: str = "model") -> list[str]:
    """``["model.depth: 12 != 24", ...]`` for every leaf where the two config dicts differ."""
    out: list[str] = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(config_mismatch(a, b, f"{prefix}.{key}"))
        elif a != b:
            out.append(f"{prefix}.{key}: checkpoint {a!r} != {b!r}")
    return out


def _reset_peak_rss() -> None:
    # Linux: writing 5 to clear_refs resets VmHWM, so a process running many runs (a sweep)
    # reports each run's own peak rather than the largest so far.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_mb() -> float:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB, macOS bytes


def _default_out() -> str:
    return str(Path("runs") / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S"))


def _autocast(device: torch.device, dtype: str):
    if dtype == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, dtype: str
) -> torch.Tensor:
    with _autocast(device, dtype):
        logits = model(x)
    # The softmax is taken in float32 even under bfloat16 autocast: bpc differences between
    # variants are a few hundredths, below bfloat16's resolution of the log-sum-exp.
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    val: np.ndarray,
    *,
    batches: int,
    batch_size: int,
    seq_len: int,
    device: torch.device,
    dtype: str = "float32",
    info: D.DistInfo | None = None,
) -> float:
    """Mean next-token cross-entropy (nats) over ``batches`` fixed validation batches.

    Under torchrun the batches are dealt round-robin to the processes and the sums reduced, so
    the figure is the same for any number of processes.
    """
    info = info or D.DistInfo(device=device)
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    rounds = -(-batches // info.world)
    for i in range(info.rank, rounds * info.world, info.world):
        # Every rank runs the same number of forwards (a sharded model gathers weights collectively);
        # a rank past the last batch scores batch 0 with weight 0.
        weight = 1.0 if i < batches else 0.0
        x, y = eval_batch(
            val,
            index=min(i, batches - 1) if weight else 0,
            n_batches=batches,
            batch_size=batch_size,
            seq_len=seq_len,
        )
        loss = _loss(model, x.to(device), y.to(device), device, dtype)
        n = float(y.numel()) * weight
        total += torch.stack([loss.double() * n, torch.tensor(n, dtype=torch.float64, device=device)])
    if info.enabled:
        torch.distributed.all_reduce(total)
    if D.is_sharded(model):
        # FSDP2 keeps the root's parameters gathered after a forward without backward; shard them
        # again so named_parameters() (optimizer state, checkpoints) sees the training parameters.
        model.reshard()
    model.train(was_training)
    return float(total[0] / total[1])


class _Trainer:
    def __init__(self, cfg: RunConfig, info: D.DistInfo):
        self.cfg, self.info = cfg, info
        tc, mc = cfg.train, cfg.model
        # Every check runs before anything is written, so bad input leaves no half-made run.
        if tc.seq_len > mc.max_seq_len:
            raise ValueError(
                f"train.seq_len={tc.seq_len} exceeds model.max_seq_len={mc.max_seq_len}; lower "
                f"--train.seq_len or raise --model.max_seq_len to at least {tc.seq_len}"
            )
        if tc.batch_size % info.world:
            raise ValueError(
                f"train.batch_size={tc.batch_size} does not divide over {info.world} processes; use a "
                f"multiple of {info.world}"
            )
        self.resume = None
        self.branch_of: Path | None = None  # the run this one branches off (resumed from an older step)
        if cfg.resume and ckpt_io.stopped_before_first_checkpoint(cfg.resume):
            # killed before its first checkpoint: nothing to resume, so the run starts again in place
            self._note(f"{cfg.resume} has no checkpoint yet (stopped before the first); starting it from step 0")
        elif cfg.resume:
            self.resume = ckpt_io.load_checkpoint(cfg.resume)
        if self.resume is not None:
            diff = config_mismatch(self.resume.model_config, mc.to_dict())
            if diff:
                raise ValueError(
                    f"resume checkpoint {self.resume.path} was trained with a different model "
                    f"({'; '.join(diff[:4])}); drop the model overrides or start a new run with another --out"
                )
        self.tokenizer = Tokenizer.from_file(cfg.data.tokenizer, "data.tokenizer") if cfg.data.tokenizer else None
        if self.tokenizer is not None:
            self.tokenizer.check_vocab(mc.vocab_size, "model")
        if self.resume is not None:
            saved = self.resume.path / "tokenizer.json"
            saved_sha = Tokenizer.from_file(saved).sha256 if saved.is_file() else None
            if saved_sha != (self.tokenizer.sha256 if self.tokenizer else None):
                used = f"tokenizer {saved}" if saved_sha else "bytes as tokens"
                fix = f"--tokenizer {saved}" if saved_sha else "no --tokenizer"
                raise ValueError(
                    f"resume checkpoint {self.resume.path} was trained with {used}, not with "
                    f"{'tokenizer ' + str(cfg.data.tokenizer) if self.tokenizer else 'bytes as tokens'}; "
                    f"resume with {fix}"
                )
        self.sample_ids = (
            self.tokenizer.encode(tc.sample_prompt, "train.sample_prompt")
            if self.tokenizer is not None and tc.sample_tokens
            else None
        )
        self.train_tokens, self.val_tokens = load_corpus(
            cfg.data, self.tokenizer, progress=tc.progress and info.is_main
        )
        # Bytes of text per token id: the tokenizer's, 1 for a byte corpus, unknown for bare ids.
        self.bytes_are_tokens = self.tokenizer is None and self.train_tokens.dtype == np.uint8
        if self.tokenizer is not None:
            self.byte_lengths = self.tokenizer.byte_lengths
        elif self.bytes_are_tokens:
            self.byte_lengths = np.ones(256, dtype=np.int64)
        else:
            self.byte_lengths = None
        top = int(self.train_tokens.max()) if self.train_tokens.dtype != np.uint8 else 255
        if top >= mc.vocab_size:
            raise ValueError(
                f"the corpus has token id {top} but model.vocab_size={mc.vocab_size}; set "
                f"--model.vocab_size={top + 1} or more"
            )
        for name, arr in (("training", self.train_tokens), ("validation", self.val_tokens)):
            if arr.size < tc.seq_len + 1:
                raise ValueError(
                    f"the {name} split has {arr.size} tokens, fewer than train.seq_len + 1 = {tc.seq_len + 1}; "
                    "lower --train.seq_len or use more data"
                )
        self.out = self._output_dir()
        check_output_dir(self.out)

        if tc.threads:
            torch.set_num_threads(tc.threads)
        from anydepth.model.build import build_model

        torch.manual_seed(tc.seed)
        self.model = build_model(mc).to(info.device)
        self.start = 0
        self.state: dict[str, Any] = {
            "tokens": 0,
            "train_time": 0.0,
            "skipped": 0,
            "pending_loss": 0.0,
            "pending_steps": 0,
            "pending_bytes": 0,
            "last_train_loss": None,
            "last_train_bpb": None,
            "last_val_loss": None,
        }
        if self.resume is not None:
            ckpt_io.load_weights(self.model, self.resume)
            self.model.to(info.device)
        # The optimizer is built after wrapping: FSDP2 replaces the parameters by sharded ones.
        self.ddp_model = D.wrap(self.model, info, tc.parallel)
        if tc.compile:
            # the training forward only: evaluation and sampling run the module as it is, and
            # checkpoints and the optimizer see its own parameter names
            self.ddp_model = torch.compile(self.ddp_model)
        self.sharded = D.is_sharded(self.model)
        self.optimizer = build_optimizer(self.model, tc)
        if self.resume is not None:
            self._restore(self.resume)
        self.last_ckpt: str | None = str(self.resume.path) if self.resume is not None else None
        if self.resume is not None:
            data = cfg.data.path or "the Python stdlib"
            cache = cfg.data.cache_dir or os.environ.get("ANYDEPTH_CACHE") or "~/.cache/anydepth"
            self._note(f"resuming {self.resume.path} (step {self.start}) with data from {data}, token cache {cache}")
        self.diverged_step: int | None = None
        self.diagnostics = TrainingDiagnostics.for_run(
            self.model, tc.diagnostics_every, self.out, start=self.start, main=info.is_main, sharded=self.sharded
        )

    def _note(self, text: str) -> None:
        if self.info.is_main:
            print(f"note: {text}", file=sys.stderr)

    def _output_dir(self) -> Path:
        """Where this run writes: ``--out``; on resume the run resumed; a new directory when the
        resumed checkpoint is not that run's newest, so the run it branches off is never pruned
        or mixed into; a fresh ``runs/<time>`` otherwise."""
        cfg = self.cfg
        if self.resume is None:
            out = Path(cfg.out or cfg.resume or _default_out())
            if (out / "metrics.jsonl").exists():
                if ckpt_io.list_checkpoints(out / "checkpoints"):
                    raise ValueError(
                        f"--out {out} already holds a run (metrics.jsonl); pass --resume {out} to "
                        "continue it or choose another --out"
                    )
                self._note(f"{out} holds a run stopped before its first checkpoint; starting it again from step 0")
            return out
        ck = self.resume.path
        run = ckpt_io.run_dir_of(ck)
        found = ckpt_io.list_checkpoints(run / "checkpoints")
        newest = found[-1][1] if found else ck
        if newest.resolve() == ck.resolve():
            return Path(cfg.out) if cfg.out else run
        if cfg.out is not None and Path(cfg.out).resolve() == run.resolve():
            raise ValueError(
                f"--resume {ck} is not the newest checkpoint of {run} ({newest.name} is); continuing it in "
                f"{run} would mix two branches and prune the newer one. Leave --out unset (a new run "
                "directory is made) or choose another --out"
            )
        self.branch_of = run
        if cfg.out is not None:
            return Path(cfg.out)
        out, i = run.with_name(f"{run.name}-from-{ck.name}"), 2
        while out.exists():
            out, i = run.with_name(f"{run.name}-from-{ck.name}-{i}"), i + 1
        self._note(f"{ck.name} is not the newest checkpoint of {run}; this run continues it in {out}")
        return out

    def _restore(self, ck: ckpt_io.Checkpoint) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        opt_state = convert_optimizer_state(
            ckpt_io.optimizer_from_flat(ck.state, ck.trainer["optimizer"]), self.optimizer
        )
        try:
            set_optimizer_state_dict(
                self.model, self.optimizer, opt_state, options=StateDictOptions(full_state_dict=True)
            )
        except (ValueError, KeyError, RuntimeError) as e:
            raise ckpt_io.CheckpointError(
                f"checkpoint file {ck.path / 'state.safetensors'} does not match this optimizer ({e})"
            ) from None
        rngs = ckpt_io.rng_states(ck)
        if len(rngs) == self.info.world:
            ckpt_io.restore_rng(rngs[self.info.rank])
        elif self.info.is_main:
            print(
                f"note: {ck.path} was written by {len(rngs)} process(es), this run has {self.info.world}; "
                "dropout/LSH randomness will not continue the original sequence"
            )
        self.start = ck.step
        self.state.update(ck.trainer.get("metrics", {}))

    # -- outputs (rank 0) --------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        if self.info.is_main:
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()

    def _open_outputs(self) -> None:
        if not self.info.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        for line in ckpt_io.clean_leftovers(self.out / "checkpoints"):
            self._note(line)
        metrics = self.out / "metrics.jsonl"
        source = self.branch_of / "metrics.jsonl" if self.branch_of is not None else metrics
        if self.resume is not None and source.exists():
            # A killed run may have logged steps after its last checkpoint; they are redone now.
            kept = [line for line in self._read_log(source) if json.loads(line).get("step", 0) <= self.start]
            metrics.write_text("".join(line + "\n" for line in kept))
        elif self.resume is None and metrics.exists():
            metrics.unlink()  # a run stopped before its first checkpoint starts again
        self.metrics_file = open(metrics, "a")  # noqa: SIM115 - closed in fit()
        (self.out / "run.json").write_text(json.dumps(self.cfg.to_dict(), indent=2, sort_keys=True))

    def _read_log(self, path: Path) -> list[str]:
        """The lines of ``metrics.jsonl``; a torn last line (a kill mid-write) is dropped with a warning."""
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        good = []
        for i, line in enumerate(lines):
            try:
                if not isinstance(json.loads(line), dict):
                    raise ValueError("not an object")
            except ValueError as e:
                if i == len(lines) - 1:
                    self._note(f"dropped the torn last line of {path} (an interrupted write): {line[:60]!r}")
                    break
                raise ckpt_io.CheckpointError(
                    f"{path} line {i + 1} is not a JSON object ({e}); repair or delete that line to resume"
                ) from None
            good.append(line)
        return good

    def _checkpoint(self, step: int) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        # Collective under FSDP2: every rank takes part in gathering the full tensors to rank 0.
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        opt_state = get_optimizer_state_dict(self.model, self.optimizer, options=full)
        model_state = get_model_state_dict(self.model, options=full) if self.sharded else None
        rng = D.gather_objects(ckpt_io.capture_rng(), self.info)
        if self.info.is_main:
            root = self.out / "checkpoints"
            path = ckpt_io.save_checkpoint(
                root,
                step,
                model=self.model,
                optimizer_state=opt_state,
                model_state=model_state,
                run=self.cfg.to_dict(),
                extra_files={"tokenizer.json": self.tokenizer.json} if self.tokenizer is not None else None,
                trainer={
                    "scheduler": {"kind": self.cfg.train.schedule, "step": step},
                    "data": {"sampler": "uniform-random-windows", "seed": self.cfg.train.seed, "step": step},
                    "world": self.info.world,
                    "metrics": self.state,
                },
                rng=rng,
            )
            ckpt_io.prune_checkpoints(root, self.cfg.train.keep_last)
            self.last_ckpt = str(path)

    def _evaluate(self) -> float:
        tc = self.cfg.train
        return evaluate(
            self.model,
            self.val_tokens,
            batches=tc.eval_batches,
            batch_size=tc.batch_size,
            seq_len=tc.seq_len,
            device=self.info.device,
            dtype=tc.dtype,
            info=self.info,
        )

    def _val_bytes_per_token(self) -> float | None:
        """Bytes per token of the validation windows :func:`evaluate` scores (their target tokens)."""
        if self.byte_lengths is None:
            return None
        if not hasattr(self, "_val_ratio"):
            tc = self.cfg.train
            n_bytes = n_tokens = 0
            for i in range(tc.eval_batches):
                _, y = eval_batch(
                    self.val_tokens, index=i, n_batches=tc.eval_batches, batch_size=tc.batch_size, seq_len=tc.seq_len
                )
                n_bytes += text_bytes(y, self.byte_lengths)
                n_tokens += y.numel()
            self._val_ratio = n_bytes / n_tokens
        return self._val_ratio

    def _bpb(self, loss: float | None, bytes_per_token: float | None) -> float | None:
        """Bits per byte: ``loss / ln 2 / bytes_per_token``."""
        if loss is None or bytes_per_token is None:
            return None
        return loss / LN2 / bytes_per_token

    def _bits_record(self, prefix: str, loss: float, bpb: float | None) -> dict[str, Any]:
        rec: dict[str, Any] = {f"{prefix}_loss": loss}
        if self.bytes_are_tokens:
            rec[f"{prefix}_bpc"] = loss / LN2
        if bpb is not None:
            rec[f"{prefix}_bpb"] = bpb
        return rec

    def _summary(self, steps_done: int, diverged: bool) -> dict[str, Any]:
        s = self.state
        val = s["last_val_loss"]
        byte = self.bytes_are_tokens
        if self.info.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.info.device) / 2**20
        else:
            peak = _peak_rss_mb()
        n_params = sum(p.numel() for p in self.model.parameters())
        return {
            "out": str(self.out),
            "steps": steps_done,
            "final_train_loss": s["last_train_loss"],
            "final_train_bpc": None if s["last_train_loss"] is None or not byte else s["last_train_loss"] / LN2,
            "final_train_bpb": s.get("last_train_bpb"),
            "final_val_loss": val,
            "final_val_bpc": None if val is None or not byte else val / LN2,
            "final_val_bpb": self._bpb(val, self._val_bytes_per_token()),
            "tokens_per_s": s["tokens"] / s["train_time"] if s["train_time"] > 0 else 0.0,
            "train_time_s": s["train_time"],
            "peak_mem_mb": peak,
            "params": n_params,
            "diverged": diverged,
            "diverged_step": self.diverged_step,
            "skipped_steps": s["skipped"],
            "unigram_bits": self.unigram,
            "unigram_bpb": self.unigram_bpb,
            "val_bytes_per_token": self._val_bytes_per_token(),
            "tokenizer": self.cfg.data.tokenizer,
            "checkpoint": self.last_ckpt,
            "plot": str(self.out / "loss.png"),
            "world": self.info.world,
            "sample": "",
        }

    def _finish(self, summary: dict[str, Any]) -> None:
        if not self.info.is_main:
            return
        self.metrics_file.close()
        plot_metrics(
            self.out / "metrics.jsonl",
            self.out / "loss.png",
            unigram_bits=self.unigram if self.unigram_bpb is None else self.unigram_bpb,
        )
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))

    def _sample(self) -> str:
        tc, mc = self.cfg.train, self.cfg.model
        if self.sample_ids is not None:
            prompt_ids = self.sample_ids
        else:
            prompt_ids = list(tc.sample_prompt.encode("utf-8")) if mc.vocab_size >= 256 else [0]
        n_new = min(tc.sample_tokens, mc.max_seq_len - len(prompt_ids))
        if n_new <= 0 or not hasattr(self.model, "generate"):
            return ""
        model = self.model
        if self.sharded:
            # A sharded model can only run on all ranks together; sample from the saved full weights.
            from anydepth.model.pretrained import from_pretrained

            model = from_pretrained(self.last_ckpt, device=self.info.device)
        prompt = torch.tensor([prompt_ids], dtype=torch.long, device=self.info.device)
        was_training = model.training
        model.eval()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(tc.seed)
            processor = self.tokenizer.utf8_processor(mc.vocab_size) if self.tokenizer is not None else None
            out = model.generate(prompt, n_new, temperature=0.8, top_k=40, logits_processor=processor)
        model.train(was_training)
        ids = out[0].tolist()
        if self.tokenizer is not None:
            return self.tokenizer.complete_text(ids)
        if mc.vocab_size == 256:
            return bytes(ids).decode("utf-8", errors="replace")
        return " ".join(map(str, ids))

    def _batch_bytes(self, step: int, y: torch.Tensor) -> int:
        """Bytes of text the targets of the global batch of ``step`` stand for."""
        if self.bytes_are_tokens:
            return y.numel() * self.info.world
        if self.info.world > 1:
            tc = self.cfg.train
            _, y = sample_batch(
                self.train_tokens, step=step, seed=tc.seed, batch_size=tc.batch_size, seq_len=tc.seq_len
            )
        return text_bytes(y, self.byte_lengths)

    def _pending_bpb(self, per_step_tokens: int) -> float | None:
        s = self.state
        if self.byte_lengths is None or not s.get("pending_bytes"):
            return None
        n = s["pending_steps"]
        return self._bpb(s["pending_loss"] / n, s["pending_bytes"] / (per_step_tokens * n))

    # -- the loop ---------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        tc, info, dev = self.cfg.train, self.info, self.info.device
        head = self.train_tokens[: 1 << 24]
        self.unigram = unigram_entropy_bits(head)
        # The unigram reference in bits per byte: its bits per token over the bytes those tokens stand for.
        self.unigram_bpb = None
        if self.byte_lengths is not None:
            self.unigram_bpb = self._bpb(self.unigram * LN2, text_bytes(head, self.byte_lengths) / head.size)
        _reset_peak_rss()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        self._open_outputs()
        model = self.ddp_model
        model.train()
        per_step_tokens = tc.batch_size * tc.seq_len
        bar = tqdm(
            total=tc.steps,
            initial=self.start,
            disable=not (tc.progress and info.is_main),
            unit="step",
            dynamic_ncols=True,
        )
        interval_tokens, interval_time = 0, 0.0
        step = self.start
        s = self.state
        try:
            while step < tc.steps:
                t0 = time.perf_counter()
                set_lr(self.optimizer, lr := lr_at(step, tc))
                x, y = sample_batch(
                    self.train_tokens,
                    step=step,
                    seed=tc.seed,
                    batch_size=tc.batch_size,
                    seq_len=tc.seq_len,
                    rank=info.rank,
                    world=info.world,
                )
                loss = _loss(model, x.to(dev, non_blocking=True), y.to(dev, non_blocking=True), dev, tc.dtype)
                loss.backward()
                if self.sharded:
                    D.sync_replicated_grads(self.model, info)
                loss_value = float(D.mean_over_ranks(loss.detach(), info))
                step += 1
                grad_norm = None
                if not math.isfinite(loss_value):
                    self.optimizer.zero_grad(set_to_none=True)
                    if tc.on_nan == "stop":
                        # null, not NaN: strict JSON readers reject NaN tokens.
                        rec = {"step": step, "train_loss": None, "train_bpb": None, "nonfinite": True, "lr": lr}
                        if self.bytes_are_tokens:
                            rec["train_bpc"] = None
                        self._log(rec)
                        self.diverged_step = step
                        self._finish(self._summary(step - 1, diverged=True))
                        raise TrainingDiverged(step, self.last_ckpt, loss_value)
                    s["skipped"] += 1
                    self._log({"step": step, "skipped": True, "lr": lr})
                else:
                    if tc.clip > 0:
                        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.clip, foreach=True)
                        # a sharded model's norm is a DTensor
                        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
                        grad_norm = float(norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    s["pending_loss"] += loss_value
                    s["pending_steps"] += 1
                    if self.byte_lengths is not None:
                        s["pending_bytes"] = s.get("pending_bytes", 0) + self._batch_bytes(step - 1, y)
                    if self.diagnostics is not None:
                        self.diagnostics.after_step(step, x, y)
                dt = time.perf_counter() - t0
                s["train_time"] += dt
                s["tokens"] += per_step_tokens
                interval_time += dt
                interval_tokens += per_step_tokens
                bar.update(1)

                if step % tc.log_every == 0 and s["pending_steps"]:
                    mean = s["pending_loss"] / s["pending_steps"]
                    bpb = self._pending_bpb(per_step_tokens)
                    s["last_train_loss"], s["last_train_bpb"] = mean, bpb
                    tps = interval_tokens / interval_time if interval_time > 0 else 0.0
                    rec = {"step": step, **self._bits_record("train", mean, bpb), "lr": lr, "tokens_per_s": tps}
                    if grad_norm is not None:
                        rec["grad_norm"] = grad_norm
                    self._log(rec)
                    bits = {"bpb": bpb} if bpb is not None else {"bits_per_token": mean / LN2}
                    bar.set_postfix({k: f"{v:.3f}" for k, v in bits.items()} | {"tok_s": f"{tps:.0f}"}, refresh=False)
                    s["pending_loss"], s["pending_steps"], s["pending_bytes"] = 0.0, 0, 0
                    interval_tokens, interval_time = 0, 0.0
                if (tc.eval_every and step % tc.eval_every == 0) or step == tc.steps:
                    val = self._evaluate()
                    s["last_val_loss"] = val
                    bpb = self._bpb(val, self._val_bytes_per_token())
                    self._log({"step": step, **self._bits_record("val", val, bpb)})
                if (tc.checkpoint_every and step % tc.checkpoint_every == 0) or step == tc.steps:
                    self._checkpoint(step)
        finally:
            bar.close()
        if s["pending_steps"]:
            s["last_train_loss"] = s["pending_loss"] / s["pending_steps"]
            s["last_train_bpb"] = self._pending_bpb(tc.batch_size * tc.seq_len)
        if s["last_val_loss"] is None:
            s["last_val_loss"] = self._evaluate()
        summary = self._summary(step, diverged=False)
        if info.is_main and tc.sample_tokens:
            summary["sample"] = self._sample()
        if self.diagnostics is not None:
            summary["diagnostics"] = self.diagnostics.finish()
        self._finish(summary)
        return summary


def plot_metrics(
    metrics: str | os.PathLike, png: str | os.PathLike, *, unigram_bits: float | None = None
) -> None:
    """Train and validation bits per byte against step from ``metrics.jsonl``, saved as a PNG.

    Runs on bare token ids (no byte count) are plotted in bits per token; ``unigram_bits`` is the
    unigram reference in the plotted unit.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    # Logs of earlier versions have bpc (bytes as tokens) but no bpb: the same numbers.
    key = "bpb" if any("train_bpb" in r or "val_bpb" in r for r in rows) else "bpc"
    if not any(f"train_{key}" in r or f"val_{key}" in r for r in rows):
        key = None
    curves: dict[str, list[tuple[int, float]]] = {"train": [], "val": []}
    for r in rows:
        for split in curves:
            v = r.get(f"{split}_{key}") if key else r.get(f"{split}_loss")
            if v is not None:
                curves[split].append((r["step"], v if key else v / LN2))
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if curves["train"]:
        ax.plot(*zip(*curves["train"]), label="train", lw=1.2)
    if curves["val"]:
        ax.plot(*zip(*curves["val"]), "o-", label="validation", lw=1.2, ms=3)
    if unigram_bits is not None:
        ax.axhline(unigram_bits, color="gray", ls="--", lw=0.8, label=f"unigram entropy {unigram_bits:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel({"bpb": "bits per byte", "bpc": "bits per character (byte)", None: "bits per token"}[key])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def run(cfg: RunConfig) -> dict[str, Any]:
    """Trains ``cfg`` (resuming from ``cfg.resume`` if set) and returns the summary dict.

    Keys include ``out``, ``steps``, ``final_train_loss``, ``final_val_bpb``, ``final_val_bpc`` (where
    tokens are bytes), ``unigram_bits`` (per token), ``unigram_bpb``, ``tokens_per_s``,
    ``peak_mem_mb``, ``diverged``, ``diverged_step`` and ``sample``. Raises ``ValueError`` for bad
    configuration (before writing anything), :class:`~anydepth.train.checkpoint.CheckpointError`
    for a damaged resume point, and :class:`TrainingDiverged` for a non-finite loss with
    ``on_nan="stop"``.
    """
    if not isinstance(cfg, RunConfig):
        raise TypeError(f"run() expects a RunConfig, got {type(cfg).__name__}")
    info = D.setup(cfg.train.device, timeout=cfg.train.timeout)
    completed = False
    try:
        summary = _Trainer(cfg, info).fit()
        completed = True
        return summary
    except RuntimeError as e:
        failure = D.collective_failure(e, info, cfg.train.timeout)
        if failure is None:
            raise
        raise failure from e
    finally:
        D.teardown(info, completed=completed)
