"""Admin's amplification measurement (Liu et al., "Understanding the Difficulty of Training
Transformers", EMNLP 2020, Section 4 and Theorem 2).

At initialisation, perturb the residual branches' weights, ``W* = W + delta``, and measure how much the
model's output moves. Theorem 2 gives, for N residual sublayers whose branch outputs have comparable
variance,

    Var[F(x, W) - F(x, W*)]  ~  sum_i beta_i * C,     beta_i = Var[f_i] / Var[pre-norm sum at i]

so post-LN (``beta_i = 1/2`` at every layer) moves O(N), while pre-LN and Admin (``beta_i ~ 1/i``)
move O(log N).

The study's measurement follows that definition:

- the output ``F`` is the final hidden state (what the head reads), not the logits, whose scale is the
  embedding's and says nothing about depth;
- the change is *relative*: ``E||F(x,W) - F(x,W*)||^2 / E||F(x,W)||^2``, so schemes whose outputs have
  different scales (pre-LN's final norm, post-LN's last block norm) compare;
- only the branches' weight matrices are perturbed, each relative to its own scale:
  ``delta ~ N(0, (sigma * rms(W))^2)``. Embeddings, positions and norm gains are left alone: their change
  does not pass through more layers as the model gets deeper.

``linear_chain`` is the exact construction: linear branches ``f_i(x) = W_i x`` with ``W_i ~ N(0, 1/d)``
and LayerNorm, where the theorem's assumptions hold and the expected change has a closed form
(``theory_linear_chain``): ``N sigma^2 / 2`` for post-LN, ``sigma^2 (H_{N+1} - 1)`` for pre-LN and for
Admin with its profiled ``omega_i^2 = i``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Perturbable = Callable[[str, nn.Parameter], bool]


def _not_embedding(name: str, p: nn.Parameter) -> bool:
    return "emb" not in name


def branch_weight(name: str, p: nn.Parameter) -> bool:
    """The residual branches' weight matrices: 2-D parameters inside the blocks (no norms, no biases,
    no embeddings or head)."""
    return p.dim() == 2 and (".blocks." in f".{name}" or name.startswith("blocks."))


@torch.no_grad()
def output_change(
    model: nn.Module,
    inputs: Tensor,
    *,
    sigma: float = 1e-3,
    draws: int = 4,
    seed: int = 0,
    perturb: Perturbable = _not_embedding,
    relative: bool = False,
    output: Callable[[nn.Module, Tensor], Tensor] | None = None,
) -> float:
    """``E ||F(x, W) - F(x, W + delta)||^2`` over draws of ``delta`` on the selected parameters.

    ``delta ~ N(0, sigma^2)``, or with ``relative=True`` ``N(0, (sigma * rms(p))^2)`` per parameter and the
    change divided by ``E ||F(x, W)||^2``. ``output(model, inputs)`` (default ``model(inputs)``) must return
    ``(..., features)``; the squared norm is over the last dimension, the mean over everything else and
    over the draws. The weights are restored bit for bit afterwards.
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be positive (std of the weight perturbation), got {sigma!r}")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be a positive integer (perturbations to average), got {draws!r}")
    params = [p for name, p in model.named_parameters() if perturb(name, p)]
    if not params:
        raise ValueError("no parameter was selected by perturb(); nothing would change")
    forward = output or (lambda m, x: m(x))
    was_training = model.training
    model.eval()
    base = forward(model, inputs).double()
    saved = [p.detach().clone() for p in params]  # (W + d) - d is not W in floating point: restore copies
    scales = [float(p.detach().double().pow(2).mean().sqrt()) * sigma if relative else sigma for p in params]
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    try:
        for _ in range(draws):
            for p, s in zip(params, scales):
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * s)
            total += (forward(model, inputs).double() - base).pow(2).sum(-1).mean().item()
            for p, w in zip(params, saved):
                p.copy_(w)
    finally:
        for p, w in zip(params, saved):
            p.copy_(w)
        model.train(was_training)
    change = total / draws
    return change / base.pow(2).sum(-1).mean().item() if relative else change


def final_hidden(model: nn.Module, tokens: Tensor) -> Tensor:
    """The hidden state the LM head reads (after the final norm, if the model has one)."""
    out: list[Tensor] = []
    handle = model.head.register_forward_pre_hook(lambda m, args: out.append(args[0]))
    try:
        model(tokens)
    finally:
        handle.remove()
    return out[0]


# ------------------------------------------------------------------------------------------------------
# The exact construction


class LinearChain(nn.Module):
    """``depth`` residual sublayers with linear branches ``f_i(x) = W_i x``, ``W_i ~ N(0, 1/d)``:

    - ``postln``: ``x_i = LN(x_{i-1} + W_i x_{i-1})``
    - ``admin``:  ``x_i = LN(omega_i x_{i-1} + W_i x_{i-1})``, ``omega_i = sqrt(i)`` (the profiled init
      ``omega_{i+1}^2 = Var[omega_i x] + Var[f_i]`` with unit-variance inputs)
    - ``preln``:  ``x_i = x_{i-1} + W_i LN(x_{i-1})``, output ``LN(x_N)``

    LayerNorm without gain or bias, so every branch has the variance of its input, as Theorem 2 assumes.
    """

    def __init__(self, scheme: str, depth: int, width: int):
        super().__init__()
        if scheme not in ("postln", "admin", "preln"):
            raise ValueError(f"scheme={scheme!r} is not one of the chain's schemes postln, admin, preln")
        self.scheme = scheme
        self.blocks = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(depth))
        for b in self.blocks:
            nn.init.normal_(b.weight, std=1 / math.sqrt(width))

    def forward(self, x: Tensor) -> Tensor:
        ln = lambda t: F.layer_norm(t, t.shape[-1:])  # noqa: E731
        for i, b in enumerate(self.blocks, start=1):
            if self.scheme == "postln":
                x = ln(x + b(x))
            elif self.scheme == "admin":
                x = ln(math.sqrt(i) * x + b(x))
            else:
                x = x + b(ln(x))
        return ln(x) if self.scheme == "preln" else x


def theory_linear_chain(scheme: str, depth: int, sigma: float) -> float:
    """First-order relative output change of ``LinearChain`` under ``delta ~ N(0, (sigma/sqrt(d))^2)``:
    ``N sigma^2 / 2`` (post-LN) or ``sigma^2 sum_{i=1}^{N} 1/(i+1)`` (pre-LN, Admin)."""
    if scheme == "postln":
        return depth * sigma**2 / 2
    return sigma**2 * sum(1 / (i + 1) for i in range(1, depth + 1))


def linear_chain_change(
    scheme: str, depth: int, *, width: int = 256, batch: int = 64, sigma: float = 0.05, draws: int = 8, seed: int = 0
) -> float:
    """Relative output change of ``LinearChain`` measured the way the study measures Model S."""
    torch.manual_seed(seed)
    chain = LinearChain(scheme, depth, width).double()
    x = torch.randn(batch, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return output_change(chain, x, sigma=sigma, draws=draws, seed=seed, perturb=branch_weight, relative=True)


# ------------------------------------------------------------------------------------------------------
# Model S

# Study schemes compared by AD-2 and the presets they use.
OUTPUT_CHANGE_SCHEMES = ("postln", "preln", "admin")


def measure(
    depths: tuple[int, ...],
    *,
    schemes: tuple[str, ...] = OUTPUT_CHANGE_SCHEMES,
    build: Callable[[str, int], nn.Module] | None = None,
    batch_size: int = 8,
    seq_len: int = 64,
    vocab_size: int = 256,
    sigma: float = 0.05,
    draws: int = 4,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """``{scheme: {str(depth): relative change}}`` for Model S of each scheme, plus ``{"chain-<scheme>":
    ...}`` for the exact construction at the same depths (random byte inputs, seed-fixed)."""
    build = build or _build_model_s
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (batch_size, seq_len), generator=g)
    out: dict[str, dict[str, float]] = {}
    for scheme in schemes:
        out[scheme] = {}
        for depth in depths:
            torch.manual_seed(seed)
            model = build(scheme, depth)
            out[scheme][str(depth)] = output_change(
                model, tokens, sigma=sigma, draws=draws, seed=seed, perturb=branch_weight, relative=True,
                output=final_hidden,
            )
    for scheme in OUTPUT_CHANGE_SCHEMES:
        out[f"chain-{scheme}"] = {str(d): linear_chain_change(scheme, d, sigma=sigma, seed=seed) for d in depths}
    return out


def _build_model_s(scheme: str, depth: int) -> nn.Module:
    from anydepth.model.build import build_model
    from anydepth.model.presets import get
    from anydepth.study.sweep import MODEL_S, SCHEMES

    s = SCHEMES[scheme]
    return build_model(get(s.preset, **MODEL_S, **s.overrides, depth=depth))
