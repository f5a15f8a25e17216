"""``"cdpruner"``: CDPruner (Zhang et al., 2025, "Beyond Attention or Similarity: Maximizing Conditional
Diversity for Token Pruning in MLLMs"): task-conditional, training-free, input stage.

Relevance of visual token ``i`` to the instruction, in the LLM's embedding space: the mean over the sample's
instruction tokens ``t_j`` (their input embeddings) of ``cos(v_i, t_j)`` (``v_i``: the visual embedding after the
projector), min-max normalised per budget unit to ``r_i = (m_i - min m) / (max m - min m)`` in ``[0, 1]`` (all
equal: ``r = 1``, diversity alone). No epsilon or floor: the least relevant token of a unit gets ``r = 0`` exactly,
a zero row of the kernel, so it is kept only when the relevance fill of :mod:`.dpp` reaches it. Unlike the paper's
LLaVA code, whose CLIP relevance is negated, the cosine is used as it is. The kept set is the greedy MAP of the DPP
with kernel ``diag(r) S diag(r)`` (:mod:`.dpp`; the paper's similarity uses the vision encoder's features, here the
same LLM-space embeddings). ``budget="auto"`` reads ``r`` as the relevance distribution (``"sum"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..pruning import unit_spans
from .base import ScoreInputs
from .dpp import DPPSelection


class CDPrunerScorer(DPPSelection):
    """Scores are the per-unit normalised instruction relevance ``r``; the kept set is its conditional DPP's."""

    name = "cdpruner"

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        embeds, instruction = inputs.inputs_embeds, inputs.layout.instruction_mask
        dtype = torch.promote_types(embeds.dtype, torch.float32)
        visual = F.normalize(inputs.visual_embeds.to(dtype), dim=-1)
        relevance = torch.zeros(inputs.valid.shape, dtype=dtype, device=embeds.device)
        for b, _, start, n in unit_spans(inputs.units):
            text = F.normalize(embeds[b, instruction[b]].to(dtype), dim=-1)
            mean_cos = visual[b, start:start + n] @ text.mean(dim=0)  # mean_j cos(v, t_j), all unit vectors
            low, span = mean_cos.min(), mean_cos.max() - mean_cos.min()
            relevance[b, start:start + n] = (mean_cos - low) / span if span > 0 else 1.0
        return relevance
