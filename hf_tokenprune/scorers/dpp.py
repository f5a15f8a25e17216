"""Greedy MAP inference of a conditional determinantal point process (DPP) over a unit's visual tokens.

The kernel is ``L = diag(r) S diag(r)``: ``S_ij = cos(v_i, v_j)`` on the visual embeddings entering the LLM (a Gram
matrix of unit vectors, positive semi-definite as it is: no shift), ``r`` the relevance of each token to the task.
``det(L_Y) = prod_{i in Y} r_i^2 * det(S_Y)``: a kept set is relevant and diverse at once. The greedy adds the
token that most increases ``log det(L_Y)``, by the incremental Cholesky updates of Chen, Zhang and Zhou (NeurIPS
2018, "Fast greedy MAP inference for determinantal point process"): each step computes one kernel row on demand
(``r_j r (v̂ V̂^T)``), so memory is O(N k) and time O(N k (d + k)).

A token stops being a candidate once its residual ``d_i^2`` (the gain ``det(L_{Y+i}) / det(L_Y)``) is at most
``sqrt(eps)`` of the compute dtype times ``L_ii``: it lies in the span of the kept tokens up to rounding (a
duplicate, or more tokens than the embeddings' rank), or has zero relevance. When no candidate is left the greedy
stops early and the rest of the budget is filled by relevance (highest ``r`` first, ties to the earlier token).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import SetSelection


def greedy_map(embeds: torch.Tensor, relevance: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` tokens that greedy DPP MAP inference keeps from ``embeds`` ``[n, hidden]`` with
    relevance ``relevance`` ``[n]`` (non-negative), in pick order."""
    dtype = torch.promote_types(embeds.dtype, torch.float32)
    x = F.normalize(embeds.to(dtype), dim=-1)
    r = relevance.to(dtype).clamp_min(0)
    top = r.max()
    r = r / top if top > 0 else torch.ones_like(r)  # scale-free; all zero: diversity alone
    residual = r.square() * x.square().sum(dim=-1)  # d_i^2, at first L_ii
    floor = residual * torch.finfo(dtype).eps ** 0.5  # at or below: no candidate
    rows = torch.zeros((k, len(r)), dtype=dtype, device=x.device)  # the Cholesky factor's rows, c_m
    picked: list[int] = []
    for m in range(k):
        gain = torch.where(residual > floor, residual, -torch.inf)
        j = int(torch.argmax(gain))
        if gain[j] == -torch.inf:
            break
        picked.append(j)
        if m == k - 1:
            break
        kernel_row = r[j] * r * (x @ x[j])
        rows[m] = (kernel_row - rows[:m, j] @ rows[:m]) / residual[j].sqrt()
        residual = residual - rows[m].square()
        residual[j] = -torch.inf
    if len(picked) < k:
        order = torch.sort(r, descending=True, stable=True).indices.tolist()
        taken = set(picked)
        picked += [i for i in order if i not in taken][:k - len(picked)]
    return torch.tensor(picked, dtype=torch.long, device=x.device)


class DPPSelection(SetSelection):
    """Keeps the greedy DPP MAP set of each unit, with its scores (non-negative relevance; under
    ``budget="auto"`` their distribution, the same up to scale and temperature) as ``r``."""

    distribution = "sum"

    def select_unit(self, embeds: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
        return greedy_map(embeds, scores, k)
