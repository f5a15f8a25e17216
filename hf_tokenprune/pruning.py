"""Model-agnostic slicing: per-sample top-k -> keep mask -> shorter, re-padded sequences.

Two budgets: a fixed ``ratio`` of each budget unit (:func:`select_top`), or the relevance-mass rule of
``budget="auto"`` (:func:`unit_distribution`, :func:`cumulative_mass`, :func:`mass_counts`): each unit keeps the
smallest set of its highest-scored tokens whose share of the unit's relevance distribution (sharpened or flattened
by a temperature) reaches ``mass``, clamped to ``[min_ratio, max_ratio]`` of its tokens. Either budget is a list of
per-unit counts (:func:`fixed_counts`, :func:`distribution_counts`); a scorer's ``select`` turns them into a keep
mask (by default :func:`select_counts`: the top scores), and rows keeping different counts are re-padded by
:class:`Slicing`.

Pure tensor code. Sequences are ``[batch, length, ...]``; position ids are ``[rows, batch, length]``. Packed
per-visual-token tensors are ``[batch, max_visual]`` with the visual tokens of each sample in order of
appearance, padded at the end.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch


def budget(n: int, ratio: float, min_tokens: int) -> int:
    """Tokens kept out of ``n``: ``ceil(ratio * n)``, at least ``min_tokens``, at most ``n``."""
    return min(n, max(min_tokens, math.ceil(ratio * n - 1e-9)))


DISTRIBUTIONS = ("softmax", "sum")
MASS_TOLERANCE = 1e-9  # a cumulative mass within this of the threshold reaches it (float64 rounding)


def pack(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather ``values[b, mask[b]]`` into ``[batch, max_count, ...]`` (order kept; ``values``: ``[batch, length,
    ...]``, zeros after each sample's count) and a ``[batch, max_count]`` validity mask."""
    counts = mask.sum(dim=1)
    width = int(counts.max()) if counts.numel() else 0
    valid = torch.arange(width, device=mask.device)[None, :] < counts[:, None]
    packed = values.new_zeros((values.shape[0], width, *values.shape[2:]))
    packed[valid] = values[mask]
    return packed, valid


def unit_spans(units: list[list[int]]) -> Iterator[tuple[int, int, int, int]]:
    """``(sample, unit, start, length)`` of every budget unit: unit ``u`` of sample ``b`` is the packed slice
    ``[b, start:start + length]``."""
    for b, lengths in enumerate(units):
        start = 0
        for u, n in enumerate(lengths):
            yield b, u, start, n
            start += n


def fixed_counts(units: list[list[int]], ratio: float, min_tokens: int) -> list[list[int]]:
    """The fixed budget: :func:`budget` of every unit of every sample."""
    return [[budget(n, ratio, min_tokens) for n in lengths] for lengths in units]


def select_top(scores: torch.Tensor, valid: torch.Tensor, units: list[list[int]], ratio: float,
               min_tokens: int) -> torch.Tensor:
    """Keep mask ``[batch, max_count]``: in each budget unit (a run of consecutive visual tokens of one sample,
    ``units[b]`` their lengths) the ``budget(len)`` highest scores; ties go to the earlier token."""
    return select_counts(scores, valid, units, fixed_counts(units, ratio, min_tokens))


def select_counts(scores: torch.Tensor, valid: torch.Tensor, units: list[list[int]],
                  counts: list[list[int]]) -> torch.Tensor:
    """Like :func:`select_top` with explicit counts: the ``counts[b][u]`` highest scores of unit ``u``."""
    keep = torch.zeros_like(valid)
    for b, u, start, n in unit_spans(units):
        k = counts[b][u]
        if k:
            chunk = scores[b, start:start + n]
            chunk = chunk.to(torch.promote_types(chunk.dtype, torch.float32))  # float64 stays float64
            order = torch.sort(chunk, descending=True, stable=True).indices[:k]
            keep[b, start + order] = True
    return keep & valid


def unit_distribution(scores: torch.Tensor, units: list[list[int]], kind: str,
                      temperature: float = 1.0) -> torch.Tensor:
    """Each budget unit's scores as a distribution over its tokens: float64 ``[batch, max_count]``, every unit
    sums to 1, 0 at padding. ``kind``: ``"softmax"`` (scores are logits: ``softmax(scores / temperature)``) or
    ``"sum"`` (scores are non-negative relevance, negatives clamped to 0: ``scores ** (1 / temperature)`` divided
    by the unit's sum; uniform where that sum is 0). A ``temperature`` below 1 sharpens, above 1 flattens; the
    order of the tokens never changes."""
    if kind not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {kind!r}")
    out = torch.zeros(scores.shape, dtype=torch.float64, device=scores.device)
    for b, lengths in enumerate(units):
        start = 0
        for n in lengths:
            x = scores[b, start:start + n].double()
            if kind == "softmax":
                out[b, start:start + n] = torch.softmax(x / temperature, dim=0)
            elif n:
                x = x.clamp_min(0.0)
                top = x.max()
                x = (x / top) ** (1.0 / temperature) if top > 0 else x  # scaled by the max first: no overflow
                total = x.sum()
                out[b, start:start + n] = x / total if total > 0 else 1.0 / n
            start += n
    return out


def cumulative_mass(distribution: torch.Tensor, units: list[list[int]]) -> list[list[torch.Tensor]]:
    """Per sample and unit: the unit's relevance sorted in decreasing order (ties: earlier token first, as
    :func:`select_counts`), summed cumulatively."""
    out = []
    for b, lengths in enumerate(units):
        starts = [sum(lengths[:u]) for u in range(len(lengths))]
        out.append([torch.sort(distribution[b, s:s + n], descending=True, stable=True).values.cumsum(0)
                    for s, n in zip(starts, lengths, strict=True)])
    return out


def mass_budget(cumulative: torch.Tensor, mass: float, min_ratio: float, max_ratio: float, min_tokens: int) -> int:
    """Tokens one unit keeps under the relevance-mass rule: the smallest ``k`` whose ``k`` highest relevances sum
    to at least ``mass`` (``cumulative``: from :func:`cumulative_mass`), clamped to
    ``[budget(n, min_ratio), budget(n, max_ratio)]`` (:func:`budget`, so ``min_tokens`` wins over ``max_ratio``)."""
    n = cumulative.numel()
    below = int(torch.searchsorted(cumulative, torch.tensor([mass - MASS_TOLERANCE], dtype=cumulative.dtype,
                                                            device=cumulative.device)))
    reached = min(n, below + 1)
    return min(budget(n, max_ratio, min_tokens), max(budget(n, min_ratio, min_tokens), reached))


def mass_counts(cumulative: list[list[torch.Tensor]], mass: float, min_ratio: float, max_ratio: float,
                min_tokens: int) -> list[list[int]]:
    """:func:`mass_budget` of every unit of every sample: counts for :func:`select_counts`."""
    return [[mass_budget(c, mass, min_ratio, max_ratio, min_tokens) for c in sample] for sample in cumulative]


def distribution_counts(distribution: torch.Tensor, units: list[list[int]], mass: float, min_ratio: float,
                        max_ratio: float, min_tokens: int) -> list[list[int]]:
    """The ``budget="auto"`` budget: :func:`mass_budget` of every unit of a :func:`unit_distribution`."""
    return mass_counts(cumulative_mass(distribution, units), mass, min_ratio, max_ratio, min_tokens)


def select_mass(distribution: torch.Tensor, valid: torch.Tensor, units: list[list[int]], mass: float,
                min_ratio: float, max_ratio: float, min_tokens: int) -> torch.Tensor:
    """Keep mask ``[batch, max_count]`` of the relevance-mass rule on a :func:`unit_distribution`: in each unit the
    :func:`mass_budget` highest-relevance tokens."""
    counts = distribution_counts(distribution, units, mass, min_ratio, max_ratio, min_tokens)
    return select_counts(distribution, valid, units, counts)


@dataclass
class Slicing:
    """How to turn a ``[batch, length]`` sequence into the pruned ``[batch, new_length]`` one.

    ``index[b, j]`` is the original position of new slot ``j`` of row ``b``; ``slot_valid[b, j]`` is False for
    the extra left padding added so that rows keeping different counts line up.
    """

    index: torch.Tensor
    slot_valid: torch.Tensor

    @classmethod
    def from_keep(cls, keep: torch.Tensor) -> Slicing:
        """``keep[b, i]``: position ``i`` of row ``b`` stays. Rows are right-aligned (left padding)."""
        batch, length = keep.shape
        counts = keep.sum(dim=1)
        new_length = int(counts.max())
        pos = torch.arange(length, device=keep.device).expand(batch, -1)
        # stable sort puts kept positions last, in order: the last new_length entries are the row, left-padded
        order = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices
        index = torch.gather(pos, 1, order)[:, length - new_length:]
        slot_valid = torch.arange(new_length, device=keep.device)[None, :] >= (new_length - counts)[:, None]
        return cls(index=torch.where(slot_valid, index, 0), slot_valid=slot_valid)

    @property
    def length(self) -> int:
        return self.index.shape[1]

    def sequence(self, x: torch.Tensor) -> torch.Tensor:
        """Slice ``[batch, length, ...]``."""
        idx = self.index.view(*self.index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
        return torch.gather(x, 1, idx)

    def mask(self, dtype: torch.dtype = torch.long) -> torch.Tensor:
        """The 2-D attention mask of the sliced rows: 0 on the extra left padding."""
        return self.slot_valid.to(dtype)

    def positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Slice ``[rows, batch, length]`` position ids, keeping the original values."""
        idx = self.index.unsqueeze(0).expand(positions.shape[0], -1, -1)
        return torch.gather(positions, 2, idx)


def contiguous_positions(attention_mask: torch.Tensor, rows: int) -> torch.Tensor:
    """Position ids ``0, 1, 2, ...`` over the non-padding slots, as ``[rows, batch, length]``."""
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return pos.unsqueeze(0).expand(rows, -1, -1).contiguous()
