"""ToMe-style merging at the LLM input (Bolya et al., 2023; task-agnostic).

Bipartite soft matching on the visual embeddings entering the LLM, per budget unit: split the unit's current
tokens alternately into sets A and B, match every A token to its most similar B token (cosine), merge the ``r``
best-matched A tokens into their B match (size-weighted average), and repeat until the unit's budget
(:func:`~hf_tokenprune.pruning.budget`) remains. A merged token is the average of all embeddings merged into it
and keeps the position of its representative, the B token that absorbed the others; ToMe's proportional
attention (a log-size bias) is not applied, the LLM is unchanged.

Attention needs: none (embeddings only); it runs through the input-stage path like every scorer.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from ..pruning import budget
from ..scorers.base import ScoreInputs, Scorer


def bipartite_merge(x: torch.Tensor, keep: int) -> torch.Tensor:
    """For ``n`` tokens ``x`` ``[n, hidden]``: ``dest[i]``, the index of the token that ``i`` is merged into
    (``i`` itself for the ``keep`` survivors)."""
    n = x.shape[0]
    dest = torch.arange(n, device=x.device)
    sums, sizes = x.float().clone(), torch.ones(n, device=x.device)
    alive = dest.clone()
    while len(alive) > keep:
        a, b = alive[0::2], alive[1::2]
        r = min(len(alive) - keep, len(b))
        means = F.normalize(sums / sizes[:, None], dim=-1)
        similarity, match = (means[a] @ means[b].T).max(dim=1)
        merged = torch.sort(similarity, descending=True, stable=True).indices[:r]
        src, dst = a[merged], b[match[merged]]
        sums.index_add_(0, dst, sums[src])
        sizes.index_add_(0, dst, sizes[src])
        step = torch.arange(n, device=x.device)
        step[src] = dst
        dest = step[dest]
        gone = torch.zeros(n, dtype=torch.bool, device=x.device)
        gone[src] = True
        alive = alive[~gone[alive]]
    return dest


class ToMeScorer(Scorer):
    """Scores the survivors of bipartite merging 1 and the merged-away tokens 0; :meth:`merge` returns the
    survivors' averaged embeddings."""

    name = "tome"

    def __init__(self, ratio: float, min_tokens: int) -> None:
        self.ratio, self.min_tokens = ratio, min_tokens
        self._last: tuple[weakref.ref, torch.Tensor] | None = None

    def _destinations(self, inputs: ScoreInputs) -> torch.Tensor:
        """``[batch, max_visual]`` packed index of the token each visual token is merged into."""
        if self._last is not None and self._last[0]() is inputs:
            return self._last[1]
        embeds = inputs.visual_embeds
        dest = torch.zeros(inputs.valid.shape, dtype=torch.long, device=embeds.device)
        for b, lengths in enumerate(inputs.units):
            start = 0
            for n in lengths:
                unit = bipartite_merge(embeds[b, start:start + n], budget(n, self.ratio, self.min_tokens))
                dest[b, start:start + n] = unit + start
                start += n
        self._last = (weakref.ref(inputs), dest)
        return dest

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        dest = self._destinations(inputs)
        return (dest == torch.arange(dest.shape[1], device=dest.device)).float()

    def merge(self, inputs: ScoreInputs, keep: torch.Tensor) -> torch.Tensor:
        dest, valid = self._destinations(inputs), inputs.valid
        survivors = (dest == torch.arange(dest.shape[1], device=dest.device)) & valid
        if not torch.equal(survivors, keep & valid):
            raise ValueError("ToMeScorer.merge: the kept tokens are not the merge survivors (the pruner's budget "
                             "differs from the scorer's ratio / min_tokens)")
        embeds = inputs.visual_embeds
        sums = torch.zeros_like(embeds, dtype=torch.float32)
        sums.scatter_add_(1, dest.unsqueeze(-1).expand_as(embeds), (embeds.float() * valid.unsqueeze(-1)))
        sizes = torch.zeros(dest.shape, dtype=torch.float32, device=dest.device)
        sizes.scatter_add_(1, dest, valid.float())
        return (sums / sizes.clamp(min=1).unsqueeze(-1)).to(embeds.dtype)
