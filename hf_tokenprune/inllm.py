"""In-LLM pruning (FastV, PyramidDrop, DART): drop visual tokens before chosen decoder layers of the prefill.

Forward pre-hooks on the decoder layers from the first pruning layer on. Before a stage's layer the hook scores
the visual tokens still present (:class:`~hf_tokenprune.baselines.LayerScorer`), keeps each budget unit's share and
slices the layer's input hidden states, its ``(cos, sin)`` and ``position_ids`` (kept tokens keep their original
positions); every later layer gets the shortened ones and an attention mask built by transformers'
``create_causal_mask`` for the stage's 2-D mask, so each attention implementation gets the mask format it expects.
Rows keeping different counts are re-padded on the left, as at the input stage.

The KV cache of layers before the first stage keeps the full prompt, later layers a shorter one. ``generate``
sizes everything from layer 0 (``cache.get_seq_length()``), so its positions and its growing 2-D mask follow the
original prompt; on each decode step the hook of a stage's layer rebuilds that stage's mask (the stage's prefill
mask plus the new tokens) sized against its own cache layer. Needs a ``DynamicCache`` (the default).
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, LinearAttentionLayer
from transformers.masking_utils import create_causal_mask

from .baselines import LayerInputs, LayerSchedule
from .compat import cache_kwarg, with_cache
from .pruning import Slicing, budget, pack, select_counts
from .scorers.base import ScoreInputs
from .stats import PruneStage


class PrunedLayerCacheError(RuntimeError):
    """A decode step does not continue the pruned prefill this cache holds."""


@dataclass
class _Sequence:
    """The prefill as the current layer sees it: per slot ``[batch, n]`` tensors, sliced stage after stage."""

    index: torch.Tensor  # original position in the text model's prefill
    real: torch.Tensor  # bool, False on padding
    visual: torch.Tensor  # bool, visual tokens still present
    instruction: torch.Tensor  # bool
    visual_rank: torch.Tensor  # index among the sample's visual tokens (in order), -1 elsewhere
    unit: torch.Tensor  # budget unit of a visual token (its sample's u-th), -1 elsewhere

    def slice(self, slicing: Slicing) -> _Sequence:
        valid = slicing.slot_valid
        return _Sequence(torch.gather(self.index, 1, slicing.index), valid,
                         *(slicing.sequence(t) & valid for t in (self.visual, self.instruction)),
                         *(torch.where(valid, slicing.sequence(t), -1) for t in (self.visual_rank, self.unit)))


@dataclass
class _Prefill:
    """One pruned prefill: its stages' 2-D masks (for decode steps) and records."""

    length: int
    units: list[list[int]]
    sequence: _Sequence
    masks: dict[int, torch.Tensor] = field(default_factory=dict)  # stage layer -> [batch, n_s] long mask
    stages: list[PruneStage] = field(default_factory=list)
    scoring_time_s: float = 0.0
    cache_ref: Any = None
    # the layer kwargs that layers from the current stage on get instead of the full-length ones
    current: dict[str, Any] = field(default_factory=dict)
    # the 2-D mask linear-attention layers from the current stage on get (None: no padding, as transformers passes)
    linear_mask: torch.Tensor | None = None


class LayerPruner:
    """Runs a :class:`LayerSchedule` through pre-hooks on the decoder layers of ``text_model``."""

    def __init__(self, text_model: nn.Module, schedule: LayerSchedule, min_tokens: int) -> None:
        self.text_model, self.schedule, self.min_tokens = text_model, schedule, min_tokens
        self.stage_layers = [layer for layer, _ in schedule.stages]
        self._keep = dict(schedule.stages)
        # linear-attention layers (Qwen3.5's Gated DeltaNet) take a 2-D padding mask instead of an attention mask
        self._linear = {i for i, kind in enumerate(getattr(text_model.config, "layer_types", None) or [])
                        if kind == "linear_attention"}
        self._prefill: _Prefill | None = None
        self._running: _Prefill | None = None  # the prefill of the current text-model call
        self._step_mask: torch.Tensor | None = None  # the current decode call's 2-D mask (or None: all ones)
        self._step_masks: dict[int, Any] = {}  # stage layer -> this decode step's attention mask
        self._stepping = False
        layers = text_model.layers
        self._hooks = [layers[i].register_forward_pre_hook(partial(self._before_layer, i), with_kwargs=True)
                       for i in range(self.stage_layers[0], len(layers))]

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # -- calls of the text model -------------------------------------------------------------------------------
    def owns(self, cache: Any) -> bool:
        prefill = self._prefill
        return cache is not None and prefill is not None and prefill.cache_ref is not None and \
            prefill.cache_ref() is cache

    def begin(self, inputs: ScoreInputs, cache: Any) -> None:
        """Prune the coming prefill (``inputs``: what the input stage sees; ``cache``: the call's cache)."""
        dynamic = (DynamicLayer, LinearAttentionLayer)  # a hybrid model's DynamicCache holds both
        if cache is not None and (not isinstance(cache, DynamicCache) or
                                  any(type(layer) not in dynamic for layer in cache.layers)):
            raise ValueError(f"scorer={self.schedule.name!r} prunes inside the LLM, which leaves layers with different "
                             f"cache lengths: it needs a DynamicCache (the default), not {type(cache).__name__} "
                             "(static, sliding-window, offloaded or quantized caches)")
        layout, embeds = inputs.layout, inputs.inputs_embeds
        batch, length = embeds.shape[:2]
        device = embeds.device
        real = inputs.attention_mask.bool() if inputs.attention_mask is not None else torch.ones(
            batch, length, dtype=torch.bool, device=device)
        visual = layout.visual_mask
        rank = torch.full((batch, length), -1, dtype=torch.long, device=device)
        unit = torch.full_like(rank, -1)
        rank_packed = torch.arange(inputs.valid.shape[1], device=device).expand(batch, -1)
        unit_packed = torch.stack([torch.cat([torch.full((n,), u, dtype=torch.long) for u, n in enumerate(lengths)]
                                             + [torch.full((inputs.valid.shape[1] - sum(lengths),), -1)])
                                   for lengths in inputs.units]).to(device)
        rank[visual], unit[visual] = rank_packed[inputs.valid], unit_packed[inputs.valid]
        index = torch.arange(length, device=device).expand(batch, -1)
        sequence = _Sequence(index, real, visual, layout.instruction_mask & real, rank, unit)
        self._running = _Prefill(length, inputs.units, sequence)
        self._prefill = None

    def step(self, attention_mask: torch.Tensor | None) -> None:
        """A decode call over the pruned cache is coming, with this 2-D mask (None: all ones)."""
        self._stepping, self._step_mask, self._step_masks = True, attention_mask, {}

    def finish(self, cache: Any) -> _Prefill | None:
        """End of a text-model call: the pruned prefill it ran, if any (``cache``: the one it filled)."""
        prefill, self._running = self._running, None
        self._stepping, self._step_masks = False, {}
        if prefill is not None and prefill.stages:
            prefill.current = {}
            prefill.cache_ref = weakref.ref(cache) if cache is not None else None
            self._prefill = prefill
        return prefill

    def reset(self) -> None:
        """A call that is none of ours: layers run untouched."""
        self._running, self._stepping, self._step_masks = None, False, {}

    # -- layers ------------------------------------------------------------------------------------------------
    def _before_layer(self, i: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        if self._running is not None:
            return self._prefill_layer(i, module, args, kwargs)
        if self._stepping:
            return self._decode_layer(i, args, kwargs)
        return None

    def _prefill_layer(self, i: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple:
        prefill = self._running
        hidden = args[0] if args else kwargs["hidden_states"]
        if i in self._keep:
            hidden = self._prune(i, module, hidden, kwargs)
        kwargs = {**kwargs, **prefill.current}
        if i in self._linear and prefill.current:
            kwargs["attention_mask"] = prefill.linear_mask
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def _prune(self, i: int, module: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        prefill = self._running
        seq = prefill.sequence
        batch = hidden.shape[0]
        position_embeddings = prefill.current.get("position_embeddings", kwargs["position_embeddings"])
        position_ids = prefill.current.get("position_ids", kwargs.get("position_ids"))
        start = time.perf_counter()
        scores = self.schedule.scorer.score(LayerInputs(module, hidden, position_embeddings, seq.real, seq.visual,
                                                        seq.instruction))
        prefill.scoring_time_s += time.perf_counter() - start
        packed, valid = pack(scores.float(), seq.visual)
        units_now = [torch.bincount(seq.unit[b][seq.visual[b]], minlength=len(lengths)).tolist()
                     for b, lengths in enumerate(prefill.units)]
        counts = [[min(budget(n, self._keep[i], self.min_tokens), now) for n, now in zip(lengths, units_now[b])]
                  for b, lengths in enumerate(prefill.units)]
        keep_packed = select_counts(packed, valid, units_now, counts)
        keep_visual = torch.zeros_like(seq.visual)
        keep_visual[seq.visual] = keep_packed[valid]
        slicing = Slicing.from_keep(seq.real & ~(seq.visual & ~keep_visual))
        prefill.sequence = seq = seq.slice(slicing)
        hidden = slicing.sequence(hidden)
        mask = slicing.mask()
        prefill.masks[i] = mask
        prefill.stages.append(PruneStage(i, [seq.visual_rank[b][seq.visual[b]].sort().values.cpu()
                                             for b in range(batch)], slicing.length))
        current = {"position_embeddings": tuple(slicing.sequence(t.expand(batch, -1, -1))
                                                for t in position_embeddings)}
        if position_ids is not None:  # [batch, n], or M-RoPE rows [3, batch, n] (GLM-4.5V's layers get those)
            position_ids = slicing.positions(position_ids.expand(-1, batch, -1)) if position_ids.dim() == 3 else \
                slicing.sequence(position_ids.expand(batch, -1))
        current["position_ids"] = position_ids
        current["attention_mask"] = self._mask(hidden, mask, cache_kwarg(kwargs), i)
        prefill.current = current
        prefill.linear_mask = None if bool(mask.all()) else mask
        return hidden

    def _decode_layer(self, i: int, args: tuple, kwargs: dict) -> tuple | None:
        prefill = self._prefill
        stage = max((layer for layer in self.stage_layers if layer <= i), default=None)
        if stage is None or i in self._linear:  # a linear layer's state needs no mask of the cached tokens
            return None
        if stage not in self._step_masks:
            hidden = args[0] if args else kwargs["hidden_states"]
            cache = cache_kwarg(kwargs)
            stage_mask = prefill.masks[stage]
            tail_length = cache.get_seq_length(stage) - stage_mask.shape[1] + hidden.shape[1]
            step_mask = self._step_mask
            if step_mask is None:
                tail = stage_mask.new_ones((stage_mask.shape[0], tail_length))
            elif step_mask.shape[1] - prefill.length != tail_length:
                raise PrunedLayerCacheError(
                    f"this call continues a cache pruned inside the LLM with an attention mask of length "
                    f"{step_mask.shape[1]}, expected {prefill.length + tail_length}: continuing generation from a "
                    "pruned cache with a new prompt (multi-turn reuse of past_key_values) is not supported yet")
            else:
                tail = step_mask[:, prefill.length:].to(stage_mask.dtype)
            self._step_masks[stage] = self._mask(hidden, torch.cat([stage_mask, tail], dim=1), cache, stage)
        return args, {**kwargs, "attention_mask": self._step_masks[stage]}

    def _mask(self, hidden: torch.Tensor, mask_2d: torch.Tensor, cache: Any, layer: int) -> Any:
        """The attention mask transformers builds for this 2-D mask, sized against cache layer ``layer``."""
        return create_causal_mask(config=self.text_model.config, inputs_embeds=hidden, attention_mask=mask_2d,
                                  position_ids=None, layer_idx=layer, **with_cache(cache))
