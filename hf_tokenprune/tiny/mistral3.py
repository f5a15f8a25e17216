"""Mistral 3 (Mistral-Small-3.1 style): Pixtral vision tower, 2 x 2 patch merger, Mistral text model; images only.

Patches of 7 px merged 2 x 2: one ``[IMG]`` token per 14 x 14 px of the resized image (a 56 x 56 image: 4 rows of
4, each row followed by ``[IMG_BREAK]`` / ``[IMG_END]``); images of different sizes give different counts
(``image_sizes``). ``image_size`` is not used (the tower takes any size up to ``PIXTRAL_MAX_IMAGE_SIZE``).
"""

from __future__ import annotations

from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PreTrainedTokenizerFast

from .pixtral import (
    PIXTRAL_TOKENS,
    TinyPixtralProcessor,
    pixtral_image_token_id,
    pixtral_processor,
    pixtral_text,
    pixtral_vision,
)
from .registry import TinyFamily

MISTRAL3_PATCH_SIZE = 7
MISTRAL3_MERGE_SIZE = 2


def _config(config_class: type[Mistral3Config], num_hidden_layers: int, image_size: int | None) -> Mistral3Config:
    return config_class(
        text_config=pixtral_text(num_hidden_layers),
        vision_config=pixtral_vision(MISTRAL3_PATCH_SIZE),
        image_token_index=pixtral_image_token_id(),
        spatial_merge_size=MISTRAL3_MERGE_SIZE,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )


def _processor(tokenizer: PreTrainedTokenizerFast, image_size: int | None) -> TinyPixtralProcessor:
    return pixtral_processor(tokenizer, MISTRAL3_PATCH_SIZE, MISTRAL3_MERGE_SIZE)


MISTRAL3 = TinyFamily("mistral3", Mistral3ForConditionalGeneration, _config, _processor, modalities=("image",),
                      tokens=PIXTRAL_TOKENS)
