"""Token geometry (``Adapter.token_regions``), checked against the processors' real pixel layout.

Ground truth: a bright square is drawn into a black image (or one video frame); the tokens whose regions meet
the square must be exactly the tokens whose vision-tower input (their ``pixel_values`` patches, gathered in the
model's own order: Qwen's merged rows, LLaVA-OneVision's ``pack_image_features`` / ``apply_pooling``, CLIP's
patch grid) changes. Square edges are kept 0.15 token (> half a resized pixel) away from every region edge, so
resampling blur cannot reach a neighbouring token.
"""

import math
import random

import numpy as np
import PIL.Image
import PIL.ImageDraw
import pytest
import torch
from conftest import CASES, chat, make_inputs, sample_images
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

from hf_tokenprune import tiny
from hf_tokenprune.adapters import MalformedVisualInputError, get_adapter
from hf_tokenprune.adapters.qwen2_vl import Qwen2VLAdapter

SIZES = {"qwen2_vl": (100, 60), "qwen2_5_vl": (100, 60), "llava_onevision": (90, 50), "llava": (60, 90),
         "qwen3_vl": (100, 60), "qwen3_vl_moe": (100, 60), "glm4v": (100, 60), "glm4v_moe": (100, 60),
         "qwen3_5": (100, 60), "qwen3_5_moe": (100, 60),
         "llava_next": (90, 50), "mistral3": (100, 60), "llava_pixtral": (60, 100),
         "smolvlm": (90, 40), "idefics3": (90, 40), "internvl": (90, 40),  # 1 x 2 tiles and the whole image
         "gemma3": (90, 40), "gemma4": (90, 40),
         # square: the video processor center-crops frames, and frame boxes are in the crop's coordinates
         "llava_next_video": (84, 84)}


def visual_count(adapter, inputs, b: int) -> int:
    return int(torch.isin(inputs["input_ids"][b], torch.tensor(adapter.visual_token_ids)).sum())


def coverage(boxes: torch.Tensor, n: int = 97) -> np.ndarray:
    """How many boxes cover each of ``n x n`` sample points of the unit square."""
    centres = (np.arange(n) + 0.5) / n
    x, y = centres[None, :, None], centres[:, None, None]
    b = boxes.numpy()
    return ((b[:, 0] <= x) & (x < b[:, 2]) & (b[:, 1] <= y) & (y < b[:, 3])).sum(-1)


def batch_regions(built, family: str, kind: str, images_per_sample: tuple[int, int] = (1, 1)):
    """``(adapter, inputs, sizes, regions)``: ``family``'s adapter, a two-sample batch of ``kind`` inputs
    (:func:`conftest.make_inputs`), its images' original sizes and each sample's ``token_regions``."""
    model, processor = built(family)
    adapter = get_adapter(model)
    inputs = make_inputs(processor, kind, images_per_sample=images_per_sample)
    sizes = [image.size for b, n in enumerate(images_per_sample) for image in sample_images(b, n)]
    return adapter, inputs, sizes, [adapter.token_regions(inputs, b, original_sizes=sizes) for b in range(2)]


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision", "llava"])
def test_items_of_a_multi_image_batch(built, family):
    adapter, inputs, sizes, (first, second) = batch_regions(built, family, "image", images_per_sample=(2, 1))
    processor = built(family)[1]
    assert [i.index for i in first.items] == [0, 1] and [i.index for i in second.items] == [2]
    assert first.items[0].stop == first.items[1].start and first.items[1].stop == len(first)
    assert len(first) == visual_count(adapter, inputs, 0) and len(second) == visual_count(adapter, inputs, 1)
    # sample 1 of the batch has the geometry of the same image processed alone
    alone = processor(text=[processor.apply_chat_template(chat("what", "image"), add_generation_prompt=True,
                                                          tokenize=False)], images=sample_images(1),
                      return_tensors="pt")
    single = adapter.token_regions(alone, 0, original_sizes=[sizes[2]])
    assert torch.equal(single.boxes.nan_to_num(-1), second.boxes.nan_to_num(-1))


def test_llava_needs_the_original_sizes(built):
    model, processor = built("llava")
    with pytest.raises(ValueError, match="original image sizes"):
        get_adapter(model).token_regions(make_inputs(processor, "image"), 0)


def test_placeholders_without_visual_inputs_are_malformed(built):
    model, processor = built("qwen2_vl")
    inputs = dict(make_inputs(processor, "image"))
    inputs["image_grid_thw"] = inputs["image_grid_thw"][:1]
    with pytest.raises(MalformedVisualInputError):
        get_adapter(model).token_regions(inputs, 1)


# -- ground truth -----------------------------------------------------------------------------------------------
def patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """``[n, C, H, W]`` -> ``[n, (H // p) * (W // p), C * p * p]``, row-major, as a stride-``p`` patch conv sees
    it (a remainder of ``H % p`` rows / columns is dropped)."""
    n, c, h, w = x.shape
    x = x[:, :, : h // p * p, : w // p * p].reshape(n, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(n, (h // p) * (w // p), c * p * p)


def token_inputs(model, inputs, kind: str) -> torch.Tensor:
    """``[N, D]``: each visual token's vision-tower input pixels (NaN for newline tokens), in the model's order."""
    config = model.config
    if isinstance(get_adapter(model), Qwen2VLAdapter):  # Qwen's merged-patch rows (Qwen3-VL, GLM-4V too)
        pixels = inputs["pixel_values" if kind == "image" else "pixel_values_videos"]
        return pixels.reshape(-1, config.vision_config.spatial_merge_size**2 * pixels.shape[1])
    patch = config.vision_config.patch_size
    if config.vision_config.model_type == "pixtral":  # one token per patch (Mistral 3: per merged 2 x 2 patches)
        side = patch * getattr(config, "spatial_merge_size", 1)
        return torch.cat([patches(pixels[None, :, :h, :w], side)[0]
                          for pixels, (h, w) in zip(inputs["pixel_values"], inputs["image_sizes"].tolist())])
    if config.model_type in ("smolvlm", "idefics3"):  # pixel-shuffled blocks of the non-empty tiles
        pixels = inputs["pixel_values"].flatten(0, 1)
        pixels = pixels[(pixels != 0).flatten(1).any(dim=1)]
        return model.model.connector.pixel_shuffle(patches(pixels, patch), config.scale_factor).flatten(0, 1)
    if config.model_type == "gemma3":  # patch grids average-pooled in square kernels
        side = config.vision_config.image_size // config.vision_config.patch_size
        return patches(inputs["pixel_values"], patch * side // int(config.mm_tokens_per_image ** 0.5)).flatten(0, 1)
    if config.model_type == "gemma4":  # each image's (frame's) patches average-pooled by position in k x k cells
        k, videos = config.vision_config.pooling_kernel_size, "_videos" if kind == "video" else ""
        cells = []
        for pixels, where in zip(inputs[f"pixel_values{videos}"], inputs[f"{kind}_position_ids"], strict=True):
            real = where[:, 0] >= 0
            cell = where[real] // k
            order = (cell[:, 0] + (cell[:, 0].max() + 1) * cell[:, 1]).argsort(stable=True)  # row by row
            cells.append(pixels[real][order].reshape(-1, k * k * pixels.shape[-1]))
        return torch.cat(cells)
    if config.model_type == "internvl":  # pixel-shuffled tiles (and video frames), the CLS token dropped
        grid = patches(inputs["pixel_values"], patch[0])
        side = int(grid.shape[1] ** 0.5)
        shuffled = model.model.pixel_shuffle(grid.view(-1, side, side, grid.shape[-1]), config.downsample_ratio)
        return shuffled.reshape(-1, shuffled.shape[-1])
    if config.model_type == "llava":
        return patches(inputs["pixel_values"], patch).flatten(0, 1)
    if kind == "video" and config.model_type == "llava_next_video":  # frames pooled, no newline token
        return model.model.vision_resampler(patches(inputs["pixel_values_videos"][0], patch)).flatten(0, 1)
    if kind == "video":
        pooled = model.model.apply_pooling(patches(inputs["pixel_values_videos"][0], patch))
        return torch.cat([pooled.flatten(0, 1), torch.full((1, pooled.shape[-1]), torch.nan)])
    # anyres: LLaVA-OneVision (an image of a multi-image sample is one tile) and LLaVA-NeXT
    onevision = config.model_type == "llava_onevision"
    counts = inputs["batch_num_images"].tolist() if onevision else [1]
    packing = {"vision_aspect_ratio": config.vision_aspect_ratio} if onevision else \
        {"vision_feature_select_strategy": config.vision_feature_select_strategy}
    out = []
    for i, size in enumerate(inputs["image_sizes"]):
        tiles = image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size) \
            if counts[0] == 1 else 1
        features = patches(inputs["pixel_values"][i][:tiles], patch)
        packed, _ = model.model.pack_image_features([features], inputs["image_sizes"][i:i + 1],
                                                    image_newline=torch.full((features.shape[-1],), torch.nan),
                                                    **packing)
        out.append(packed[0])
    return torch.cat(out)


def safe_squares(boxes: torch.Tensor, width: int, height: int, count: int = 6) -> list[tuple[int, int, int, int]]:
    """Up to ``count`` pixel squares (two sizes, drawn at random) that meet ``boxes`` and whose edges stay
    0.15 token away from every edge of ``boxes``."""
    size = (boxes[:, 2:] - boxes[:, :2]) * torch.tensor([width, height])
    found = []
    for side in (max(2, int(0.35 * float(size.min()))), int(1.4 * float(size.max()))):
        candidates = []
        for y in range(0, height - side + 1, 2):
            for x in range(0, width - side + 1, 2):
                ok = True
                for axis, (lo, hi), extent in ((0, (x, x + side), width), (1, (y, y + side), height)):
                    edges = boxes[:, [axis, axis + 2]] * extent
                    margin = 0.15 * (edges[:, 1] - edges[:, 0])[:, None]
                    ok &= bool(((edges - lo).abs() >= margin).all() and ((edges - hi).abs() >= margin).all())
                meets = (boxes[:, 0] * width < x + side) & (x < boxes[:, 2] * width) \
                    & (boxes[:, 1] * height < y + side) & (y < boxes[:, 3] * height)
                if ok and bool(meets.any()):
                    candidates.append((x, y, x + side, y + side))
        found += random.Random(0).sample(candidates, min(count // 2, len(candidates)))
    return found


def square_image(size: tuple[int, int], square: tuple[int, int, int, int] | None) -> PIL.Image.Image:
    image = PIL.Image.new("RGB", size, "black")
    if square is not None:
        PIL.ImageDraw.Draw(image).rectangle([square[0], square[1], square[2] - 1, square[3] - 1], fill="white")
    return image


def check_squares(model, process, kind: str, size: tuple[int, int], item: int = 0, frame: int = 0,
                  original_sizes=None) -> None:
    """``process(square)`` -> processor output with ``square`` drawn into item ``item``, frame ``frame``."""
    adapter = get_adapter(model)
    black = process(None)
    regions = adapter.token_regions(black, 0, original_sizes=original_sizes)
    on = regions.on(item, frame)
    squares = safe_squares(regions.boxes[on], *size)
    assert len(squares) >= 2
    reference = token_inputs(model, black, kind)
    assert reference.shape[0] == len(regions)
    for square in squares:
        changed = (token_inputs(model, process(square), kind) - reference).abs().amax(dim=1) > 0.05
        box = torch.tensor(square, dtype=torch.float64) / torch.tensor([*size, *size])
        b = regions.boxes
        meets = on & (b[:, 0] < box[2]) & (box[0] < b[:, 2]) & (b[:, 1] < box[3]) & (box[1] < b[:, 3])
        assert torch.equal(changed, meets), f"square {square}: tokens {changed.nonzero().flatten().tolist()} " \
                                            f"changed, regions say {meets.nonzero().flatten().tolist()}"


def prompt(processor, kind: str, count: int = 1) -> list[str]:
    return [processor.apply_chat_template(chat("where is the square", kind, count), add_generation_prompt=True,
                                          tokenize=False)]


@pytest.mark.parametrize(("family", "kind"), CASES)
def test_regions_match_the_pixels_the_tokens_see(built, family, kind):
    model, processor = built(family)
    size = SIZES[family]
    if kind == "image":
        def process(square):
            return processor(text=prompt(processor, kind), images=[square_image(size, square)], return_tensors="pt")
    else:  # the square in frame 1 of 4
        def process(square):
            frames = [square_image(size, square if f == 1 else None) for f in range(4)]
            return processor(text=prompt(processor, kind), videos=[frames], return_tensors="pt")
    check_squares(model, process, kind, size, frame=1 if kind == "video" else 0, original_sizes=[size])


def test_llava_onevision_multi_image_sample(built):
    """Images of a multi-image sample (nested ``images``): padded to a square, one tile + a newline token."""
    model, processor = built("llava_onevision")
    sizes = [(90, 50), (40, 70)]

    def process(square):
        images = [square_image(sizes[0], None), square_image(sizes[1], square)]
        return processor(text=prompt(processor, "image", 2), images=[images], return_tensors="pt")

    assert process(None)["batch_num_images"].tolist() == [2]
    check_squares(model, process, "image", sizes[1], item=1)


def test_llava_onevision_tiles_with_an_unseen_strip():
    """30-pixel tiles with patch 7: 4 patches cover 28 pixels of each tile (like SigLIP's 384 / 14)."""
    model = tiny.build_model("llava_onevision", image_size=30)
    processor = tiny.TinyLlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessorPil(size={"height": 30, "width": 30},
                                                        image_grid_pinpoints=model.config.image_grid_pinpoints),
        tokenizer=tiny.build_tokenizer(), video_processor=tiny.TinyLlavaOnevisionVideoProcessor(),
        num_image_tokens=16, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
        chat_template=tiny.LLAVA_ONEVISION_CHAT_TEMPLATE)
    size = (97, 61)

    def process(square):
        return processor(text=prompt(processor, "image"), images=[square_image(size, square)], return_tensors="pt")

    regions = get_adapter(model).token_regions(process(None), 0)
    assert len(regions) == visual_count(get_adapter(model), process(None), 0)
    assert coverage(regions.boxes[:16]).min() == 0  # the unseen strips
    check_squares(model, process, "image", size)


def test_llava_onevision_anyres_max_shrinks_the_grid(built):
    """More than ``anyres_max_N`` tiles: the unpadded grid is bilinearly shrunk; regions follow the count."""
    model, processor = built("llava_onevision")
    pinpoints = [[i * 28, j * 28] for i in range(1, 5) for j in range(1, 5)]
    saved = model.config.image_grid_pinpoints, processor.image_processor.image_grid_pinpoints
    model.config.image_grid_pinpoints = processor.image_processor.image_grid_pinpoints = pinpoints
    try:
        inputs = processor(text=prompt(processor, "image"), images=[square_image((112, 100), None)],
                           return_tensors="pt")
        regions = get_adapter(model).token_regions(inputs, 0)
        high = regions.level == 1
        rows = int((~regions.valid).sum())
        assert len(regions) == visual_count(get_adapter(model), inputs, 0)
        assert int(high.sum()) - rows < 14 * 16  # the unpadded grid has 14 x 16 cells
        assert coverage(regions.boxes[high & regions.valid]).max() == 1
        assert math.isclose(coverage(regions.boxes[high & regions.valid]).mean(), 1, abs_tol=0.1)
    finally:
        model.config.image_grid_pinpoints, processor.image_processor.image_grid_pinpoints = saved
