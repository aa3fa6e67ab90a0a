"""Transformer blocks: what a configuration computes is one residual class plus one attention class.

::

    Block:       x -> res_attn(x, attn) -> res_ff(x, ff)
    CrossBlock:  x -> res_attn(x, attn) -> res_cross(x, cross, context) -> res_ff(x, ff)

The residual scheme decides where the norm goes and how the skip is scaled; the block only says
which branch feeds which residual.
"""

from __future__ import annotations

from torch import Tensor, nn

from anydepth.nn.residual import Residual


class Block(nn.Module):
    """One self-attention sublayer and one feed-forward sublayer."""

    def __init__(self, attn: nn.Module, res_attn: Residual, ff: nn.Module, res_ff: Residual):
        super().__init__()
        self.attn, self.res_attn, self.ff, self.res_ff = attn, res_attn, ff, res_ff

    def forward(self, x: Tensor, **attn_kw) -> Tensor:
        x = self.res_attn(x, self.attn, **attn_kw)
        return self.res_ff(x, self.ff)

    @property
    def first_residual(self) -> Residual:
        return self.res_attn

    def residuals(self) -> list[Residual]:
        return [self.res_attn, self.res_ff]

    def branches(self) -> list[nn.Module]:
        return [self.attn, self.ff]

    def f_delta(self, x: Tensor, **attn_kw) -> Tensor:
        """Additive update of the attention sublayer: ``res_attn(x, attn) - x`` (reversible F)."""
        return self.res_attn.delta(x, self.attn, **attn_kw)

    def g_delta(self, x: Tensor) -> Tensor:
        """Additive update of the feed-forward sublayer (reversible G)."""
        return self.res_ff.delta(x, self.ff)


class CrossBlock(Block):
    """Self-attention, cross-attention to an encoder's output, then feed-forward (a decoder block)."""

    def __init__(self, attn, res_attn, cross: nn.Module, res_cross: Residual, ff, res_ff):
        super().__init__(attn, res_attn, ff, res_ff)
        self.cross, self.res_cross = cross, res_cross

    def forward(self, x: Tensor, *, context: Tensor, context_mask: Tensor | None = None, cache=None, **kw) -> Tensor:
        x = self.res_attn(x, self.attn, cache=cache, **kw)
        x = self.res_cross(x, self.cross, context=context, context_mask=context_mask, cache=_cross_cache(cache))
        return self.res_ff(x, self.ff)

    def residuals(self) -> list[Residual]:
        return [self.res_attn, self.res_cross, self.res_ff]

    def branches(self) -> list[nn.Module]:
        return [self.attn, self.cross, self.ff]

    def f_delta(self, x: Tensor, *, context: Tensor, context_mask: Tensor | None = None, cache=None, **kw) -> Tensor:
        d = self.res_attn.delta(x, self.attn, cache=cache, **kw)
        return d + self.res_cross.delta(
            x + d, self.cross, context=context, context_mask=context_mask, cache=_cross_cache(cache)
        )


def _cross_cache(cache: dict | None) -> dict | None:
    # The encoder output is fixed while decoding: its keys/values are projected once and kept here.
    return None if cache is None else cache.setdefault("cross", {})
