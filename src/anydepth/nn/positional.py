"""Position information: absolute tables added to the embeddings, or rotary phases applied in attention.

Every kind is built from its ``Config`` and the context ``dim``, ``dim_head``, ``max_seq_len`` (each
constructor reads the sizes it needs and accepts the others), as ``POSITIONS.build(cfg, dim=..., dim_head=...,
max_seq_len=...)`` or by hand as ``RotaryEmbedding(RotaryEmbedding.Config(base=5e5), dim_head=64)`` or
``RotaryEmbedding.make(dim_head=64, base=5e5)``, and called with integer ``positions`` of shape ``(n,)``:

- absolute kinds (``absolute = True``: ``learned``, ``sinusoidal``, ``axial``) return ``(n, dim)``, which the
  model adds to the token embeddings;
- ``rotary`` (``rotary = True``) returns a :class:`RotaryTable` ``(cos, sin)``, each ``(n, rot_dim)``, which
  attention applies to queries and keys with :func:`apply_rotary`;
- ``none`` has both flags False; the model skips it.

Both flags exist so that the model never has to know kind names, and so that every attention kind sees
positions through the same ``rotary=`` argument (reformer-pytorch's full-attention fallback silently
dropped its rotary phases; our permutation tests guard against that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from anydepth.nn.registry import POSITIONS, Configurable

__all__ = [
    "NoPosition",
    "LearnedPosition",
    "SinusoidalPosition",
    "AxialPosition",
    "RotaryEmbedding",
    "RotaryTable",
    "InterleavedRotaryTable",
    "apply_rotary",
]


def _check_positions(positions: Tensor, limit: int | None, limit_name: str) -> None:
    """Raises ValueError for a non-integer or non-1-D ``positions``, or one outside ``[0, limit)``."""
    if not isinstance(positions, Tensor):
        raise TypeError(f"positions must be a 1-D integer tensor, got {type(positions).__name__}")
    if positions.dim() != 1 or positions.dtype.is_floating_point or positions.dtype == torch.bool:
        raise ValueError(
            f"positions must be a 1-D integer tensor of shape (n,), got shape {tuple(positions.shape)} "
            f"and dtype {positions.dtype}; pass torch.arange(n)"
        )
    # Reading the values would break a torch.compile graph; there the model's own length check (a shape,
    # not a value) is what guards the table.
    if positions.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = int(positions.min()), int(positions.max())
    if lo < 0:
        raise ValueError(f"positions must be >= 0, got {lo}")
    if limit is not None and hi >= limit:
        raise ValueError(
            f"position {hi} is out of range for {limit_name}={limit}; the table covers positions "
            f"0..{limit - 1}: shorten the input or build the model with a larger {limit_name}"
        )


@POSITIONS.register("none")
class NoPosition(Configurable, nn.Module):
    """No position information: a bag-of-tokens model unless attention is causal.

    Kept as a kind so that the permutation tests can show what a position-blind model does.
    """

    absolute = False
    rotary = False

    @dataclass(kw_only=True)
    class Config:
        pass

    def __init__(self, cfg: NoPosition.Config | None = None, **context):
        super().__init__()
        self.config_of(cfg)

    def forward(self, positions: Tensor) -> None:
        """Returns ``None``: there is nothing to add and nothing to rotate."""
        return None


@POSITIONS.register("learned")
class LearnedPosition(Configurable, nn.Module):
    """Learned absolute positions: ``pos[p] = E[p]``, a ``(max_seq_len, dim)`` table (GPT-2, BERT).

    Constraint: positions must lie in ``[0, max_seq_len)``; anything else raises ``ValueError`` naming
    ``max_seq_len`` (reformer-pytorch raised an ``IndexError`` from inside ``nn.Embedding``).
    """

    absolute = True
    rotary = False

    @dataclass(kw_only=True)
    class Config:
        init_std: float = 0.02  # GPT-2's std: small next to unit-variance token embeddings at init

    def __init__(self, cfg: LearnedPosition.Config | None = None, *, dim: int, max_seq_len: int, dim_head=None):
        super().__init__()
        _check_positive("dim", dim)
        _check_positive("max_seq_len", max_seq_len)
        self.max_seq_len, self.init_std = max_seq_len, self.config_of(cfg).init_std
        self.weight = nn.Parameter(torch.empty(max_seq_len, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)

    def forward(self, positions: Tensor) -> Tensor:
        _check_positions(positions, self.max_seq_len, "max_seq_len")
        return self.weight[positions]  # (n, dim)


@POSITIONS.register("sinusoidal")
class SinusoidalPosition(Configurable, nn.Module):
    """Fixed sinusoids (Vaswani et al. 2017, arXiv:1706.03762), laid out as ``[sin | cos]``.

    ``pos[p] = [sin(p * w_0), ..., sin(p * w_{d/2-1}), cos(p * w_0), ..., cos(p * w_{d/2-1})]`` with
    ``w_i = base^(-2i/d)``. The concatenated layout (as in reformer-pytorch and x-transformers) is a fixed
    permutation of the paper's interleaved one. No length limit. Constraint: ``dim`` even.
    """

    absolute = True
    rotary = False

    @dataclass(kw_only=True)
    class Config:
        base: float = 10000.0  # longest wavelength / (2 pi); the paper's value

    def __init__(self, cfg: SinusoidalPosition.Config | None = None, *, dim: int, dim_head=None, max_seq_len=None):
        super().__init__()
        _check_positive("dim", dim)
        if dim % 2:
            raise ValueError(f"sinusoidal positions need an even dim, got dim={dim}; use an even model width")
        base = self.config_of(cfg).base
        _check_base(base)
        self.dim, self.base = dim, base
        # an empty buffer that follows .to(): it tells forward the module's dtype and device
        self.register_buffer("anchor", torch.empty(0), persistent=False)

    def forward(self, positions: Tensor) -> Tensor:
        _check_positions(positions, None, "")
        angles = _angles(positions, self.dim, self.base, self.anchor)  # (n, dim/2)
        # returned in the module's dtype so adding it to the embeddings does not promote them
        return torch.cat((angles.sin(), angles.cos()), dim=-1).to(self.anchor.dtype)


@POSITIONS.register("axial")
class AxialPosition(Configurable, nn.Module):
    """Axial positions (Ho et al. 2019, arXiv:1912.12180; the Reformer's default for long inputs).

    A position ``p`` is read as a multi-index ``(i_1, ..., i_k)`` in row-major order over ``shape``
    (``p = i_1 * s_2 * ... * s_k + ... + i_k``), and each axis has its own small table ``E_j``:

    - ``combine="sum"``: ``pos[p] = sum_j E_j[i_j]`` with every ``E_j`` of width ``dim`` (reformer-pytorch);
    - ``combine="concat"``: ``pos[p] = [E_1[i_1] | ... | E_k[i_k]]`` with widths ``dims`` summing to
      ``dim`` (HF Reformer).

    ``sum_j s_j * d_j`` parameters instead of ``prod_j s_j * dim``. Constraints: ``prod(shape) >=
    max_seq_len``; positions must be below ``prod(shape)``.
    """

    absolute = True
    rotary = False

    @dataclass(kw_only=True)
    class Config:
        shape: tuple[int, ...] | None = None  # axis lengths, product >= max_seq_len; None: about sqrt(L) each
        dims: tuple[int, ...] | None = None  # "concat" widths per axis (sum = dim); None: split dim evenly
        combine: str = "sum"  # "sum" (reformer-pytorch) or "concat" (HF Reformer)
        init_std: float = 0.02  # std of each axis table; small next to the token embeddings

    def __init__(
        self, cfg: AxialPosition.Config | None = None, *, dim: int, max_seq_len: int | None = None, dim_head=None
    ):
        """``max_seq_len`` sizes the default ``shape`` and is checked against a given one."""
        super().__init__()
        cfg = self.config_of(cfg)
        _check_positive("dim", dim)
        dims, combine, shape = cfg.dims, cfg.combine, cfg.shape
        if shape is None:
            if max_seq_len is None:
                raise ValueError("axial positions need shape=(...) in their Config, or max_seq_len to derive it")
            _check_positive("max_seq_len", max_seq_len)
            side = math.ceil(math.sqrt(max_seq_len))
            shape = (math.ceil(max_seq_len / side), side)
        shape = tuple(shape)
        if max_seq_len is not None and math.prod(shape) < max_seq_len:
            raise ValueError(
                f"axial shape={shape!r} covers {math.prod(shape)} positions, fewer than "
                f"max_seq_len={max_seq_len}; choose axis lengths whose product is >= max_seq_len"
            )
        if len(shape) < 1 or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in shape):
            raise ValueError(f"axial shape must be a tuple of positive ints such as (64, 64), got {shape!r}")
        if combine not in ("sum", "concat"):
            raise ValueError(f"axial combine must be 'sum' or 'concat', got {combine!r}")
        if combine == "sum":
            if dims is not None and any(d != dim for d in dims):
                raise ValueError(
                    f"axial combine='sum' adds tables of width dim={dim}, but dims={tuple(dims)!r}; "
                    "leave dims=None or use combine='concat'"
                )
            dims = (dim,) * len(shape)
        else:
            if dims is None:
                base, rest = divmod(dim, len(shape))
                dims = tuple(base + (1 if j < rest else 0) for j in range(len(shape)))
            dims = tuple(dims)
            if len(dims) != len(shape) or sum(dims) != dim or any(d <= 0 for d in dims):
                raise ValueError(
                    f"axial combine='concat' needs one positive width per axis summing to dim={dim}, got "
                    f"dims={dims!r} for shape={shape!r}"
                )
        self.shape, self.dims, self.combine, self.init_std = shape, dims, combine, cfg.init_std
        self.capacity = math.prod(shape)
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(s, d)) for s, d in zip(shape, dims))
        # strides[j] = prod(shape[j+1:]): the row-major place value of axis j
        strides = [math.prod(shape[j + 1 :]) for j in range(len(shape))]
        self.register_buffer("strides", torch.tensor(strides, dtype=torch.long), persistent=False)
        self.register_buffer("sizes", torch.tensor(shape, dtype=torch.long), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in self.weights:
            nn.init.normal_(w, std=self.init_std)

    def forward(self, positions: Tensor) -> Tensor:
        _check_positions(positions, self.capacity, f"prod(shape={self.shape})")
        index = (positions[:, None] // self.strides) % self.sizes  # (n, k) multi-index
        parts = [w[index[:, j]] for j, w in enumerate(self.weights)]
        if self.combine == "sum":
            return torch.stack(parts).sum(0)
        return torch.cat(parts, dim=-1)


class RotaryTable(NamedTuple):
    """``(cos, sin)`` phases, each ``(n, rot_dim)``, in the half-split (GPT-NeoX / Llama) layout."""

    cos: Tensor
    sin: Tensor

    @property
    def interleaved(self) -> bool:
        return False

    def apply(self, t: Tensor) -> Tensor:
        """Rotates the first ``rot_dim`` features of ``t`` (..., n, d); see :func:`apply_rotary`."""
        return apply_rotary(t, self.cos, self.sin, interleaved=self.interleaved)


class InterleavedRotaryTable(RotaryTable):
    """``(cos, sin)`` in the interleaved (GPT-J / reformer-pytorch) layout: pairs are adjacent features."""

    __slots__ = ()

    @property
    def interleaved(self) -> bool:
        return True


@POSITIONS.register("rotary")
class RotaryEmbedding(Configurable, nn.Module):
    """Rotary position embedding (Su et al. 2021, RoFormer, arXiv:2104.09864).

    Feature pairs ``(x_a, x_b)`` of queries and keys at position ``p`` are rotated by ``p * w_i`` with
    ``w_i = base^(-2i/r)``, ``i < r/2``, where ``r = rot_dim`` is ``fraction * dim_head`` rounded down to
    an even number; the remaining ``dim_head - r`` features pass through unrotated. Then
    ``<rot(q, p), rot(k, p')>`` depends only on ``p - p'``. ``interleaved`` picks which features pair up:

    - False: half-split (GPT-NeoX / Llama), pair ``(x_i, x_{i + r/2})``;
    - True: adjacent (GPT-J / reformer-pytorch), pair ``(x_{2i}, x_{2i+1})`` with ``(x1, x2) -> (-x2, x1)``.

    ``forward(positions)`` returns a :class:`RotaryTable` (or :class:`InterleavedRotaryTable`): a
    ``(cos, sin)`` pair, each ``(n, rot_dim)``, which also records the convention. No length limit.
    """

    absolute = False
    rotary = True

    @dataclass(kw_only=True)
    class Config:
        fraction: float = 1.0  # share of dim_head rotated; GPT-NeoX used 0.25, the rest carries content only
        base: float = 10000.0  # longest wavelength / (2 pi); larger values reach longer contexts
        interleaved: bool = False  # True: GPT-J / reformer-pytorch pairing, for porting their weights

    def __init__(self, cfg: RotaryEmbedding.Config | None = None, *, dim_head: int, dim=None, max_seq_len=None):
        super().__init__()
        cfg = self.config_of(cfg)
        fraction, base, interleaved = cfg.fraction, cfg.base, cfg.interleaved
        _check_positive("dim_head", dim_head)
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"rotary fraction must be in (0, 1], got {fraction!r}")
        rot_dim = int(dim_head * fraction) // 2 * 2
        if rot_dim < 2:
            raise ValueError(
                f"rotary fraction={fraction} of dim_head={dim_head} rotates {rot_dim} features; "
                "at least one pair is needed: raise fraction or dim_head"
            )
        _check_base(base)
        self.dim_head, self.rot_dim, self.base, self.interleaved = dim_head, rot_dim, base, interleaved
        self.register_buffer("anchor", torch.empty(0), persistent=False)  # follows .to(): dtype and device

    def forward(self, positions: Tensor) -> RotaryTable:
        _check_positions(positions, None, "")
        angles = _angles(positions, self.rot_dim, self.base, self.anchor)  # (n, r/2)
        if self.interleaved:
            angles = angles.repeat_interleave(2, dim=-1)  # w_0, w_0, w_1, w_1, ...
            return InterleavedRotaryTable(angles.cos(), angles.sin())
        angles = torch.cat((angles, angles), dim=-1)  # w_0 .. w_{r/2-1}, w_0 .. w_{r/2-1}
        return RotaryTable(angles.cos(), angles.sin())


def apply_rotary(t: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False) -> Tensor:
    """Rotates the first ``rot_dim = cos.shape[-1]`` features of ``t``: ``t * cos + rotate(t) * sin``.

    ``t`` is ``(..., n, d)`` with ``d >= rot_dim``; ``cos``/``sin`` are ``(n, rot_dim)`` (or broadcastable to
    ``(..., n, rot_dim)``). ``rotate`` maps each pair ``(x1, x2) -> (-x2, x1)``; pairs are
    ``(x_i, x_{i + r/2})`` (half-split) or ``(x_{2i}, x_{2i+1})`` when ``interleaved``. Features beyond
    ``rot_dim`` are returned unchanged. The phases are cast to ``t.dtype``.
    """
    rot_dim = cos.shape[-1]
    if sin.shape != cos.shape:
        raise ValueError(f"rotary cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if rot_dim % 2 or rot_dim > t.shape[-1]:
        raise ValueError(
            f"rotary tables of width {rot_dim} do not fit features of width {t.shape[-1]}; "
            "rot_dim must be even and at most dim_head"
        )
    if cos.shape[-2] != t.shape[-2]:
        raise ValueError(
            f"rotary tables cover {cos.shape[-2]} positions but the input has {t.shape[-2]}; "
            "build them from the positions of exactly these tokens"
        )
    cos, sin = cos.to(t.dtype), sin.to(t.dtype)
    rot, rest = t[..., :rot_dim], t[..., rot_dim:]
    if interleaved:
        pairs = rot.unflatten(-1, (rot_dim // 2, 2))
        turned = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    else:
        x1, x2 = rot.chunk(2, dim=-1)
        turned = torch.cat((-x2, x1), dim=-1)
    out = rot * cos + turned * sin
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def _angles(positions: Tensor, width: int, base: float, anchor: Tensor) -> Tensor:
    """``p * w_i`` with ``w_i = base^(-2i/width)``, ``i < width/2``: ``(n, width/2)``.

    Computed in float64 for a float64 module (exact tables) and in float32 otherwise: angles reach 1e4+
    radians on long inputs, where half precision would be wrong by whole radians.
    """
    dtype = torch.float64 if anchor.dtype == torch.float64 else torch.float32
    inv_freq = base ** (-torch.arange(0, width, 2, dtype=dtype, device=anchor.device) / width)
    return positions.to(dtype)[:, None] * inv_freq[None, :]


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_base(base: float) -> None:
    if isinstance(base, bool) or not isinstance(base, int | float) or base <= 1:
        raise ValueError(f"position base must be a number > 1 (10000 is usual), got {base!r}")
