"""Tiny random-weight VLMs of the real architectures with their real processors, built fully offline.

Nothing is downloaded: a shared word-level tokenizer (:mod:`.tokenizer`), torch(vision)-free processor plumbing
(:mod:`.processors`), one module per family (:mod:`.qwen2_vl`, :mod:`.llava_onevision`, :mod:`.llava`) and the
registry :func:`build` reads (:mod:`.registry`; the shared invariant tests run over :data:`FAMILIES`). Tests and
demos run ``processor(...) -> model.generate(...)`` and ``pipeline("image-text-to-text", ...)`` on CPU in well
under a second per call. Adding a family: a module defining its :class:`TinyFamily`, registered below.
"""

from __future__ import annotations

from .gemma3 import GEMMA3, GEMMA3_CHAT_TEMPLATE, GEMMA3_IMAGE_TOKENS, GEMMA3_TOKENS, TinyGemma3Processor
from .gemma4 import GEMMA4, GEMMA4_CHAT_TEMPLATE, GEMMA4_TOKENS, TinyGemma4Processor, TinyGemma4VideoProcessor
from .glm4v import GLM4V, GLM4V_MOE, GLM_CHAT_TEMPLATE, GLM_TOKENS, TinyGlm4vProcessor, TinyGlm4vVideoProcessor
from .images import draw_shape, make_image, make_video
from .internvl import (
    INTERNVL,
    INTERNVL_BLOCK,
    INTERNVL_CHAT_TEMPLATE,
    INTERNVL_TILE,
    INTERNVL_TOKENS,
    TinyInternVLProcessor,
    TinyInternVLVideoProcessor,
)
from .llava import LLAVA, LLAVA15_DEFAULT_IMAGE_SIZE, LLAVA15_PATCH_SIZE, TinyLlavaProcessor
from .llava_next import LLAVA_NEXT, LLAVA_NEXT_DEFAULT_IMAGE_SIZE, LLAVA_NEXT_PATCH_SIZE, TinyLlavaNextProcessor
from .llava_next_video import LLAVA_NEXT_VIDEO, TinyLlavaNextVideoProcessor, TinyLlavaNextVideoVideoProcessor
from .llava_onevision import (
    LLAVA_DEFAULT_IMAGE_SIZE,
    LLAVA_MAX_GRID,
    LLAVA_ONEVISION,
    LLAVA_PATCH_SIZE,
    TinyLlavaOnevisionProcessor,
    TinyLlavaOnevisionVideoProcessor,
    llava_onevision_config,
)
from .llava_pixtral import LLAVA_PIXTRAL, LLAVA_PIXTRAL_PATCH_SIZE
from .mistral3 import MISTRAL3, MISTRAL3_MERGE_SIZE, MISTRAL3_PATCH_SIZE
from .pixtral import PIXTRAL_CHAT_TEMPLATE, PIXTRAL_MAX_IMAGE_SIZE, PIXTRAL_TOKENS, TinyPixtralProcessor
from .qwen2_vl import (
    MROPE_SECTION,
    QWEN2_5_VL,
    QWEN2_VL,
    QWEN_DEFAULT_IMAGE_SIZE,
    QWEN_MERGE_SIZE,
    QWEN_MIN_PIXELS,
    QWEN_PATCH_SIZE,
    QWEN_TEMPORAL_PATCH_SIZE,
    TinyQwen2_5_VLProcessor,
    TinyQwen2VLProcessor,
    TinyQwen2VLVideoProcessor,
    qwen_config,
)
from .qwen3_5 import QWEN3_5, QWEN3_5_MOE
from .qwen3_vl import (
    QWEN3_DEEPSTACK_INDEXES,
    QWEN3_MROPE_SECTION,
    QWEN3_VL,
    QWEN3_VL_MOE,
    TinyQwen3VLProcessor,
    TinyQwen3VLVideoProcessor,
)
from .registry import (
    FAMILIES,
    MODALITIES,
    TinyFamily,
    added_token_ids,
    build,
    build_model,
    build_processor,
    get_family,
    register_family,
)
from .sizes import TEXT_HEAD_DIM, TEXT_HEADS, TEXT_HIDDEN_SIZE, TEXT_KV_HEADS, VISION_HEADS, VISION_HIDDEN_SIZE
from .smolvlm import (
    IDEFICS3,
    IDEFICS3_BLOCK,
    IDEFICS3_TILE,
    IDEFICS3_TOKENS,
    SMOLVLM,
    SMOLVLM_CHAT_TEMPLATE,
    TinyIdefics3Processor,
    TinySmolVLMProcessor,
    TinySmolVLMVideoProcessor,
)
from .tokenizer import (
    LLAVA_CHAT_TEMPLATE,
    LLAVA_ONEVISION_CHAT_TEMPLATE,
    QWEN_CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    WORDS,
    build_tokenizer,
    special_token_ids,
    text_token_ids,
)

for _family in (QWEN2_VL, QWEN2_5_VL, LLAVA_ONEVISION, LLAVA, QWEN3_VL, QWEN3_VL_MOE, GLM4V, GLM4V_MOE, QWEN3_5,
                QWEN3_5_MOE, LLAVA_NEXT, LLAVA_NEXT_VIDEO, MISTRAL3, LLAVA_PIXTRAL,
                SMOLVLM, IDEFICS3, INTERNVL, GEMMA3, GEMMA4):
    register_family(_family)
del _family

__all__ = [
    # the registry
    "FAMILIES", "MODALITIES", "TinyFamily", "register_family", "get_family", "build", "build_model", "build_processor",
    "added_token_ids",
    # the shared tokenizer and media
    "SPECIAL_TOKENS", "WORDS", "QWEN_CHAT_TEMPLATE", "LLAVA_ONEVISION_CHAT_TEMPLATE", "LLAVA_CHAT_TEMPLATE",
    "build_tokenizer", "special_token_ids", "text_token_ids", "make_image", "make_video", "draw_shape",
    "TEXT_HIDDEN_SIZE", "TEXT_HEADS", "TEXT_KV_HEADS", "TEXT_HEAD_DIM", "VISION_HIDDEN_SIZE", "VISION_HEADS",
    # the families
    "QWEN2_VL", "QWEN2_5_VL", "TinyQwen2VLVideoProcessor", "TinyQwen2VLProcessor", "TinyQwen2_5_VLProcessor",
    "qwen_config", "MROPE_SECTION", "QWEN_PATCH_SIZE", "QWEN_MERGE_SIZE", "QWEN_TEMPORAL_PATCH_SIZE", "QWEN_MIN_PIXELS",
    "QWEN_DEFAULT_IMAGE_SIZE",
    "QWEN3_VL", "QWEN3_VL_MOE", "TinyQwen3VLProcessor", "TinyQwen3VLVideoProcessor", "QWEN3_MROPE_SECTION",
    "QWEN3_DEEPSTACK_INDEXES",
    "GLM4V", "GLM4V_MOE", "TinyGlm4vProcessor", "TinyGlm4vVideoProcessor", "GLM_TOKENS", "GLM_CHAT_TEMPLATE",
    "QWEN3_5", "QWEN3_5_MOE",
    "LLAVA_ONEVISION", "TinyLlavaOnevisionVideoProcessor", "TinyLlavaOnevisionProcessor", "llava_onevision_config",
    "LLAVA_PATCH_SIZE", "LLAVA_DEFAULT_IMAGE_SIZE", "LLAVA_MAX_GRID",
    "LLAVA", "TinyLlavaProcessor", "LLAVA15_PATCH_SIZE", "LLAVA15_DEFAULT_IMAGE_SIZE",
    "LLAVA_NEXT", "TinyLlavaNextProcessor", "LLAVA_NEXT_PATCH_SIZE", "LLAVA_NEXT_DEFAULT_IMAGE_SIZE",
    "LLAVA_NEXT_VIDEO", "TinyLlavaNextVideoProcessor", "TinyLlavaNextVideoVideoProcessor",
    "MISTRAL3", "MISTRAL3_PATCH_SIZE", "MISTRAL3_MERGE_SIZE", "LLAVA_PIXTRAL", "LLAVA_PIXTRAL_PATCH_SIZE",
    "TinyPixtralProcessor", "PIXTRAL_TOKENS", "PIXTRAL_MAX_IMAGE_SIZE", "PIXTRAL_CHAT_TEMPLATE",
    "SMOLVLM", "IDEFICS3", "TinySmolVLMProcessor", "TinySmolVLMVideoProcessor", "TinyIdefics3Processor",
    "SMOLVLM_CHAT_TEMPLATE", "IDEFICS3_TOKENS", "IDEFICS3_TILE", "IDEFICS3_BLOCK",
    "INTERNVL", "TinyInternVLProcessor", "TinyInternVLVideoProcessor", "INTERNVL_CHAT_TEMPLATE", "INTERNVL_TOKENS",
    "INTERNVL_TILE", "INTERNVL_BLOCK",
    "GEMMA3", "TinyGemma3Processor", "GEMMA3_CHAT_TEMPLATE", "GEMMA3_TOKENS", "GEMMA3_IMAGE_TOKENS",
    "GEMMA4", "TinyGemma4Processor", "TinyGemma4VideoProcessor", "GEMMA4_CHAT_TEMPLATE", "GEMMA4_TOKENS",
]
