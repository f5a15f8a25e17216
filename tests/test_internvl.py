"""InternVL: an image is one run of ``<IMG_CONTEXT>`` blocks (its tiles, then a thumbnail) between ``<img>`` and
``</img>``.

Decision on the structural tokens (docs/support.md, "Structural tokens"): ``<img>`` / ``</img>`` (and a video's
``Frame{i}:`` lines) are vocabulary tokens, so they are text: never pruned, not counted, not instruction. An image's
tiles and thumbnail form one item (one budget unit with scope="image"); each video frame is its own item.
"""

import pytest
import torch
from conftest import chat, greedy, masked_greedy
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
    GotOcr2ImageProcessorPil,
    get_optimal_tiled_canvas,
)

from hf_tokenprune import prune_wrap, score_inputs, tiny
from hf_tokenprune.adapters import get_adapter


def prompt(processor, kind: str = "image", count: int = 1) -> str:
    return processor.apply_chat_template(chat("what colour is the circle", kind, count), add_generation_prompt=True,
                                         tokenize=False)


def test_image_markers_are_text_that_is_never_pruned_and_never_instruction(built):
    model, processor = built("internvl")
    images = [tiny.make_image(0, size=(56, 56)), tiny.make_image(1, size=(84, 42))]  # 2 x 2 + 1, 2 x 1 + 1 tiles
    inputs = processor(text=[prompt(processor, count=2)], images=images, return_tensors="pt")
    ids = inputs["input_ids"]
    found = score_inputs(model, inputs, scope="image")
    assert found.layout.segments == [[5 * 16, 3 * 16]]  # one unit per image: its tiles and thumbnail
    markers = torch.isin(ids, torch.tensor([processor.start_image_token_id, processor.end_image_token_id]))
    assert int(markers.sum()) == 4
    words = processor.tokenizer.convert_ids_to_tokens(ids[found.layout.instruction_mask])
    assert words == ["what", "colour", "is", "the", "circle"]
    prune_wrap(model, ratio=0.25, scorer="attention", scope="image")
    out = greedy(model, inputs, steps=4)
    stats = model.tokenprune.last_stats
    assert stats.visual_tokens_after == [20 + 12]
    assert stats.seq_len_after == ids.shape[1] - (128 - 32)  # <img> / </img> stay
    assert torch.equal(out.sequences, masked_greedy(model, inputs, steps=4).sequences)


def test_video_frames_are_units_for_pruning_and_one_video_for_the_heat_maps(built):
    model, processor = built("internvl")
    inputs = processor(text=[prompt(processor, "video")], videos=[tiny.make_video(0, frames=3)], return_tensors="pt")
    assert score_inputs(model, inputs, scope="image").layout.segments == [[16, 16, 16]]
    regions = get_adapter(model).token_regions(inputs, 0)
    assert [(i.kind, i.index, i.start, i.stop, i.num_frames) for i in regions.items] == [("video", 0, 0, 48, 3)]
    # a lone one-tile image is an image
    small = processor(text=[prompt(processor)], images=[tiny.make_image(0, size=(28, 28))], return_tensors="pt")
    regions = get_adapter(model).token_regions(small, 0, original_sizes=[(28, 28)])
    assert [(i.kind, i.start, i.stop) for i in regions.items] == [("image", 0, 16)]


@pytest.mark.parametrize("max_tiles", [6, 12])
def test_the_tile_grid_is_the_image_processors(built, max_tiles):
    """The grid of a split image, from its size and tile count, is the one the image processor chose among all
    grids of up to ``max_tiles`` tiles (the real checkpoints: 12)."""
    adapter = get_adapter(built("internvl")[0])
    tile = tiny.INTERNVL_TILE
    processor = GotOcr2ImageProcessorPil(size={"height": tile, "width": tile}, crop_to_patches=True,
                                         max_patches=max_tiles)
    split = 0
    for width, height in [(w, h) for w in range(20, 260, 23) for h in range(15, 260, 31)]:
        cols, rows = get_optimal_tiled_canvas((height, width), (tile, tile), 1, max_tiles)
        pixels = processor([tiny.make_image(0, size=(width, height))], return_tensors="pt")["pixel_values"]
        assert pixels.shape[0] == (rows * cols + 1 if rows * cols > 1 else 1)
        if rows * cols > 1:
            split += 1
            assert adapter.tile_grid(width, height, rows * cols) == (rows, cols), (width, height)
    assert split > 50
