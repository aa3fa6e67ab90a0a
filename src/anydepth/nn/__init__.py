"""Leaf layers. Importing this package registers every kind of every family."""

from anydepth.nn import (  # noqa: F401
    attention,
    context,
    feedforward,
    lsh,
    norms,
    positional,
    residual,
    reversible,
    stack,
)
