"""``"uniform"``: evenly spaced tokens, whatever the question (task-agnostic)."""

from __future__ import annotations

import torch

from .base import ScoreInputs, Scorer


def spread_order(n: int) -> torch.Tensor:
    """Rank of each of ``n`` positions in bit-reversal (van der Corput) order: for any ``k``, the ``k``
    lowest-ranked positions are spread evenly (exactly every ``n/k``-th when both are powers of two)."""
    bits = max(1, (n - 1).bit_length())
    idx = torch.arange(1 << bits)
    rev = torch.zeros_like(idx)
    for b in range(bits):
        rev |= ((idx >> b) & 1) << (bits - 1 - b)
    order = rev[rev < n]
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n)
    return rank


class UniformScorer(Scorer):
    """Keeps an evenly spaced subset of every budget unit (image, frame or sample)."""

    name = "uniform"

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        scores = torch.zeros(inputs.valid.shape)
        for b, lengths in enumerate(inputs.units):
            start = 0
            for n in lengths:
                scores[b, start:start + n] = -spread_order(n).float()
                start += n
        return scores.to(inputs.valid.device)
