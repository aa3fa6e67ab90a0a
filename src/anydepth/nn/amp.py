"""Autocast for the library's own ``torch.autograd.Function`` s.

Autocast acts on the ops torch dispatches, but a custom ``Function``'s backward runs outside it: a
backward that mixes the forward's saved tensors (cast by autocast) with its own inputs (not cast)
fails with a dtype mismatch, or silently computes in the wrong precision. :func:`autocast_apply`
does for a ``Function`` what autocast does for one op: inside an autocast region of the inputs'
device, every floating tensor argument is cast to one dtype, with casts that autograd records (so
the gradients come back in each input's own dtype), and the ``Function`` runs with autocast off, so
its forward and backward see that dtype alone. It is ``torch.amp.custom_fwd(cast_inputs=...)``
without that decorator's fixed device type.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = ["autocast_apply", "autocast_dtype"]


def _device_type(args: tuple) -> str | None:
    for a in args:
        if isinstance(a, Tensor):
            return a.device.type
    return None


def autocast_dtype(*args) -> torch.dtype | None:
    """The autocast dtype in force for the device of the first tensor in ``args``, else None."""
    device = _device_type(args)
    if device is None or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def autocast_apply(fn: type[torch.autograd.Function], *args, promote: bool = False):
    """``fn.apply(*args)``, under autocast as one op of autocast's lists.

    ``promote=False``: a lower-precision op (a matrix product): floating tensors in the autocast dtype.
    ``promote=True``: an op of mixed inputs (``addcmul``): floating tensors in the widest of their
    dtypes. Outside autocast it is ``fn.apply(*args)``.
    """
    device = _device_type(args)
    if device is None or not torch.is_autocast_enabled(device):
        return fn.apply(*args)
    floats = [a for a in args if isinstance(a, Tensor) and a.is_floating_point()]
    if promote:
        dtype = functools.reduce(torch.promote_types, (a.dtype for a in floats))
    else:
        dtype = torch.get_autocast_dtype(device)
    cast = tuple(a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)
    with torch.autocast(device, enabled=False):
        return fn.apply(*cast)
