"""What a compressor training run gives: :class:`TrainResult`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["TrainResult"]


@dataclass
class TrainResult:
    """Outcome of :func:`train_compressor`.

    Attributes:
        directory: the compressor directory (loadable with ``Compressor.from_pretrained``).
        best_epoch: 1-based epoch whose weights were kept (lowest validation KL).
        metrics: validation metrics of that epoch (``kl``, ``recall@25``, ``recall@50``, ``pointing``).
        baseline: the same metrics for ranking by the raw feature ``A^0_v`` (the ``"attention"`` scorer).
        history: per-epoch ``{"epoch", "train_kl", "kl", "recall@25", "recall@50", "pointing"}``.
    """

    directory: Path
    best_epoch: int
    metrics: dict[str, float]
    baseline: dict[str, float]
    history: list[dict[str, float]]
