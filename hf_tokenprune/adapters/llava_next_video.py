"""LLaVA-NeXT-Video: LLaVA-NeXT's anyres images (:mod:`.llava_next`) and videos whose frames are pooled before the LLM.

A video is one ``<video>`` placeholder per pooled token: every frame's patch grid (``side x side``) goes through the
``vision_resampler`` (``spatial_pool_stride`` pooling) to ``(side // stride)**2`` tokens, frames in order, no newline
tokens. Items come from ``mm_encoder_outputs`` under ``generate`` (one ``[frames * tokens, hidden]`` row per video;
transformers 5.20.0: ``[frames, tokens, hidden]`` per video, which its ``generate`` cannot repeat for beam search:
refused, see :meth:`LlavaNextVideoAdapter.expansion_refusal`) or from ``pixel_values_videos`` ``[videos, frames, C, H,
W]``; with ``scope="image"`` each frame is a budget unit.

Token geometry of a frame: the pooled grid of the frame as the video processor cropped it (shortest edge resized to
the tile, center crop), in coordinates of that crop (for a square video, the frame).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..compat import VIDEO_FEATURES_PER_FRAME
from .base import MalformedVisualInputError, Placeholder
from .llava_next import LlavaNextAdapter
from .regions import ItemRegions, grid_boxes


class LlavaNextVideoAdapter(LlavaNextAdapter):
    model_types = ("llava_next_video",)

    def expansion_refusal(self, call: Mapping[str, Any]) -> str | None:
        if VIDEO_FEATURES_PER_FRAME and call.get("pixel_values_videos") is not None:
            return ("transformers 5.20.0 hands LLaVA-NeXT-Video's video features over per frame, and its generate() "
                    "then splits them wrongly when it repeats them (the unpruned model fails too); fixed in 5.20.1")
        return None

    def _pooled_side(self) -> int:
        """Tokens per side of a pooled frame."""
        return self._side() // self.model.config.spatial_pool_stride

    def input_item_lengths(self, call: Mapping[str, Any], placeholder: Placeholder) -> list[int] | None:
        if placeholder.kind == "video":
            videos = call.get(placeholder.pixels)
            return None if videos is None else [int(videos.shape[1]) * self._pooled_side() ** 2] * videos.shape[0]
        return super().input_item_lengths(call, placeholder)

    def frames(self, length: int, token_id: int, positions: torch.Tensor, call: dict[str, Any]) -> list[int]:
        if token_id != self.model.config.video_token_id:
            return [length]
        per_frame = self._pooled_side() ** 2
        n_frames, rest = divmod(length, per_frame)
        if rest or n_frames < 1:
            raise MalformedVisualInputError(f"a video of {length} placeholder tokens is not frames x {per_frame}")
        return [per_frame] * n_frames

    def item_regions(self, inputs: Mapping[str, Any], kind: str, index: int,
                     original_size: tuple[int, int] | None) -> ItemRegions:
        if kind != "video":
            return super().item_regions(inputs, kind, index, original_size)
        frames = len(inputs["pixel_values_videos"][index])
        pooled = self._pooled_side()
        cells = self._tile_spans(0, pooled * self.model.config.spatial_pool_stride, pooled)
        return ItemRegions.cat([ItemRegions.of(grid_boxes(cells, cells), (f, f + 1)) for f in range(frames)])
