"""FastV (Chen et al., 2024): before layer K (default 2), rank visual tokens by the attention they receive from
the last prompt token (mean over heads) and drop the lowest ``1 - ratio`` for all later layers.

Attention needs: none. The weights of layer K's last row are recomputed from the layer's input with its own
input norm, q/k projections and rotary embedding in float32 (:func:`~hf_tokenprune.features.received_attention`),
so the model keeps its attention implementation (sdpa, eager, flash) everywhere.
"""

from __future__ import annotations

import torch

from ..features import received_attention
from .base import LayerInputs, LayerScorer, last_true


class FastVScorer(LayerScorer):
    """Attention received from the last prompt token (task-conditional: the generation prompt sees the question)."""

    name = "fastv"

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        return received_attention(inputs.layer, inputs.hidden_states, inputs.position_embeddings,
                                  inputs.attention_mask, last_true(inputs.attention_mask))
