"""Qwen3.5 (dense and MoE): Qwen3-VL's processor and vision tower (no DeepStack), a hybrid Gated-DeltaNet / softmax
text model.

Three of every four decoder layers are Gated DeltaNet linear attention (causal conv1d + gated delta-rule recurrence),
the fourth full softmax attention with gated queries, q/k norms and partial (a quarter of the head) interleaved
M-RoPE. The tiny model keeps that pattern; with fewer than four layers the last one is the full-attention layer, so
the default two-layer model has one of each. Videos: Qwen3-VL's processor writes every temporal patch as its own
``<t seconds><|vision_start|>...<|vision_end|>`` run, so one video is several placeholder runs.

``image_size``: as for Qwen2-VL (``max_pixels = image_size**2``, default 112 -> at most 64 visual tokens per image).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from transformers import PreTrainedConfig, Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration

from .qwen2_vl import QWEN_MERGE_SIZE, QWEN_PATCH_SIZE, QWEN_TEMPORAL_PATCH_SIZE
from .qwen3_vl import _processor
from .registry import TinyFamily
from .sizes import TEXT_HIDDEN_SIZE, VISION_HEADS, VISION_HIDDEN_SIZE, text_kwargs
from .tokenizer import special_token_ids

QWEN3_5_HEAD_DIM = 32  # full attention: 8 of 32 dims rotate (partial_rotary_factor 0.25, as the real models)
QWEN3_5_MROPE_SECTION = [2, 1, 1]  # sums to the rotary half-dim 4 (real: [11, 11, 10] for 64 rotary dims)
QWEN3_5_FULL_ATTENTION_INTERVAL = 4  # layers 3, 7, ... are full attention, as in every real Qwen3.5


def qwen3_5_text(num_hidden_layers: int) -> dict[str, Any]:
    """The tiny hybrid ``text_config``: GQA full attention (4 heads, 2 KV, head dim 32) and Gated DeltaNet layers
    (2 key heads and 4 value heads of 16 dims, conv kernel 4); the full-attention layers are every fourth, or the last
    one where there are fewer than four."""
    text = text_kwargs(num_hidden_layers)
    interval = min(QWEN3_5_FULL_ATTENTION_INTERVAL, num_hidden_layers)
    text.update(
        head_dim=QWEN3_5_HEAD_DIM, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
        linear_value_head_dim=16, linear_conv_kernel_dim=4,
        layer_types=["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                     for i in range(num_hidden_layers)],
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": QWEN3_5_MROPE_SECTION,
                         "mrope_interleaved": True, "partial_rotary_factor": 0.25},
    )
    return text


def _config(config_class: type[PreTrainedConfig], num_hidden_layers: int, image_size: int | None, *,
            moe: bool) -> PreTrainedConfig:
    ids = special_token_ids()
    text = qwen3_5_text(num_hidden_layers)
    if moe:
        text.pop("intermediate_size")
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                    shared_expert_intermediate_size=32)
    vision = dict(depth=2, hidden_size=VISION_HIDDEN_SIZE, intermediate_size=2 * VISION_HIDDEN_SIZE,
                  num_heads=VISION_HEADS, patch_size=QWEN_PATCH_SIZE, spatial_merge_size=QWEN_MERGE_SIZE,
                  temporal_patch_size=QWEN_TEMPORAL_PATCH_SIZE, out_hidden_size=TEXT_HIDDEN_SIZE,
                  num_position_embeddings=64)
    return config_class(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)


QWEN3_5 = TinyFamily("qwen3_5", Qwen3_5ForConditionalGeneration, partial(_config, moe=False), _processor)
QWEN3_5_MOE = TinyFamily("qwen3_5_moe", Qwen3_5MoeForConditionalGeneration, partial(_config, moe=True), _processor)
