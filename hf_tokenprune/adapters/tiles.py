"""Tiled families: an image is split into tiles plus a view of the whole image, each one block of placeholders.

SmolVLM / Idefics3 (:mod:`.idefics3`) and InternVL (:mod:`.internvl`) resize an image onto a ``rows x cols`` grid of
tiles of the vision tower's input size, add the whole image resized to one tile (Idefics3's global image, InternVL's
thumbnail; none when the image is a single tile), and pixel-shuffle each into one block of ``block`` visual tokens,
the tiles row by row and the whole image last. Video frames are one block each. The config does not name the text
tokens the processor writes around the blocks (row / column markers, image start and end), and ``generate``'s
pre-encoded features do not separate the images, so the blocks of each image are read from ``input_ids``
(:meth:`TiledAdapter.images`).

The model has no video input: a video reaches it as its frames, images of one block each. For pruning every frame is
an item (its own unit with ``scope="image"``). :meth:`~TiledAdapter.token_regions` reports a run of at least
:attr:`~TiledAdapter.video_frames` consecutive one-block images as the frames of one video (see the families' notes
on when that reading fails).

Token geometry: tile ``(r, c)`` covers the ``(r, c)`` cell of the grid over the whole image (the image is resized onto
the grid, without padding), the last block the whole image; in each, the tokens are the row-major cells of the
pixel-shuffled patch grid. The grid shape of a split image follows from its size (``original_sizes``) and tile count
(:meth:`TiledAdapter.tile_grid`).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from .base import MalformedVisualInputError, PlaceholderAdapter, _runs
from .regions import ItemRegions, TokenRegions, VisualItem, grid_boxes, unit_spans


class TiledAdapter(PlaceholderAdapter):
    """A placeholder model whose images are blocks of tiles plus the whole image (module docstring)."""

    #: how many consecutive one-block images :meth:`token_regions` reads as a video's frames (None: no videos)
    video_frames: ClassVar[int | None] = None
    #: text tokens the processor writes before each run of placeholders (markers such as ``<img>``)
    marker_width: ClassVar[int] = 1

    @property
    @abstractmethod
    def block(self) -> int:
        """Visual tokens per tile."""

    @abstractmethod
    def images(self, row: torch.Tensor, visual: torch.Tensor) -> list[list[tuple[int, int]]]:
        """The ``(start, length)`` blocks of each image (or video frame) of one sample (``row``: its ``input_ids``,
        ``visual``: its placeholder mask), in order; the whole-image block last."""

    @abstractmethod
    def tile_grid(self, width: int, height: int, tiles: int) -> tuple[int, int]:
        """``(rows, cols)`` of a ``width x height`` image the processor split into ``tiles`` tiles."""

    def runs(self, visual: torch.Tensor) -> list[list[tuple[int, int]]]:
        """The ``(start, length)`` blocks of each run of one sample's placeholder mask; raises
        :class:`MalformedVisualInputError` where a run is not whole blocks."""
        runs = _runs(visual)
        if any(length % self.block for _, length in runs):
            raise MalformedVisualInputError(f"a run of placeholders is not whole blocks of {self.block} tokens "
                                            f"(runs: {[length for _, length in runs]})")
        return [[(start + i, self.block) for i in range(0, length, self.block)] for start, length in runs]

    def item_lengths(self, call: dict[str, Any], token_id: int) -> list[int] | None:
        """Each image's (frame's) tokens, from ``input_ids``, checked against the tokens the call's visual inputs give
        (transformers scatters them in order over the batch)."""
        input_ids = call["input_ids"]
        visual = input_ids == token_id
        found = [len(image) * self.block for b in range(input_ids.shape[0])
                 for image in self.images(input_ids[b], visual[b])]
        given = self._given_tokens(call)
        if given is not None and given != sum(found):
            raise MalformedVisualInputError(f"the batch has {sum(found)} visual placeholders but its visual inputs "
                                            f"give {given} tokens")
        return found

    def _given_tokens(self, call: Mapping[str, Any]) -> int | None:
        """The visual tokens the call's visual inputs give: ``generate``'s features, or a block per non-empty tile of
        ``pixel_values`` (all-zero tiles pad a batch)."""
        encoded = (call.get("mm_encoder_outputs") or {}).get("image")
        if encoded is not None:
            pooled = encoded.pooler_output
            pooled = list(pooled) if isinstance(pooled, (list, tuple)) else [pooled]
            return sum(int(f.numel() // f.shape[-1]) for f in pooled)
        pixels = call.get("pixel_values")
        if isinstance(pixels, torch.Tensor) and pixels.dim() >= 4:
            return int((pixels.flatten(0, -4) != 0).flatten(1).any(dim=1).sum()) * self.block
        return None

    def structure_tokens(self, input_ids: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """The :attr:`marker_width` markers before each run of placeholders and the token after it."""
        marks = torch.zeros_like(visual)
        for b in range(input_ids.shape[0]):
            for start, length in _runs(visual[b]):
                marks[b, max(start - self.marker_width, 0):start] = True
                marks[b, start + length:start + length + 1] = True
        return marks

    def placeholder_runs(self, row: torch.Tensor, token_id: int, kind: str) -> list[tuple[int, int]]:
        """One ``(start, tokens)`` per image: its blocks joined."""
        return [(image[0][0], len(image) * self.block) for image in self.images(row, row == token_id)]

    def media(self, row: torch.Tensor, visual: torch.Tensor) -> list[tuple[str, list[tuple[int, int]]]]:
        """The images and videos of one sample, in order, with their blocks (a video: one per frame)."""
        groups: list[list[list[tuple[int, int]]]] = []  # consecutive one-block images grouped
        for image in self.images(row, visual):
            if len(image) == 1 and groups and len(groups[-1][-1]) == 1:
                groups[-1].append(image)
            else:
                groups.append([image])
        out: list[tuple[str, list[tuple[int, int]]]] = []
        for group in groups:
            if len(group[0]) == 1 and self.video_frames is not None and len(group) >= self.video_frames:
                out.append(("video", [block for frame in group for block in frame]))
            else:
                out.extend(("image", image) for image in group)
        return out

    def token_regions(self, inputs: Mapping[str, Any], sample: int = 0, *,
                      original_sizes: Sequence[tuple[int, int]] | None = None) -> TokenRegions:
        """Each image's and video's regions (:meth:`media`), in prompt order; ``original_sizes`` are needed for
        split images."""
        input_ids = inputs["input_ids"]
        visual = input_ids == self.model.config.image_token_id
        given = self._given_tokens(inputs)
        if given is not None and given != int(visual.sum()):
            raise MalformedVisualInputError(f"{int(visual.sum())} visual placeholders but the visual inputs give "
                                            f"{given} tokens")
        used = {"image": 0, "video": 0}
        items: list[VisualItem] = []
        regions: list[ItemRegions] = []
        for b in range(sample + 1):
            offset = 0
            for kind, blocks in self.media(input_ids[b], visual[b]):
                size = None
                if kind == "image" and original_sizes is not None:
                    if used["image"] >= len(original_sizes):
                        raise ValueError(f"original_sizes has {len(original_sizes)} entries; the inputs have more "
                                         "images")
                    size = tuple(original_sizes[used["image"]])
                item = self._regions(kind, len(blocks), size)
                if b == sample:
                    frames = len(blocks) if kind == "video" else 1
                    items.append(VisualItem(kind, used[kind], offset, offset + len(item), frames))
                    regions.append(item)
                used[kind] += 1
                offset += len(item)
        return TokenRegions.from_items(items, regions)

    def item_regions(self, inputs: Mapping[str, Any], kind: str, index: int,
                     original_size: tuple[int, int] | None) -> ItemRegions:
        input_ids = inputs["input_ids"]
        visual = input_ids == self.model.config.image_token_id
        found = [blocks for b in range(input_ids.shape[0]) for k, blocks in self.media(input_ids[b], visual[b])
                 if k == kind]
        return self._regions(kind, len(found[index]), original_size)

    def _regions(self, kind: str, blocks: int, original_size: tuple[int, int] | None) -> ItemRegions:
        """A video's frames (a block each), or an image's tiles (level 1) and whole-image block (level 0)."""
        side = math.isqrt(self.block)
        cells = grid_boxes(unit_spans(side), unit_spans(side))
        if kind == "video":
            return ItemRegions.cat([ItemRegions.of(cells, (f, f + 1)) for f in range(blocks)])
        if blocks == 1:
            return ItemRegions.of(cells)
        if original_size is None:
            raise ValueError(f"{self.model_type} token geometry of a split image needs the original image sizes "
                             "(the tile grid follows from them): pass original_sizes=[image.size for image in images]")
        rows, cols = self.tile_grid(*original_size, blocks - 1)
        scale = torch.tensor([cols, rows, cols, rows], dtype=torch.float64)
        tiles = [ItemRegions.of((cells + torch.tensor([c, r, c, r], dtype=torch.float64)) / scale, level=1)
                 for r in range(rows) for c in range(cols)]
        return ItemRegions.cat([*tiles, ItemRegions.of(cells)])
