"""Qwen2-VL and Qwen2.5-VL: dynamic-resolution images and videos, 3-D M-RoPE position ids.

Visual tokens are ``<|image_pad|>`` / ``<|video_pad|>`` runs of ``t * h * w / merge**2`` tokens per item
(``image_grid_thw`` / ``video_grid_thw``). ``generate`` pre-encodes the visual inputs and drops the grids, so
items are then read from ``mm_encoder_outputs`` and video frames from the temporal M-RoPE row. ``generate``
passes 4-row position ids (row 0 text positions, rows 1-3 temporal/height/width); the outer model computes 3
rows when called without them. Kept tokens keep their (t, h, w) ids, so decode positions (last + 1 from
``generate``) stay consistent with the unpruned model. Token geometry: the merged-grid cells of the resized image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..compat import MROPE_RENUMBERS_CONTINUED_TURNS, TRANSFORMERS_VERSION
from .base import Placeholder, PlaceholderAdapter, UnsupportedMethodError
from .regions import ItemRegions, grid_boxes, unit_spans
from .vision_attention import argument, patch_received_attention


class Qwen2VLAdapter(PlaceholderAdapter):
    """A placeholder model with grid item lengths, M-RoPE positions and grid geometry; M-RoPE families with
    ``..._grid_thw`` inputs (Qwen3-VL, GLM-4V) derive from it."""

    model_types = ("qwen2_vl", "qwen2_5_vl")
    images_after_cached_images = (
        "transformers numbers the M-RoPE positions of a new turn's images with get_rope_index over the whole "
        "conversation, which needs the grids of every image while the pixel values may only hold the new ones (the "
        "unpruned model fails too); start a new conversation with all images in its first turn")
    continued_turns_unsupported = None if MROPE_RENUMBERS_CONTINUED_TURNS else (
        f"transformers {TRANSFORMERS_VERSION} numbers a continued turn from the previous call's rope_deltas (the "
        "unpruned model gets the M-RoPE positions of new images wrong too; fixed in transformers 5.23): upgrade "
        "transformers, or start a new conversation")

    def input_item_lengths(self, call: Mapping[str, Any], placeholder: Placeholder) -> list[int] | None:
        grid = call.get(f"{placeholder.kind}_grid_thw")
        if grid is None:
            return None
        merge = self.model.config.vision_config.spatial_merge_size ** 2
        return [int(t * h * w) // merge for t, h, w in grid.tolist()]

    def vision_attention_layer(self) -> nn.Module:
        """The tower's last block, whose output the merger turns into LLM tokens; its attention is full within each
        image / frame. Qwen2.5-VL is refused: most of its blocks attend within windows over window-reordered
        patches, and hf_tokenprune does not undo that order."""
        visual = self.multimodal_model.visual
        if getattr(visual, "fullatt_block_indexes", None) is not None:
            raise UnsupportedMethodError(
                f"scorer='visionzip' is not supported on {self.model_type}: its vision tower attends within windows "
                "over window-reordered patches, which hf_tokenprune does not map back to the LLM's visual tokens")
        return visual.blocks[-1]

    def vision_attention(self, records: Sequence[tuple[tuple, dict]], call: Mapping[str, Any]) -> torch.Tensor:
        """The attention each patch receives (mean over heads and the queries of its image / frame), summed over
        the ``spatial_merge_size ** 2`` consecutive patches that the merger joins into one LLM token."""
        block = self.vision_attention_layer()
        merge = self.model.config.vision_config.spatial_merge_size ** 2
        values = [patch_received_attention(block, argument(args, kwargs, "hidden_states", 0),
                                           argument(args, kwargs, "cu_seqlens", 1),
                                           argument(args, kwargs, "position_embeddings", 2)).view(-1, merge).sum(-1)
                  for args, kwargs in records]
        return self.scatter_items(call, torch.cat(values))

    def frames(self, length: int, token_id: int, positions: torch.Tensor, call: dict[str, Any]) -> list[int]:
        if token_id != self.model.config.video_token_id:
            return [length]
        temporal = positions[-3]
        starts = [0, *(torch.nonzero(temporal[1:] != temporal[:-1]).flatten() + 1).tolist(), length]
        return [e - s for s, e in zip(starts[:-1], starts[1:])]

    def expand_positions(self, position_ids: torch.Tensor | None, batch: int, length: int,
                         device: torch.device) -> torch.Tensor:
        if position_ids is None:
            return torch.arange(length, device=device).view(1, 1, -1).expand(3, batch, -1)
        if position_ids.dim() == 2:
            return position_ids[None].expand(3, batch, -1)
        return position_ids.expand(-1, batch, -1)

    def text_model_positions(self, positions: torch.Tensor) -> torch.Tensor:
        return positions

    def rotary_positions(self, positions: torch.Tensor) -> torch.Tensor:
        return positions[-3:]

    def item_regions(self, inputs: Mapping[str, Any], kind: str, index: int,
                     original_size: tuple[int, int] | None) -> ItemRegions:
        """The processor resizes the whole image / frame (``smart_resize``) to a multiple of ``patch * merge``:
        tokens are the merged-grid cells, row-major, one grid per temporal group of ``temporal_patch_size``
        frames (the last frame repeated to fill the last group)."""
        vision = self.model.config.vision_config
        t, h, w = inputs["image_grid_thw" if kind == "image" else "video_grid_thw"][index].tolist()
        merge, step = vision.spatial_merge_size, vision.temporal_patch_size if kind == "video" else 1
        cells = grid_boxes(unit_spans(h // merge), unit_spans(w // merge))
        return ItemRegions.cat([ItemRegions.of(cells, (g * step, (g + 1) * step)) for g in range(t)])
