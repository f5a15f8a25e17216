"""PyramidDrop (Xing et al., 2025): prune in stages, each ranked by the attention visual tokens receive from the last
instruction token before the stage's first layer.

Schedule. The paper's default for a 32-layer LLM drops at layers 8 / 16 / 24 keeping ``lambda = 0.5`` of the
remaining visual tokens each time. Matched to a retention ``ratio`` in prefill FLOPs: input-stage pruning at
``ratio`` runs every layer on ``ratio * N_v`` visual tokens, so PDrop must satisfy (FLOPs counted per token and
layer, the projection + MLP term that dominates; ``b_0 = 0 < b_1 <= b_2 <= b_3 < b_4 = depth`` the stage layers)::

    sum_{s=0..3} (b_{s+1} - b_s) * lambda**s  =  ratio * depth

Stage layers keep the paper's evenly spaced shape ``b_s = round(s * g)``. The spacing ``g`` is the paper's
``depth / 4`` when ``ratio`` allows (at ``ratio >= 0.469``, where ``lambda >= 0.5``); for tighter budgets the stages
move earlier, ``g = depth * (ratio - 0.125) / 1.375`` (the spacing at which ``lambda = 0.5`` meets the budget), at
least one layer. ``lambda`` is then solved exactly for the rounded layers (bisection). If even ``lambda = 0`` runs
over the budget (a very shallow model), ``lambda = 0``: each stage keeps ``min_tokens`` per budget unit.

Attention needs: none (as FastV, one row recomputed per stage in float32).
"""

from __future__ import annotations

import torch

from ..features import received_attention
from .base import LayerInputs, LayerScorer, last_true

PAPER_KEEP = 0.5  # lambda of the paper's default schedule
STAGES = 3


class PDropScorer(LayerScorer):
    """Attention received from the last instruction token (the end of the user's question)."""

    name = "pdrop"

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        query = last_true(inputs.instruction_mask & inputs.attention_mask)
        return received_attention(inputs.layer, inputs.hidden_states, inputs.position_embeddings,
                                  inputs.attention_mask, query)


def _visual_layers(layers: list[int], depth: int, keep: float) -> float:
    """Layer-count-weighted visual-token fraction: ``sum_s (b_{s+1} - b_s) * keep**s``."""
    bounds = [0, *layers, depth]
    return sum((bounds[s + 1] - bounds[s]) * keep**s for s in range(len(bounds) - 1))


def pdrop_stages(depth: int, ratio: float) -> tuple[tuple[int, float], ...]:
    """``(layer, cumulative keep)`` of each stage for a ``depth``-layer LLM at retention ``ratio`` (module doc)."""
    if depth < 2:
        raise ValueError(f"scorer='pdrop' prunes inside the LLM and needs at least 2 decoder layers, got {depth}")
    shape = sum(PAPER_KEEP**s for s in range(STAGES)) - STAGES * PAPER_KEEP**STAGES
    spacing = max(min(depth * (ratio - PAPER_KEEP**STAGES) / shape, depth / (STAGES + 1)), 1.0)
    layers = [min(round(s * spacing), depth - 1) for s in range(1, STAGES + 1)]
    lo, hi = 0.0, 1.0
    if _visual_layers(layers, depth, 0.0) < ratio * depth:
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _visual_layers(layers, depth, mid) < ratio * depth else (lo, mid)
    keep = lo
    # stages sharing a layer collapse into the last of them
    stages = {layer: keep ** (s + 1) for s, layer in enumerate(layers)}
    return tuple(sorted(stages.items()))
