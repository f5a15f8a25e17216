"""The toy VQA world: grids of coloured shapes, and questions whose answer sits in one small region.

A scene is a ``rows x cols`` grid of 8-pixel cells, one cell per visual token of the world models (Qwen2-VL
patch 4 / merge 2, LLaVA-OneVision high-resolution tiles with patch 8); an occupied cell holds one object
(shape, colour, size, centred in its cell). Every scene has two *rare* shapes and two *rare* colours that occur
exactly once, and one *counted* colour that occurs two to four times, so "what colour is the star ?" has one
answer that only the star's token shows. With the default 96-144 objects on a 16x16 grid, 37-56% of the
tokens show an object and each answer sits in ONE of 256 tokens: a pruner that keeps 25% of the visual tokens
without looking at the question keeps the answer about a quarter of the time (at best, keeping only object
tokens, half of the time); one that keeps the question's token need not lose it.

Question kinds (one-word answers; ``boxes[0]`` is the region that holds the answer, further boxes are the
other evidence):

* ``colour_of_shape``  "what colour is the star ?" -> colour of the unique star
* ``shape_of_colour``  "what shape is the red object ?" -> shape of the unique red object
* ``left_of``          "what shape is left of the red star ?" -> shape in the cell left of a unique object
* ``count_of_colour``  "how many red objects ?" -> "one" .. "four" (a rare or the counted colour: every one of
  its objects is evidence, so the answer needs up to four tokens, not one)
* ``majority_colour``  "what colour are most circle objects ?" -> the colour most of the (14-48) objects of a
  common shape have, asked only when it leads the runner-up by at least :data:`MAJORITY_MARGIN`: every object
  of that shape is evidence, so the answer needs many tokens (about 12% of a 16x16 scene's), and a subset of
  them can change it
* ``frame_of_shape``   (videos) "which frame shows the star ?" -> "one" .. "four"

The held-out benchmark is :data:`LOOKUP`, ``colour_of_shape``: the colour of the one object the question names,
which the shipped models answer with all tokens. ``shape_of_colour`` is the same lookup the other way round
(the 3-layer models learn it only partly), ``left_of`` takes two hops (find the named object, then read its
neighbour), ``count_of_colour`` aggregates several tokens and ``frame_of_shape`` reads a temporal position
(which only the LLM's M-RoPE carries: the Qwen2-VL vision tower sees each frame alone) and ``majority_colour``
aggregates tens of tokens; they are measured separately.

Everything is deterministic from ``(seed, split, index)``; the ``train`` and ``test`` splits draw from
disjoint random streams.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

import PIL.Image
import PIL.ImageDraw

from ..tiny import draw_shape

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS = {
    "red": (225, 35, 35),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "white": (245, 245, 245),
}
SIZES = {"small": 6, "large": 8}  # side in pixels
FRAME_WORDS = COUNT_WORDS = ("one", "two", "three", "four")
KINDS = ("colour_of_shape", "shape_of_colour", "left_of", "count_of_colour", "frame_of_shape", "majority_colour")
MAJORITY_MARGIN = 3  # majority_colour: objects by which the answer's colour leads the runner-up
LOOKUP = ("colour_of_shape",)  # the held-out benchmark: the colour of the one object the question names
CELL = 8
BACKGROUND = (24, 24, 24)
_SUPERSAMPLE = 4
Split = Literal["train", "test"]


@dataclass(frozen=True)
class WorldObject:
    shape: str
    colour: str
    size: str
    row: int
    col: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels (x1, y1 exclusive)
    frame: int = 0


@dataclass
class Scene:
    rows: int
    cols: int
    objects: list[WorldObject]
    frames: int = 1  # distinct frames; a video shows each for ``repeat`` raw frames
    repeat: int = 2

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return self.cols * CELL, self.rows * CELL

    def at(self, frame: int, row: int, col: int) -> WorldObject | None:
        return next((o for o in self.objects if (o.frame, o.row, o.col) == (frame, row, col)), None)

    def render_frame(self, frame: int = 0) -> PIL.Image.Image:
        width, height = self.size
        s = _SUPERSAMPLE
        image = PIL.Image.new("RGB", (width * s, height * s), BACKGROUND)
        draw = PIL.ImageDraw.Draw(image)
        for o in self.objects:
            if o.frame == frame:
                x0, y0, x1, y1 = o.box
                draw_shape(draw, o.shape, (x0 * s, y0 * s, x1 * s - 1, y1 * s - 1), COLOURS[o.colour])
        return image.resize((width, height), PIL.Image.Resampling.BOX)

    def render(self) -> PIL.Image.Image | list[PIL.Image.Image]:
        """The image, or for a video the list of raw frames (each distinct frame ``repeat`` times)."""
        if self.frames == 1:
            return self.render_frame(0)
        return [self.render_frame(f) for f in range(self.frames) for _ in range(self.repeat)]


@dataclass(frozen=True)
class Question:
    kind: str
    text: str
    answer: str
    boxes: tuple[tuple[int, int, int, int, int], ...]  # (frame, x0, y0, x1, y1); boxes[0] holds the answer
    # the one question word that names what to look up (a shape or a colour) and the boxes of every object it
    # names; empty for left_of, whose object is named by two words together
    key: str = ""
    key_boxes: tuple[tuple[int, int, int, int, int], ...] = ()


@dataclass
class Sample:
    sample_id: str
    scene: Scene
    question: Question
    media: PIL.Image.Image | list[PIL.Image.Image] = field(repr=False)

    @property
    def is_video(self) -> bool:
        return self.scene.frames > 1


def _place(rng: random.Random, shape: str, colour: str, frame: int, row: int, col: int) -> WorldObject:
    size = rng.choice(list(SIZES))
    side = SIZES[size]
    margin = (CELL - side) // 2  # centred in its cell: one object, one visual token
    x0, y0 = col * CELL + margin, row * CELL + margin
    return WorldObject(shape, colour, size, row, col, (x0, y0, x0 + side, y0 + side), frame)


MIN_OBJECTS = 8  # 2 rare shapes, 2 rare colours, up to 4 of the counted colour


def make_scene(rng: random.Random, rows: int = 16, cols: int = 16, n_objects: int = 120) -> Scene:
    """An image scene: two rare shapes and two rare colours occur exactly once each, one counted colour two to
    four times."""
    if not MIN_OBJECTS <= n_objects <= rows * cols:
        raise ValueError(f"n_objects must be in [{MIN_OBJECTS}, {rows * cols}] for a {rows}x{cols} grid, "
                         f"got {n_objects}")
    shapes, colours = rng.sample(SHAPES, len(SHAPES)), rng.sample(list(COLOURS), len(COLOURS))
    rare_shapes, common_shapes = shapes[:2], shapes[2:]
    rare_colours, counted, common_colours = colours[:2], colours[2], colours[3:]
    kinds = [(s, rng.choice(common_colours)) for s in rare_shapes]
    kinds += [(rng.choice(common_shapes), c) for c in rare_colours]
    kinds += [(rng.choice(common_shapes), counted) for _ in range(rng.randint(2, 4))]
    kinds += [(rng.choice(common_shapes), rng.choice(common_colours)) for _ in range(n_objects - len(kinds))]
    rng.shuffle(kinds)
    cells = rng.sample([(r, c) for r in range(rows) for c in range(cols)], n_objects)
    objects = [_place(rng, s, c, 0, r, col) for (s, c), (r, col) in zip(kinds, cells, strict=True)]
    return Scene(rows, cols, objects)


def make_video_scene(rng: random.Random, frames: int = 4, rows: int = 8, cols: int = 8,
                     n_objects: tuple[int, int] = (20, 40)) -> Scene:
    """A video scene: one rare shape occurs exactly once in the whole video."""
    if frames > len(FRAME_WORDS):
        raise ValueError(f"at most {len(FRAME_WORDS)} distinct frames, got {frames}")
    shapes = rng.sample(SHAPES, len(SHAPES))
    rare, common = shapes[0], shapes[1:]
    rare_frame = rng.randrange(frames)
    objects = []
    for f in range(frames):
        n = rng.randint(*n_objects)
        kinds = [(rng.choice(common), rng.choice(list(COLOURS))) for _ in range(n - (f == rare_frame))]
        if f == rare_frame:
            kinds.append((rare, rng.choice(list(COLOURS))))
        cells = rng.sample([(r, c) for r in range(rows) for c in range(cols)], len(kinds))
        objects += [_place(rng, s, c, f, r, col) for (s, c), (r, col) in zip(kinds, cells, strict=True)]
    return Scene(rows, cols, objects, frames=frames)


def _box(o: WorldObject) -> tuple[int, int, int, int, int]:
    return (o.frame, *o.box)


def questions(scene: Scene) -> list[Question]:
    """Every question the scene answers unambiguously, in a fixed order."""
    shape_count: dict[str, int] = {}
    colour_count: dict[str, int] = {}
    combo_count: dict[tuple[str, str], int] = {}
    for o in scene.objects:
        shape_count[o.shape] = shape_count.get(o.shape, 0) + 1
        colour_count[o.colour] = colour_count.get(o.colour, 0) + 1
        combo_count[o.colour, o.shape] = combo_count.get((o.colour, o.shape), 0) + 1
    out = []
    if scene.frames == 1:  # one rare colour (answer "one") and the counted one: "one" half of the time
        counted = [c for c, n in colour_count.items() if n > 1 and n <= len(COUNT_WORDS)]
        rare = [c for c, n in colour_count.items() if n == 1]
        for colour in rare[:1] + counted[:1]:  # in scene order, which is shuffled
            boxes = tuple(_box(o) for o in scene.objects if o.colour == colour)
            out.append(Question("count_of_colour", f"how many {colour} objects ?", COUNT_WORDS[len(boxes) - 1], boxes,
                                colour, boxes))
    for o in scene.objects:
        if shape_count[o.shape] == 1:
            out.append(Question("colour_of_shape", f"what colour is the {o.shape} ?", o.colour, (_box(o),), o.shape,
                                (_box(o),)))
            if scene.frames > 1:
                out.append(Question("frame_of_shape", f"which frame shows the {o.shape} ?",
                                    FRAME_WORDS[o.frame], (_box(o),), o.shape, (_box(o),)))
        if scene.frames == 1 and colour_count[o.colour] == 1:
            out.append(Question("shape_of_colour", f"what shape is the {o.colour} object ?", o.shape, (_box(o),),
                                o.colour, (_box(o),)))
        left = scene.at(o.frame, o.row, o.col - 1) if o.col > 0 else None
        if scene.frames == 1 and left is not None and combo_count[o.colour, o.shape] == 1:
            out.append(Question("left_of", f"what shape is left of the {o.colour} {o.shape} ?", left.shape,
                                (_box(left), _box(o))))
    if scene.frames == 1:
        out += [q for shape in shape_count if (q := _majority_question(scene, shape)) is not None]
    return out


def _majority_question(scene: Scene, shape: str) -> Question | None:
    """"what colour are most <shape> objects ?", if one colour leads by :data:`MAJORITY_MARGIN` or more; its
    objects come first in the boxes, then the rest of the shape's."""
    of_shape = [o for o in scene.objects if o.shape == shape]
    counts: dict[str, int] = {}
    for o in of_shape:
        counts[o.colour] = counts.get(o.colour, 0) + 1
    (top, n_top), *rest = sorted(counts.items(), key=lambda item: -item[1])
    if n_top - (rest[0][1] if rest else 0) < MAJORITY_MARGIN:
        return None
    boxes = tuple(_box(o) for o in sorted(of_shape, key=lambda o: o.colour != top))
    return Question("majority_colour", f"what colour are most {shape} objects ?", top, boxes, shape, boxes)


def sample_rng(seed: int, split: Split, index: int) -> random.Random:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return random.Random(f"hf_tokenprune.world/{seed}/{split}/{index}")


def make_samples(split: Split, index: int, *, seed: int = 0, video: bool = False, per_scene: int = 1,
                 n_objects: tuple[int, int] = (96, 144), grid: tuple[int, int] = (16, 16),
                 kinds: tuple[str, ...] = KINDS) -> list[Sample]:
    """``per_scene`` distinct questions of ``kinds`` (fewer if the scene has fewer) about scene ``index`` of
    ``split``."""
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds!r}")
    rng = sample_rng(seed, split, index)
    scene = make_video_scene(rng) if video else make_scene(rng, *grid, n_objects=rng.randint(*n_objects))
    media = scene.render()
    by_kind: dict[str, list[Question]] = {}
    for q in questions(scene):
        if q.kind in kinds:
            by_kind.setdefault(q.kind, []).append(q)
    chosen = []
    while by_kind and len(chosen) < per_scene:  # kinds equally likely, whatever their count in the scene
        kind = rng.choice(sorted(by_kind))
        pool = by_kind[kind]
        chosen.append(pool.pop(rng.randrange(len(pool))))
        if not pool:
            del by_kind[kind]
    tag = "video" if video else "image"
    return [Sample(f"{tag}-{split}-{seed}-{index}-{q.kind}-{i}", scene, q, media) for i, q in enumerate(chosen)]
