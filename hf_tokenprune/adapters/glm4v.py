"""GLM-4.1V (``glm4v``) and GLM-4.5V (``glm4v_moe``): Qwen-style 2x2 merged grids and 3-D M-RoPE (``get_rope_index``),
video frames as image runs separated by timestamps.

GLM marks image and video tokens with the same ``image_token_id`` (``<|image|>``): a call's placeholders are its
images or its videos, by the visual inputs it brings (transformers scatters either kind into every ``<|image|>``
position, so one call cannot hold both). Each video frame is its own ``<|begin_of_image|>...<|end_of_image|>`` run
followed by its timestamp (:class:`~.qwen3_vl.FrameRunsAdapter`). Positions, items and geometry are Qwen2-VL's.
Beam search and several return sequences on videos are refused (:meth:`Glm4vAdapter.expansion_refusal`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import Placeholder
from .qwen3_vl import FrameRunsAdapter


class Glm4vAdapter(FrameRunsAdapter):
    """GLM-4V: one placeholder id for images and video frames; GLM's image / video start and end tokens."""

    model_types = ("glm4v", "glm4v_moe")

    @property
    def placeholders(self) -> tuple[Placeholder, ...]:
        token = self.model.config.image_token_id
        return Placeholder(token, "image", "pixel_values"), Placeholder(token, "video", "pixel_values_videos")

    @property
    def special_token_ids(self) -> frozenset[int]:
        return super().special_token_ids | self._config_token_ids(
            "image_start_token_id", "image_end_token_id", "video_start_token_id", "video_end_token_id")

    def expansion_refusal(self, call: Mapping[str, Any]) -> str | None:
        encoded = call.get("mm_encoder_outputs") or {}
        if call.get("pixel_values_videos") is not None or encoded.get("video") is not None:
            return ("transformers' GLM-4V generate() counts a sample's video tokens by video_token_id, which GLM's "
                    "processor never writes (video frames are <|image|> tokens), so it cannot repeat video features "
                    "for beams or several return sequences (the unpruned model fails too)")
        return None
