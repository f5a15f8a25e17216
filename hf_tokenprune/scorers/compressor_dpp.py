"""``"compressor+dpp"``: the compressor's predicted relevance as ``r`` in the conditional DPP of CDPruner.

Beyond the paper: the relevance ``r`` of :mod:`.cdpruner`'s kernel ``diag(r) S diag(r)`` is the compressor's
``R~_v = softmax(f_theta(A^0_v))``, taken per budget unit, so the kept set is both predicted-relevant and diverse
(:mod:`.dpp`). ``budget="auto"`` counts from the same distribution as ``scorer="compressor"`` (``softmax(logits /
temperature)``, here as ``R~_v ** (1 / temperature)`` normalised, equal up to rounding) and uses its saved
calibration.
"""

from __future__ import annotations

import torch

from ..pruning import unit_distribution
from .base import ScoreInputs
from .compressor import CompressorScorer
from .dpp import DPPSelection


class CompressorDPPScorer(DPPSelection, CompressorScorer):
    """Scores are the compressor's relevance distribution of each unit (float64, 0 at padding)."""

    name = "compressor+dpp"

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return unit_distribution(super().score(inputs), inputs.units, "softmax")
