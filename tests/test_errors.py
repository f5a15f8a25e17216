"""Bad input gets a specific error before any compute, never a crash deep inside transformers."""

import re

import pytest
import torch
from conftest import chat, greedy, make_inputs
from transformers import LlamaConfig, LlamaForCausalLM

from hf_tokenprune import (
    Compressor,
    CompressorMismatchError,
    MalformedVisualInputError,
    UnsupportedModelError,
    prune_wrap,
    tiny,
    unwrap,
)
from hf_tokenprune.adapters import ADAPTERS


def test_unsupported_model_lists_the_supported_ones():
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2))
    with pytest.raises(UnsupportedModelError, match=re.escape(", ".join(sorted(ADAPTERS)))):
        prune_wrap(llm, ratio=0.5, scorer="attention")
    assert {"llava", "llava_next", "llava_next_video", "llava_onevision", "mistral3", "qwen2_5_vl", "qwen2_vl"} <= set(
        ADAPTERS)


@pytest.mark.parametrize("ratio", [0.0, -1.0, 1.5])
def test_bad_ratio(built, ratio):
    with pytest.raises(ValueError, match=r"ratio .* must be in \(0, 1\]"):
        prune_wrap(built("qwen2_vl")[0], ratio=ratio, scorer="attention")


def test_unknown_scorer(built):
    with pytest.raises(ValueError, match="unknown scorer 'fastv2'"):
        prune_wrap(built("qwen2_vl")[0], ratio=0.5, scorer="fastv2")


def test_compressor_scorer_without_a_compressor_says_what_to_pass(built):
    with pytest.raises(ValueError, match="compressor=<Hub repo id"):
        prune_wrap(built("qwen2_vl")[0], ratio=0.5, scorer="compressor")


def test_compressor_for_another_family(built):
    compressor = Compressor(base_model_type="llava_onevision")
    with pytest.raises(CompressorMismatchError, match="llava_onevision.*qwen2_vl|qwen2_vl.*llava_onevision"):
        prune_wrap(built("qwen2_vl")[0], ratio=0.5, compressor=compressor)
    model = prune_wrap(built("qwen2_vl")[0], ratio=0.5, compressor=compressor, allow_compressor_mismatch=True)
    assert model.tokenprune.config.allow_compressor_mismatch


def test_placeholders_that_do_not_match_the_images(built):
    """The images are given in the other order: the total token count matches (transformers' own check
    passes), the per-image placeholder runs do not."""
    model, processor = built("llava_onevision")
    inputs = make_inputs(processor, "image")
    image = model.config.image_token_id
    assert len(set((inputs["input_ids"] == image).sum(dim=1).tolist())) == 2
    inputs.update(pixel_values=inputs["pixel_values"].flip(0), image_sizes=inputs["image_sizes"].flip(0))
    prune_wrap(model, ratio=0.5, scorer="attention")
    with pytest.raises(MalformedVisualInputError, match="does not match the visual inputs"):
        greedy(model, inputs, steps=1)


def test_right_padding_is_refused(built):
    model, processor = built("llava_onevision")
    texts = [processor.apply_chat_template(chat(q, "image"), add_generation_prompt=True, tokenize=False)
             for q in ("what", "what colour is the big circle")]
    inputs = processor(text=texts, images=[tiny.make_image(0), tiny.make_image(1)], padding=True,
                       padding_side="right", return_tensors="pt")
    assert inputs["attention_mask"][0, -1] == 0
    prune_wrap(model, ratio=0.5, scorer="attention")
    with pytest.raises(ValueError, match="LEFT-padded"), torch.no_grad():
        model(**inputs)


def test_labels_are_refused_while_pruning(built):
    model, processor = built("qwen2_vl")
    inputs = make_inputs(processor, "image")
    prune_wrap(model, ratio=0.5, scorer="attention")
    with pytest.raises(ValueError, match="disabled"):
        model(**inputs, labels=inputs["input_ids"])
    with model.tokenprune.disabled():
        assert model(**inputs, labels=inputs["input_ids"]).loss is not None


def test_unwrap_of_an_unwrapped_model(built):
    with pytest.raises(ValueError, match="not wrapped"):
        unwrap(built("qwen2_vl")[0])
