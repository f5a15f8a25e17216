"""Qwen3-VL and Qwen3-VL-MoE: Qwen2-VL's placeholders and M-RoPE rows, timestamped video frames, DeepStack.

Positions are Qwen2-VL's (``generate`` passes 4 rows; the model's own ``rotary_emb`` interleaves the t/h/w
frequencies). Videos: the processor writes each temporal group of frames as its own run,
``<t seconds><|vision_start|><|video_pad|>...<|vision_end|>``, so a video's tokens span one placeholder run per
frame (:class:`FrameRunsAdapter`, shared with GLM-4V). DeepStack: the multimodal model passes the text model
``visual_pos_masks`` (``[batch, length]``, the visual positions) and ``deepstack_visual_embeds`` (one
``[visual tokens, hidden]`` tensor per DeepStack layer, rows in the row-major order of the mask's visual positions);
after decoder layer ``i`` the text model adds tensor ``i`` to the hidden states at those positions. The prefill
slices both with the kept tokens (:meth:`Qwen3VLAdapter.slice_extra`); in-LLM pruning that would cut the sequence
before the last DeepStack layer is refused (:meth:`Qwen3VLAdapter.inllm_refusal`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from .base import _runs
from .qwen2_vl import Qwen2VLAdapter

if TYPE_CHECKING:
    from ..pruning import Slicing


def split_by_runs(totals: list[int], runs: list[int]) -> list[int]:
    """Items of ``totals`` tokens split into the placeholder ``runs`` they fill, in order: each item takes the next
    runs while they fit in it. A remainder no run fits is kept as one piece, so the pieces always sum to the totals
    and the layout's checks report the mismatch."""
    pieces: list[int] = []
    i = 0
    for total in totals:
        covered = 0
        while i < len(runs) and covered + runs[i] <= total:
            covered += runs[i]
            pieces.append(runs[i])
            i += 1
        if covered < total:
            pieces.append(total - covered)
    return pieces


class FrameRuns:
    """For a placeholder adapter whose video frames are separate placeholder runs with timestamp text between them
    (the M-RoPE families below, Gemma 4): for pruning each frame is an item of its own; :meth:`token_regions` keeps
    one item per video."""

    def item_lengths(self, call: dict[str, Any], token_id: int) -> list[int] | None:
        """Images: as the adapter's own. Videos: each video's tokens split into its frames' placeholder runs."""
        lengths = super().item_lengths(call, token_id)
        input_ids = call.get("input_ids")
        if lengths is None or input_ids is None or self._placeholder(token_id, call).kind != "video":
            return lengths
        return split_by_runs(lengths, [n for row in input_ids for _, n in _runs(row == token_id)])

    def placeholder_runs(self, row: torch.Tensor, token_id: int, kind: str) -> list[tuple[int, int]]:
        """A video's frames fill several runs: the video runs of a row are joined into one (items split it)."""
        runs = _runs(row == token_id)
        if kind != "video" or not runs:
            return runs
        return [(runs[0][0], sum(n for _, n in runs))]


class FrameRunsAdapter(FrameRuns, Qwen2VLAdapter):
    """An M-RoPE family whose video frames are separate placeholder runs (:class:`FrameRuns`)."""


class Qwen3VLAdapter(FrameRunsAdapter):
    """Qwen3-VL: :class:`FrameRunsAdapter` plus the DeepStack inputs of the text model."""

    model_types = ("qwen3_vl", "qwen3_vl_moe")

    @property
    def deepstack_layers(self) -> int:
        """How many decoder layers DeepStack adds visual features after (layers ``0 .. n-1``)."""
        return len(self.model.config.vision_config.deepstack_visual_indexes)

    def slice_extra(self, kwargs: dict[str, Any], call: Mapping[str, Any], slicing: Slicing) -> dict[str, Any]:
        """``visual_pos_masks`` sliced like the sequence, and of every ``deepstack_visual_embeds`` tensor the rows of
        the kept visual tokens, in the order of the sliced mask."""
        kwargs = super().slice_extra(kwargs, call, slicing)
        mask = kwargs.get("visual_pos_masks")
        if mask is None:
            return kwargs
        row = (mask.flatten().long().cumsum(0) - 1).view(mask.shape)  # each visual position's deepstack row
        valid = slicing.slot_valid.to(mask.device)
        kept = slicing.sequence(mask) & valid
        rows = slicing.sequence(row)[kept]
        embeds = kwargs.get("deepstack_visual_embeds")
        return {**kwargs, "visual_pos_masks": kept,
                "deepstack_visual_embeds": None if embeds is None else [e[rows.to(e.device)] for e in embeds]}

    def inllm_refusal(self, layer: int) -> str | None:
        if 0 < layer < self.deepstack_layers:
            return (f"{self.model_type} adds DeepStack visual features to the visual positions after decoder layers "
                    f"0-{self.deepstack_layers - 1}, inside the text model's forward where no hook can shorten them "
                    f"with the sequence: prune at layer=0 (the LLM input) or at a layer >= {self.deepstack_layers}")
        return None
