"""DART (Wen et al., 2025, "Stop looking for important tokens"): duplication-aware, task-agnostic pruning.

Before layer K (default 2): per sample, the ``pivots`` visual tokens with the largest key norm (L1 norm of the
layer's key projection of its normed input, as DART's default) are pivots; every other visual token is scored
by its redundancy, its highest cosine similarity (on the layer's input hidden states) to any pivot. Pivots and
the least redundant tokens are kept, up to the budget.

Attention needs: none (no attention weights are read).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import LayerInputs, LayerScorer

DEFAULT_PIVOTS = 8  # DART's default: 4 image + 4 text pivots; we take them all among the visual tokens


class DARTScorer(LayerScorer):
    """Pivots score highest (by key norm), then tokens by decreasing dissimilarity to their closest pivot."""

    name = "dart"

    def __init__(self, pivots: int = DEFAULT_PIVOTS) -> None:
        self.pivots = pivots

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        layer, hidden = inputs.layer, inputs.hidden_states
        scores = torch.zeros(hidden.shape[:2], dtype=torch.float32, device=hidden.device)
        with torch.no_grad():
            key_norm = layer.self_attn.k_proj(layer.input_layernorm(hidden)).float().abs().sum(dim=-1)
            for b in range(hidden.shape[0]):
                visual = inputs.visual_mask[b].nonzero().flatten()
                if not len(visual):
                    continue
                pivots = key_norm[b, visual].topk(min(self.pivots, len(visual))).indices
                tokens = F.normalize(hidden[b, visual].float(), dim=-1)
                redundancy = (tokens @ tokens[pivots].T).amax(dim=1)
                # below any cosine: pivots are kept first, by decreasing key norm
                redundancy[pivots] = -2.0 - torch.arange(len(pivots), 0, -1, device=hidden.device, dtype=torch.float32)
                scores[b, visual] = -redundancy
        return scores
