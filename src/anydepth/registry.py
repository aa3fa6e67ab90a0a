"""The registries of leaf-layer kinds, with every kind registered.

The :class:`Registry` objects live in :mod:`anydepth.nn.registry`, where the leaf modules register
their classes as they are imported. Importing this module imports :mod:`anydepth.nn` first, so
``NORMS.kinds()``, ``RESIDUALS.config("admin")`` or :func:`registered` see every kind whatever the
caller imported before. Code outside ``anydepth.nn`` imports the registries from here; the leaf
modules import them from :mod:`anydepth.nn.registry` (importing this module from a leaf would be an
import circle: this module -> ``anydepth.nn`` -> the leaf -> this module).
"""

from __future__ import annotations

import anydepth.nn  # noqa: F401  (registers every kind)
from anydepth.nn.registry import (
    ATTENTIONS,
    FAMILIES,
    FFS,
    NORMS,
    POSITIONS,
    RESIDUALS,
    STACKS,
    Registry,
    config_from_dict,
    config_to_dict,
    registered,
)

__all__ = [
    "Registry",
    "NORMS",
    "RESIDUALS",
    "ATTENTIONS",
    "FFS",
    "STACKS",
    "POSITIONS",
    "FAMILIES",
    "registered",
    "config_to_dict",
    "config_from_dict",
]
