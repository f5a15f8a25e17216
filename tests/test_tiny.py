"""Tests of hf_tokenprune.tiny: offline tiny VLMs + real processors, end to end on CPU."""

from __future__ import annotations

import functools

import made_up_family
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import FAMILIES
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration, pipeline

from hf_tokenprune import tiny
from hf_tokenprune.tiny import (
    MODALITIES,
    SPECIAL_TOKENS,
    build,
    build_model,
    build_processor,
    build_tokenizer,
    make_image,
    make_video,
)

QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")
GLM = ("glm4v", "glm4v_moe")  # Qwen-style processing and grids, GLM's media tokens at the Qwen ids
LLAVA_NEXT = ("llava_next", "llava_next_video")
PIXTRAL = ("mistral3", "llava_pixtral")
IDEFICS3 = ("smolvlm", "idefics3")
FRAMES_AS_IMAGES = ("smolvlm", "internvl")  # their processors give the model a video's frames as images
GEMMA = ("gemma3",)
VIDEO_FAMILIES = [f for f in FAMILIES if "video" in MODALITIES[f]]
IDS = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}

# Visual tokens per image (default processors): Qwen = (H/14)*(W/14) after smart_resize, capped at 64;
# LLaVA-OneVision = anyres over 28 px tiles (4x4 SigLIP patches each) incl. base tile and row newlines;
# LLaVA-1.5 = every image resized + center-cropped to 42 px -> 6x6 CLIP patches (CLS dropped);
# LLaVA-NeXT(-Video) = anyres over 28 px CLIP tiles (4x4 patches, CLS dropped) incl. base tile and row newlines;
# Pixtral = one [IMG] per 14 px of the image resized to a longest edge <= 112 (row breaks are not counted);
# SmolVLM / Idefics3 = 16 per 32 px tile of the image resized to a longest edge of 64, plus 16 for the global image;
# InternVL = 16 per 32 px tile of the grid (at most 6) closest to the image's aspect ratio, plus a 16-token thumbnail;
# Gemma 3 = every image resized to 32 px, 8 x 8 patches pooled to 4 x 4;
# Gemma 4 = every image resized keeping its aspect ratio to at most 70 tokens of 2 x 2 pooled 4 px patches (64 square).
EXPECTED_IMAGE_TOKENS = {
    "qwen2_vl": {28: 4, 56: 16, 84: 36, 112: 64, 224: 64, (84, 42): 18},
    "qwen2_5_vl": {28: 4, 56: 16, 84: 36, 112: 64, 224: 64, (84, 42): 18},
    "qwen3_5": {28: 4, 56: 16, 84: 36, 112: 64, 224: 64, (84, 42): 18},
    "qwen3_5_moe": {28: 4, 56: 16, 84: 36, 112: 64, 224: 64, (84, 42): 18},
    "llava_onevision": {28: 36, 56: 88, 84: 88, 112: 88, 224: 88, (84, 42): 52},
    "llava": {28: 36, 56: 36, 84: 36, 112: 36, 224: 36, (84, 42): 36},
    "llava_next": {28: 36, 56: 88, 84: 88, 112: 88, 224: 88, (84, 42): 52},
    "llava_next_video": {28: 36, 56: 88, 84: 88, 112: 88, 224: 88, (84, 42): 52},
    "mistral3": {28: 4, 56: 16, 84: 36, 112: 64, 224: 64, (84, 42): 18},
    "llava_pixtral": {28: 4, 56: 16, 84: 36, 112: 64, 224: 64, (84, 42): 18},
    "smolvlm": {28: 80, 56: 80, 84: 80, 112: 80, 224: 80, (84, 42): 48},
    "idefics3": {28: 80, 56: 80, 84: 80, 112: 80, 224: 80, (84, 42): 48},
    "internvl": {28: 16, 56: 80, 84: 80, 112: 80, 224: 80, (84, 42): 48},
    "gemma3": {28: 16, 56: 16, 84: 16, 112: 16, 224: 16, (84, 42): 16},
    "gemma4": {28: 64, 56: 64, 84: 64, 112: 64, 224: 64, (84, 42): 55},
}
# Qwen3-VL and GLM-4V: Qwen2-VL's image processing (GLM's resize counts both frames of a temporal patch: same sizes)
EXPECTED_IMAGE_TOKENS |= dict.fromkeys(("qwen3_vl", "qwen3_vl_moe", *GLM), EXPECTED_IMAGE_TOKENS["qwen2_vl"])
# 4 frames of 56x56: Qwen -> grid (2, 8, 8) / 4 = 32; LLaVA-OV -> 4 frames * 2x2 pooled + 1 newline = 17;
# LLaVA-NeXT-Video -> 4 frames * 2x2 pooled = 16; SmolVLM, InternVL -> 4 frames * one 16-token block = 64;
# Gemma 4 -> 4 frames * 64 (as images).
EXPECTED_VIDEO_TOKENS = {"qwen2_vl": 32, "qwen2_5_vl": 32, "llava_onevision": 17, "llava_next_video": 16,
                         "smolvlm": 64, "internvl": 64, "qwen3_vl": 32, "qwen3_vl_moe": 32, "glm4v": 32,
                         "glm4v_moe": 32, "qwen3_5": 32, "qwen3_5_moe": 32, "gemma4": 256}


@functools.cache
def _model(family: str, attn_implementation: str = "sdpa"):
    return build_model(family, attn_implementation=attn_implementation)


def _processor(family: str):
    return build_processor(family)  # cheap; fresh each time so tests can mutate padding_side


def _image_token_id(model) -> int:
    cfg = model.config
    return cfg.image_token_id if hasattr(cfg, "image_token_id") else cfg.image_token_index


def _video_token_id(model) -> int:
    cfg = model.config
    if cfg.model_type in (*FRAMES_AS_IMAGES, *GLM):  # their video frames are image tokens
        return cfg.image_token_id
    return cfg.video_token_id if hasattr(cfg, "video_token_id") else cfg.video_token_index


def _chat(text: str, *, image=None, video=None, with_image: bool = False, with_video: bool = False):
    content = []
    if image is not None or with_image:
        content.append({"type": "image", "image": image} if image is not None else {"type": "image"})
    if video is not None or with_video:
        content.append({"type": "video", "video": video} if video is not None else {"type": "video"})
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def _image_inputs(processor, image):
    return processor.apply_chat_template(
        _chat("what is the colour of the left shape ?", image=image),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )


def _visual_feature_count(family: str, model, inputs) -> int:
    with torch.no_grad():
        if family in QWEN + GLM:
            out = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        elif family in ("llava", "internvl", *GEMMA):
            out = model.get_image_features(inputs["pixel_values"])
        elif family in IDEFICS3:
            out = model.get_image_features(inputs["pixel_values"], inputs["pixel_attention_mask"])
        elif family == "gemma4":
            out = model.get_image_features(inputs["pixel_values"], inputs["image_position_ids"])
        elif family == "llava_onevision":
            out = model.get_image_features(
                inputs["pixel_values"], inputs["image_sizes"], batch_num_images=inputs["batch_num_images"]
            )
        else:
            out = model.get_image_features(inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    feats = out.pooler_output
    feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats
    return feats.reshape(-1, model.config.text_config.hidden_size).shape[0]


# ---------------------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------------------


def test_tokenizer_specials_vocab_and_decoding():
    tok = build_tokenizer()
    assert 150 <= len(tok) <= 256
    for token, idx in IDS.items():
        assert tok.convert_tokens_to_ids(token) == idx
        assert tok(token, add_special_tokens=False).input_ids == [idx]
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 4, 1)
    ids = tok("What is the colour of the LEFT shape? 42", add_special_tokens=False).input_ids
    assert IDS["[UNK]"] not in ids
    assert tok.decode(ids) == "what is the colour of the left shape ? 4 2"
    assert tok("zebra", add_special_tokens=False).input_ids == [IDS["[UNK]"]]
    # specials are split out of running text and skipped on decode
    ids = tok("<|im_start|>user<image>red<|im_end|>", add_special_tokens=False).input_ids
    assert ids[0] == IDS["<|im_start|>"] and ids[2] == IDS["<image>"] and ids[-1] == IDS["<|im_end|>"]
    assert tok.decode(ids, skip_special_tokens=True) == "user red"


def test_tokenizer_chat_template_emits_qwen_placeholders():
    tok = build_tokenizer()
    text = tok.apply_chat_template(
        _chat("what colour ?", with_image=True), tokenize=False, add_generation_prompt=True
    )
    assert "<|vision_start|><|image_pad|><|vision_end|>what colour ?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_chat_template_placeholders(family):
    processor = _processor(family)
    text = processor.apply_chat_template(_chat("hello", with_image=True), add_generation_prompt=True)
    if family in QWEN:
        assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 1
    elif family in GLM:
        assert text.count("<|begin_of_image|><|image|><|end_of_image|>") == 1
    elif family in IDEFICS3:
        assert text.startswith("<|im_start|>User:<image>hello<|im_end|>")
    elif family == "internvl":
        assert text.startswith("<|im_start|>user\n<IMG_CONTEXT>\nhello<|im_end|>")
    elif family in GEMMA:
        assert text.startswith("<|im_start|>user\n<start_of_image>hello<|im_end|>")
    elif family == "gemma4":
        assert text.startswith("<|im_start|>user\n<image_soft_token>hello<|im_end|>")
    else:
        assert text.startswith(f"<|im_start|>user {processor.image_token}\nhello<|im_end|>")


# ---------------------------------------------------------------------------------------------------------
# model configs
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_model_config_consistent_with_tokenizer(family):
    model = _model(family)
    cfg, text = model.config, model.config.text_config
    assert text.vocab_size == len(_processor(family).tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == len(_processor(family).tokenizer)
    # SmolVLM / Idefics3: also the real checkpoints' eos, which closes a turn in SmolVLM's template for videos
    eos = [4, _processor(family).tokenizer.convert_tokens_to_ids("<end_of_utterance>")] if family in IDEFICS3 else 4
    assert (text.bos_token_id, text.eos_token_id, text.pad_token_id) == (2, eos, 0)
    assert text.num_attention_heads == 4 and text.num_key_value_heads == 2
    assert 32 <= text.hidden_size <= 64
    gen = model.generation_config
    assert gen.eos_token_id == [IDS["<|im_end|>"], IDS["<|endoftext|>"]] and gen.pad_token_id == 0
    assert not model.training
    if family in QWEN:
        assert cfg.image_token_id == IDS["<|image_pad|>"] and cfg.video_token_id == IDS["<|video_pad|>"]
        assert cfg.vision_start_token_id == IDS["<|vision_start|>"]
        assert cfg.vision_end_token_id == IDS["<|vision_end|>"]
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        rotary = int(head_dim * text.rope_parameters.get("partial_rotary_factor", 1.0))  # Qwen3.5: a quarter
        assert sum(text.rope_parameters["mrope_section"]) == rotary // 2
        assert cfg.vision_config.patch_size == _processor(family).image_processor.patch_size
    elif family in GLM:
        tokenizer = _processor(family).tokenizer
        for glm, shared in tiny.GLM_TOKENS.items():
            assert tokenizer.convert_tokens_to_ids(glm) == IDS[shared]
        assert (cfg.image_token_id, cfg.video_token_id) == (IDS["<|image_pad|>"], IDS["<|video_pad|>"])
        assert (cfg.image_start_token_id, cfg.image_end_token_id) == (IDS["<|vision_start|>"], IDS["<|vision_end|>"])
        assert (cfg.video_start_token_id, cfg.video_end_token_id) == (IDS["<image>"], IDS["<video>"])
        rotated = text.hidden_size // text.num_attention_heads * text.rope_parameters["partial_rotary_factor"]
        assert sum(text.rope_parameters["mrope_section"]) == rotated // 2
        assert cfg.vision_config.patch_size == _processor(family).image_processor.patch_size
    elif family == "llava":
        assert cfg.image_token_id == IDS["<image>"] and getattr(cfg, "video_token_id", None) is None
        assert cfg.vision_config.model_type == "clip_vision_model" and text.model_type == "llama"
        processor = _processor(family)
        assert processor.image_token_id == cfg.image_token_id
        assert cfg.vision_config.patch_size == processor.patch_size
        assert cfg.vision_config.image_size == processor.image_processor.crop_size["height"]
        assert cfg.vision_feature_select_strategy == processor.vision_feature_select_strategy == "default"
        assert processor.num_additional_image_tokens == 1  # CLIP's CLS token
    elif family in LLAVA_NEXT:
        assert cfg.image_token_id == IDS["<image>"] and getattr(cfg, "video_token_id", None) == (
            IDS["<video>"] if family == "llava_next_video" else None)
        assert cfg.vision_config.model_type == "clip_vision_model"
        processor = _processor(family)
        assert cfg.image_grid_pinpoints == processor.image_processor.image_grid_pinpoints
        assert cfg.vision_config.image_size == processor.image_processor.crop_size["height"]
        assert cfg.vision_config.patch_size == processor.patch_size
        assert cfg.vision_feature_select_strategy == processor.vision_feature_select_strategy == "default"
        assert processor.num_additional_image_tokens == 1  # CLIP's CLS token
    elif family in IDEFICS3:
        processor = _processor(family)
        assert cfg.image_token_id == processor.image_token_id == IDS["<image>"] and text.model_type == "llama"
        vision, image_processor = cfg.vision_config, processor.image_processor
        assert vision.image_size == image_processor.max_image_size["longest_edge"]
        assert processor.image_seq_len == (vision.image_size // vision.patch_size) ** 2 // cfg.scale_factor ** 2
    elif family == "internvl":
        processor = _processor(family)
        assert cfg.image_token_id == processor.image_token_id and text.model_type == "qwen2"
        assert processor.tokenizer.convert_ids_to_tokens([processor.start_image_token_id, processor.end_image_token_id,
                                                          cfg.image_token_id]) == list(tiny.INTERNVL_TOKENS)
        vision = cfg.vision_config
        assert vision.image_size[0] == processor.image_processor.size["height"]
        assert processor.image_seq_length == cfg.image_seq_length == (
            vision.image_size[0] // vision.patch_size[0] // 2) ** 2
    elif family in GEMMA:
        processor = _processor(family)
        tokenizer = processor.tokenizer
        assert [cfg.boi_token_id, cfg.eoi_token_id, cfg.image_token_id] == [
            tokenizer.boi_token_id, tokenizer.eoi_token_id, tokenizer.image_token_id]
        assert cfg.vision_config.image_size == processor.image_processor.size["height"]
        assert processor.image_seq_length == cfg.mm_tokens_per_image
    elif family == "gemma4":
        processor = _processor(family)
        tokenizer = processor.tokenizer
        assert [cfg.boi_token_id, cfg.eoi_token_id, cfg.image_token_id, cfg.boa_token_id, cfg.eoa_token_index,
                cfg.audio_token_id] == [tokenizer.boi_token_id, tokenizer.eoi_token_id, tokenizer.image_token_id,
                                        tokenizer.boa_token_id, tokenizer.eoa_token_id, tokenizer.audio_token_id]
        assert cfg.video_token_id == tokenizer.convert_tokens_to_ids("<|video|>")
        for media in (processor.image_processor, processor.video_processor):
            assert (media.patch_size, media.pooling_kernel_size, media.max_soft_tokens) == (
                cfg.vision_config.patch_size, cfg.vision_config.pooling_kernel_size, processor.image_seq_length)
        assert processor.feature_extractor.feature_size == cfg.audio_config.subsampling_conv_channels[0]
        assert text.use_bidirectional_attention == "vision"
    elif family in PIXTRAL:
        processor = _processor(family)
        assert cfg.vision_config.model_type == "pixtral"
        assert cfg.image_token_id == processor.image_token_id == len(build_tokenizer())  # the first token added
        assert processor.tokenizer.convert_ids_to_tokens(processor.image_token_ids) == ["[IMG]", "[IMG_BREAK]",
                                                                                        "[IMG_END]"]
        assert processor.patch_size == cfg.vision_config.patch_size
        assert processor.spatial_merge_size == getattr(cfg, "spatial_merge_size", 1)
    else:
        assert cfg.image_token_index == IDS["<image>"] and cfg.video_token_index == IDS["<video>"]
        assert cfg.vision_config.model_type == "siglip_vision_model"
        processor = _processor(family)
        assert cfg.image_grid_pinpoints == processor.image_processor.image_grid_pinpoints
        assert cfg.vision_config.image_size == processor.image_processor.size["height"]


@pytest.mark.parametrize("family", FAMILIES)
def test_build_model_deterministic_and_rng_neutral(family):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build_model(family, seed=7)
    assert torch.equal(torch.rand(3), expected_next)  # global RNG untouched
    b = build_model(family, seed=7)
    c = build_model(family, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_build_rejects_unknown_family():
    with pytest.raises(ValueError):
        build_processor("fuyu")
    with pytest.raises(ValueError):
        build_model("fuyu")


# ---------------------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_image_tokens_match_visual_features(family):
    model, processor = _model(family), _processor(family)
    for size, expected in EXPECTED_IMAGE_TOKENS[family].items():
        inputs = _image_inputs(processor, make_image(size if isinstance(size, int) else 3, size))
        n_tokens = int((inputs["input_ids"] == _image_token_id(model)).sum())
        assert n_tokens == expected, size
        assert _visual_feature_count(family, model, inputs) == n_tokens
        with torch.no_grad():
            logits = model(**inputs).logits
        assert logits.shape == (*inputs["input_ids"].shape, len(processor.tokenizer))
        assert torch.isfinite(logits).all()
    if family in QWEN + GLM:
        # mm_token_type_ids marks exactly the image tokens (needed by generate for the mrope positions)
        assert torch.equal(inputs["mm_token_type_ids"] == 1, inputs["input_ids"] == _image_token_id(model))


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_16_new_tokens(family, attn_implementation):
    model, processor = _model(family, attn_implementation), _processor(family)
    assert model.config._attn_implementation == attn_implementation
    inputs = _image_inputs(processor, make_image(0))
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False, min_new_tokens=16)
    prompt_len = inputs["input_ids"].shape[1]
    assert out.shape == (1, prompt_len + 16)
    assert torch.equal(out[:, :prompt_len], inputs["input_ids"])
    new = out[0, prompt_len:]
    suppressed = [i for t, i in IDS.items() if t not in ("<|im_end|>", "<|endoftext|>")]
    assert not torch.isin(new, torch.tensor(suppressed)).any()
    assert isinstance(processor.decode(new, skip_special_tokens=True), str)
    again = model.generate(**inputs, max_new_tokens=16, do_sample=False, min_new_tokens=16)
    assert torch.equal(out, again)


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_different_image_sizes_left_padding(family):
    model, processor = _model(family), _processor(family)
    processor.tokenizer.padding_side = "left"
    prompts = [
        processor.apply_chat_template(_chat(q, with_image=True), add_generation_prompt=True)
        for q in ("what colour ?", "is there a red circle on the left side of the image ?")  # longer in every family
    ]
    images = [make_image(1, 56), make_image(2, (84, 42))]
    inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt")
    mask = inputs["attention_mask"]
    assert mask[:, -1].all() and not mask[:, 0].all()  # left padded
    per_row = (inputs["input_ids"] == _image_token_id(model)).sum(1).tolist()
    assert per_row == [EXPECTED_IMAGE_TOKENS[family][56], EXPECTED_IMAGE_TOKENS[family][(84, 42)]]
    assert _visual_feature_count(family, model, inputs) == sum(per_row)
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False, min_new_tokens=16)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 16)
    texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)


# ---------------------------------------------------------------------------------------------------------
# videos
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_generate(family):
    model, processor = _model(family), _processor(family)
    inputs = processor.apply_chat_template(
        _chat("what moves ?", video=make_video(0, frames=4)),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    if family in FRAMES_AS_IMAGES:  # one block per frame, in pixel_values
        assert "pixel_values_videos" not in inputs and inputs["pixel_values"].flatten(0, -4).shape == (4, 3, 32, 32)
    else:
        assert "pixel_values_videos" in inputs and "pixel_values" not in inputs
    n_tokens = int((inputs["input_ids"] == _video_token_id(model)).sum())
    assert n_tokens == EXPECTED_VIDEO_TOKENS[family]
    with torch.no_grad():
        if family in QWEN + GLM:
            assert torch.equal(
                inputs["mm_token_type_ids"] == 2, inputs["input_ids"] == _video_token_id(model)
            )
            feats = model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
            assert sum(f.shape[0] for f in feats.pooler_output) == n_tokens
        elif family == "gemma4":  # every frame an image
            assert torch.equal(inputs["mm_token_type_ids"] == 2, inputs["input_ids"] == _video_token_id(model))
            assert inputs["num_frames_per_video"].tolist() == [4] and inputs["pixel_values_videos"].shape[0] == 4
            feats = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_position_ids"],
                                                   inputs["num_frames_per_video"])
            assert sum(f.numel() for f in feats.pooler_output) // model.config.text_config.hidden_size == n_tokens
        elif family in FRAMES_AS_IMAGES:
            assert _visual_feature_count(family, model, inputs) == n_tokens
        else:
            assert inputs["pixel_values_videos"].shape == (1, 4, 3, 28, 28)
            feats = model.get_video_features(inputs["pixel_values_videos"]).pooler_output
            # one [tokens, hidden] row per video; LLaVA-NeXT-Video on transformers 5.20.0: [frames, tokens, hidden]
            assert sum(f.numel() for f in feats) // model.config.text_config.hidden_size == n_tokens
    if family == "qwen2_5_vl":
        assert inputs["second_per_grid_ts"].shape == (1,)
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False, min_new_tokens=16)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 16)


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_batch_via_processor_call(family):
    """Two videos of different sizes (PIL frame list + THWC uint8 array) in one left-padded batch."""
    model, processor = _model(family), _processor(family)
    processor.tokenizer.padding_side = "left"
    prompt = processor.apply_chat_template(_chat("what moves ?", with_video=True), add_generation_prompt=True)
    # LLaVA-OneVision stacks videos to (batch, frames, C, H, W): equal frame counts are required there.
    frames = 2 if family in QWEN + GLM else 4
    second = np.stack([np.asarray(f) for f in make_video(1, frames=frames, size=(70, 42))])
    inputs = processor(
        text=[prompt, prompt], videos=[make_video(0, frames=4), second], padding=True, return_tensors="pt"
    )
    per_row = (inputs["input_ids"] == _video_token_id(model)).sum(1).tolist()
    if family in QWEN + GLM:
        # 42x70 px -> 6x10 patches of 7 px; 2 frames -> 1 temporal step; 2x2 merge -> 15
        assert per_row == [32, 15]
    elif family == "gemma4":  # every frame resized keeping its aspect ratio: 70 x 42 px -> 6 x 10 tokens
        assert per_row == [EXPECTED_VIDEO_TOKENS[family], 4 * 60]
    else:  # every frame resized (and cropped) to one tile
        assert per_row == [EXPECTED_VIDEO_TOKENS[family]] * 2
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 4)


def test_qwen_video_processor_agrees_with_stock_image_processor():
    # two identical frames == one image (the stock image processor repeats an image over the temporal patch)
    processor = _processor("qwen2_vl")
    image = make_image(5, (70, 50))
    img = processor.image_processor(images=[image], return_tensors="np")
    vid = processor.video_processor([image, image], return_tensors="np")
    assert np.array_equal(img["image_grid_thw"], vid["video_grid_thw"])
    np.testing.assert_allclose(img["pixel_values"], vid["pixel_values_videos"], atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# pipeline and serialisation
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_image_text_to_text_pipeline(family):
    model, processor = _model(family), _processor(family)
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    messages = _chat("what is the colour of the left shape ?", image=make_image(0))
    result = pipe(text=messages, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    reply = result[0]["generated_text"][-1]
    assert reply["role"] == "assistant"
    assert isinstance(reply["content"], str) and reply["content"].strip()


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_save_and_auto_reload(family, tmp_path):
    processor = _processor(family)
    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(reloaded) is type(processor)
    assert type(reloaded.image_processor) is type(processor.image_processor)
    assert reloaded.chat_template == processor.chat_template
    assert reloaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    media = [{"image": make_image(4, (84, 56))}]
    if "video" in MODALITIES[family]:
        assert type(reloaded.video_processor) is type(processor.video_processor)
        media.append({"video": make_video(2, frames=4)})
    else:
        assert not hasattr(processor, "video_processor") and not hasattr(reloaded, "video_processor")
    for kwargs in media:
        a, b = (
            p.apply_chat_template(
                _chat("what colour ?", **kwargs),
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
            )
            for p in (processor, reloaded)
        )
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("family", FAMILIES)
def test_model_save_and_auto_reload(family, tmp_path):
    model, processor = _model(family), _processor(family)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    assert reloaded.generation_config.eos_token_id == model.generation_config.eos_token_id
    inputs = _image_inputs(processor, make_image(6, 70))
    a = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    b = reloaded.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)


def test_build_returns_matching_pair():
    model, processor = build("llava_onevision", image_size=42, seed=3)
    assert model.config.vision_config.image_size == 42
    assert processor.image_processor.size["height"] == 42
    assert processor.num_image_tokens == 36
    inputs = _image_inputs(processor, make_image(0, 84))
    assert int((inputs["input_ids"] == _image_token_id(model)).sum()) == _visual_feature_count(
        "llava_onevision", model, inputs
    )
    model.generate(**inputs, max_new_tokens=2)


def test_build_llava_returns_matching_pair():
    model, processor = build("llava", image_size=28, seed=3)
    assert model.config.vision_config.image_size == 28
    assert processor.image_processor.crop_size == {"height": 28, "width": 28}
    inputs = _image_inputs(processor, make_image(0, 84))
    n_tokens = int((inputs["input_ids"] == _image_token_id(model)).sum())
    assert n_tokens == 16 == _visual_feature_count("llava", model, inputs)
    model.generate(**inputs, max_new_tokens=2)


# ---------------------------------------------------------------------------------------------------------
# synthetic media
# ---------------------------------------------------------------------------------------------------------


def test_make_image_and_video_deterministic():
    a, b, c = make_image(0), make_image(0), make_image(1)
    assert isinstance(a, PIL.Image.Image) and a.mode == "RGB" and a.size == (56, 56)
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()
    assert len(set(np.asarray(a).reshape(-1, 3).view([("", np.uint8)] * 3).ravel())) >= 2
    assert make_image(0, (84, 42)).size == (84, 42)
    frames = make_video(3, frames=5, size=(70, 42))
    assert len(frames) == 5 and all(f.size == (70, 42) for f in frames)
    assert [f.tobytes() for f in frames] == [f.tobytes() for f in make_video(3, frames=5, size=(70, 42))]
    assert len({f.tobytes() for f in frames}) > 1  # something moves


def test_module_exports():
    assert FAMILIES == ("qwen2_vl", "qwen2_5_vl", "llava_onevision", "llava", "qwen3_vl", "qwen3_vl_moe", "glm4v",
                        "glm4v_moe", "qwen3_5", "qwen3_5_moe", "llava_next", "llava_next_video", "mistral3",
                        "llava_pixtral", "smolvlm", "idefics3", "internvl", "gemma3", "gemma4")
    assert (*FAMILIES, *made_up_family.FAMILIES) == tiny.FAMILIES  # live: the tests' registrations come after
    assert set(MODALITIES) == set(tiny.FAMILIES)
    image_only = ("llava", "llava_next", "mistral3", "llava_pixtral", "idefics3", "gemma3")
    assert all(MODALITIES[f] == ("image",) for f in image_only)
    assert all(MODALITIES[f] == ("image", "video") for f in FAMILIES if f not in image_only)
    for family in FAMILIES:  # a family has a video processor iff it takes videos
        assert hasattr(build_processor(family), "video_processor") == ("video" in MODALITIES[family])
    for name in tiny.__all__:
        assert hasattr(tiny, name)


def test_registry():
    assert tiny.get_family("llava") is tiny.LLAVA and tiny.LLAVA.model_class is LlavaForConditionalGeneration
    made_up = tiny.get_family(made_up_family.NAME)
    assert made_up.config is tiny.LLAVA.config and made_up.modalities == ("image",)
    model = build_model(made_up_family.NAME)
    assert type(model.config) is made_up_family.MadeUpLlavaConfig and model.config.model_type == made_up_family.NAME
    reference = build_model("llava").state_dict()  # the same tiny LLaVA-1.5 under another model_type
    assert all(torch.equal(t, reference[k]) for k, t in model.state_dict().items())
    with pytest.raises(ValueError, match="already registered"):
        tiny.register_family(tiny.LLAVA)
    with pytest.raises(ValueError, match="unknown family 'fuyu'"):
        tiny.get_family("fuyu")
