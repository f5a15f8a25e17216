"""Model-agnostic slicing: per-sample top-k -> keep mask -> shorter, re-padded sequences.

Pure tensor code. Sequences are ``[batch, length, ...]``; position ids are ``[rows, batch, length]``. Packed
per-visual-token tensors are ``[batch, max_visual]`` with the visual tokens of each sample in order of
appearance, padded at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def budget(n: int, ratio: float, min_tokens: int) -> int:
    """Tokens kept out of ``n``: ``ceil(ratio * n)``, at least ``min_tokens``, at most ``n``."""
    return min(n, max(min_tokens, math.ceil(ratio * n - 1e-9)))


def pack(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather ``values[b, mask[b]]`` into ``[batch, max_count]`` (order kept) and a validity mask."""
    counts = mask.sum(dim=1)
    width = int(counts.max()) if counts.numel() else 0
    valid = torch.arange(width, device=mask.device)[None, :] < counts[:, None]
    packed = values.new_zeros((values.shape[0], width))
    packed[valid] = values[mask]
    return packed, valid


def select_top(scores: torch.Tensor, valid: torch.Tensor, units: list[list[int]], ratio: float,
               min_tokens: int) -> torch.Tensor:
    """Keep mask ``[batch, max_count]``: in each budget unit (a run of consecutive visual tokens of one sample,
    ``units[b]`` their lengths) the ``budget(len)`` highest scores; ties go to the earlier token."""
    counts = [[budget(n, ratio, min_tokens) for n in lengths] for lengths in units]
    return select_counts(scores, valid, units, counts)


def select_counts(scores: torch.Tensor, valid: torch.Tensor, units: list[list[int]],
                  counts: list[list[int]]) -> torch.Tensor:
    """Like :func:`select_top` with explicit counts: the ``counts[b][u]`` highest scores of unit ``u``."""
    keep = torch.zeros_like(valid)
    for b, lengths in enumerate(units):
        start = 0
        for n, k in zip(lengths, counts[b], strict=True):
            if k:
                chunk = scores[b, start:start + n].float()
                order = torch.sort(chunk, descending=True, stable=True).indices[:k]
                keep[b, start + order] = True
            start += n
    return keep & valid


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
