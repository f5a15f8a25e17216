"""``"random"``: a seeded random subset (a task-agnostic floor for comparisons)."""

from __future__ import annotations

import torch

from .base import ScoreInputs, Scorer


class RandomScorer(Scorer):
    """Uniform random scores from a generator re-seeded on every call (same input, same selection). They are no
    relevance: ``budget="auto"`` refuses this scorer (its mass rule would be a noisy fixed ratio)."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        return torch.rand(inputs.valid.shape, generator=generator).to(inputs.valid.device)
