"""Tiny random-weight VLMs with real transformers processors, built fully offline.

Everything here is constructed in code: a word-level tokenizer (``tokenizers``), the slow/PIL image processors
of the real architectures, tiny configs of the real model classes with random weights.  Nothing is downloaded,
so tests and demos can run the complete ``processor(...) -> model.generate(...)`` and
``pipeline("image-text-to-text", ...)`` flows on CPU in well under a second per call.

Families: ``qwen2_vl`` (Qwen2VLForConditionalGeneration), ``qwen2_5_vl`` (Qwen2_5_VLForConditionalGeneration),
``llava_onevision`` (LlavaOnevisionForConditionalGeneration, SigLIP vision tower + Qwen2 text model), ``llava``
(LLaVA-1.5: LlavaForConditionalGeneration, CLIP vision tower + Llama text model; images only, see
:data:`MODALITIES`).

Video without torchvision
-------------------------
transformers' video processors (``Qwen2VLVideoProcessor``, ``LlavaOnevisionVideoProcessor``) derive from
``BaseVideoProcessor`` which requires torchvision, and without torchvision the stock processors cannot be
constructed at all (``ProcessorMixin.check_argument_for_proper_class`` looks ``VideoProcessorMixin`` up on the
top-level ``transformers`` module, which only exports it when torchvision is installed, and ``None`` is not
accepted for ``video_processor`` either).  We therefore use thin subclasses of the stock processors
(``TinyQwen2VLProcessor``, ``TinyQwen2_5_VLProcessor``, ``TinyLlavaOnevisionProcessor``) that only change the
video-processor plumbing, plus small numpy/PIL video processors that reproduce the stock video processors'
outputs (``pixel_values_videos``/``video_grid_thw`` for Qwen, ``pixel_values_videos`` of shape
``(videos, frames, C, H, W)`` for LLaVA-OneVision).  Token expansion, chat templates, ``mm_token_type_ids``
and image processing are the unmodified stock code.  The subclasses are registered with ``AutoProcessor`` on
import, so ``AutoProcessor.from_pretrained(dir)`` works after ``save_pretrained(dir)`` once this module is
imported.  LLaVA-1.5 has no video processor; its ``TinyLlavaProcessor`` only shares the reloading of the PIL
image processor (the saved type name drops the "Pil" suffix).
"""

from __future__ import annotations

import inspect
import math
import random
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize
from transformers.processing_utils import ProcessorMixin
from transformers.video_processing_utils import VideoProcessorMixin
from transformers.video_utils import VideoMetadata, make_batched_videos

__all__ = [
    "FAMILIES",
    "MODALITIES",
    "SPECIAL_TOKENS",
    "WORDS",
    "QWEN_CHAT_TEMPLATE",
    "LLAVA_ONEVISION_CHAT_TEMPLATE",
    "LLAVA_CHAT_TEMPLATE",
    "TinyQwen2VLVideoProcessor",
    "TinyLlavaOnevisionVideoProcessor",
    "TinyQwen2VLProcessor",
    "TinyQwen2_5_VLProcessor",
    "TinyLlavaOnevisionProcessor",
    "TinyLlavaProcessor",
    "build_tokenizer",
    "build_processor",
    "build_model",
    "build",
    "make_image",
    "make_video",
    "special_token_ids",
]

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava_onevision", "llava")

# The input kinds each family's model and processor accept (LLaVA-1.5 has no video input).
MODALITIES: dict[str, tuple[str, ...]] = {
    "qwen2_vl": ("image", "video"),
    "qwen2_5_vl": ("image", "video"),
    "llava_onevision": ("image", "video"),
    "llava": ("image",),
}

# ----------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------

# Fixed, documented ids: position in this tuple == token id.
SPECIAL_TOKENS = (
    "[PAD]",  # 0  pad
    "[UNK]",  # 1  unk
    "<|endoftext|>",  # 2  bos (Qwen style, never added automatically) and secondary eos
    "<|im_start|>",  # 3
    "<|im_end|>",  # 4  eos
    "<|vision_start|>",  # 5  Qwen vision_start_token_id
    "<|vision_end|>",  # 6  Qwen vision_end_token_id
    "<|image_pad|>",  # 7  Qwen image_token_id
    "<|video_pad|>",  # 8  Qwen video_token_id
    "<image>",  # 9  LLaVA-OneVision / LLaVA-1.5 image_token_index
    "<video>",  # 10 LLaVA-OneVision video_token_index
)

_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "orange": (245, 140, 30),
    "purple": (130, 50, 170),
    "pink": (240, 130, 180),
    "brown": (130, 80, 40),
    "black": (15, 15, 15),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "cyan": (40, 200, 210),
    "magenta": (210, 40, 200),
}
_SHAPES = ("circle", "square", "triangle", "rectangle", "ellipse", "star", "line", "dot", "oval", "cross")

WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        [
            *_COLOURS,
            "grey",
            "colour",
            "color",
            "colours",
            "colors",
            *_SHAPES,
            "shape",
            "shapes",
            # question words / function words
            "what",
            "which",
            "where",
            "who",
            "how",
            "why",
            "when",
            "is",
            "are",
            "was",
            "the",
            "a",
            "an",
            "of",
            "in",
            "on",
            "at",
            "to",
            "and",
            "or",
            "not",
            "no",
            "yes",
            "it",
            "its",
            "this",
            "that",
            "there",
            "these",
            "those",
            "with",
            "without",
            "only",
            "also",
            "both",
            "each",
            "every",
            "all",
            "some",
            "any",
            "more",
            "less",
            "most",
            "least",
            "same",
            "different",
            "than",
            "as",
            "for",
            "from",
            "by",
            "be",
            # spatial
            "left",
            "right",
            "top",
            "bottom",
            "middle",
            "center",
            "centre",
            "above",
            "below",
            "next",
            "beside",
            "between",
            "near",
            "far",
            "side",
            "corner",
            "edge",
            "inside",
            "outside",
            "behind",
            "front",
            "back",
            "up",
            "down",
            "over",
            "under",
            "background",
            "foreground",
            # sizes / counting
            "big",
            "small",
            "large",
            "tiny",
            "many",
            "much",
            "count",
            "number",
            "size",
            "first",
            "second",
            "third",
            "last",
            "zero",
            "one",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
            *[str(d) for d in range(10)],
            "x",
            # media
            "image",
            "images",
            "picture",
            "photo",
            "video",
            "frame",
            "frames",
            "object",
            "objects",
            "thing",
            "things",
            # verbs
            "see",
            "show",
            "shows",
            "describe",
            "tell",
            "me",
            "you",
            "i",
            "can",
            "do",
            "does",
            "has",
            "have",
            "contains",
            "contain",
            "look",
            "looks",
            "move",
            "moves",
            "moving",
            "answer",
            "question",
            "please",
            "thanks",
            "hello",
            # chat roles / system prompt
            "system",
            "user",
            "assistant",
            "helpful",
            # punctuation (the pre-tokenizer isolates every punctuation character)
            "?",
            ".",
            ",",
            "!",
            ":",
            ";",
            "'",
            '"',
            "(",
            ")",
            "-",
            "/",
            # the toy VQA world (hf_tokenprune.world): appended, so earlier ids never change
            "diamond",
            "is",
            "the",
            "of",
            "left",
            "right",
            "above",
            "below",
            "object",
            "objects",
            "frame",
            "shows",
            "one",
            "two",
            "three",
            "four",
            "small",
            "large",
            "many",
            "are",
            "there",
            "all",
            "yes",
            "no",
            "in",
            *"0123456789",
        ]
    )
)

# Mirrors the chat template shipped with Qwen/Qwen2-VL-*-Instruct and Qwen2.5-VL-*-Instruct.
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Mirrors the chat template shipped with llava-hf/llava-onevision-qwen2-*-hf (images first, then videos, then
# text), plus plain-string content support.
LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% if message['content'] is string %}{{ '\n' + message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\n' + content['text'] }}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# LLaVA-1.5 (images only): the LLaVA-OneVision template without the video items.  The real llava-1.5-hf
# template is "USER: <image>\n... ASSISTANT:"; the <|im_start|>/<|im_end|> turns keep the shared tokenizer's eos
# as the end-of-turn token, like the other families.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% if message['content'] is string %}{{ '\n' + message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\n' + content['text'] }}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer (lower-cased; whitespace/punctuation/digit split) with both families' specials.

    Token ids are fixed: ``SPECIAL_TOKENS[i]`` has id ``i``, ``WORDS[j]`` has id ``len(SPECIAL_TOKENS) + j``.
    Decoding joins words with single spaces.
    """
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *WORDS))}
    assert len(vocab) == len(SPECIAL_TOKENS) + len(WORDS), "duplicate vocabulary entries"
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        eos_token="<|im_end|>",
        model_max_length=4096,
        padding_side="right",
        chat_template=QWEN_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    return tokenizer


def special_token_ids() -> dict[str, int]:
    """Token -> id for every special token of :func:`build_tokenizer`."""
    return {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}


# ----------------------------------------------------------------------------------------------------
# torch(vision)-free video processors
# ----------------------------------------------------------------------------------------------------


def _frames_to_float(video: Any) -> np.ndarray:
    """One video (T frames; PIL list, THWC/TCHW array or tensor) -> float32 array (T, C, H, W) in [0, 255]."""
    if isinstance(video, (list, tuple)):
        video = np.stack(
            [np.asarray(f.convert("RGB") if isinstance(f, PIL.Image.Image) else f) for f in video]
        )
    if isinstance(video, torch.Tensor):
        video = video.detach().cpu().numpy()
    video = np.asarray(video)
    if video.ndim != 4:
        raise ValueError(f"expected a 4D video (frames, H, W, C) or (frames, C, H, W), got {video.shape}")
    if video.shape[-1] in (1, 3, 4) and video.shape[1] not in (1, 3, 4):
        video = video.transpose(0, 3, 1, 2)
    if video.shape[1] == 1:
        video = np.repeat(video, 3, axis=1)
    elif video.shape[1] == 4:
        video = video[:, :3]
    if np.issubdtype(video.dtype, np.floating) and video.size and video.max() <= 1.0:
        return video.astype(np.float32) * 255.0  # float video in [0, 1]
    return video.astype(np.float32)


def _resize_frames(video: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic PIL resize of every frame of a (T, C, H, W) [0, 255] float video."""
    if video.shape[-2:] == (height, width):
        return video
    out = []
    for frame in video:
        img = PIL.Image.fromarray(np.clip(frame.transpose(1, 2, 0), 0, 255).round().astype(np.uint8))
        img = img.resize((width, height), resample=PIL.Image.Resampling.BICUBIC)
        out.append(np.asarray(img, dtype=np.float32).transpose(2, 0, 1))
    return np.stack(out)


class _TinyVideoProcessorBase(VideoProcessorMixin):
    """Numpy/PIL video processor base (``VideoProcessorMixin`` without the torchvision backend)."""

    model_input_names = ["pixel_values_videos"]

    def __init__(
        self,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        rescale_factor: float = 1 / 255,
        **kwargs,
    ) -> None:
        kwargs.pop("video_processor_type", None)
        kwargs.pop("image_processor_type", None)
        super().__init__(**kwargs)
        self.image_mean = list(image_mean if image_mean is not None else OPENAI_CLIP_MEAN)
        self.image_std = list(image_std if image_std is not None else OPENAI_CLIP_STD)
        self.rescale_factor = rescale_factor

    def _normalize(self, video: np.ndarray) -> np.ndarray:
        mean = np.asarray(self.image_mean, dtype=np.float32)[None, :, None, None]
        std = np.asarray(self.image_std, dtype=np.float32)[None, :, None, None]
        return ((video * self.rescale_factor - mean) / std).astype(np.float32)

    def __call__(self, videos, **kwargs) -> BatchFeature:
        return self.preprocess(videos, **kwargs)

    def preprocess(
        self,
        videos,
        return_tensors: str | None = None,
        return_metadata: bool = False,
        video_metadata=None,
        do_sample_frames: bool | None = None,
        num_frames: int | None = None,
        **kwargs,
    ) -> BatchFeature:
        """``videos``: one video or a batch (PIL frame lists, 4D arrays/tensors).  Other stock video kwargs
        (``fps``, ``size``, ...) are accepted and ignored; ``num_frames`` samples frames uniformly."""
        arrays = [_frames_to_float(v) for v in make_batched_videos(videos)]
        totals = [len(v) for v in arrays]
        indices = [list(range(n)) for n in totals]
        if do_sample_frames and num_frames:
            indices = [np.linspace(0, len(v) - 1, num_frames).round().astype(int).tolist() for v in arrays]
            arrays = [v[idx] for v, idx in zip(arrays, indices, strict=True)]
        data = self._process(arrays)
        if return_metadata:
            if video_metadata is None:
                video_metadata = [
                    VideoMetadata(
                        total_num_frames=total,
                        fps=None,
                        height=int(v.shape[-2]),
                        width=int(v.shape[-1]),
                        frames_indices=idx,
                    )
                    for v, idx, total in zip(arrays, indices, totals, strict=True)
                ]
            elif isinstance(video_metadata, (dict, VideoMetadata)):
                video_metadata = [video_metadata]
            data["video_metadata"] = [
                m if isinstance(m, VideoMetadata) else VideoMetadata(**m) for m in video_metadata
            ]
        return BatchFeature(data=data, tensor_type=return_tensors, skip_tensor_conversion=["video_metadata"])

    def _process(self, videos: list[np.ndarray]) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError


class TinyQwen2VLVideoProcessor(_TinyVideoProcessorBase):
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

    def _target_hw(self, height: int, width: int) -> tuple[int, int]:
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
            height, width = self._target_hw(*video.shape[-2:])
            video = self._normalize(_resize_frames(video, height, width))
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
        height, width = self._target_hw(height, width)
        grid_t = math.ceil(num_frames / self.temporal_patch_size)
        return grid_t * (height // self.patch_size) * (width // self.patch_size)


class TinyLlavaOnevisionVideoProcessor(_TinyVideoProcessorBase):
    """Reproduces ``LlavaOnevisionVideoProcessor`` (resize every frame to ``size``) with numpy + PIL."""

    def __init__(self, size: dict[str, int] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.size = dict(size) if size is not None else {"height": 384, "width": 384}

    def _process(self, videos: list[np.ndarray]) -> dict[str, Any]:
        out = [self._normalize(_resize_frames(v, self.size["height"], self.size["width"])) for v in videos]
        if len({v.shape for v in out}) == 1:
            return {"pixel_values_videos": np.stack(out)}
        return {"pixel_values_videos": out}


# `PilBackend.to_dict` saves "Qwen2VLImageProcessorPil" as "Qwen2VLImageProcessor", so map both names.
_IMAGE_PROCESSOR_CLASSES = {
    name: cls
    for cls in (Qwen2VLImageProcessorPil, LlavaOnevisionImageProcessorPil, CLIPImageProcessorPil)
    for name in (cls.__name__, cls.__name__.removesuffix("Pil"))
}
_VIDEO_PROCESSOR_CLASSES = {
    cls.__name__: cls for cls in (TinyQwen2VLVideoProcessor, TinyLlavaOnevisionVideoProcessor)
}


class _TorchFreeVideoProcessorMixin:
    """Lets a stock processor hold one of our numpy video processors and reload it in ``from_pretrained``;
    the image processor is always reloaded as its PIL class (processors without video use only that part)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor":
            if not isinstance(argument, VideoProcessorMixin):
                raise TypeError(f"Received a {type(argument).__name__} for video_processor")
            return type(argument)
        return super().check_argument_for_proper_class(argument_name, argument)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load the tokenizer with ``AutoTokenizer``, the image processor as its PIL class and the video processor
        as our numpy class; the rest of the stock loading (processor config, chat template) is unchanged.

        Built from the public ``get_processor_dict`` and the constructor, so it does not depend on how a
        transformers release resolves sub-processors internally."""
        processor_dict, kwargs = cls.get_processor_dict(pretrained_model_name_or_path, **kwargs)
        parts = {}
        for attribute in cls.get_attributes():
            if attribute == "tokenizer":
                parts[attribute] = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)
            elif attribute == "image_processor":
                # Always reload the PIL class: the saved type name drops the "Pil" suffix, so
                # AutoImageProcessor would pick the torchvision variant whenever torchvision is installed.
                config = dict(processor_dict.get("image_processor") or {})
                image_cls = _IMAGE_PROCESSOR_CLASSES.get(config.pop("image_processor_type", None))
                parts[attribute] = (image_cls(**config) if image_cls is not None else
                                    AutoImageProcessor.from_pretrained(pretrained_model_name_or_path,
                                                                       backend="pil", **kwargs))
            elif attribute == "video_processor":
                config = dict(processor_dict.get("video_processor") or {})
                class_name = config.pop("video_processor_type", None)
                if class_name not in _VIDEO_PROCESSOR_CLASSES:
                    raise ValueError(f"unknown tiny video processor {class_name!r}")
                parts[attribute] = _VIDEO_PROCESSOR_CLASSES[class_name](**config)
            else:  # pragma: no cover - the four processors only have these attributes
                raise ValueError(f"unexpected processor attribute {attribute!r}")
        accepted = inspect.signature(cls.__init__).parameters
        options = {k: v for k, v in processor_dict.items() if k in accepted and k not in parts}
        return cls(**parts, **options)


class TinyQwen2VLProcessor(_TorchFreeVideoProcessorMixin, Qwen2VLProcessor):
    """Stock :class:`~transformers.Qwen2VLProcessor` with a torchvision-free video processor."""


class TinyQwen2_5_VLProcessor(_TorchFreeVideoProcessorMixin, Qwen2_5_VLProcessor):
    """Stock :class:`~transformers.Qwen2_5_VLProcessor` with a torchvision-free video processor."""


class TinyLlavaOnevisionProcessor(_TorchFreeVideoProcessorMixin, LlavaOnevisionProcessor):
    """Stock :class:`~transformers.LlavaOnevisionProcessor` with a torchvision-free video processor."""


class TinyLlavaProcessor(_TorchFreeVideoProcessorMixin, LlavaProcessor):
    """Stock :class:`~transformers.LlavaProcessor` (no video) that reloads its image processor as the PIL class."""


def _register_with_auto_processor() -> None:
    # AutoProcessor resolves `processor_class` names through PROCESSOR_MAPPING's extra content, which needs a
    # key config class.  These key classes are never instantiated.
    for processor_class in (
        TinyQwen2VLProcessor,
        TinyQwen2_5_VLProcessor,
        TinyLlavaOnevisionProcessor,
        TinyLlavaProcessor,
    ):
        key = type(
            f"_{processor_class.__name__}Key",
            (PreTrainedConfig,),
            {"model_type": f"hf_tokenprune_{processor_class.__name__.lower()}", "__module__": __name__},
        )
        AutoProcessor.register(key, processor_class, exist_ok=True)


_register_with_auto_processor()

# ----------------------------------------------------------------------------------------------------
# Processors
# ----------------------------------------------------------------------------------------------------

# Qwen: patch 7 and merge 2 -> one visual token per 14x14 pixels (the real models: 28x28).
QWEN_PATCH_SIZE = 7
QWEN_MERGE_SIZE = 2
QWEN_TEMPORAL_PATCH_SIZE = 2
QWEN_MIN_PIXELS = 28 * 28  # >= 4 visual tokens
QWEN_DEFAULT_IMAGE_SIZE = 112  # max_pixels = 112*112 -> <= 64 visual tokens per image / per 2 video frames
# LLaVA-OneVision: SigLIP tile of 28 px with patch 7 -> 4x4 = 16 features per tile.
LLAVA_PATCH_SIZE = 7
LLAVA_DEFAULT_IMAGE_SIZE = 28
LLAVA_MAX_GRID = 2  # anyres pinpoints: every (i*tile, j*tile) with 1 <= i, j <= 2
# LLaVA-1.5: CLIP at 42 px with patch 7 -> 6x6 = 36 patch features + CLS, the CLS dropped by
# vision_feature_select_strategy="default" -> 36 visual tokens per image (the real model: 336 / 14 -> 576).
LLAVA15_PATCH_SIZE = 7
LLAVA15_DEFAULT_IMAGE_SIZE = 42


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def _llava_pinpoints(tile: int) -> list[list[int]]:
    return [[i * tile, j * tile] for i in range(1, LLAVA_MAX_GRID + 1) for j in range(1, LLAVA_MAX_GRID + 1)]


def build_processor(family: str, *, image_size: int | None = None) -> ProcessorMixin:
    """Real transformers processor (PIL image processor) around :func:`build_tokenizer`.

    ``image_size``: for the Qwen families the side of the largest square image kept at full resolution
    (``max_pixels = image_size**2``, default 112 -> at most 64 visual tokens per image); for LLaVA-OneVision
    the SigLIP tile size (default 28), for LLaVA-1.5 the CLIP input size every image is resized and cropped to
    (default 42 -> 36 visual tokens per image); for both it must equal the ``image_size`` given to
    :func:`build_model`.
    """
    _check_family(family)
    tokenizer = build_tokenizer()
    if family in ("qwen2_vl", "qwen2_5_vl"):
        image_size = image_size or QWEN_DEFAULT_IMAGE_SIZE
        size = {"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": image_size * image_size}
        common = dict(
            size=size,
            patch_size=QWEN_PATCH_SIZE,
            temporal_patch_size=QWEN_TEMPORAL_PATCH_SIZE,
            merge_size=QWEN_MERGE_SIZE,
        )
        image_processor = Qwen2VLImageProcessorPil(**common)
        video_processor = TinyQwen2VLVideoProcessor(**common)
        cls = TinyQwen2VLProcessor if family == "qwen2_vl" else TinyQwen2_5_VLProcessor
        return cls(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=video_processor,
            chat_template=QWEN_CHAT_TEMPLATE,
        )
    if family == "llava":
        image_size = image_size or LLAVA15_DEFAULT_IMAGE_SIZE
        if image_size % LLAVA15_PATCH_SIZE:
            raise ValueError(f"LLaVA-1.5 image_size must be a multiple of {LLAVA15_PATCH_SIZE}")
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
        return TinyLlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=LLAVA15_PATCH_SIZE,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # CLIP's CLS token
            chat_template=LLAVA_CHAT_TEMPLATE,
        )
    image_size = image_size or LLAVA_DEFAULT_IMAGE_SIZE
    if image_size % LLAVA_PATCH_SIZE:
        raise ValueError(f"LLaVA-OneVision image_size must be a multiple of {LLAVA_PATCH_SIZE}")
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_grid_pinpoints=_llava_pinpoints(image_size),
    )
    video_processor = TinyLlavaOnevisionVideoProcessor(size={"height": image_size, "width": image_size})
    return TinyLlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        num_image_tokens=(image_size // LLAVA_PATCH_SIZE) ** 2,
        vision_feature_select_strategy="full",
        chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE,
        vision_aspect_ratio="anyres_max_9",
    )


# ----------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------

TEXT_HIDDEN_SIZE = 64
TEXT_HEADS = 4
TEXT_KV_HEADS = 2
TEXT_HEAD_DIM = TEXT_HIDDEN_SIZE // TEXT_HEADS  # 16
MROPE_SECTION = [2, 3, 3]  # sums to head_dim / 2 = 8 (real 7B: [16, 24, 24] for head_dim 128)
VISION_HIDDEN_SIZE = 32
VISION_HEADS = 4


def text_token_ids() -> dict[str, int]:
    """``bos_token_id``/``eos_token_id``/``pad_token_id`` of a text config, for :func:`build_tokenizer`'s ids.

    Shared with :func:`hf_tokenprune.world.models.build_config`.
    """
    ids = special_token_ids()
    return dict(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["[PAD]"])


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


def llava_onevision_config(text: dict[str, Any], vision: dict[str, Any],
                           image_grid_pinpoints: list[list[int]]) -> LlavaOnevisionConfig:
    """A LLaVA-OneVision config (Qwen2 text model) wired to :func:`build_tokenizer`'s special tokens.

    Sets ``model_type="qwen2"`` and default RoPE (``rope_theta`` 1e4) on ``text`` (in place); full SigLIP
    features from the last layer, ``anyres_max_9``, untied embeddings.  Shared with
    :mod:`hf_tokenprune.world.models`.
    """
    ids = special_token_ids()
    text["model_type"] = "qwen2"
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4}
    return LlavaOnevisionConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=image_grid_pinpoints,
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    )


def _text_kwargs(vocab_size: int, num_hidden_layers: int) -> dict[str, Any]:
    return dict(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=2 * TEXT_HIDDEN_SIZE,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_KV_HEADS,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        **text_token_ids(),
    )


# The vision-tower settings the two Qwen families share.
_QWEN_VISION = dict(
    depth=2,
    num_heads=VISION_HEADS,
    patch_size=QWEN_PATCH_SIZE,
    spatial_merge_size=QWEN_MERGE_SIZE,
    temporal_patch_size=QWEN_TEMPORAL_PATCH_SIZE,
)


def _make_config(family: str, num_hidden_layers: int, image_size: int | None) -> PreTrainedConfig:
    vocab_size = len(SPECIAL_TOKENS) + len(WORDS)
    text = _text_kwargs(vocab_size, num_hidden_layers)
    if family == "qwen2_vl":
        vision = dict(
            _QWEN_VISION,
            embed_dim=VISION_HIDDEN_SIZE,
            hidden_size=TEXT_HIDDEN_SIZE,  # merger output = LLM hidden size
            mlp_ratio=2,
        )
        return qwen_config(Qwen2VLConfig, text, vision, MROPE_SECTION)
    if family == "qwen2_5_vl":
        vision = dict(
            _QWEN_VISION,
            hidden_size=VISION_HIDDEN_SIZE,
            intermediate_size=2 * VISION_HIDDEN_SIZE,
            window_size=4 * QWEN_PATCH_SIZE * QWEN_MERGE_SIZE,  # 4x4 merged-token windows (real: 112 / 28)
            fullatt_block_indexes=[1],
            out_hidden_size=TEXT_HIDDEN_SIZE,
            tokens_per_second=2,
        )
        return qwen_config(Qwen2_5_VLConfig, text, vision, MROPE_SECTION)
    if family == "llava":
        image_size = image_size or LLAVA15_DEFAULT_IMAGE_SIZE
        text["model_type"] = "llama"
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
        vision = dict(
            model_type="clip_vision_model",
            hidden_size=VISION_HIDDEN_SIZE,
            intermediate_size=2 * VISION_HIDDEN_SIZE,
            projection_dim=VISION_HIDDEN_SIZE,
            num_hidden_layers=2,
            num_attention_heads=VISION_HEADS,
            image_size=image_size,
            patch_size=LLAVA15_PATCH_SIZE,
        )
        return LlavaConfig(
            text_config=text,
            vision_config=vision,
            image_token_index=special_token_ids()["<image>"],
            image_seq_length=(image_size // LLAVA15_PATCH_SIZE) ** 2,
            vision_feature_select_strategy="default",  # drop CLS
            vision_feature_layer=-2,  # the penultimate CLIP layer, like LLaVA-1.5
            tie_word_embeddings=False,
        )
    image_size = image_size or LLAVA_DEFAULT_IMAGE_SIZE
    vision = dict(
        model_type="siglip_vision_model",
        hidden_size=VISION_HIDDEN_SIZE,
        intermediate_size=2 * VISION_HIDDEN_SIZE,
        num_hidden_layers=2,
        num_attention_heads=VISION_HEADS,
        image_size=image_size,
        patch_size=LLAVA_PATCH_SIZE,
        vision_use_head=False,
    )
    return llava_onevision_config(text, vision, _llava_pinpoints(image_size))


_MODEL_CLASSES = {
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "llava_onevision": LlavaOnevisionForConditionalGeneration,
    "llava": LlavaForConditionalGeneration,
}


def build_model(
    family: str,
    *,
    seed: int = 0,
    num_hidden_layers: int = 2,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    image_size: int | None = None,
) -> PreTrainedModel:
    """Tiny random-weight model of the real architecture, deterministic for ``seed``, in ``.eval()`` mode.

    ``image_size`` only matters for LLaVA-OneVision (SigLIP tile size) and LLaVA-1.5 (CLIP input size); it must
    match :func:`build_processor`.
    The global torch RNG state is left untouched.
    """
    _check_family(family)
    config = _make_config(family, num_hidden_layers, image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _MODEL_CLASSES[family]._from_config(
            config, attn_implementation=attn_implementation, dtype=dtype
        )
    ids = special_token_ids()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["[PAD]"],
        do_sample=False,
        max_new_tokens=16,
        # a random model must never emit placeholders / padding (real models don't either)
        suppress_tokens=[ids[t] for t in SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")],
    )
    return model.eval()


def build(family: str, **kw) -> tuple[PreTrainedModel, ProcessorMixin]:
    """``(build_model(family, **kw), build_processor(family, image_size=kw.get("image_size")))``."""
    processor = build_processor(family, image_size=kw.get("image_size"))
    model = build_model(family, **kw)
    return model, processor


# ----------------------------------------------------------------------------------------------------
# Synthetic media
# ----------------------------------------------------------------------------------------------------


def _size_wh(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def draw_shape(draw: PIL.ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if kind in ("circle", "ellipse", "oval", "dot"):
        draw.ellipse(box, fill=fill)
    elif kind == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif kind == "star":
        cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, max(1.0, min(x1 - x0, y1 - y0) / 2)
        pts = [
            (
                cx + (r if k % 2 == 0 else r / 2.5) * math.sin(k * math.pi / 5),
                cy - (r if k % 2 == 0 else r / 2.5) * math.cos(k * math.pi / 5),
            )
            for k in range(10)
        ]
        draw.polygon(pts, fill=fill)
    elif kind == "diamond":
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif kind in ("line", "cross"):
        width = max(1, (x1 - x0) // 5)
        draw.line([(x0, y0), (x1, y1)], fill=fill, width=width)
        if kind == "cross":
            draw.line([(x0, y1), (x1, y0)], fill=fill, width=width)
    else:  # square, rectangle
        draw.rectangle(box, fill=fill)


def _scene(rng: random.Random, width: int, height: int, n_shapes: int) -> list[tuple[str, tuple, tuple]]:
    names = list(_COLOURS)
    shapes = []
    for _ in range(n_shapes):
        w = rng.randint(max(2, width // 5), max(3, width // 2))
        h = rng.randint(max(2, height // 5), max(3, height // 2))
        x0, y0 = rng.randint(0, max(0, width - w)), rng.randint(0, max(0, height - h))
        shapes.append((rng.choice(_SHAPES), (x0, y0, x0 + w, y0 + h), _COLOURS[rng.choice(names)]))
    return shapes


def make_image(seed: int, size: int | tuple[int, int] = 56) -> PIL.Image.Image:
    """Deterministic RGB image (``size``: side or ``(width, height)``): 2-4 coloured shapes."""
    width, height = _size_wh(size)
    rng = random.Random(seed)
    background = _COLOURS[rng.choice(list(_COLOURS))]
    image = PIL.Image.new("RGB", (width, height), background)
    draw = PIL.ImageDraw.Draw(image)
    for kind, box, fill in _scene(rng, width, height, rng.randint(2, 4)):
        draw_shape(draw, kind, box, fill)
    return image


def make_video(seed: int, frames: int = 4, size: int | tuple[int, int] = 56) -> list[PIL.Image.Image]:
    """Deterministic video: a list of ``frames`` RGB PIL frames, shapes drifting across a fixed background.

    Accepted as one video by every processor here (``videos=[make_video(0)]`` or a chat ``{"type": "video",
    "video": make_video(0)}`` item).
    """
    width, height = _size_wh(size)
    rng = random.Random(seed)
    background = _COLOURS[rng.choice(list(_COLOURS))]
    shapes = _scene(rng, width, height, rng.randint(2, 3))
    velocities = [(rng.randint(-3, 3), rng.randint(-3, 3)) for _ in shapes]
    out = []
    for t in range(frames):
        image = PIL.Image.new("RGB", (width, height), background)
        draw = PIL.ImageDraw.Draw(image)
        for (kind, (x0, y0, x1, y1), fill), (dx, dy) in zip(shapes, velocities, strict=True):
            draw_shape(draw, kind, (x0 + t * dx, y0 + t * dy, x1 + t * dx, y1 + t * dy), fill)
        out.append(image)
    return out
