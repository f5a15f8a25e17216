"""Gemma 4: Gemma 3's prepared masks, variable-resolution images, video frames as runs, audio, per-layer inputs.

An image is resized, keeping its aspect ratio, to a token budget: one run of ``<image_soft_token>`` placeholders,
the cells of its ``k x k``-pooled patch grid row by row (``image_position_ids`` gives the grid). A video is one run of
``<|video|>`` placeholders per frame, after its timestamp (each frame an item for pruning, one video for
:meth:`~.base.PlaceholderAdapter.token_regions`, split by ``num_frames_per_video``). Audio placeholders are never
visual: they are kept whole, like text, and are not instruction. The text model also gets ``per_layer_inputs``, one
row per token, sliced with the kept tokens.

Masks as Gemma 3's (:class:`~.gemma3.Gemma3Adapter`), from ``mm_token_type_ids``: where the config sets
``use_bidirectional_attention="vision"`` a run of image or video tokens is bidirectional in the sliding-window layers
only (the global layers stay causal), as transformers builds them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers.models.gemma4.modeling_gemma4 import get_block_sequence_ids_for_mask

from .base import Placeholder
from .gemma3 import Gemma3Adapter
from .qwen3_vl import FrameRuns
from .regions import ItemRegions, grid_boxes, unit_spans


class Gemma4Adapter(FrameRuns, Gemma3Adapter):
    model_types = ("gemma4",)
    token_types = "mm_token_type_ids"
    token_tensors = ("per_layer_inputs",)

    def input_item_lengths(self, call: Mapping[str, Any], placeholder: Placeholder) -> list[int] | None:
        """Each image's (video frame's) pooled cells."""
        positions = call.get(f"{placeholder.kind}_position_ids")
        return None if positions is None else [rows * cols for rows, cols in self._grids(positions)]

    def _grids(self, position_ids: torch.Tensor) -> list[tuple[int, int]]:
        """``(rows, cols)`` of each image's (frame's) pooled patch grid (``position_ids``: its patches' ``(x, y)``,
        -1 on padding)."""
        k = self.model.config.vision_config.pooling_kernel_size
        size = position_ids.amax(dim=1) + 1  # [items, 2]: patch columns, rows
        return [(int(rows) // k, int(cols) // k) for cols, rows in size.tolist()]

    @property
    def special_token_ids(self) -> frozenset[int]:
        return super().special_token_ids | self._config_token_ids("boa_token_id", "eoa_token_id", "eoa_token_index",
                                                                  "audio_token_id")

    @property
    def bidirectional(self) -> tuple[str, ...]:
        return ("sliding_attention",) if self.text_model.config.use_bidirectional_attention == "vision" else ()

    def block_ids(self, types: torch.Tensor) -> torch.Tensor:
        return get_block_sequence_ids_for_mask(types, device=types.device)

    def item_regions(self, inputs: Mapping[str, Any], kind: str, index: int,
                     original_size: tuple[int, int] | None) -> ItemRegions:
        """The whole image (frame) resized to its token budget, the pooled cells row by row."""
        grids = self._grids(inputs[f"{kind}_position_ids"])
        if kind == "image":
            return self._cells(*grids[index])
        frames = inputs["num_frames_per_video"].tolist()
        first = sum(frames[:index])
        return ItemRegions.cat([self._cells(*grids[first + f], (f, f + 1)) for f in range(frames[index])])

    @staticmethod
    def _cells(rows: int, cols: int, frames: tuple[int, int] = (0, 1)) -> ItemRegions:
        return ItemRegions.of(grid_boxes(unit_spans(rows), unit_spans(cols)), frames)
