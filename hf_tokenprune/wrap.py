"""prune_wrap / unwrap / from_pretrained, and the ``model.tokenprune`` handle.

Three instance-level hooks, installed through the model's adapter and removed by :func:`unwrap`:

* a pre-hook on the multimodal model records the call's ``input_ids`` and visual inputs (the text model
  receives only ``inputs_embeds``), and supplies consistent decode positions when none are given;
* a pre-hook on the text model prunes the prefill (scores, keeps the top tokens, slices embeddings, mask and
  position ids) and, on every later step over the pruned cache, rebuilds the attention mask (and shifts
  positions for ``positions="contiguous"``);
* a post-hook on the text model remembers which cache the pruned prefill filled.

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
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .adapters import Adapter, get_adapter
from .baselines import LayerSchedule
from .config import TokenPruneConfig
from .guards import check_generate
from .inllm import LayerPruner
from .pruning import Slicing, contiguous_positions, select_mass, select_top, unit_distribution
from .scorers import ScoreInputs, Scorer, build_scorer
from .stats import PruneStage, PruneStats, kv_cache_bytes, layer_lengths, prefill_flops


class PrunedCacheError(RuntimeError):
    """A call continues a pruned cache in a way the pruner cannot keep consistent."""


@dataclass
class _PrunedPrefill:
    """What decode steps over a pruned cache need to know about its prefill."""

    mask: torch.Tensor  # [batch, new_length] attention mask of the pruned prefill
    original_length: int
    last_positions: torch.Tensor  # [rows, batch] positions of the last prompt token, as the pruned model numbers them
    position_shift: torch.Tensor | None  # [rows, batch, 1] added to generate's positions ("contiguous")
    cache_ref: Any = None

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def owns(self, cache: Any) -> bool:
        return cache is not None and self.cache_ref is not None and self.cache_ref() is cache


class _Captured(Exception):  # noqa: N818 - control flow, never escapes score_inputs
    """Stops a forward at the LLM input, carrying what the scorer would see."""

    def __init__(self, found: tuple[ScoreInputs, torch.Tensor] | None) -> None:
        super().__init__("captured")
        self.inputs = found[0] if found is not None else None


class TokenPruneHandle:
    """``model.tokenprune``: the configuration, the last call's :class:`PruneStats`, and :meth:`disabled`.

    ``last_stats`` is reset on every prefill and stays ``None`` when the call had nothing to prune (no visual
    tokens, pruning disabled or ``ratio=1`` with the fixed budget).
    """

    def __init__(self, model: nn.Module, adapter: Adapter, config: TokenPruneConfig,
                 scorer: Scorer | LayerSchedule) -> None:
        self._model_ref = weakref.ref(model)
        self.adapter = adapter
        self._layers: LayerPruner | None = None
        self.configure(config, scorer)
        self.last_stats: PruneStats | None = None
        self._enabled = True
        self._call: dict[str, Any] | None = None
        self._prefill: _PrunedPrefill | None = None
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
        return f"TokenPruneHandle({self.config}, scorer={type(self.scorer).__name__})"

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the model unpruned inside the block."""
        previous, self._enabled = self._enabled, False
        try:
            yield
        finally:
            self._enabled = previous

    def configure(self, config: TokenPruneConfig, scorer: Scorer | LayerSchedule) -> None:
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
        """Give the instance a ``generate`` that refuses unsupported options (:mod:`.guards`) before any compute."""
        generate = model.generate

        @functools.wraps(generate)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            if self.active:
                check_generate(model, kwargs)
            return generate(*args, **kwargs)

        guarded._tokenprune_guard = True
        model.__dict__["generate"] = guarded

    # -- hooks ------------------------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """Whether calls are pruned now: the config prunes (``ratio < 1`` or ``budget="auto"``) and not inside
        :meth:`disabled`."""
        return self._enabled and self.config.prunes

    def _pruned_cache(self, kwargs: dict) -> Any:
        """The call's cache if it is the one our pruned prefill filled (and pruning is active), else None."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        return cache if self.active and self._prefill is not None and self._prefill.owns(cache) else None

    def _check_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.active and kwargs.get("labels") is not None:
            raise ValueError("hf_tokenprune prunes inference prefills only: a forward with labels would score "
                             "a shortened sequence; run it inside `with model.tokenprune.disabled():`")

    def _record_call(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        call = dict(kwargs)
        if args:
            call.setdefault("input_ids", args[0])
        self._call = call
        cache, prefill = self._pruned_cache(kwargs), self._prefill
        if cache is None or kwargs.get("position_ids") is not None:
            return None
        # A decode step without position ids: number it after the pruned prompt ourselves (the model would
        # derive it from the pruned cache length, or from rope_deltas, and get it wrong).
        steps = cache.get_seq_length() - prefill.length
        n_new = (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]).shape[1]
        offsets = torch.arange(n_new, device=prefill.last_positions.device) + 1 + steps
        positions = prefill.last_positions[..., None] + offsets
        call["positions_from_pruner"] = True
        kwargs["position_ids"] = self.adapter.text_model_positions(positions)
        return args, kwargs

    def _before_text_model(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        layers = self._layers
        if layers is not None:
            layers.reset()
        if not self.active and not self._capturing:
            # nothing to prune: no tensor op either, so the call stays traceable by torch.compile(fullgraph=True)
            self._call, self._prefill, self.last_stats = None, None, None
            return None
        if cache is not None and cache.get_seq_length() > 0:
            if layers is not None and layers.owns(cache):
                layers.step(kwargs.get("attention_mask"))
                return None
            ours = self._pruned_cache(kwargs)
            return self._continue(kwargs, ours) if ours is not None else None
        call, self._call = self._call, None
        if self._capturing:
            raise _Captured(self._score_inputs(kwargs, call))
        self._prefill, self.last_stats = None, None
        if layers is not None:
            found = self._score_inputs(kwargs, call)
            if found is not None:
                layers.begin(found[0], cache)
            return None
        return self._prune_prefill(kwargs, call)

    def _after_text_model(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._layers is not None:
            done = self._layers.finish(getattr(output, "cache", None))
            if done is not None and done.stages:
                embeds = kwargs["inputs_embeds"]
                self.last_stats = self._stats([sum(u) for u in done.units], done.stages, embeds.shape[0], done.length,
                                              embeds.dtype, done.scoring_time_s)
        prefill = self._prefill
        if prefill is not None and prefill.cache_ref is None and getattr(output, "cache", None) is not None:
            prefill.cache_ref = weakref.ref(output.cache)

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

    def _prune_prefill(self, kwargs: dict, call: dict[str, Any] | None) -> tuple | None:
        found = self._score_inputs(kwargs, call)
        if found is None:
            return None
        inputs, positions = found
        embeds, mask, layout = kwargs["inputs_embeds"], kwargs.get("attention_mask"), inputs.layout
        batch, length = embeds.shape[:2]
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
            distribution = unit_distribution(scores, inputs.units, self.scorer.distribution)
            keep_packed = select_mass(distribution, valid, inputs.units, config.mass, config.min_ratio,
                                      config.max_ratio, config.min_tokens)
        else:
            keep_packed = select_top(scores, valid, inputs.units, config.ratio, config.min_tokens)
        keep_visual = torch.zeros_like(layout.visual_mask)
        keep_visual[layout.visual_mask] = keep_packed[valid]
        drop = layout.visual_mask & ~keep_visual
        real = mask.bool() if mask is not None else torch.ones_like(drop)
        slicing = Slicing.from_keep(real & ~drop)
        new_mask = slicing.mask(mask.dtype if mask is not None else torch.long)
        if self.config.positions == "original":
            new_positions = slicing.positions(positions)
        else:
            new_positions = contiguous_positions(new_mask, positions.shape[0])
        last_original = positions[:, torch.arange(batch), slicing.index[:, -1]]
        last_new = new_positions[:, :, -1]
        shift = None if self.config.positions == "original" else (last_new - last_original).unsqueeze(-1)
        self._prefill = _PrunedPrefill(new_mask, length, last_new, shift)
        kept = [torch.nonzero(keep_packed[b, : int(valid[b].sum())]).flatten().cpu() for b in range(batch)]
        self.last_stats = self._stats(layout.counts, [PruneStage(0, kept, slicing.length)], batch, length,
                                      embeds.dtype, scoring_time)
        merged = getattr(self.scorer, "merge", lambda *_: None)(inputs, keep_packed)
        if merged is not None:
            embeds = embeds.clone()
            embeds[layout.visual_mask] = merged[valid].to(embeds.dtype)
        kwargs = dict(kwargs)
        kwargs["inputs_embeds"] = slicing.sequence(embeds)
        kwargs["attention_mask"] = new_mask
        kwargs["position_ids"] = self.adapter.text_model_positions(new_positions)
        return (), kwargs

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
        )

    # -- decode steps ----------------------------------------------------------------------------------------
    def _continue(self, kwargs: dict, cache: Any) -> tuple:
        prefill = self._prefill
        call, self._call = self._call or {}, None
        n_new = kwargs["inputs_embeds"].shape[1]
        after_prompt = cache.get_seq_length() - prefill.length + n_new
        mask = kwargs.get("attention_mask")
        expected = prefill.original_length + after_prompt
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[1] != expected):
            raise PrunedCacheError(
                f"this call continues a pruned cache with an attention mask of shape "
                f"{tuple(getattr(mask, 'shape', ()))}, expected (batch, {expected}): continuing generation from "
                "a pruned cache with a new prompt (multi-turn reuse of past_key_values) is not supported yet")
        tail = mask[:, prefill.original_length:] if mask is not None else prefill.mask.new_ones(
            (prefill.mask.shape[0], after_prompt))
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = torch.cat([prefill.mask, tail.to(prefill.mask.dtype)], dim=1)
        positions = kwargs.get("position_ids")
        if positions is not None and not call.get("positions_from_pruner"):
            batch = prefill.mask.shape[0]
            full = self.adapter.expand_positions(positions, batch, n_new, positions.device)
            if prefill.position_shift is not None:
                full = full + prefill.position_shift
            expected_first = prefill.last_positions[0] + 1 + (after_prompt - n_new)
            if not torch.equal(full[0, :, 0], expected_first):
                raise PrunedCacheError(
                    "position ids of this step do not continue the pruned prompt: continuing generation from a "
                    "pruned cache with a new prompt (multi-turn reuse of past_key_values) is not supported yet")
            kwargs["position_ids"] = self.adapter.text_model_positions(full)
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


def resolve_budget(config: TokenPruneConfig, scorer: Scorer | LayerSchedule) -> TokenPruneConfig:
    """``config`` with the ``budget="auto"`` fields filled in for ``scorer``: ``mass`` (and the clamp left None)
    from the compressor's saved calibration when ``mass`` is None, else ``min_ratio`` 0 and ``max_ratio`` 1.

    Raises:
        ValueError: the scorer has no relevance distribution; no ``mass`` and no saved calibration; or the
            calibration was made for another ``scope``.
    """
    if config.budget != "auto":
        return config
    if getattr(scorer, "distribution", None) is None:
        raise ValueError(f"budget='auto' keeps tokens by their share of a relevance distribution, but scorer "
                         f"{config.scorer_name} has none (its `distribution` is None; set it to 'softmax' or 'sum')")
    filled: dict[str, Any] = {"min_ratio": config.min_ratio, "max_ratio": config.max_ratio}
    if config.mass is None:
        calibration = getattr(getattr(scorer, "compressor", None), "calibration", None)
        if calibration is None:
            raise ValueError("budget='auto' needs a relevance-mass threshold: pass mass=<0..1>, or calibrate the "
                             "compressor for a target mean retention (hf_tokenprune.calibrate + save_calibration, or "
                             "`hf-tokenprune calibrate`), which saves the threshold in its config.json")
        if calibration["scope"] != config.scope:
            raise ValueError(f"the compressor was calibrated with scope={calibration['scope']!r}, not "
                             f"{config.scope!r}: calibrate it for this scope or pass mass=")
        filled = {"mass": calibration["mass"], **{k: calibration[k] if v is None else v for k, v in filled.items()}}
    defaults = {"min_ratio": 0.0, "max_ratio": 1.0}
    return config.replace(**{k: defaults[k] if v is None else v for k, v in filled.items()})


def prune_wrap(model: nn.Module, config: TokenPruneConfig | None = None, **overrides: Any) -> nn.Module:
    """Make ``model`` prune visual tokens at the LLM input; returns the same (patched) instance.

    Wrapping an already wrapped model re-configures it. ``overrides`` are :class:`TokenPruneConfig` fields,
    applied on top of ``config``. With ``budget="auto"``, ``model.tokenprune.config`` holds the threshold and
    clamp in use (:func:`resolve_budget`).
    """
    config = _resolve_config(config, overrides)
    adapter = get_adapter(model)
    scorer = build_scorer(config, adapter)
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
