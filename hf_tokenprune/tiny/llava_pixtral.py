"""LLaVA with a Pixtral tower (pixtral-12b style, ``model_type="llava"``): no patch merger, Mistral text model.

Patches of 14 px: one ``[IMG]`` token per 14 x 14 px of the resized image, row by row with ``[IMG_BREAK]`` /
``[IMG_END]`` as for :mod:`.mistral3`; full features of the last layer (Pixtral has no CLS token).
``image_size`` is not used.
"""

from __future__ import annotations

from transformers import LlavaConfig, LlavaForConditionalGeneration, PreTrainedTokenizerFast

from .pixtral import (
    PIXTRAL_TOKENS,
    TinyPixtralProcessor,
    pixtral_image_token_id,
    pixtral_processor,
    pixtral_text,
    pixtral_vision,
)
from .registry import TinyFamily

LLAVA_PIXTRAL_PATCH_SIZE = 14


def _config(config_class: type[LlavaConfig], num_hidden_layers: int, image_size: int | None) -> LlavaConfig:
    return config_class(
        text_config=pixtral_text(num_hidden_layers),
        vision_config=pixtral_vision(LLAVA_PIXTRAL_PATCH_SIZE),
        image_token_index=pixtral_image_token_id(),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )


def _processor(tokenizer: PreTrainedTokenizerFast, image_size: int | None) -> TinyPixtralProcessor:
    return pixtral_processor(tokenizer, LLAVA_PIXTRAL_PATCH_SIZE, 1)


LLAVA_PIXTRAL = TinyFamily("llava_pixtral", LlavaForConditionalGeneration, _config, _processor, modalities=("image",),
                           tokens=PIXTRAL_TOKENS)
