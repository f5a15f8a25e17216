"""Idefics3 and SmolVLM: pixel-shuffled tiles, each a block of ``<image>`` placeholders between text markers.

The processor resizes an image's longest edge to a whole number of tiles (the real checkpoints: 4) and splits it into
``rows x cols`` tiles plus the global image (the whole image resized to one tile); the connector pixel-shuffles each
into one block of ``(image_size // patch_size)**2 / scale_factor**2`` visual tokens. The prompt holds an image as
``<fake_token_around_image><row_r_col_c>`` + block for each tile, row by row (a newline after each row), then
``<fake_token_around_image><global-img>`` + block + ``<fake_token_around_image>``; an image that is not split, and
each frame of a SmolVLM video, is the global part alone. Only the ``<image>`` placeholders are visual; the markers and
newlines are text, kept as they are, and not part of the instruction.

Every image ends with its global block, so the token before the last block of a sample is ``<global-img>`` and every
block after that token ends an image (:meth:`Idefics3Adapter.images`). SmolVLM videos: the processor splits every
image into tiles (unless ``do_image_splitting=False``), so consecutive one-block images are a video's frames. With
image splitting off, unsplit images read as video frames too in :meth:`~.tiles.TiledAdapter.token_regions`, and two
videos with no image between them as one video; pruning is the same either way.
"""

from __future__ import annotations

import torch
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

from .tiles import TiledAdapter


class Idefics3Adapter(TiledAdapter):
    """Idefics3 (images only); :class:`SmolVLMAdapter` adds its videos."""

    model_types = ("idefics3",)
    marker_width = 2  # <fake_token_around_image><row_r_col_c> / <global-img>

    @property
    def block(self) -> int:
        vision = self.model.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2 // self.model.config.scale_factor ** 2

    def images(self, row: torch.Tensor, visual: torch.Tensor) -> list[list[tuple[int, int]]]:
        """Blocks grouped into images: an image ends with the block after ``<global-img>``, the token before the
        sample's last block."""
        blocks = [block for run in self.runs(visual) for block in run]
        if not blocks:
            return []
        marker = row[blocks[-1][0] - 1] if blocks[-1][0] > 0 else None
        images: list[list[tuple[int, int]]] = [[]]
        for start, length in blocks:
            images[-1].append((start, length))
            if start > 0 and row[start - 1] == marker:
                images.append([])
        return [image for image in images if image]

    def tile_grid(self, width: int, height: int, tiles: int) -> tuple[int, int]:
        """The grid the image processor gives a ``width x height`` image for the longest edge of a whole number of
        tiles that yields ``tiles`` tiles."""
        tile = self.model.config.vision_config.image_size
        processor = Idefics3ImageProcessorPil()
        grids = set()
        for longest in range(2, tiles + 1):
            _, rows, cols = processor.get_number_of_image_patches(
                height, width, {"do_image_splitting": True, "size": {"longest_edge": longest * tile},
                                "max_image_size": {"longest_edge": tile}})
            if rows * cols == tiles:
                grids.add((rows, cols))
        if len(grids) != 1:
            raise ValueError(f"cannot tell the tile grid of a {width}x{height} image split into {tiles} tiles "
                             f"(candidates: {sorted(grids)})")
        return grids.pop()


class SmolVLMAdapter(Idefics3Adapter):
    """SmolVLM: Idefics3's layout; a video is its frames, one global block each."""

    model_types = ("smolvlm",)
    video_frames = 1
