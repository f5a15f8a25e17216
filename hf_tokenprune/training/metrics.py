"""Per-sample training and validation metrics over padded batches (``mask`` marks real tokens)."""

from __future__ import annotations

import math

import torch

__all__ = ["METRICS", "kl_divergence", "ranking_metrics"]

METRICS = ("kl", "recall@25", "recall@50", "pointing")


def kl_divergence(target: torch.Tensor, log_q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``KL(target || q)`` per row, ``[B]``, over the real tokens; ``log_q`` must be finite there."""
    log_p = torch.log(target.clamp_min(torch.finfo(target.dtype).tiny))
    return torch.where(mask & (target > 0), target * (log_p - log_q), 0.0).sum(dim=1)


def _top(scores: torch.Tensor, mask: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool ``[B, N]`` of each row's top ``ceil(ratio * n)`` real tokens (as :func:`hf_tokenprune.pruning.budget`
    with ``min_tokens=1``; ties go to the earlier token), and that count ``[B]``."""
    n = mask.sum(dim=1)
    k = torch.ceil(ratio * n - 1e-9).clamp_min(1).minimum(n)
    order = scores.masked_fill(~mask, -math.inf).argsort(dim=1, descending=True, stable=True)
    positions = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, positions)
    return (ranks < k[:, None]) & mask, k


def ranking_metrics(scores: torch.Tensor, relevance: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-row agreement of a ranking (``scores``, higher = more relevant) with the oracle ``R_v``, each ``[B]``:

    * ``recall@25`` / ``recall@50``: fraction of the oracle top 25% / 50% tokens in the predicted top 25% / 50%;
    * ``pointing``: 1 if the highest-scored token is in the oracle top 5%, else 0.
    """
    out = {}
    for ratio in (0.25, 0.5):
        predicted, k = _top(scores, mask, ratio)
        oracle, _ = _top(relevance, mask, ratio)
        out[f"recall@{round(ratio * 100)}"] = (predicted & oracle).sum(dim=1) / k
    best = scores.masked_fill(~mask, -math.inf).argmax(dim=1, keepdim=True)
    out["pointing"] = _top(relevance, mask, 0.05)[0].gather(1, best).squeeze(1).float()
    return out
