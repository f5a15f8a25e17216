"""LLaVA-1.5 (``LlavaForConditionalGeneration``): fixed-size images, no video, 1-D positions.

Every image is resized and cropped to the vision tower's input size, so each gives the same number of
``<image>`` placeholders (CLIP ViT-L/14-336: 576 patch features, the CLS token dropped by
``vision_feature_select_strategy="default"``). Items come from ``mm_encoder_outputs`` under ``generate`` (a list
with one tensor per image); on a plain forward the ``[images, C, H, W]`` ``pixel_values`` give equal counts
whose sum transformers has already checked against the placeholders. Adjacent images (``<image><image>``) are
split by these counts.
"""

from __future__ import annotations

from typing import Any

from .base import Adapter


class LlavaAdapter(Adapter):
    model_types = ("llava",)

    def item_lengths(self, call: dict[str, Any], token_id: int) -> list[int] | None:
        lengths = super().item_lengths(call, token_id)
        pixels = call.get("pixel_values")
        if lengths is not None or pixels is None or call.get("image_sizes") is not None:
            return lengths
        images = int(pixels.shape[0])
        return [int((call["input_ids"] == token_id).sum()) // images] * images
