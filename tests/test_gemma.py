"""Gemma 3: the masks the multimodal model builds for the text model, rebuilt over the kept tokens.

Image tokens attend to each other bidirectionally within their run (``token_type_ids``), and sliding-window layers
only look a window back. After pruning, the kept image tokens of a run must stay one bidirectional block, and the
window must cover the kept tokens it covered in the unpruned sequence; both are checked against the masked reference,
and both checks are shown to fail with the block structure left unsliced, or the window counted in kept tokens.
Pan-and-scan crops are runs of their own.
"""

import pytest
import torch
from conftest import chat, greedy, make_inputs, masked_greedy

from hf_tokenprune import prune_wrap, score_inputs, tiny
from hf_tokenprune.adapters import UnsupportedMethodError, get_adapter
from hf_tokenprune.adapters import gemma3 as gemma3_adapter

WIDTH = 12  # a sliding window shorter than the prompts: it cuts in the prefill and on every decode step


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


def test_a_cutting_sliding_window_equals_the_masked_reference(built, narrow):
    model, processor = narrow("gemma3"), built("gemma3")[1]
    inputs = make_inputs(processor, "image")
    assert inputs["attention_mask"].sum(dim=1).min() > 2 * WIDTH
    with torch.no_grad():
        wide, cut = built("gemma3")[0](**inputs).logits, model(**inputs).logits
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

    def in_slots(positions, width):
        return lambda batch_idx, head_idx, q_idx, kv_idx: q_idx - kv_idx < width

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


def test_kept_image_tokens_of_a_run_attend_to_each_other(built):
    """The rebuilt full-attention mask: causal, plus every kept image token of a run to every other one."""
    model, processor = built("gemma3")
    inputs = make_inputs(processor, "image", batch=1)
    prune_wrap(model, ratio=0.5, scorer="random", seed=0)
    seen = []
    handle = model.model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["attention_mask"]), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    mask = seen[0]["full_attention"][0, 0]
    kept = model.tokenprune.last_stats.kept_indices[0]
    image = (inputs["token_type_ids"][0] == 1).nonzero().flatten()
    start = int(image[0])  # the text before the image is kept whole
    block = torch.arange(start, start + len(kept))
    expected = torch.ones(len(mask), len(mask), dtype=torch.bool).tril()
    expected[block[:, None], block[None, :]] = True
    assert torch.equal(mask.bool(), expected)


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


def test_pruning_inside_the_llm_is_refused_with_the_reason(built):
    with pytest.raises(UnsupportedMethodError, match="one prepared 4-D mask per layer type"):
        prune_wrap(built("gemma3")[0], ratio=0.25, scorer="fastv", layer=1)
