"""``shapes-video``: synthetic 8-frame clips whose questions need more than one frame.

Each clip is 8 frames of 224×224 px (Video-LLaVA's input size): the ``shapes`` objects (drawn with
its helpers) on one smooth noisy background with fresh pixel noise per frame, moving, appearing or
disappearing over time. Six question families, 100 held-out questions each:

- ``direction``: "which way does the red circle move?" (left / right / up / down);
- ``moving``: "which shape moves?" (the others stay put);
- ``appear`` / ``disappear``: "which shape appears?" (absent in the first frame, there in the last);
- ``half``: "in which half is the red circle visible?" (first / last: it is there in one half only);
- ``counting``: "how many different shapes are in the video?" (two to four, at most one per frame).

No single frame answers any of them: reversing a clip keeps its set of frames and flips the answer
of ``direction``, ``appear``/``disappear`` and ``half``; in a ``moving`` clip every frame holds the
same objects; in a ``counting`` clip each frame shows one shape of the two to four. So dropping
frames or a frame's object tokens costs accuracy for real.

Generated from a seed like ``shapes``: the evaluation split is ``split=0``; training uses others.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tokenbench.tasks.base import Sample
from tokenbench.tasks.shapes import (
    COLOURS,
    COUNT_WORDS,
    SHAPES,
    FamilyExactMatchTask,
    Shape,
    _background,
    _draw_object,
    _overlaps,
)

import tokenbench

FRAME_SIZE = 224
FRAMES = 8
FAMILIES = ("direction", "moving", "appear", "disappear", "half", "counting")
DIRECTIONS = ("left", "right", "up", "down")
HALVES = ("first", "last")
EVAL_SPLIT = 0
EVAL_SIZE = 600  # 100 questions per family
_MIN_SIZE, _MAX_SIZE = 30, 56  # object sides in px: one to two 28-px patches
_FRAME_NOISE = 4.0  # std of the per-frame pixel noise


@dataclass(frozen=True)
class Track:
    """One object over the clip: ``path[t]`` is its centre in frame ``t``, None where it is absent."""

    shape: str
    colour: str
    size: int
    path: tuple[tuple[int, int] | None, ...]

    def at(self, t: int) -> Shape | None:
        centre = self.path[t]
        return None if centre is None else Shape(self.shape, self.colour, centre[0], centre[1], self.size)

    @property
    def visible(self) -> tuple[int, ...]:
        return tuple(t for t, centre in enumerate(self.path) if centre is not None)

    @property
    def moves(self) -> bool:
        return len({c for c in self.path if c is not None}) > 1


@dataclass
class Clip:
    tracks: list[Track]
    background_seed: int

    def reversed(self) -> Clip:
        return Clip([Track(t.shape, t.colour, t.size, t.path[::-1]) for t in self.tracks], self.background_seed)


@dataclass
class VideoExample:
    clip: Clip
    family: str
    question: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)

    def frames(self) -> list[Image.Image]:
        return render(self.clip)


# ----------------------------------------------------------------------------------- rendering


def render_frame(clip: Clip, t: int, background: np.ndarray | None = None) -> Image.Image:
    """Frame ``t`` of ``clip`` as an RGB image."""
    if background is None:
        background = _background(clip.background_seed)[:FRAME_SIZE, :FRAME_SIZE].astype(np.float32)
    noise = np.random.default_rng((clip.background_seed, t)).normal(0, _FRAME_NOISE, background.shape)
    image = Image.fromarray((background + noise).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for track in clip.tracks:
        obj = track.at(t)
        if obj is not None:
            _draw_object(draw, obj, COLOURS[obj.colour])
    return image


def render(clip: Clip) -> list[Image.Image]:
    """All frames of ``clip``."""
    background = _background(clip.background_seed)[:FRAME_SIZE, :FRAME_SIZE].astype(np.float32)
    return [render_frame(clip, t, background) for t in range(FRAMES)]


# ----------------------------------------------------------------------------------- clips


def _fits(track: Track, placed: Sequence[Track]) -> bool:
    """Inside the frame and apart from every placed object in each frame where both are shown."""
    for t in track.visible:
        box = track.at(t).box
        if box[0] < 1 or box[1] < 1 or box[2] > FRAME_SIZE - 1 or box[3] > FRAME_SIZE - 1:
            return False
        if _overlaps(box, [o.at(t).box for o in placed if o.path[t] is not None]):
            return False
    return True


def _static_path(rng: random.Random, size: int, frames: Sequence[int]) -> tuple[tuple[int, int] | None, ...]:
    half = size // 2
    centre = (rng.randint(half + 2, FRAME_SIZE - half - 2), rng.randint(half + 2, FRAME_SIZE - half - 2))
    return tuple(centre if t in frames else None for t in range(FRAMES))


def _moving_path(rng: random.Random, size: int, direction: str) -> tuple[tuple[int, int], ...]:
    """A straight move of 3-4.5 patches over the clip, evenly spaced frames."""
    distance = rng.randint(84, 126)
    half = size // 2
    low, high = half + 2, FRAME_SIZE - half - 2
    along = rng.randint(low, high - distance)
    across = rng.randint(low, high)
    forward = direction in ("right", "down")
    steps = [along + round(distance * t / (FRAMES - 1)) for t in range(FRAMES)]
    if not forward:
        steps = steps[::-1]
    horizontal = direction in ("left", "right")
    return tuple((s, across) if horizontal else (across, s) for s in steps)


def _add(rng: random.Random, placed: list[Track], shape: str, colour: str, path_of) -> bool:
    for _ in range(40):
        size = rng.randint(_MIN_SIZE, _MAX_SIZE)
        track = Track(shape, colour, size, path_of(size))
        if _fits(track, placed):
            placed.append(track)
            return True
    return False


def _pairs(rng: random.Random, count: int, distinct_shapes: bool) -> list[tuple[str, str]]:
    if distinct_shapes:
        return [(s, rng.choice(list(COLOURS))) for s in rng.sample(SHAPES, count)]
    return rng.sample([(s, c) for s in SHAPES for c in COLOURS], count)


def _build(family: str, rng: random.Random, focus: Any) -> list[Track] | None:
    """The tracks of a clip built for ``family`` (``focus``: the answer to steer towards), or None."""
    placed: list[Track] = []
    every = range(FRAMES)
    if family in ("direction", "moving"):
        pairs = _pairs(rng, rng.randint(1, 3) if family == "direction" else rng.randint(2, 4),
                       distinct_shapes=family == "moving")
        direction = focus if family == "direction" and focus else rng.choice(DIRECTIONS)
        if not _add(rng, placed, *pairs[0], lambda size: _moving_path(rng, size, direction)):
            return None
        ok = all(_add(rng, placed, *p, lambda size: _static_path(rng, size, every)) for p in pairs[1:])
        return placed if ok else None
    if family in ("appear", "disappear", "half"):
        pairs = _pairs(rng, rng.randint(2, 3), distinct_shapes=family != "half")
        if family == "half":
            first = focus == "first" if focus else rng.random() < 0.5
            start = rng.randint(0, 2)
            span = range(start, rng.randint(start + 1, 3) + 1)
            frames = span if first else [FRAMES - 1 - t for t in span]
        else:
            change = rng.randint(2, FRAMES - 2)
            frames = range(change, FRAMES) if family == "appear" else range(change)
        target = frames
        if not _add(rng, placed, *pairs[0], lambda size: _static_path(rng, size, target)):
            return None
        ok = all(_add(rng, placed, *p, lambda size: _static_path(rng, size, every)) for p in pairs[1:])
        return placed if ok else None
    # counting: two to four shapes, one per frame, each shown over a contiguous run of frames
    count = int(focus) if focus else rng.randint(2, 4)
    cuts = sorted(rng.sample(range(1, FRAMES), count - 1))
    runs = [range(a, b) for a, b in zip([0, *cuts], [*cuts, FRAMES])]
    for pair, run in zip(_pairs(rng, count, distinct_shapes=True), runs):
        if not _add(rng, placed, *pair, lambda size, run=run: _static_path(rng, size, run)):
            return None
    return placed


# ----------------------------------------------------------------------------------- questions


def _unique(tracks: Sequence[Track], key) -> list[Track]:
    values = [key(t) for t in tracks]
    return [t for t in tracks if values.count(key(t)) == 1]


def _direction(track: Track) -> str:
    (x0, y0), (x1, y1) = track.path[0], track.path[-1]
    if abs(x1 - x0) >= abs(y1 - y0):
        return "right" if x1 > x0 else "left"
    return "down" if y1 > y0 else "up"


def ask(family: str, clip: Clip, rng: random.Random) -> tuple[str, str] | None:
    """One ``family`` question about ``clip`` as (question, answer), or None when the clip has none.
    Answers are worked out from the tracks alone, whatever the clip was built for."""
    tracks = clip.tracks
    if family in ("direction", "moving"):
        movers = [t for t in tracks if t.moves]
        if len(movers) != 1 or len(movers[0].visible) != FRAMES:
            return None
        mover = movers[0]
        if family == "moving":
            if mover not in _unique(tracks, lambda t: t.shape):
                return None
            return "which shape moves?", mover.shape
        if mover not in _unique(tracks, lambda t: (t.shape, t.colour)):
            return None
        return f"which way does the {mover.colour} {mover.shape} move?", _direction(mover)
    if family in ("appear", "disappear"):
        first, last = (0, FRAMES - 1) if family == "appear" else (FRAMES - 1, 0)
        changed = [t for t in tracks if t.path[first] is None and t.path[last] is not None]
        if len(changed) != 1 or changed[0] not in _unique(tracks, lambda t: t.shape):
            return None
        return f"which shape {family}s?", changed[0].shape
    if family == "half":
        candidates = [t for t in _unique(tracks, lambda t: (t.shape, t.colour))
                      if t.visible and (max(t.visible) < FRAMES // 2 or min(t.visible) >= FRAMES // 2)]
        if not candidates:
            return None
        chosen = rng.choice(candidates)
        answer = "first" if max(chosen.visible) < FRAMES // 2 else "last"
        return f"in which half is the {chosen.colour} {chosen.shape} visible?", answer
    kinds = len({t.shape for t in tracks})
    return "how many different shapes are in the video?", COUNT_WORDS[kinds]


def _focus(family: str, index: int) -> Any:
    """The evaluation split's balanced answers: directions, halves and counts in turn."""
    turn = index // len(FAMILIES)
    if family == "direction":
        return DIRECTIONS[turn % len(DIRECTIONS)]
    if family == "half":
        return HALVES[turn % len(HALVES)]
    if family == "counting":
        return 2 + turn % 3
    return None


def make_clip(split: int, index: int, family: str, focus: Any = None) -> tuple[Clip, random.Random]:
    """A clip built for ``family`` and the generator to ask about it with; deterministic."""
    for attempt in range(200):
        seed = (split * 1_000_003 + index) * 101 + attempt
        rng = random.Random(seed)
        tracks = _build(family, rng, focus)
        if tracks is not None:
            rng.shuffle(tracks)  # the drawing order says nothing about the answer
            return Clip(tracks, seed), rng
    raise RuntimeError(f"could not build a {family} clip for split {split}, index {index}")


def make_example(split: int, index: int, family: str | None = None) -> VideoExample:
    """The ``index``-th example of ``split`` (0 = evaluation, any other = training data); the
    family defaults to ``FAMILIES[index % 6]``. In the evaluation split the answers of direction,
    half and counting are balanced."""
    family = family or FAMILIES[index % len(FAMILIES)]
    focus = _focus(family, index) if split == EVAL_SPLIT else None
    for attempt in range(20):
        clip, rng = make_clip(split, index + attempt * 7_919_111, family, focus)
        asked = ask(family, clip, rng)
        if asked is not None:
            return VideoExample(clip, family, *asked, {"family": family})
    raise RuntimeError(f"could not build a {family} example for split {split}, index {index}")


class ShapesVideoTask(FamilyExactMatchTask):
    """Synthetic 8-frame clips whose questions need several frames (see module docstring)."""

    name = "shapes-video"
    families = FAMILIES
    max_new_tokens = 3
    source = "generated"
    description = ("synthetic 8-frame 224-px clips: direction of motion, which shape moves, appears or "
                   "disappears, in which half an object is shown, distinct shapes over the clip; one word, "
                   "exact match")

    def samples(self, limit: int | None = None) -> Iterator[Sample]:
        count = EVAL_SIZE if limit is None else min(limit, EVAL_SIZE)
        for index in range(count):
            example = make_example(EVAL_SPLIT, index)
            yield Sample(id=f"shapes-video-{index:04d}", prompt=example.question, image=None,
                         target=example.answer, meta=dict(example.meta), video=example.frames)


@tokenbench.hookimpl
def register_tasks(register):
    register(ShapesVideoTask)
