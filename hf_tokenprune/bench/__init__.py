"""The benchmark: cost (FLOPs, wall time, KV cache, memory) and accuracy of every pruning method and retention,
measured side by side (``hf-tokenprune bench``)."""

from __future__ import annotations

from .accuracy import dataset_accuracy
from .runner import BenchSettings, run

__all__ = ["BenchSettings", "dataset_accuracy", "run"]
