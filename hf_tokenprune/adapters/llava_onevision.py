"""LLaVA-OneVision: anyres images (with newline tokens) and pooled video frames, 1-D positions.

Every visual token, including the ``image_newline`` tokens, is an ``<image>`` / ``<video>`` placeholder in
``input_ids``. Items come from ``mm_encoder_outputs`` under ``generate`` (one tensor per image; videos as one
``[videos, frames * pooled**2 + 1, hidden]`` tensor); on a plain forward from ``image_sizes`` and
``batch_num_images`` through the token geometry below. A video is ``frames * pooled**2`` frame tokens followed
by one newline token, which joins the last frame.

Token geometry (``pack_image_features``): an image given alone in its sample (``batch_num_images`` 1) is the
base tile's grid (the whole image resized to one tile, no newlines), then the anyres grid of the padded
best-resolution canvas, unpadded, (for ``anyres_max_N``) bilinearly shrunk if larger than ``N`` tiles, with a
newline token after each row. An image of a multi-image sample is the base tile of the image padded to a square,
plus one newline token. Video frames are each resized to one tile; their grids are bilinearly pooled to half size.
A shrunk or pooled cell's region is the span of the grid it is interpolated from (its bilinear weights reach up
to half a source cell further, so it only approximates what the token sees).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from transformers.image_processing_utils import select_best_resolution

from .base import MalformedVisualInputError, Placeholder, PlaceholderAdapter
from .regions import ItemRegions, clip_boxes, grid_boxes, nan_boxes, spans


class LlavaOnevisionAdapter(PlaceholderAdapter):
    model_types = ("llava_onevision",)

    def input_item_lengths(self, call: Mapping[str, Any], placeholder: Placeholder) -> list[int] | None:
        if placeholder.kind == "video":
            videos = call.get(placeholder.pixels)
            return None if videos is None else [int(videos.shape[1] * self._pooled() + 1)] * videos.shape[0]
        sizes = call.get("image_sizes")  # each image's token count from its geometry (adjacent images form one run)
        return None if sizes is None else [len(self.item_regions(call, "image", i, None)) for i in range(len(sizes))]

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

    def item_regions(self, inputs: Mapping[str, Any], kind: str, index: int,
                     original_size: tuple[int, int] | None) -> ItemRegions:
        side = self._side()
        if kind == "video":  # pooled cells cover the span of the grid they are interpolated from
            frames = len(inputs["pixel_values_videos"][index])
            pooled = self._tile_spans(0, side, math.isqrt(self._pooled()))
            cells = grid_boxes(pooled, pooled)
            return ItemRegions.cat([*(ItemRegions.of(cells, (f, f + 1)) for f in range(frames)),
                                    ItemRegions.of(nan_boxes(1), (frames - 1, frames))])
        height, width = inputs["image_sizes"][index].tolist()
        per_sample = inputs.get("batch_num_images")
        alone = per_sample is None or [n == 1 for n in per_sample.tolist() for _ in range(n)][index]
        base = self._tile_spans(0, side, side)
        if alone:
            return ItemRegions.cat([ItemRegions.of(grid_boxes(base, base)), self._anyres_regions(height, width)])
        # an image of a multi-image sample: pad_to_square (centered), resized to one tile
        square = max(height, width)
        ys = (base * square - (square - height) // 2) / height
        xs = (base * square - (square - width) // 2) / width
        return ItemRegions.cat([ItemRegions.of(clip_boxes(grid_boxes(ys, xs))), ItemRegions.of(nan_boxes(1))])

    def _side(self) -> int:
        """Patches per tile side."""
        vision = self.model.config.vision_config
        return vision.image_size // vision.patch_size

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
        # the model: the grid of all tiles, unpad_image, then the anyres_max_N interpolation
        rows, cols = best_h // tile * side, best_w // tile * side
        if width / height > cols / rows:
            pad = (rows - int(round(height * cols / width, 7))) // 2
            r0, r1, c0, c1 = pad, rows - pad, 0, cols
        else:
            pad = (cols - int(round(width * rows / height, 7))) // 2
            r0, r1, c0, c1 = 0, rows, pad, cols - pad
        out_r, out_c = r1 - r0, c1 - c0
        max_tiles = int(getattr(config, "vision_aspect_ratio", "anyres_max_9").removeprefix("anyres_max_"))
        ratio = math.sqrt(out_r * out_c / (max_tiles * side**2))
        if ratio > 1.1:
            out_r, out_c = int(out_r // ratio), int(out_c // ratio)
        ys = (self._tile_spans(r0, r1, out_r, rows // side) * best_h - paste_y) / new_h
        xs = (self._tile_spans(c0, c1, out_c, cols // side) * best_w - paste_x) / new_w
        cells = clip_boxes(grid_boxes(ys, xs)).view(out_r, out_c, 4)
        with_newlines = torch.cat([cells, nan_boxes(out_r).view(out_r, 1, 4)], dim=1).view(-1, 4)
        return ItemRegions.of(with_newlines, level=1)
