"""Which visual tokens show a world question's evidence: the answer's box, or the objects its key word names."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..adapters.regions import TokenRegions
from .scenes import Sample


def normalised_boxes(sample: Sample, boxes: Sequence[tuple[int, int, int, int, int]]) -> torch.Tensor:
    """``[k, 5]`` float64: (raw video frame, x0, y0, x1, y1 in ``[0, 1]`` of the frame) of scene ``boxes``."""
    width, height = sample.scene.size
    repeat = sample.scene.repeat if sample.is_video else 0
    return torch.tensor([(f * repeat, x0 / width, y0 / height, x1 / width, y1 / height)
                         for f, x0, y0, x1, y1 in boxes], dtype=torch.float64).reshape(-1, 5)


def answer_tokens(regions: TokenRegions, sample: Sample) -> torch.Tensor:
    """``[N_v]`` bool: tokens whose region overlaps the answer's box (and, for videos, its frame)."""
    return regions.overlapping(normalised_boxes(sample, sample.question.boxes[:1]))
