"""``"attention"``: rank by the raw first-layer instruction->vision attention ``A^0_v``."""

from __future__ import annotations

import torch

from .base import ScoreInputs, Scorer


class AttentionScorer(Scorer):
    """Task-conditional, training-free: the visual tokens the instruction attends to most in layer 0."""

    name = "attention"
    distribution = "sum"  # attention probabilities: non-negative

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return inputs.first_layer_attention
