"""``OracleScorer``: ranks by given per-token values, e.g. the oracle relevance ``R_v`` of :mod:`..explain`.

The oracle needs the answer, so it is an evaluation tool, not a pruning method: set :attr:`values` (one
``[N_v]`` tensor per sample of the next batch) before each call. It is the upper bound any compressor aims at.
"""

from __future__ import annotations

import torch

from .base import ScoreInputs, Scorer


class OracleScorer(Scorer):
    """Scores each sample's visual tokens with ``values[b]`` (set before the call that prunes the batch)."""

    name = "oracle"
    distribution = "sum"  # R_v: non-negative relevance

    def __init__(self, values: list[torch.Tensor] | None = None) -> None:
        self.values = values

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        counts = inputs.layout.counts
        values = self.values
        if values is None or [len(v) for v in values] != counts:
            got = None if values is None else [len(v) for v in values]
            raise ValueError(f"OracleScorer.values must hold one tensor per sample with its visual-token count "
                             f"{counts}; got lengths {got}")
        out = torch.zeros(inputs.valid.shape, dtype=torch.float32, device=inputs.valid.device)
        for b, v in enumerate(values):
            out[b, : len(v)] = v.to(out.device, torch.float32)
        return out
