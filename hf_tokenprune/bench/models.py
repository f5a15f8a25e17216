"""The models the cost benchmark runs on, each with one fixed prompt (one image and a short question).

* ``tiny``: the 4-layer tiny LLaVA-OneVision of :mod:`hf_tokenprune.tiny` (tests, seconds);
* ``qwen2vl-2b-like``: a random-initialised Qwen2-VL with Qwen2-VL-2B's LLM widths (1536 wide, 12 heads, 2 KV
  heads, MLP 8960) and a few layers, a one-block vision tower so the LLM dominates; 896 px -> 1,024 visual tokens;
* ``llava-smollm2-dinov2``: the real-weights LLaVA of :mod:`hf_tokenprune.bench.realweights` (SmolLM2-135M +
  DINOv2-small, untrained projector); 448 px -> 1,024 visual tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, Qwen2VLConfig, Qwen2VLForConditionalGeneration

QUESTION = "What colour is the shape in the top left corner of the picture?"


@dataclass
class BenchModel:
    """A model in eval mode and the processor outputs of its benchmark prompt."""

    name: str
    model: PreTrainedModel
    inputs: dict[str, torch.Tensor]
    description: str


def qwen2vl_2b_like(layers: int = 4) -> Qwen2VLForConditionalGeneration:
    """Random-weight Qwen2-VL with Qwen2-VL-2B's LLM widths, ``layers`` decoder layers, a one-block vision tower."""
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=2048, hidden_size=1536, intermediate_size=8960, num_hidden_layers=layers,
                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                         bos_token_id=1, eos_token_id=None, pad_token_id=0,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=1, embed_dim=64, hidden_size=1536, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_chans=3),
        image_token_id=2000, video_token_id=2001, vision_start_token_id=2002, vision_end_token_id=2003,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2VLForConditionalGeneration(config).eval()
    return model


def qwen2vl_inputs(model: Qwen2VLForConditionalGeneration, image: int = 896) -> dict[str, torch.Tensor]:
    """Processor-equivalent inputs: one ``image`` x ``image`` picture (``(image / 28)**2`` visual tokens), 20 text
    tokens after it."""
    grid = image // 14
    cfg = model.config
    ids = ([1, 2, cfg.vision_start_token_id] + [cfg.image_token_id] * (grid * grid // 4) + [cfg.vision_end_token_id]
           + list(range(10, 30)))
    input_ids = torch.tensor([ids])
    generator = torch.Generator().manual_seed(0)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "mm_token_type_ids": (input_ids == cfg.image_token_id).int(),
            "pixel_values": torch.randn(grid * grid, 3 * 2 * 14 * 14, generator=generator),
            "image_grid_thw": torch.tensor([[1, grid, grid]])}


def _chat_inputs(processor: Any, image: Any) -> dict[str, torch.Tensor]:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return dict(processor(text=[text], images=[image], return_tensors="pt"))


def tiny_model(layers: int = 4) -> BenchModel:
    from .. import tiny

    model, processor = tiny.build("llava_onevision", num_hidden_layers=layers)
    return BenchModel("tiny", model, _chat_inputs(processor, tiny.make_image(0, size=112)),
                      f"tiny random LLaVA-OneVision ({layers} layers, width {model.config.text_config.hidden_size})")


def qwen2vl_model(layers: int = 4, image: int = 896) -> BenchModel:
    model = qwen2vl_2b_like(layers)
    return BenchModel("qwen2vl-2b-like", model, qwen2vl_inputs(model, image),
                      f"random-init Qwen2-VL, 2B LLM widths (1536/8960, 12 heads, 2 KV heads), {layers} layers, "
                      f"{image} px image")


def realweights_model(image: int = 448) -> BenchModel:
    from .. import tiny
    from .realweights import build

    model, processor = build(image)
    return BenchModel("llava-smollm2-dinov2", model, _chat_inputs(processor, tiny.make_image(0, size=image)),
                      f"LLaVA: SmolLM2-135M-Instruct + DINOv2-small (real weights, untrained projector), {image} px")


MODELS: dict[str, Callable[[], BenchModel]] = {
    "tiny": tiny_model,
    "qwen2vl-2b-like": qwen2vl_model,
    "llava-smollm2-dinov2": realweights_model,
}
