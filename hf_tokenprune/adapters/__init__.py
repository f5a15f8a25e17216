"""Model-family adapters and their registry (``config.model_type`` -> adapter)."""

from __future__ import annotations

from torch import nn

from .base import (
    Adapter,
    MalformedVisualInputError,
    Placeholder,
    PlaceholderAdapter,
    UnsupportedMethodError,
    VisualLayout,
)
from .gemma3 import Gemma3Adapter
from .gemma4 import Gemma4Adapter
from .glm4v import Glm4vAdapter
from .idefics3 import Idefics3Adapter, SmolVLMAdapter
from .internvl import InternVLAdapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_next_video import LlavaNextVideoAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .pixtral import PixtralAdapter
from .qwen2_vl import Qwen2VLAdapter
from .qwen3_5 import Qwen3_5Adapter
from .qwen3_vl import Qwen3VLAdapter
from .regions import ItemRegions, TokenRegions, VisualItem

ADAPTERS: dict[str, type[Adapter]] = {
    t: cls for cls in (Qwen2VLAdapter, Qwen3VLAdapter, Glm4vAdapter, LlavaOnevisionAdapter, LlavaAdapter,
                       Qwen3_5Adapter, LlavaNextAdapter, LlavaNextVideoAdapter, PixtralAdapter,
                       Idefics3Adapter, SmolVLMAdapter, InternVLAdapter, Gemma3Adapter, Gemma4Adapter)
    for t in cls.model_types
}

__all__ = ["ADAPTERS", "Adapter", "ItemRegions", "MalformedVisualInputError", "Placeholder", "PlaceholderAdapter",
           "TokenRegions", "UnsupportedMethodError", "UnsupportedModelError", "VisualItem", "VisualLayout",
           "get_adapter", "register_adapter"]


class UnsupportedModelError(ValueError):
    """The model family has no adapter."""


def register_adapter(model_type: str, adapter_class: type[Adapter]) -> None:
    """Serve models whose ``config.model_type`` is ``model_type`` with ``adapter_class`` (e.g. a subclass of a
    supported model class registered under its own ``model_type``)."""
    ADAPTERS[model_type] = adapter_class


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter of a ``...ForConditionalGeneration`` model; :class:`UnsupportedModelError` otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS or not hasattr(model, "model"):
        raise UnsupportedModelError(
            f"hf_tokenprune does not support {type(model).__name__} (model_type={model_type!r}); supported "
            f"model types: {', '.join(sorted(ADAPTERS))} (the ...ForConditionalGeneration classes)")
    return ADAPTERS[model_type].for_model(model)(model)
