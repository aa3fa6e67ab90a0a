"""Residual schemes: where the norm goes and how the skip and the branch are combined.

Each scheme is one module of this package holding one registered :class:`Residual` subclass
(``prenorm``, ``postnorm``, ``periln``, ``rezero``, ``admin``, ``deepnorm``, ``layerscale``,
``hyper``/``mhc``, ``mhc_lite``). It is told its position (``LayerContext``: layer index and total
count), builds its own norm from the norm config it is given, owns its depth-dependent init, and
is called as ``x = residual(x, branch, *args, **kwargs)``, which evaluates ``branch(h, *args,
**kwargs)`` once. What the model builder's rules need to know about a scheme it declares as class
attributes (see :class:`Residual`).

Importing the package imports every module in it, which registers its scheme, and re-exports the
``__all__`` of each module that defines a scheme (``hyper_fused``, the hyper-connection kernels,
keeps its names to itself); so a new scheme is one new file here (plus its test and its row
in the README's kinds table), and no other module names it.
"""

from __future__ import annotations

import importlib
import pkgutil

from anydepth.nn.residual.base import Residual

__all__ = ["Residual"]

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name == "base":
        continue
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    if not any(
        isinstance(v, type) and issubclass(v, Residual) and v.__module__ == _module.__name__
        for v in vars(_module).values()
    ):
        continue
    for _name in getattr(_module, "__all__", ()):
        if _name in __all__:
            raise ImportError(f"{_module.__name__} exports {_name!r}, which another residual module exports too")
        globals()[_name] = getattr(_module, _name)
        __all__.append(_name)
del _info, _module
