"""Command-line parsing shared by ``anydepth`` and its subcommands: dataclass options read by tyro, with
unknown keys and parse errors turned into one-line :class:`CliError` messages (exit code 2)."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Annotated, Any


class CliError(Exception):
    """Bad command-line input; reported as one line on stderr with exit code 2."""


def _option_names(cls: type, prefix: str = "") -> set[str]:
    out = set()
    for f in dataclasses.fields(cls):
        tp = f.type
        inner = typing.get_args(tp)[0] if typing.get_origin(tp) is Annotated else tp
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(inner):
            out |= _option_names(inner, f"{name}.")
        else:
            out.add(name.replace("_", "-"))
    return out


def _check_keys(argv: list[str], valid: set[str], command: str) -> None:
    for tok in argv:
        if not tok.startswith("--") or tok == "--":
            continue
        key = tok[2:].split("=", 1)[0]
        norm = key.replace("_", "-")
        if norm in valid or norm in ("help",) or (norm.startswith("no-") and norm[3:] in valid):
            continue
        close = difflib.get_close_matches(norm, sorted(valid), n=1, cutoff=0.6)
        hint = f"did you mean --{close[0]}?" if close else f"see `anydepth {command} --help`"
        raise CliError(f"unknown option --{key}; {hint}")


def _tyro_cli(cls: type, argv: list[str], default: Any, prog: str, *, flags: bool = False):
    """``tyro.cli`` with parse errors raised as one-line :class:`CliError`. ``flags``: a bool field is a
    ``--name/--no-name`` flag pair (``anydepth study``) instead of ``--name True|False``."""
    import tyro

    def hook(event) -> None:
        raise CliError(_describe(event))

    # tyro reports parse errors as a multi-line box. Its parse-error hook (tyro._errors, present in
    # tyro 1.0) lets us raise a one-line CliError instead; where a tyro version lacks it, tyro's
    # own report is shown, still with exit code 2.
    errors = getattr(tyro, "_errors", None)
    ctx = errors.on_parse_error(hook) if errors is not None and hasattr(errors, "on_parse_error") else None
    kwargs = {"args": argv, "prog": prog, "config": () if flags else (tyro.conf.FlagConversionOff,)}
    if default is not None:
        kwargs["default"] = default
    if ctx is None:
        return tyro.cli(cls, **kwargs)
    with ctx:
        return tyro.cli(cls, **kwargs)


def _describe(event) -> str:
    """One line from a tyro parse-error event (value, option and allowed values)."""
    arg = getattr(event, "argument", None)
    name = None
    if arg is not None:
        try:
            name = "/".join(arg.lowered.name_or_flags)
        except AttributeError:
            name = None
    kind = type(event).__name__
    if kind == "InvalidChoice":
        return f"invalid value {event.value!r} for {name}; choose one of: {', '.join(event.choices)}"
    if kind == "InstantiationFailure":
        msg = str(event.message).strip().splitlines()[0]
        return f"{name}: {msg}" if name else msg
    if kind == "UnrecognizedArgs":
        return f"unrecognized argument(s) {' '.join(event.tokens)}; see --help"
    if kind == "BadValue":
        if getattr(event, "reason", "") == "too_few_values":
            return f"{name} needs a value, e.g. {name}=..."
        return f"bad value {getattr(event, 'offending_value', '')!r} for {name}"
    if kind == "MissingArgs":
        names = []
        for a in event.missing_arguments:
            try:
                names.append("/".join(a.arg.lowered.name_or_flags))
            except AttributeError:
                names.append(str(a))
        return f"missing required option(s) {', '.join(names)}"
    return f"invalid arguments ({kind}); see --help"
