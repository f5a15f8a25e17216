"""Gemma 3 and 4: the masks the multimodal model builds for the text model, rebuilt over the kept tokens.

Image tokens attend to each other bidirectionally within their run (Gemma 3: ``token_type_ids``, in every layer;
Gemma 4: ``mm_token_type_ids``, in the sliding-window layers), and sliding-window layers only look a window back.
After pruning, the kept image tokens of a run must stay one bidirectional block, and the window must cover the kept
tokens it covered in the unpruned sequence; both are checked against the masked reference, and both checks are shown
to fail (on Gemma 3) with the block structure left unsliced, or the window counted in kept tokens. Pan-and-scan crops
are runs of their own; Gemma 4's audio tokens are never pruned.
"""

import numpy as np
import pytest
import torch
from conftest import chat, greedy, make_inputs, masked_greedy

from hf_tokenprune import prune_wrap, score_inputs, tiny
from hf_tokenprune.adapters import UnsupportedMethodError, get_adapter
from hf_tokenprune.adapters import gemma3 as gemma3_adapter

WIDTH = 12  # a sliding window shorter than the prompts: it cuts in the prefill and on every decode step
GEMMA = ("gemma3", "gemma4")


def max_logit_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits, strict=True))


@pytest.fixture
def narrow():
    """``family -> model`` with a :data:`WIDTH`-token sliding window (config, attention layers, caches)."""

    def get(family: str):
        model = tiny.build_model(family)
        text = model.config.get_text_config()
        text.sliding_window = WIDTH
        for layer in model.model.get_decoder().layers:
            if layer.self_attn.sliding_window is not None:
                layer.self_attn.sliding_window = WIDTH
        return model

    return get


@pytest.mark.parametrize("family", GEMMA)
def test_a_cutting_sliding_window_equals_the_masked_reference(built, narrow, family):
    model, processor = narrow(family), built(family)[1]
    inputs = make_inputs(processor, "image")
    assert inputs["attention_mask"].sum(dim=1).min() > 2 * WIDTH
    with torch.no_grad():
        wide, cut = built(family)[0](**inputs).logits, model(**inputs).logits
    assert (wide - cut).abs().max() > 1e-4  # the window cuts
    prune_wrap(model, ratio=0.25, scorer="attention")
    pruned = greedy(model, inputs, steps=8)
    reference = masked_greedy(model, inputs, steps=8)
    assert torch.equal(pruned.sequences, reference.sequences)
    assert max_logit_diff(pruned, reference) < 1e-4


def test_a_window_counted_in_kept_tokens_fails_the_masked_reference(built, narrow, monkeypatch):
    """The deliberate bug: the window of the pruned sequence's own indices (a kept token then sees further back than
    it did unpruned)."""
    model, processor = narrow("gemma3"), built("gemma3")[1]
    inputs = make_inputs(processor, "image")

    def in_slots(slots, past, width):
        index = torch.arange(slots.shape[1])
        return (index[past:, None] - index[None, :] < width).expand(slots.shape[0], -1, -1)

    monkeypatch.setattr(gemma3_adapter, "_position_window", in_slots)
    prune_wrap(model, ratio=0.25, scorer="attention")
    pruned = greedy(model, inputs, steps=8)
    assert max_logit_diff(pruned, masked_greedy(model, inputs, steps=8)) > 1e-4


@pytest.mark.parametrize("bug", ["unsliced", "none"])
def test_the_bidirectional_image_mask_left_unsliced_fails_the_masked_reference(built, monkeypatch, bug):
    """The deliberate bug: the image blocks of the unpruned sequence laid over the pruned one by slot ("unsliced"),
    or no bidirectional block at all ("none"). Correctly sliced, the same run equals the masked reference."""
    model, processor = built("gemma3")
    inputs = make_inputs(processor, "image")
    prune_wrap(model, ratio=0.25, scorer="attention")
    pruned = greedy(model, inputs, steps=6)
    assert max_logit_diff(pruned, masked_greedy(model, inputs, steps=6)) < 1e-4
    unpruned = gemma3_adapter.get_block_sequence_ids_for_mask(inputs["token_type_ids"])

    def wrong(kept, device=None):
        return unpruned[:, -kept.shape[1]:] if bug == "unsliced" else torch.full_like(kept, -1)

    monkeypatch.setattr(gemma3_adapter, "get_block_sequence_ids_for_mask", wrong)
    pruned = greedy(model, inputs, steps=6)
    assert max_logit_diff(pruned, masked_greedy(model, inputs, steps=6)) > 1e-4


@pytest.mark.parametrize(("family", "bidirectional"), [("gemma3", {"full_attention", "sliding_attention"}),
                                                       ("gemma4", {"sliding_attention"})])
def test_kept_image_tokens_of_a_run_attend_to_each_other(built, family, bidirectional):
    """The rebuilt masks (the window wider than the prompt): causal, plus every kept image token of a run to every
    other one in the layer types transformers makes bidirectional."""
    model, processor = built(family)
    inputs = make_inputs(processor, "image", batch=1)
    prune_wrap(model, ratio=0.5, scorer="random", seed=0)
    seen = []
    handle = model.model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["attention_mask"]), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    stats = model.tokenprune.last_stats
    kept = stats.kept_indices[0]
    image = (inputs[get_adapter(model).token_types][0] == 1).nonzero().flatten()
    start = int(image[0])  # the text before the image is kept whole
    block = torch.arange(start, start + len(kept))
    assert seen[0].keys() == {"full_attention", "sliding_attention"}
    causal = torch.ones(stats.seq_len_after, stats.seq_len_after, dtype=torch.bool).tril()
    for kind, mask in seen[0].items():
        expected = causal.clone()
        if kind in bidirectional:
            expected[block[:, None], block[None, :]] = True
        assert torch.equal(causal if mask is None else mask[0, 0].bool(), expected), kind  # None: sdpa's causal


def pan_and_scan(processor, texts, images):
    return processor(text=texts, images=images, padding=True, return_tensors="pt", do_pan_and_scan=True,
                     pan_and_scan_min_crop_size=16)


def test_pan_and_scan_crops_are_runs_of_their_own(built):
    model, processor = built("gemma3")
    processor.tokenizer.padding_side = "left"
    text = processor.apply_chat_template(chat("what colour is the circle", "image"), add_generation_prompt=True,
                                         tokenize=False)
    images = [tiny.make_image(0, size=(120, 40)), tiny.make_image(1, size=(56, 56))]  # 3 crops; none
    inputs = pan_and_scan(processor, [text, text], images)
    assert inputs["pixel_values"].shape[0] == 1 + 3 + 1
    found = score_inputs(model, inputs, scope="image")
    assert found.layout.segments == [[16] * 4, [16]]  # the image and each crop: one unit each
    blocks = gemma3_adapter.get_block_sequence_ids_for_mask(inputs["token_type_ids"])
    assert blocks.amax(dim=1).tolist() == [3, 0]  # four bidirectional blocks, one
    regions = get_adapter(model).token_regions(inputs, 0)
    assert [(i.kind, i.index) for i in regions.items] == [("image", i) for i in range(4)]
    prune_wrap(model, ratio=0.25, scorer="attention", scope="image")
    pruned = greedy(model, inputs, steps=6)
    assert model.tokenprune.last_stats.visual_tokens_after == [16, 4]
    reference = masked_greedy(model, inputs, steps=6)
    assert torch.equal(pruned.sequences, reference.sequences)
    assert max_logit_diff(pruned, reference) < 1e-4
    for b in range(2):
        alone = greedy(model, pan_and_scan(processor, [text], images[b:b + 1]), steps=6)
        assert torch.equal(alone.sequences[0, -6:], pruned.sequences[b, -6:])


def test_image_markers_are_text_that_is_never_pruned_and_never_instruction(built):
    model, processor = built("gemma3")
    inputs = make_inputs(processor, "image", batch=1)
    ids = inputs["input_ids"][0]
    found = score_inputs(model, inputs)
    words = processor.tokenizer.convert_ids_to_tokens(ids[found.layout.instruction_mask[0]])
    assert words == ["what", "colour", "is", "the", "circle"]
    markers = torch.isin(ids, torch.tensor([processor.tokenizer.boi_token_id, processor.tokenizer.eoi_token_id]))
    assert int(markers.sum()) == 2 and not (markers & found.layout.visual_mask[0]).any()
    prune_wrap(model, ratio=0.25, scorer="attention")
    greedy(model, inputs, steps=2)
    assert model.tokenprune.last_stats.seq_len_after == len(ids) - 12


def test_audio_tokens_are_never_pruned_and_never_instruction(built):
    """Gemma 4 with a clip and an image per sample: only image tokens are visual; the audio run and its markers stay
    whole, and the pruned model equals the masked reference."""
    model, processor = built("gemma4")
    processor.tokenizer.padding_side = "left"
    questions = ["what colour is the circle", "what shape is left of the red square ?"]
    texts = [processor.apply_chat_template([{"role": "user", "content": [
        {"type": "audio"}, {"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True,
        tokenize=False) for q in questions]
    clips = [np.random.default_rng(b).standard_normal(8000 * (b + 1)).astype(np.float32) for b in range(2)]
    images = [tiny.make_image(b, size=(56 + 28 * b, 56)) for b in range(2)]
    inputs = processor(text=texts, images=images, audio=clips, padding=True, return_tensors="pt")
    ids, cfg = inputs["input_ids"], model.config
    audio = ids == cfg.audio_token_id
    assert audio.sum(dim=1).tolist() == [13, 25]
    found = score_inputs(model, inputs)
    assert torch.equal(found.layout.visual_mask, ids == cfg.image_token_id)
    assert found.layout.instruction_mask.sum(dim=1).tolist() == [5, 9]
    assert not (found.layout.instruction_mask & audio).any()
    prune_wrap(model, ratio=0.25, scorer="attention")
    pruned = greedy(model, inputs, steps=6)
    stats = model.tokenprune.last_stats
    assert stats.visual_tokens_before == [64, 60] and stats.visual_tokens_after == [16, 15]
    kept = inputs["attention_mask"].sum(dim=1) - torch.tensor([64 - 16, 60 - 15])  # only image tokens dropped
    assert stats.seq_len_after == int(kept.max())
    reference = masked_greedy(model, inputs, steps=6)
    assert torch.equal(pruned.sequences, reference.sequences)
    assert max_logit_diff(pruned, reference) < 1e-4


def test_masks_that_are_not_4d_tensors_are_refused_with_the_reason(built):
    """Flex attention's block masks are not rebuilt: the first pruned call says so."""
    model = tiny.build_model("gemma3", attn_implementation="flex_attention")
    prune_wrap(model, ratio=0.25, scorer="attention")
    with pytest.raises(ValueError, match="not as BlockMask: load the model with attn_implementation='sdpa' or"):
        greedy(model, make_inputs(built("gemma3")[1], "image"), steps=1)


def test_pruning_inside_the_llm_is_refused_with_the_reason(built):
    with pytest.raises(UnsupportedMethodError, match="one prepared 4-D mask per layer type"):
        prune_wrap(built("gemma3")[0], ratio=0.25, scorer="fastv", layer=1)
