"""Structural tokens inside images, per family (docs/support.md, "Structural tokens").

* LLaVA-NeXT / LLaVA-NeXT-Video: the ``image_newline`` embedding closes every row of the anyres grid. Its tokens are
  ``<image>`` placeholders the model fills from the image's features, so they are visual tokens, scored and pruned
  like content: they count in the budget, their regions are empty, and dropping all of them still equals the masked
  reference.
* Mistral 3 and LLaVA with a Pixtral tower: ``[IMG_BREAK]`` / ``[IMG_END]`` are vocabulary tokens, so they are text:
  never pruned, not counted, not instruction; an image's rows form one item (one budget unit with scope="image").
"""

import pytest
import torch
from conftest import chat, greedy, make_inputs, masked_greedy

from hf_tokenprune import prune_wrap, score_inputs, tiny
from hf_tokenprune.adapters import get_adapter
from hf_tokenprune.adapters.llava import LlavaAdapter
from hf_tokenprune.adapters.pixtral import LlavaPixtralAdapter
from hf_tokenprune.scorers import Scorer

NEWLINE_FAMILIES = ["llava_next", "llava_next_video"]
PIXTRAL_FAMILIES = ["mistral3", "llava_pixtral"]


def newline_tokens(model, inputs) -> list[torch.Tensor]:
    """Per image, True where ``pack_image_features`` put the ``image_newline`` embedding (the model's own output)."""
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    return [(f == model.model.image_newline).all(dim=-1) for f in features]


class NewlinesLast(Scorer):
    """Scores the newline tokens (their embedding is ``image_newline``) below every other token."""

    def __init__(self, newline: torch.Tensor) -> None:
        self.newline = newline

    def score(self, inputs):
        return -(inputs.visual_embeds == self.newline).all(dim=-1).float()


@pytest.mark.parametrize("family", NEWLINE_FAMILIES)
def test_newline_tokens_are_visual_tokens_without_a_region(built, family):
    model, processor = built(family)
    inputs = make_inputs(processor, "image")
    newlines = newline_tokens(model, inputs)
    adapter = get_adapter(model)
    for b, expected in enumerate(newlines):
        regions = adapter.token_regions(inputs, b)
        assert torch.equal(~regions.valid, expected)  # the geometry finds them where the model puts them
        rows = int(expected.sum())
        assert 0 < rows < len(expected) and bool(expected[-1])  # one per row of the anyres grid, the last token last
    found = score_inputs(model, inputs)
    assert found.layout.counts == [len(n) for n in newlines]  # all placeholders are visual tokens


@pytest.mark.parametrize("family", NEWLINE_FAMILIES)
def test_newline_tokens_count_in_the_budget_and_may_all_be_pruned(built, family):
    model, processor = built(family)
    inputs = make_inputs(processor, "image")
    newlines = newline_tokens(model, inputs)
    prune_wrap(model, ratio=0.25, scorer=NewlinesLast(model.model.image_newline), scope="image")
    pruned = greedy(model, inputs, steps=6)
    stats = model.tokenprune.last_stats
    assert stats.visual_tokens_before == [len(n) for n in newlines]
    assert stats.visual_tokens_after == [-(-len(n) // 4) for n in newlines]
    assert all(not n[kept].any() for n, kept in zip(newlines, stats.kept_indices, strict=True))
    reference = masked_greedy(model, inputs, steps=6)
    assert torch.equal(pruned.sequences, reference.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(pruned.logits, reference.logits)) < 1e-4


def pixtral_tokens(processor) -> tuple[int, int, int]:
    return tuple(processor.tokenizer.convert_tokens_to_ids(["[IMG]", "[IMG_BREAK]", "[IMG_END]"]))


@pytest.mark.parametrize("family", PIXTRAL_FAMILIES)
def test_break_and_end_tokens_are_text_that_is_never_pruned(built, family):
    model, processor = built(family)
    inputs = make_inputs(processor, "image")
    image, row_break, end = pixtral_tokens(processor)
    ids = inputs["input_ids"]
    rows = [(inputs["image_sizes"][b] // 14).tolist() for b in range(2)]
    assert [int((r == end).sum()) for r in ids] == [1, 1]
    assert [int((r == row_break).sum()) for r in ids] == [h - 1 for h, _ in rows]
    found = score_inputs(model, inputs, scope="image")
    assert found.layout.segments == [[h * w] for h, w in rows]  # one unit per image, its rows joined
    assert torch.equal(found.layout.visual_mask, ids == image)
    assert not (found.layout.instruction_mask & ((ids == row_break) | (ids == end))).any()
    prune_wrap(model, ratio=0.25, scorer="attention", scope="image")
    out = greedy(model, inputs, steps=4)
    stats = model.tokenprune.last_stats
    assert stats.visual_tokens_before == [h * w for h, w in rows]
    # the pruned sequence keeps every text token: the breaks and ends included
    real = inputs["attention_mask"].sum(dim=1)
    assert stats.seq_len_after == max(int(n) - b + a for n, b, a in zip(real, stats.visual_tokens_before,
                                                                         stats.visual_tokens_after))
    assert torch.equal(out.sequences, masked_greedy(model, inputs, steps=4).sequences)


@pytest.mark.parametrize("family", PIXTRAL_FAMILIES)
def test_two_adjacent_images_and_a_prompt_ending_with_the_image(built, family):
    """``[IMG]...[IMG_END][IMG]...[IMG_END]`` splits per image by ``image_sizes``; with no text after the last
    ``[IMG_END]`` the instruction falls back to the last prompt token, as on every family."""
    model, processor = built(family)
    image, _, end = pixtral_tokens(processor)
    images = [tiny.make_image(0, size=(56, 84)), tiny.make_image(1, size=(84, 42))]
    text = processor.apply_chat_template(chat("what colour is the circle", "image"), add_generation_prompt=True,
                                         tokenize=False).replace("[IMG]", "[IMG][IMG]")
    inputs = processor(text=[text], images=images, return_tensors="pt")
    found = score_inputs(model, inputs, scope="image")
    assert found.layout.segments == [[6 * 4, 3 * 6]]
    bare = processor(text=["what colour is the circle [IMG]"], images=images[:1], return_tensors="pt")
    layout = score_inputs(model, bare).layout
    assert bare["input_ids"][0, -1] == end and layout.instruction_mask[0].nonzero().flatten().tolist() == [
        bare["input_ids"].shape[1] - 1]
    for call in (inputs, bare):
        prune_wrap(model, ratio=0.25, scorer="attention", scope="image")
        pruned = greedy(model, call, steps=4)
        reference = masked_greedy(model, call, steps=4)
        assert torch.equal(pruned.sequences, reference.sequences)
        assert max((a - b).abs().max().item() for a, b in zip(pruned.logits, reference.logits)) < 1e-4
    assert int((inputs["input_ids"] == image).sum()) == 6 * 4 + 3 * 6


def test_llava_checkpoints_get_the_adapter_of_their_vision_tower(built):
    assert type(get_adapter(built("llava_pixtral")[0])) is LlavaPixtralAdapter
    assert type(get_adapter(built("llava")[0])) is LlavaAdapter
