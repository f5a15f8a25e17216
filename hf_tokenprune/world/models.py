"""The architectures trained on the toy world: real transformers classes at sizes a CPU trains in minutes.

* ``qwen2_vl``: Qwen2-VL (M-RoPE, dynamic resolution, images and videos). Patch 4, merge 2: one visual token
  per 8x8 pixels = one per world cell, so a 128x128 image (16x16 cells) gives 256 visual tokens, a video of 4
  distinct 64x64 frames (each shown twice, the temporal patch) 4 x 64 = 256.
* ``llava_onevision``: LLaVA-OneVision (SigLIP tower, anyres). 64-pixel SigLIP tiles with patch 8: a
  128x128 image gives a 64-token thumbnail (one token per 2x2 cells) plus 2x2 high-resolution tiles (256
  tokens, one per 8x8-pixel cell) and 16 row-newline tokens: 336 visual tokens.

Both use the offline word-level tokenizer of :mod:`hf_tokenprune.tiny` and the families' chat templates.
"""

from __future__ import annotations

from transformers import (
    GenerationConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from .. import tiny

FAMILIES = ("qwen2_vl", "llava_onevision")
TEXT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2)
QWEN_PATCH, QWEN_MERGE, QWEN_MAX_SIDE = 4, 2, 128
LLAVA_TILE, LLAVA_PATCH = 64, 8


def _check(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"the world models are {FAMILIES}, got {family!r}")


def build_config(family: str):
    """The model config of ``family``'s world model."""
    _check(family)
    text = dict(TEXT, vocab_size=len(tiny.build_tokenizer()), max_position_embeddings=2048, rms_norm_eps=1e-6,
                **tiny.text_token_ids())
    if family == "qwen2_vl":
        head_dim = TEXT["hidden_size"] // TEXT["num_attention_heads"]
        vision = dict(depth=2, embed_dim=64, hidden_size=TEXT["hidden_size"], mlp_ratio=2, num_heads=4,
                      patch_size=QWEN_PATCH, spatial_merge_size=QWEN_MERGE, temporal_patch_size=2)
        return tiny.qwen_config(Qwen2VLConfig, text, vision,
                                [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16])
    vision = dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, image_size=LLAVA_TILE, patch_size=LLAVA_PATCH, vision_use_head=False)
    return tiny.llava_onevision_config(text, vision, _pinpoints())


def _pinpoints() -> list[list[int]]:
    return [[i * LLAVA_TILE, j * LLAVA_TILE] for i in (1, 2) for j in (1, 2)]


def build_processor(family: str) -> ProcessorMixin:
    """The real transformers processor of ``family`` around the offline tokenizer."""
    _check(family)
    tokenizer = tiny.build_tokenizer()
    if family == "qwen2_vl":
        factor = QWEN_PATCH * QWEN_MERGE
        common = dict(size={"shortest_edge": 4 * factor * factor, "longest_edge": QWEN_MAX_SIDE * QWEN_MAX_SIDE},
                      patch_size=QWEN_PATCH, temporal_patch_size=2, merge_size=QWEN_MERGE)
        return tiny.TinyQwen2VLProcessor(
            image_processor=Qwen2VLImageProcessorPil(**common), tokenizer=tokenizer,
            video_processor=tiny.TinyQwen2VLVideoProcessor(**common), chat_template=tiny.QWEN_CHAT_TEMPLATE)
    return tiny.TinyLlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessorPil(size={"height": LLAVA_TILE, "width": LLAVA_TILE},
                                                        image_grid_pinpoints=_pinpoints()),
        tokenizer=tokenizer,
        video_processor=tiny.TinyLlavaOnevisionVideoProcessor(size={"height": LLAVA_TILE, "width": LLAVA_TILE}),
        num_image_tokens=(LLAVA_TILE // LLAVA_PATCH) ** 2, vision_feature_select_strategy="full",
        chat_template=tiny.LLAVA_ONEVISION_CHAT_TEMPLATE, vision_aspect_ratio="anyres_max_9")


def build_model(family: str, seed: int = 0) -> PreTrainedModel:
    """A freshly initialised world model (deterministic for ``seed``) with its generation config."""
    import torch

    config = build_config(family)
    cls = Qwen2VLForConditionalGeneration if family == "qwen2_vl" else LlavaOnevisionForConditionalGeneration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls._from_config(config, attn_implementation="sdpa")
    ids = tiny.special_token_ids()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"], eos_token_id=[ids["<|im_end|>"]], pad_token_id=ids["[PAD]"],
        do_sample=False, max_new_tokens=4)
    return model
