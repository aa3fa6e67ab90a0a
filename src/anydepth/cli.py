"""The ``anydepth`` command: ``train``, ``generate``, ``tokenize`` and ``study``.

``anydepth train`` builds a :class:`~anydepth.train.config.RunConfig` from, in order: the default
run (or ``--config FILE.json``, or ``--preset NAME``, or the run being resumed with ``--resume
DIR``), then dotted overrides (``--model.depth=64 --train.steps=500 --data.path=corpus.txt``).
Overrides are type-checked against the dataclass fields (parsed by tyro); an unknown key or a bad
value is a one-line error with exit code 2 and nothing is written.

``python -m anydepth`` is the same program. Under ``torchrun`` every process runs it.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import os
import re
import sys
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from anydepth.cliparse import CliError, _check_keys, _option_names, _tyro_cli

__all__ = ["main", "entry", "CliError", "parse_train_args", "GenerateArgs", "TokenizeArgs"]

USAGE = """usage: anydepth {train,diagnose,generate,tokenize,study,demo} [options]

  train     train a model (no options: a 12-layer pre-LN LM on the Python stdlib, ~5 min on 2 cores)
  diagnose  per-layer signals of a model at one forward and backward, with named findings
  generate  sample a continuation from a checkpoint
  tokenize  train a byte-level BPE tokenizer on local text and encode the corpus once
  study     the depth study (see `anydepth study --help`)
  demo      the recommended scheme and post-LN at 48 layers, side by side (what `make demo` runs)

`anydepth <command> --help` lists each command's options."""

# Presets are applied at the default run's size so that `--preset X` compares schemes at equal cost.
PRESET_SIZE = {"vocab_size": 256, "dim": 128, "depth": 12, "heads": 4, "max_seq_len": 256}
_COMPONENTS = ("residual", "norm", "attention", "ff", "stack", "position")


def _field_comments(cls: type) -> dict[str, str]:
    """Trailing ``# comments`` of a dataclass's fields: the CLI help of a generated mirror class."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", src, flags=re.M))


def _model_args_class(base_model) -> type:
    """A CLI mirror of ``ModelConfig``: component fields become kind names (``--model.residual=admin``)."""
    from anydepth.model.config import COMPONENTS, ModelConfig

    hints = typing.get_type_hints(ModelConfig)
    helps = _field_comments(ModelConfig)
    fields = []
    for f in dataclasses.fields(ModelConfig):
        value = getattr(base_model, f.name)
        if f.name in COMPONENTS:
            kinds = tuple(COMPONENTS[f.name].kinds()) or (value.kind,)
            tp: Any = Literal[kinds]  # type: ignore[valid-type]
            default = value.kind
            text = f"{helps.get(f.name, f.name)} (kind name; component options via --config)"
        else:
            tp, default, text = hints[f.name], value, helps.get(f.name, f.name)
        fields.append((f.name, Annotated[tp, _arg(text)], dataclasses.field(default=default)))
    return dataclasses.make_dataclass("ModelArgs", fields, kw_only=True)


def _arg(help_text: str):
    import tyro

    return tyro.conf.arg(help=help_text)


def _train_command_class(model_args: type) -> type:
    from anydepth.train.config import DataConfig, TrainConfig

    return dataclasses.make_dataclass(
        "TrainCommand",
        [
            ("model", Annotated[model_args, _arg("the network")], dataclasses.field(default=None)),
            ("train", Annotated[TrainConfig, _arg("optimisation")], dataclasses.field(default=None)),
            ("data", Annotated[DataConfig, _arg("corpus")], dataclasses.field(default=None)),
            ("preset", Annotated[str | None, _arg(_preset_help())], dataclasses.field(default=None)),
            ("config", Annotated[str | None, _arg("JSON file: a RunConfig or a ModelConfig")], None),
            ("out", Annotated[str | None, _arg("run directory (default runs/<UTC time>)")], None),
            ("resume", Annotated[str | None, _arg("run or checkpoint directory to continue")], None),
        ],
        kw_only=True,
    )


def _preset_help() -> str:
    from anydepth.model.presets import PRESETS

    return f"model preset at the default size ({', '.join(sorted(PRESETS))})"


def _scan(argv: list[str], name: str) -> str | None:
    """Value of ``--name V`` / ``--name=V`` (last one wins), read before the defaults are built."""
    value = None
    for i, tok in enumerate(argv):
        if tok == f"--{name}":
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise CliError(f"--{name} needs a value, e.g. --{name}=...")
            value = argv[i + 1]
        elif tok.startswith(f"--{name}="):
            value = tok.split("=", 1)[1]
    return value


def _base_run(argv: list[str]):
    from anydepth.model import presets
    from anydepth.model.config import ModelConfig
    from anydepth.train.config import RunConfig

    preset, config, resume = _scan(argv, "preset"), _scan(argv, "config"), _scan(argv, "resume")
    if preset and config:
        raise CliError(
            "--preset and --config both set the model; use one (put the preset's fields in the JSON)"
        )
    if config:
        path = Path(config)
        if not path.is_file():
            raise CliError(f"--config {config!r} is not a file; pass a JSON file written by `anydepth train`")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CliError(f"--config {config!r} is not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise CliError(f"--config {config!r} must hold a JSON object, got {type(d).__name__}")
        run_keys = {f.name for f in dataclasses.fields(RunConfig)}
        try:
            if set(d) <= run_keys:
                return RunConfig.from_dict(d)
            return RunConfig(model=ModelConfig.from_dict(d))
        except (ValueError, TypeError) as e:
            raise CliError(f"--config {config!r}: {str(e).splitlines()[0]}") from None
    if preset:
        if preset not in presets.PRESETS:
            raise CliError(f"unknown --preset {preset!r}; presets: {', '.join(sorted(presets.PRESETS))}")
        return RunConfig(model=presets.get(preset, **PRESET_SIZE))
    if resume:
        return _resume_base(resume, argv)
    return RunConfig()


def _resume_base(resume: str, argv: list[str]):
    """The run being resumed, from its checkpoint's ``run.json`` (or the run directory's, for a run
    stopped before its first checkpoint), with no file paths taken from it: the data and cache
    directories are the user's to pass, since a checkpoint's files can be edited by anyone who can
    write them."""
    from anydepth.train import checkpoint as C
    from anydepth.train.config import RunConfig

    ck = None
    if C.stopped_before_first_checkpoint(resume):
        f = Path(resume) / "run.json"
        if f.is_file():
            try:
                d = json.loads(f.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CliError(f"{f} is not valid JSON ({e})") from None
        else:
            d = RunConfig().to_dict()
        where = str(f)
    else:
        ck = C.load_checkpoint(resume)
        d, where = dict(ck.run), str(ck.path / "run.json")
    if not isinstance(d, dict):
        raise CliError(f"{where} must hold a JSON object, got {type(d).__name__}")
    data = d.get("data")
    if isinstance(data, dict):
        data = dict(data)
        saved = data.get("path")
        if saved is not None and _scan(argv, "data.path") is None:
            raise CliError(
                f"the run was trained on data.path={saved!r} ({where}); a resume takes no paths from a "
                f"checkpoint: pass --data.path {saved!r} (or another corpus) to continue"
            )
        data["path"], data["cache_dir"] = None, None
        saved_tok = data.get("tokenizer")
        if ck is not None and (ck.path / "tokenizer.json").is_file():
            # the checkpoint's own copy: a file of the checkpoint, not a path it points to
            data["tokenizer"] = str(ck.path / "tokenizer.json")
        elif saved_tok is not None:
            if _scan(argv, "data.tokenizer") is None:
                raise CliError(
                    f"the run was trained with data.tokenizer={saved_tok!r} ({where}); a resume takes no paths "
                    f"from a checkpoint: pass --tokenizer {saved_tok!r} to continue"
                )
            data["tokenizer"] = None
        d["data"] = data
    d["out"], d["resume"] = None, resume
    try:
        return RunConfig.from_dict(d)
    except (ValueError, TypeError) as e:
        raise CliError(f"{where}: {str(e).splitlines()[0]}") from None


def parse_train_args(argv: Sequence[str]):
    """``anydepth train`` arguments -> :class:`~anydepth.train.config.RunConfig` (raises :class:`CliError`)."""
    from anydepth.train.config import RunConfig

    argv = list(argv)
    # `--data PATH` and `--tokenizer FILE` are the documented short forms of `--data.path PATH` and
    # `--data.tokenizer FILE`.
    for i, tok in enumerate(argv):
        for short, full in (("--data", "--data.path"), ("--tokenizer", "--data.tokenizer")):
            if tok == short:
                argv[i] = full
            elif tok.startswith(short + "="):
                argv[i] = full + "=" + tok.split("=", 1)[1]
    try:
        base = _base_run(argv)
    except (ValueError, TypeError) as e:
        raise CliError(str(e)) from None
    model_args = _model_args_class(base.model)
    command = _train_command_class(model_args)
    if "-h" not in argv and "--help" not in argv:
        _check_keys(argv, _option_names(command), "train")
    default = command(
        model=model_args(
            **{f.name: _model_arg_value(base.model, f.name) for f in dataclasses.fields(model_args)}
        ),
        train=base.train,
        data=base.data,
        preset=None,
        config=None,
        out=base.out,
        resume=base.resume,
    )
    try:
        parsed = _tyro_cli(command, argv, default, "anydepth train")
        changes = {}
        for f in dataclasses.fields(model_args):
            v = getattr(parsed.model, f.name)
            if f.name in _COMPONENTS:
                if v != getattr(base.model, f.name).kind:
                    changes[f.name] = v
            elif v != getattr(base.model, f.name):
                changes[f.name] = v
        model = base.model.replace(**changes) if changes else base.model
        return RunConfig(
            model=model, train=parsed.train, data=parsed.data, out=parsed.out, resume=parsed.resume
        )
    except (ValueError, TypeError) as e:
        raise CliError(str(e).splitlines()[0]) from None


def _out_of_memory(e: BaseException) -> bool:
    """An allocation failure: CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    import torch

    text = str(e)
    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in text or "not enough memory" in text


def _model_arg_value(model, name: str):
    v = getattr(model, name)
    return v.kind if name in _COMPONENTS else v


def _train(argv: list[str]) -> int:
    from anydepth.train.checkpoint import CheckpointError
    from anydepth.train.distributed import CollectiveTimeout
    from anydepth.train.loop import TrainingDiverged, run
    from anydepth.train.malloc import retain_freed_memory

    cfg = parse_train_args(argv)
    retain_freed_memory()
    try:
        summary = run(cfg)
    except (CheckpointError, CollectiveTimeout) as e:
        raise CliError(str(e)) from None
    except TrainingDiverged as e:
        print(f"anydepth train: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        raise CliError(str(e).splitlines()[0]) from None
    except RuntimeError as e:
        if not _out_of_memory(e):
            raise
        raise CliError(
            f"out of memory: {str(e).splitlines()[0][:200]}; lower --train.batch_size, --train.seq_len or the "
            "model's size"
        ) from None
    if int(os.environ.get("RANK", "0")) == 0:
        bpb = summary["final_val_bpb"]
        if bpb is not None:
            score = f"val bpb {bpb:.3f} (unigram {summary['unigram_bpb']:.2f})"
        else:
            score = f"val loss {summary['final_val_loss']:.3f} nats/token (ids without a tokenizer: no bits per byte)"
        print(
            f"done: {summary['steps']} steps, {score}, "
            f"{summary['tokens_per_s']:.0f} tokens/s, peak memory {summary['peak_mem_mb']:.0f} MB"
        )
        print(f"checkpoint: {summary['checkpoint']}")
        print(f"loss curve: {summary['plot']}")
        print(f"summary:    {Path(summary['out']) / 'summary.json'}")
        if summary["sample"]:
            print("sample:\n" + summary["sample"])
    return 0


DIAGNOSE_USAGE = """usage: anydepth diagnose [--preset NAME | --config FILE.json | --checkpoint DIR] [overrides]
                         [--batches N]

Builds the model exactly as `anydepth train` would with the same options (same seed, so the same
init), or loads a trained one with --checkpoint (a run, checkpoint or save_pretrained directory),
runs one forward and backward on the first N training batches of the run's corpus (--batches,
default 4; --train.batch_size and --train.seq_len set their shape), prints the verdict and writes
diagnose.json, diagnose.png (heatmap) and profiles.png (lines) under --out (default
runs/diagnose-<UTC time>). Nothing is trained.

  anydepth diagnose --preset postnorm --model.depth=64 --model.dim=64 --train.seq_len=64"""


def _diagnose(argv: list[str]) -> int:
    """``anydepth diagnose`` (:mod:`anydepth.diagnose` measures); bad input raises :class:`CliError`."""
    from datetime import datetime, timezone

    import torch

    from anydepth.diagnose import diagnose, write_report
    from anydepth.model.build import build_model
    from anydepth.train.data import load_corpus, sample_batch

    argv = list(argv)
    if "-h" in argv or "--help" in argv:
        print(DIAGNOSE_USAGE)
        print("\nEvery option of `anydepth train --help` is accepted; --out is where the files go.")
        return 0
    checkpoint = _scan(argv, "checkpoint")
    n_batches = _scan(argv, "batches")
    argv = _drop(argv, "checkpoint")
    argv = _drop(argv, "batches")
    try:
        n = 4 if n_batches is None else int(n_batches)
    except ValueError:
        raise CliError(f"--batches must be a positive integer, got {n_batches!r}") from None
    if n < 1:
        raise CliError(f"--batches must be a positive integer, got {n}")
    if checkpoint is not None:
        clash = [a.split("=", 1)[0] for a in argv if a.startswith(("--model.", "--preset", "--config", "--resume"))]
        if clash:
            raise CliError(
                f"{clash[0]} does not apply to --checkpoint (the checkpoint fixes the model); drop it, or "
                "diagnose a preset or config instead"
            )
    cfg = parse_train_args(argv)
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if tc.device == "auto" else tc.device)
    if checkpoint is not None:
        model = load_for_generation(checkpoint, device=str(device)).train()
    else:
        torch.manual_seed(tc.seed)
        try:
            model = build_model(cfg.model).to(device)
        except (ValueError, TypeError) as e:
            raise CliError(str(e).splitlines()[0]) from None
    seq_len = min(tc.seq_len, model.config.max_seq_len)
    try:
        from anydepth.train.tokenizer import Tokenizer

        tok = Tokenizer.from_file(cfg.data.tokenizer, "data.tokenizer") if cfg.data.tokenizer else None
        train_tokens, _ = load_corpus(cfg.data, tok)
        batches = [
            sample_batch(train_tokens, step=i, seed=tc.seed, batch_size=tc.batch_size, seq_len=seq_len)
            for i in range(n)
        ]
    except ValueError as e:
        raise CliError(str(e).splitlines()[0]) from None
    report = diagnose(model, batches)
    out = Path(cfg.out or Path("runs") / datetime.now(timezone.utc).strftime("diagnose-%Y%m%d-%H%M%S"))
    paths = write_report(report, out)
    print(report.verdict())
    print(f"report:  {paths['json']}")
    print(f"heatmap: {paths['png']}")
    print(f"lines:   {paths['profiles']}")
    return 0


def _drop(argv: list[str], name: str) -> list[str]:
    out, skip = [], False
    for tok in argv:
        if skip:
            skip = False
            continue
        if tok == f"--{name}":
            skip = True
            continue
        if tok.startswith(f"--{name}="):
            continue
        out.append(tok)
    return out


@dataclass(kw_only=True)
class GenerateArgs:
    """``anydepth generate``: sample a continuation of ``--prompt`` from a trained checkpoint."""

    checkpoint: str  # run directory, checkpoint directory or save_pretrained directory
    prompt: str = "def "  # text to continue (UTF-8 bytes for a byte-level model, else the tokenizer's ids)
    max_new_tokens: int = 200  # tokens to sample after the prompt
    temperature: float = 0.8  # softmax temperature; lower is more conservative, 0 is greedy (argmax)
    top_k: int | None = 40  # sample only from the k most likely tokens (None: all)
    top_p: float | None = None  # nucleus sampling: smallest set with this total probability (None: off)
    seed: int = 0  # sampling seed, so a command prints the same text twice
    device: str = "cpu"  # device to run on
    use_cache: bool = True  # reuse keys/values of earlier positions where the attention supports it
    tokenizer: str | None = None  # tokenizer.json; None: the checkpoint's own (byte-level models need none)


def _generate(argv: list[str]) -> int:
    import torch

    if "-h" not in argv and "--help" not in argv:
        _check_keys(argv, _option_names(GenerateArgs), "generate")
    args = _tyro_cli(GenerateArgs, argv, None, "anydepth generate")
    if args.max_new_tokens <= 0:
        raise CliError(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}")
    from anydepth.validate import check_generate_args

    try:
        # the same check as model.generate, so the command and the library accept the same values
        check_generate_args(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p
        )
    except (ValueError, TypeError) as e:
        raise CliError("--" + str(e).replace("_", "-", 1)) from None
    if not 0 <= args.seed < 2**63:
        raise CliError(f"--seed must be an integer in [0, 2**63), got {args.seed}")
    from anydepth.train.distributed import resolve_device

    try:
        device = str(resolve_device(args.device, option="device"))
    except ValueError as e:
        raise CliError(str(e)) from None
    model = load_for_generation(args.checkpoint, device=device)
    vocab = model.config.vocab_size
    tok = _generation_tokenizer(args, vocab)
    if tok is None and vocab < 256:
        raise CliError(
            f"the model has vocab_size={vocab}; --prompt text needs a byte-level model (256 tokens)"
        )
    if not args.prompt:
        raise CliError("--prompt is empty; give at least one character to continue")
    try:
        ids = tok.encode(args.prompt, "--prompt") if tok is not None else list(args.prompt.encode("utf-8"))
    except ValueError as e:
        raise CliError(str(e)) from None
    room = model.config.max_seq_len - len(ids)
    if room <= 0:
        unit = "tokens" if tok is not None else "bytes"
        raise CliError(
            f"--prompt has {len(ids)} {unit}, the model's limit is {model.config.max_seq_len}; shorten it"
        )
    torch.manual_seed(args.seed)
    prompt = torch.tensor([ids], dtype=torch.long, device=device)
    out = model.generate(
        prompt,
        min(args.max_new_tokens, room),
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        use_cache=args.use_cache,
        logits_processor=tok.utf8_processor(vocab) if tok is not None else None,
    )
    tokens = out[0].tolist()
    if tok is not None:
        text = tok.complete_text(tokens)
    else:
        text = bytes(t for t in tokens if t < 256).decode("utf-8", errors="replace")
    print(text)
    return 0


def _generation_tokenizer(args: GenerateArgs, vocab: int):
    """The tokenizer of ``--tokenizer`` or of the checkpoint, checked against the model's vocabulary;
    None for a byte-level model without one."""
    from anydepth.train import checkpoint as C
    from anydepth.train.tokenizer import Tokenizer

    try:
        if args.tokenizer is not None:
            tok = Tokenizer.from_file(args.tokenizer, "--tokenizer")
        else:
            p = Path(args.checkpoint)
            d = p if (p / "model.safetensors").is_file() and not (p / "manifest.json").exists() else None
            d = d or C.latest_checkpoint(p)
            manifest = d / "manifest.json"
            if manifest.is_file() and "tokenizer.json" in json.loads(manifest.read_text()):
                C.verify_files(d, ("tokenizer.json",))  # a run with a tokenizer: its copy must be intact
            tok = Tokenizer.from_file(d / "tokenizer.json") if (d / "tokenizer.json").is_file() else None
        if tok is not None:
            tok.check_vocab(vocab, f"checkpoint {args.checkpoint}")
    except ValueError as e:
        raise CliError(str(e)) from None
    if tok is None and vocab > 256:
        raise CliError(
            f"the model has vocab_size={vocab} and {args.checkpoint} holds no tokenizer.json; pass the tokenizer "
            "it was trained with: --tokenizer FILE"
        )
    return tok


@dataclass(kw_only=True)
class TokenizeArgs:
    """``anydepth tokenize``: train a byte-level BPE tokenizer on local text, then encode the corpus once.

    The tokenizer learns from the training split only (the validation text stays unseen), and the
    encoded splits are cached where ``anydepth train --data PATH --tokenizer OUT`` finds them.
    """

    data: str | None = None  # text file, directory, .jsonl, .parquet or enwik8(.zip); None: the stdlib
    vocab_size: int = 4096  # ids in the vocabulary, the 256 byte tokens included
    out: str = "tokenizer.json"  # where the tokenizer is written (an existing file is not overwritten)
    text_field: str = "text"  # the field (.jsonl) or column (.parquet) holding the text
    val_fraction: float = 0.05  # as --data.val_fraction of the runs that will use it
    max_bytes: int | None = None  # as --data.max_bytes of the runs that will use it
    cache_dir: str | None = None  # token cache; None: $ANYDEPTH_CACHE or ~/.cache/anydepth
    min_frequency: int = 2  # merges of pairs seen fewer times are not learnt
    encode: bool = True  # also encode the corpus to the cache (else the first run does it)
    progress: bool = True  # progress bars on stderr


def _tokenize(argv: list[str]) -> int:
    from anydepth.train.config import DataConfig
    from anydepth.train.data import load_corpus, raw_split
    from anydepth.train.tokenizer import train_bpe

    if "-h" not in argv and "--help" not in argv:
        _check_keys(argv, _option_names(TokenizeArgs), "tokenize")
    args = _tyro_cli(TokenizeArgs, argv, None, "anydepth tokenize")
    out = Path(args.out)
    if out.exists():
        raise CliError(f"--out {args.out!r} already exists; delete it or choose another --out")
    if args.min_frequency < 1:
        raise CliError(f"--min-frequency must be a positive integer, got {args.min_frequency}")
    try:
        cfg = DataConfig(
            path=args.data,
            val_fraction=args.val_fraction,
            max_bytes=args.max_bytes,
            cache_dir=args.cache_dir,
            text_field=args.text_field,
        )
        train_bytes, _ = raw_split(cfg)
        tok = train_bpe(train_bytes, args.vocab_size, min_frequency=args.min_frequency, progress=args.progress)
    except ValueError as e:
        raise CliError(str(e).splitlines()[0]) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(out)
    print(f"tokenizer: {out} ({tok.vocab_size} tokens, trained on {train_bytes.size:,} bytes)")
    if args.encode:
        train, val = load_corpus(cfg, tok, progress=args.progress)
        print(
            f"corpus:    {train.size:,} training and {val.size:,} validation tokens, "
            f"{train_bytes.size / max(train.size, 1):.2f} bytes per token, cached in {Path(train.filename).parent}"
        )
    data = f" --data {args.data}" if args.data else ""
    print(f"train:     anydepth train{data} --tokenizer {out}")
    return 0


def load_for_generation(path: str, device: str = "cpu"):
    """The model of a run directory, a checkpoint or a ``save_pretrained`` directory, checksums verified."""
    from anydepth.model.pretrained import from_pretrained
    from anydepth.train import checkpoint as C

    p = Path(path)
    if not p.exists():
        raise CliError(f"--checkpoint {path!r} does not exist; pass a run or checkpoint directory")
    if (p / "model.safetensors").is_file() and not (p / "manifest.json").exists():
        d = p
    else:
        try:
            d = C.latest_checkpoint(p)
            C.verify_files(d, ("model.safetensors", "config.json"))
        except C.CheckpointError as e:
            raise CliError(str(e)) from None
    try:
        model = from_pretrained(d, device=device)
    except (ValueError, FileNotFoundError) as e:
        raise CliError(str(e).splitlines()[0]) from None
    return model.eval()


def _study(argv: list[str]) -> int:
    try:
        from anydepth.study.cli import main as study_main
    except ImportError as e:
        if e.name in ("anydepth.study.cli", "anydepth.study"):
            print(
                "anydepth study: error: the depth study is not available in this installation",
                file=sys.stderr,
            )
            return 2
        raise
    from anydepth.train.malloc import retain_freed_memory

    retain_freed_memory()
    return int(study_main(argv) or 0)


def _demo(argv: list[str]) -> int:
    from anydepth.study.demo import main as demo_main
    from anydepth.train.malloc import retain_freed_memory

    retain_freed_memory()
    return int(demo_main(argv) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``anydepth`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    handlers = {
        "train": _train,
        "diagnose": _diagnose,
        "generate": _generate,
        "tokenize": _tokenize,
        "study": _study,
        "demo": _demo,
    }
    if command not in handlers:
        close = difflib.get_close_matches(command, list(handlers), n=1)
        commands = "commands: train, diagnose, generate, tokenize, study, demo"
        hint = f"did you mean `anydepth {close[0]}`?" if close else commands
        print(f"anydepth: error: unknown command {command!r}; {hint}", file=sys.stderr)
        return 2
    try:
        return handlers[command](rest)
    except CliError as e:
        print(f"anydepth {command}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # tyro's --help (0) and any parse error it reports itself (2)
        return int(e.code or 0)
    except (OSError, MemoryError) as e:  # a full disk, a read-only directory: the user's to fix, not a bug
        where = f" ({e.filename})" if getattr(e, "filename", None) and str(e.filename) not in str(e) else ""
        print(f"anydepth {command}: error: {type(e).__name__}: {e}{where}", file=sys.stderr)
        return 2


def entry() -> None:
    """The ``anydepth`` console script and ``python -m anydepth``: :func:`main`, then exit with its code.

    A process that torchrun started as one of several ranks leaves with ``os._exit`` once its output
    is flushed, skipping the interpreter's finalization. DistributedDataParallel keeps the gloo
    process group, and with it gloo's worker threads, alive past ``destroy_process_group``; a C++
    thread that touches the interpreter while it finalizes is ended by Python with
    ``pthread_exit``, which aborts the whole process ("terminate called without an active
    exception", SIGABRT), and torchrun then reports a run whose every checkpoint was written as
    failed. Every file the run writes is closed (and the metrics log flushed line by line) by then.
    An exception out of :func:`main` still propagates the usual way. ``faulthandler`` is on in such
    processes so that a fatal signal still names the Python line it came from.
    """
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if multi_process:
        import faulthandler

        faulthandler.enable()
    code = main()
    if not multi_process:
        raise SystemExit(code)
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
