"""Deterministic synthetic images and videos: coloured shapes on a plain background."""

from __future__ import annotations

import math
import random

import PIL.Image
import PIL.ImageDraw

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 215, 40),
    "orange": (245, 140, 30), "purple": (130, 50, 170), "pink": (240, 130, 180), "brown": (130, 80, 40),
    "black": (15, 15, 15), "white": (245, 245, 245), "gray": (128, 128, 128), "cyan": (40, 200, 210),
    "magenta": (210, 40, 200),
}
SHAPES = ("circle", "square", "triangle", "rectangle", "ellipse", "star", "line", "dot", "oval", "cross")


def _size_wh(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def draw_shape(draw: PIL.ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], fill) -> None:
    """Draw a ``kind`` shape (one of :data:`SHAPES`, or ``"diamond"``) filling ``box`` = (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    if kind in ("circle", "ellipse", "oval", "dot"):
        draw.ellipse(box, fill=fill)
    elif kind == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif kind == "star":
        cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, max(1.0, min(x1 - x0, y1 - y0) / 2)
        pts = [
            (
                cx + (r if k % 2 == 0 else r / 2.5) * math.sin(k * math.pi / 5),
                cy - (r if k % 2 == 0 else r / 2.5) * math.cos(k * math.pi / 5),
            )
            for k in range(10)
        ]
        draw.polygon(pts, fill=fill)
    elif kind == "diamond":
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif kind in ("line", "cross"):
        width = max(1, (x1 - x0) // 5)
        draw.line([(x0, y0), (x1, y1)], fill=fill, width=width)
        if kind == "cross":
            draw.line([(x0, y1), (x1, y0)], fill=fill, width=width)
    else:  # square, rectangle
        draw.rectangle(box, fill=fill)


def _scene(rng: random.Random, width: int, height: int, n_shapes: int) -> list[tuple[str, tuple, tuple]]:
    names = list(COLOURS)
    shapes = []
    for _ in range(n_shapes):
        w = rng.randint(max(2, width // 5), max(3, width // 2))
        h = rng.randint(max(2, height // 5), max(3, height // 2))
        x0, y0 = rng.randint(0, max(0, width - w)), rng.randint(0, max(0, height - h))
        shapes.append((rng.choice(SHAPES), (x0, y0, x0 + w, y0 + h), COLOURS[rng.choice(names)]))
    return shapes


def make_image(seed: int, size: int | tuple[int, int] = 56) -> PIL.Image.Image:
    """Deterministic RGB image (``size``: side or ``(width, height)``): 2-4 coloured shapes."""
    width, height = _size_wh(size)
    rng = random.Random(seed)
    background = COLOURS[rng.choice(list(COLOURS))]
    image = PIL.Image.new("RGB", (width, height), background)
    draw = PIL.ImageDraw.Draw(image)
    for kind, box, fill in _scene(rng, width, height, rng.randint(2, 4)):
        draw_shape(draw, kind, box, fill)
    return image


def make_video(seed: int, frames: int = 4, size: int | tuple[int, int] = 56) -> list[PIL.Image.Image]:
    """Deterministic video: a list of ``frames`` RGB PIL frames, shapes drifting across a fixed background.

    Accepted as one video by every processor here (``videos=[make_video(0)]`` or a chat ``{"type": "video",
    "video": make_video(0)}`` item).
    """
    width, height = _size_wh(size)
    rng = random.Random(seed)
    background = COLOURS[rng.choice(list(COLOURS))]
    shapes = _scene(rng, width, height, rng.randint(2, 3))
    velocities = [(rng.randint(-3, 3), rng.randint(-3, 3)) for _ in shapes]
    out = []
    for t in range(frames):
        image = PIL.Image.new("RGB", (width, height), background)
        draw = PIL.ImageDraw.Draw(image)
        for (kind, (x0, y0, x1, y1), fill), (dx, dy) in zip(shapes, velocities, strict=True):
            draw_shape(draw, kind, (x0 + t * dx, y0 + t * dy, x1 + t * dx, y1 + t * dy), fill)
        out.append(image)
    return out
