"""LLaVA-OneVision: SigLIP vision tower with anyres tiles, Qwen2 text model, a numpy video processor.

``image_size``: the SigLIP tile size (default 28 -> 4x4 features per tile, a multiple of ``LLAVA_PATCH_SIZE``);
the model and the processor must get the same value.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

from .processors import TinyVideoProcessor, TorchFreeProcessorMixin, register_processor, resize_frames
from .registry import TinyFamily
from .sizes import VISION_HEADS, VISION_HIDDEN_SIZE, text_kwargs
from .tokenizer import LLAVA_ONEVISION_CHAT_TEMPLATE, special_token_ids

# SigLIP tile of 28 px with patch 7 -> 4x4 = 16 features per tile.
LLAVA_PATCH_SIZE = 7
LLAVA_DEFAULT_IMAGE_SIZE = 28
LLAVA_MAX_GRID = 2  # anyres pinpoints: every (i*tile, j*tile) with 1 <= i, j <= 2


class TinyLlavaOnevisionVideoProcessor(TinyVideoProcessor):
    """Reproduces ``LlavaOnevisionVideoProcessor`` (resize every frame to ``size``) with numpy + PIL."""

    def __init__(self, size: dict[str, int] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.size = dict(size) if size is not None else {"height": 384, "width": 384}

    def _process(self, videos: list[np.ndarray]) -> dict[str, Any]:
        out = [self._normalize(resize_frames(v, self.size["height"], self.size["width"])) for v in videos]
        if len({v.shape for v in out}) == 1:
            return {"pixel_values_videos": np.stack(out)}
        return {"pixel_values_videos": out}


class TinyLlavaOnevisionProcessor(TorchFreeProcessorMixin, LlavaOnevisionProcessor):
    """Stock :class:`~transformers.LlavaOnevisionProcessor` with a torchvision-free video processor."""


register_processor(TinyLlavaOnevisionProcessor, LlavaOnevisionImageProcessorPil, TinyLlavaOnevisionVideoProcessor)


def llava_onevision_config(text: dict[str, Any], vision: dict[str, Any], image_grid_pinpoints: list[list[int]],
                           config_class: type[LlavaOnevisionConfig] = LlavaOnevisionConfig) -> LlavaOnevisionConfig:
    """A LLaVA-OneVision config (Qwen2 text model) wired to :func:`build_tokenizer`'s special tokens.

    Sets ``model_type="qwen2"`` and default RoPE (``rope_theta`` 1e4) on ``text`` (in place); full SigLIP
    features from the last layer, ``anyres_max_9``, untied embeddings.  Shared with
    :mod:`hf_tokenprune.world.models`.
    """
    ids = special_token_ids()
    text["model_type"] = "qwen2"
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4}
    return config_class(
        text_config=text,
        vision_config=vision,
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=image_grid_pinpoints,
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    )


def _pinpoints(tile: int) -> list[list[int]]:
    return [[i * tile, j * tile] for i in range(1, LLAVA_MAX_GRID + 1) for j in range(1, LLAVA_MAX_GRID + 1)]


def _config(config_class: type[LlavaOnevisionConfig], num_hidden_layers: int,
            image_size: int | None) -> LlavaOnevisionConfig:
    image_size = image_size or LLAVA_DEFAULT_IMAGE_SIZE
    vision = dict(
        model_type="siglip_vision_model",
        hidden_size=VISION_HIDDEN_SIZE,
        intermediate_size=2 * VISION_HIDDEN_SIZE,
        num_hidden_layers=2,
        num_attention_heads=VISION_HEADS,
        image_size=image_size,
        patch_size=LLAVA_PATCH_SIZE,
        vision_use_head=False,
    )
    return llava_onevision_config(text_kwargs(num_hidden_layers), vision, _pinpoints(image_size), config_class)


def _processor(tokenizer: PreTrainedTokenizerFast, image_size: int | None) -> TinyLlavaOnevisionProcessor:
    image_size = image_size or LLAVA_DEFAULT_IMAGE_SIZE
    if image_size % LLAVA_PATCH_SIZE:
        raise ValueError(f"LLaVA-OneVision image_size must be a multiple of {LLAVA_PATCH_SIZE}")
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_grid_pinpoints=_pinpoints(image_size),
    )
    video_processor = TinyLlavaOnevisionVideoProcessor(size={"height": image_size, "width": image_size})
    return TinyLlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        num_image_tokens=(image_size // LLAVA_PATCH_SIZE) ** 2,
        vision_feature_select_strategy="full",
        chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE,
        vision_aspect_ratio="anyres_max_9",
    )


LLAVA_ONEVISION = TinyFamily("llava_onevision", LlavaOnevisionForConditionalGeneration, _config, _processor)
