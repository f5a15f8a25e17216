"""LLaVA-OneVision: LLaVA-NeXT's anyres images (with newline tokens) and pooled video frames, 1-D positions.

Every visual token, including the ``image_newline`` tokens, is an ``<image>`` / ``<video>`` placeholder in
``input_ids``. Items come from ``mm_encoder_outputs`` under ``generate`` (one tensor per image; videos as one
``[videos, frames * pooled**2 + 1, hidden]`` tensor); on a plain forward from ``image_sizes`` and
``batch_num_images`` through the token geometry below. A video is ``frames * pooled**2`` frame tokens followed
by one newline token, which joins the last frame.

Token geometry (``pack_image_features``): an image given alone in its sample (``batch_num_images`` 1) is laid out as
in LLaVA-NeXT (:mod:`.llava_next`), its anyres grid (for ``anyres_max_N``) bilinearly shrunk if larger than ``N``
tiles. An image of a multi-image sample is the base tile of the image padded to a square, plus one newline token.
Video frames are each resized to one tile; their grids are bilinearly pooled to half size. A shrunk or pooled cell's
region is the span of the grid it is interpolated from (its bilinear weights reach up to half a source cell further,
so it only approximates what the token sees).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from .base import MalformedVisualInputError, Placeholder
from .llava_next import LlavaNextAdapter
from .regions import ItemRegions, clip_boxes, grid_boxes, nan_boxes


class LlavaOnevisionAdapter(LlavaNextAdapter):
    model_types = ("llava_onevision",)

    def input_item_lengths(self, call: Mapping[str, Any], placeholder: Placeholder) -> list[int] | None:
        if placeholder.kind == "video":
            videos = call.get(placeholder.pixels)
            return None if videos is None else [int(videos.shape[1] * self._pooled() + 1)] * videos.shape[0]
        return super().input_item_lengths(call, placeholder)

    def _pooled(self) -> int:
        return math.ceil(self._side() / 2) ** 2

    def _max_tiles(self) -> int | None:
        return int(getattr(self.model.config, "vision_aspect_ratio", "anyres_max_9").removeprefix("anyres_max_"))

    def frames(self, length: int, token_id: int, positions: torch.Tensor, call: dict[str, Any]) -> list[int]:
        if token_id != self.model.config.video_token_id:
            return [length]
        pooled = self._pooled()
        n_frames, rest = divmod(length - 1, pooled)
        if rest or n_frames < 1:
            raise MalformedVisualInputError(
                f"a video of {length} placeholder tokens is not frames x {pooled} tokens + 1 newline token")
        return [pooled] * (n_frames - 1) + [pooled + 1]

    def item_regions(self, inputs: Mapping[str, Any], kind: str, index: int,
                     original_size: tuple[int, int] | None) -> ItemRegions:
        side = self._side()
        if kind == "video":  # pooled cells cover the span of the grid they are interpolated from
            frames = len(inputs["pixel_values_videos"][index])
            pooled = self._tile_spans(0, side, math.isqrt(self._pooled()))
            cells = grid_boxes(pooled, pooled)
            return ItemRegions.cat([*(ItemRegions.of(cells, (f, f + 1)) for f in range(frames)),
                                    ItemRegions.of(nan_boxes(1), (frames - 1, frames))])
        per_sample = inputs.get("batch_num_images")
        alone = per_sample is None or [n == 1 for n in per_sample.tolist() for _ in range(n)][index]
        if alone:
            return super().item_regions(inputs, kind, index, original_size)
        # an image of a multi-image sample: pad_to_square (centered), resized to one tile
        height, width = inputs["image_sizes"][index].tolist()
        base = self._tile_spans(0, side, side)
        square = max(height, width)
        ys = (base * square - (square - height) // 2) / height
        xs = (base * square - (square - width) // 2) / width
        return ItemRegions.cat([ItemRegions.of(clip_boxes(grid_boxes(ys, xs))), ItemRegions.of(nan_boxes(1))])
