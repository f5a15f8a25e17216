"""``generate()`` options that pruning cannot keep consistent, refused before any compute.

A wrapped model's ``generate`` first runs :func:`check_generate` on its arguments (only while pruning is active:
``ratio < 1`` and not inside ``model.tokenprune.disabled()``), so an unsupported combination fails with an error
that names it instead of deep inside transformers or, worse, with a silently wrong answer.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import DynamicCache

from .compat import generate_cache

# cache_implementation values whose caches are not plain DynamicCaches over the pruned prefill
_REFUSED_CACHES = {
    "static": "a static cache is pre-allocated for the unpruned length and its compiled decode step gets a 4-D mask",
    "offloaded_static": "a static cache is pre-allocated for the unpruned length",
    "sliding_window": "a sliding-window cache is pre-allocated for the unpruned length",
    "hybrid": "a hybrid cache is pre-allocated for the unpruned length",
    "offloaded": "the offloaded cache is not tested with pruning (it needs CUDA)",
    "quantized": "the quantized cache is not tested with pruning",
}


class UnsupportedGenerationError(ValueError):
    """A ``generate()`` option that pruning does not support, named in the message; raised before any compute."""


def _setting(model: nn.Module, kwargs: dict[str, Any], name: str) -> Any:
    """A generation option as ``generate`` resolves it: the keyword, else ``generation_config=``, else the model's."""
    if name in kwargs:
        return kwargs[name]
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    return getattr(config, name, None)


def _prunes(model: Any) -> bool:
    handle = getattr(model, "__dict__", {}).get("tokenprune")
    return handle is not None and handle.active


def check_generate(model: nn.Module, kwargs: dict[str, Any]) -> None:
    """Raise :class:`UnsupportedGenerationError` for ``model.generate(**kwargs)`` options pruning cannot honour."""
    refuse = "; run it unpruned inside `with model.tokenprune.disabled():` or wrap with ratio=1.0"
    cache_implementation = _setting(model, kwargs, "cache_implementation")
    if cache_implementation in _REFUSED_CACHES:
        raise UnsupportedGenerationError(
            f"cache_implementation={cache_implementation!r} is not supported with pruning: "
            f"{_REFUSED_CACHES[cache_implementation]}. Use the default DynamicCache{refuse}")
    cache = generate_cache(kwargs)
    if cache is not None and not isinstance(cache, DynamicCache):
        raise UnsupportedGenerationError(
            f"a {type(cache).__name__} passed to generate() is not supported with pruning: the pruned prefill "
            f"needs a DynamicCache (the default){refuse}")
    if _setting(model, kwargs, "prefill_chunk_size"):
        raise UnsupportedGenerationError(
            f"prefill_chunk_size is not supported with pruning: the whole prompt must be scored at once{refuse}")
    expand = max(_setting(model, kwargs, "num_beams") or 1, _setting(model, kwargs, "num_return_sequences") or 1)
    reason = model.tokenprune.adapter.expansion_refusal(kwargs) if expand > 1 else None
    if reason is not None:
        raise UnsupportedGenerationError(f"num_beams / num_return_sequences > 1 cannot run on these inputs: {reason}")
    if _prunes(kwargs.get("assistant_model")):
        raise UnsupportedGenerationError(
            "assisted decoding with a pruned assistant_model is not supported: transformers crops the draft's "
            "cache to the unpruned length. Pass an unwrapped draft model (the main model may prune)")
    if getattr(kwargs.get("generation_config"), "is_assistant", False):
        raise UnsupportedGenerationError(
            "this pruned model is the assistant_model of assisted decoding, which is not supported: transformers "
            "crops the draft's cache to the unpruned length. Pass an unwrapped draft model (the main model may prune)")
