"""Pruning a prefill at the LLM input: score the visual tokens, keep the top ones, slice the text model's inputs.

:class:`PrefillPruner` turns the text model's prefill arguments (``inputs_embeds``, 2-D ``attention_mask``,
``position_ids``) and the multimodal call that produced them into the shortened arguments, the layout to record on
the cache the call fills (:class:`~hf_tokenprune.continuation.PrunedCache`) and the call's :class:`PruneStats`.
A new chat turn after a pruned cache is scored on its own tokens; its positions continue the cache's numbering.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from .continuation import Owner, PrunedCache, PrunedCacheError
from .methods import scorer_label
from .pruning import (
    Slicing,
    contiguous_positions,
    distribution_counts,
    fixed_counts,
    select_counts,
    unit_distribution,
    unit_spans,
)
from .scorers import ScoreInputs
from .stats import PruneStage, PruneStats, kv_cache_bytes, layer_lengths, prefill_flops


@dataclass
class PrunedPrefill:
    """What pruning a prefill gives: the text model's new arguments (None: run it unchanged), the layout of the
    cache it fills, and its stats (None when nothing was scored)."""

    kwargs: dict[str, Any] | None
    layout: PrunedCache | None
    stats: PruneStats | None


class PrefillPruner:
    """Prunes the prefills of one wrapped model (``owner``: its handle, for the adapter, config and scorer)."""

    def __init__(self, owner: Owner) -> None:
        self.owner = owner

    def score_inputs(self, kwargs: dict, call: dict[str, Any] | None) -> tuple[ScoreInputs, torch.Tensor] | None:
        """What the scorer sees on this prefill, and the expanded position ids; None without visual tokens."""
        adapter = self.owner.adapter
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
        positions = adapter.expand_positions(kwargs.get("position_ids"), batch, length, embeds.device)
        layout = adapter.layout(call, mask, positions)
        if not layout.visual_mask.any():
            return None
        scope = self.owner.config.scope
        units = layout.segments if scope == "image" else [[sum(s)] if s else [] for s in layout.segments]
        return ScoreInputs(adapter.text_model, embeds, mask, adapter.rotary_positions(positions),
                           layout, units, call), positions

    def prune(self, kwargs: dict, call: dict[str, Any] | None, cache: Any = None,
              layout: PrunedCache | None = None) -> PrunedPrefill:
        """Prune a prefill: the whole prompt, or (``layout`` given) a new turn's tokens after the cache it
        describes (scored on their own: the cached history is not part of the scoring feature).

        Without visual tokens a first prefill runs unchanged and a new turn continues the cache as a decode step
        does.
        """
        owner = self.owner
        adapter, config, scorer = owner.adapter, owner.config, owner.scorer
        embeds, mask = kwargs["inputs_embeds"], kwargs.get("attention_mask")
        batch, length = embeds.shape[:2]
        given = kwargs.get("position_ids")
        if layout is None:
            part_mask = mask
            positions = adapter.expand_positions(given, batch, length, embeds.device)
        else:
            covered = layout.covered(cache)
            text_mask = layout.text_mask(mask, covered, length)
            part_mask = text_mask[:, -length:]
            ours = owner.continuation.step_positions(given, call or {}, layout, text_mask, length)
            # original numbering: the model's own positions if it gave them (M-RoPE ids of new images), else ours
            if given is not None and not (call or {}).get("positions_from_pruner"):
                positions = adapter.expand_positions(given, batch, length, given.device)
            else:
                positions = ours if layout.position_shift is None else ours - layout.position_shift
        part = {"inputs_embeds": embeds, "attention_mask": part_mask,
                "position_ids": adapter.text_model_positions(positions)}
        found = self.score_inputs(part, call)
        if found is None:
            if layout is not None:
                return PrunedPrefill(owner.continuation.step(kwargs, call or {}, cache, layout)[1], None, None)
            unpruned = mask if mask is not None else torch.ones((batch, length), dtype=torch.long, device=embeds.device)
            return PrunedPrefill(None, PrunedCache.first(unpruned, length, positions[:, :, -1], None,
                                                         (call or {}).get("input_ids"), mask, owner), None)
        inputs = found[0]
        structure = inputs.layout
        start = time.perf_counter()
        scores = scorer.score(inputs)
        valid = inputs.valid
        if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != tuple(valid.shape):
            raise ValueError(f"scorer {type(scorer).__name__} returned "
                             f"{getattr(scores, 'shape', type(scores).__name__)}; expected a tensor of shape "
                             f"{tuple(valid.shape)} (batch, max visual tokens)")
        if bool(scores.to(valid.device)[valid].isnan().any()):
            raise ValueError(f"scorer {type(scorer).__name__} returned NaN scores (a corrupted compressor, "
                             "or weights that overflow); refusing to prune by them")
        scores = scores.to(valid.device)
        if config.budget == "auto":  # select() sees the distribution the counts come from
            scores = unit_distribution(scores, inputs.units, scorer.distribution, config.temperature)
            counts = distribution_counts(scores, inputs.units, config.mass, config.min_ratio, config.max_ratio,
                                         config.min_tokens)
        else:
            counts = fixed_counts(inputs.units, config.ratio, config.min_tokens)
        keep_packed = select(scorer, inputs, scores, counts)
        scoring_time = time.perf_counter() - start
        keep_visual = torch.zeros_like(structure.visual_mask)
        keep_visual[structure.visual_mask] = keep_packed[valid]
        drop = structure.visual_mask & ~keep_visual
        real = part_mask.bool() if part_mask is not None else torch.ones_like(drop)
        slicing = Slicing.from_keep(real & ~drop)
        new_mask = slicing.mask(part_mask.dtype if part_mask is not None else torch.long)
        if config.positions == "original":
            new_positions = slicing.positions(positions)
        else:
            new_positions = contiguous_positions(new_mask, positions.shape[0])
            if layout is not None:  # after the last cached token
                new_positions = new_positions + layout.slot_positions(text_mask, slice(-length - 1, -length)) + 1
        last_original = positions[:, torch.arange(batch), slicing.index[:, -1]]
        last_new = new_positions[:, :, -1]
        shift = None if config.positions == "original" else (last_new - last_original).unsqueeze(-1)
        if layout is None:
            full_mask = new_mask
            recorded = PrunedCache.first(new_mask, length, last_new, shift, (call or {}).get("input_ids"), mask, owner)
        else:
            full_mask = torch.cat([text_mask[:, :-length].to(new_mask.dtype), new_mask], dim=1)
            recorded = replace(layout, mask=full_mask, original_length=covered + length, last_positions=last_new,
                               position_shift=shift)
        kept = [torch.nonzero(keep_packed[b, : int(valid[b].sum())]).flatten().cpu() for b in range(batch)]
        stats = prune_stats(owner, structure.counts, [PruneStage(0, kept, slicing.length)], batch, length,
                            embeds.dtype, scoring_time)
        merged = getattr(scorer, "merge", lambda *_: None)(inputs, keep_packed)
        if merged is not None:
            embeds = embeds.clone()
            embeds[structure.visual_mask] = merged[valid].to(embeds.dtype)
        kwargs = dict(kwargs)
        kwargs["inputs_embeds"] = slicing.sequence(embeds)
        kwargs["attention_mask"] = full_mask
        kwargs["position_ids"] = adapter.text_model_positions(new_positions)
        kwargs = adapter.slice_extra(kwargs, call or {}, slicing)  # the family's other per-token inputs
        kwargs = adapter.attention_masks(kwargs, call or {}, slicing)
        return PrunedPrefill(kwargs, recorded, stats)


def select(scorer: Any, inputs: ScoreInputs, scores: torch.Tensor, counts: list[list[int]]) -> torch.Tensor:
    """``scorer.select`` (top scores for a scorer object without one), checked: a packed boolean keep mask with
    exactly ``counts[b][u]`` tokens in each unit."""
    chosen = getattr(scorer, "select", None)
    valid = inputs.valid
    keep = chosen(inputs, scores, counts) if chosen else select_counts(scores, valid, inputs.units, counts)
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or tuple(keep.shape) != tuple(valid.shape):
        raise ValueError(f"{type(scorer).__name__}.select returned {getattr(keep, 'dtype', type(keep).__name__)} "
                         f"{tuple(getattr(keep, 'shape', ()))}; expected a bool tensor of shape {tuple(valid.shape)}")
    keep = keep.to(valid.device) & valid
    got = [[0] * len(lengths) for lengths in inputs.units]
    for b, u, start, n in unit_spans(inputs.units):
        got[b][u] = int(keep[b, start:start + n].sum())
    if got != counts:
        raise ValueError(f"{type(scorer).__name__}.select kept {got} tokens per budget unit; the budget is {counts}")
    return keep


def prune_stats(owner: Owner, counts: list[int], stages: list[PruneStage], batch: int, length: int,
                dtype: torch.dtype, scoring_time: float) -> PruneStats:
    """The :class:`PruneStats` of a pruned call (``stages``: where its tokens were dropped) under the owner's
    configuration."""
    config = owner.config
    text_config = owner.adapter.model.config.get_text_config()
    kept, lengths = stages[-1].kept_indices, layer_lengths(text_config.num_hidden_layers, length, stages)
    auto = config.budget == "auto"
    return PruneStats(
        scorer=scorer_label(config, owner.scorer), ratio=None if auto else config.ratio, kept_indices=kept,
        visual_tokens_before=counts, visual_tokens_after=[len(k) for k in kept],
        seq_len_before=length, seq_len_after=stages[-1].seq_len,
        kv_cache_bytes_before=kv_cache_bytes(text_config, batch, length, dtype),
        kv_cache_bytes_after=kv_cache_bytes(text_config, batch, lengths, dtype),
        prefill_flops_before=prefill_flops(text_config, batch, length),
        prefill_flops_after=prefill_flops(text_config, batch, lengths),
        scoring_time_s=scoring_time, stages=stages, budget=config.budget, mass=config.mass,
        temperature=config.temperature,
    )
