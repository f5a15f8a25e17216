"""Token geometry: the region of the original image / video frame that each visual token encodes.

Boxes are ``(x0, y0, x1, y1)`` in coordinates normalised to ``[0, 1]`` of the item's original image (or video
frame): ``x`` from the left edge, ``y`` from the top. Tokens that encode no region (LLaVA-OneVision's
``image_newline`` tokens, LLaVA-1.5's CLS token under ``vision_feature_select_strategy="full"``) get a NaN box.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

KINDS = ("image", "video")


def spans(edges: torch.Tensor) -> torch.Tensor:
    """``[n, 2]`` (start, stop) of the ``n`` cells between consecutive ``edges``."""
    edges = edges.to(torch.float64)
    return torch.stack([edges[:-1], edges[1:]], dim=1)


def unit_spans(n: int) -> torch.Tensor:
    """``n`` equal cells of ``[0, 1]``."""
    return spans(torch.linspace(0, 1, n + 1, dtype=torch.float64))


def grid_boxes(ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """``[rows * cols, 4]`` boxes of the grid with row spans ``ys`` ``[rows, 2]`` and column spans ``xs``
    ``[cols, 2]``, row-major."""
    rows, cols = ys.shape[0], xs.shape[0]
    x0, x1 = xs[:, 0].expand(rows, -1), xs[:, 1].expand(rows, -1)
    y0, y1 = ys[:, :1].expand(-1, cols), ys[:, 1:].expand(-1, cols)
    return torch.stack([x0, y0, x1, y1], dim=-1).reshape(-1, 4).to(torch.float64)


def clip_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """Boxes clipped to the unit square; a box left empty becomes NaN (it covers no part of the item)."""
    boxes = boxes.clamp(0, 1)
    empty = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    return torch.where(empty[:, None], torch.nan, boxes)


def nan_boxes(n: int) -> torch.Tensor:
    return torch.full((n, 4), torch.nan, dtype=torch.float64)


@dataclass
class ItemRegions:
    """The regions of one image / video's tokens, in placeholder order (what a family adapter computes).

    ``frames[i]`` is the ``[start, stop)`` range of frames token ``i`` covers (``[0, 1)`` for images);
    ``level[i]`` its resolution level (0: the only or the coarse one; 1: LLaVA-OneVision's anyres tiles).
    """

    boxes: torch.Tensor  # [n, 4] float64
    frames: torch.Tensor  # [n, 2] long
    level: torch.Tensor  # [n] long

    def __len__(self) -> int:
        return self.boxes.shape[0]

    @classmethod
    def of(cls, boxes: torch.Tensor, frames: tuple[int, int] = (0, 1), level: int = 0) -> ItemRegions:
        """Boxes that share one frame range and level."""
        n = boxes.shape[0]
        return cls(boxes.to(torch.float64), torch.tensor([frames], dtype=torch.long).expand(n, -1),
                   torch.full((n,), level, dtype=torch.long))

    @classmethod
    def cat(cls, parts: Sequence[ItemRegions]) -> ItemRegions:
        return cls(torch.cat([p.boxes for p in parts]), torch.cat([p.frames for p in parts]),
                   torch.cat([p.level for p in parts]))


@dataclass
class VisualItem:
    """One image or video of a sample: ``index`` among the batch's images (or videos) in the order given to the
    processor, tokens ``[start, stop)`` among the sample's visual tokens, ``num_frames`` (1 for images; for
    videos the frames the model saw, Qwen's temporal padding included)."""

    kind: str
    index: int
    start: int
    stop: int
    num_frames: int


@dataclass
class TokenRegions:
    """Per visual token of one sample, in order of appearance (the order of ``PruneStats.kept_indices`` and of
    :class:`~hf_tokenprune.scorers.ScoreInputs`' packed tensors): ``boxes`` ``[N, 4]`` (NaN: no region),
    ``item`` ``[N]`` (index into ``items``), ``frames`` ``[N, 2]`` (``[start, stop)`` frames of the item),
    ``level`` ``[N]`` (resolution level, see :class:`ItemRegions`)."""

    boxes: torch.Tensor
    item: torch.Tensor
    frames: torch.Tensor
    level: torch.Tensor
    items: list[VisualItem]

    def __len__(self) -> int:
        return self.boxes.shape[0]

    @property
    def valid(self) -> torch.Tensor:
        """``[N]`` bool: the token has a region."""
        return ~self.boxes.isnan().any(dim=1)

    def overlapping(self, boxes: torch.Tensor) -> torch.Tensor:
        """``[N]`` bool: tokens whose region overlaps one of ``boxes`` ``[k, 5]`` = (raw video frame, 0 for an
        image; x0, y0, x1, y1 normalised to ``[0, 1]``) in that frame."""
        b = self.boxes[:, None]
        frame, x0, y0, x1, y1 = boxes.to(torch.float64).T[:, None]
        overlap = (b[..., 0] < x1) & (b[..., 2] > x0) & (b[..., 1] < y1) & (b[..., 3] > y0)
        in_frame = (self.frames[:, :1] <= frame) & (frame < self.frames[:, 1:])
        return (overlap & in_frame).any(dim=1) & self.valid

    def on(self, item: int, frame: int = 0) -> torch.Tensor:
        """``[N]`` bool: tokens with a region in frame ``frame`` of item ``item``."""
        in_frame = (self.frames[:, 0] <= frame) & (frame < self.frames[:, 1])
        return (self.item == item) & in_frame & self.valid

    @classmethod
    def from_items(cls, items: list[VisualItem], regions: list[ItemRegions]) -> TokenRegions:
        joined = ItemRegions.cat(regions) if regions else ItemRegions.of(nan_boxes(0))
        item = torch.cat([torch.full((len(r),), i, dtype=torch.long) for i, r in enumerate(regions)]) \
            if regions else torch.zeros(0, dtype=torch.long)
        return cls(joined.boxes, item, joined.frames, joined.level, items)
