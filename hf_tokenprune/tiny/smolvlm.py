"""SmolVLM and Idefics3: SigLIP-style tower, pixel-shuffle connector, Llama text model (``text_model``).

The image processor resizes an image's longest edge to ``IDEFICS3_LONGEST_EDGE`` and splits it into
``IDEFICS3_TILE`` x ``IDEFICS3_TILE`` tiles plus the whole image resized to one tile (the global image); each tile
is one block of ``IDEFICS3_BLOCK`` ``<image>`` tokens, written ``<fake_token_around_image><row_i_col_j>`` + block
(tiles, row by row) and ``<fake_token_around_image><global-img>`` + block + ``<fake_token_around_image>`` (the global
image). SmolVLM's processor also takes videos: each frame becomes one global block of ``<image>`` tokens in
``pixel_values``, after a timestamp line. The real checkpoints: 364 / 512 px tiles of 169 / 64 tokens.

The tiny sizes: 32 px tiles, longest edge 64 (at most 2 x 2 tiles); SmolVLM patch 2, pixel shuffle 4 (16 x 16
patches -> 4 x 4 tokens), Idefics3 patch 4, pixel shuffle 2 (8 x 8 patches -> 4 x 4 tokens). The chat template is
SmolVLM's with the shared tokenizer's ``<|im_end|>`` closing a turn (like the other tiny families); the processor's
own template for videos closes it with ``<end_of_utterance>``, the real checkpoints' eos, an eos id of the tiny text
config too.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    PreTrainedTokenizerFast,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMProcessor,
)
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

from .processors import (
    TinyVideoProcessor,
    TorchFreeProcessorMixin,
    is_video,
    per_prompt,
    register_processor,
    resize_frames,
)
from .registry import TinyFamily, added_token_ids
from .sizes import VISION_HEADS, VISION_HIDDEN_SIZE, text_kwargs
from .tokenizer import special_token_ids

IDEFICS3_TOKENS = ("<fake_token_around_image>", "<global-img>", "<end_of_utterance>",
                   *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)))
IDEFICS3_TILE = 32
IDEFICS3_LONGEST_EDGE = 2 * IDEFICS3_TILE
IDEFICS3_BLOCK = 16  # <image> tokens per tile

# SmolVLM's chat template (transformers' DEFAULT_CHAT_TEMPLATE of processing_smolvlm, which the processor uses for
# videos), a turn closed by <|im_end|> instead of <end_of_utterance>
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'] is string %}{{': ' + message['content']}}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


class TinySmolVLMVideoProcessor(TinyVideoProcessor):
    """Reproduces ``SmolVLMVideoProcessor``'s output with numpy + PIL: every frame resized to ``max_image_size``
    (one global block), videos padded with empty frames to the longest, ``pixel_attention_mask`` over them."""

    model_input_names = ["pixel_values", "pixel_attention_mask"]
    # apply_chat_template passes these on: as a stock processor built without `video_sampling`, no frame sampling
    num_frames = None
    fps = None

    def __init__(self, max_image_size: dict[str, int] | None = None, **kwargs) -> None:
        kwargs.setdefault("image_mean", [0.5, 0.5, 0.5])
        kwargs.setdefault("image_std", [0.5, 0.5, 0.5])
        super().__init__(**kwargs)
        self.max_image_size = dict(max_image_size or {"longest_edge": IDEFICS3_TILE})

    def _process(self, videos: list[np.ndarray]) -> dict[str, Any]:
        side = self.max_image_size["longest_edge"]
        frames = max(len(v) for v in videos)
        pixels = np.zeros((len(videos), frames, 3, side, side), dtype=np.float32)
        mask = np.zeros((len(videos), frames, side, side), dtype=np.int64)
        for i, video in enumerate(videos):
            pixels[i, :len(video)] = self._normalize(resize_frames(video, side, side))
            mask[i, :len(video)] = 1
        return {"pixel_values": pixels, "pixel_attention_mask": mask}


class TinySmolVLMProcessor(TorchFreeProcessorMixin, SmolVLMProcessor):
    """Stock :class:`~transformers.SmolVLMProcessor` with a torchvision-free video processor; it also takes the images
    (videos) of a batch as one flat list, split over the prompts by their ``<image>`` (``<video>``) counts (the stock
    one wants a list per prompt: images always, videos on transformers < 5.25)."""

    def prepare_inputs_layout(self, images=None, text=None, videos=None, **kwargs):
        images = per_prompt(images, text, self.image_token)
        videos = per_prompt(videos, text, self.video_token, is_video)
        return super().prepare_inputs_layout(images=images, text=text, videos=videos, **kwargs)


class TinyIdefics3Processor(TorchFreeProcessorMixin, Idefics3Processor):
    """Stock :class:`~transformers.Idefics3Processor` that reloads its image processor as the PIL class."""


register_processor(TinySmolVLMProcessor, SmolVLMImageProcessorPil, TinySmolVLMVideoProcessor)
register_processor(TinyIdefics3Processor, Idefics3ImageProcessorPil)


def _config_factory(patch_size: int, scale_factor: int):
    def config(config_class: type[Idefics3Config | SmolVLMConfig], num_hidden_layers: int,
               image_size: int | None) -> Idefics3Config | SmolVLMConfig:
        if image_size not in (None, IDEFICS3_TILE):
            raise ValueError(f"the tiny SmolVLM / Idefics3 tile size is fixed at {IDEFICS3_TILE}")
        ids = added_token_ids(IDEFICS3_TOKENS)
        text = text_kwargs(num_hidden_layers)
        text.update(model_type="llama", vocab_size=text["vocab_size"] + len(IDEFICS3_TOKENS),
                    eos_token_id=[text["eos_token_id"], ids["<end_of_utterance>"]],
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        vision = dict(hidden_size=VISION_HIDDEN_SIZE, intermediate_size=2 * VISION_HIDDEN_SIZE, num_hidden_layers=2,
                      num_attention_heads=VISION_HEADS, image_size=IDEFICS3_TILE, patch_size=patch_size)
        return config_class(text_config=text, vision_config=vision, image_token_id=special_token_ids()["<image>"],
                            scale_factor=scale_factor, tie_word_embeddings=False)
    return config


def _image_processor(cls: type) -> Any:
    return cls(size={"longest_edge": IDEFICS3_LONGEST_EDGE}, max_image_size={"longest_edge": IDEFICS3_TILE},
               image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def _smolvlm_processor(tokenizer: PreTrainedTokenizerFast, image_size: int | None) -> TinySmolVLMProcessor:
    return TinySmolVLMProcessor(image_processor=_image_processor(SmolVLMImageProcessorPil), tokenizer=tokenizer,
                                video_processor=TinySmolVLMVideoProcessor(), image_seq_len=IDEFICS3_BLOCK,
                                chat_template=SMOLVLM_CHAT_TEMPLATE)


def _idefics3_processor(tokenizer: PreTrainedTokenizerFast, image_size: int | None) -> TinyIdefics3Processor:
    return TinyIdefics3Processor(image_processor=_image_processor(Idefics3ImageProcessorPil), tokenizer=tokenizer,
                                 image_seq_len=IDEFICS3_BLOCK, chat_template=SMOLVLM_CHAT_TEMPLATE)


SMOLVLM = TinyFamily("smolvlm", SmolVLMForConditionalGeneration, _config_factory(2, 4), _smolvlm_processor,
                     tokens=IDEFICS3_TOKENS)
IDEFICS3 = TinyFamily("idefics3", Idefics3ForConditionalGeneration, _config_factory(4, 2), _idefics3_processor,
                      modalities=("image",), tokens=IDEFICS3_TOKENS)
