"""Leaf layers. Importing this package registers every kind of every family."""

from anydepth.nn import (  # noqa: F401
    attention,
    context,
    feedforward,
    hyper,
    lsh,
    mhc_lite,
    norms,
    positional,
    residual,
    reversible,
    stack,
)
