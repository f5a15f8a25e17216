"""InternVL: dynamic tiles plus a thumbnail, pixel-shuffled, as one run of ``<IMG_CONTEXT>`` between ``<img>`` and
``</img>``.

The image processor (GOT-OCR2's ``crop_to_patches``) resizes an image onto the ``cols x rows`` grid of tiles whose
aspect ratio is closest to the image's and appends a thumbnail (the whole image resized to one tile) when there is
more than one tile; the model pixel-shuffles each tile into one block of ``(image_size / patch_size *
downsample_ratio)**2`` visual tokens. Each image (each video frame: one tile) is one run of placeholders;
``<img>`` / ``</img>`` around it are text, kept, and not part of the instruction.

Videos reach the model as their frames, images of one tile each. :meth:`~.tiles.TiledAdapter.token_regions` reads two
or more consecutive one-tile images as a video's frames: an image the processor leaves as one tile (a small, nearly
square one) next to another such image, or right before a video, is read as a video frame; pruning is the same either
way.
"""

from __future__ import annotations

import torch
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

from .tiles import TiledAdapter


def _side(value: int | list[int] | tuple[int, ...]) -> int:
    return value if isinstance(value, int) else value[0]


class InternVLAdapter(TiledAdapter):
    model_types = ("internvl",)
    video_frames = 2

    @property
    def block(self) -> int:
        config = self.model.config
        vision = config.vision_config
        return int(_side(vision.image_size) // _side(vision.patch_size) * config.downsample_ratio) ** 2

    def images(self, row: torch.Tensor, visual: torch.Tensor) -> list[list[tuple[int, int]]]:
        """One image (or video frame) per run of placeholders."""
        return self.runs(visual)

    def tile_grid(self, width: int, height: int, tiles: int) -> tuple[int, int]:
        """The processor's grid among those of ``tiles`` tiles: the closest aspect ratio (its ties broken as it
        does)."""
        tile = _side(self.model.config.vision_config.image_size)
        cols, rows = get_optimal_tiled_canvas((height, width), (tile, tile), tiles, tiles)
        return rows, cols
