"""Torch(vision)-free processor plumbing shared by the tiny families.

transformers' video processors derive from ``BaseVideoProcessor``, which needs torchvision, and without it the
stock processors cannot be constructed at all (``check_argument_for_proper_class`` looks ``VideoProcessorMixin``
up on the top-level ``transformers`` module, which only exports it with torchvision). The families therefore use
thin subclasses of the stock processors (:class:`TorchFreeProcessorMixin`) holding small numpy/PIL video processors
(:class:`TinyVideoProcessor`) that reproduce the stock outputs; token expansion, chat templates and image
processing are the stock code. :func:`register_processor` registers such a subclass with ``AutoProcessor``, so
``AutoProcessor.from_pretrained(dir)`` works after ``save_pretrained(dir)``.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from itertools import accumulate
from types import ModuleType
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers import (
    AutoFeatureExtractor,
    AutoImageProcessor,
    AutoProcessor,
    PreTrainedConfig,
    PreTrainedTokenizerFast,
)
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.processing_utils import ProcessorMixin
from transformers.video_processing_utils import VideoProcessorMixin
from transformers.video_utils import VideoMetadata, make_batched_videos


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


def import_without_torchvision(module: str, name: str, torchvision_module: str, pil_module: ModuleType) -> Any:
    """``name`` from transformers' ``module``. Where that module imports from the torchvision image processor module
    ``torchvision_module`` (Pixtral's processor a token-count helper, Gemma 4's on transformers < 5.25 its kwargs and
    one), those names are served, for that import only, from ``pil_module``, which defines the same ones."""
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:
        sys.modules[torchvision_module] = pil_module
        try:
            return getattr(importlib.import_module(module), name)
        finally:
            del sys.modules[torchvision_module]


def is_image(media: Any) -> bool:
    return isinstance(media, PIL.Image.Image)


def is_video(media: Any) -> bool:
    """One video: a 4-D array / tensor or a list of PIL frames."""
    return getattr(media, "ndim", 0) == 4 or (isinstance(media, (list, tuple)) and bool(media)
                                              and all(map(is_image, media)))


def per_prompt(media: Any, text: Any, placeholder: str, is_one: Callable[[Any], bool] = is_image) -> Any:
    """A flat list of images (``is_one`` tells one; videos: :func:`is_video`) split over the prompts by their
    ``placeholder`` counts, as ``Idefics3Processor`` does with images, for processors that want a list per prompt;
    anything else unchanged."""
    if not (isinstance(media, (list, tuple)) and media and all(map(is_one, media)) and isinstance(text, (list, tuple))):
        return media
    counts = [t.count(placeholder) for t in text]
    if sum(counts) != len(media):
        return media  # the stock checks report it
    return [list(media[start:start + n]) for start, n in zip(accumulate(counts, initial=0), counts)]


def resize_frames(video: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic PIL resize of every frame of a (T, C, H, W) [0, 255] float video."""
    if video.shape[-2:] == (height, width):
        return video
    out = []
    for frame in video:
        img = PIL.Image.fromarray(np.clip(frame.transpose(1, 2, 0), 0, 255).round().astype(np.uint8))
        img = img.resize((width, height), resample=PIL.Image.Resampling.BICUBIC)
        out.append(np.asarray(img, dtype=np.float32).transpose(2, 0, 1))
    return np.stack(out)


class TinyVideoProcessor(VideoProcessorMixin):
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


# Reloading: image processor type name -> PIL class, video processor type name -> class (register_processor).
# `PilBackend.to_dict` saves "Qwen2VLImageProcessorPil" as "Qwen2VLImageProcessor", so both names are mapped.
_IMAGE_PROCESSOR_CLASSES: dict[str, type] = {}
_VIDEO_PROCESSOR_CLASSES: dict[str, type[TinyVideoProcessor]] = {}


class TorchFreeProcessorMixin:
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
        """Load the tokenizer as the fast tokenizer it was saved as, the image processor as its PIL class, the
        video processor as our numpy class and an audio feature extractor as saved; the rest of the stock loading
        (processor config, chat template) is unchanged.

        Built from the public ``get_processor_dict`` and the constructor, so it does not depend on how a
        transformers release resolves sub-processors internally."""
        processor_dict, kwargs = cls.get_processor_dict(pretrained_model_name_or_path, **kwargs)
        parts = {}
        for attribute in cls.get_attributes():
            if attribute == "tokenizer":
                # the shared word-level tokenizer, as saved: AutoTokenizer would rebuild it as the class transformers
                # registers for the model type where it overrides the saved one (Qwen3.5: its BPE tokenizer)
                parts[attribute] = PreTrainedTokenizerFast.from_pretrained(pretrained_model_name_or_path, **kwargs)
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
            elif attribute == "feature_extractor":  # audio (Gemma 4): numpy already
                parts[attribute] = AutoFeatureExtractor.from_pretrained(pretrained_model_name_or_path, **kwargs)
            else:  # pragma: no cover - the tiny processors only have these attributes
                raise ValueError(f"unexpected processor attribute {attribute!r}")
        accepted = inspect.signature(cls.__init__).parameters
        options = {k: v for k, v in processor_dict.items() if k in accepted and k not in parts}
        return cls(**parts, **options)


def register_processor(processor_class: type[ProcessorMixin], image_processor_class: type,
                       video_processor_class: type[TinyVideoProcessor] | None = None) -> None:
    """Register a :class:`TorchFreeProcessorMixin` processor with ``AutoProcessor``, and the (PIL) image and video
    processor classes its ``from_pretrained`` reloads."""
    for name in (image_processor_class.__name__, image_processor_class.__name__.removesuffix("Pil")):
        _IMAGE_PROCESSOR_CLASSES[name] = image_processor_class
    if video_processor_class is not None:
        _VIDEO_PROCESSOR_CLASSES[video_processor_class.__name__] = video_processor_class
    # AutoProcessor resolves `processor_class` names through PROCESSOR_MAPPING's extra content, which needs a key
    # config class. The key class is never instantiated.
    key = type(
        f"_{processor_class.__name__}Key",
        (PreTrainedConfig,),
        {"model_type": f"hf_tokenprune_{processor_class.__name__.lower()}", "__module__": __name__},
    )
    AutoProcessor.register(key, processor_class, exist_ok=True)
