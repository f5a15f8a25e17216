"""Qwen2-VL and Qwen2.5-VL: patch-merging vision tower, M-RoPE text model, a numpy video processor.

``image_size``: the side of the largest square image kept at full resolution (``max_pixels = image_size**2``,
default 112 -> at most 64 visual tokens per image); the model does not depend on it.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import numpy as np
from transformers import (
    PreTrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize
from transformers.processing_utils import ProcessorMixin

from .processors import TinyVideoProcessor, TorchFreeProcessorMixin, register_processor, resize_frames
from .registry import TinyFamily
from .sizes import TEXT_HIDDEN_SIZE, VISION_HEADS, VISION_HIDDEN_SIZE, text_kwargs
from .tokenizer import QWEN_CHAT_TEMPLATE, special_token_ids

# Patch 7 and merge 2 -> one visual token per 14x14 pixels (the real models: 28x28).
QWEN_PATCH_SIZE = 7
QWEN_MERGE_SIZE = 2
QWEN_TEMPORAL_PATCH_SIZE = 2
QWEN_MIN_PIXELS = 28 * 28  # >= 4 visual tokens
QWEN_DEFAULT_IMAGE_SIZE = 112  # max_pixels = 112*112 -> <= 64 visual tokens per image / per 2 video frames
MROPE_SECTION = [2, 3, 3]  # sums to head_dim / 2 = 8 (real 7B: [16, 24, 24] for head_dim 128)


class TinyQwen2VLVideoProcessor(TinyVideoProcessor):
    """Reproduces ``Qwen2VLVideoProcessor`` (smart_resize, temporal patching) with numpy + PIL."""

    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __init__(
        self,
        size: dict[str, int] | None = None,
        patch_size: int = 14,
        temporal_patch_size: int = 2,
        merge_size: int = 2,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        default_size = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}
        self.size = dict(size) if size is not None else default_size
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.merge_size = merge_size

    def _target_hw(self, frames: int, height: int, width: int) -> tuple[int, int]:
        """The resized frame size of a ``frames``-frame video (Qwen2-VL resizes each frame alone)."""
        return smart_resize(
            height,
            width,
            factor=self.patch_size * self.merge_size,
            min_pixels=self.size["shortest_edge"],
            max_pixels=self.size["longest_edge"],
        )

    def _process(self, videos: list[np.ndarray]) -> dict[str, Any]:
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        all_patches, grids = [], []
        for video in videos:
            height, width = self._target_hw(len(video), *video.shape[-2:])
            video = self._normalize(resize_frames(video, height, width))
            if pad := -video.shape[0] % tp:  # repeat the last frame, like the stock processor
                video = np.concatenate([video, np.repeat(video[-1:], pad, axis=0)], axis=0)
            frames, channels = video.shape[:2]
            gt, gh, gw = frames // tp, height // p, width // p
            patches = video.reshape(gt, tp, channels, gh // m, m, p, gw // m, m, p)
            patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
            all_patches.append(patches.reshape(gt * gh * gw, channels * tp * p * p))
            grids.append([gt, gh, gw])
        return {
            "pixel_values_videos": np.concatenate(all_patches, axis=0),
            "video_grid_thw": np.asarray(grids, dtype=np.int64),
        }

    def get_num_of_video_patches(self, num_frames: int, height: int, width: int, videos_kwargs=None) -> int:
        height, width = self._target_hw(num_frames, height, width)
        grid_t = math.ceil(num_frames / self.temporal_patch_size)
        return grid_t * (height // self.patch_size) * (width // self.patch_size)


class TinyQwen2VLProcessor(TorchFreeProcessorMixin, Qwen2VLProcessor):
    """Stock :class:`~transformers.Qwen2VLProcessor` with a torchvision-free video processor."""


class TinyQwen2_5_VLProcessor(TorchFreeProcessorMixin, Qwen2_5_VLProcessor):
    """Stock :class:`~transformers.Qwen2_5_VLProcessor` with a torchvision-free video processor."""


register_processor(TinyQwen2VLProcessor, Qwen2VLImageProcessorPil, TinyQwen2VLVideoProcessor)
register_processor(TinyQwen2_5_VLProcessor, Qwen2VLImageProcessorPil, TinyQwen2VLVideoProcessor)


def qwen_config(config_class: type[PreTrainedConfig], text: dict[str, Any], vision: dict[str, Any],
                mrope_section: list[int]) -> PreTrainedConfig:
    """A Qwen2-VL / Qwen2.5-VL config (``config_class``) wired to :func:`build_tokenizer`'s special tokens.

    Sets M-RoPE (``rope_theta`` 1e4, ``mrope_section``) on ``text`` (in place) and the image/video/vision
    start/end token ids on the config; untied embeddings.  Shared with :mod:`hf_tokenprune.world.models`.
    """
    ids = special_token_ids()
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": mrope_section}
    return config_class(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


# The vision-tower settings the two families share.
_VISION = dict(
    depth=2,
    num_heads=VISION_HEADS,
    patch_size=QWEN_PATCH_SIZE,
    spatial_merge_size=QWEN_MERGE_SIZE,
    temporal_patch_size=QWEN_TEMPORAL_PATCH_SIZE,
)


def _qwen2_vl_config(config_class: type[PreTrainedConfig], num_hidden_layers: int,
                     image_size: int | None) -> PreTrainedConfig:
    vision = dict(
        _VISION,
        embed_dim=VISION_HIDDEN_SIZE,
        hidden_size=TEXT_HIDDEN_SIZE,  # merger output = LLM hidden size
        mlp_ratio=2,
    )
    return qwen_config(config_class, text_kwargs(num_hidden_layers), vision, MROPE_SECTION)


def _qwen2_5_vl_config(config_class: type[PreTrainedConfig], num_hidden_layers: int,
                       image_size: int | None) -> PreTrainedConfig:
    vision = dict(
        _VISION,
        hidden_size=VISION_HIDDEN_SIZE,
        intermediate_size=2 * VISION_HIDDEN_SIZE,
        window_size=4 * QWEN_PATCH_SIZE * QWEN_MERGE_SIZE,  # 4x4 merged-token windows (real: 112 / 28)
        fullatt_block_indexes=[1],
        out_hidden_size=TEXT_HIDDEN_SIZE,
        tokens_per_second=2,
    )
    return qwen_config(config_class, text_kwargs(num_hidden_layers), vision, MROPE_SECTION)


def qwen_processor(processor_class: type[ProcessorMixin], tokenizer: PreTrainedTokenizerFast, image_size: int | None,
                   *, image_processor_class: type = Qwen2VLImageProcessorPil,
                   video_processor_class: type[TinyQwen2VLVideoProcessor] = TinyQwen2VLVideoProcessor,
                   pixels_per_frame: int = 1, chat_template: str = QWEN_CHAT_TEMPLATE) -> ProcessorMixin:
    """A Qwen-style processor (patch 7, 2x2 merge, 2-frame temporal patches; Qwen3-VL and GLM-4V too) with at most
    ``image_size**2`` pixels per image (``pixels_per_frame``: GLM's resize counts both frames of a temporal patch)."""
    image_size = image_size or QWEN_DEFAULT_IMAGE_SIZE
    common = dict(
        size={"shortest_edge": pixels_per_frame * QWEN_MIN_PIXELS,
              "longest_edge": pixels_per_frame * image_size * image_size},
        patch_size=QWEN_PATCH_SIZE,
        temporal_patch_size=QWEN_TEMPORAL_PATCH_SIZE,
        merge_size=QWEN_MERGE_SIZE,
    )
    return processor_class(
        image_processor=image_processor_class(**common),
        tokenizer=tokenizer,
        video_processor=video_processor_class(**common),
        chat_template=chat_template,
    )


QWEN2_VL = TinyFamily("qwen2_vl", Qwen2VLForConditionalGeneration, _qwen2_vl_config,
                      partial(qwen_processor, TinyQwen2VLProcessor))
QWEN2_5_VL = TinyFamily("qwen2_5_vl", Qwen2_5_VLForConditionalGeneration, _qwen2_5_vl_config,
                        partial(qwen_processor, TinyQwen2_5_VLProcessor))
