"""Pixtral-style images: Mistral 3 (``Mistral3ForConditionalGeneration``) and LLaVA with a Pixtral tower, 1-D positions.

The processor writes an image as its token rows, each row ``[IMG] * cols`` followed by ``[IMG_BREAK]``, the last row
by ``[IMG_END]`` instead; ``image_sizes`` holds each image's resized size (a multiple of the token's pixel size:
``patch_size * spatial_merge_size``). Only ``[IMG]`` is a placeholder: the model embeds ``[IMG_BREAK]`` and
``[IMG_END]`` from its vocabulary, so they are text to pruning: never scored or pruned, not counted as visual tokens
and not part of the instruction. An image's tokens therefore span one placeholder run per row
(:meth:`PixtralAdapter.placeholder_runs` joins them). Items come from ``mm_encoder_outputs`` under ``generate`` (one
tensor per image) or from ``image_sizes``.

Token geometry: the resized image is the whole image (stretched to the rounded size, no padding or crop), so token
``(row, col)`` covers cell ``(row, col)`` of a ``rows x cols`` grid over the original image.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .base import Placeholder, PlaceholderAdapter, _runs
from .regions import ItemRegions, grid_boxes, unit_spans


class PixtralAdapter(PlaceholderAdapter):
    """Mistral 3: Pixtral patches merged ``spatial_merge_size`` x ``spatial_merge_size`` into one token."""

    model_types = ("mistral3",)
    vision_attention_refusal = (
        "the Pixtral tower has no CLS token and attends over the patches of every image of the batch in one "
        "block-diagonal sequence (Mistral 3 then merges patches with a learned unfold), which hf_tokenprune does not "
        "map to the LLM's visual tokens")

    def _token_pixels(self) -> int:
        """The side in pixels of the square a token covers in the resized image."""
        return self.model.config.vision_config.patch_size * self.model.config.spatial_merge_size

    def _grid(self, inputs: Mapping[str, Any], index: int) -> tuple[int, int]:
        """``(rows, cols)`` of tokens of image ``index``."""
        height, width = (int(v) for v in inputs["image_sizes"][index])
        return height // self._token_pixels(), width // self._token_pixels()

    def input_item_lengths(self, call: Mapping[str, Any], placeholder: Placeholder) -> list[int] | None:
        sizes = call.get("image_sizes")
        if sizes is None:
            return None
        return [rows * cols for rows, cols in (self._grid(call, i) for i in range(len(sizes)))]

    def placeholder_runs(self, row: torch.Tensor, token_id: int, kind: str) -> list[tuple[int, int]]:
        """Runs of ``token_id`` separated by one token (an ``[IMG_BREAK]``) are joined: an image's rows."""
        joined: list[tuple[int, int]] = []
        last_end = None
        for start, length in _runs(row == token_id):
            if last_end is not None and start == last_end + 1:
                joined[-1] = (joined[-1][0], joined[-1][1] + length)
            else:
                joined.append((start, length))
            last_end = start + length
        return joined

    def structure_tokens(self, input_ids: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """The token after each placeholder run: ``[IMG_BREAK]`` or ``[IMG_END]``."""
        after_run = torch.zeros_like(visual)
        after_run[:, 1:] = visual[:, :-1] & ~visual[:, 1:]
        return after_run

    def item_regions(self, inputs: Mapping[str, Any], kind: str, index: int,
                     original_size: tuple[int, int] | None) -> ItemRegions:
        rows, cols = self._grid(inputs, index)
        return ItemRegions.of(grid_boxes(unit_spans(rows), unit_spans(cols)))


class LlavaPixtralAdapter(PixtralAdapter):
    """``LlavaForConditionalGeneration`` with a Pixtral tower (pixtral-12b): one token per patch (the LLaVA
    :class:`~.llava.LlavaAdapter` hands such models to this class)."""

    model_types = ()  # model_type "llava": chosen by LlavaAdapter.for_model

    def _token_pixels(self) -> int:
        return self.model.config.vision_config.patch_size
