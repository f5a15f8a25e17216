"""Gemma 3: fixed-size images (and pan-and-scan crops) whose tokens attend to each other bidirectionally.

Every image, and every pan-and-scan crop the processor adds after it, is one run of ``mm_tokens_per_image``
``<image_soft_token>`` placeholders between ``<start_of_image>`` and ``<end_of_image>`` (text, never pruned, not
instruction), one item each (its own unit with ``scope="image"``). The processor output does not say which crops
belong to which image, so :meth:`~.base.PlaceholderAdapter.token_regions` reports each run as an image of its own,
its regions in the run's own frame (a crop's coordinates for a crop).

Masks: the multimodal model hands the text model one prepared 4-D mask per layer type, built from its 2-D
``attention_mask`` and ``token_type_ids``: causal, every run of image tokens bidirectional, and on sliding-window layers
only the keys less than ``sliding_window`` tokens back. The core prunes on that 2-D mask (:attr:`mask_model`) and
:meth:`Gemma3Adapter.attention_masks` rebuilds both masks over the kept tokens: the kept image tokens of a run stay one
bidirectional block, and the window is measured in position ids, so with ``positions="original"`` a kept token sees
exactly the kept tokens it saw in the unpruned sequence (with ``"contiguous"``, those of the pruned sequence). The
positions of the cached tokens, which decode steps need for the window, are kept on the cache object.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from transformers.masking_utils import blockwise_overlay, create_causal_mask
from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

from ..compat import cache_kwarg, with_cache
from .base import Placeholder, PlaceholderAdapter
from .regions import ItemRegions, grid_boxes, unit_spans

if TYPE_CHECKING:
    from ..pruning import Slicing

_POSITIONS = "_tokenprune_slot_positions"  # the cache attribute holding its slots' position ids


def _position_window(positions: torch.Tensor, width: int) -> Callable:
    """A mask function keeping the keys whose position is less than ``width`` before the query's (``positions``:
    ``[batch, keys]`` over the cache's slots)."""

    def inner(batch_idx, head_idx, q_idx, kv_idx):
        return positions[batch_idx, q_idx] - positions[batch_idx, kv_idx] < width

    return inner


class Gemma3Adapter(PlaceholderAdapter):
    model_types = ("gemma3",)
    #: the multimodal call's keyword marking the image tokens (1) its masks make bidirectional
    token_types: ClassVar[str] = "token_type_ids"
    images_in_continued_turns = (
        "transformers lays the image blocks of a turn that continues a cache over the cache's first positions instead "
        "of the new tokens (5.20: a size error; later: a mask whose image block is neither bidirectional nor causal), "
        "the unpruned model too: start a new conversation with the images in its first turn")

    def input_item_lengths(self, call: Mapping[str, Any], placeholder: Placeholder) -> list[int] | None:
        pixels = call.get(placeholder.pixels)
        return None if pixels is None else [self.model.config.mm_tokens_per_image] * int(pixels.shape[0])

    @property
    def special_token_ids(self) -> frozenset[int]:
        return super().special_token_ids | self._config_token_ids("boi_token_id", "eoi_token_id")

    @property
    def mask_model(self) -> nn.Module:
        return self.multimodal_model

    def attention_masks(self, kwargs: dict[str, Any], call: Mapping[str, Any],
                        slicing: Slicing | None) -> dict[str, Any]:
        """The text model's ``full_attention`` and ``sliding_attention`` masks over the cache's slots and the call's
        kept tokens (module docstring)."""
        config = self.text_model.config
        cache = cache_kwarg(kwargs)
        positions = kwargs["position_ids"]
        past = cache.get_seq_length() if cache is not None else 0
        mask = kwargs["attention_mask"]
        held = getattr(cache, _POSITIONS, None) if past else None
        if past and held is None:  # a prefill that pruned nothing: numbered as generate numbers it
            held = (mask[:, :past].long().cumsum(dim=-1) - 1).clamp(min=0)
        slots = positions if not past else torch.cat([held[:, :past].to(positions), positions], dim=1)
        if cache is not None:
            setattr(cache, _POSITIONS, slots)
        blocks = torch.full_like(slots, -1)
        types = call.get(self.token_types) if slicing is not None else None
        if types is not None:
            kept = slicing.sequence(types.to(slots.device)).masked_fill(~slicing.slot_valid.to(slots.device), 0)
            blocks[:, past:] = get_block_sequence_ids_for_mask(kept, device=slots.device)
        common = dict(config=config, inputs_embeds=kwargs["inputs_embeds"], attention_mask=mask,
                      position_ids=positions, or_mask_function=blockwise_overlay(blocks), **with_cache(cache))
        masks = {"full_attention": create_causal_mask(**common)}
        if "sliding_attention" in config.layer_types:
            masks["sliding_attention"] = create_causal_mask(
                **common, and_mask_function=_position_window(slots, config.sliding_window),
                layer_idx=config.layer_types.index("sliding_attention"))
        return {**kwargs, "attention_mask": masks}

    def inllm_refusal(self, layer: int) -> str | None:
        return (f"{self.model_type}'s text model gets one prepared 4-D mask per layer type from the multimodal model "
                "(bidirectional image blocks, sliding windows); pruning inside the LLM would have to cut them per "
                "layer, which hf_tokenprune does not do: prune at layer=0 (the LLM input)")

    def item_regions(self, inputs: Mapping[str, Any], kind: str, index: int,
                     original_size: tuple[int, int] | None) -> ItemRegions:
        """The image (or crop) resized to the tower's square input, average-pooled to a square token grid."""
        if index >= inputs["pixel_values"].shape[0]:
            raise IndexError(index)
        side = int(self.model.config.mm_tokens_per_image ** 0.5)
        return ItemRegions.of(grid_boxes(unit_spans(side), unit_spans(side)))
