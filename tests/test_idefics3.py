"""SmolVLM and Idefics3: an image is many blocks of ``<image>`` placeholders between text markers.

Decision on the structural tokens (docs/support.md, "Structural tokens"): ``<fake_token_around_image>``,
``<row_r_col_c>``, ``<global-img>`` (and the newlines between tile rows) are vocabulary tokens, so they are text:
never pruned, not counted in the budget, not instruction. An image's blocks form one item (one budget unit with
scope="image"); each frame of a SmolVLM video is its own item.
"""

import pytest
import torch
from conftest import chat, greedy, masked_greedy
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

from hf_tokenprune import prune_wrap, score_inputs, tiny
from hf_tokenprune.adapters import get_adapter

FAMILIES = ["smolvlm", "idefics3"]
QUESTIONS = ["what colour is the circle", "what shape is left of the red square ?"]
SIZES = [(56, 56), (40, 100)]  # 2 x 2 tiles + the global image: 5 blocks; 2 x 1 tiles + the global image: 3 blocks


def markers(processor) -> list[int]:
    tokens = ["<fake_token_around_image>", "<global-img>", *(f"<row_{r}_col_{c}>" for r in (1, 2) for c in (1, 2))]
    return processor.tokenizer.convert_tokens_to_ids(tokens)


def prompt(processor, question: str, kind: str = "image", count: int = 1) -> str:
    return processor.apply_chat_template(chat(question, kind, count), add_generation_prompt=True, tokenize=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_of_images_with_different_block_counts_equals_each_sample_alone(built, family):
    model, processor = built(family)
    processor.tokenizer.padding_side = "left"
    images = [tiny.make_image(b, size=size) for b, size in enumerate(SIZES)]
    batch = processor(text=[prompt(processor, q) for q in QUESTIONS], images=images, padding=True,
                      return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()
    prune_wrap(model, ratio=0.25, scorer="attention")
    together = greedy(model, batch, steps=8)
    stats = model.tokenprune.last_stats
    assert stats.visual_tokens_before == [5 * 16, 3 * 16]
    for b, question in enumerate(QUESTIONS):
        alone_inputs = processor(text=[prompt(processor, question)], images=[images[b]], return_tensors="pt")
        alone = greedy(model, alone_inputs, steps=8)
        assert torch.equal(model.tokenprune.last_stats.kept_indices[0], stats.kept_indices[b])
        assert torch.equal(alone.sequences[0, alone_inputs["input_ids"].shape[1]:],
                           together.sequences[b, batch["input_ids"].shape[1]:])
        assert max((a[0] - t[b]).abs().max().item() for a, t in zip(alone.logits, together.logits)) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_markers_are_text_that_is_never_pruned_and_never_instruction(built, family):
    model, processor = built(family)
    images = [tiny.make_image(b, size=size) for b, size in enumerate(SIZES)]
    inputs = processor(text=[prompt(processor, QUESTIONS[0], count=2)], images=[images], return_tensors="pt")
    ids = inputs["input_ids"]
    found = score_inputs(model, inputs, scope="image")
    assert found.layout.segments == [[5 * 16, 3 * 16]]  # one unit per image, its blocks joined
    assert torch.equal(found.layout.visual_mask, ids == model.config.image_token_id)
    structural = torch.isin(ids, torch.tensor(markers(processor)))
    assert int(structural.sum()) == (2 * 4 + 3) + (2 * 2 + 3)  # <fake><row> per tile, <fake><global-img> ... <fake>
    words = processor.tokenizer.convert_ids_to_tokens(ids[found.layout.instruction_mask])
    assert words == QUESTIONS[0].split()
    prune_wrap(model, ratio=0.25, scorer="attention", scope="image")
    out = greedy(model, inputs, steps=4)
    stats = model.tokenprune.last_stats
    assert stats.visual_tokens_after == [20 + 12]
    assert stats.seq_len_after == ids.shape[1] - (128 - 32)  # every marker stays
    assert torch.equal(out.sequences, masked_greedy(model, inputs, steps=4).sequences)


def test_video_frames_are_units_for_pruning_and_one_video_for_the_heat_maps(built):
    model, processor = built("smolvlm")
    inputs = processor(text=[prompt(processor, QUESTIONS[0], "video")], videos=[tiny.make_video(0, frames=3)],
                       return_tensors="pt")
    assert score_inputs(model, inputs, scope="image").layout.segments == [[16, 16, 16]]
    regions = get_adapter(model).token_regions(inputs, 0)
    assert [(i.kind, i.index, i.start, i.stop, i.num_frames) for i in regions.items] == [("video", 0, 0, 48, 3)]
    assert regions.frames[:, 0].tolist() == [f for f in range(3) for _ in range(16)]


@pytest.mark.parametrize("longest", [2, 3, 4])
def test_the_tile_grid_is_the_image_processors(built, longest):
    """The grid of a split image, from its size and tile count, is the one the image processor made (real
    checkpoints resize the longest edge to 4 tiles)."""
    adapter = get_adapter(built("idefics3")[0])
    tile = tiny.IDEFICS3_TILE
    processor = Idefics3ImageProcessorPil(size={"longest_edge": longest * tile}, max_image_size={"longest_edge": tile})
    sizes = [(w, h) for w in range(20, 260, 23) for h in range(15, 260, 31)]
    out = processor([[tiny.make_image(0, size=s)] for s in sizes], return_row_col_info=True)
    for (width, height), rows, cols in zip(sizes, out["rows"], out["cols"], strict=True):
        assert adapter.tile_grid(width, height, rows[0] * cols[0]) == (rows[0], cols[0]), (width, height)


def test_token_geometry_of_a_split_image_needs_its_size(built):
    model, processor = built("smolvlm")
    inputs = processor(text=[prompt(processor, "what")], images=[tiny.make_image(0)], return_tensors="pt")
    with pytest.raises(ValueError, match="original image sizes"):
        get_adapter(model).token_regions(inputs, 0)
