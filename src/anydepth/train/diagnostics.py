"""Depth diagnostics during training: ``--train.diagnostics_every N``.

Every ``N`` updates, after the optimizer step, :func:`anydepth.diagnose.diagnose` measures the model
on that step's batch (one extra forward and ``autograd.grad``; no ``.grad`` is touched and the
random-number state is restored, so the run's trajectory is the same bit for bit) and one line goes
to ``<out>/diagnostics.jsonl``::

    {"step": 100, "loss": ..., "names": [...],                 # names on the first line only
     "stream_rms": [...], "branch_rms": [...], "grad_norm": [...], "stream_grad_rms": [...],
     "update_ratio": [...], "residual_weights": [{...}, ...],
     "max_attention_logit": ..., "amax_gain": ..., "findings": ["falling-gradient", ...]}

``update_ratio[i] = ||W_t - W_{t-1}|| / ||W_{t-1}||`` over sublayer ``i``'s parameters for this
step's update (the weights are copied at the end of the step before each logged one). The findings
are :data:`anydepth.diagnose.RULES` (Admin's output change is left out: four extra forwards) plus
``update-ratio`` (:data:`UPDATE_RATIO_LIMIT`). At the end, ``diagnostics.png`` shows each quantity
over sublayer x step, and the summary's ``diagnostics.first_step`` maps each finding to the first
logged step where it fired. Only rank 0 measures and writes. Models sharded with FSDP2 are refused
(their forward is collective).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from anydepth.diagnose import QUANTITIES, Finding, diagnose, sublayers
from anydepth.train.config import check_every

__all__ = ["TrainingDiagnostics", "UPDATE_RATIO_LIMIT", "check_every"]

UPDATE_RATIO_LIMIT = 0.1  # one update moving a sublayer's weights by 10% of their norm is a spike


class TrainingDiagnostics:
    """The logger behind ``--train.diagnostics_every``; :meth:`for_run` gives None when it is off."""

    def __init__(self, model: nn.Module, every: int, out: Path, *, start: int = 0, main: bool = True):
        self.model, self.every, self.out, self.main = model, every, Path(out), main
        self.subs = sublayers(model)
        self.first_step: dict[str, int] = {}
        self.snapshot: list[list[Tensor]] | None = None
        self.file = None
        self.logged = 0
        log = self.out / "diagnostics.jsonl"
        if main and start and log.exists():
            # a resumed run redoes the steps after its checkpoint
            keep = [ln for ln in log.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= start]
            log.write_text("".join(ln + "\n" for ln in keep))
            self.logged = len(keep)
        if main and (start + 1) % every == 0:
            self._take_snapshot()

    @classmethod
    def for_run(
        cls, model: nn.Module, every: int, out: Path, *, start: int, main: bool, sharded: bool
    ) -> TrainingDiagnostics | None:
        if not every:
            return None
        if sharded:
            raise ValueError(
                "train.diagnostics_every needs the whole model on one process, and --train.parallel=fsdp "
                "shards it; use --train.parallel=ddp or --train.diagnostics_every=0"
            )
        return cls(model, every, out, start=start, main=main)

    def _take_snapshot(self) -> None:
        with torch.no_grad():
            self.snapshot = [[p.detach().clone() for p in s.params] for s in self.subs]

    def _update_ratios(self) -> list[float] | None:
        if self.snapshot is None:
            return None
        out = []
        with torch.no_grad():
            for s, old in zip(self.subs, self.snapshot):
                du = sum(float((p.detach() - q).double().pow(2).sum()) for p, q in zip(s.params, old))
                w = sum(float(q.double().pow(2).sum()) for q in old)
                out.append(math.sqrt(du / w) if w > 0 else (0.0 if du == 0 else math.inf))
        return out

    def after_step(self, step: int, x: Tensor, y: Tensor) -> None:
        """Called once per finished update with the 1-based ``step`` and that step's batch."""
        if not self.main:
            return
        if step % self.every == 0:
            self._log(step, x, y)
        if (step + 1) % self.every == 0:
            self._take_snapshot()
        else:
            self.snapshot = None

    def _log(self, step: int, x: Tensor, y: Tensor) -> None:
        ratios = self._update_ratios()
        report = diagnose(self.model, [(x, y)], output_change=False)
        found = list(report.findings)
        if ratios is not None and max(ratios) >= UPDATE_RATIO_LIMIT:
            i = max(range(len(ratios)), key=ratios.__getitem__)
            found.append(
                Finding(
                    "update-ratio",
                    f"one update moved {report.names[i]} by {ratios[i]:.3g} of its weights' norm: the "
                    "learning rate is too high for this layer; lower --train.lr or add --train.warmup",
                    ratios[i],
                    UPDATE_RATIO_LIMIT,
                )
            )
        for f in found:
            self.first_step.setdefault(f.name, step)
        rec: dict[str, Any] = {"step": step, "loss": report.loss}
        if self.logged == 0:
            rec["names"] = report.names
        for q in QUANTITIES:
            rec[q] = getattr(report, q)
        rec["attn_logit_max"] = report.attn_logit_max
        rec["update_ratio"] = ratios
        rec["residual_weights"] = report.residual_weights
        rec["max_attention_logit"] = report.max_attention_logit
        rec["amax_gain"] = report.amax_gain
        rec["findings"] = [f.name for f in found]
        if self.file is None:
            self.out.mkdir(parents=True, exist_ok=True)
            self.file = open(self.out / "diagnostics.jsonl", "a")  # noqa: SIM115 - closed in finish()
        self.file.write(json.dumps(_finite(rec)) + "\n")
        self.file.flush()
        self.logged += 1

    def finish(self) -> dict[str, Any]:
        """Closes the log, draws ``diagnostics.png`` and returns the summary's ``diagnostics`` entry."""
        if self.file is not None:
            self.file.close()
            self.file = None
        path = self.out / "diagnostics.jsonl"
        plot = self.out / "diagnostics.png"
        if self.main and path.exists():
            plot_training_diagnostics(path, plot)
        return {
            "every": self.every,
            "file": str(path),
            "plot": str(plot),
            "first_step": dict(sorted(self.first_step.items(), key=lambda kv: kv[1])),
        }


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def plot_training_diagnostics(jsonl: str | Path, png: str | Path) -> None:
    """One panel per quantity: ``log10`` of its value over sublayer (rows) x logged step (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    recs = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()]
    if not recs:
        return
    steps = [r["step"] for r in recs]
    panels: list[tuple[str, np.ndarray]] = []
    for q in (*QUANTITIES, "update_ratio"):
        rows = [r.get(q) or [] for r in recs]
        n = max(len(v) for v in rows)
        if n == 0:
            continue
        img = np.full((n, len(recs)), np.nan)
        for j, v in enumerate(rows):
            for i, val in enumerate(v):
                if val is not None and val > 0:
                    img[i, j] = math.log10(val)
        if np.isfinite(img).any():
            panels.append((q, img))
    keys = sorted({k for r in recs for w in r.get("residual_weights") or [] for k in w})
    for k in keys:
        n = max(len(r.get("residual_weights") or []) for r in recs)
        img = np.full((n, len(recs)), np.nan)
        for j, r in enumerate(recs):
            for i, w in enumerate(r.get("residual_weights") or []):
                if w.get(k) is not None:
                    img[i, j] = w[k]
        if np.isfinite(img).any():
            panels.append((f"residual weight {k} (linear)", img))
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), dpi=100, squeeze=False)
    extent = (steps[0] - 0.5, steps[-1] + 0.5, -0.5, panels[0][1].shape[0] - 0.5) if len(steps) == 1 else None
    for ax, (name, img) in zip(axes.flat, panels):
        if extent is None:
            span = (steps[-1] - steps[0]) / (2 * (len(steps) - 1))
            ext = (steps[0] - span, steps[-1] + span, -0.5, img.shape[0] - 0.5)
        else:
            ext = extent
        im = ax.imshow(img, aspect="auto", origin="lower", interpolation="nearest", extent=ext, cmap="viridis")
        ax.set_title(name if "linear" in name else f"log10 {name}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("sublayer")
        fig.colorbar(im, ax=ax)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
