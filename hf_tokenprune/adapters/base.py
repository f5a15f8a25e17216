"""The adapter contract: everything model-specific that input-stage pruning needs to know.

Pruning runs in a forward pre-hook on a family's text model: it finds the visual tokens of the multimodal call that
produced the text model's ``inputs_embeds``, scores them and slices the text model's inputs. The core (``prefill``,
``continuation``, ``wrap``, ``verify``, ``viz``) asks everything family-specific of the model's adapter:

* :class:`Adapter`, the contract the core calls. A family unlike the placeholder models implements it whole.
* :class:`PlaceholderAdapter`, the generic placeholder model: an image (and video) token id repeated once per visual
  token in ``input_ids``, the visual features scattered into ``inputs_embeds`` at those positions, 1-D position
  ids, the text model at ``model.model.get_decoder()``. LLaVA-1.5, LLaVA-OneVision and Qwen2-VL derive from it and
  state only what differs.

A new placeholder family is one adapter file deriving from :class:`PlaceholderAdapter`, its entry in
``adapters.ADAPTERS`` (or ``register_adapter``) and its tiny-model builder. It must provide:

* ``model_types``: the ``config.model_type`` values it serves;
* :meth:`~PlaceholderAdapter.input_item_lengths`: the token count of each image / video of a plain forward call,
  from the call's raw visual inputs (grids, sizes, pixel shapes); None where unknown (each run of placeholders is
  then one item). Under ``generate`` the counts come from ``mm_encoder_outputs``, which the base reads;
* :meth:`~PlaceholderAdapter.item_regions`: the token geometry of one image / video (heat maps, ``token_regions``).

It may override, where it differs from the default:

* :attr:`~PlaceholderAdapter.placeholders`: its placeholder token ids, kinds and pixel keywords (the config's
  ``image_token_id`` with ``pixel_values``, ``video_token_id`` with ``pixel_values_videos``);
* :meth:`~PlaceholderAdapter.frames`: how a video item splits into frames (default: one piece);
  :meth:`~PlaceholderAdapter.placeholder_runs`: the placeholder runs an image / video fills (default: one run of
  consecutive placeholders; Qwen3-VL and GLM-4V videos span one run per frame, a Pixtral image one run per row);
* :meth:`~PlaceholderAdapter.structure_tokens`: text tokens that lay out the visual ones and are not instruction,
  where the config does not name them (Pixtral's ``[IMG_BREAK]`` / ``[IMG_END]``; default: none);
* :attr:`~PlaceholderAdapter.special_token_ids` / :attr:`~PlaceholderAdapter.end_of_turn_ids`: the chat template's
  tokens that are not instruction (the configs' bos / eos / pad / vision start and end ids; eos ids);
* :meth:`~Adapter.expand_positions`, :meth:`~Adapter.text_model_positions`, :meth:`~Adapter.rotary_positions`: 1-D
  positions; M-RoPE families (Qwen3-VL, GLM-4V) derive from :class:`~.qwen2_vl.Qwen2VLAdapter`;
* :attr:`~Adapter.token_tensors` / :meth:`~Adapter.slice_extra`: per-token tensors the text model receives besides
  ``inputs_embeds`` / ``attention_mask`` / ``position_ids``, to slice with the kept tokens (default: none);
* :attr:`~Adapter.mask_model` / :meth:`~Adapter.attention_masks`: where the multimodal model hands the text model
  prepared attention masks (Gemma 3 / 4: one 4-D mask per layer type, with bidirectional image blocks and sliding
  windows), the module whose 2-D mask they come from, and how to build them over the kept tokens (default: the text
  model builds its own from the 2-D mask);
* :attr:`~Adapter.multimodal_model` / :attr:`~Adapter.text_model`: ``model.model`` / ``model.model.get_decoder()``;
* :attr:`~Adapter.images_after_cached_images` / :attr:`~Adapter.continued_turns_unsupported`: why a continued chat
  turn is refused on the family (default None: every continuation is supported);
* :meth:`~Adapter.inllm_refusal`: why in-LLM pruning cannot cut the sequence before a decoder layer (default None);
* :meth:`~Adapter.expansion_refusal`: why ``generate`` cannot repeat a call's samples (beam search) with the installed
  transformers, unpruned too (default None);
* :meth:`~Adapter.for_model`: the adapter class of one model, where checkpoints of one model type differ (``llava``
  with a Pixtral tower; default: the registered class);
* :attr:`~Adapter.masking_removes_tokens`: False for a decoder with linear-attention layers, where a masked token
  still takes part; the shared tests then compare with the pruned-sequence reference instead.

Each item's tokens lie within one run of :meth:`~PlaceholderAdapter.placeholder_runs` (consecutive placeholders, or
runs the family joins: a Pixtral image's rows, separated by ``[IMG_BREAK]`` text tokens); a run may hold several
items (split by the item lengths). Families whose video frames are separate runs (Qwen3-VL, GLM-4V) give each frame
as an item for pruning and join a video's runs for :meth:`~Adapter.token_regions`. Placeholders are the visual
tokens, whatever their embedding holds: LLaVA-NeXT's ``image_newline`` tokens are scored and pruned like the others;
tokens the model embeds from its vocabulary (``[IMG_BREAK]``) are text.

The shared invariant tests check, for every registered tiny family, with images and, where it takes them, videos
(``tests/test_invariants.py``, ``test_generation_paths.py``, ``test_multiturn.py``, ``test_geometry.py``):

* ratio 1.0 reproduces the unwrapped model exactly (tokens and logits);
* pruned == masked reference: greedy ``generate`` on the pruned model equals the unpruned model with the dropped
  tokens masked out of attention at their original positions (same tokens, logits within 1e-4; sdpa and eager),
  and the check is sensitive (unmasked, the logits differ); where :attr:`~Adapter.masking_removes_tokens` is False
  the reference is the unwrapped model run on the already-pruned sequence, and where it is True both agree;
* a left-padded batch equals each sample alone (same kept tokens, same new tokens);
* the KV cache holds exactly the kept length; the stats describe the cut; text-only calls pass through; unwrap
  restores the model;
* the ``image-text-to-text`` pipeline runs on the pruned model;
* multi-turn: later turns continue the pruned cache like the masked reference over the whole conversation, and
  equal the unwrapped model at ratio 1.0;
* ``token_regions`` gives one region per placeholder, items in order, regions tiling each image / frame.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from .regions import ItemRegions, TokenRegions, VisualItem

if TYPE_CHECKING:
    from ..pruning import Slicing


def _runs(row: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of the runs of True in a 1-D bool tensor."""
    padded = torch.cat([row.new_zeros(1), row.to(torch.int8), row.new_zeros(1)])
    edges = torch.diff(padded).nonzero().flatten().tolist()
    return [(s, e - s) for s, e in zip(edges[::2], edges[1::2])]


class MalformedVisualInputError(ValueError):
    """The visual placeholder tokens of a batch do not match the visual inputs (grids, frames, sizes)."""


class UnsupportedMethodError(ValueError):
    """A selection method needs something of the model that this family's adapter does not provide (VisionZip's
    vision-tower attention: :meth:`Adapter.vision_attention_layer`)."""


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



@dataclass(frozen=True)
class Placeholder:
    """One visual input of a placeholder model: ``token_id`` marks each of its tokens in ``input_ids``; ``kind``
    (``"image"`` / ``"video"``) names it in ``generate``'s ``mm_encoder_outputs`` and in :class:`VisualItem`;
    ``pixels`` is the call's keyword for its pixel values."""

    token_id: int
    kind: str
    pixels: str


def _encoded_lengths(output: Any) -> list[int] | None:
    """Token counts of the items of a pre-encoded ``mm_encoder_outputs`` entry: one feature tensor per item (its
    tokens in all dimensions but the last: LLaVA-NeXT-Video on transformers 5.20.0 gives ``[frames, tokens,
    hidden]``), or one ``[items, tokens, hidden]`` tensor of equal items; None for another form."""
    pooled = output.pooler_output
    if isinstance(pooled, (list, tuple)):
        return [int(p.numel() // p.shape[-1]) for p in pooled]
    if isinstance(pooled, torch.Tensor) and pooled.dim() == 3:
        return [int(pooled.shape[1])] * pooled.shape[0]
    return None


class Adapter(ABC):
    """The contract between the core and a model family (see the module docstring); subclasses set ``model_types``.

    The abstract methods are what the core calls; :class:`PlaceholderAdapter` implements them for placeholder
    models. The rest has defaults that suit every family so far.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    # why a turn that continues a cache holding visual tokens cannot add new ones, where the family cannot (else None)
    images_after_cached_images: ClassVar[str | None] = None
    # why a turn that continues a cache cannot add visual tokens or renumber positions ("contiguous") with the
    # installed transformers, where it cannot (else None)
    continued_turns_unsupported: ClassVar[str | None] = None
    #: keyword arguments of the text model, ``[batch, length, ...]`` tensors, that the prefill slices like
    #: ``inputs_embeds`` (see :meth:`slice_extra`)
    token_tensors: ClassVar[tuple[str, ...]] = ()
    #: whether masking a token out of attention removes it from the computation: True for softmax-only decoders,
    #: False where a token takes part even masked (a linear-attention layer still takes a recurrence step for it);
    #: there pruned == the model run on the already-pruned sequence
    #: (:func:`~hf_tokenprune.verify.generate_pruned_sequence_reference`), not the masked reference
    masking_removes_tokens: ClassVar[bool] = True
    #: why VisionZip cannot read this family's vision-tower attention (where :meth:`vision_attention_layer` refuses)
    vision_attention_refusal: ClassVar[str] = (
        "hf_tokenprune does not map this family's vision-tower attention to the LLM's visual tokens")

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    def for_model(cls, model: nn.Module) -> type[Adapter]:
        """The adapter class that serves ``model`` (default: this one); a model type whose checkpoints differ in
        kind picks one per model (``llava`` with a Pixtral tower: :class:`~.pixtral.LlavaPixtralAdapter`)."""
        return cls

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
    @abstractmethod
    def visual_token_ids(self) -> tuple[int, ...]:
        """Every token id that marks a visual token in ``input_ids``."""

    @abstractmethod
    def placeholder_ids(self, call: Mapping[str, Any]) -> tuple[int, ...]:
        """The :attr:`visual_token_ids` that mark visual tokens in ``call`` (a model call's kwargs or a processor
        output)."""

    @abstractmethod
    def item_lengths(self, call: dict[str, Any], token_id: int) -> list[int] | None:
        """Token counts of the batch's images (``token_id`` = image token) or videos, in order, if known."""

    @abstractmethod
    def layout(self, call: dict[str, Any], attention_mask: torch.Tensor | None,
               positions: torch.Tensor) -> VisualLayout:
        """Visual and instruction positions of a prefill call (``call``: the multimodal model's kwargs;
        ``positions``: :meth:`expand_positions`). Raises :class:`MalformedVisualInputError` where the placeholders
        do not match the visual inputs."""

    # -- positions -----------------------------------------------------------------------------------------
    @abstractmethod
    def expand_positions(self, position_ids: torch.Tensor | None, batch: int, length: int,
                         device: torch.device) -> torch.Tensor:
        """The position ids the text model would use on a prefill, as a ``[rows, batch, length]`` tensor."""

    @abstractmethod
    def text_model_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """``[rows, batch, length]`` back into the form the text model's forward takes."""

    @abstractmethod
    def rotary_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """``[rows, batch, length]`` into the form ``text_model.rotary_emb`` takes."""

    # -- extra per-token inputs ----------------------------------------------------------------------------
    def slice_extra(self, kwargs: dict[str, Any], call: Mapping[str, Any], slicing: Slicing) -> dict[str, Any]:
        """The pruned text-model kwargs with the family's extra per-token tensors sliced too.

        The prefill pruner calls it last, with ``inputs_embeds``, ``attention_mask`` and ``position_ids`` already
        sliced; ``call`` is the multimodal call, ``slicing`` how the ``[batch, length]`` sequence was cut
        (:class:`~hf_tokenprune.pruning.Slicing`: ``index`` the kept original positions, right-aligned;
        ``slot_valid`` False on the padding that lines up rows of different lengths). The default slices the
        :attr:`token_tensors` the call holds, with 0 (False) on that padding. Families whose extra inputs are not
        ``[batch, length, ...]`` (Qwen3-VL's ``deepstack_visual_embeds``, one row per visual token) override it.
        """
        names = [name for name in self.token_tensors if isinstance(kwargs.get(name), torch.Tensor)]
        if not names:
            return kwargs
        kwargs = dict(kwargs)
        for name in names:
            sliced = slicing.sequence(kwargs[name])
            padding = ~slicing.slot_valid.view(*slicing.slot_valid.shape, *([1] * (sliced.dim() - 2)))
            kwargs[name] = sliced.masked_fill(padding.to(sliced.device), 0)
        return kwargs

    @property
    def mask_model(self) -> nn.Module:
        """The module whose 2-D ``attention_mask`` the text model's attention masks are built from: the text model
        (default), or the multimodal model where it hands the text model prepared masks (a dict of them, which the
        core then replaces by that 2-D mask to prune on). The masked reference masks the dropped tokens there."""
        return self.text_model

    def attention_masks(self, kwargs: dict[str, Any], call: Mapping[str, Any],
                        slicing: Slicing | None) -> dict[str, Any]:
        """The pruned text-model kwargs with the masks the text model takes, where :attr:`mask_model` is the
        multimodal model: built from the pruned 2-D ``attention_mask`` (over the cache and the call's kept tokens) as
        the multimodal model builds them (``call``: its kwargs; ``slicing``: the prefill's cut, None on a step over a
        pruned cache). Called last on a pruned prefill and on every step over a pruned cache. Default: ``kwargs``
        unchanged."""
        return kwargs

    def expansion_refusal(self, call: Mapping[str, Any]) -> str | None:
        """Why ``generate`` cannot repeat the samples of ``call`` (its kwargs) for beam search or several return
        sequences on this family with the installed transformers, unpruned too; None where it can (the default). The
        pruned model refuses such a call before any compute."""
        return None

    def vision_attention_layer(self) -> nn.Module:
        """The vision-tower layer whose attention VisionZip (``scorer="visionzip"``) ranks visual tokens by; the
        scorer captures its input with a forward pre-hook while the tower runs
        (:class:`~.vision_attention.VisionAttentionCapture`). Default: :class:`UnsupportedMethodError` naming
        :attr:`vision_attention_refusal`."""
        raise UnsupportedMethodError(f"scorer='visionzip' is not supported on {self.model_type}: "
                                     f"{self.vision_attention_refusal}")

    def vision_attention(self, records: Sequence[tuple[tuple, dict]], call: Mapping[str, Any]) -> torch.Tensor:
        """``[batch, length]`` float32: the attention each visual token of ``call`` (the multimodal call's kwargs)
        receives in :meth:`vision_attention_layer`, 0 elsewhere; ``records``: that layer's ``(args, kwargs)`` on each
        tower run of the call, in order. Default: refused like :meth:`vision_attention_layer`."""
        raise UnsupportedMethodError(f"scorer='visionzip' is not supported on {self.model_type}: "
                                     f"{self.vision_attention_refusal}")

    def inllm_refusal(self, layer: int) -> str | None:
        """Why in-LLM pruning (FastV, PDrop, DART) cannot shorten the sequence before decoder ``layer`` (> 0) on this
        family; None where it can (the default)."""
        return None

    # -- geometry ------------------------------------------------------------------------------------------
    @abstractmethod
    def token_regions(self, inputs: Mapping[str, Any], sample: int = 0, *,
                      original_sizes: Sequence[tuple[int, int]] | None = None) -> TokenRegions:
        """The region of its original image / video frame that each visual token of sample ``sample`` encodes.

        ``inputs``: the processor output for the batch (``input_ids`` and the visual inputs: grids, image
        sizes, pixel values). ``original_sizes``: ``(width, height)`` (PIL's ``Image.size``) of every image
        given to the processor, in that order; needed only where ``inputs`` lack what the geometry depends on
        (LLaVA-1.5's center crop), ignored elsewhere. Visual tokens: the :meth:`placeholder_ids` of ``inputs``.
        Raises :class:`MalformedVisualInputError` if the placeholders do not match the visual inputs.
        """


class PlaceholderAdapter(Adapter):
    """A placeholder model: each visual token is one :attr:`placeholders` token in ``input_ids`` whose embedding the
    multimodal model replaces with a visual feature; 1-D position ids. Families override the hooks listed in the
    module docstring."""

    @property
    def placeholders(self) -> tuple[Placeholder, ...]:
        """The family's visual inputs: the config's ``image_token_id`` (``pixel_values``) and ``video_token_id``
        (``pixel_values_videos``), where set."""
        cfg = self.model.config
        return tuple(Placeholder(token, kind, pixels) for token, kind, pixels in (
            (getattr(cfg, "image_token_id", None), "image", "pixel_values"),
            (getattr(cfg, "video_token_id", None), "video", "pixel_values_videos")) if token is not None)

    def call_placeholders(self, call: Mapping[str, Any]) -> tuple[Placeholder, ...]:
        """The :attr:`placeholders` of the modalities ``call`` brings pixel values (or ``generate``'s pre-encoded
        features) for, the first one per token id (GLM-4V marks image and video tokens with one id).

        transformers merges features only for the modalities a call brings; a placeholder of another modality is
        embedded as an ordinary token, so it is text for pruning too. A call given ``inputs_embeds`` may hold
        features the caller merged: there every placeholder counts.
        """
        encoded = call.get("mm_encoder_outputs") or {}
        brought: dict[int, Placeholder] = {}
        for p in self.placeholders:
            if call.get("inputs_embeds") is not None or call.get(p.pixels) is not None or \
                    encoded.get(p.kind) is not None:
                brought.setdefault(p.token_id, p)
        return tuple(brought.values())

    def _placeholder(self, token_id: int, call: Mapping[str, Any]) -> Placeholder:
        """The placeholder of ``token_id``; where several share it, the one whose inputs ``call`` brings."""
        return next((p for p in self.call_placeholders(call) if p.token_id == token_id),
                    next(p for p in self.placeholders if p.token_id == token_id))

    # -- tokens ----------------------------------------------------------------------------------------------
    @property
    def visual_token_ids(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys(p.token_id for p in self.placeholders))

    def placeholder_ids(self, call: Mapping[str, Any]) -> tuple[int, ...]:
        """The token ids of :meth:`call_placeholders`."""
        return tuple(p.token_id for p in self.call_placeholders(call))

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

    def structure_tokens(self, input_ids: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """``[batch, length]`` bool: text tokens that lay out the visual tokens (``visual``: the call's placeholder
        positions) and so are not instruction, where the model config does not name their ids (Pixtral's
        ``[IMG_BREAK]`` / ``[IMG_END]``). None by default."""
        return torch.zeros_like(visual)

    def item_lengths(self, call: dict[str, Any], token_id: int) -> list[int] | None:
        """Under ``generate``, which pre-encodes the visual inputs and passes ``mm_encoder_outputs``, the items'
        feature lengths; on a plain forward call, :meth:`input_item_lengths`."""
        placeholder = self._placeholder(token_id, call)
        encoded = (call.get("mm_encoder_outputs") or {}).get(placeholder.kind)
        lengths = _encoded_lengths(encoded) if encoded is not None else None
        return lengths if lengths is not None else self.input_item_lengths(call, placeholder)

    def input_item_lengths(self, call: Mapping[str, Any], placeholder: Placeholder) -> list[int] | None:
        """Token counts of the ``placeholder`` items of a call without pre-encoded features, from its raw visual
        inputs (grids, image sizes, pixel shapes); None where unknown (the default): each run of placeholders is
        then one item."""
        return None

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
                if bool((input_ids[b, start:start + length] != input_ids[b, start]).any()):
                    raise MalformedVisualInputError(
                        f"sample {b}: image and video placeholder tokens are adjacent without a separator")
            runs = sorted((start, length, token) for token in items for start, length in
                          self.placeholder_runs(input_ids[b], token, self._placeholder(token, call).kind))
            for start, length, token in runs:
                # the run's placeholder positions (a run that placeholder_runs joins skips the tokens between)
                index = start + (input_ids[b, start:] == token).nonzero().flatten()[:length]
                lengths = items[token]
                if lengths is None:
                    pieces.extend(self.frames(length, token, positions[:, b, index], call))
                    continue
                covered = 0
                while covered < length:
                    if used[token] >= len(lengths):
                        raise MalformedVisualInputError(
                            f"sample {b}: more visual placeholder tokens than the visual inputs provide "
                            f"({len(lengths)} item(s) of token id {token} for the whole batch)")
                    n = lengths[used[token]]
                    used[token] += 1
                    pieces.extend(self.frames(n, token, positions[:, b, index[covered:covered + n]], call))
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
        """Visual: the :meth:`placeholder_ids` of the call, split into items by :meth:`item_lengths` and into frames
        by :meth:`frames`.

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
        special |= self.structure_tokens(input_ids, visual)
        instruction = (idx > last_visual) & (idx < end) & real & ~special
        empty = ~instruction.any(dim=1)
        if empty.any():
            last_real = torch.where(real, idx, -1).amax(dim=1)
            instruction[empty, last_real[empty]] = True
        return VisualLayout(visual, instruction, self.segments(input_ids, visual, positions, call))

    # -- positions -----------------------------------------------------------------------------------------
    def expand_positions(self, position_ids: torch.Tensor | None, batch: int, length: int,
                         device: torch.device) -> torch.Tensor:
        """1-D: one row, ``0, 1, 2, ...`` where the model was given none."""
        if position_ids is None:
            return torch.arange(length, device=device).view(1, 1, -1).expand(1, batch, -1)
        return position_ids.view(1, *position_ids.shape[-2:]).expand(1, batch, -1)

    def text_model_positions(self, positions: torch.Tensor) -> torch.Tensor:
        return positions[0]

    def rotary_positions(self, positions: torch.Tensor) -> torch.Tensor:
        return positions[0]

    # -- geometry ------------------------------------------------------------------------------------------
    def token_regions(self, inputs: Mapping[str, Any], sample: int = 0, *,
                      original_sizes: Sequence[tuple[int, int]] | None = None) -> TokenRegions:
        """Each item's :meth:`item_regions`, in placeholder order."""
        input_ids = inputs["input_ids"]
        kinds = {p.token_id: p.kind for p in self.call_placeholders(inputs)}
        used = dict.fromkeys(kinds.values(), 0)
        items: list[VisualItem] = []
        regions: list[ItemRegions] = []
        for b in range(sample + 1):
            runs = sorted((start, length, kind) for token, kind in kinds.items()
                          for start, length in self.placeholder_runs(input_ids[b], token, kind))
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

    def scatter_items(self, call: Mapping[str, Any], values: torch.Tensor) -> torch.Tensor:
        """``[batch, length]``: one value per visual token, ``values`` in the order the tower produced them (the
        modalities of :meth:`call_placeholders` in turn, each in batch order, as transformers scatters the
        features), at the call's placeholder positions; 0 elsewhere. :class:`UnsupportedMethodError` where the
        counts differ (``generate`` repeating samples for beam search or several return sequences)."""
        input_ids = call["input_ids"]
        out = torch.zeros(input_ids.shape, dtype=values.dtype, device=values.device)
        masks = [input_ids == p.token_id for p in self.call_placeholders(call)]
        total = sum(int(m.sum()) for m in masks)
        if total != values.numel():
            raise UnsupportedMethodError(
                f"scorer='visionzip': the vision tower gave {values.numel()} token attentions for {total} visual "
                "tokens (generate repeats samples for beam search / num_return_sequences > 1, which visionzip does "
                "not support)")
        offset = 0
        for mask in masks:
            n = int(mask.sum())
            out[mask.to(out.device)] = values[offset:offset + n]
            offset += n
        return out

    def placeholder_runs(self, row: torch.Tensor, token_id: int, kind: str) -> list[tuple[int, int]]:
        """``(start, tokens)`` of the runs of ``token_id`` in one row of ``input_ids`` that :meth:`token_regions`
        fills with whole ``kind`` items and :meth:`segments` with items: the runs of consecutive placeholders
        (families whose video frames are separated by timestamp text join a video's frames)."""
        return _runs(row == token_id)

    @abstractmethod
    def item_regions(self, inputs: Mapping[str, Any], kind: str, index: int,
                     original_size: tuple[int, int] | None) -> ItemRegions:
        """Regions of the tokens of image (``kind="image"``) or video ``index`` of the batch, in placeholder order.
        ``original_size``: its ``(width, height)`` if the caller gave it. An index past the inputs' items raises
        ``IndexError``."""
