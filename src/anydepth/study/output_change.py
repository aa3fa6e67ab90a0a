"""Admin's amplification measurement (Liu et al., "Understanding the Difficulty of Training
Transformers", EMNLP 2020, Section 4).

At initialisation, perturb every weight of the residual blocks by ``delta ~ N(0, sigma^2)`` and measure
the output change

    C(L) = E_x E_delta || F(x, W) - F(x, W + delta) ||^2

(squared L2 norm over the output vector, averaged over positions, inputs and perturbation draws).
Admin's analysis: post-LN depends heavily on its residual branches, so C grows as O(L); Admin's
``omega`` shortcut scaling brings it to O(log L); pre-LN stays at or below Admin.

The embeddings (and the output head tied to them) are not perturbed: their change does not pass
through more layers as the model gets deeper, so it would only add a depth-independent floor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

Perturbable = Callable[[str, nn.Parameter], bool]


def _not_embedding(name: str, p: nn.Parameter) -> bool:
    return "emb" not in name


@torch.no_grad()
def output_change(
    model: nn.Module,
    inputs: Tensor,
    *,
    sigma: float = 1e-3,
    draws: int = 4,
    seed: int = 0,
    perturb: Perturbable = _not_embedding,
) -> float:
    """``E ||F(x, W) - F(x, W + delta)||^2`` with ``delta ~ N(0, sigma^2)`` on the selected parameters.

    ``model(inputs)`` must return ``(..., features)``; the squared norm is over the last dimension and
    the mean over everything else and over ``draws`` perturbations. The weights are restored after.
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be positive (std of the weight perturbation), got {sigma!r}")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be a positive integer (perturbations to average), got {draws!r}")
    params = [p for name, p in model.named_parameters() if perturb(name, p)]
    if not params:
        raise ValueError("no parameter was selected by perturb(); nothing would change")
    was_training = model.training
    model.eval()
    base = model(inputs).double()
    saved = [p.detach().clone() for p in params]  # (W + d) - d is not W in floating point: restore copies
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    try:
        for _ in range(draws):
            for p in params:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * sigma)
            total += (model(inputs).double() - base).pow(2).sum(-1).mean().item()
            for p, w in zip(params, saved):
                p.copy_(w)
    finally:
        for p, w in zip(params, saved):
            p.copy_(w)
        model.train(was_training)
    return total / draws


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
    draws: int = 4,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """``{scheme: {str(depth): C(depth)}}`` for Model S of each scheme (random byte inputs, seed-fixed)."""
    build = build or _build_model_s
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (batch_size, seq_len), generator=g)
    out: dict[str, dict[str, float]] = {}
    for scheme in schemes:
        out[scheme] = {}
        for depth in depths:
            torch.manual_seed(seed)
            model = build(scheme, depth)
            out[scheme][str(depth)] = output_change(model, tokens, draws=draws, seed=seed)
    return out


def _build_model_s(scheme: str, depth: int) -> nn.Module:
    from anydepth.model.build import build_model
    from anydepth.model.presets import get
    from anydepth.study.sweep import MODEL_S, SCHEMES

    s = SCHEMES[scheme]
    return build_model(get(s.preset, **MODEL_S, **s.overrides, depth=depth))
