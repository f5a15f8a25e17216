"""GLM-4.1V (``glm4v``) and GLM-4.5V (``glm4v_moe``): Qwen-style patch merging, 3-D M-RoPE on half of each head
(GLM-4.1V rotates interleaved pairs), and videos whose frames are image runs separated by timestamps.

GLM marks image and video tokens with the same ``<|image|>`` id; a video is ``<|begin_of_video|>`` then per frame
``<|begin_of_image|><|image|>...<|end_of_image|>{seconds}``, then ``<|end_of_video|>``. The tokenizer is the shared
one with GLM's media tokens at the ids of their Qwen / LLaVA counterparts (:data:`GLM_TOKENS`), so ids and vocabulary
size stay those of every tiny family. ``image_size``: as for Qwen2-VL (at most ``image_size**2`` pixels per image,
default 112 -> at most 64 visual tokens).
"""

from __future__ import annotations

import json
from typing import Any

from tokenizers import Tokenizer
from transformers import (
    Glm4vForConditionalGeneration,
    Glm4vMoeForConditionalGeneration,
    Glm4vProcessor,
    PreTrainedConfig,
    PreTrainedTokenizerFast,
)
from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

from .processors import TorchFreeProcessorMixin, register_processor
from .qwen2_vl import QWEN_MERGE_SIZE, QWEN_PATCH_SIZE, QWEN_TEMPORAL_PATCH_SIZE, qwen_processor
from .qwen3_vl import TinyQwen3VLVideoProcessor
from .registry import TinyFamily
from .sizes import TEXT_HIDDEN_SIZE, VISION_HEADS, VISION_HIDDEN_SIZE, text_kwargs
from .tokenizer import QWEN_CHAT_TEMPLATE, rebuilt_tokenizer, special_token_ids

# GLM-4V's media tokens -> the shared tokenizer's token whose id they take
GLM_TOKENS = {
    "<|begin_of_image|>": "<|vision_start|>",
    "<|end_of_image|>": "<|vision_end|>",
    "<|image|>": "<|image_pad|>",
    "<|video|>": "<|video_pad|>",
    "<|begin_of_video|>": "<image>",
    "<|end_of_video|>": "<video>",
}
# the Qwen template with GLM-4V's media markup (the real one: "[gMASK]<sop><|user|>\n...")
GLM_CHAT_TEMPLATE = QWEN_CHAT_TEMPLATE.replace(
    "<|vision_start|><|image_pad|><|vision_end|>", "<|begin_of_image|><|image|><|end_of_image|>").replace(
    "<|vision_start|><|video_pad|><|vision_end|>", "<|begin_of_video|><|video|><|end_of_video|>")
# sums to the rotated half of head_dim / 2 = 4 frequencies (real GLM-4.1V: [8, 12, 12] of 32)
GLM_MROPE_SECTION = [2, 1, 1]


def glm_tokenizer(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """:func:`~.tokenizer.build_tokenizer`'s ``tokenizer`` with GLM-4V's media tokens renamed in (same ids)."""
    names = {shared: glm for glm, shared in GLM_TOKENS.items()}
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    for token in spec["added_tokens"]:
        token["content"] = names.get(token["content"], token["content"])
    spec["model"]["vocab"] = {names.get(token, token): i for token, i in spec["model"]["vocab"].items()}
    return rebuilt_tokenizer(tokenizer, Tokenizer.from_str(json.dumps(spec)), chat_template=GLM_CHAT_TEMPLATE)


class TinyGlm4vVideoProcessor(TinyQwen3VLVideoProcessor):
    """Reproduces ``Glm4vVideoProcessor`` on given frames: the resize and patching of Qwen3-VL's."""


class TinyGlm4vProcessor(TorchFreeProcessorMixin, Glm4vProcessor):
    """Stock :class:`~transformers.Glm4vProcessor` with a torchvision-free video processor."""


register_processor(TinyGlm4vProcessor, Glm4vImageProcessorPil, TinyGlm4vVideoProcessor)


def _config(config_class: type[PreTrainedConfig], text: dict[str, Any]) -> PreTrainedConfig:
    ids = special_token_ids()
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": GLM_MROPE_SECTION,
                               "partial_rotary_factor": 0.5}
    vision = dict(
        depth=2,
        hidden_size=VISION_HIDDEN_SIZE,
        intermediate_size=2 * VISION_HIDDEN_SIZE,
        num_heads=VISION_HEADS,
        image_size=8 * QWEN_PATCH_SIZE,  # an 8 x 8 grid of position embeddings, interpolated to each image
        patch_size=QWEN_PATCH_SIZE,
        spatial_merge_size=QWEN_MERGE_SIZE,
        temporal_patch_size=QWEN_TEMPORAL_PATCH_SIZE,
        out_hidden_size=TEXT_HIDDEN_SIZE,
    )
    return config_class(
        text_config=text,
        vision_config=vision,
        image_token_id=ids[GLM_TOKENS["<|image|>"]],
        video_token_id=ids[GLM_TOKENS["<|video|>"]],
        image_start_token_id=ids[GLM_TOKENS["<|begin_of_image|>"]],
        image_end_token_id=ids[GLM_TOKENS["<|end_of_image|>"]],
        video_start_token_id=ids[GLM_TOKENS["<|begin_of_video|>"]],
        video_end_token_id=ids[GLM_TOKENS["<|end_of_video|>"]],
        tie_word_embeddings=False,
    )


def _glm4v_config(config_class: type[PreTrainedConfig], num_hidden_layers: int,
                  image_size: int | None) -> PreTrainedConfig:
    return _config(config_class, text_kwargs(num_hidden_layers))


def _glm4v_moe_config(config_class: type[PreTrainedConfig], num_hidden_layers: int,
                      image_size: int | None) -> PreTrainedConfig:
    text = dict(text_kwargs(num_hidden_layers), n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                moe_intermediate_size=TEXT_HIDDEN_SIZE, first_k_dense_replace=1)
    return _config(config_class, text)


def _processor(tokenizer: PreTrainedTokenizerFast, image_size: int | None) -> TinyGlm4vProcessor:
    return qwen_processor(TinyGlm4vProcessor, glm_tokenizer(tokenizer), image_size,
                          image_processor_class=Glm4vImageProcessorPil, video_processor_class=TinyGlm4vVideoProcessor,
                          pixels_per_frame=QWEN_TEMPORAL_PATCH_SIZE, chat_template=GLM_CHAT_TEMPLATE)


GLM4V = TinyFamily("glm4v", Glm4vForConditionalGeneration, _glm4v_config, _processor)
GLM4V_MOE = TinyFamily("glm4v_moe", Glm4vMoeForConditionalGeneration, _glm4v_moe_config, _processor)
