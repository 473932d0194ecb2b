"""``shapes``: the synthetic visual-question task behind the embedded default model.

Every image is 336×336 px: a few coloured shapes (about one 28-px patch up to a third of the image)
and one small black letter on a smooth, noisy background, so background tokens are redundant but
never identical. Six question families probe what token compression damages: existence (balanced
yes/no, negatives chosen adversarially like POPE: the shape or the colour is in the image, the pair
is not), counting, colour of a named shape, shape of a named colour, left/right relation, and reading
the letter. Answers are one word; the score is exact match.

Everything is generated from a seed: the evaluation split is ``split=0``, training data come from
other splits (:func:`make_example`), so the held-out questions are never seen in training.
"""

from __future__ import annotations

import functools
import math
import random
import string
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tokenbench.tasks.base import Sample, Task

import tokenbench

IMAGE_SIZE = 336
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "green": (30, 150, 50), "blue": (35, 75, 225),
    "yellow": (240, 205, 25), "purple": (145, 50, 185)}
SHAPES = ("circle", "square", "triangle", "star")
PLURALS = {shape: shape + "s" for shape in SHAPES}
LETTERS = tuple("BEFHKMPRTX")
COUNT_WORDS = ("zero", "one", "two", "three", "four")
FAMILIES = ("existence", "counting", "colour", "shape", "relation", "reading")
EVAL_SPLIT = 0
EVAL_SIZE = 600  # 100 questions per family
LETTER_FONT_SIZE = 22
LETTER_CELL = 28  # the embedded model's patch size
_MIN_GAP = 6  # pixels between objects, so every object stays a separate blob


@dataclass(frozen=True)
class Shape:
    """One drawn object: ``size`` is the side of its bounding box, centred on (cx, cy)."""

    shape: str
    colour: str
    cx: int
    cy: int
    size: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        half = self.size // 2
        return self.cx - half, self.cy - half, self.cx - half + self.size, self.cy - half + self.size


@dataclass(frozen=True)
class Letter:
    char: str
    x: int
    y: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        left, top, right, bottom = _font().getbbox(self.char)
        return self.x + left, self.y + top, self.x + right, self.y + bottom


@dataclass
class Scene:
    objects: list[Shape]
    letter: Letter
    background_seed: int


@dataclass
class Example:
    """A scene with one question about it; ``family`` is one of :data:`FAMILIES`."""

    scene: Scene
    family: str
    question: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)

    def image(self) -> Image.Image:
        return render(self.scene)


@functools.lru_cache(maxsize=1)
def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=LETTER_FONT_SIZE)


# ----------------------------------------------------------------------------------- rendering


def _background(seed: int) -> np.ndarray:
    """A light, tinted gradient with soft waves and pixel noise: similar but distinct patches."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) / IMAGE_SIZE
    base = rng.uniform(175, 225, size=3)
    slope = rng.uniform(-35, 35, size=(2, 3))
    freq, phase = rng.uniform(2, 6, size=2), rng.uniform(0, 2 * math.pi, size=2)
    wave = 10 * np.sin(2 * math.pi * freq[0] * xx + phase[0]) * np.cos(2 * math.pi * freq[1] * yy + phase[1])
    pixels = (base + xx[..., None] * slope[0] + yy[..., None] * slope[1] + wave[..., None]
              + rng.normal(0, 5, size=(IMAGE_SIZE, IMAGE_SIZE, 3)))
    return pixels.clip(0, 255).astype(np.uint8)


def _polygon(obj: Shape) -> list[tuple[float, float]]:
    half = obj.size / 2
    if obj.shape == "triangle":
        return [(obj.cx, obj.cy - half), (obj.cx + half, obj.cy + half), (obj.cx - half, obj.cy + half)]
    # star: five outer points alternating with inner ones
    points = []
    for k in range(10):
        radius = half if k % 2 == 0 else half * 0.45
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((obj.cx + radius * math.cos(angle), obj.cy + half * 0.1 + radius * math.sin(angle)))
    return points


def _draw_object(draw: ImageDraw.ImageDraw, obj: Shape, fill: Any) -> None:
    x0, y0, x1, y1 = obj.box
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    else:
        draw.polygon(_polygon(obj), fill=fill)


def render(scene: Scene) -> Image.Image:
    """The RGB image of a scene."""
    image = Image.fromarray(_background(scene.background_seed))
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_object(draw, obj, COLOURS[obj.colour])
    draw.text((scene.letter.x, scene.letter.y), scene.letter.char, fill=(10, 10, 10), font=_font())
    return image


def object_mask(scene: Scene) -> np.ndarray:
    """[H, W] int map: 0 background, ``i + 1`` for ``scene.objects[i]``, ``len(objects) + 1`` for
    the letter. Used by the training code for dense per-patch labels."""
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(mask)
    for index, obj in enumerate(scene.objects):
        _draw_object(draw, obj, index + 1)
    draw.text((scene.letter.x, scene.letter.y), scene.letter.char, fill=len(scene.objects) + 1,
              font=_font())
    return np.asarray(mask, dtype=np.int64)


# ----------------------------------------------------------------------------------- scenes


def _overlaps(box: tuple[int, int, int, int], others: Sequence[tuple[int, int, int, int]]) -> bool:
    return any(box[0] < o[2] + _MIN_GAP and o[0] < box[2] + _MIN_GAP
               and box[1] < o[3] + _MIN_GAP and o[1] < box[3] + _MIN_GAP for o in others)


def _object_size(rng: random.Random) -> int:
    """Sizes from about one patch (28 px) to a third of the image, biased towards small."""
    band = rng.random()
    if band < 0.4:
        return rng.randint(22, 36)
    if band < 0.75:
        return rng.randint(37, 64)
    return rng.randint(65, 110)


def _place(rng: random.Random, specs: Sequence[tuple[str, str]], seed: int,
           min_size: int | None = None) -> Scene | None:
    """Places shapes (shape, colour) and one letter without overlap; None when they do not fit."""
    boxes: list[tuple[int, int, int, int]] = []
    objects: list[Shape] = []
    for shape, colour in specs:
        for attempt in range(40):
            size = _object_size(rng) if attempt < 20 else rng.randint(22, 36)
            if min_size is not None:
                size = rng.randint(min_size, 110)
            half = size // 2
            obj = Shape(shape, colour, rng.randint(half + 2, IMAGE_SIZE - size + half - 2),
                        rng.randint(half + 2, IMAGE_SIZE - size + half - 2), size)
            if not _overlaps(obj.box, boxes):
                boxes.append(obj.box)
                objects.append(obj)
                break
        else:
            return None
    # the letter sits centred in one 28-px cell: about one visual token, so dropping that token loses it
    char = rng.choice(LETTERS)
    left, top, right, bottom = _font().getbbox(char)
    cells = IMAGE_SIZE // LETTER_CELL
    for _ in range(40):
        row, col = rng.randrange(cells), rng.randrange(cells)
        letter = Letter(char, col * LETTER_CELL + (LETTER_CELL - left - right) // 2,
                        row * LETTER_CELL + (LETTER_CELL - top - bottom) // 2)
        if not _overlaps(letter.box, boxes):
            return Scene(objects, letter, seed)
    return None


def _random_specs(rng: random.Random, count: int, *, distinct: str | None = None) -> list[tuple[str, str]]:
    """``count`` (shape, colour) pairs; ``distinct`` = "shape" | "colour" | "pair" makes that unique."""
    if distinct == "shape":
        return [(s, rng.choice(list(COLOURS))) for s in rng.sample(SHAPES, count)]
    if distinct == "colour":
        return [(rng.choice(SHAPES), c) for c in rng.sample(list(COLOURS), count)]
    pairs = [(s, c) for s in SHAPES for c in COLOURS]
    if distinct == "pair":
        return rng.sample(pairs, count)
    return [rng.choice(pairs) for _ in range(count)]


# ----------------------------------------------------------------------------------- questions
# A family has a scene builder (the kind of scene its evaluation questions are asked about) and an
# asker that poses one of its questions about any scene, or returns None when the scene has none.
# ``focus`` steers the asker (existence: the yes/no polarity; counting: the shape to count).


def _scene_specs(family: str, rng: random.Random) -> tuple[list[tuple[str, str]], Any]:
    """(shape, colour) specs for a scene built for ``family``, and the asker's focus."""
    if family == "existence":
        return _random_specs(rng, rng.randint(1, 4), distinct="pair"), None
    if family == "counting":
        target, count = rng.choice(SHAPES), rng.randint(1, 4)
        others = [s for s in SHAPES if s != target]
        specs = [(target, rng.choice(list(COLOURS))) for _ in range(count)]
        specs += [(rng.choice(others), rng.choice(list(COLOURS))) for _ in range(rng.randint(0, 5 - count))]
        rng.shuffle(specs)
        return specs, target
    if family == "colour":
        return _random_specs(rng, rng.randint(1, 4), distinct="shape"), None
    if family == "shape":
        return _random_specs(rng, rng.randint(1, 4), distinct="colour"), None
    if family == "relation":
        return _random_specs(rng, rng.randint(2, 4), distinct="shape"), None
    return _random_specs(rng, rng.randint(0, 3)), None  # reading


def unique_values(values: list[str]) -> list[str]:
    """The values that occur exactly once, sorted."""
    return sorted(v for v in set(values) if values.count(v) == 1)


def ask(family: str, scene: Scene, rng: random.Random, focus: Any = None) -> tuple[str, str, dict] | None:
    """One ``family`` question about ``scene`` as (question, answer, meta), or None if none fits."""
    objects = scene.objects
    if family == "existence":
        present = {(o.shape, o.colour) for o in objects}
        positive = rng.random() < 0.5 if focus is None else focus
        if positive and present:
            shape, colour = rng.choice(sorted(present))
            return f"is there a {colour} {shape}?", "yes", {"negative": None}
        # POPE-style adversarial negative: the shape or the colour is in the image, the pair is not
        near = {(o.shape, c) for o in objects for c in COLOURS} | {(s, o.colour) for o in objects for s in SHAPES}
        near -= present
        pool = sorted(near) or [(s, c) for s in SHAPES for c in COLOURS]
        shape, colour = rng.choice(pool)
        return f"is there a {colour} {shape}?", "no", {"negative": "adversarial" if near else "random"}
    if family == "counting":
        shapes = [o.shape for o in objects]
        countable = sorted(s for s in set(shapes) if 1 <= shapes.count(s) <= 4)
        target = focus if focus is not None else (rng.choice(countable) if countable else None)
        if target is None:
            return None
        return f"how many {PLURALS[target]} are there?", COUNT_WORDS[shapes.count(target)], {}
    if family == "colour":
        shapes = unique_values([o.shape for o in objects])
        if not shapes:
            return None
        shape = rng.choice(shapes)
        colour = next(o.colour for o in objects if o.shape == shape)
        return f"what color is the {shape}?", colour, {}
    if family == "shape":
        colours = unique_values([o.colour for o in objects])
        if not colours:
            return None
        colour = rng.choice(colours)
        shape = next(o.shape for o in objects if o.colour == colour)
        return f"what shape is the {colour} object?", shape, {}
    if family == "relation":
        unique = set(unique_values([o.shape for o in objects]))
        pairs = [(a, b) for a in objects for b in objects
                 if a.shape in unique and b.shape in unique and abs(a.cx - b.cx) >= 28]
        if not pairs:
            return None
        a, b = rng.choice(pairs)
        return f"is the {a.shape} left or right of the {b.shape}?", "left" if a.cx < b.cx else "right", {}
    return "what letter is in the image?", scene.letter.char.lower(), {}


def make_scene(split: int, index: int, family: str, max_objects: int | None = None
               ) -> tuple[Scene, random.Random, Any]:
    """A scene built for ``family``, the generator to ask questions with, and the asker's focus.

    ``max_objects`` (a training curriculum) keeps at most that many shapes, drawn large (≥ 56 px).
    """
    for attempt in range(100):
        seed = (split * 1_000_003 + index) * 101 + attempt
        rng = random.Random(seed)
        specs, focus = _scene_specs(family, rng)
        if max_objects is not None:
            specs, focus = specs[:max_objects], None
        scene = _place(rng, specs, seed, min_size=56 if max_objects is not None else None)
        if scene is not None:
            return scene, rng, focus
    raise RuntimeError(f"could not place a {family} scene for split {split}, index {index}")


def make_example(split: int, index: int, family: str | None = None) -> Example:
    """The ``index``-th example of ``split`` (0 = evaluation, any other = training data).

    The family defaults to ``FAMILIES[index % 6]`` so consecutive examples cover every family; in
    the evaluation split existence questions alternate yes / no. Deterministic in its arguments.
    """
    family = family or FAMILIES[index % len(FAMILIES)]
    for attempt in range(20):
        scene, rng, focus = make_scene(split, index + attempt * 7_919_111, family)
        if family == "existence" and split == EVAL_SPLIT:
            focus = (index // len(FAMILIES)) % 2 == 0
        asked = ask(family, scene, rng, focus)
        if asked is not None:
            question, answer, meta = asked
            return Example(scene, family, question, answer, {"family": family, **meta})
    raise RuntimeError(f"could not build a {family} example for split {split}, index {index}")

def normalise_answer(text: str) -> str:
    """The first word of a prediction, lower-cased, without punctuation ("Red." → "red")."""
    words = text.lower().translate(str.maketrans("", "", string.punctuation)).split()
    return words[0] if words else ""


class FamilyExactMatchTask(Task):
    """One-word answers scored by exact match after :func:`normalise_answer`, with the accuracy
    overall and per question family (``families``, in report order; ``meta["family"]`` is a
    sample's). The synthetic tasks (``shapes``, ``shapes-video``) share it."""

    primary_metric = "accuracy"
    per_sample_score = "correct"
    metric_scale = 100.0
    families: ClassVar[tuple[str, ...]] = ()

    def score(self, sample: Sample, prediction: str) -> dict[str, Any]:
        return {"correct": float(normalise_answer(prediction) == sample.target)}

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        if not records:
            return {"accuracy": 0.0}
        by_family: dict[str, list[float]] = {}
        for record in records:
            by_family.setdefault(record["meta"]["family"], []).append(record["scores"]["correct"])
        overall = [c for values in by_family.values() for c in values]
        result = {"accuracy": 100.0 * sum(overall) / len(overall)}
        for family in self.families:
            if family in by_family:
                result[f"accuracy/{family}"] = 100.0 * sum(by_family[family]) / len(by_family[family])
        return result


class ShapesTask(FamilyExactMatchTask):
    """Synthetic shapes-and-letters visual QA; the embedded default task (see module docstring)."""

    name = "shapes"
    families = FAMILIES
    max_new_tokens = 3
    source = "generated"
    description = ("synthetic 336-px scenes: existence (POPE-style negatives), counting, colour, shape, "
                   "left/right, reading a letter; one-word answers, exact match")

    def samples(self, limit: int | None = None) -> Iterator[Sample]:
        count = EVAL_SIZE if limit is None else min(limit, EVAL_SIZE)
        for index in range(count):
            example = make_example(EVAL_SPLIT, index)
            yield Sample(id=f"shapes-{index:04d}", prompt=example.question, image=example.image,
                         target=example.answer, meta=dict(example.meta))


@tokenbench.hookimpl
def register_tasks(register):
    register(ShapesTask)
