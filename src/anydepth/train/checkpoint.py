"""Checkpoints that a kill at any moment cannot corrupt, and that load without unpickling.

A checkpoint is a directory ``<run>/checkpoints/step_<NNNNNNNN>/``:

- ``model.safetensors`` + ``config.json``: the weights and ``ModelConfig`` (the same two files as
  ``save_pretrained``, so ``anydepth.from_pretrained(dir)`` and ``anydepth generate`` read
  a checkpoint directly);
- ``state.safetensors``: every optimizer tensor (``opt/<parameter name>/<name>``) and the torch RNG states
  of every process (``rng.torch.<rank>``, ``rng.cuda.<rank>``);
- ``trainer.json``: step, optimizer hyper-parameters per group, schedule and data position,
  Python/NumPy RNG states, and the running metrics; ``run.json``: the full ``RunConfig``;
- ``tokenizer.json``, in runs that have a tokenizer (the one the model was trained with);
- ``manifest.json``, written last: size and SHA-256 of every other file.

It is written into a hidden temporary directory, every file is fsync'd, and the directory is
renamed into place (an atomic operation on POSIX file systems), so a crash leaves either the
complete new checkpoint or none of it. Loading checks the manifest first: a truncated or altered
file raises :class:`CheckpointError` naming that file.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "CheckpointError",
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "prune_checkpoints",
    "clean_leftovers",
    "run_dir_of",
    "stopped_before_first_checkpoint",
    "verify_files",
    "load_weights",
    "rng_states",
    "capture_rng",
    "restore_rng",
    "optimizer_to_flat",
    "optimizer_from_flat",
]

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, altered or does not match the run; the message names the file."""


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns; tensors are on the CPU."""

    path: Path  # the step directory
    step: int  # updates completed when it was written
    trainer: dict[str, Any]  # trainer.json
    run: dict[str, Any]  # run.json (RunConfig.to_dict())
    model_config: dict[str, Any]  # config.json
    state: dict[str, torch.Tensor]  # state.safetensors

    @property
    def weights(self) -> Path:
        return self.path / "model.safetensors"


def capture_rng() -> dict[str, Any]:
    """This process's RNG states: torch (CPU and CUDA) as tensors, Python and NumPy as JSON values."""
    py = random.getstate()
    np_state = np.random.get_state()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    v, internal, gauss = states["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def optimizer_to_flat(osd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state dict keyed by parameter name (``get_optimizer_state_dict``) split into
    tensors (``opt/<param name>/<state name>``, for safetensors) and JSON values."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, st in osd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt/{name}/{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(name), {})[k] = v
    groups = [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd["param_groups"]
    ]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`optimizer_to_flat`: a dict for ``set_optimizer_state_dict``."""
    state: dict[str, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("opt/"):
            _, name, k = key.split("/", 2)
            state.setdefault(name, {})[k] = v
    for name, st in meta.get("scalars", {}).items():
        state.setdefault(name, {}).update(st)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    *,
    model: nn.Module,
    optimizer_state: dict[str, Any],
    run: dict[str, Any],
    trainer: dict[str, Any],
    rng: list[dict[str, Any]],
    model_state: dict[str, torch.Tensor] | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Writes ``root/step_<step>/`` atomically and returns its path.

    ``optimizer_state`` is keyed by parameter name (``get_optimizer_state_dict``); ``rng`` has one
    entry per process; ``model_state`` (full tensors gathered from a sharded model) replaces
    reading the weights from ``model``; ``extra_files`` (name -> text, e.g. ``tokenizer.json``) are
    written beside the others and listed in the manifest.
    """
    root = Path(root)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        _write_step(tmp, model, optimizer_state, run, trainer, rng, model_state, step, extra_files)
    except Exception as e:  # a full disk or a read-only directory: earlier checkpoints stay as they were
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":
            raise CheckpointError(
                f"could not write checkpoint {final}: {_one_line(e)}; free disk space or make {root} writable "
                "(earlier checkpoints are intact)"
            ) from e
        raise
    if final.exists():
        # A resumed run rewrites a step it had already saved: move the old one aside first, since
        # rename() cannot replace a non-empty directory. clean_leftovers() restores it after a kill.
        old = root / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync(root)
    return final


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _write_step(tmp: Path, model, optimizer_state, run, trainer, rng, model_state, step: int, extra_files) -> None:
    from safetensors.torch import save_file, save_model

    opt_tensors, opt_meta = optimizer_to_flat(optimizer_state)
    state = dict(opt_tensors)
    py_rng = []
    for rank, st in enumerate(rng):
        state[f"rng.torch.{rank}"] = st["torch"]
        if "cuda" in st:
            state[f"rng.cuda.{rank}"] = st["cuda"]
        py_rng.append({"python": st["python"], "numpy": st["numpy"]})
    if model_state is None:
        save_model(model, str(tmp / "model.safetensors"))  # stores tied tensors once
    else:
        save_file({k: v.contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
    save_file(state, str(tmp / "state.safetensors"))
    _write_json(tmp / "config.json", model.config.to_dict())
    _write_json(tmp / "run.json", run)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    _write_json(
        tmp / "trainer.json",
        {"format": FORMAT_VERSION, "step": step, "optimizer": opt_meta, "rng": py_rng, **trainer},
    )
    files = sorted(p.name for p in tmp.iterdir())
    _write_json(tmp / "manifest.json", {name: _digest(tmp / name) for name in files})
    for name in [*files, "manifest.json"]:
        _fsync(tmp / name)
    _fsync(tmp)


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """``[(step, dir), ...]`` of complete checkpoints (with a manifest) under ``root``, in the order
    they were written (the manifest, written last, dates each; the step breaks ties). A run resumed
    from an earlier step writes lower steps after higher ones: the newest is the last written."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            try:
                written = (p / "manifest.json").stat().st_mtime_ns
            except OSError:
                continue
            out.append((written, int(m.group(1)), p))
    return [(step, p) for _, step, p in sorted(out)]


def clean_leftovers(root: str | os.PathLike) -> list[str]:
    """Removes what interrupted writes left under ``root`` (a checkpoints directory): temporary
    ``.tmp-step_*`` directories, and ``.old-step_*`` ones whose step was rewritten. A kill between
    the two renames of a rewrite leaves ``step_N`` missing and its previous version in
    ``.old-step_N-<pid>``: that one is put back. Returns what was done, one line each."""
    root = Path(root)
    done: list[str] = []
    if not root.is_dir():
        return done
    for p in sorted(root.glob(".old-step_*")):
        name = p.name[len(".old-") :].rsplit("-", 1)[0]
        final = root / name
        if _STEP_DIR.match(name) and not final.exists() and (p / "manifest.json").exists():
            os.rename(p, final)
            done.append(f"restored {final} from an interrupted rewrite")
        else:
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p}")
    for p in sorted(root.glob(".tmp-step_*")):
        shutil.rmtree(p, ignore_errors=True)
        done.append(f"removed {p}")
    return done


def prune_checkpoints(root: str | os.PathLike, keep_last: int) -> None:
    """Deletes all but the newest ``keep_last`` checkpoints and any leftover temporary directories."""
    root = Path(root)
    for _, p in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".tmp-step_*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid != str(os.getpid()):
            shutil.rmtree(p, ignore_errors=True)


def stopped_before_first_checkpoint(path: str | os.PathLike) -> bool:
    """``path`` is a run directory that logged or wrote its config but holds no checkpoint: a run
    killed before its first save, which starts again from step 0 instead of failing to resume."""
    path = Path(path)
    return (
        path.is_dir()
        and ((path / "metrics.jsonl").exists() or (path / "run.json").exists())
        and not (path / "manifest.json").exists()
        and not list_checkpoints(path / "checkpoints")
        and not list_checkpoints(path)
    )


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory a ``step_*`` checkpoint directory belongs to."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def latest_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint directory to resume from: ``path`` itself, or the newest under ``path``/checkpoints.

    Raises :class:`CheckpointError` if there is none.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"resume path {str(p)!r} does not exist; pass a run directory or a checkpoint")
    if (p / "trainer.json").exists() or (p / "manifest.json").exists():
        return p
    for root in (p / "checkpoints", p):
        found = list_checkpoints(root)
        if found:
            return found[-1][1]
    raise CheckpointError(
        f"no checkpoint found in {str(p)!r} (looked for checkpoints/step_*/manifest.json); "
        "pass a run directory written by `anydepth train`"
    )


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Reads and verifies a checkpoint (a run directory or a ``step_*`` directory)."""
    from safetensors.torch import load_file

    d = latest_checkpoint(path)
    verify_files(d, ("model.safetensors", "state.safetensors", "config.json", "run.json", "trainer.json"))
    try:
        state = load_file(str(d / "state.safetensors"))
    except Exception as e:  # safetensors reports damage with its own exception types
        raise CheckpointError(f"checkpoint file {d / 'state.safetensors'} could not be read: {e}") from None
    trainer = _read_json(d / "trainer.json")
    if not isinstance(trainer, dict):
        raise CheckpointError(f"checkpoint file {d / 'trainer.json'} is corrupted (not a JSON object)")
    if trainer.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint file {d / 'trainer.json'} has format {trainer.get('format')!r}; "
            f"this version reads format {FORMAT_VERSION}"
        )
    step = trainer.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(
            f"checkpoint file {d / 'trainer.json'} has step {step!r}, not an int >= 0; the checkpoint is damaged, "
            "resume from an earlier one"
        )
    for key, kind in (("optimizer", dict), ("rng", list), ("metrics", dict)):
        if key in trainer and not isinstance(trainer[key], kind):
            raise CheckpointError(
                f"checkpoint file {d / 'trainer.json'} has {key} of type {type(trainer[key]).__name__}, "
                f"expected a JSON {'object' if kind is dict else 'array'}; the checkpoint is damaged"
            )
    run, model_config = _read_json(d / "run.json"), _read_json(d / "config.json")
    for name, obj in (("run.json", run), ("config.json", model_config)):
        if not isinstance(obj, dict):
            raise CheckpointError(f"checkpoint file {d / name} is corrupted (not a JSON object)")
    return Checkpoint(
        path=d,
        step=step,
        trainer=trainer,
        run=run,
        model_config=model_config,
        state=state,
    )


def verify_files(d: Path, names: tuple[str, ...]) -> None:
    """Checks ``names`` in checkpoint ``d`` against its manifest; raises :class:`CheckpointError` naming a bad file."""
    manifest_path = d / "manifest.json"
    manifest = _read_json(manifest_path)
    if not isinstance(manifest, dict):
        raise CheckpointError(f"checkpoint file {manifest_path} is corrupted (not a JSON object)")
    for name in names:
        f = d / name
        if name not in manifest:
            raise CheckpointError(
                f"checkpoint file {manifest_path} does not list {name}; the checkpoint is damaged"
            )
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing; resume from an earlier checkpoint")
        got = _digest(f)
        if got != manifest[name]:
            raise CheckpointError(
                f"checkpoint file {f} is truncated or corrupted: {got['size']} bytes, checksum "
                f"{got['sha256'][:12]}, but {manifest_path} lists {manifest[name].get('size')} bytes, "
                f"{str(manifest[name].get('sha256'))[:12]}; delete {d} to resume from an earlier checkpoint"
            )


def load_weights(model: nn.Module, ckpt: Checkpoint) -> None:
    """Loads the checkpoint's weights into ``model`` (strict: every key must match)."""
    from safetensors.torch import load_model

    from anydepth.model.pretrained import key_mismatch

    try:
        missing, unexpected = load_model(model, str(ckpt.weights), strict=False, device="cpu")
    except Exception as e:
        raise CheckpointError(f"checkpoint file {ckpt.weights} could not be loaded: {e}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint file {ckpt.weights} does not match the model ({key_mismatch(missing, unexpected)}); "
            "resume with the model config it was trained with"
        )


def rng_states(ckpt: Checkpoint) -> list[dict[str, Any]]:
    """The per-process RNG states saved in ``ckpt`` (index = rank)."""
    out = []
    for rank, py in enumerate(ckpt.trainer.get("rng", [])):
        st = {"torch": ckpt.state[f"rng.torch.{rank}"], **py}
        if f"rng.cuda.{rank}" in ckpt.state:
            st["cuda"] = ckpt.state[f"rng.cuda.{rank}"]
        out.append(st)
    return out


def _digest(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint file {path} is missing; resume from an earlier checkpoint"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint file {path} is truncated or corrupted ({e})") from None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
