"""Continuing a pruned cache: decode steps and later chat turns over a cache whose prefill dropped tokens.

A prefill run while pruning records a :class:`PrunedCache` layout on the cache it filled. Every later call over
that cache goes through :class:`Continuation`: ``generate`` arguments are checked before any compute, a new turn
given with tokens the cache already holds is cut to its new part, and each step gets the attention mask of the
pruned cache plus its own tokens and positions that continue the cache's numbering (the original one, or the
shortened one for ``positions="contiguous"``). Calls that do not extend the cached conversation raise
:class:`PrunedCacheError`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .adapters import Adapter
from .compat import generate_cache
from .config import TokenPruneConfig


class Owner(Protocol):
    """What the prefill pruner and the continuation read of a wrapped model's handle (``model.tokenprune``)."""

    adapter: Adapter
    config: TokenPruneConfig
    scorer: Any
    continuation: Continuation

    @property
    def active(self) -> bool: ...


class PrunedCacheError(RuntimeError):
    """A call continues a pruned cache in a way the pruner cannot keep consistent."""


_RECORD = "_tokenprune_layout"  # the attribute of a cache that holds its PrunedCache


@dataclass
class PrunedCache:
    """How prefills run while pruning was active laid out the cache they filled, and what it holds.

    Stored on the cache object itself, so that several conversations in flight and ``copy.deepcopy`` of a cache each
    keep their own. ``mask``, ``original_length``, ``last_positions`` and ``position_shift`` describe the cache up to
    the end of its last prefill; ``tokens`` and ``seen_mask`` everything it holds, in the unpruned numbering.
    """

    mask: torch.Tensor  # [batch, length] attention mask of the cache up to the end of its last prefill
    original_length: int  # the unpruned length up to there
    last_positions: torch.Tensor  # [rows, batch] positions of the last prefill token, as the pruned model numbers them
    position_shift: torch.Tensor | None  # [rows, batch, 1] pruned minus original numbering ("contiguous")
    tokens: torch.Tensor  # [batch, >= covered] input ids the cache holds, unpruned numbering (-1: given as embeddings)
    seen_mask: torch.Tensor  # [batch, >= covered] the unpruned 2-D attention mask over them
    positions: str  # TokenPruneConfig.positions of the prefills
    owner: weakref.ref  # the TokenPruneHandle that ran them

    @classmethod
    def first(cls, mask: torch.Tensor, original_length: int, last_positions: torch.Tensor,
              shift: torch.Tensor | None, input_ids: torch.Tensor | None, original_mask: torch.Tensor | None,
              owner: Owner) -> PrunedCache:
        """The layout of a first prefill's cache (``mask``: as pruned; ``original_mask``: as given, or None)."""
        batch = mask.shape[0]
        tokens = input_ids if input_ids is not None else mask.new_full((batch, original_length), -1, dtype=torch.long)
        seen = original_mask if original_mask is not None else mask.new_ones((batch, original_length))
        return cls(mask, original_length, last_positions, shift, tokens, seen, owner.config.positions,
                   weakref.ref(owner))

    @staticmethod
    def of(cache: Any) -> PrunedCache | None:
        """The layout recorded on ``cache``, unchecked (None for any other cache)."""
        return getattr(cache, _RECORD, None)

    def record_on(self, cache: Any) -> None:
        setattr(cache, _RECORD, self)

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    @property
    def pruned(self) -> bool:
        """Whether any token was dropped (else the cache is laid out as an unpruned one)."""
        return self.length != self.original_length

    def covered(self, cache: Any) -> int:
        """How many tokens of the unpruned sequence (kept or dropped) the cache holds."""
        return self.original_length + cache.get_seq_length() - self.length

    def slot_positions(self, text_mask: torch.Tensor, slots: slice) -> torch.Tensor:
        """``[rows, batch, n]`` positions of the ``slots`` of ``text_mask`` (the text model's mask over the cache and
        a call's tokens, :meth:`text_mask`) as the pruned model numbers them: counted from the last prefill token
        over the real slots (masked slots repeat the previous position; slots of the prefill a cropped cache has
        re-fed count back from its last token)."""
        counts = text_mask.long().cumsum(dim=-1)
        offsets = counts[:, slots] - self.mask.long().sum(dim=-1, keepdim=True)
        return self.last_positions.unsqueeze(-1) + offsets.to(self.last_positions.device)

    def text_mask(self, mask: Any, covered: int, length: int) -> torch.Tensor:
        """The text model's 2-D mask over the pruned cache and a call's ``length`` tokens: the cache's last prefill
        as pruned, then the call's whole-sequence ``mask`` after that prefill (ones without one), checked. A cache
        cropped into its last prefill (assisted decoding rejecting candidate tokens the prefill held: text at its
        end) keeps that prefill's first slots."""
        expected = covered + length
        cropped = max(self.original_length - covered, 0)
        start = self.original_length - cropped
        if mask is None:
            tail = self.mask.new_ones((self.mask.shape[0], expected - start))
        elif not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[1] != expected:
            raise PrunedCacheError(
                f"this call continues a pruned cache holding {covered} tokens of the unpruned sequence with "
                f"{length} new tokens and an attention mask of shape {tuple(getattr(mask, 'shape', ()))}; expected a "
                f"2-D mask over the whole sequence, (batch, {expected})")
        else:
            tail = mask[:, start:]
        return torch.cat([self.mask[:, :self.length - cropped], tail.to(self.mask)], dim=1)

    def new_part(self, cache: Any, length: int, mask: Any, total: int | None = None) -> tuple[int, int]:
        """``(start, covered)``: the unpruned position of the first of a call's ``length`` tokens, and how many
        tokens the cache holds. The call's sequence ends at ``total``: the length of its 2-D ``mask``, which spans
        the whole sequence, else the given ``total``, else the tokens follow the cache. Raises unless the call ends
        after the cache and leaves no gap."""
        covered = self.covered(cache)
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            total = mask.shape[1]
        elif total is None:
            total = covered + length
        start = total - length
        if start > covered:
            raise PrunedCacheError(f"this call continues a pruned cache holding {covered} tokens of the unpruned "
                                   f"sequence with an attention mask of length {total} for {length} new tokens: "
                                   f"{start - covered} tokens are missing between the cache and the new ones")
        if total <= covered:
            raise PrunedCacheError(f"this call continues a pruned cache holding {covered} tokens of the unpruned "
                                   f"sequence but its input ends at {total}: there is no new token to add")
        return start, covered

    def check_history(self, input_ids: torch.Tensor, mask: Any, start: int, covered: int) -> None:
        """Raise unless a call's ``input_ids`` (the first at unpruned position ``start``) and its whole-sequence
        2-D ``mask`` repeat what the cache holds where they overlap it."""
        rows = self.tokens.shape[0]
        if input_ids.shape[0] != rows:
            raise PrunedCacheError(f"this call has {input_ids.shape[0]} rows but the pruned cache it continues has "
                                   f"{rows}: continue every row of the batch (beam-search caches cannot be continued)")
        stop = min(covered, start + input_ids.shape[1])
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not torch.equal(
                mask[:, :stop].bool().to(self.seen_mask.device), self.seen_mask[:, :stop].bool()):
            raise PrunedCacheError(
                "the attention mask over the cached part of the sequence differs from the one the pruned cache was "
                "built with (a batch re-padded for the new turn?): keep each row's padding and append the new tokens "
                "after the previous turn's sequence")
        held = self.tokens[:, start:stop]
        given = input_ids[:, : stop - start].to(held.device)
        differs = (held != given) & (held >= 0)
        if bool(differs.any()):
            b, j = differs.nonzero()[0].tolist()
            raise PrunedCacheError(
                f"input_ids do not repeat the conversation the pruned cache holds: row {b}, position {start + j} is "
                f"token {int(given[b, j])} where the cache holds {int(held[b, j])}. Build the next turn as the "
                "previous turn's sequence (out.sequences) followed by the new tokens")


def has_visual_inputs(call: dict[str, Any]) -> bool:
    """Whether a model call brings pixel values (or ``generate``'s pre-encoded features)."""
    return any(call.get(key) is not None for key in ("pixel_values", "pixel_values_videos")) or any(
        v is not None for v in (call.get("mm_encoder_outputs") or {}).values())


class Continuation:
    """The calls of one wrapped model over the pruned caches it filled (``owner``: its handle)."""

    def __init__(self, owner: Owner) -> None:
        self._owner = weakref.ref(owner)
        self._turn: tuple[weakref.ref, int] | None = None  # a generate() call's cache and sequence length

    @property
    def owner(self) -> Owner:
        return self._owner()

    def layout_of(self, cache: Any) -> PrunedCache | None:
        """The layout the owner's prefills recorded on ``cache`` (None for any other cache), once checked that the
        model, as configured now, can continue it."""
        layout = PrunedCache.of(cache)
        if layout is None:
            return None
        owner = self.owner
        if not layout.pruned and (layout.owner() is not owner or not owner.active
                                  or layout.positions != owner.config.positions):
            delattr(cache, _RECORD)  # nothing was dropped: an ordinary cache from now on
            return None
        if layout.owner() is not owner:
            raise PrunedCacheError("this cache was filled by another wrapped model (or before the model was unwrapped "
                                   "and wrapped again): continue a pruned cache with the model that pruned it")
        if not owner.active:
            raise PrunedCacheError("this cache was filled while pruning was active; continuing it unpruned (ratio=1.0 "
                                   "or inside tokenprune.disabled()) would read its shortened layout as the whole "
                                   "sequence: continue it with pruning active, or start a new cache")
        if layout.positions != owner.config.positions:
            raise PrunedCacheError(f"this cache was pruned with positions={layout.positions!r} but the model is now "
                                   f"configured with positions={owner.config.positions!r}: its numbering cannot be "
                                   "continued; start a new cache")
        return layout

    def check_generate(self, args: tuple, kwargs: dict) -> None:
        """Before any compute: a ``generate`` call that continues a pruned cache must extend the sequence it holds,
        and (on families that cannot number them) add no visual tokens after cached ones."""
        cache = generate_cache(kwargs)
        layout = self.layout_of(cache) if cache is not None else None
        input_ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
        self._turn = None
        if layout is None or not isinstance(input_ids, torch.Tensor):
            return
        mask = kwargs.get("attention_mask")
        # without a mask generate() takes input_ids for the whole sequence
        start, covered = layout.new_part(cache, input_ids.shape[1], mask, input_ids.shape[1])
        # generate() drops an all-ones mask, and with it the length of the sequence its prefill slices
        self._turn = (weakref.ref(cache), start + input_ids.shape[1])
        layout.check_history(input_ids, mask, start, covered)
        adapter = self.owner.adapter
        placeholders = torch.tensor(adapter.placeholder_ids(kwargs), dtype=input_ids.dtype, device=input_ids.device)
        adds_visual = bool(torch.isin(input_ids[:, covered - start:], placeholders).any())
        reason = adapter.images_after_cached_images
        if reason is not None and adds_visual:
            cached = layout.tokens[:, :covered]
            if bool(torch.isin(cached, torch.tensor(adapter.visual_token_ids, device=cached.device)).any()):
                raise PrunedCacheError(f"this turn adds visual tokens after a cache that holds visual tokens, which "
                                       f"is not supported on {adapter.model_type}: {reason}")
        reason = adapter.continued_turns_unsupported
        if reason is not None and (adds_visual or layout.positions == "contiguous"):
            what = "adds visual tokens" if adds_visual else 'renumbers positions (positions="contiguous")'
            raise PrunedCacheError(f"this turn continues a pruned cache and {what}, which is not supported on "
                                   f"{adapter.model_type}: {reason}")

    def record(self, call: dict[str, Any], cache: Any, layout: PrunedCache) -> tuple[dict[str, Any], bool]:
        """A multimodal-model call over a pruned cache: ``(call, new_turn)``, the call cut to the tokens the cache
        does not hold yet and, for a text-only call, numbered after the cache; ``new_turn`` when it is the prefill
        of a ``generate`` call."""
        input_ids, mask = call.get("input_ids"), call.get("attention_mask")
        length = (input_ids if input_ids is not None else call["inputs_embeds"]).shape[1]
        turn, self._turn = self._turn, None
        new_turn = turn is not None and turn[0]() is cache
        start, covered = layout.new_part(cache, length, mask, turn[1] if new_turn else None)
        if input_ids is not None:
            layout.check_history(input_ids, mask, start, covered)
        repeated = covered - start
        if repeated:
            # a new turn given with tokens the cache already holds (generate() slices the conversation by the
            # pruned cache length, which is shorter than what the cache holds): drop them
            for key in ("input_ids", "inputs_embeds", "mm_token_type_ids", "token_type_ids"):
                if call.get(key) is not None:
                    call[key] = call[key][:, repeated:]
            if call.get("position_ids") is not None:
                call["position_ids"] = call["position_ids"][..., repeated:]
            length -= repeated
        self._check_visual_inputs(call)
        rows = layout.tokens.shape[0]
        new_ids = call["input_ids"] if input_ids is not None else layout.tokens.new_full((rows, length), -1)
        layout.tokens = torch.cat([layout.tokens[:, :covered], new_ids.to(layout.tokens.device)], dim=1)
        layout.seen_mask = mask[:, : covered + length].to(layout.seen_mask) if isinstance(mask, torch.Tensor) else \
            torch.cat([layout.seen_mask[:, :covered], layout.seen_mask.new_ones((rows, length))], dim=1)
        if call.get("position_ids") is None and not has_visual_inputs(call):
            # number the new tokens after the cache ourselves (the model would derive them from the pruned cache
            # length, or from rope_deltas, and get them wrong)
            text_mask = layout.text_mask(mask, covered, length)
            positions = layout.slot_positions(text_mask, slice(-length, None))
            call["position_ids"] = self.owner.adapter.text_model_positions(positions)
            call["positions_from_pruner"] = True
        return call, new_turn

    def _check_visual_inputs(self, call: dict[str, Any]) -> None:
        """A call continuing a pruned cache must bring visual inputs for its own placeholders only."""
        input_ids = call.get("input_ids")
        if input_ids is None or not has_visual_inputs(call):
            return
        adapter = self.owner.adapter
        for token in adapter.visual_token_ids:
            lengths = adapter.item_lengths(call, token)
            placeholders = int((input_ids == token).sum())
            if lengths is not None and sum(lengths) > placeholders:
                raise PrunedCacheError(
                    f"this call continues a pruned cache with visual inputs for {sum(lengths)} tokens of id {token} "
                    f"but the new part of input_ids (after what the cache holds) has {placeholders} placeholders: "
                    "pass the visual inputs of the new images / videos only (the unpruned model refuses images that "
                    "are already in the cache too)")

    def step_positions(self, given: torch.Tensor | None, call: dict[str, Any], layout: PrunedCache,
                       text_mask: torch.Tensor, length: int) -> torch.Tensor:
        """Our positions for a call's ``length`` new tokens (:meth:`PrunedCache.slot_positions`), after checking the
        caller's own ``given`` ones against them. Only the first row is compared where the row counts agree:
        generate() may derive Qwen's M-RoPE rows of a new turn from the pruned cache length; ours replace them."""
        ours = layout.slot_positions(text_mask, slice(-length, None))
        if given is None or call.get("positions_from_pruner"):
            return ours
        full = self.owner.adapter.expand_positions(given, ours.shape[1], length, given.device)
        if layout.position_shift is not None:
            full = full + layout.position_shift
        real = text_mask[:, -length:].bool()
        if full.shape[0] == ours.shape[0] and not torch.equal(full[0][real], ours[0][real]):
            raise PrunedCacheError("position ids of this call do not continue the pruned cache: the unpruned "
                                   "numbering of its tokens follows from the attention mask over the whole sequence")
        return ours

    def step(self, kwargs: dict, call: dict[str, Any], cache: Any, layout: PrunedCache) -> tuple:
        """A decode step, or a new turn without visual inputs, over a pruned cache: the attention mask of the
        pruned cache plus the new tokens', and positions that continue the cache's numbering."""
        length = kwargs["inputs_embeds"].shape[1]
        text_mask = layout.text_mask(kwargs.get("attention_mask"), layout.covered(cache), length)
        positions = self.step_positions(kwargs.get("position_ids"), call, layout, text_mask, length)
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = text_mask
        kwargs["position_ids"] = self.owner.adapter.text_model_positions(positions)
        return (), self.owner.adapter.attention_masks(kwargs, call, None)
