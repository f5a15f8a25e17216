"""Heat-map overlays, video strips, panels and explain_image (hf_tokenprune.viz)."""

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import CASES, chat, skip_where_transformers_fails_a_forward

from hf_tokenprune import Compressor, prune_wrap, score_inputs, tiny, viz
from hf_tokenprune.adapters import get_adapter
from hf_tokenprune.viz import colormap, explain_image, panel, relevance_overlay, video_overlay

SIZE = (84, 56)


def single(built, family: str, kind: str):
    """Model, one-sample inputs, the sample's regions, the frame count and a black frame of SIZE."""
    model, processor = built(family)
    processor.tokenizer.padding_side = "left"
    text = [processor.apply_chat_template(chat("what colour is the circle", kind), add_generation_prompt=True,
                                          tokenize=False)]
    media = {"images": [tiny.make_image(0, size=SIZE)]} if kind == "image" else \
        {"videos": [tiny.make_video(0, frames=4, size=SIZE)]}
    inputs = processor(text=text, return_tensors="pt", **media)
    regions = get_adapter(model).token_regions(inputs, 0, original_sizes=[SIZE])
    return model, inputs, regions, PIL.Image.new("RGB", SIZE, "black")


def extent(box: torch.Tensor, width: int, height: int) -> np.ndarray:
    """Mask of the pixels whose centres lie in ``box``."""
    xs, ys = (np.arange(width) + 0.5) / width, (np.arange(height) + 0.5) / height
    x0, y0, x1, y1 = box.tolist()
    return ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]


def finest(regions, frame: int) -> torch.Tensor:
    on = regions.on(0, frame)
    return on & (regions.level == int(regions.level[on].max()))


def test_colormap_ends_and_size_and_mode(built):
    assert colormap(np.array([0.0, 1.0])).tolist() == [[0, 0, 4], [252, 255, 164]]
    _, _, regions, black = single(built, "qwen2_vl", "image")
    values = torch.arange(len(regions), dtype=torch.float32)
    out = relevance_overlay(black, regions, values)
    assert (out.mode, out.size) == ("RGB", SIZE)
    assert relevance_overlay(black.convert("L"), regions, values, size=(168, 112)).size == (168, 112)
    with pytest.raises(ValueError, match="one value per visual token"):
        relevance_overlay(black, regions, values[:-1])


@pytest.mark.parametrize(("family", "kind"), CASES)
def test_the_max_token_paints_its_region_hottest(built, family, kind):
    _, _, regions, black = single(built, family, kind)
    frame = 1 if kind == "video" else 0
    candidates = finest(regions, frame).nonzero().flatten()
    k = int(candidates[len(candidates) // 2])
    values = torch.zeros(len(regions))
    values[k] = 1.0
    out = np.asarray(relevance_overlay(black, regions, values, frame=frame, alpha=1.0), dtype=int)
    brightness = out.sum(-1)
    hottest = brightness == brightness.max()
    assert np.array_equal(hottest, extent(regions.boxes[k], *SIZE))
    if regions.level.max() == 0:  # a single resolution: the token's own colour
        assert (out[hottest] == colormap(np.array(1.0))).all()


@pytest.mark.parametrize(("family", "kind"), CASES)
def test_kept_outlines_are_exactly_the_kept_regions(built, family, kind):
    _, _, regions, black = single(built, family, kind)
    frame = 1 if kind == "video" else 0
    kept = torch.randperm(len(regions), generator=torch.Generator().manual_seed(0))[: len(regions) // 3]
    out = np.asarray(relevance_overlay(black, regions, torch.rand(len(regions)), kept, frame=frame, alpha=0.0))
    expected = np.zeros(SIZE[::-1], dtype=bool)
    shown = torch.zeros(len(regions), dtype=torch.bool)
    shown[kept] = True
    for box in regions.boxes[shown & finest(regions, frame)]:
        inside = extent(box, *SIZE)
        rows, cols = inside.any(1).nonzero()[0], inside.any(0).nonzero()[0]
        expected[rows[[0, -1]], cols[0]:cols[-1] + 1] = True
        expected[rows[0]:rows[-1] + 1, cols[[0, -1]]] = True
    assert expected.any()
    assert np.array_equal((out == 255).all(-1), expected)
    assert ((out == 0) | (out == 255)).all()  # alpha 0: the black image, white outlines only


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_video_frames_side_by_side_on_one_scale(built, family):
    _, _, regions, black = single(built, family, "video")
    frames = [black] * regions.items[0].num_frames
    values = torch.rand(len(regions), generator=torch.Generator().manual_seed(1))
    kept = torch.arange(0, len(regions), 3)
    strip = video_overlay(frames, regions, values, kept, gap=3)
    assert strip.size == (len(frames) * SIZE[0] + 3 * (len(frames) - 1), SIZE[1])
    valid = regions.valid
    lo, hi = float(values[valid].min()), float(values[valid].max())
    for f in range(len(frames)):
        tile = strip.crop((f * (SIZE[0] + 3), 0, f * (SIZE[0] + 3) + SIZE[0], SIZE[1]))
        alone = relevance_overlay(black, regions, values, kept, frame=f, vmin=lo, vmax=hi)
        assert np.array_equal(np.asarray(tile), np.asarray(alone))
    assert (np.asarray(strip)[:, SIZE[0]:SIZE[0] + 3] == 255).all()  # the gap


def test_panel_places_titled_cells():
    red, blue = PIL.Image.new("RGB", (40, 30), "red"), PIL.Image.new("RGB", (20, 50), "blue")
    out = panel([[("a", red), ("b", blue)], [("c", blue)]], pad=6)
    pixels = np.asarray(out)
    assert out.mode == "RGB" and out.width >= 6 * 3 + 40 + 20 and out.height >= 6 * 3 + 50 + 50
    reds = (pixels == (255, 0, 0)).all(-1)
    rows, cols = reds.any(1).nonzero()[0], reds.any(0).nonzero()[0]
    assert (len(rows), len(cols), cols[0]) == (30, 40, 6) and reds.sum() == 30 * 40
    assert (pixels[6:rows[0], 6:46] < 128).any()  # the title, above its image
    blues = (pixels == (0, 0, 255)).all(-1)
    assert blues.sum() == 2 * 20 * 50


@pytest.mark.parametrize(("family", "kind"), CASES)
def test_explain_image_matches_prune_wrap(built, family, kind):
    skip_where_transformers_fails_a_forward(family, kind)
    model, processor = built(family)
    media = tiny.make_image(3, size=SIZE) if kind == "image" else tiny.make_video(3, frames=4, size=SIZE)
    question = "what colour is the circle"
    out = explain_image(model, processor, media, question, scorer="attention", ratio=0.25)
    assert out.size == ((SIZE[0] * 4 + 2 * 3, SIZE[1]) if kind == "video" else SIZE)
    # the same tokens as the wrapped model keeps, painted with A^0_v
    inputs = processor(text=[processor.apply_chat_template(chat(question, kind), add_generation_prompt=True,
                                                           tokenize=False)], return_tensors="pt",
                       **({"images": [media]} if kind == "image" else {"videos": [media]}))
    attention = score_inputs(model, inputs).first_layer_attention[0]
    prune_wrap(model, ratio=0.25, scorer="attention")
    with torch.no_grad():
        model(**inputs)
    kept = model.tokenprune.last_stats.kept_indices[0]
    regions = get_adapter(model).token_regions(inputs, 0, original_sizes=[SIZE])
    draw = video_overlay if kind == "video" else relevance_overlay
    assert np.array_equal(np.asarray(out), np.asarray(draw(media, regions, attention, kept)))


@pytest.mark.parametrize("kind", ["image", "video"])
def test_explain_image_takes_the_compressor_and_draws_what_prune_wrap_keeps(built, tmp_path, kind):
    model, processor = built("qwen2_vl")
    torch.manual_seed(0)
    Compressor(channels=(4, 8), kernel_size=3, base_model_type="qwen2_vl").save_pretrained(tmp_path / "c")
    media = tiny.make_image(3, size=SIZE) if kind == "image" else tiny.make_video(3, frames=4, size=SIZE)
    question = "what colour is the circle"
    out = explain_image(model, processor, media, question, scorer="compressor", compressor=str(tmp_path / "c"),
                        ratio=0.25, alpha=0.8)
    inputs = processor(text=[processor.apply_chat_template(chat(question, kind), add_generation_prompt=True,
                                                           tokenize=False)], return_tensors="pt",
                       **({"images": [media]} if kind == "image" else {"videos": [media]}))
    prune_wrap(model, ratio=0.25, compressor=str(tmp_path / "c"))
    with torch.no_grad():
        scores = model.tokenprune.scorer.score(score_inputs(model, inputs))[0]
        model(**inputs)
    kept = model.tokenprune.last_stats.kept_indices[0]
    regions = get_adapter(model).token_regions(inputs, 0, original_sizes=[SIZE])
    draw = video_overlay if kind == "video" else relevance_overlay
    assert np.array_equal(np.asarray(out), np.asarray(draw(media, regions, scores, kept, alpha=0.8)))


def test_explain_image_refuses_unknown_keywords_before_scoring(built, monkeypatch):
    model, processor = built("qwen2_vl")

    def never(*args, **kwargs):
        raise AssertionError("scored despite an unknown keyword")

    monkeypatch.setattr(viz, "score_inputs", never)
    for media, word in ((tiny.make_image(3, size=SIZE), "gap"), (tiny.make_image(3, size=SIZE), "compresor"),
                        (tiny.make_video(3, frames=4, size=SIZE), "frame")):
        with pytest.raises(TypeError, match=f"explain_image.*unexpected keyword.*{word}.*overlay options alpha"):
            explain_image(model, processor, media, "what colour is it", **{word: 1})
