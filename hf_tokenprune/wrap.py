"""prune_wrap / unwrap / from_pretrained, and the ``model.tokenprune`` handle.

Three instance-level hooks, installed through the model's adapter and removed by :func:`unwrap`:

* a pre-hook on the multimodal model records the call's ``input_ids`` and visual inputs (the text model
  receives only ``inputs_embeds``); on a call over a pruned cache it checks the call against what the cache holds,
  drops the tokens it already holds and supplies consistent positions when none are given;
* a pre-hook on the text model prunes the prefill (scores, keeps the top tokens, slices embeddings, mask and
  position ids) and, on every later step over the pruned cache, rebuilds the attention mask and numbers the new
  tokens after the cache (the original numbering, or the shortened one for ``positions="contiguous"``);
* a post-hook on the text model stores the prefill's layout on the cache it filled.

Multi-turn chat: a later ``generate`` given the whole conversation and the returned cache continues it. The
cache keeps the first turn's pruned sequence (dropped tokens are not re-added); the new turn's tokens follow with
positions consistent with the first turn, and its new images are scored with its own question and pruned. Calls
that do not extend the cached conversation raise :class:`PrunedCacheError`, before any compute where the
arguments of ``generate`` show it (the instance's ``generate`` is wrapped for this and for :mod:`.guards`).

The in-LLM baselines (FastV, PDrop, DART: a :class:`~hf_tokenprune.baselines.LayerSchedule`) leave the text model's
input alone; the pre-hook hands the prefill's layout to a :class:`~hf_tokenprune.inllm.LayerPruner`, whose hooks on
the decoder layers prune, and tells it about every decode step over its cache.

The class is never touched: other instances of it are unaffected.
"""

from __future__ import annotations

import contextlib
import functools
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from .adapters import Adapter, get_adapter
from .baselines import LayerSchedule
from .compat import cache_kwarg, generate_cache, output_cache
from .config import TokenPruneConfig
from .guards import check_generate
from .inllm import LayerPruner
from .pruning import Slicing, contiguous_positions, select_mass, select_top, unit_distribution
from .scorers import ScoreInputs, Scorer, build_scorer
from .stats import PruneStage, PruneStats, kv_cache_bytes, layer_lengths, prefill_flops


class PrunedCacheError(RuntimeError):
    """A call continues a pruned cache in a way the pruner cannot keep consistent."""


_RECORD = "_tokenprune_layout"  # the attribute of a cache that holds its _PrunedCache


@dataclass
class _PrunedCache:
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
        a call's tokens, :meth:`TokenPruneHandle._text_mask`) as the pruned model numbers them: counted from the
        last prefill token over the real slots (masked slots repeat the previous position; slots of the prefill a
        cropped cache has re-fed count back from its last token)."""
        counts = text_mask.long().cumsum(dim=-1)
        offsets = counts[:, slots] - counts[:, self.length - 1:self.length]
        return self.last_positions.unsqueeze(-1) + offsets.to(self.last_positions.device)


class _Captured(Exception):  # noqa: N818 - control flow, never escapes score_inputs
    """Stops a forward at the LLM input, carrying what the scorer would see."""

    def __init__(self, found: tuple[ScoreInputs, torch.Tensor] | None) -> None:
        super().__init__("captured")
        self.inputs = found[0] if found is not None else None


class TokenPruneHandle:
    """``model.tokenprune``: the configuration, the last call's :class:`PruneStats`, and :meth:`disabled`.

    ``last_stats`` is reset on every prefill and stays ``None`` when the call had nothing to prune (no visual
    tokens, pruning disabled or ``ratio=1`` with the fixed budget). For a turn that continues a cache it describes
    that turn's new tokens only (``None`` for a text-only turn). ``scorer`` is None when the configuration prunes
    nothing (``ratio=1`` with the fixed budget): no scorer or compressor is built then.
    """

    def __init__(self, model: nn.Module, adapter: Adapter, config: TokenPruneConfig,
                 scorer: Scorer | LayerSchedule | None) -> None:
        self._model_ref = weakref.ref(model)
        self.adapter = adapter
        self._layers: LayerPruner | None = None
        self.configure(config, scorer)
        self.last_stats: PruneStats | None = None
        self._enabled = True
        self._call: dict[str, Any] | None = None
        self._pending: _PrunedCache | None = None  # the layout of the running prefill, for its cache
        self._turn: tuple[weakref.ref, int] | None = None  # a generate() call's cache and sequence length
        self._capturing = False
        text_model = adapter.text_model
        self._hooks = [
            adapter.model.register_forward_pre_hook(self._check_call, with_kwargs=True),
            adapter.multimodal_model.register_forward_pre_hook(self._record_call, with_kwargs=True),
            text_model.register_forward_pre_hook(self._before_text_model, with_kwargs=True),
            text_model.register_forward_hook(self._after_text_model, with_kwargs=True),
        ]
        self._guard_generate(model)

    def __repr__(self) -> str:
        scorer = type(self.scorer).__name__ if self.scorer is not None else None
        return f"TokenPruneHandle({self.config}, scorer={scorer})"

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the model unpruned inside the block."""
        previous, self._enabled = self._enabled, False
        try:
            yield
        finally:
            self._enabled = previous

    def configure(self, config: TokenPruneConfig, scorer: Scorer | LayerSchedule | None) -> None:
        """Switch to another configuration (installs / removes the decoder-layer hooks of in-LLM methods)."""
        if self._layers is not None:
            self._layers.remove()
        self.config, self.scorer, self.last_stats = config, scorer, None
        self._layers = LayerPruner(self.adapter.text_model, scorer, config.min_tokens) if isinstance(
            scorer, LayerSchedule) else None

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._layers is not None:
            self._layers.remove()
        model = self._model_ref()
        if model is not None and getattr(model.__dict__.get("generate"), "_tokenprune_guard", False):
            del model.__dict__["generate"]

    def _guard_generate(self, model: nn.Module) -> None:
        """Give the instance a ``generate`` that refuses unsupported options (:mod:`.guards`) and inconsistent
        continuations of a pruned cache (:meth:`_check_generate_continuation`) before any compute."""
        generate = model.generate

        @functools.wraps(generate)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            if self.active:
                check_generate(model, kwargs)
            self._check_generate_continuation(args, kwargs)
            return generate(*args, **kwargs)

        guarded._tokenprune_guard = True
        model.__dict__["generate"] = guarded

    # -- continuing a cache --------------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """Whether calls are pruned now: the config prunes (``ratio < 1`` or ``budget="auto"``) and not inside
        :meth:`disabled`."""
        return self._enabled and self.config.prunes

    def _layout_of(self, cache: Any) -> _PrunedCache | None:
        """The layout our prefills recorded on ``cache`` (None for any other cache), once checked that the model,
        as configured now, can continue it."""
        layout = getattr(cache, _RECORD, None)
        if layout is None:
            return None
        if not layout.pruned and (layout.owner() is not self or not self.active
                                  or layout.positions != self.config.positions):
            delattr(cache, _RECORD)  # nothing was dropped: an ordinary cache from now on
            return None
        if layout.owner() is not self:
            raise PrunedCacheError("this cache was filled by another wrapped model (or before the model was unwrapped "
                                   "and wrapped again): continue a pruned cache with the model that pruned it")
        if not self.active:
            raise PrunedCacheError("this cache was filled while pruning was active; continuing it unpruned (ratio=1.0 "
                                   "or inside tokenprune.disabled()) would read its shortened layout as the whole "
                                   "sequence: continue it with pruning active, or start a new cache")
        if layout.positions != self.config.positions:
            raise PrunedCacheError(f"this cache was pruned with positions={layout.positions!r} but the model is now "
                                   f"configured with positions={self.config.positions!r}: its numbering cannot be "
                                   "continued; start a new cache")
        return layout

    def _new_part(self, layout: _PrunedCache, cache: Any, length: int, mask: Any,
                  total: int | None = None) -> tuple[int, int]:
        """``(start, covered)``: the unpruned position of the first of a call's ``length`` tokens, and how many
        tokens the cache holds. The call's sequence ends at ``total``: the length of its 2-D ``mask``, which spans
        the whole sequence, else the given ``total``, else the tokens follow the cache. Raises unless the call ends
        after the cache and leaves no gap."""
        covered = layout.covered(cache)
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

    def _check_history(self, layout: _PrunedCache, input_ids: torch.Tensor, mask: Any, start: int,
                       covered: int) -> None:
        """Raise unless a call's ``input_ids`` (the first at unpruned position ``start``) and its whole-sequence
        2-D ``mask`` repeat what the cache holds where they overlap it."""
        rows = layout.tokens.shape[0]
        if input_ids.shape[0] != rows:
            raise PrunedCacheError(f"this call has {input_ids.shape[0]} rows but the pruned cache it continues has "
                                   f"{rows}: continue every row of the batch (beam-search caches cannot be continued)")
        stop = min(covered, start + input_ids.shape[1])
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not torch.equal(
                mask[:, :stop].bool().to(layout.seen_mask.device), layout.seen_mask[:, :stop].bool()):
            raise PrunedCacheError(
                "the attention mask over the cached part of the sequence differs from the one the pruned cache was "
                "built with (a batch re-padded for the new turn?): keep each row's padding and append the new tokens "
                "after the previous turn's sequence")
        held = layout.tokens[:, start:stop]
        given = input_ids[:, : stop - start].to(held.device)
        differs = (held != given) & (held >= 0)
        if bool(differs.any()):
            b, j = differs.nonzero()[0].tolist()
            raise PrunedCacheError(
                f"input_ids do not repeat the conversation the pruned cache holds: row {b}, position {start + j} is "
                f"token {int(given[b, j])} where the cache holds {int(held[b, j])}. Build the next turn as the "
                "previous turn's sequence (out.sequences) followed by the new tokens")

    def _check_generate_continuation(self, args: tuple, kwargs: dict) -> None:
        """Before any compute: a ``generate`` call that continues a pruned cache must extend the sequence it holds,
        and (on families that cannot number them) add no visual tokens after cached ones."""
        cache = generate_cache(kwargs)
        layout = self._layout_of(cache) if cache is not None else None
        input_ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
        self._turn = None
        if layout is None or not isinstance(input_ids, torch.Tensor):
            return
        mask = kwargs.get("attention_mask")
        # without a mask generate() takes input_ids for the whole sequence
        start, covered = self._new_part(layout, cache, input_ids.shape[1], mask, input_ids.shape[1])
        # generate() drops an all-ones mask, and with it the length of the sequence its prefill slices
        self._turn = (weakref.ref(cache), start + input_ids.shape[1])
        self._check_history(layout, input_ids, mask, start, covered)
        reason = self.adapter.images_after_cached_images
        if reason is not None:
            new = torch.tensor(self.adapter.placeholder_ids(kwargs), dtype=input_ids.dtype, device=input_ids.device)
            cached = layout.tokens[:, :covered]
            if bool(torch.isin(input_ids[:, covered - start:], new).any()) and bool(
                    torch.isin(cached, torch.tensor(self.adapter.visual_token_ids, device=cached.device)).any()):
                raise PrunedCacheError(f"this turn adds visual tokens after a cache that holds visual tokens, which "
                                       f"is not supported on {self.adapter.model_type}: {reason}")
        reason = self.adapter.continued_turns_unsupported
        if reason is not None:
            placeholders = torch.tensor(self.adapter.placeholder_ids(kwargs), dtype=input_ids.dtype,
                                        device=input_ids.device)
            adds_visual = bool(torch.isin(input_ids[:, covered - start:], placeholders).any())
            if adds_visual or layout.positions == "contiguous":
                what = "adds visual tokens" if adds_visual else 'renumbers positions (positions="contiguous")'
                raise PrunedCacheError(f"this turn continues a pruned cache and {what}, which is not supported on "
                                       f"{self.adapter.model_type}: {reason}")

    def _has_visual_inputs(self, call: dict[str, Any]) -> bool:
        return any(call.get(key) is not None for key in ("pixel_values", "pixel_values_videos")) or any(
            v is not None for v in (call.get("mm_encoder_outputs") or {}).values())

    def _check_visual_inputs(self, call: dict[str, Any]) -> None:
        """A call continuing a pruned cache must bring visual inputs for its own placeholders only."""
        input_ids = call.get("input_ids")
        if input_ids is None or not self._has_visual_inputs(call):
            return
        for token in self.adapter.visual_token_ids:
            lengths = self.adapter.item_lengths(call, token)
            placeholders = int((input_ids == token).sum())
            if lengths is not None and sum(lengths) > placeholders:
                raise PrunedCacheError(
                    f"this call continues a pruned cache with visual inputs for {sum(lengths)} tokens of id {token} "
                    f"but the new part of input_ids (after what the cache holds) has {placeholders} placeholders: "
                    "pass the visual inputs of the new images / videos only (the unpruned model refuses images that "
                    "are already in the cache too)")

    # -- hooks ------------------------------------------------------------------------------------------------
    def _check_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.active and kwargs.get("labels") is not None:
            raise ValueError("hf_tokenprune prunes inference prefills only: a forward with labels would score "
                             "a shortened sequence; run it inside `with model.tokenprune.disabled():`")

    def _record_call(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        call = dict(kwargs)
        if args:
            call.setdefault("input_ids", args[0])
        self._call = call
        cache = cache_kwarg(kwargs)
        layout = self._layout_of(cache) if cache is not None else None
        if layout is None:
            return None
        input_ids, mask = call.get("input_ids"), call.get("attention_mask")
        length = (input_ids if input_ids is not None else call["inputs_embeds"]).shape[1]
        turn, self._turn = self._turn, None
        total = None
        if turn is not None and turn[0]() is cache:  # the prefill of a generate() call: a new turn
            total, self.last_stats = turn[1], None
        start, covered = self._new_part(layout, cache, length, mask, total)
        if input_ids is not None:
            self._check_history(layout, input_ids, mask, start, covered)
        repeated = covered - start
        if repeated:
            # a new turn given with tokens the cache already holds (generate() slices the conversation by the
            # pruned cache length, which is shorter than what the cache holds): drop them
            for key in ("input_ids", "inputs_embeds", "mm_token_type_ids"):
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
        if call.get("position_ids") is None and not self._has_visual_inputs(call):
            # number the new tokens after the cache ourselves (the model would derive them from the pruned cache
            # length, or from rope_deltas, and get them wrong)
            text_mask = self._text_mask(layout, mask, covered, length)
            positions = layout.slot_positions(text_mask, slice(-length, None))
            call["position_ids"] = self.adapter.text_model_positions(positions)
            call["positions_from_pruner"] = True
        return (), {k: v for k, v in call.items() if k != "positions_from_pruner"}

    def _before_text_model(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return None
        cache = cache_kwarg(kwargs)
        layers = self._layers
        if layers is not None:
            layers.reset()
        if not self.active and not self._capturing:
            # nothing to prune: no tensor op either, so the call stays traceable by torch.compile(fullgraph=True)
            self._call, self._pending, self.last_stats = None, None, None
            return None
        call, self._call = self._call, None
        if cache is not None and cache.get_seq_length() > 0:
            if layers is not None and layers.owns(cache):
                layers.step(kwargs.get("attention_mask"))
                return None
            layout = getattr(cache, _RECORD, None)  # checked by _record_call
            if layout is None:
                return None
            self._pending = None
            if self._has_visual_inputs(call or {}):
                self.last_stats = None
                return self._prune_prefill(kwargs, call, cache, layout)
            return self._continue(kwargs, call or {}, cache, layout)
        if self._capturing:
            raise _Captured(self._score_inputs(kwargs, call))
        self._pending, self.last_stats = None, None
        if layers is not None:
            found = self._score_inputs(kwargs, call)
            if found is not None:
                layers.begin(found[0], cache)
            return None
        return self._prune_prefill(kwargs, call)

    def _after_text_model(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._layers is not None:
            done = self._layers.finish(output_cache(output))
            if done is not None and done.stages:
                embeds = kwargs["inputs_embeds"]
                self.last_stats = self._stats([sum(u) for u in done.units], done.stages, embeds.shape[0], done.length,
                                              embeds.dtype, done.scoring_time_s)
        layout, self._pending = self._pending, None
        if layout is not None and output_cache(output) is not None:
            setattr(output_cache(output), _RECORD, layout)

    # -- prefill ---------------------------------------------------------------------------------------------
    def _score_inputs(self, kwargs: dict, call: dict[str, Any] | None) -> tuple[ScoreInputs, torch.Tensor] | None:
        """What the scorer sees on this prefill, and the expanded position ids; None without visual tokens."""
        embeds = kwargs["inputs_embeds"]
        batch, length = embeds.shape[:2]
        input_ids = call.get("input_ids") if call else None
        if input_ids is None:
            return None  # no placeholder ids to locate visual tokens (text-only or embeds-only call)
        if tuple(input_ids.shape) != (batch, length):
            raise PrunedCacheError(
                f"the text model got {length} positions but the model call had input_ids of shape "
                f"{tuple(input_ids.shape)}; chunked prefill (prefill_chunk_size) is not supported with pruning")
        mask = kwargs.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
            raise ValueError("hf_tokenprune needs the 2-D attention mask on the prefill; 4-D / prepared masks "
                             "(static or compiled caches) are not supported with pruning")
        if mask is not None and bool((mask.diff(dim=1) < 0).any()):
            raise ValueError("a padded batch must be LEFT-padded for generation with pruning "
                             "(set processor.tokenizer.padding_side = 'left')")
        positions = self.adapter.expand_positions(kwargs.get("position_ids"), batch, length, embeds.device)
        layout = self.adapter.layout(call, mask, positions)
        if not layout.visual_mask.any():
            return None
        units = layout.segments if self.config.scope == "image" else [[sum(s)] if s else [] for s in layout.segments]
        return ScoreInputs(self.adapter.text_model, embeds, mask, self.adapter.rotary_positions(positions),
                           layout, units), positions

    def _prune_prefill(self, kwargs: dict, call: dict[str, Any] | None, cache: Any = None,
                       layout: _PrunedCache | None = None) -> tuple | None:
        """Prune a prefill: the whole prompt, or (``layout`` given) a new turn's tokens after the cache it
        describes (scored on their own: the cached history is not part of the scoring feature).

        Records the resulting layout for the cache the call fills. Without visual tokens a first prefill runs
        unchanged and a new turn continues the cache as a decode step does.
        """
        embeds, mask = kwargs["inputs_embeds"], kwargs.get("attention_mask")
        batch, length = embeds.shape[:2]
        given = kwargs.get("position_ids")
        if layout is None:
            part_mask = mask
            positions = self.adapter.expand_positions(given, batch, length, embeds.device)
        else:
            covered = layout.covered(cache)
            text_mask = self._text_mask(layout, mask, covered, length)
            part_mask = text_mask[:, -length:]
            ours = self._step_positions(given, call or {}, layout, text_mask, length)
            # original numbering: the model's own positions if it gave them (M-RoPE ids of new images), else ours
            if given is not None and not (call or {}).get("positions_from_pruner"):
                positions = self.adapter.expand_positions(given, batch, length, given.device)
            else:
                positions = ours if layout.position_shift is None else ours - layout.position_shift
        part = {"inputs_embeds": embeds, "attention_mask": part_mask,
                "position_ids": self.adapter.text_model_positions(positions)}
        found = self._score_inputs(part, call)
        if found is None:
            if layout is not None:
                return self._continue(kwargs, call or {}, cache, layout)
            unpruned = mask if mask is not None else torch.ones((batch, length), dtype=torch.long, device=embeds.device)
            self._pending = self._layout(unpruned, length, positions[:, :, -1], None, (call or {}).get("input_ids"),
                                         mask)
            return None
        inputs = found[0]
        structure = inputs.layout
        start = time.perf_counter()
        scores = self.scorer.score(inputs)
        scoring_time = time.perf_counter() - start
        valid = inputs.valid
        if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != tuple(valid.shape):
            raise ValueError(f"scorer {type(self.scorer).__name__} returned "
                             f"{getattr(scores, 'shape', type(scores).__name__)}; expected a tensor of shape "
                             f"{tuple(valid.shape)} (batch, max visual tokens)")
        if bool(scores.to(valid.device)[valid].isnan().any()):
            raise ValueError(f"scorer {type(self.scorer).__name__} returned NaN scores (a corrupted compressor, "
                             "or weights that overflow); refusing to prune by them")
        config, scores = self.config, scores.to(valid.device)
        if config.budget == "auto":
            distribution = unit_distribution(scores, inputs.units, self.scorer.distribution, config.temperature)
            keep_packed = select_mass(distribution, valid, inputs.units, config.mass, config.min_ratio,
                                      config.max_ratio, config.min_tokens)
        else:
            keep_packed = select_top(scores, valid, inputs.units, config.ratio, config.min_tokens)
        keep_visual = torch.zeros_like(structure.visual_mask)
        keep_visual[structure.visual_mask] = keep_packed[valid]
        drop = structure.visual_mask & ~keep_visual
        real = part_mask.bool() if part_mask is not None else torch.ones_like(drop)
        slicing = Slicing.from_keep(real & ~drop)
        new_mask = slicing.mask(part_mask.dtype if part_mask is not None else torch.long)
        if self.config.positions == "original":
            new_positions = slicing.positions(positions)
        else:
            new_positions = contiguous_positions(new_mask, positions.shape[0])
            if layout is not None:  # after the last cached token
                new_positions = new_positions + layout.slot_positions(text_mask, slice(-length - 1, -length)) + 1
        last_original = positions[:, torch.arange(batch), slicing.index[:, -1]]
        last_new = new_positions[:, :, -1]
        shift = None if self.config.positions == "original" else (last_new - last_original).unsqueeze(-1)
        if layout is None:
            full_mask = new_mask
            self._pending = self._layout(new_mask, length, last_new, shift, (call or {}).get("input_ids"), mask)
        else:
            full_mask = torch.cat([text_mask[:, :-length].to(new_mask.dtype), new_mask], dim=1)
            self._pending = replace(layout, mask=full_mask, original_length=covered + length, last_positions=last_new,
                                    position_shift=shift)
        kept = [torch.nonzero(keep_packed[b, : int(valid[b].sum())]).flatten().cpu() for b in range(batch)]
        self.last_stats = self._stats(structure.counts, [PruneStage(0, kept, slicing.length)], batch, length,
                                      embeds.dtype, scoring_time)
        merged = getattr(self.scorer, "merge", lambda *_: None)(inputs, keep_packed)
        if merged is not None:
            embeds = embeds.clone()
            embeds[structure.visual_mask] = merged[valid].to(embeds.dtype)
        kwargs = dict(kwargs)
        kwargs["inputs_embeds"] = slicing.sequence(embeds)
        kwargs["attention_mask"] = full_mask
        kwargs["position_ids"] = self.adapter.text_model_positions(new_positions)
        return (), kwargs

    def _layout(self, mask: torch.Tensor, original_length: int, last_positions: torch.Tensor,
                shift: torch.Tensor | None, input_ids: torch.Tensor | None,
                original_mask: torch.Tensor | None) -> _PrunedCache:
        """The layout of a first prefill's cache (``mask``: as pruned; ``original_mask``: as given, or None)."""
        batch = mask.shape[0]
        tokens = input_ids if input_ids is not None else mask.new_full((batch, original_length), -1, dtype=torch.long)
        seen = original_mask if original_mask is not None else mask.new_ones((batch, original_length))
        return _PrunedCache(mask, original_length, last_positions, shift, tokens, seen, self.config.positions,
                            weakref.ref(self))

    def _stats(self, counts: list[int], stages: list[PruneStage], batch: int, length: int, dtype: torch.dtype,
               scoring_time: float) -> PruneStats:
        text_config = self.adapter.model.config.get_text_config()
        kept, lengths = stages[-1].kept_indices, layer_lengths(text_config.num_hidden_layers, length, stages)
        auto = self.config.budget == "auto"
        return PruneStats(
            scorer=self.config.scorer_name, ratio=None if auto else self.config.ratio, kept_indices=kept,
            visual_tokens_before=counts, visual_tokens_after=[len(k) for k in kept],
            seq_len_before=length, seq_len_after=stages[-1].seq_len,
            kv_cache_bytes_before=kv_cache_bytes(text_config, batch, length, dtype),
            kv_cache_bytes_after=kv_cache_bytes(text_config, batch, lengths, dtype),
            prefill_flops_before=prefill_flops(text_config, batch, length),
            prefill_flops_after=prefill_flops(text_config, batch, lengths),
            scoring_time_s=scoring_time, stages=stages, budget=self.config.budget, mass=self.config.mass,
            temperature=self.config.temperature,
        )

    # -- decode steps and text-only turns --------------------------------------------------------------------
    @staticmethod
    def _text_mask(layout: _PrunedCache, mask: Any, covered: int, length: int) -> torch.Tensor:
        """The text model's 2-D mask over the pruned cache and a call's ``length`` tokens: the cache's last prefill
        as pruned, then the call's whole-sequence ``mask`` after that prefill (ones without one), checked."""
        expected = covered + length
        if mask is None:
            tail = layout.mask.new_ones((layout.mask.shape[0], expected - layout.original_length))
        elif not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[1] != expected:
            raise PrunedCacheError(
                f"this call continues a pruned cache holding {covered} tokens of the unpruned sequence with "
                f"{length} new tokens and an attention mask of shape {tuple(getattr(mask, 'shape', ()))}; expected a "
                f"2-D mask over the whole sequence, (batch, {expected})")
        else:
            tail = mask[:, layout.original_length:]
        return torch.cat([layout.mask, tail.to(layout.mask)], dim=1)

    def _step_positions(self, given: torch.Tensor | None, call: dict[str, Any], layout: _PrunedCache,
                        text_mask: torch.Tensor, length: int) -> torch.Tensor:
        """Our positions for a call's ``length`` new tokens (:meth:`_PrunedCache.slot_positions`), after checking the
        caller's own ``given`` ones against them. Only the first row is compared where the row counts agree:
        generate() may derive Qwen's M-RoPE rows of a new turn from the pruned cache length; ours replace them."""
        ours = layout.slot_positions(text_mask, slice(-length, None))
        if given is None or call.get("positions_from_pruner"):
            return ours
        full = self.adapter.expand_positions(given, ours.shape[1], length, given.device)
        if layout.position_shift is not None:
            full = full + layout.position_shift
        real = text_mask[:, -length:].bool()
        if full.shape[0] == ours.shape[0] and not torch.equal(full[0][real], ours[0][real]):
            raise PrunedCacheError("position ids of this call do not continue the pruned cache: the unpruned "
                                   "numbering of its tokens follows from the attention mask over the whole sequence")
        return ours

    def _continue(self, kwargs: dict, call: dict[str, Any], cache: Any, layout: _PrunedCache) -> tuple:
        """A decode step, or a new turn without visual inputs, over a pruned cache: the attention mask of the
        pruned cache plus the new tokens', and positions that continue the cache's numbering."""
        length = kwargs["inputs_embeds"].shape[1]
        text_mask = self._text_mask(layout, kwargs.get("attention_mask"), layout.covered(cache), length)
        positions = self._step_positions(kwargs.get("position_ids"), call, layout, text_mask, length)
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = text_mask
        kwargs["position_ids"] = self.adapter.text_model_positions(positions)
        return (), kwargs


def score_inputs(model: nn.Module, inputs: dict[str, Any], scope: str = "sample") -> ScoreInputs | None:
    """Run ``model`` (wrapped or not) on ``inputs`` (a processor output) up to the first LLM layer, and return
    what a scorer sees on that prefill: visual layout, ``first_layer_attention`` (A^0_v), visual embeddings.

    The LLM itself does not run. ``None`` when the call has no visual tokens. ``scope`` sets ``units`` as in
    :class:`TokenPruneConfig`.
    """
    handle = model.__dict__.get("tokenprune")
    temporary = not isinstance(handle, TokenPruneHandle)
    if temporary:
        config = TokenPruneConfig(ratio=1.0, scorer="uniform", scope=scope)
        adapter = get_adapter(model)
        handle = TokenPruneHandle(model, adapter, config, build_scorer(config, adapter))
    elif handle.config.scope != scope:
        raise ValueError(f"the model is wrapped with scope={handle.config.scope!r}; ask for that scope")
    handle._capturing = True
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    except _Captured as captured:
        return captured.inputs
    finally:
        handle._capturing = False
        if temporary:
            handle.remove()
    raise RuntimeError(f"{type(model).__name__}'s text model never ran on these inputs")


def _resolve_config(config: TokenPruneConfig | None, overrides: dict[str, Any]) -> TokenPruneConfig:
    if config is None:
        return TokenPruneConfig(**overrides)
    if not isinstance(config, TokenPruneConfig):
        raise TypeError(f"config must be a TokenPruneConfig, got {type(config).__name__}")
    return config.replace(**overrides) if overrides else config


def resolve_budget(config: TokenPruneConfig, scorer: Scorer | LayerSchedule | None) -> TokenPruneConfig:
    """``config`` with the ``budget="auto"`` fields filled in for ``scorer``: ``mass``, ``temperature`` (and the
    clamp left None) from the compressor's saved calibration when ``mass`` is None, else ``min_ratio`` 0,
    ``max_ratio`` 1 and ``temperature`` 1.

    Raises:
        ValueError: the scorer has no relevance distribution; no ``mass`` and no saved calibration; or the
            calibration was made for another ``scope`` or ``temperature``.
    """
    if config.budget != "auto":
        return config
    if getattr(scorer, "distribution", None) is None:
        raise ValueError(f"budget='auto' keeps tokens by their share of a relevance distribution, but scorer "
                         f"{config.scorer_name} has none (its `distribution` is None; set it to 'softmax' or 'sum')")
    filled: dict[str, Any] = {"min_ratio": config.min_ratio, "max_ratio": config.max_ratio,
                              "temperature": config.temperature}
    if config.mass is None:
        calibration = getattr(getattr(scorer, "compressor", None), "calibration", None)
        if calibration is None:
            raise ValueError("budget='auto' needs a relevance-mass threshold: pass mass=<0..1>, or calibrate the "
                             "compressor for a target mean retention (hf_tokenprune.calibrate + save_calibration, or "
                             "`hf-tokenprune calibrate`), which saves the threshold in its config.json")
        for name in ("scope", "temperature"):
            wanted = getattr(config, name)
            if wanted is not None and calibration[name] != wanted:
                raise ValueError(f"the compressor was calibrated with {name}={calibration[name]!r}, not "
                                 f"{wanted!r}: calibrate it for this {name} or pass mass=")
        filled = {"mass": calibration["mass"], **{k: calibration[k] if v is None else v for k, v in filled.items()}}
    defaults = {"min_ratio": 0.0, "max_ratio": 1.0, "temperature": 1.0}
    return config.replace(**{k: defaults[k] if v is None else v for k, v in filled.items()})


def prune_wrap(model: nn.Module, config: TokenPruneConfig | None = None, **overrides: Any) -> nn.Module:
    """Make ``model`` prune visual tokens at the LLM input; returns the same (patched) instance.

    Wrapping an already wrapped model re-configures it. ``overrides`` are :class:`TokenPruneConfig` fields,
    applied on top of ``config``. With ``budget="auto"``, ``model.tokenprune.config`` holds the threshold and
    clamp in use (:func:`resolve_budget`). A configuration that prunes nothing (``ratio=1.0``, fixed budget) builds
    no scorer: it needs no compressor, and the model runs exactly as unwrapped.
    """
    config = _resolve_config(config, overrides)
    adapter = get_adapter(model)
    scorer = build_scorer(config, adapter) if config.prunes else None
    config = resolve_budget(config, scorer)
    handle = model.__dict__.get("tokenprune")
    if isinstance(handle, TokenPruneHandle):
        handle.configure(config, scorer)
        return model
    model.tokenprune = TokenPruneHandle(model, adapter, config, scorer)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """Remove the pruning hooks and ``model.tokenprune``; the model behaves exactly as before wrapping."""
    handle = model.__dict__.pop("tokenprune", None)
    if not isinstance(handle, TokenPruneHandle):
        raise ValueError(f"{type(model).__name__} is not wrapped by hf_tokenprune")
    handle.remove()
    return model


def from_pretrained(name_or_path: str, ratio: float = 0.25, compressor: Any = None,
                    config: TokenPruneConfig | None = None, **hf_kwargs: Any) -> nn.Module:
    """Load a supported MLLM with ``AutoModelForImageTextToText`` and wrap it.

    ``hf_kwargs`` go to ``from_pretrained`` (``dtype``, ``device_map``, ``attn_implementation``, ...).
    ``config`` may carry the other pruning fields; ``ratio`` and ``compressor`` override it.
    """
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(name_or_path, **hf_kwargs)
    overrides: dict[str, Any] = {"ratio": ratio}
    if compressor is not None:
        overrides["compressor"] = compressor
    return prune_wrap(model.eval(), config, **overrides)


__all__ = ["PrunedCacheError", "TokenPruneHandle", "from_pretrained", "prune_wrap", "resolve_budget", "score_inputs",
           "unwrap"]
