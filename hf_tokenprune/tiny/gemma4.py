"""Gemma 4: variable-resolution images and video frames (patches pooled k x k), audio, a Gemma 4 text model with
per-layer inputs and sliding-window layers (``language_model``).

An image is resized, keeping its aspect ratio, to at most ``max_soft_tokens`` tokens and written
``<start_of_image>`` + one ``<image_soft_token>`` per token + ``<end_of_image>``; a video is its frames, each
``mm:ss <start_of_image>`` + ``<|video|>`` placeholders + ``<end_of_image>``; an audio clip ``<start_of_audio>`` +
``<audio_soft_token>`` placeholders + ``<end_of_audio>``. ``mm_token_type_ids`` marks them (1 image, 2 video, 3
audio); image and video tokens of one run attend to each other bidirectionally in the sliding-window layers.

The tiny sizes: patch 4, pooling 2 x 2, at most 70 tokens per image or frame (a 56 px image: 64 tokens), two text
layers (sliding, then global) with a 512-token window (tests narrow it), per-layer inputs of width 8, a one-layer
audio tower on 32 mel bins.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from transformers import Gemma4Config, Gemma4ForConditionalGeneration, PreTrainedTokenizerFast
from transformers.models.gemma4 import image_processing_pil_gemma4
from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
from transformers.models.gemma4.image_processing_pil_gemma4 import (
    Gemma4ImageProcessorPil,
    convert_image_to_patches,
    get_aspect_ratio_preserving_size,
    pad_along_first_dim,
)

from .processors import (
    TinyVideoProcessor,
    TorchFreeProcessorMixin,
    import_without_torchvision,
    per_prompt,
    register_processor,
    resize_frames,
)
from .registry import TinyFamily, added_token_ids
from .sizes import TEXT_HEAD_DIM, VISION_HEADS, VISION_HIDDEN_SIZE, text_kwargs
from .tokenizer import rebuilt_tokenizer

GEMMA4_TOKENS = ("<start_of_image>", "<end_of_image>", "<image_soft_token>", "<start_of_audio>", "<end_of_audio>",
                 "<audio_soft_token>", "<|video|>")
GEMMA4_PATCH_SIZE = 4
GEMMA4_POOLING = 2
GEMMA4_SOFT_TOKENS = 70  # the smallest budget the processors take

# Gemma 4's chat template shape (each image / video / audio a placeholder for the processor to expand) with the
# shared tokenizer's turn tokens and role words
GEMMA4_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image_soft_token>' }}"
    "{% elif item['type'] == 'video' %}{{ '<|video|>' }}{% elif item['type'] == 'audio' %}{{ '<audio_soft_token>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class TinyGemma4VideoProcessor(TinyVideoProcessor):
    """Reproduces ``Gemma4VideoProcessor`` with numpy + PIL: every frame resized keeping its aspect ratio to at most
    ``max_soft_tokens`` tokens, cut into patches, padded to the budget; all videos' frames in one batch."""

    model_input_names = ["pixel_values_videos", "video_position_ids", "num_frames_per_video"]

    def __init__(self, patch_size: int = 16, max_soft_tokens: int = 70, pooling_kernel_size: int = 3,
                 **kwargs) -> None:
        kwargs.setdefault("image_mean", [0.0, 0.0, 0.0])
        kwargs.setdefault("image_std", [1.0, 1.0, 1.0])
        super().__init__(**kwargs)
        self.patch_size, self.max_soft_tokens, self.pooling_kernel_size = patch_size, max_soft_tokens, \
            pooling_kernel_size

    def _process(self, videos: list[np.ndarray]) -> dict[str, Any]:
        max_patches = self.max_soft_tokens * self.pooling_kernel_size ** 2
        pixels, positions, tokens, frames = [], [], [], []
        for video in videos:
            height, width = get_aspect_ratio_preserving_size(video.shape[-2], video.shape[-1], self.patch_size,
                                                             max_patches, self.pooling_kernel_size)
            video = self._normalize(resize_frames(video, height, width))
            grid_x, grid_y = np.meshgrid(np.arange(width // self.patch_size), np.arange(height // self.patch_size),
                                         indexing="xy")
            real = np.stack([grid_x, grid_y], axis=-1).reshape(-1, 2)
            for frame in video:
                patches, where = pad_along_first_dim(convert_image_to_patches(frame, self.patch_size), real,
                                                     max_patches)
                pixels.append(patches)
                positions.append(where)
            tokens.append(len(real) // self.pooling_kernel_size ** 2)
            frames.append(len(video))
        return {"pixel_values_videos": np.stack(pixels), "video_position_ids": np.stack(positions),
                "num_frames_per_video": frames, "num_soft_tokens_per_video": tokens}


class TinyGemma4Processor(TorchFreeProcessorMixin, import_without_torchvision(
        "transformers.models.gemma4.processing_gemma4", "Gemma4Processor",
        "transformers.models.gemma4.image_processing_gemma4", image_processing_pil_gemma4)):
    """Stock :class:`~transformers.Gemma4Processor` with a torchvision-free video processor; it also takes the images
    of a batch as one flat list, split over the prompts by their image placeholders (the stock one wants a list per
    prompt)."""

    def prepare_inputs_layout(self, images=None, text=None, videos=None, audio=None, **kwargs):
        return super().prepare_inputs_layout(images=per_prompt(images, text, self.image_token), text=text,
                                             videos=videos, audio=audio, **kwargs)


register_processor(TinyGemma4Processor, Gemma4ImageProcessorPil, TinyGemma4VideoProcessor)


def gemma4_tokenizer(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """``tokenizer`` (with :data:`GEMMA4_TOKENS` added) naming the tokens ``Gemma4Processor`` reads."""
    return rebuilt_tokenizer(tokenizer, extra_special_tokens={
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>",
        "boa_token": "<start_of_audio>", "eoa_token": "<end_of_audio>", "audio_token": "<audio_soft_token>"})


def _config(config_class: type[Gemma4Config], num_hidden_layers: int, image_size: int | None) -> Gemma4Config:
    if image_size is not None:
        raise ValueError("the tiny Gemma 4 resizes every image to its token budget: image_size is not taken")
    ids = added_token_ids(GEMMA4_TOKENS)
    text = text_kwargs(num_hidden_layers)
    vocab = text["vocab_size"] + len(GEMMA4_TOKENS)
    text.update(model_type="gemma4_text", vocab_size=vocab, vocab_size_per_layer_input=vocab,
                hidden_size_per_layer_input=8, head_dim=TEXT_HEAD_DIM, sliding_window=512,
                use_bidirectional_attention="vision",
                layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_hidden_layers)])
    vision = dict(hidden_size=VISION_HIDDEN_SIZE, intermediate_size=2 * VISION_HIDDEN_SIZE, num_hidden_layers=2,
                  num_attention_heads=VISION_HEADS, num_key_value_heads=VISION_HEADS,
                  head_dim=VISION_HIDDEN_SIZE // VISION_HEADS, patch_size=GEMMA4_PATCH_SIZE,
                  pooling_kernel_size=GEMMA4_POOLING, position_embedding_size=64)
    audio = dict(hidden_size=VISION_HIDDEN_SIZE, num_hidden_layers=1, num_attention_heads=VISION_HEADS,
                 subsampling_conv_channels=[32, 4], output_proj_dims=VISION_HIDDEN_SIZE)  # 32 mel bins
    return config_class(text_config=text, vision_config=vision, audio_config=audio,
                        boi_token_id=ids["<start_of_image>"], eoi_token_id=ids["<end_of_image>"],
                        image_token_id=ids["<image_soft_token>"], video_token_id=ids["<|video|>"],
                        boa_token_id=ids["<start_of_audio>"], eoa_token_index=ids["<end_of_audio>"],
                        audio_token_id=ids["<audio_soft_token>"], tie_word_embeddings=False)


def _processor(tokenizer: PreTrainedTokenizerFast, image_size: int | None) -> TinyGemma4Processor:
    budget = dict(patch_size=GEMMA4_PATCH_SIZE, max_soft_tokens=GEMMA4_SOFT_TOKENS,
                  pooling_kernel_size=GEMMA4_POOLING)
    return TinyGemma4Processor(feature_extractor=Gemma4AudioFeatureExtractor(feature_size=32),
                               image_processor=Gemma4ImageProcessorPil(**budget), tokenizer=gemma4_tokenizer(tokenizer),
                               video_processor=TinyGemma4VideoProcessor(**budget), chat_template=GEMMA4_CHAT_TEMPLATE,
                               image_seq_length=GEMMA4_SOFT_TOKENS)


GEMMA4 = TinyFamily("gemma4", Gemma4ForConditionalGeneration, _config, _processor, tokens=GEMMA4_TOKENS,
                    eager=("audio_config",))
