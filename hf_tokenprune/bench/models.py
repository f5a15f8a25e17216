"""The models the cost benchmark runs on, each with one fixed prompt (one image and a short question).

* ``tiny``: the 4-layer tiny LLaVA-OneVision of :mod:`hf_tokenprune.tiny` (tests, seconds);
* ``qwen2vl-2b-like``: a random-initialised Qwen2-VL with Qwen2-VL-2B's LLM widths (1536 wide, 12 heads, 2 KV
  heads, MLP 8960) and a few layers, a one-block vision tower so the LLM dominates; 896 px -> 1,024 visual tokens;
* ``llava-smollm2-dinov2``: the real-weights LLaVA of :mod:`hf_tokenprune.bench.realweights` (SmolLM2-135M +
  DINOv2-small, untrained projector); 448 px -> 1,024 visual tokens;
* ``qwen3vl-2b-like``, ``qwen3vl-30b-a3b-like``, ``glm4.1v-9b-like``, ``glm4.5v-like``: random-initialised Qwen3-VL
  (DeepStack after the first 3 layers, as the real models), Qwen3-VL-MoE, GLM-4.1V and GLM-4.5V with the real LLM
  widths and a few layers (MoE: 16 of the experts, as many routed per token as the real model: the same FLOPs per
  token), small vision towers; about 1,024 visual tokens;
* ``qwen3.5-0.8b-like``: a random-initialised Qwen3.5 with Qwen3.5-0.8B's LLM widths and its hybrid layer pattern
  (one group: 3 Gated DeltaNet layers, then full attention), a one-block vision tower; 1024 px -> 1,024 visual tokens.
* ``smolvlm2-2.2b-like``: a random-initialised SmolVLM with SmolVLM2-2.2B's LLM widths, 512 px tiles pixel-shuffled
  4 x 4 into 64 tokens, an image split into 3 x 5 tiles plus the global image (16 blocks, 1,024 visual tokens
  between their row / column markers);
* ``gemma3-4b-like``: a random-initialised Gemma 3 with Gemma-3-4B's LLM widths (sliding-window layers, then a global
  one), an image and its three pan-and-scan crops of 256 tokens each (1,024 visual tokens, four bidirectional blocks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Glm4vConfig,
    Glm4vForConditionalGeneration,
    Glm4vMoeConfig,
    Glm4vMoeForConditionalGeneration,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)

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
    return _seeded(Qwen2VLForConditionalGeneration, config)


def _seeded(model_class: type[PreTrainedModel], config: PreTrainedConfig) -> PreTrainedModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return model_class(config).eval()


# the token ids of the random-init models: image, video, vision start / end (GLM: image start / end)
_IDS = dict(image_token_id=2000, video_token_id=2001)


def qwen3vl_like(layers: int = 4, moe: bool = False) -> PreTrainedModel:
    """Random-weight Qwen3-VL with Qwen3-VL-2B's LLM widths (2048 wide, MLP 6144, 16 heads, 8 KV heads of 128) or,
    ``moe``, Qwen3-VL-30B-A3B's (2048 wide, 32 heads, 4 KV heads of 128, 8 routed experts of width 768 per token,
    16 experts instead of 128); ``layers`` decoder layers, DeepStack after layers 0-2 from a 3-block vision tower."""
    rope = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20], "mrope_interleaved": True}
    text = dict(vocab_size=2048, hidden_size=2048, num_hidden_layers=layers, head_dim=128,
                max_position_embeddings=32768, bos_token_id=1, eos_token_id=None, pad_token_id=0,
                rope_parameters=rope)
    text |= (dict(intermediate_size=6144, moe_intermediate_size=768, num_attention_heads=32, num_key_value_heads=4,
                  num_experts=16, num_experts_per_tok=8) if moe else
             dict(intermediate_size=6144, num_attention_heads=16, num_key_value_heads=8))
    vision = dict(depth=3, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=2048, num_position_embeddings=2304,
                  deepstack_visual_indexes=[0, 1, 2])
    config_class, model_class = ((Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration) if moe else
                                 (Qwen3VLConfig, Qwen3VLForConditionalGeneration))
    config = config_class(text_config=text, vision_config=vision, vision_start_token_id=2002, vision_end_token_id=2003,
                          **_IDS)
    return _seeded(model_class, config)


def glm4v_like(layers: int = 4, moe: bool = False) -> PreTrainedModel:
    """Random-weight GLM-4.1V with GLM-4.1V-9B's LLM widths (4096 wide, MLP 13696, 32 heads, 2 KV heads, M-RoPE on
    half of each head) or, ``moe``, GLM-4.5V's (4096 wide, 96 heads, 8 KV heads of 128, a dense first layer, then 8
    routed experts of width 1408 and one shared expert per token, 16 routed experts instead of 128); ``layers``
    decoder layers, a one-block vision tower."""
    rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [8, 12, 12], "partial_rotary_factor": 0.5}
    text = dict(vocab_size=2048, hidden_size=4096, num_hidden_layers=layers, max_position_embeddings=32768,
                bos_token_id=1, eos_token_id=None, pad_token_id=0, rope_parameters=rope)
    text |= (dict(intermediate_size=10944, moe_intermediate_size=1408, num_attention_heads=96, num_key_value_heads=8,
                  head_dim=128, n_routed_experts=16, num_experts_per_tok=8, n_shared_experts=1,
                  first_k_dense_replace=1) if moe else
             dict(intermediate_size=13696, num_attention_heads=32, num_key_value_heads=2))
    vision = dict(depth=1, hidden_size=64, intermediate_size=256, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=4096, image_size=336)
    config_class, model_class = ((Glm4vMoeConfig, Glm4vMoeForConditionalGeneration) if moe else
                                 (Glm4vConfig, Glm4vForConditionalGeneration))
    config = config_class(text_config=text, vision_config=vision, image_start_token_id=2002, image_end_token_id=2003,
                          video_start_token_id=2004, video_end_token_id=2005, **_IDS)
    return _seeded(model_class, config)


def qwen2vl_inputs(model: PreTrainedModel, image: int = 896) -> dict[str, torch.Tensor]:
    """Processor-equivalent inputs of a Qwen-style model (2 x 2 merged patches): one ``image`` x ``image`` picture
    (``(image / (2 * patch))**2`` visual tokens) between its start and end tokens, 20 text tokens after it."""
    cfg, vision = model.config, model.config.vision_config
    patch, grid = vision.patch_size, image // vision.patch_size
    start, end = (getattr(cfg, "vision_start_token_id", None) or cfg.image_start_token_id,
                  getattr(cfg, "vision_end_token_id", None) or cfg.image_end_token_id)
    ids = [1, 2, start] + [cfg.image_token_id] * (grid * grid // 4) + [end] + list(range(10, 30))
    input_ids = torch.tensor([ids])
    generator = torch.Generator().manual_seed(0)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "mm_token_type_ids": (input_ids == cfg.image_token_id).int(),
            "pixel_values": torch.randn(grid * grid, 3 * vision.temporal_patch_size * patch * patch,
                                        generator=generator),
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


def _mrope_model(name: str, model: PreTrainedModel, image: int, what: str) -> BenchModel:
    text = model.config.get_text_config()
    return BenchModel(name, model, qwen2vl_inputs(model, image),
                      f"random-init {what}, {text.num_hidden_layers} layers, {image} px image")


# the #17 families' cost models: name -> (builder of ``layers`` decoder layers, image side in px, what it is)
_ISSUE_17_MODELS: dict[str, tuple[Callable[[int], PreTrainedModel], int, str]] = {
    "qwen3vl-2b-like": (qwen3vl_like, 1024,
                        "Qwen3-VL, 2B LLM widths (2048/6144, 16 heads, 8 KV heads), DeepStack after layers 0-2"),
    "qwen3vl-30b-a3b-like": (partial(qwen3vl_like, moe=True), 1024,
                             "Qwen3-VL-MoE, 30B-A3B LLM widths (2048, 32 heads, 4 KV heads, 8 of 16 experts of 768 per "
                             "token), DeepStack after layers 0-2"),
    "glm4.1v-9b-like": (glm4v_like, 896, "GLM-4.1V, 9B LLM widths (4096/13696, 32 heads, 2 KV heads)"),
    "glm4.5v-like": (partial(glm4v_like, moe=True), 896,
                     "GLM-4.5V, LLM widths (4096, 96 heads, 8 KV heads, a dense first layer, then 8 of 16 experts of "
                     "1408 + 1 shared per token)"),
}


def _issue_17_model(name: str, layers: int = 4) -> BenchModel:
    build, image, what = _ISSUE_17_MODELS[name]
    return _mrope_model(name, build(layers), image, what)


def qwen3_5_like(layers: int = 4) -> PreTrainedModel:
    """Random-weight Qwen3.5 with Qwen3.5-0.8B's LLM widths (1024 wide, MLP 3584; full attention: 8 heads, 2 KV heads
    of 256, a quarter of each head rotated; Gated DeltaNet: 16 key and 16 value heads of 128, conv kernel 4) and its
    layer pattern (layers 3, 7, ... full attention, the others linear); a one-block vision tower."""
    rope = {"rope_type": "default", "rope_theta": 1e7, "mrope_section": [11, 11, 10], "mrope_interleaved": True,
            "partial_rotary_factor": 0.25}
    text = dict(vocab_size=2048, hidden_size=1024, intermediate_size=3584, num_hidden_layers=layers,
                num_attention_heads=8, num_key_value_heads=2, head_dim=256, linear_num_key_heads=16,
                linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
                max_position_embeddings=32768, bos_token_id=1, eos_token_id=None, pad_token_id=0, rope_parameters=rope)
    vision = dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=1024, num_position_embeddings=2304)
    config = Qwen3_5Config(text_config=text, vision_config=vision, vision_start_token_id=2002, vision_end_token_id=2003,
                           **_IDS)
    return _seeded(Qwen3_5ForConditionalGeneration, config)


def qwen3_5_model(layers: int = 4, image: int = 1024) -> BenchModel:
    return _mrope_model("qwen3.5-0.8b-like", qwen3_5_like(layers), image,
                        "Qwen3.5, 0.8B LLM widths (1024/3584; Gated DeltaNet layers 0-2, full attention at 3: 8 heads, "
                        "2 KV heads of 256)")


def smolvlm_like(layers: int = 4) -> SmolVLMForConditionalGeneration:
    """Random-weight SmolVLM with SmolVLM2-2.2B's LLM widths (2048 wide, MLP 8192, 32 heads, 32 KV heads), ``layers``
    decoder layers, a one-block vision tower on 512 px tiles of 32 x 32 patches, pixel-shuffled 4 x 4 (64 tokens)."""
    text = dict(model_type="llama", vocab_size=2048, hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=16384, bos_token_id=1,
                eos_token_id=None, pad_token_id=0, rope_parameters={"rope_type": "default", "rope_theta": 130000.0})
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, image_size=512,
                  patch_size=16)
    config = SmolVLMConfig(text_config=text, vision_config=vision, scale_factor=4, image_token_id=2000)
    return _seeded(SmolVLMForConditionalGeneration, config)


def smolvlm_inputs(model: PreTrainedModel, rows: int = 3, cols: int = 5) -> dict[str, torch.Tensor]:
    """Processor-equivalent inputs of a SmolVLM: one image split into ``rows x cols`` tiles plus the global image,
    each block after its markers (fake token 2001, ``<global-img>`` 2002, row / column tokens from 2010), 20 text
    tokens after it."""
    block = [model.config.image_token_id] * model.model.image_seq_len
    ids = [1, 2]
    for r in range(rows):
        ids += [token for c in range(cols) for token in (2001, 2010 + 6 * r + c, *block)]
    ids += [2001, 2002, *block, 2001, *range(10, 30)]
    input_ids = torch.tensor([ids])
    side = model.config.vision_config.image_size
    generator = torch.Generator().manual_seed(0)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "pixel_values": torch.randn(1, rows * cols + 1, 3, side, side, generator=generator),
            "pixel_attention_mask": torch.ones(1, rows * cols + 1, side, side, dtype=torch.long)}


def gemma3_like(layers: int = 4) -> Gemma3ForConditionalGeneration:
    """Random-weight Gemma 3 with Gemma-3-4B's LLM widths (2560 wide, MLP 10240, 8 heads, 4 KV heads of 256, a
    1024-token sliding window in every layer but the last of ``layers``), a one-block vision tower on 896 px images
    of 64 x 64 patches pooled to 16 x 16 tokens."""
    text = dict(vocab_size=2048, hidden_size=2560, intermediate_size=10240, num_hidden_layers=layers,
                num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                sliding_window=1024, layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"],
                max_position_embeddings=32768, bos_token_id=1, eos_token_id=None, pad_token_id=0)
    vision = dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=2, image_size=896, patch_size=14, vision_use_head=False)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=256, boi_token_index=2001,
                          eoi_token_index=2002, image_token_index=2000)
    return _seeded(Gemma3ForConditionalGeneration, config)


def gemma3_inputs(model: PreTrainedModel, runs: int = 4) -> dict[str, torch.Tensor]:
    """Processor-equivalent inputs of a Gemma 3: an image and its pan-and-scan crops, ``runs`` blocks of
    ``mm_tokens_per_image`` image tokens between start / end tokens, 20 text tokens after them."""
    cfg = model.config
    ids = [1, 2]
    for _ in range(runs):
        ids += [cfg.boi_token_id, *[cfg.image_token_id] * cfg.mm_tokens_per_image, cfg.eoi_token_id]
    input_ids = torch.tensor([ids + list(range(10, 30))])
    side = cfg.vision_config.image_size
    generator = torch.Generator().manual_seed(0)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "token_type_ids": (input_ids == cfg.image_token_id).long(),
            "pixel_values": torch.randn(runs, 3, side, side, generator=generator)}


def smolvlm_model(layers: int = 4) -> BenchModel:
    model = smolvlm_like(layers)
    return BenchModel("smolvlm2-2.2b-like", model, smolvlm_inputs(model),
                      f"random-init SmolVLM, SmolVLM2-2.2B LLM widths (2048/8192, 32 heads, 32 KV heads), {layers} "
                      "layers, 3 x 5 tiles + the global image of 64 tokens")


def gemma3_model(layers: int = 4) -> BenchModel:
    model = gemma3_like(layers)
    return BenchModel("gemma3-4b-like", model, gemma3_inputs(model),
                      f"random-init Gemma 3, 4B LLM widths (2560/10240, 8 heads, 4 KV heads of 256, 1024-token "
                      f"sliding window), {layers} layers, an image + 3 pan-and-scan crops of 256 tokens")


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
    **{name: partial(_issue_17_model, name) for name in _ISSUE_17_MODELS},
    "qwen3.5-0.8b-like": qwen3_5_model,
    "smolvlm2-2.2b-like": smolvlm_model,
    "gemma3-4b-like": gemma3_model,
}
