"""The adapter contract: everything model-specific that input-stage pruning needs to know.

An adapter answers, for one model family: which module merges the visual features into the text embeddings
(its forward receives ``input_ids``), which module is the text model (pruning happens in a pre-hook on it),
which positions of a call are visual and to which image / video frame they belong, and how the text model
numbers positions (1-D, or Qwen2-VL's multi-row M-RoPE ids), and which region of the original image / video
frame each visual token encodes (:meth:`Adapter.token_regions`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .regions import ItemRegions, TokenRegions, VisualItem


def _runs(row: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of the runs of True in a 1-D bool tensor."""
    padded = torch.cat([row.new_zeros(1), row.to(torch.int8), row.new_zeros(1)])
    edges = torch.diff(padded).nonzero().flatten().tolist()
    return [(s, e - s) for s, e in zip(edges[::2], edges[1::2])]


class MalformedVisualInputError(ValueError):
    """The visual placeholder tokens of a batch do not match the visual inputs (grids, frames, sizes)."""


@dataclass
class VisualLayout:
    """Where the visual tokens of one batch are.

    ``visual_mask[b, i]`` marks the visual placeholder positions, ``instruction_mask[b, i]`` the instruction
    tokens (see :meth:`Adapter.layout`), and ``segments[b]`` the lengths of sample ``b``'s images / video frames
    in order of appearance (they sum to the sample's visual-token count).
    """

    visual_mask: torch.Tensor
    instruction_mask: torch.Tensor
    segments: list[list[int]]

    @property
    def counts(self) -> list[int]:
        return [sum(s) for s in self.segments]


class Adapter:
    """Base class of the model-family adapters. Subclasses set ``model_types`` and implement the hooks below."""

    model_types: ClassVar[tuple[str, ...]] = ()
    # why a turn that continues a cache holding visual tokens cannot add new ones, where the family cannot (else None)
    images_after_cached_images: ClassVar[str | None] = None
    # why a turn that continues a cache cannot add visual tokens or renumber positions ("contiguous") with the
    # installed transformers, where it cannot (else None)
    continued_turns_unsupported: ClassVar[str | None] = None

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # -- modules -------------------------------------------------------------------------------------------
    @property
    def multimodal_model(self) -> nn.Module:
        """The module whose forward receives ``input_ids`` and merges the visual features."""
        return self.model.model

    @property
    def text_model(self) -> nn.Module:
        """The decoder that receives ``inputs_embeds``; pruning runs in a forward pre-hook on it."""
        return self.model.model.get_decoder()

    @property
    def model_type(self) -> str:
        return self.model.config.model_type

    # -- tokens ----------------------------------------------------------------------------------------------
    @property
    def visual_token_ids(self) -> tuple[int, ...]:
        cfg = self.model.config
        return tuple(i for i in (cfg.image_token_id, getattr(cfg, "video_token_id", None)) if i is not None)

    def placeholder_ids(self, call: Mapping[str, Any]) -> tuple[int, ...]:
        """The :attr:`visual_token_ids` that mark visual tokens in ``call`` (a model call's kwargs or a processor
        output): those of the modalities it brings pixel values (or ``generate``'s pre-encoded features) for.

        transformers merges features only for the modalities a call brings; a placeholder of another modality is
        embedded as an ordinary token, so it is text for pruning too. A call given ``inputs_embeds`` may hold
        features the caller merged: there every placeholder id counts.
        """
        if call.get("inputs_embeds") is not None:
            return self.visual_token_ids
        encoded = call.get("mm_encoder_outputs") or {}
        cfg = self.model.config
        return tuple(token for token, modality, pixels in (
            (cfg.image_token_id, "image", "pixel_values"),
            (getattr(cfg, "video_token_id", None), "video", "pixel_values_videos"))
            if token is not None and (call.get(pixels) is not None or encoded.get(modality) is not None))

    def _config_token_ids(self, *names: str) -> set[int]:
        ids: set[int] = set()
        for cfg in (self.model.config, self.model.config.get_text_config(), self.model.generation_config):
            for name in names:
                value = getattr(cfg, name, None)
                ids.update(value if isinstance(value, (list, tuple)) else [value] if value is not None else [])
        return ids

    @property
    def end_of_turn_ids(self) -> frozenset[int]:
        """Tokens that close a chat turn (the model's eos ids, e.g. ``<|im_end|>``)."""
        return frozenset(self._config_token_ids("eos_token_id"))

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Token ids of the chat template that are not part of the instruction."""
        return frozenset(self._config_token_ids("bos_token_id", "eos_token_id", "pad_token_id",
                                                "vision_start_token_id", "vision_end_token_id")
                         | set(self.visual_token_ids))

    def item_lengths(self, call: dict[str, Any], token_id: int) -> list[int] | None:
        """Token counts of the batch's images (``token_id`` = image token) or videos, in order, if known.

        ``generate`` pre-encodes the visual inputs and passes ``mm_encoder_outputs`` (one feature tensor per
        item); families override this to read their raw inputs (e.g. grids) on plain forward calls.
        """
        modality = "image" if token_id == self.model.config.image_token_id else "video"
        output = (call.get("mm_encoder_outputs") or {}).get(modality)
        if output is None:
            return None
        pooled = output.pooler_output
        return [int(p.shape[0]) for p in pooled] if isinstance(pooled, (list, tuple)) else None

    def frames(self, length: int, token_id: int, positions: torch.Tensor, call: dict[str, Any]) -> list[int]:
        """Split one image/video item of ``length`` tokens into its frames (``positions``: the item's
        ``[rows, length]`` position ids). Images are one piece."""
        return [length]

    def segments(self, input_ids: torch.Tensor, visual_mask: torch.Tensor, positions: torch.Tensor,
                 call: dict[str, Any]) -> list[list[int]]:
        """Per sample, the lengths of its images / video frames in order of appearance. Checks the
        placeholders against the visual inputs and raises :class:`MalformedVisualInputError` on a mismatch."""
        items = {t: self.item_lengths(call, t) for t in self.placeholder_ids(call)}
        used = dict.fromkeys(items, 0)
        out: list[list[int]] = []
        for b in range(input_ids.shape[0]):
            pieces: list[int] = []
            for start, length in _runs(visual_mask[b]):
                token = int(input_ids[b, start])
                if bool((input_ids[b, start:start + length] != token).any()):
                    raise MalformedVisualInputError(
                        f"sample {b}: image and video placeholder tokens are adjacent without a separator")
                lengths = items[token]
                if lengths is None:
                    pieces.extend(self.frames(length, token, positions[:, b, start:start + length], call))
                    continue
                covered = 0
                while covered < length:
                    if used[token] >= len(lengths):
                        raise MalformedVisualInputError(
                            f"sample {b}: more visual placeholder tokens than the visual inputs provide "
                            f"({len(lengths)} item(s) of token id {token} for the whole batch)")
                    n = lengths[used[token]]
                    used[token] += 1
                    at = start + covered
                    pieces.extend(self.frames(n, token, positions[:, b, at:at + n], call))
                    covered += n
                if covered != length:
                    raise MalformedVisualInputError(
                        f"sample {b}: a run of {length} visual placeholder tokens does not match the visual "
                        f"inputs (their items give {covered} tokens)")
            out.append(pieces)
        for token, lengths in items.items():
            if lengths is not None and used[token] != len(lengths):
                raise MalformedVisualInputError(
                    f"{len(lengths)} visual item(s) of token id {token} given but only {used[token]} have "
                    "placeholder tokens in input_ids")
        return out

    def layout(self, call: dict[str, Any], attention_mask: torch.Tensor | None,
               positions: torch.Tensor) -> VisualLayout:
        """Visual and instruction positions of a prefill call (``call`` holds the multimodal model's kwargs; visual:
        the :meth:`placeholder_ids` of the call).

        Instruction tokens of a sample are the tokens after its last visual token up to the last end-of-turn
        token (:attr:`end_of_turn_ids`, i.e. the end of the user's turn; the end of the prompt if there is
        none), without padding and without the chat template's special tokens (:attr:`special_token_ids`).
        The generation prompt (``<|im_start|>assistant``) is therefore not part of it. A sample with no such
        token (the prompt ends with the image) uses its last prompt token.
        """
        input_ids = call["input_ids"]
        device = input_ids.device
        visual = torch.isin(input_ids, torch.tensor(self.placeholder_ids(call), dtype=input_ids.dtype, device=device))
        real = attention_mask.bool() if attention_mask is not None else torch.ones_like(visual)
        idx = torch.arange(input_ids.shape[1], device=device)
        last_visual = torch.where(visual, idx, -1).amax(dim=1, keepdim=True)
        turn_end = torch.isin(input_ids, torch.tensor(sorted(self.end_of_turn_ids), device=device)) & real
        last_end = torch.where(turn_end & (idx > last_visual), idx, -1).amax(dim=1, keepdim=True)
        end = torch.where(last_end >= 0, last_end, input_ids.shape[1])
        special = torch.isin(input_ids, torch.tensor(sorted(self.special_token_ids), device=device))
        instruction = (idx > last_visual) & (idx < end) & real & ~special
        empty = ~instruction.any(dim=1)
        if empty.any():
            last_real = torch.where(real, idx, -1).amax(dim=1)
            instruction[empty, last_real[empty]] = True
        return VisualLayout(visual, instruction, self.segments(input_ids, visual, positions, call))

    # -- positions -----------------------------------------------------------------------------------------
    def expand_positions(self, position_ids: torch.Tensor | None, batch: int, length: int,
                         device: torch.device) -> torch.Tensor:
        """The position ids the text model would use on a prefill, as a ``[rows, batch, length]`` tensor."""
        if position_ids is None:
            return torch.arange(length, device=device).view(1, 1, -1).expand(1, batch, -1)
        return position_ids.view(1, *position_ids.shape[-2:]).expand(1, batch, -1)

    def text_model_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """``[rows, batch, length]`` back into the form the text model's forward takes."""
        return positions[0]

    def rotary_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """``[rows, batch, length]`` into the form ``text_model.rotary_emb`` takes."""
        return positions[0]

    # -- geometry ------------------------------------------------------------------------------------------
    def token_regions(self, inputs: Mapping[str, Any], sample: int = 0, *,
                      original_sizes: Sequence[tuple[int, int]] | None = None) -> TokenRegions:
        """The region of its original image / video frame that each visual token of sample ``sample`` encodes.

        ``inputs``: the processor output for the batch (``input_ids`` and the visual inputs: grids, image
        sizes, pixel values). ``original_sizes``: ``(width, height)`` (PIL's ``Image.size``) of every image
        given to the processor, in that order; needed only where ``inputs`` lack what the geometry depends on
        (LLaVA-1.5's center crop), ignored elsewhere. Visual tokens: the :meth:`placeholder_ids` of ``inputs``.
        Raises :class:`MalformedVisualInputError` if the placeholders do not match the visual inputs.
        """
        input_ids = inputs["input_ids"]
        ids = self.placeholder_ids(inputs)
        kinds = {token: kind for token, kind in ((self.model.config.image_token_id, "image"),
                                                  (getattr(self.model.config, "video_token_id", None), "video"))
                 if token in ids}
        used = {"image": 0, "video": 0}
        items: list[VisualItem] = []
        regions: list[ItemRegions] = []
        for b in range(sample + 1):
            runs = sorted((start, length, kind) for token, kind in kinds.items() if token is not None
                          for start, length in _runs(input_ids[b] == token))
            offset = 0
            for _, length, kind in runs:
                covered = 0
                while covered < length:
                    index = used[kind]
                    size = None
                    if kind == "image" and original_sizes is not None:
                        if index >= len(original_sizes):
                            raise ValueError(f"original_sizes has {len(original_sizes)} entries; the inputs have "
                                             f"more images")
                        size = tuple(original_sizes[index])
                    try:
                        item = self.item_regions(inputs, kind, index, size)
                    except IndexError as error:
                        raise MalformedVisualInputError(
                            f"sample {b}: more {kind} placeholder runs than the visual inputs provide") from error
                    if b == sample:
                        frames = int(item.frames[:, 1].max()) if kind == "video" else 1
                        items.append(VisualItem(kind, index, offset + covered, offset + covered + len(item), frames))
                        regions.append(item)
                    used[kind] += 1
                    covered += len(item)
                if covered != length:
                    raise MalformedVisualInputError(
                        f"sample {b}: a run of {length} {kind} placeholder tokens does not match the visual inputs "
                        f"(their items give {covered} tokens)")
                offset += length
        return TokenRegions.from_items(items, regions)

    def item_regions(self, inputs: Mapping[str, Any], kind: str, index: int,
                     original_size: tuple[int, int] | None) -> ItemRegions:
        """Regions of the tokens of image (``kind="image"``) or video ``index`` of the batch, in placeholder order.
        ``original_size``: its ``(width, height)`` if the caller gave it. Families implement this."""
        raise NotImplementedError(f"{type(self).__name__} has no token geometry")
