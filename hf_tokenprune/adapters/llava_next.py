"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): anyres images with ``image_newline`` tokens, 1-D positions.

Every visual token, the ``image_newline`` tokens included, is an ``<image>`` placeholder in ``input_ids``. Items come
from ``mm_encoder_outputs`` under ``generate`` (one tensor per image); on a plain forward from ``image_sizes``
through the token geometry below, so the count varies with the image's size and aspect.

Token geometry (``pack_image_features``): the base tile's grid (the whole image resized to one tile, no newlines),
then the grid of all tiles of the best-resolution canvas (the image resized into it, aspect kept, centered padding),
cut by ``unpad_image``, with a newline token (no region) after each row.

Structural tokens: the newline tokens are visual tokens like the others (the model scatters them into the
placeholders with the image's features): they are scored, counted in the budget and pruned like content
(docs/support.md has the reasons and the measured counts).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from transformers.image_processing_utils import select_best_resolution

from .base import Placeholder, PlaceholderAdapter
from .regions import ItemRegions, clip_boxes, grid_boxes, nan_boxes, spans


class LlavaNextAdapter(PlaceholderAdapter):
    model_types = ("llava_next",)
    vision_attention_refusal = (
        "its tokens come from anyres tiles that are unpadded, re-tiled and joined by newline tokens (LLaVA-OneVision "
        "also pools video frames), with no one-to-one map from tower patches to LLM tokens that hf_tokenprune "
        "implements; use a family with a single-grid tower (LLaVA-1.5, Qwen2-VL)")

    def input_item_lengths(self, call: Mapping[str, Any], placeholder: Placeholder) -> list[int] | None:
        sizes = call.get("image_sizes")  # each image's token count from its geometry (adjacent images form one run)
        if placeholder.kind != "image" or sizes is None:
            return None
        return [len(self.item_regions(call, "image", i, None)) for i in range(len(sizes))]

    def item_regions(self, inputs: Mapping[str, Any], kind: str, index: int,
                     original_size: tuple[int, int] | None) -> ItemRegions:
        height, width = inputs["image_sizes"][index].tolist()
        base = self._tile_spans(0, self._side(), self._side())
        return ItemRegions.cat([ItemRegions.of(grid_boxes(base, base)), self._anyres_regions(height, width)])

    def _side(self) -> int:
        """Patches per tile side."""
        vision = self.model.config.vision_config
        return vision.image_size // vision.patch_size

    def _max_tiles(self) -> int | None:
        """Above how many tiles' worth of tokens the anyres grid is shrunk (LLaVA-OneVision's ``anyres_max_N``);
        None: never."""
        return None

    def _tile_spans(self, first: float, last: float, n: int, tiles: int = 1) -> torch.Tensor:
        """``[n, 2]`` (start, stop) of ``n`` equal cells from patch-grid coordinate ``first`` to ``last`` of a row of
        ``tiles`` tiles, in units of the row's width. A tile's patches may leave a strip at its end unseen (SigLIP 384 /
        14: 27 patches cover 378 pixels): cells end at the last patch and start at their tile's edge."""
        vision = self.model.config.vision_config
        side, tile, patch = self._side(), vision.image_size, vision.patch_size
        cells = spans(torch.linspace(first, last, n + 1, dtype=torch.float64))
        cells = torch.where((cells - cells.round()).abs() < 1e-9, cells.round(), cells)  # exact tile edges
        start_tile = torch.floor(cells[:, 0] / side)
        stop_tile = torch.clamp(torch.ceil(cells[:, 1] / side) - 1, min=0)
        start = start_tile * tile + (cells[:, 0] - start_tile * side) * patch
        stop = stop_tile * tile + (cells[:, 1] - stop_tile * side) * patch
        return torch.stack([start, stop], dim=1) / (tiles * tile)

    def _anyres_regions(self, height: int, width: int) -> ItemRegions:
        """The high-resolution tokens of a ``height x width`` image, with the newline tokens."""
        config = self.model.config
        tile, side = config.vision_config.image_size, self._side()
        best_h, best_w = select_best_resolution((height, width), config.image_grid_pinpoints)
        # the image processor: aspect-preserving resize to fit best_h x best_w (get_patch_output_size), centered
        if best_w / width < best_h / height:
            new_w, new_h = best_w, min(math.ceil(height * best_w / width), best_h)
        else:
            new_w, new_h = min(math.ceil(width * best_h / height), best_w), best_h
        paste_x, paste_y = (best_w - new_w) // 2, (best_h - new_h) // 2
        # the model: the grid of all tiles, unpad_image, then (anyres_max_N) the interpolation
        rows, cols = best_h // tile * side, best_w // tile * side
        if width / height > cols / rows:
            pad = (rows - int(round(height * cols / width, 7))) // 2
            r0, r1, c0, c1 = pad, rows - pad, 0, cols
        else:
            pad = (cols - int(round(width * rows / height, 7))) // 2
            r0, r1, c0, c1 = 0, rows, pad, cols - pad
        out_r, out_c = r1 - r0, c1 - c0
        max_tiles = self._max_tiles()
        ratio = 0.0 if max_tiles is None else math.sqrt(out_r * out_c / (max_tiles * side**2))
        if ratio > 1.1:
            out_r, out_c = int(out_r // ratio), int(out_c // ratio)
        ys = (self._tile_spans(r0, r1, out_r, rows // side) * best_h - paste_y) / new_h
        xs = (self._tile_spans(c0, c1, out_c, cols // side) * best_w - paste_x) / new_w
        cells = clip_boxes(grid_boxes(ys, xs)).view(out_r, out_c, 4)
        with_newlines = torch.cat([cells, nan_boxes(out_r).view(out_r, 1, 4)], dim=1).view(-1, 4)
        return ItemRegions.of(with_newlines, level=1)
