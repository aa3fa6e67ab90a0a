"""State-dict key and shape translation between a compat class and the module it stands in for.

Where the package stores a parameter under another name or shape than the library's module (a
``Conv2d`` weight ``(k, d, 1, 1)`` for a ``(d, k)`` projection, a ``Linear`` weight for its
transpose), the compat class keeps the library's parameter and translates at the state-dict
boundary: ``state_dict()`` writes the package's keys and shapes, ``load_state_dict`` reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from torch import Tensor, nn


@dataclass(frozen=True)
class Renamed:
    """Our parameter ``ours`` (shape ``our_shape``) is the package's ``theirs`` (``their_shape``),
    transposed first where ``transpose`` (only for 2-d ``our_shape``)."""

    ours: str
    theirs: str
    our_shape: tuple[int, ...]
    their_shape: tuple[int, ...]
    transpose: bool = False

    def to_theirs(self, t: Tensor) -> Tensor:
        return (t.t() if self.transpose else t).reshape(self.their_shape).contiguous()

    def to_ours(self, t: Tensor) -> Tensor:
        if self.transpose:
            return t.reshape(self.our_shape[::-1]).t().contiguous()
        return t.reshape(self.our_shape)


def _save(table, module, state_dict, prefix, local_metadata):
    for r in table:
        if prefix + r.ours in state_dict:
            state_dict[prefix + r.theirs] = r.to_theirs(state_dict.pop(prefix + r.ours))


def _load(table, module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    for r in table:
        key = prefix + r.theirs
        if key in state_dict and tuple(state_dict[key].shape) == r.their_shape:
            state_dict[prefix + r.ours] = r.to_ours(state_dict.pop(key))


def translate_state_dict(module: nn.Module, *renamed: Renamed) -> None:
    """Registers the hooks; ``partial`` of module-level functions keeps the module picklable."""
    table = tuple(r for r in renamed if r.ours != r.theirs or r.our_shape != r.their_shape)
    if table:
        module.register_state_dict_post_hook(partial(_save, table))
        module.register_load_state_dict_pre_hook(partial(_load, table))


def shape(module: nn.Module, name: str) -> tuple[int, ...]:
    return tuple(module.get_parameter(name).shape)
