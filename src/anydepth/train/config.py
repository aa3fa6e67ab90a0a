"""Run configuration: what to train (``ModelConfig``), how (``TrainConfig``) and on what (``DataConfig``).

All three are plain dataclasses, so a run is fully described by ``RunConfig.to_dict()`` (written to
``<out>/run.json`` and into every checkpoint) and the command line is generated from the fields
(``--train.steps=200 --data.path=file.txt --model.depth=24``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from anydepth.model.config import ModelConfig

__all__ = ["TrainConfig", "DataConfig", "RunConfig", "default_model"]



def check_every(every: Any, steps: int) -> None:
    """``ValueError`` naming ``--train.diagnostics_every`` unless ``0 <= every <= steps``."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ValueError(
            f"train.diagnostics_every must be an integer >= 0 (0: off), got {every!r}; "
            "e.g. --train.diagnostics_every=100"
        )
    if every > steps:
        raise ValueError(
            f"train.diagnostics_every={every} exceeds train.steps={steps}, so nothing would be logged; "
            f"use --train.diagnostics_every between 1 and {steps}, or 0 for off"
        )


@dataclass(kw_only=True)
class TrainConfig:
    """Optimisation, schedule, logging and checkpoint settings of one run.

    The learning rate at step ``t`` (0-based, ``T = steps``, ``W = warmup``) is
    ``lr * (t + 1) / W`` for ``t < W``, then ``lr`` ("constant"), or for "cosine"
    ``lr * (r + (1 - r) * (1 + cos(pi * p)) / 2)`` with ``p = (t - W) / max(1, T - W)`` and
    ``r = min_lr_ratio`` (Loshchilov & Hutter, SGDR, 2017; warmup as in Goyal et al., 2017).
    """

    steps: int = 800  # optimizer updates; the default run (1.6M tokens) takes about 4.5 minutes on 2 idle CPU cores
    batch_size: int = 16  # global batch in sequences, split evenly over the processes under torchrun
    seq_len: int = 128  # tokens per training sequence; must not exceed model.max_seq_len
    lr: float = 2e-3  # peak AdamW learning rate (small models tolerate a large one)
    warmup: int = 20  # linear warmup steps (pre-LN is stable without many); 0 starts at the peak
    schedule: Literal["cosine", "constant"] = "cosine"  # decay after warmup
    min_lr_ratio: float = 0.1  # cosine ends at lr * min_lr_ratio instead of 0 (the last steps still learn)
    weight_decay: float = 0.1  # decoupled decay, applied only to matrices (never norms, biases, gates)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW moments; 0.95 reacts faster to loss spikes than 0.999
    eps: float = 1e-8  # AdamW denominator epsilon
    clip: float = 1.0  # max global gradient norm; 0 disables clipping
    seed: int = 0  # seeds init, batch sampling and dropout, so a run is reproducible
    dtype: Literal["float32", "bfloat16"] = "float32"  # bfloat16 runs forward/backward under autocast
    device: str = "auto"  # "cpu", "cuda", "cuda:1", or "auto" (cuda if available)
    parallel: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: replicate (DDP) or shard (FSDP2) the model
    threads: int | None = None  # torch intra-op threads; None keeps torch's default (all cores)
    timeout: float = 300.0  # seconds a collective waits for the other processes (torchrun) before failing
    compile: bool = False  # torch.compile the training forward: slower start, inductor's fusion for the CPU kernels'
    eval_every: int = 100  # steps between validation passes; 0 validates only at the end
    eval_batches: int = 8  # validation batches per pass, at fixed evenly spaced positions
    log_every: int = 10  # steps between train lines in metrics.jsonl and progress-bar updates
    checkpoint_every: int = 100  # steps between checkpoints; 0 writes only the final one
    keep_last: int = 3  # checkpoints kept on disk; older ones are deleted after each save
    on_nan: Literal["stop", "skip"] = "stop"  # on a NaN/Inf loss: stop with an error, or skip that update
    progress: bool = True  # tqdm progress bar on stderr (rank 0 only)
    sample_tokens: int = 200  # length of the generated sample in the summary; 0 skips it
    sample_prompt: str = "def "  # prompt of that sample (bytes of this string for byte-level models)
    diagnostics_every: int = 0  # steps between per-layer depth diagnostics in diagnostics.jsonl; 0: off

    def __post_init__(self) -> None:
        from anydepth.validate import check_config

        self.betas = tuple(self.betas) if isinstance(self.betas, (list, tuple)) else self.betas
        check_config(self, "train")  # types first: progress='no' or steps=2.5 name the field
        for name in ("steps", "batch_size", "seq_len", "eval_batches", "log_every", "keep_last"):
            _positive_int(self, name)
        for name in ("warmup", "eval_every", "checkpoint_every", "sample_tokens"):
            _non_negative_int(self, name)
        if self.threads is not None:
            _positive_int(self, "threads")
        for name in ("compile", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"train.{name} must be true or false, got {getattr(self, name)!r}; e.g. --train.{name}")
        for name in ("lr", "eps"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(
                    f"train.{name} must be a positive number, got {v!r}; e.g. --train.{name}=1e-3"
                )
        if isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float)) or not (
            math.isfinite(self.timeout) and 0 < self.timeout <= 86400
        ):
            raise ValueError(
                f"train.timeout must be a number of seconds in (0, 86400], got {self.timeout!r}; "
                "e.g. --train.timeout=300"
            )
        for name in ("weight_decay", "clip"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"train.{name} must be >= 0, got {v!r} (0 disables it)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"train.betas must be two numbers in [0, 1), got {self.betas!r}; e.g. 0.9 0.95")
        check_every(self.diagnostics_every, self.steps)
        _choice(self, "schedule", ("cosine", "constant"))
        _choice(self, "dtype", ("float32", "bfloat16"))
        _choice(self, "on_nan", ("stop", "skip"))
        _choice(self, "parallel", ("ddp", "fsdp"))
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")
        ):
            raise ValueError(f"train.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")


@dataclass(kw_only=True)
class DataConfig:
    """Where the corpus comes from, how it is split, and how it is tokenized.

    ``path=None`` is the default corpus: the ``.py`` files of the Python standard library on this
    machine (no download); see :func:`anydepth.train.data.load_corpus`. Without a tokenizer the
    tokens are the text's bytes.
    """

    path: str | None = None  # text file, directory, .jsonl, .parquet, enwik8(.zip) or .npy tokens; None: the stdlib
    tokenizer: str | None = None  # tokenizer.json (byte-level BPE, `anydepth tokenize`); None: bytes are the tokens
    text_field: str = "text"  # the field (.jsonl) or column (.parquet) that holds each document's text
    val_fraction: float = 0.05  # contiguous tail held out for validation (enwik8 uses its 90M/5M/5M split)
    max_bytes: int | None = None  # use only the first max_bytes bytes of the text (tokens of a .npy); None: all
    cache_dir: str | None = None  # token cache; None: $ANYDEPTH_CACHE or ~/.cache/anydepth

    def __post_init__(self) -> None:
        from anydepth.validate import check_config

        check_config(self, "data")
        if self.path is not None and (not isinstance(self.path, str) or not self.path.strip()):
            raise ValueError(
                f"data.path must be a non-empty path or None (the stdlib corpus), got {self.path!r}"
            )
        if not isinstance(self.val_fraction, (int, float)) or not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction!r}; e.g. 0.05")
        if self.max_bytes is not None:
            _positive_int(self, "max_bytes", prefix="data")
        if self.tokenizer is not None and (not isinstance(self.tokenizer, str) or not self.tokenizer.strip()):
            raise ValueError(f"data.tokenizer must be a path to tokenizer.json or None, got {self.tokenizer!r}")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise ValueError(f"data.text_field must be a non-empty field name, got {self.text_field!r}")


def default_model() -> ModelConfig:
    """The model ``anydepth train`` trains with no arguments: a 12-layer, 128-wide pre-LN decoder.

    Pre-LN (``x + F(LN(x))`` with a final LN; Xiong et al., 2020) is the scheme that learnt fastest
    in short CPU budgets: at 150 steps of 16 x 64 bytes, a 12-layer 64-wide pre-LN model reached
    4.44 validation bpc where ReZero was still at 5.48 (its gates start at 0 and open slowly at this
    learning rate). Twelve narrow layers keep the default "deep" while about 1M tokens fit in 5
    minutes on 2 CPU cores. ``--preset rezero`` and the other presets swap the scheme at this size.
    """
    from anydepth.model import presets

    return presets.prenorm(vocab_size=256, dim=128, depth=12, heads=4, max_seq_len=256)


@dataclass(kw_only=True)
class RunConfig:
    """One training run: model, optimisation, data, output directory and an optional resume point.

    With ``data.tokenizer`` the model's vocabulary comes from the tokenizer: a model left at the
    byte vocabulary (256) takes the tokenizer's size; any other ``vocab_size`` must equal it.
    """

    model: ModelConfig = field(default_factory=default_model)  # the network (a preset plus overrides)
    train: TrainConfig = field(default_factory=TrainConfig)  # optimisation, logging, checkpoints
    data: DataConfig = field(default_factory=DataConfig)  # corpus and split
    out: str | None = None  # run directory; None: runs/<UTC timestamp>
    resume: str | None = None  # run directory or checkpoint directory to continue from

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelConfig.from_dict(self.model)
        if isinstance(self.train, dict):
            self.train = TrainConfig(**_known(self.train, TrainConfig, "train"))
        if isinstance(self.data, dict):
            self.data = DataConfig(**_known(self.data, DataConfig, "data"))
        for name, cls in (("model", ModelConfig), ("train", TrainConfig), ("data", DataConfig)):
            if not isinstance(getattr(self, name), cls):
                raise TypeError(
                    f"RunConfig.{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}"
                )
        if self.data.tokenizer is not None:
            from anydepth.train.tokenizer import Tokenizer

            n = Tokenizer.from_file(self.data.tokenizer, "data.tokenizer").vocab_size
            if self.model.vocab_size == 256 and n != 256:
                self.model = self.model.replace(vocab_size=n)
            elif self.model.vocab_size != n:
                raise ValueError(
                    f"model.vocab_size={self.model.vocab_size} does not match the {n} tokens of data.tokenizer "
                    f"{self.data.tokenizer!r}; leave --model.vocab_size out (the tokenizer sets it) or set it to {n}"
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict(),
            "train": _plain(dataclasses.asdict(self.train)),
            "data": dataclasses.asdict(self.data),
            "out": self.out,
            "resume": self.resume,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        if not isinstance(d, dict):
            raise TypeError(f"RunConfig.from_dict expects a dict, got {type(d).__name__}")
        return cls(**_known(d, cls, "run"))


def _known(d: dict[str, Any], cls: type, where: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(
            f"unknown {where} key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(names))}"
        )
    return dict(d)


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _positive_int(obj: Any, name: str, prefix: str = "train") -> None:
    v = getattr(obj, name)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{prefix}.{name} must be a positive integer, got {v!r}")


def _non_negative_int(obj: Any, name: str, prefix: str = "train") -> None:
    v = getattr(obj, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{prefix}.{name} must be an integer >= 0, got {v!r}")


def _choice(obj: Any, name: str, choices: tuple[str, ...], prefix: str = "train") -> None:
    v = getattr(obj, name)
    if v not in choices:
        raise ValueError(f"{prefix}.{name} must be one of {', '.join(choices)}; got {v!r}")
