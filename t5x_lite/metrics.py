"""Scores and metric writers: exact match now (BLEU and ROUGE arrive with the evaluation issue); every logged
step goes to ``metrics.jsonl`` (one JSON object per step, flat keys) and to TensorBoard."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any


def exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]] | Sequence[str]) -> float:
    """Percentage of predictions equal (after stripping) to one of their references."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return 0.0
    hits = 0
    for prediction, refs in zip(predictions, references, strict=True):
        options = [refs] if isinstance(refs, str) else list(refs)
        hits += prediction.strip() in {r.strip() for r in options}
    return 100.0 * hits / len(predictions)


class MetricWriter:
    """Appends ``{'step': s, 'train/loss': ...}`` lines to WORKDIR/metrics.jsonl and scalars to TensorBoard."""

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(os.fspath(workdir), "metrics.jsonl")
        self._tensorboard = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._tensorboard = SummaryWriter(os.path.join(os.fspath(workdir), "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        values = {key: float(value) for key, value in metrics.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": int(step), **values}, sort_keys=True) + "\n")
        for key, value in values.items():
            if math.isfinite(value):
                self._tensorboard.add_scalar(key, value, int(step))
        self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, float]]:
    """The rows of WORKDIR/metrics.jsonl (for tests and plots)."""
    path = os.path.join(os.fspath(workdir), "metrics.jsonl")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
