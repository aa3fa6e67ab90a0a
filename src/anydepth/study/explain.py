"""Why a run failed: the depth diagnostics (``anydepth.diagnose``) on the failed runs' last checkpoints.

For every run that failed to train, the study loads the model its trainer saved last and measures it on
two training batches (one forward and backward, no training): the named findings that fire (a gradient
that falls from the top to the bottom block, a residual stream that grows with depth, attention logits
above 50, non-finite values, ...) are what the report prints next to the run. A run whose checkpoint
is missing is reported as such; a run whose findings are all silent is reported as "no finding fired".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from anydepth.study.verdicts import trained


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest ``step_*`` checkpoint the trainer wrote for a study run, or None."""
    steps = sorted((Path(run_dir) / "train" / "checkpoints").glob("step_*"))
    return steps[-1] if steps else None


def explain_failures(
    records: list[dict[str, Any]], out: Path, *, unigram_bits: float, tokens, batches: int = 2
) -> dict[str, list[dict[str, Any]] | str]:
    """``{run_id: [finding dicts] or a sentence}`` for every failed run of ``records`` under ``out/runs``."""
    from anydepth.diagnose import findings
    from anydepth.model.pretrained import from_pretrained
    from anydepth.train.data import sample_batch

    explained: dict[str, list[dict[str, Any]] | str] = {}
    for r in records:
        if trained(r, unigram_bits) or r.get("status") == "error":
            continue
        ckpt = last_checkpoint(Path(out) / "runs" / r["run_id"])
        if ckpt is None:
            explained[r["run_id"]] = "no checkpoint was written"
            continue
        model = from_pretrained(ckpt)
        data = [sample_batch(tokens, step=i, seed=10_000, batch_size=r.get("batch_size", 16),
                             seq_len=r.get("seq_len", 64)) for i in range(batches)]
        try:
            found = findings(model.train(), data, output_change=False)
        except (RuntimeError, ValueError) as e:  # a model whose weights are NaN may not even run
            explained[r["run_id"]] = f"the diagnostics could not run: {type(e).__name__}: {e}".splitlines()[0]
            continue
        explained[r["run_id"]] = [f.to_dict() for f in found]
    return explained
