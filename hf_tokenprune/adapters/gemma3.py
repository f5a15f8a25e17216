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

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask
from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

from ..compat import cache_kwarg, with_cache
from .base import Placeholder, PlaceholderAdapter
from .regions import ItemRegions, grid_boxes, unit_spans

if TYPE_CHECKING:
    from ..pruning import Slicing

_POSITIONS = "_tokenprune_slot_positions"  # the cache attribute holding its slots' position ids


def _position_window(slots: torch.Tensor, past: int, width: int) -> torch.Tensor:
    """``[batch, new, slots]``: the keys whose position is less than ``width`` before the query's (``slots``: the
    position of every slot of the cache, the call's ``new`` tokens the last)."""
    return slots[:, past:, None] - slots[:, None, :] < width


def _overlay(base: torch.Tensor, extra: torch.Tensor | None, within: torch.Tensor | None) -> torch.Tensor:
    """``base`` (a 4-D mask as transformers builds it: boolean, or additive floats) also allowing ``extra`` and only
    ``within`` (``[batch, queries, slots]``, the base's keys the last of the slots)."""
    if not isinstance(base, torch.Tensor) or base.dim() != 4:
        raise ValueError(f"hf_tokenprune rebuilds Gemma's attention masks as 4-D tensors over the kept tokens, not as "
                         f"{type(base).__name__}: load the model with attn_implementation='sdpa' or 'eager'")
    allowed = base if base.dtype == torch.bool else base == 0
    keys = base.shape[-1]

    def aligned(x: torch.Tensor) -> torch.Tensor:
        x = x[..., -keys:] if x.shape[-1] >= keys else nn.functional.pad(x, (0, keys - x.shape[-1]), value=False)
        return x[:, None].to(allowed.device)

    if extra is not None:
        allowed = allowed | aligned(extra)
    if within is not None:
        allowed = allowed & aligned(within)
    if base.dtype == torch.bool:
        return allowed
    return torch.zeros_like(base).masked_fill(~allowed, torch.finfo(base.dtype).min)


class Gemma3Adapter(PlaceholderAdapter):
    model_types = ("gemma3",)
    #: the multimodal call's keyword marking the image tokens (1) its masks make bidirectional
    token_types: ClassVar[str] = "token_type_ids"

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
            kept = slicing.sequence(self._call_types(call, types.to(slots.device)))
            blocks[:, past:] = self.block_ids(kept.masked_fill(~slicing.slot_valid.to(slots.device), 0))
        new = blocks[:, past:, None]
        same_block = (new >= 0) & (new == blocks[:, None, :])  # [batch, new, slots]
        masks = {}
        for kind in dict.fromkeys(config.layer_types):  # transformers' masks with their padding, over each kind's keys
            base = create_causal_mask(config=config, inputs_embeds=kwargs["inputs_embeds"], attention_mask=mask,
                                      position_ids=positions, allow_is_causal_skip=False,
                                      layer_idx=config.layer_types.index(kind), **with_cache(cache))
            window = _position_window(slots, past, config.sliding_window) if kind == "sliding_attention" else None
            masks[kind] = _overlay(base, same_block if kind in self.bidirectional else None, window)
        return {**kwargs, "attention_mask": masks}

    @staticmethod
    def _call_types(call: Mapping[str, Any], types: torch.Tensor) -> torch.Tensor:
        """``types`` over the call's tokens: ``generate`` passes a continued conversation's types whole (the cached
        tokens' first), and a draft's candidates, appended to the prompt but not to its types, are text."""
        ids = call.get("input_ids")
        length = (ids if ids is not None else call["inputs_embeds"]).shape[1]
        return types[:, -length:] if types.shape[1] >= length else nn.functional.pad(
            types, (0, length - types.shape[1]))

    @property
    def bidirectional(self) -> tuple[str, ...]:
        """The layer types whose masks make a run of image tokens bidirectional (Gemma 3: all)."""
        return "full_attention", "sliding_attention"

    def block_ids(self, types: torch.Tensor) -> torch.Tensor:
        """``[batch, n]``: the bidirectional block of each token of ``types`` (the call's token types), -1 for
        others."""
        return get_block_sequence_ids_for_mask(types, device=types.device)

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
