"""InternVL: InternViT-style tower, pixel-shuffle projector, Qwen2 text model (``language_model``).

The image processor (GOT-OCR2's, ``crop_to_patches``) resizes an image onto the ``cols x rows`` grid of
``INTERNVL_TILE`` px tiles whose aspect ratio is closest to the image's (at most ``INTERNVL_MAX_TILES``), adds a
thumbnail (the whole image resized to one tile) when there is more than one tile, and the processor writes the image
as ``<img>`` + one block of ``INTERNVL_BLOCK`` ``<IMG_CONTEXT>`` per tile + ``</img>``. A video is its frames, each
``Frame{i}: <img>`` + one block + ``</img>``, its pixels joined to the images' ``pixel_values``. The real
checkpoints: 448 px tiles of 256 tokens, at most 12 tiles.

The tiny sizes: 32 px tiles, patch 4, pixel shuffle 0.5 (8 x 8 patches -> 4 x 4 tokens), at most 6 tiles. The
tokenizer is the shared one with InternVL's ``<img>``, ``</img>`` and ``<IMG_CONTEXT>`` added and named for the
processor (``start_image_token``, ``end_image_token``, ``context_image_token``, ``video_token``).
"""

from __future__ import annotations

from transformers import (
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from .llava_onevision import TinyLlavaOnevisionVideoProcessor
from .processors import TorchFreeProcessorMixin, register_processor
from .registry import TinyFamily, added_token_ids
from .sizes import VISION_HEADS, VISION_HIDDEN_SIZE, text_kwargs
from .tokenizer import rebuilt_tokenizer

INTERNVL_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>")
INTERNVL_TILE = 32
INTERNVL_MAX_TILES = 6
INTERNVL_BLOCK = 16  # <IMG_CONTEXT> tokens per tile

# InternVL3-hf's chat template
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\\n' }}{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}"
)


def internvl_tokenizer(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """``tokenizer`` (with :data:`INTERNVL_TOKENS` added) naming the tokens ``InternVLProcessor`` reads."""
    return rebuilt_tokenizer(tokenizer, extra_special_tokens={
        "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>"})


class TinyInternVLVideoProcessor(TinyLlavaOnevisionVideoProcessor):
    """Reproduces ``InternVLVideoProcessor``, which (without frame sampling) resizes every frame to ``size`` as
    LLaVA-OneVision's does."""


class TinyInternVLProcessor(TorchFreeProcessorMixin, InternVLProcessor):
    """Stock :class:`~transformers.InternVLProcessor` with a torchvision-free video processor."""


register_processor(TinyInternVLProcessor, GotOcr2ImageProcessorPil, TinyInternVLVideoProcessor)


def _config(config_class: type[InternVLConfig], num_hidden_layers: int, image_size: int | None) -> InternVLConfig:
    if image_size not in (None, INTERNVL_TILE):
        raise ValueError(f"the tiny InternVL tile size is fixed at {INTERNVL_TILE}")
    text = text_kwargs(num_hidden_layers)
    text.update(model_type="qwen2", vocab_size=text["vocab_size"] + len(INTERNVL_TOKENS),
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    vision = dict(hidden_size=VISION_HIDDEN_SIZE, intermediate_size=2 * VISION_HIDDEN_SIZE, num_hidden_layers=2,
                  num_attention_heads=VISION_HEADS, image_size=INTERNVL_TILE, patch_size=4)
    return config_class(text_config=text, vision_config=vision,
                        image_token_id=added_token_ids(INTERNVL_TOKENS)["<IMG_CONTEXT>"],
                        image_seq_length=INTERNVL_BLOCK, downsample_ratio=0.5, vision_feature_layer=-1,
                        vision_feature_select_strategy="default", tie_word_embeddings=False)


def _processor(tokenizer: PreTrainedTokenizerFast, image_size: int | None) -> TinyInternVLProcessor:
    size = {"height": INTERNVL_TILE, "width": INTERNVL_TILE}
    return TinyInternVLProcessor(
        image_processor=GotOcr2ImageProcessorPil(size=size, crop_to_patches=True, max_patches=INTERNVL_MAX_TILES),
        tokenizer=internvl_tokenizer(tokenizer), video_processor=TinyInternVLVideoProcessor(size=size),
        image_seq_length=INTERNVL_BLOCK, chat_template=INTERNVL_CHAT_TEMPLATE)


INTERNVL = TinyFamily("internvl", InternVLForConditionalGeneration, _config, _processor, tokens=INTERNVL_TOKENS)
