"""Per-visual-token values painted over the original image or video frames, and titled panels (PIL + numpy).

A pixel's value is the mean over the tokens whose region (:meth:`~hf_tokenprune.adapters.Adapter.token_regions`)
covers its centre, so LLaVA-OneVision's thumbnail and high-resolution tokens combine. Values are scaled to the
colour map over the painted item's tokens (all frames of a video), or over ``[vmin, vmax]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
from torch import nn

from .adapters import TokenRegions, get_adapter
from .config import TokenPruneConfig
from .methods import build_scorer
from .pruning import select_top
from .scorers import Scorer
from .wrap import score_inputs

# 11 evenly spaced samples of matplotlib's perceptually uniform maps, interpolated linearly.
CMAPS: dict[str, tuple[str, ...]] = {
    "inferno": ("000004", "160b39", "420a68", "6a176e", "932667", "bc3754", "dd513a", "f37819", "fca50a",
                "f6d746", "fcffa4"),
    "viridis": ("440154", "482475", "414487", "355f8d", "2a788e", "21918c", "22a884", "44bf70", "7ad151",
                "bddf26", "fde725"),
}
Values = torch.Tensor | np.ndarray | Sequence[float]
Indices = torch.Tensor | np.ndarray | Sequence[int]  # token indices, or a bool mask over the tokens


def colormap(x: np.ndarray, cmap: str = "inferno") -> np.ndarray:
    """Colours (``[..., 3]`` uint8) of ``x`` in ``[0, 1]`` (clipped) under ``cmap`` (a key of :data:`CMAPS`)."""
    stops = np.array([[int(h[i:i + 2], 16) for i in (0, 2, 4)] for h in CMAPS[cmap]], dtype=np.float64)
    pos = np.clip(np.asarray(x, dtype=np.float64), 0, 1) * (len(stops) - 1)
    low = np.minimum(pos.astype(int), len(stops) - 2)
    frac = (pos - low)[..., None]
    return np.round(stops[low] * (1 - frac) + stops[low + 1] * frac).astype(np.uint8)


def pixel_extents(boxes: torch.Tensor, width: int, height: int) -> np.ndarray:
    """``[n, 4]`` int ``(c0, r0, c1, r1)``: the pixel columns ``[c0, c1)`` and rows ``[r0, r1)`` of a
    ``width x height`` image whose centres lie in each (finite) box."""
    b = boxes.double().cpu().numpy() * np.array([width, height, width, height])
    return np.clip(np.ceil(b - 0.5), 0, [width, height, width, height]).astype(int)


def token_map(regions: TokenRegions, values: Values, width: int, height: int, *, item: int = 0,
              frame: int = 0) -> np.ndarray:
    """``[height, width]`` mean value of the tokens covering each pixel of frame ``frame`` of item ``item``
    (NaN where none does). ``values``: one per visual token of the sample (NaN: not painted)."""
    v = _as_values(values, regions)
    on = regions.on(item, frame).numpy() & np.isfinite(v)
    c0, r0, c1, r1 = pixel_extents(regions.boxes[torch.from_numpy(on)], width, height).T
    total, count = np.zeros((height + 1, width + 1)), np.zeros((height + 1, width + 1))
    for acc, w in ((total, v[on]), (count, np.ones(int(on.sum())))):
        for rows, cols, sign in ((r0, c0, 1), (r0, c1, -1), (r1, c0, -1), (r1, c1, 1)):
            np.add.at(acc, (rows, cols), sign * w)
    total, count = (a.cumsum(0).cumsum(1)[:height, :width] for a in (total, count))
    count = np.round(count)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def relevance_overlay(image: PIL.Image.Image, regions: TokenRegions, values: Values,
                      kept: Indices | None = None, *, item: int = 0, frame: int = 0, alpha: float = 0.55,
                      cmap: str = "inferno", vmin: float | None = None, vmax: float | None = None,
                      outline: tuple[int, int, int] = (255, 255, 255),
                      size: tuple[int, int] | None = None) -> PIL.Image.Image:
    """``image`` (frame ``frame`` of the sample's item ``item``), resized to ``size`` ``(width, height)`` if
    given, with ``values`` painted as a heat map (opacity ``alpha``) and the regions of the ``kept`` tokens
    (indices into the sample's visual tokens, as ``PruneStats.kept_indices[b]``, or a bool mask) outlined.
    With several resolution levels (LLaVA-OneVision) only the finest level's kept tokens are outlined."""
    v = _as_values(values, regions)
    lo, hi = _value_range(regions, v, item, vmin, vmax)
    base = image.convert("RGB") if size is None else image.convert("RGB").resize(size, PIL.Image.Resampling.BICUBIC)
    width, height = base.size
    heat = token_map(regions, v, width, height, item=item, frame=frame)
    painted = np.isfinite(heat)
    colours = colormap((np.nan_to_num(heat) - lo) / (hi - lo if hi > lo else 1.0), cmap)
    pixels = np.asarray(base, dtype=np.float64)
    pixels[painted] = (1 - alpha) * pixels[painted] + alpha * colours[painted]
    out = PIL.Image.fromarray(np.round(pixels).astype(np.uint8))
    if kept is not None:
        on = regions.on(item, frame)
        keep = torch.as_tensor(kept).cpu()
        if keep.dtype != torch.bool:
            keep = torch.zeros(len(regions), dtype=torch.bool).index_fill(0, keep.long().flatten(), True)
        finest = on & (regions.level == int(regions.level[on].max())) if on.any() else on
        draw = PIL.ImageDraw.Draw(out)
        for c0, r0, c1, r1 in pixel_extents(regions.boxes[finest & keep], width, height):
            if c1 > c0 and r1 > r0:
                draw.rectangle([c0, r0, c1 - 1, r1 - 1], outline=outline)
    return out


def video_overlay(frames: Sequence[PIL.Image.Image], regions: TokenRegions, values: Values,
                  kept: Indices | None = None, *, item: int = 0, gap: int = 2, **overlay: Any) -> PIL.Image.Image:
    """The :func:`relevance_overlay` of every frame of video item ``item``, side by side (one colour scale),
    ``gap`` white pixels apart. ``overlay``: the other :func:`relevance_overlay` options."""
    v = _as_values(values, regions)
    lo, hi = _value_range(regions, v, item, overlay.pop("vmin", None), overlay.pop("vmax", None))
    tiles = [relevance_overlay(f, regions, v, kept, item=item, frame=i, vmin=lo, vmax=hi, **overlay)
             for i, f in enumerate(frames)]
    out = PIL.Image.new("RGB", (sum(t.width for t in tiles) + gap * (len(tiles) - 1), max(t.height for t in tiles)),
                        "white")
    x = 0
    for tile in tiles:
        out.paste(tile, (x, 0))
        x += tile.width + gap
    return out


def panel(rows: Sequence[Sequence[tuple[str, PIL.Image.Image]]], *, pad: int = 6) -> PIL.Image.Image:
    """A white grid of ``(title, image)`` cells, each title (PIL's default font) above its image."""
    draw = PIL.ImageDraw.Draw(PIL.Image.new("RGB", (1, 1)))
    text_h = max((draw.textbbox((0, 0), t)[3] for row in rows for t, _ in row), default=0) + pad // 2
    cols = max((len(row) for row in rows), default=0)
    col_w = [max((max(row[c][1].width, int(draw.textlength(row[c][0]))) for row in rows if c < len(row)), default=0)
             for c in range(cols)]
    row_h = [max((im.height for _, im in row), default=0) + text_h for row in rows]
    out = PIL.Image.new("RGB", (sum(col_w) + pad * (cols + 1), sum(row_h) + pad * (len(rows) + 1)), "white")
    draw = PIL.ImageDraw.Draw(out)
    y = pad
    for row, h in zip(rows, row_h):
        x = pad
        for (title, image), w in zip(row, col_w):
            draw.text((x, y), title, fill="black")
            out.paste(image.convert("RGB"), (x, y + text_h))
            x += w + pad
        y += h + pad
    return out


IMAGE_OVERLAY_OPTIONS = ("alpha", "cmap", "vmin", "vmax", "outline", "size")  # of relevance_overlay
VIDEO_OVERLAY_OPTIONS = (*IMAGE_OVERLAY_OPTIONS, "gap")  # of video_overlay


def explain_image(model: nn.Module, processor: Any, image: PIL.Image.Image | Sequence[PIL.Image.Image],
                  question: str, *, scorer: str | Scorer = "attention", ratio: float = 0.25,
                  values: Values | None = None, scope: str = "sample", compressor: Any = None, min_tokens: int = 1,
                  seed: int = 0, allow_compressor_mismatch: bool = False, **overlay: Any) -> PIL.Image.Image:
    """Overlay of one image (or video: a list of frames) asked ``question``: the scorer's scores (or ``values``,
    one per visual token) and the tokens pruning to ``ratio`` keeps (top scores, as ``prune_wrap`` selects).

    ``scorer``, ``ratio``, ``scope``, ``compressor``, ``min_tokens``, ``seed``, ``allow_compressor_mismatch``: as in
    :class:`~hf_tokenprune.TokenPruneConfig` (e.g. ``model.tokenprune.scorer``). ``overlay``: the options of
    :func:`relevance_overlay` (:data:`IMAGE_OVERLAY_OPTIONS`; a video also takes :func:`video_overlay`'s ``gap``);
    any other keyword raises ``TypeError`` before anything runs.
    """
    video = not isinstance(image, PIL.Image.Image)
    unknown = sorted(set(overlay) - set(VIDEO_OVERLAY_OPTIONS if video else IMAGE_OVERLAY_OPTIONS))
    if unknown:
        raise TypeError(f"explain_image() got unexpected keyword argument(s) {', '.join(unknown)}: it takes scorer, "
                        "ratio, values, scope, compressor, min_tokens, seed, allow_compressor_mismatch and the overlay "
                        f"options {', '.join(VIDEO_OVERLAY_OPTIONS if video else IMAGE_OVERLAY_OPTIONS)}")
    config = TokenPruneConfig(ratio=ratio, scorer=scorer, scope=scope, compressor=compressor, min_tokens=min_tokens,
                              seed=seed, allow_compressor_mismatch=allow_compressor_mismatch)
    messages = [{"role": "user", "content": [{"type": "video" if video else "image"},
                                             {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    media = {"videos": [list(image)]} if video else {"images": [image]}
    inputs = processor(text=[text], return_tensors="pt", **media).to(next(model.parameters()).device)
    adapter = get_adapter(model)
    found = score_inputs(model, inputs, scope=scope)
    scores = build_scorer(config, adapter).score(found) if values is None else torch.as_tensor(values)[None]
    keep = select_top(scores.to(found.valid.device), found.valid, found.units, ratio, config.min_tokens)[0]
    regions = adapter.token_regions(inputs, 0, original_sizes=None if video else [image.size])
    kept, painted = keep.nonzero().flatten().cpu(), scores[0].detach().float().cpu()
    if video:
        return video_overlay(image, regions, painted, kept, **overlay)
    return relevance_overlay(image, regions, painted, kept, **overlay)


def _as_values(values: Values, regions: TokenRegions) -> np.ndarray:
    v = values.detach().double().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, float)
    if v.shape != (len(regions),):
        raise ValueError(f"expected one value per visual token of the sample ({len(regions)}), got shape {v.shape}")
    return v


def _value_range(regions: TokenRegions, v: np.ndarray, item: int, vmin: float | None,
                 vmax: float | None) -> tuple[float, float]:
    mine = v[((regions.item == item) & regions.valid).numpy() & np.isfinite(v)]
    lo = vmin if vmin is not None else float(mine.min()) if mine.size else 0.0
    hi = vmax if vmax is not None else float(mine.max()) if mine.size else 1.0
    return lo, hi
