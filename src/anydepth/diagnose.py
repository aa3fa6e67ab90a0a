"""Depth diagnostics: per-sublayer signals of a model at one forward and backward, and named findings.

:func:`diagnose` runs the model on a few batches with forward hooks on every residual sublayer and
its branch, and one ``torch.autograd.grad`` call (the parameters' ``.grad`` are never touched, and
the random-number streams are restored afterwards). For sublayer ``i`` (attention, cross-attention
or feed-forward of block ``i // 2``) it reports:

==================== ==========================================================================
``stream_rms``       ``RMS(x_i)``, the residual stream after the sublayer (all streams of a
                     hyper-connection together)
``branch_rms``       ``RMS(F_i(.))``, the branch's output before any gate or skip scale
``grad_norm``        ``||dL/dtheta_i||_2`` over the sublayer's parameters (branch, its norm and
                     gates), ``L`` the mean next-token cross-entropy over all batches
``stream_grad_rms``  ``RMS(dL/dx_i)``, the gradient that reaches the stream there
``attn_logit_max``   ``max |q . k| / sqrt(d)`` over the pairs a query may attend (attention
                     sublayers of the full and local kinds)
``residual_weights`` the scheme's learned or fixed residual weights (ReZero ``a``, LayerScale
                     ``mean |g|``, Admin ``mean w``, DeepNorm ``alpha``, hyper-connection
                     ``mean B`` and the Amax gain of the sublayer's own mixing matrix)
==================== ==========================================================================

and for the model: Admin's output change ``E ||F(x, W) - F(x, W + delta)||^2`` under
``delta ~ N(0, 1e-3^2)`` (Liu et al. 2020; :func:`anydepth.study.output_change.output_change`), the
largest attention logit (Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer
training instabilities"), and for hyper-connections and mHC the Amax gain of the composite residual
mixing ``P = A_r(L)^T ... A_r(1)^T`` (largest absolute row or column sum, per token, maximum over
tokens; DeepSeek-AI 2025, "mHC").

:data:`RULES` turns the signals into named :class:`Finding` objects, each a fixed threshold on one
measured ratio or value; :func:`findings` returns them for a model and batches.

Limits: a reversible stack calls its residuals' ``delta``, not the residual itself, so only the
branch quantities are measured there (the stream columns are ``None``); LSH attention's logits are
not measured (its buckets are drawn at random).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Report",
    "Finding",
    "Rule",
    "RULES",
    "diagnose",
    "findings",
    "evaluate_rules",
    "amax_gain",
    "sublayers",
    "residual_weights",
    "write_report",
    "plot_report",
    "plot_profiles",
]

OUTPUT_CHANGE_SIGMA = 1e-3  # std of Admin's weight perturbation (Liu et al. 2020 measure at a fixed small step)
QUANTITIES = ("stream_rms", "branch_rms", "grad_norm", "stream_grad_rms")


@dataclass
class Finding:
    """One named rule that fired: ``value`` crossed ``threshold``; ``message`` says what to change."""

    name: str
    message: str
    value: float
    threshold: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Report:
    """Per-sublayer lists (one entry per residual sublayer, in the order they run) and model values."""

    names: list[str]
    kinds: list[str]
    block: list[int]
    stream_rms: list[float | None]
    branch_rms: list[float | None]
    grad_norm: list[float]
    stream_grad_rms: list[float | None]
    attn_logit_max: list[float | None]
    residual_weights: list[dict[str, float]]
    loss: float
    output_change: float | None = None
    relative_output_change: float | None = None
    max_attention_logit: float | None = None
    amax_gain: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    def block_grad_norm(self) -> list[float]:
        """``||dL/dtheta||`` over each block's sublayers: ``sqrt(sum of the sublayers' squares)``."""
        n = max(self.block) + 1 if self.block else 0
        sq = [0.0] * n
        for b, g in zip(self.block, self.grad_norm):
            sq[b] += g * g
        return [math.sqrt(s) for s in sq]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["block_grad_norm"] = self.block_grad_norm()
        return _finite_json(d)

    def verdict(self) -> str:
        """A few lines: the model, the headline ratios and every finding (or that none fired)."""
        m = self.meta
        head = f"{m.get('residual', '?')} at {m.get('depth', '?')} blocks ({len(self.names)} sublayers)"
        lines = [f"{head}: loss {self.loss:.3f}"]
        bg = self.block_grad_norm()
        if len(bg) > 1 and bg[0] > 0:
            lines.append(f"  gradient norm, top / bottom block: {_ratio(_top(bg), _bottom(bg))}")
        sr = [v for v in self.stream_rms if v is not None]
        if len(sr) > 1:
            lines.append(f"  residual stream RMS, last / first sublayer: {_ratio(sr[-1], sr[0])}")
        if self.output_change is not None:
            lines.append(
                f"  output change under a 1e-3 weight perturbation: {self.output_change:.3g} "
                f"({self.relative_output_change:.3g} of the output's squared norm)"
            )
        if self.max_attention_logit is not None:
            lines.append(f"  largest attention logit: {self.max_attention_logit:.3g}")
        if self.amax_gain is not None:
            lines.append(f"  Amax gain of the composite stream mixing: {self.amax_gain:.3g}")
        if self.findings:
            lines += [f"  [{f.name}] {f.message}" for f in self.findings]
        else:
            lines.append("  no finding: nothing in these signals predicts trouble")
        return "\n".join(lines)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3g}x" if b > 0 else "inf"


def _finite_json(obj: Any) -> Any:
    # null rather than NaN/Infinity: strict JSON readers reject those tokens
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_json(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------------
# what a sublayer is


@dataclass
class Sublayer:
    name: str  # the branch's module name, e.g. "stack.blocks.3.attn"
    kind: str  # "attn", "cross" or "ff"
    block: int  # index of its block (over every stack in the model, in module order)
    residual: nn.Module
    branch: nn.Module
    params: list[nn.Parameter]


def sublayers(model: nn.Module) -> list[Sublayer]:
    """Every residual sublayer: blocks are the modules with ``residuals()`` and ``branches()``.

    A sublayer's parameters are its branch's and its residual's (norm, gates, mixing), each counted
    once: a ReZero gate shared by a block's sublayers belongs to the sublayer that owns it.
    """
    out: list[Sublayer] = []
    seen: set[int] = set()
    block = -1
    for name, mod in model.named_modules():
        if not (callable(getattr(mod, "residuals", None)) and callable(getattr(mod, "branches", None))):
            continue
        block += 1
        kids = {id(m): n for n, m in mod.named_children()}
        for res, br in zip(mod.residuals(), mod.branches()):
            bname = kids.get(id(br), "branch")
            kind = "ff" if bname == "ff" else ("cross" if bname == "cross" else "attn")
            params = []
            for p in list(br.parameters()) + list(res.parameters()):
                if id(p) not in seen and p.requires_grad:
                    seen.add(id(p))
                    params.append(p)
            out.append(Sublayer(f"{name}.{bname}" if name else bname, kind, block, res, br, params))
    if not out:
        raise ValueError(
            f"diagnose: {type(model).__name__} has no residual blocks (modules with residuals() and "
            "branches()); pass a model built by anydepth.build_model"
        )
    return out


def residual_weights(residual: nn.Module) -> dict[str, float]:
    """The scheme's residual weights as plain numbers (empty for schemes without any)."""
    from anydepth.nn.residual import Admin, DeepNorm, LayerScale, ReZero
    from anydepth.nn.residual.hyper import HyperConnection

    with torch.no_grad():
        if isinstance(residual, ReZero):
            return {"a": float(residual.gate.float().mean())}
        if isinstance(residual, LayerScale):
            return {"g": float(residual.g.float().abs().mean())}
        if isinstance(residual, Admin):
            return {"w": float(residual.omega.float().mean())}
        if isinstance(residual, DeepNorm):
            return {"alpha": float(residual.alpha)}
        if isinstance(residual, HyperConnection) and hasattr(residual, "static_beta"):
            return {"beta": float(residual.static_beta.float().mean())}
    return {}


# --------------------------------------------------------------------------------------------------
# Amax gain


def amax_gain(matrices: Sequence[Tensor]) -> Tensor:
    """Amax gain of the composite ``P = M_k ... M_2 M_1`` of square matrices ``(..., n, n)``.

    ``max(max_i sum_j |P_ij|, max_j sum_i |P_ij|)``, the largest absolute row or column sum (the
    infinity and 1 norms of ``P``), over the leading dimensions separately. The mHC paper's measure of
    how much stacked residual mixing can amplify (row sums: the forward signal; column sums: the
    gradient); 1 for any product of doubly stochastic matrices.
    """
    if not matrices:
        raise ValueError("amax_gain needs at least one (..., n, n) matrix")
    p = matrices[0].double()
    for m in matrices[1:]:
        p = m.double() @ p
    a = p.abs()
    return torch.maximum(a.sum(-1).amax(-1), a.sum(-2).amax(-1))


def _residual_mixing(res: nn.Module, h: Tensor) -> Tensor:
    """``A_r(H)^T`` per token ``(..., f n, f n)``: sub-stream j of ``H'`` is ``sum_i A_r[i, j] H_i``."""
    hs = res._split_fracs(h)
    alpha = res._coefficients(hs)[0].detach()
    f, v, s = res.num_fracs, res.num_input_views, res.streams
    a = alpha.unflatten(-1, (f, v + s))[..., v:].flatten(-2)  # (..., f n, f n)
    if a.dim() == 2:
        a = a.expand(*h.shape[:-2], *a.shape)
    return a.mT


# --------------------------------------------------------------------------------------------------
# attention logits


def _attention_logit_max(attn: nn.Module, x: Tensor, kw: dict[str, Any]) -> float | None:
    """``max |q . k| / sqrt(d)`` over the pairs the layer lets a query see (causal band, window)."""
    from anydepth.nn.attention import Attention

    if not isinstance(attn, Attention) or kw.get("cache") is not None:
        return None
    if attn.cross:
        q, k, _, _ = attn._project_cross(x, kw.get("mask"), kw.get("context"), kw.get("context_mask"), None)
        offset = 0
    else:
        q, k, _, _, offset = attn._project_self(x, kw.get("mask"), kw.get("rotary"), None)
    logits = (q.float() @ k.float().mT) / math.sqrt(attn.dim_head)
    n, nk = logits.shape[-2:]
    rel = torch.arange(n, device=x.device)[:, None] + offset - torch.arange(nk, device=x.device)[None, :]
    allowed = torch.ones_like(rel, dtype=torch.bool)
    if attn.causal:
        allowed &= rel >= 0
    window = getattr(attn, "window", None)
    if window is not None:
        allowed &= (rel < window) if attn.causal else (rel.abs() < window)
    top = logits.abs().masked_fill(~allowed, 0.0).amax()
    if attn.num_mem_kv:
        mem = (q.float() @ attn.mem_k.float().mT.unsqueeze(0)) / math.sqrt(attn.dim_head)
        top = torch.maximum(top, mem.abs().amax())
    return float(top)


# --------------------------------------------------------------------------------------------------
# the measurement


def _rms(t: Tensor) -> float:
    return float(t.detach().float().pow(2).mean().sqrt())


def _default_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    logits = model(x)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


def _stack_batches(batches: Iterable[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    xs, ys = [], []
    for item in batches:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(t, Tensor) for t in item)):
            raise TypeError(
                "diagnose: batches must be (x, y) pairs of token tensors (b, n), y the next tokens; "
                f"got {type(item).__name__}"
            )
        xs.append(item[0])
        ys.append(item[1])
    if not xs:
        raise ValueError("diagnose: batches is empty; give at least one (x, y) pair")
    shapes = {tuple(x.shape[1:]) for x in xs}
    if len(shapes) != 1:
        raise ValueError(f"diagnose: every batch must have the same sequence length, got shapes {sorted(shapes)}")
    return torch.cat(xs), torch.cat(ys)


class _Hooks:
    """Forward hooks that record each sublayer's stream output, branch output RMS, attention logits
    and hyper-connection mixing; removed by :meth:`close`."""

    def __init__(self, subs: list[Sublayer], logits: bool, mixing: bool):
        from anydepth.nn.residual.hyper import HyperConnection

        n = len(subs)
        self.stream: list[Tensor | None] = [None] * n
        self.branch_rms: list[float | None] = [None] * n
        self.logit: list[float | None] = [None] * n
        self.mixing: list[Tensor | None] = [None] * n
        self.handles = []
        for i, s in enumerate(subs):
            self.handles.append(s.residual.register_forward_hook(self._on_residual(i)))
            self.handles.append(s.branch.register_forward_hook(self._on_branch(i)))
            if logits and s.kind != "ff":
                self.handles.append(s.branch.register_forward_pre_hook(self._on_attention(i), with_kwargs=True))
            if mixing and isinstance(s.residual, HyperConnection) and s.residual.streams > 1:
                self.handles.append(s.residual.register_forward_pre_hook(self._on_mixing(i)))

    def _on_residual(self, i: int):
        def hook(mod, args, out):
            if isinstance(out, Tensor):
                self.stream[i] = out

        return hook

    def _on_branch(self, i: int):
        def hook(mod, args, out):
            if isinstance(out, Tensor):
                self.branch_rms[i] = _rms(out)

        return hook

    def _on_attention(self, i: int):
        def hook(mod, args, kwargs):
            if args and isinstance(args[0], Tensor):
                with torch.no_grad():
                    self.logit[i] = _attention_logit_max(mod, args[0], kwargs)

        return hook

    def _on_mixing(self, i: int):
        def hook(mod, args):
            with torch.no_grad():
                self.mixing[i] = _residual_mixing(mod, args[0].detach())

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def diagnose(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    loss_fn: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None,
    output_change: bool = True,
    attention_logits: bool = True,
    rules: Sequence[Rule] | None = None,
) -> Report:
    """Measures ``model`` on ``batches`` (``(x, y)`` token pairs of equal shape) and returns a :class:`Report`.

    One forward of all batches together (concatenated along the batch) and one
    ``torch.autograd.grad`` of the mean cross-entropy ``L`` with respect to the sublayers'
    parameters and residual-stream outputs; the model's ``.grad``, its weights, its train/eval mode
    and the CPU and CUDA random-number states are as before the call, so a trainer can call it
    between steps without changing its trajectory. The model runs in its current mode (dropout as
    in training if it is training). ``output_change`` adds Admin's output-change measurement (four
    perturbed forwards of the first batch, eval mode); ``rules`` defaults to :data:`RULES`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"diagnose: model must be an nn.Module, got {type(model).__name__}")
    x, y = _stack_batches(batches)
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    subs = sublayers(model)
    loss_fn = loss_fn or _default_loss
    from anydepth.nn.stack import ReversibleStack

    # Ordinary autograd in a reversible stack computes the same function; it is what lets
    # autograd.grad see the per-sublayer tensors.
    rev = [(m, m.reverse_thres) for m in model.modules() if isinstance(m, ReversibleStack)]
    cuda = [device] if device.type == "cuda" else []
    hooks = _Hooks(subs, attention_logits, mixing=True)
    try:
        for m, _ in rev:
            m.reverse_thres = x.shape[1]
        with torch.random.fork_rng(devices=cuda), torch.enable_grad():
            loss = loss_fn(model, x, y)
        hooks.close()
        params = [p for s in subs for p in s.params]
        streams = [t for t in hooks.stream if t is not None and t.requires_grad]
        grads = torch.autograd.grad(loss, params + streams, allow_unused=True)
    finally:
        hooks.close()
        for m, thres in rev:
            m.reverse_thres = thres
    pgrads, sgrads = grads[: len(params)], grads[len(params) :]
    grad_norm, k = [], 0
    for s in subs:
        sq = 0.0
        for g in pgrads[k : k + len(s.params)]:
            if g is not None:
                sq += float(g.double().pow(2).sum())
        k += len(s.params)
        grad_norm.append(math.sqrt(sq))
    sg = iter(sgrads)
    stream_rms, stream_grad = [], []
    for t in hooks.stream:
        if t is None or not t.requires_grad:
            stream_rms.append(None if t is None else _rms(t))
            stream_grad.append(None)
            continue
        g = next(sg)
        stream_rms.append(_rms(t))
        stream_grad.append(0.0 if g is None else _rms(g))
    mix = [m for m in hooks.mixing if m is not None]
    residual_w = []
    for s, m in zip(subs, hooks.mixing):
        w = residual_weights(s.residual)
        if m is not None:
            w["mix_amax"] = float(amax_gain([m.mean(dim=tuple(range(m.dim() - 2)))]))
        residual_w.append(w)
    logits = [v for v in hooks.logit if v is not None]
    report = Report(
        names=[s.name for s in subs],
        kinds=[s.kind for s in subs],
        block=[s.block for s in subs],
        stream_rms=stream_rms,
        branch_rms=hooks.branch_rms,
        grad_norm=grad_norm,
        stream_grad_rms=stream_grad,
        attn_logit_max=hooks.logit,
        residual_weights=residual_w,
        loss=float(loss.detach()),
        max_attention_logit=max(logits) if logits else None,
        amax_gain=float(amax_gain(mix).amax()) if mix else None,
        meta=_meta(model, subs),
    )
    if output_change:
        from anydepth.study.output_change import output_change as measure_change

        first = x[: max(1, x.shape[0] // _count(batches, x.shape[0]))]
        with torch.random.fork_rng(devices=cuda):
            report.output_change = measure_change(model, first, sigma=OUTPUT_CHANGE_SIGMA)
            with torch.no_grad():
                was = model.training
                model.eval()
                base = model(first).double().pow(2).sum(-1).mean().item()
                model.train(was)
        report.relative_output_change = report.output_change / base if base > 0 else math.inf
    report.findings = evaluate_rules(report, rules)
    return report


def _count(batches, total: int) -> int:
    try:
        return max(1, len(batches))  # type: ignore[arg-type]
    except TypeError:
        return 1


def _meta(model: nn.Module, subs: list[Sublayer]) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    res = subs[0].residual
    meta: dict[str, Any] = {
        "residual_class": type(res).__name__,
        "placement": getattr(res, "placement", "none"),
        "blocks": subs[-1].block + 1,
        "sublayers": len(subs),
    }
    if cfg is not None and hasattr(cfg, "residual"):
        r = cfg.residual
        norm = getattr(cfg.norm, "kind", cfg.norm)
        meta.update(residual=getattr(r, "kind", r), depth=cfg.depth, dim=cfg.dim, norm=norm)
    else:
        meta.update(residual=type(res).__name__, depth=meta["blocks"])
    return meta


# --------------------------------------------------------------------------------------------------
# findings


@dataclass(frozen=True)
class Rule:
    """A named finding: ``measure(report)`` gives a number (None: not applicable) that fires at
    ``>= threshold``; ``advice(report, value)`` is the message."""

    name: str
    threshold: float
    measure: Callable[[Report], float | None]
    advice: Callable[[Report, float], str]


def _top(v: list[float]) -> float:
    k = max(1, len(v) // 8)
    return _geomean(v[-k:])


def _bottom(v: list[float]) -> float:
    k = max(1, len(v) // 8)
    return _geomean(v[:k])


def _geomean(v: list[float]) -> float:
    if any(x <= 0 for x in v):
        return 0.0
    return math.exp(sum(math.log(x) for x in v) / len(v))


def _falling_gradient(r: Report) -> float | None:
    bg = r.block_grad_norm()
    if len(bg) < 4:
        return None
    top, bottom = _top(bg), _bottom(bg)
    return top / bottom if bottom > 0 else math.inf


def _stream_growth(r: Report) -> float | None:
    sr = [v for v in r.stream_rms if v is not None]
    if len(sr) < 2 or sr[0] <= 0:
        return None
    return max(sr) / sr[0]


def _nonfinite(r: Report) -> float | None:
    vals = [r.loss, *r.grad_norm]
    vals += [v for v in r.stream_rms + r.branch_rms + r.stream_grad_rms if v is not None]
    return float(sum(not math.isfinite(v) for v in vals))


def _scheme(r: Report) -> str:
    return f"{r.meta.get('residual', '?')} at {r.meta.get('depth', '?')} blocks"


def _falling_advice(r: Report, v: float) -> str:
    fix = (
        "consider residual=deepnorm or admin (they keep the post-norm but bound the update), or prenorm"
        if r.meta.get("placement") == "post"
        else "lower the depth or use a scheme with a depth-scaled init (deepnorm, admin, layerscale, rezero)"
    )
    return f"gradient norm falls {v:.3g}x from the top to the bottom block: {_scheme(r)}; {fix}"


RULES: list[Rule] = [
    Rule(
        "nonfinite",
        1.0,
        _nonfinite,
        lambda r, v: f"{v:.0f} measured values are NaN or Inf: the model already diverged; restart from "
        "an earlier checkpoint with a lower --train.lr or more --train.warmup",
    ),
    Rule("falling-gradient", 10.0, _falling_gradient, _falling_advice),
    Rule(
        "stream-growth",
        30.0,
        _stream_growth,
        lambda r, v: f"residual stream grows {v:.3g}x with depth ({_scheme(r)}): late sublayers barely change "
        "it and the final norm must undo the scale; use gated branches (layerscale, rezero) or a "
        "post-norm scheme with a bounded update (deepnorm, admin)",
    ),
    Rule(
        "output-change",
        0.02,
        lambda r: r.relative_output_change,
        lambda r, v: f"a 1e-3 random change of the weights changes the output by {v:.3g} of its squared norm "
        f"({_scheme(r)}): each update is amplified through the depth (Liu et al. 2020); use admin or "
        "deepnorm, or a longer --train.warmup",
    ),
    Rule(
        "attention-logits",
        50.0,
        lambda r: r.max_attention_logit,
        lambda r, v: f"attention logits above 50 (largest {v:.3g}): softmax saturates and attention entropy "
        "collapses (Wortsman et al. 2023); lower --train.lr, add weight decay, or normalise queries and keys",
    ),
    Rule(
        "amax-gain",
        10.0,
        lambda r: r.amax_gain,
        lambda r, v: f"the composite stream mixing amplifies by up to {v:.3g}x (Amax gain): hyper-connection "
        "products grow with depth and training can diverge; use residual=mhc (doubly stochastic mixing)",
    ),
]


def evaluate_rules(report: Report, rules: Sequence[Rule] | None = None) -> list[Finding]:
    """The findings of ``rules`` (default :data:`RULES`) that fire on ``report``."""
    out = []
    for rule in RULES if rules is None else rules:
        v = rule.measure(report)
        if v is not None and (v >= rule.threshold or math.isnan(v)):
            out.append(Finding(rule.name, rule.advice(report, v), float(v), rule.threshold))
    return out


def findings(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], **kw: Any) -> list[Finding]:
    """The named findings for ``model`` on ``batches``: ``diagnose(model, batches, **kw).findings``."""
    return diagnose(model, batches, **kw).findings


# --------------------------------------------------------------------------------------------------
# outputs


def write_report(report: Report, out: str | os.PathLike) -> dict[str, str]:
    """Writes ``diagnose.json``, the heatmap ``diagnose.png`` and the line plots ``profiles.png``
    under ``out``; returns their paths."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    data = report.to_dict()
    data["verdict"] = report.verdict()
    (d / "diagnose.json").write_text(json.dumps(data, indent=2))
    plot_report(report, d / "diagnose.png")
    plot_profiles(report, d / "profiles.png")
    return {"json": str(d / "diagnose.json"), "png": str(d / "diagnose.png"), "profiles": str(d / "profiles.png")}


_LABELS = {
    "stream_rms": "stream RMS",
    "branch_rms": "branch RMS",
    "grad_norm": "param grad norm",
    "stream_grad_rms": "stream grad RMS",
    "attn_logit_max": "max |attn logit|",
}


def plot_report(report: Report, png: str | os.PathLike, title: str | None = None) -> None:
    """Heatmap, sublayer (rows, input at the bottom) x quantity (columns): ``log10`` of each value
    over the quantity's median, so one colour scale shows where a quantity grows or shrinks with depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cols = [q for q in (*QUANTITIES, "attn_logit_max") if any(v is not None for v in getattr(report, q))]
    n = len(report.names)
    img = np.full((n, len(cols)), np.nan)
    for j, q in enumerate(cols):
        vals = np.array([np.nan if v is None else v for v in getattr(report, q)], dtype=float)
        pos = vals[np.isfinite(vals) & (vals > 0)]
        if pos.size:
            with np.errstate(divide="ignore", invalid="ignore"):
                img[:, j] = np.log10(vals / np.median(pos))
    fig, ax = plt.subplots(figsize=(1.3 * len(cols) + 2.2, min(9.0, 2.0 + 0.06 * n)), dpi=110)
    # one fixed scale (100x either way, clipped) so that two models' pictures compare directly
    im = ax.imshow(img, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-2, vmax=2, interpolation="nearest")
    ax.set_xticks(range(len(cols)), [_LABELS[c] for c in cols], rotation=30, ha="right")
    ax.set_ylabel("sublayer (0 = next to the embedding)")
    fig.colorbar(im, ax=ax, label="log10(value / median over sublayers), clipped at +-2")
    ax.set_title(title or _scheme(report), fontsize=10)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def plot_profiles(report: Report, png: str | os.PathLike, title: str | None = None) -> None:
    """The same quantities as lines against the sublayer index, each on its own log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [q for q in (*QUANTITIES, "attn_logit_max") if any(v is not None for v in getattr(report, q))]
    fig, axes = plt.subplots(1, len(cols), figsize=(2.6 * len(cols), 3.0), dpi=110, squeeze=False)
    for ax, q in zip(axes[0], cols):
        pts = [(i, v) for i, v in enumerate(getattr(report, q)) if v is not None and v > 0 and math.isfinite(v)]
        ax.set_yscale("log")
        if pts:
            ax.plot(*zip(*pts), lw=1)
            lo, hi = min(v for _, v in pts), max(v for _, v in pts)
            if hi < 100 * lo:  # at least two decades, so a flat profile looks flat
                mid = math.sqrt(lo * hi)
                ax.set_ylim(mid / 10, mid * 10)
        ax.set_title(_LABELS[q], fontsize=9)
        ax.set_xlabel("sublayer")
        ax.grid(alpha=0.3)
    fig.suptitle(title or _scheme(report), fontsize=10)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
