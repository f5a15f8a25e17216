"""prune_wrap / unwrap / from_pretrained, and the ``model.tokenprune`` handle: configuration, hooks, stats.

Four instance-level hooks, installed through the model's adapter and removed by :func:`unwrap`:

* a pre-hook on the top model refuses ``labels`` while pruning is active;
* a pre-hook on the multimodal model records the call's ``input_ids`` and visual inputs (the text model
  receives only ``inputs_embeds``); over a pruned cache it hands the call to :mod:`.continuation`;
* a pre-hook on the text model prunes a prefill (:mod:`.prefill`) or continues a pruned cache on every later step
  (:mod:`.continuation`);
* a post-hook on the text model stores the prefill's layout on the cache it filled.

The instance's ``generate`` is wrapped to refuse unsupported options (:mod:`.guards`) and continuations that do
not extend the cached conversation, before any compute. The in-LLM baselines (FastV, PDrop, DART: a
:class:`~hf_tokenprune.baselines.LayerSchedule`) leave the text model's input alone; the pre-hook hands the
prefill's layout to a :class:`~hf_tokenprune.inllm.LayerPruner`, whose hooks on the decoder layers prune.

The class is never touched: other instances of it are unaffected.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .adapters import Adapter, get_adapter
from .baselines import LayerSchedule
from .compat import cache_kwarg, output_cache
from .config import TokenPruneConfig
from .continuation import Continuation, PrunedCache, PrunedCacheError, has_visual_inputs
from .guards import check_generate
from .inllm import LayerPruner
from .methods import build_scorer
from .prefill import PrefillPruner, PrunedPrefill, prune_stats
from .scorers import ScoreInputs, Scorer
from .stats import PruneStats


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
        self._pending: PrunedCache | None = None  # the layout of the running prefill, for its cache
        self._capturing = False
        self.prefill = PrefillPruner(self)
        self.continuation = Continuation(self)
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

    @property
    def active(self) -> bool:
        """Whether calls are pruned now: the config prunes (``ratio < 1`` or ``budget="auto"``) and not inside
        :meth:`disabled`."""
        return self._enabled and self.config.prunes

    def configure(self, config: TokenPruneConfig, scorer: Scorer | LayerSchedule | None) -> None:
        """Switch to another configuration (installs / removes the decoder-layer hooks of in-LLM methods; releases
        the previous scorer's hooks, VisionZip's on the vision tower)."""
        if self._layers is not None:
            self._layers.remove()
        previous = getattr(self, "scorer", None)
        if previous is not scorer:
            release_scorer(previous)
        self.config, self.scorer, self.last_stats = config, scorer, None
        self._layers = LayerPruner(self.adapter.text_model, scorer, config.min_tokens) if isinstance(
            scorer, LayerSchedule) else None

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        release_scorer(self.scorer)
        if self._layers is not None:
            self._layers.remove()
        model = self._model_ref()
        if model is not None and getattr(model.__dict__.get("generate"), "_tokenprune_guard", False):
            del model.__dict__["generate"]

    def _guard_generate(self, model: nn.Module) -> None:
        """Give the instance a ``generate`` that refuses unsupported options (:mod:`.guards`) and inconsistent
        continuations of a pruned cache (:meth:`Continuation.check_generate`) before any compute."""
        generate = model.generate

        @functools.wraps(generate)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            if self.active:
                check_generate(model, kwargs)
            self.continuation.check_generate(args, kwargs)
            return generate(*args, **kwargs)

        guarded._tokenprune_guard = True
        model.__dict__["generate"] = guarded

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
        layout = self.continuation.layout_of(cache) if cache is not None else None
        if layout is None:
            return None
        call, new_turn = self.continuation.record(call, cache, layout)
        if new_turn:
            self.last_stats = None
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
        if isinstance(kwargs.get("attention_mask"), dict):  # masks the multimodal model built: prune on its 2-D mask
            kwargs = {**kwargs, "attention_mask": (call or {}).get("attention_mask")}
        if cache is not None and cache.get_seq_length() > 0:
            if layers is not None and layers.owns(cache):
                layers.step(kwargs.get("attention_mask"))
                return None
            layout = PrunedCache.of(cache)  # checked by _record_call
            if layout is None:
                return None
            self._pending = None
            if has_visual_inputs(call or {}):
                self.last_stats = None
                return self._apply(self.prefill.prune(kwargs, call, cache, layout))
            return self.continuation.step(kwargs, call or {}, cache, layout)
        if self._capturing:
            raise _Captured(self.prefill.score_inputs(kwargs, call))
        self._pending, self.last_stats = None, None
        if layers is not None:
            found = self.prefill.score_inputs(kwargs, call)
            if found is not None:
                layers.begin(found[0], cache)
            return None
        return self._apply(self.prefill.prune(kwargs, call))

    def _apply(self, pruned: PrunedPrefill) -> tuple | None:
        """Keep a pruned prefill's layout (for the cache it fills) and stats; the text model's new arguments."""
        if pruned.layout is not None:
            self._pending = pruned.layout
        if pruned.stats is not None:
            self.last_stats = pruned.stats
        return None if pruned.kwargs is None else ((), pruned.kwargs)

    def _after_text_model(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._layers is not None:
            done = self._layers.finish(output_cache(output))
            if done is not None and done.stages:
                embeds = kwargs["inputs_embeds"]
                self.last_stats = prune_stats(self, [sum(u) for u in done.units], done.stages, embeds.shape[0],
                                              done.length, embeds.dtype, done.scoring_time_s)
        layout, self._pending = self._pending, None
        if layout is not None and output_cache(output) is not None:
            layout.record_on(output_cache(output))


def release_scorer(scorer: Any) -> None:
    """Remove the hooks a scorer installed on the model (its ``release()``, where it has one: VisionZip)."""
    release = getattr(scorer, "release", None)
    if callable(release):
        release()


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
