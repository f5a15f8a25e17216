"""Qwen3-VL (dense and MoE): the Qwen2-VL processing with per-frame video timestamps, interleaved M-RoPE, q/k norms
and DeepStack (features of vision-tower blocks added to the visual positions after the first decoder layers).

``image_size``: as for Qwen2-VL (:mod:`.qwen2_vl`, ``max_pixels = image_size**2``, default 112 -> at most 64 visual
tokens per image). Videos: each temporal group of two frames is its own ``<t seconds><|vision_start|>...`` run.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from transformers import (
    PreTrainedConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

from .processors import TorchFreeProcessorMixin, register_processor
from .qwen2_vl import (
    QWEN_MERGE_SIZE,
    QWEN_PATCH_SIZE,
    QWEN_TEMPORAL_PATCH_SIZE,
    TinyQwen2VLVideoProcessor,
    qwen_config,
    qwen_processor,
)
from .registry import TinyFamily
from .sizes import TEXT_HEAD_DIM, TEXT_HIDDEN_SIZE, VISION_HEADS, VISION_HIDDEN_SIZE, text_kwargs

# interleaved over head_dim / 2 = 8 frequencies: T at 0, 3, 6, 7, H at 1, 4, W at 2, 5 (real: [24, 20, 20] of 64)
QWEN3_MROPE_SECTION = [4, 2, 2]
# the vision block whose features DeepStack adds after decoder layer 0 (real Qwen3-VL: blocks 5, 11, 17 of 24 after
# layers 0, 1, 2); one, so that in-LLM baselines may prune from decoder layer 1 on
QWEN3_DEEPSTACK_INDEXES = [0]


class TinyQwen3VLVideoProcessor(TinyQwen2VLVideoProcessor):
    """Reproduces ``Qwen3VLVideoProcessor`` (the Qwen2-VL patching; ``smart_resize`` over all frames, uncapped)."""

    def _target_hw(self, frames: int, height: int, width: int) -> tuple[int, int]:
        return smart_resize(max(frames, self.temporal_patch_size), height, width,
                            temporal_factor=self.temporal_patch_size, factor=self.patch_size * self.merge_size,
                            min_pixels=self.size["shortest_edge"], max_pixels=self.size["longest_edge"])


class TinyQwen3VLProcessor(TorchFreeProcessorMixin, Qwen3VLProcessor):
    """Stock :class:`~transformers.Qwen3VLProcessor` with a torchvision-free video processor."""


register_processor(TinyQwen3VLProcessor, Qwen2VLImageProcessorPil, TinyQwen3VLVideoProcessor)


def _vision() -> dict[str, Any]:
    return dict(
        depth=2,
        hidden_size=VISION_HIDDEN_SIZE,
        intermediate_size=2 * VISION_HIDDEN_SIZE,
        num_heads=VISION_HEADS,
        patch_size=QWEN_PATCH_SIZE,
        spatial_merge_size=QWEN_MERGE_SIZE,
        temporal_patch_size=QWEN_TEMPORAL_PATCH_SIZE,
        out_hidden_size=TEXT_HIDDEN_SIZE,
        num_position_embeddings=64,  # an 8 x 8 grid, interpolated to each image's patch grid
        deepstack_visual_indexes=QWEN3_DEEPSTACK_INDEXES,
    )


def _qwen3_vl_config(config_class: type[PreTrainedConfig], num_hidden_layers: int,
                     image_size: int | None) -> PreTrainedConfig:
    text = dict(text_kwargs(num_hidden_layers), head_dim=TEXT_HEAD_DIM)
    return qwen_config(config_class, text, _vision(), QWEN3_MROPE_SECTION)


def _qwen3_vl_moe_config(config_class: type[PreTrainedConfig], num_hidden_layers: int,
                         image_size: int | None) -> PreTrainedConfig:
    text = dict(text_kwargs(num_hidden_layers), head_dim=TEXT_HEAD_DIM, num_experts=4, num_experts_per_tok=2,
                moe_intermediate_size=TEXT_HIDDEN_SIZE, tie_word_embeddings=False)
    return qwen_config(config_class, text, _vision(), QWEN3_MROPE_SECTION)


_processor = partial(qwen_processor, TinyQwen3VLProcessor, video_processor_class=TinyQwen3VLVideoProcessor)


QWEN3_VL = TinyFamily("qwen3_vl", Qwen3VLForConditionalGeneration, _qwen3_vl_config, _processor)
QWEN3_VL_MOE = TinyFamily("qwen3_vl_moe", Qwen3VLMoeForConditionalGeneration, _qwen3_vl_moe_config, _processor)
