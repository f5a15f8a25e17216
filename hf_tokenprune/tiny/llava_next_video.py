"""LLaVA-NeXT-Video: LLaVA-NeXT's anyres images plus videos whose frames are average-pooled 2 x 2 before the LLM.

``image_size``: the CLIP tile size, as for :mod:`.llava_next` (default 28); a video frame is resized (shortest edge)
and center-cropped to one tile: 4 x 4 patch features pooled to 2 x 2 = 4 tokens per frame, no newline tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from transformers import (
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaNextVideoProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from .llava import clip_processor_kwargs
from .llava_next import (
    LLAVA_NEXT_DEFAULT_IMAGE_SIZE,
    LLAVA_NEXT_PATCH_SIZE,
    llava_next_image_processor,
    llava_next_parts,
    llava_next_pinpoints,
)
from .processors import TinyVideoProcessor, TorchFreeProcessorMixin, register_processor, resize_frames
from .registry import TinyFamily
from .tokenizer import LLAVA_ONEVISION_CHAT_TEMPLATE, special_token_ids


class TinyLlavaNextVideoVideoProcessor(TinyVideoProcessor):
    """Reproduces ``LlavaNextVideoVideoProcessor`` (every frame resized to ``size["shortest_edge"]``, aspect kept,
    then center-cropped to ``crop_size``, as torchvision does) with numpy + PIL."""

    def __init__(self, size: dict[str, int] | None = None, crop_size: dict[str, int] | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.size = dict(size) if size is not None else {"shortest_edge": 224}
        self.crop_size = dict(crop_size) if crop_size is not None else {"height": 224, "width": 224}

    def _frames(self, video: np.ndarray) -> np.ndarray:
        height, width = video.shape[-2:]
        short = self.size["shortest_edge"]
        if height <= width:
            new_h, new_w = short, int(short * width / height)
        else:
            new_h, new_w = int(short * height / width), short
        video = resize_frames(video, new_h, new_w)
        crop_h, crop_w = self.crop_size["height"], self.crop_size["width"]
        top, left = int(round((new_h - crop_h) / 2.0)), int(round((new_w - crop_w) / 2.0))
        return self._normalize(video[..., top:top + crop_h, left:left + crop_w])

    def _process(self, videos: list[np.ndarray]) -> dict[str, Any]:
        out = [self._frames(v) for v in videos]
        if len({v.shape for v in out}) == 1:
            return {"pixel_values_videos": np.stack(out)}
        return {"pixel_values_videos": out}


class TinyLlavaNextVideoProcessor(TorchFreeProcessorMixin, LlavaNextVideoProcessor):
    """Stock :class:`~transformers.LlavaNextVideoProcessor` with a torchvision-free video processor."""


register_processor(TinyLlavaNextVideoProcessor, LlavaNextImageProcessorPil, TinyLlavaNextVideoVideoProcessor)


def _config(config_class: type[LlavaNextVideoConfig], num_hidden_layers: int,
            image_size: int | None) -> LlavaNextVideoConfig:
    image_size = image_size or LLAVA_NEXT_DEFAULT_IMAGE_SIZE
    text, vision = llava_next_parts(num_hidden_layers, image_size)
    text.update(model_type="llama")  # LLaVA-NeXT-Video-7B: Vicuna
    side = image_size // LLAVA_NEXT_PATCH_SIZE
    ids = special_token_ids()
    return config_class(
        text_config=text,
        vision_config=vision,
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        image_grid_pinpoints=llava_next_pinpoints(image_size),
        image_seq_length=side**2,
        video_seq_length=(side // 2) ** 2,
        spatial_pool_mode="average",
        spatial_pool_stride=2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=False,
    )


def _processor(tokenizer: PreTrainedTokenizerFast, image_size: int | None) -> TinyLlavaNextVideoProcessor:
    image_size = image_size or LLAVA_NEXT_DEFAULT_IMAGE_SIZE
    video_processor = TinyLlavaNextVideoVideoProcessor(size={"shortest_edge": image_size},
                                                       crop_size={"height": image_size, "width": image_size})
    return TinyLlavaNextVideoProcessor(
        video_processor=video_processor,
        image_processor=llava_next_image_processor(image_size),
        tokenizer=tokenizer,
        chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE,
        **clip_processor_kwargs(LLAVA_NEXT_PATCH_SIZE),
    )


LLAVA_NEXT_VIDEO = TinyFamily("llava_next_video", LlavaNextVideoForConditionalGeneration, _config, _processor)
