"""LLaVA-OneVision: anyres images (with newline tokens) and pooled video frames, 1-D positions.

Every visual token, including the ``image_newline`` tokens, is an ``<image>`` / ``<video>`` placeholder in
``input_ids``. Items come from ``mm_encoder_outputs`` under ``generate`` (one tensor per image; videos as one
``[videos, frames * pooled**2 + 1, hidden]`` tensor); on a plain forward a run of image placeholders is one
image. A video is ``frames * pooled**2`` frame tokens followed by one newline token, which joins the last frame.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .base import Adapter, MalformedVisualInputError


class LlavaOnevisionAdapter(Adapter):
    model_types = ("llava_onevision",)

    def item_lengths(self, call: dict[str, Any], token_id: int) -> list[int] | None:
        if token_id == self.model.config.image_token_id:
            return super().item_lengths(call, token_id)
        output = (call.get("mm_encoder_outputs") or {}).get("video")
        videos = output.pooler_output if output is not None else call.get("pixel_values_videos")
        if videos is None:
            return None
        per_video = videos.shape[1] if output is not None else videos.shape[1] * self._pooled() + 1
        return [int(per_video)] * videos.shape[0]

    def _pooled(self) -> int:
        vision = self.model.config.vision_config
        return math.ceil(vision.image_size // vision.patch_size / 2) ** 2

    def frames(self, length: int, token_id: int, positions: torch.Tensor, call: dict[str, Any]) -> list[int]:
        if token_id != self.model.config.video_token_id:
            return [length]
        pooled = self._pooled()
        n_frames, rest = divmod(length - 1, pooled)
        if rest or n_frames < 1:
            raise MalformedVisualInputError(
                f"a video of {length} placeholder tokens is not frames x {pooled} tokens + 1 newline token")
        return [pooled] * (n_frames - 1) + [pooled + 1]
