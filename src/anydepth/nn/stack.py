"""Executors over a list of blocks: sequential, and reversible (activations recomputed in backward).

Both hold the blocks as ``self.blocks``, so a state dict moves between them unchanged (the
reversible ``merge="concat"`` option adds one projection, ``merge``). Blocks provide::

    block(x, **kw)            # the block applied to the residual
    block.f_delta(x, **kw)    # the additive update of its attention sublayers (reversible F)
    block.g_delta(x)          # the additive update of its feed-forward sublayer (reversible G)
    block.first_residual      # whose expand()/reduce() give the stream shape (hyper-connections)

Each is built from its ``Config`` plus ``blocks`` and ``dim`` (``STACKS.build(cfg, blocks=..., dim=...)``,
``ReversibleStack(ReversibleStack.Config(merge="concat"), blocks=..., dim=...)`` or
``ReversibleStack.make(blocks=..., dim=..., merge="concat")``). A keyword ``cache`` is a list with one dict
per block (incremental decoding); every other keyword goes to every block unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from anydepth.nn.registry import STACKS, Configurable
from anydepth.nn.reversible import reversible_apply


def _check_layer_dropout(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"layer_dropout must be in [0, 1), got {p!r}; 0 disables LayerDrop")


def _kept_blocks(blocks: nn.ModuleList, p: float, training: bool) -> list[int]:
    """LayerDrop (Fan et al. 2019): each block skipped with probability p in training, at least one kept."""
    n = len(blocks)
    if not training or p == 0.0:
        return list(range(n))
    keep = torch.rand(n) >= p
    if not keep.any():
        keep[torch.randint(n, ())] = True
    return [i for i in range(n) if keep[i]]


def _per_block(kw: dict, cache: list | None, i: int) -> dict:
    return kw if cache is None else {**kw, "cache": cache[i]}


@STACKS.register("sequential")
class SequentialStack(Configurable, nn.Module):
    """``x = block_L(... block_1(x))``: ordinary autograd, activation memory grows with depth."""

    @dataclass(kw_only=True)
    class Config:
        layer_dropout: float = 0.0  # LayerDrop: regularises and lets the model be pruned in depth later

    def __init__(self, cfg: SequentialStack.Config | None = None, *, blocks: nn.ModuleList, dim: int | None = None):
        super().__init__()
        self.layer_dropout = self.config_of(cfg).layer_dropout
        _check_layer_dropout(self.layer_dropout)
        self.blocks = blocks

    def forward(self, x: Tensor, cache: list | None = None, **kw) -> Tensor:
        first = self.blocks[0].first_residual
        x = first.expand(x)
        for i in _kept_blocks(self.blocks, self.layer_dropout, self.training):
            x = self.blocks[i](x, **_per_block(kw, cache, i))
        return first.reduce(x)


@STACKS.register("dense")
class DenseStack(Configurable, nn.Module):
    """DenseFormer: a depth-weighted average (DWA) of the embedding and every earlier block output after
    each block (Pagliardini et al. 2024, "DenseFormer: Enhancing Information Flow in Transformers via
    Depth Weighted Averaging", arXiv 2402.02622)::

        X_0 = x,   X_i = block_i(Y_{i-1}),   Y_i = sum_{j <= i} alpha_{i,j} X_j   (Y_0 = X_0)

    with learned scalars ``alpha`` initialised to the identity (``alpha_{i,i} = 1``, all others 0), so
    at init ``Y_i = X_i`` and the stack is exactly the sequential one. ``dilation = k`` keeps only the
    outputs ``j`` with ``i - j`` a multiple of k, and ``period = p`` averages only after every p-th block
    (the paper's DxPy variants, which cut the O(L^2) weights and adds); the last block always averages.
    Activation memory is that of the sequential stack (the outputs are held for backward anyway); the
    extra work is ``L (L + 1) / (2 k p)`` scaled adds of the residual. The weights stay out of weight
    decay, which would pull them away from the identity towards zero.
    """

    @dataclass(kw_only=True)
    class Config:
        dilation: int = 1  # average over every k-th earlier output only (DenseFormer's k)
        period: int = 1  # average after every p-th block only (DenseFormer's p)

    def __init__(self, cfg: DenseStack.Config | None = None, *, blocks: nn.ModuleList, dim: int | None = None):
        super().__init__()
        cfg = self.config_of(cfg)
        dilation, period = cfg.dilation, cfg.period
        for name, v in (("dilation", dilation), ("period", period)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"dense stack {name} must be an int >= 1 (1 averages over all), got {v!r}")
        self.blocks = blocks
        self.dilation, self.period = dilation, period
        n = len(blocks)
        # sources[i]: indices j of X_j averaged after block i (X_{i+1} is block i's output); None: no DWA
        self.sources: list[list[int] | None] = []
        weights = []
        for i in range(n):
            if (i + 1) % period and i != n - 1:
                self.sources.append(None)
                continue
            js = [j for j in range(i + 2) if (i + 1 - j) % dilation == 0]
            self.sources.append(js)
            weights.append(nn.Parameter(torch.empty(len(js))))
        self.dwa = nn.ParameterList(weights)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for w in self.dwa:
                w.zero_()
                w[-1] = 1.0  # the newest output: identity init

    def no_weight_decay(self) -> list[nn.Parameter]:
        return list(self.dwa)

    def forward(self, x: Tensor, cache: list | None = None, **kw) -> Tensor:
        first = self.blocks[0].first_residual
        x = first.expand(x)
        outs = [x]
        k = 0
        for i, block in enumerate(self.blocks):
            x = block(x, **_per_block(kw, cache, i))
            outs.append(x)
            js = self.sources[i]
            if js is None:
                continue
            w = self.dwa[k].to(x.dtype)
            k += 1
            # a running sum keeps one reference per output for backward instead of a stacked copy
            x = outs[js[0]] * w[0]
            for t, j in enumerate(js[1:], 1):
                x = x + outs[j] * w[t]
        return first.reduce(x)

    def extra_repr(self) -> str:
        return f"dilation={self.dilation}, period={self.period}"


@STACKS.register("reversible")
class ReversibleStack(Configurable, nn.Module):
    """Reversible residual coupling over the blocks (RevNet; Reformer, Kitaev et al. 2020)::

        x1 = x2 = x
        y1 = x1 + F(x2),  y2 = x2 + G(y1)        per block; F = attention, G = feed-forward
        out = (y1 + y2) / 2                       merge="mean" (reformer-pytorch)
        out = W [y1; y2]                          merge="concat"

    Activations are recomputed in backward, so training memory is flat in depth. Requires additive,
    single-stream residual schemes (prenorm, rezero, layerscale); the model builder's rule table
    rejects the rest. Sequences of at most ``reverse_thres`` tokens, incremental decoding and
    no-grad calls run the same coupling with ordinary autograd, which is faster. Under ``torch.compile``
    each block is checkpointed (``torch.utils.checkpoint``, non-reentrant) instead: the same gradients
    and dropout masks, one graph, and each block's two input halves kept (memory linear in depth, in
    two tensors per block).
    """

    @dataclass(kw_only=True)
    class Config:
        merge: str = "mean"  # how the two halves become one residual: "mean" (reformer-pytorch) or "concat"
        layer_dropout: float = 0.0  # LayerDrop over whole reversible blocks; gradients reach every kept block
        reverse_thres: int = 0  # run irreversibly (faster, more memory) up to this many tokens

    def __init__(self, cfg: ReversibleStack.Config | None = None, *, blocks: nn.ModuleList, dim: int):
        super().__init__()
        cfg = self.config_of(cfg)
        merge, layer_dropout, reverse_thres = cfg.merge, cfg.layer_dropout, cfg.reverse_thres
        if merge not in ("mean", "concat"):
            raise ValueError(f"merge must be 'mean' or 'concat', got {merge!r}")
        _check_layer_dropout(layer_dropout)
        if reverse_thres < 0:
            raise ValueError(f"reverse_thres must be >= 0, got {reverse_thres!r}")
        self.blocks = blocks
        self.layer_dropout = layer_dropout
        self.reverse_thres = reverse_thres
        self.merge_kind = merge
        self.merge = nn.Linear(2 * dim, dim, bias=False) if merge == "concat" else None
        if self.merge is not None:
            with torch.no_grad():  # starts as the mean of the halves, like merge="mean"
                self.merge.weight.copy_(torch.cat([torch.eye(dim), torch.eye(dim)], dim=1) / 2)

    def forward(self, x: Tensor, cache: list | None = None, **kw) -> Tensor:
        kept = _kept_blocks(self.blocks, self.layer_dropout, self.training)
        fs = [partial(self.blocks[i].f_delta, **_per_block(kw, cache, i)) for i in kept]
        gs = [self.blocks[i].g_delta for i in kept]
        # RNG states are recorded (and replayed by the recomputation) only where a block draws random
        # numbers: torch.get_rng_state costs two copies per block, and is a graph break under torch.compile
        random = self.training and any(_draws_random(m) for i in kept for m in self.blocks[i].modules())
        if cache is not None or x.shape[1] <= self.reverse_thres:
            x1, x2 = x, x
            for f, g in zip(fs, gs):
                x1 = x1 + f(x2)
                x2 = x2 + g(x1)
        elif torch.compiler.is_compiling() and torch.is_grad_enabled():
            # dynamo traces a Function's backward while it traces the forward, and the reversible
            # Function's backward takes its block's input from the next block's backward: under
            # torch.compile each block is checkpointed instead
            x1, x2 = x, x
            for f, g in zip(fs, gs):
                x1, x2 = checkpoint(_coupling, f, g, x1, x2, use_reentrant=False, preserve_rng_state=random)
        else:
            params = [list(self.blocks[i].parameters()) for i in kept]
            x1, x2 = reversible_apply(x, x, fs, gs, params, extra=_tensors_needing_grad(kw), training=random)
        if self.merge is None:
            return (x1 + x2) / 2
        return self.merge(torch.cat([x1, x2], dim=-1))


_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def _draws_random(module: nn.Module) -> bool:
    """Whether ``module``'s forward in training may draw from torch's RNG: a dropout module with
    ``p > 0``, a float ``*dropout*`` rate above 0 (attention's, LSH's), or LSH attention without a
    fixed ``seed`` (its random rotations)."""
    from anydepth.nn.lsh import LSHAttention

    if isinstance(module, _DROPOUTS):
        return module.p > 0
    if isinstance(module, LSHAttention) and module.seed is None:
        return True
    return any("dropout" in k and isinstance(v, float) and v > 0 for k, v in vars(module).items())


def _coupling(f, g, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
    y1 = x1 + f(x2)
    return y1, x2 + g(y1)


def _tensors_needing_grad(obj) -> list[Tensor]:
    """Tensors inside keyword arguments (encoder output, ...) that must receive gradients."""
    if isinstance(obj, Tensor):
        return [obj] if obj.requires_grad else []
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors_needing_grad(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors_needing_grad(v)]
    return []
