"""The ReZero paper's deep fully connected experiment (Bachlechner et al. 2020, Section 4.1).

Four ways to stack ``depth`` width-``w`` ReLU layers, with the inits of the paper's notebook
(``xavier_normal`` weights, gain ``g``, zero biases):

- vanilla:   ``x <- relu(W x)``,            g = sqrt(2)
- residual:  ``x <- x + relu(W x)``,        g = sqrt(0.25)
- layernorm: ``x <- LN(relu(W x))``,        g = sqrt(2)
- rezero:    ``x <- x + a_i relu(W x)``,    g = sqrt(2), ``a_i = 0`` at init (every layer is the identity)

followed by a linear classifier. The paper trains on CIFAR-10; to stay self-contained the study draws
inputs ``x ~ N(0, I_w)`` and labels them with a fixed random teacher, ``y = argmax(V tanh(U x / sqrt(w)))``
(10 classes, so chance cross-entropy is ln 10 = 2.30). Training is Adagrad at lr 0.01, batch 100,
as in the paper. This is not language-model training, so it has its own ten-line loop.

Very deep networks take a separate rate for the hidden layers (``layer_lr``, the same for every
variant): Adagrad's first step moves every parameter by the full rate, and at ReZero's init the moves
of the ``depth`` gates ``a_i`` all lower the loss along the same direction, so the function changes by
about ``depth x layer_lr`` at once. At 10,000 layers a rate of 1e-2 is a change of order 100 and the
loss overflows; ``layer_lr = 1e-4`` keeps it of order 1 while the classifier learns at the full rate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VARIANTS = ("vanilla", "residual", "layernorm", "rezero")
GAINS = {"vanilla": math.sqrt(2.0), "residual": math.sqrt(0.25), "layernorm": math.sqrt(2.0), "rezero": math.sqrt(2.0)}


def teacher_data(
    n: int = 20_000, dim: int = 256, classes: int = 10, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """``n`` inputs ``x ~ N(0, I)`` and the labels of a fixed random 2-layer tanh teacher."""
    g = torch.Generator().manual_seed(10_000 + seed)
    x = torch.randn(n, dim, generator=g)
    u = torch.randn(dim, dim, generator=g)
    v = torch.randn(dim, classes, generator=g)
    y = (torch.tanh(x @ u / math.sqrt(dim)) @ v).argmax(-1)
    return x, y


class FCNet(nn.Module):
    """``depth`` fully connected ReLU layers of one of the four ``VARIANTS``, then a linear classifier."""

    def __init__(self, variant: str, depth: int, width: int = 256, classes: int = 10):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant={variant!r} is not a fully connected variant; choose from {VARIANTS}")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive integer (number of hidden layers), got {depth!r}")
        self.variant = variant
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        for layer in self.layers:
            nn.init.xavier_normal_(layer.weight, gain=GAINS[variant])
            nn.init.zeros_(layer.bias)
        self.alpha = nn.Parameter(torch.zeros(depth)) if variant == "rezero" else None
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        if self.variant == "rezero":
            # one unbind, not alpha[i] per layer: indexing's backward writes a depth-long gradient at every
            # layer, O(depth^2) per step (at 10,000 layers most of the step)
            for layer, a in zip(self.layers, self.alpha.unbind(0)):
                x = x + a * F.relu(layer(x))
            return self.head(x)
        for layer in self.layers:
            h = F.relu(layer(x))
            if self.variant == "vanilla":
                x = h
            elif self.variant == "residual":
                x = x + h
            else:
                x = F.layer_norm(h, h.shape[-1:])
        return self.head(x)


def train_fc(
    variant: str,
    depth: int,
    *,
    steps: int,
    seed: int = 0,
    width: int = 256,
    batch_size: int = 100,
    lr: float = 0.01,
    layer_lr: float | None = None,
    data: tuple[Tensor, Tensor] | None = None,
    progress: bool = False,
) -> list[float]:
    """Train loss (cross-entropy, nats) at every step; training stops at the first non-finite loss.

    ``lr`` is the Adagrad rate of the classifier, ``layer_lr`` that of the hidden layers and ReZero's
    gates (default: ``lr``).
    """
    from tqdm.auto import tqdm

    for name, v in (("steps", steps), ("batch_size", batch_size), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    x, y = data if data is not None else teacher_data(dim=width, seed=0)
    torch.manual_seed(seed)
    net = FCNet(variant, depth, width=width, classes=int(y.max()) + 1)
    hidden = [p for name, p in net.named_parameters() if not name.startswith("head.")]
    opt = torch.optim.Adagrad(
        [{"params": hidden, "lr": lr if layer_lr is None else layer_lr}, {"params": net.head.parameters()}], lr=lr
    )
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    losses: list[float] = []
    pos = 0
    for _ in tqdm(range(steps), desc=f"fc {variant} L{depth}", leave=False, disable=not progress):
        if pos + batch_size > len(x):
            order, pos = torch.randperm(len(x), generator=g), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        loss = F.cross_entropy(net(x[idx]), y[idx])
        if not torch.isfinite(loss):
            losses.append(math.nan)
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def run_fc(
    depths: tuple[int, ...], steps: int, *, seed: int = 0, width: int = 256, lr: float = 0.01,
    layer_lr: float | None = None, progress: bool = False
) -> dict[str, dict[str, list[float]]]:
    """``{str(depth): {variant: losses}}`` for every variant at every depth (one shared dataset)."""
    data = teacher_data(dim=width, seed=0)
    return {
        str(d): {v: train_fc(v, d, steps=steps, seed=seed, width=width, lr=lr, layer_lr=layer_lr, data=data,
                             progress=progress)
                 for v in VARIANTS}
        for d in depths
    }


def time_fc_step(variant: str, depth: int, *, width: int = 256, batch_size: int = 100, steps: int = 2) -> float:
    """Seconds per training step of one variant on this machine (median of ``steps`` after one untimed)."""
    import time

    net = FCNet(variant, depth, width=width)
    opt = torch.optim.Adagrad(net.parameters(), lr=1e-4)
    x, y = torch.randn(batch_size, width), torch.randint(0, 10, (batch_size,))
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
