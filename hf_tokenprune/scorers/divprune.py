"""``"divprune"``: DivPrune (Alvar et al., CVPR 2025), greedy max-min diversity; task-agnostic, input stage.

Per budget unit, on the visual embeddings entering the LLM (after the projector), with the cosine distance
``d_ij = 1 - cos(v_i, v_j)``: the first token is the one whose nearest other token is farthest
(``argmax_i min_{j != i} d_ij``); then, until the unit's budget is reached, the token farthest from the kept set
(``argmax_i min_{s kept} d_is``). Ties go to the earlier token. Memory O(N * block + N * d): the nearest-neighbour
distances are computed in row blocks and the distance to the kept set is a running minimum, never the N x N matrix.
There is no relevance distribution: ``budget="auto"`` is refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import ScoreInputs, SetSelection

BLOCK = 256  # rows of the distance matrix held at once for the first pick


def max_min_select(embeds: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` tokens of ``embeds`` ``[n, hidden]`` that greedy max-min diversity keeps, in pick
    order."""
    x = F.normalize(embeds.to(torch.promote_types(embeds.dtype, torch.float32)), dim=-1)
    n = x.shape[0]
    nearest = torch.empty(n, dtype=x.dtype, device=x.device)
    for start in range(0, n, BLOCK):
        similarity = x[start:start + BLOCK] @ x.T
        rows = torch.arange(similarity.shape[0], device=x.device)
        similarity[rows, start + rows] = -torch.inf  # not its own neighbour
        nearest[start:start + BLOCK] = 1 - similarity.amax(dim=1)
    picked = [int(torch.argmax(nearest))]
    gap = torch.full_like(nearest, torch.inf)  # distance of each token to the kept set
    for _ in range(k - 1):
        gap = torch.minimum(gap, 1 - x @ x[picked[-1]])
        gap[picked[-1]] = -torch.inf
        picked.append(int(torch.argmax(gap)))
    return torch.tensor(picked, dtype=torch.long, device=x.device)


class DivPruneScorer(SetSelection):
    """Keeps the max-min diverse set of each unit; its scores are zeros (no per-token relevance)."""

    name = "divprune"

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return torch.zeros(inputs.valid.shape, device=inputs.valid.device)

    def select_unit(self, embeds: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
        return max_min_select(embeds, k)
