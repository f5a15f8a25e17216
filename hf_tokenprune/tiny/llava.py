"""LLaVA-1.5: CLIP vision tower, Llama text model; images only, every image the same number of tokens.

``image_size``: the CLIP input size every image is resized and center-cropped to (default 42 -> 6x6 = 36 patch
features + CLS, the CLS dropped by ``vision_feature_select_strategy="default"``: 36 visual tokens per image; the
real model: 336 / 14 -> 576); the model and the processor must get the same value.
"""

from __future__ import annotations

from typing import Any

from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from .processors import TorchFreeProcessorMixin, register_processor
from .registry import TinyFamily
from .sizes import VISION_HEADS, VISION_HIDDEN_SIZE, text_kwargs
from .tokenizer import LLAVA_CHAT_TEMPLATE, special_token_ids

LLAVA15_PATCH_SIZE = 7
LLAVA15_DEFAULT_IMAGE_SIZE = 42


class TinyLlavaProcessor(TorchFreeProcessorMixin, LlavaProcessor):
    """Stock :class:`~transformers.LlavaProcessor` (no video) that reloads its image processor as the PIL class
    (the saved type name drops the "Pil" suffix)."""


register_processor(TinyLlavaProcessor, CLIPImageProcessorPil)


def clip_vision(image_size: int, patch_size: int) -> dict[str, Any]:
    """A tiny CLIP tower's ``vision_config`` kwargs (also LLaVA-NeXT's)."""
    return dict(
        model_type="clip_vision_model",
        hidden_size=VISION_HIDDEN_SIZE,
        intermediate_size=2 * VISION_HIDDEN_SIZE,
        projection_dim=VISION_HIDDEN_SIZE,
        num_hidden_layers=2,
        num_attention_heads=VISION_HEADS,
        image_size=image_size,
        patch_size=patch_size,
    )


def _config(config_class: type[LlavaConfig], num_hidden_layers: int, image_size: int | None) -> LlavaConfig:
    image_size = image_size or LLAVA15_DEFAULT_IMAGE_SIZE
    text = text_kwargs(num_hidden_layers)
    text["model_type"] = "llama"
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    return config_class(
        text_config=text,
        vision_config=clip_vision(image_size, LLAVA15_PATCH_SIZE),
        image_token_index=special_token_ids()["<image>"],
        image_seq_length=(image_size // LLAVA15_PATCH_SIZE) ** 2,
        vision_feature_select_strategy="default",  # drop CLS
        vision_feature_layer=-2,  # the penultimate CLIP layer, like LLaVA-1.5
        tie_word_embeddings=False,
    )


def clip_processor_kwargs(patch_size: int) -> dict[str, Any]:
    """The LLaVA processors' arguments for a CLIP tower whose CLS token is dropped (also LLaVA-NeXT's)."""
    return dict(patch_size=patch_size, vision_feature_select_strategy="default", num_additional_image_tokens=1)


def _processor(tokenizer: PreTrainedTokenizerFast, image_size: int | None) -> TinyLlavaProcessor:
    image_size = image_size or LLAVA15_DEFAULT_IMAGE_SIZE
    if image_size % LLAVA15_PATCH_SIZE:
        raise ValueError(f"LLaVA-1.5 image_size must be a multiple of {LLAVA15_PATCH_SIZE}")
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return TinyLlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                              chat_template=LLAVA_CHAT_TEMPLATE, **clip_processor_kwargs(LLAVA15_PATCH_SIZE))


LLAVA = TinyFamily("llava", LlavaForConditionalGeneration, _config, _processor, modalities=("image",))
