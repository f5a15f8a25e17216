"""LLaVA-NeXT: CLIP vision tower with anyres tiles and ``image_newline`` tokens, Mistral text model; images only.

``image_size``: the CLIP tile size (default 28 -> 4x4 patch features per tile + CLS, the CLS dropped by
``vision_feature_select_strategy="default"``; llava-v1.6: 336 / 14 -> 24x24); the model and the processor must get
the same value. An image is the base tile (the whole image resized to one tile) followed by the unpadded grid of its
best-resolution canvas with one newline token after each row: a 56 x 56 image gives 16 + 8 x (8 + 1) = 88 tokens.
"""

from __future__ import annotations

from typing import Any

from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor, PreTrainedTokenizerFast
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from .llava import clip_processor_kwargs, clip_vision
from .processors import TorchFreeProcessorMixin, register_processor
from .registry import TinyFamily
from .sizes import text_kwargs
from .tokenizer import LLAVA_CHAT_TEMPLATE, special_token_ids

LLAVA_NEXT_PATCH_SIZE = 7
LLAVA_NEXT_DEFAULT_IMAGE_SIZE = 28


class TinyLlavaNextProcessor(TorchFreeProcessorMixin, LlavaNextProcessor):
    """Stock :class:`~transformers.LlavaNextProcessor` (no video) that reloads its image processor as the PIL class."""


register_processor(TinyLlavaNextProcessor, LlavaNextImageProcessorPil)


def llava_next_pinpoints(tile: int) -> list[list[int]]:
    """llava-v1.6's canvases in tiles: 1 x 2, 2 x 1, 2 x 2, 3 x 1, 1 x 3."""
    return [[h * tile, w * tile] for h, w in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))]


def llava_next_parts(num_hidden_layers: int, image_size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(text_config, vision_config)`` kwargs of the tiny LLaVA-NeXT families: a Mistral text model (no sliding
    window) and a CLIP tower of ``image_size`` tiles."""
    text = text_kwargs(num_hidden_layers)
    text.update(model_type="mistral", sliding_window=None,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return text, clip_vision(image_size, LLAVA_NEXT_PATCH_SIZE)


def llava_next_image_processor(image_size: int | None) -> LlavaNextImageProcessorPil:
    """llava-v1.6's image processor for ``image_size`` tiles (shortest edge resized to the tile, center crop)."""
    if image_size % LLAVA_NEXT_PATCH_SIZE:
        raise ValueError(f"LLaVA-NeXT image_size must be a multiple of {LLAVA_NEXT_PATCH_SIZE}")
    return LlavaNextImageProcessorPil(size={"shortest_edge": image_size},
                                      crop_size={"height": image_size, "width": image_size},
                                      image_grid_pinpoints=llava_next_pinpoints(image_size))


def _config(config_class: type[LlavaNextConfig], num_hidden_layers: int, image_size: int | None) -> LlavaNextConfig:
    image_size = image_size or LLAVA_NEXT_DEFAULT_IMAGE_SIZE
    text, vision = llava_next_parts(num_hidden_layers, image_size)
    return config_class(
        text_config=text,
        vision_config=vision,
        image_token_index=special_token_ids()["<image>"],
        image_grid_pinpoints=llava_next_pinpoints(image_size),
        image_seq_length=(image_size // LLAVA_NEXT_PATCH_SIZE) ** 2,
        vision_feature_select_strategy="default",  # drop CLS
        vision_feature_layer=-2,
        tie_word_embeddings=False,
    )


def _processor(tokenizer: PreTrainedTokenizerFast, image_size: int | None) -> TinyLlavaNextProcessor:
    image_processor = llava_next_image_processor(image_size or LLAVA_NEXT_DEFAULT_IMAGE_SIZE)
    return TinyLlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                  chat_template=LLAVA_CHAT_TEMPLATE, **clip_processor_kwargs(LLAVA_NEXT_PATCH_SIZE))


LLAVA_NEXT = TinyFamily("llava_next", LlavaNextForConditionalGeneration, _config, _processor, modalities=("image",))
