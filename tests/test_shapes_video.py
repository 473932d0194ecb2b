"""The synthetic ``shapes-video`` task: deterministic, balanced, answers that need several frames."""

from __future__ import annotations

import random

import numpy as np
import pytest
from tokenbench.tasks import shapes_video as sv
from tokenbench.tasks.shapes import COLOURS, COUNT_WORDS
from tokenbench.tasks.shapes_video import FAMILIES, FRAMES, ShapesVideoTask, make_example

from tokenbench.plugins import load_registry


@pytest.fixture(scope="module")
def eval_samples():
    return list(ShapesVideoTask().samples(60))


def test_registered_as_shapes_video():
    assert load_registry().task("shapes-video") is ShapesVideoTask


def test_samples_are_deterministic_limited_and_video_only(eval_samples):
    again = list(ShapesVideoTask().samples(8))
    assert [(s.id, s.prompt, s.target) for s in again] == [(s.id, s.prompt, s.target) for s in eval_samples[:8]]
    first, second = again[3].load_video(), eval_samples[3].load_video()
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, second, strict=True))
    assert all(s.image is None and s.load_image() is None for s in eval_samples)
    assert len({s.id for s in eval_samples}) == 60
    assert sv.EVAL_SIZE == 600 and {s.meta["family"] for s in eval_samples[:6]} == set(FAMILIES)


def test_frames_are_eight_224_px_frames_that_differ(eval_samples):
    frames = [np.asarray(f) for f in eval_samples[0].load_video()]
    assert len(frames) == FRAMES and all(f.shape == (224, 224, 3) for f in frames)
    assert not np.array_equal(frames[0], frames[1])  # fresh pixel noise even where nothing moves


def test_balanced_answers_in_the_held_out_split():
    examples = [make_example(sv.EVAL_SPLIT, i) for i in range(96)]

    def answers(family):
        return sorted(e.answer for e in examples if e.family == family)
    assert answers("direction") == sorted(sv.DIRECTIONS * 4)
    assert answers("half") == sorted(sv.HALVES * 8)
    assert answers("counting") == sorted(["two"] * 6 + ["three"] * 5 + ["four"] * 5)


def _colour_mask(frame: np.ndarray, colour: str) -> np.ndarray:
    return np.all(frame == np.array(COLOURS[colour], dtype=np.uint8), axis=-1)


def test_frames_show_every_object_where_the_tracks_say():
    for index in range(12):
        example = make_example(4, index)
        frames = [np.asarray(f) for f in example.frames()]
        for track in example.clip.tracks:
            for t in range(FRAMES):
                obj = track.at(t)
                if obj is not None:
                    assert _colour_mask(frames[t], track.colour)[obj.cy, obj.cx]


def _expected(example: sv.VideoExample) -> str:
    """The answer worked out again from the tracks, independently of ``sv.ask``."""
    tracks, question = example.clip.tracks, example.question
    named = [t for t in tracks if f"{t.colour} {t.shape}" in question]
    if example.family == "direction":
        (track,) = named
        dx = track.path[-1][0] - track.path[0][0]
        dy = track.path[-1][1] - track.path[0][1]
        return ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
    if example.family == "moving":
        (mover,) = [t for t in tracks if len(set(t.path)) > 1]
        return mover.shape
    if example.family in ("appear", "disappear"):
        start, end = (0, -1) if example.family == "appear" else (-1, 0)
        (track,) = [t for t in tracks if t.path[start] is None and t.path[end] is not None]
        return track.shape
    if example.family == "half":
        (track,) = named
        shown = [t for t, c in enumerate(track.path) if c is not None]
        assert shown and (max(shown) < FRAMES // 2 or min(shown) >= FRAMES // 2)
        return "first" if max(shown) < FRAMES // 2 else "last"
    return COUNT_WORDS[len({t.shape for t in tracks})]


def test_answers_match_the_tracks():
    for index in range(60):
        example = make_example(5, index)
        assert example.answer == _expected(example), example.question


def test_direction_shows_in_the_pixels():
    """The centroid of the named colour's pixels moves the answer's way between the first and last
    frame (a static object of the same colour only shrinks the shift)."""
    for index in range(0, 48, len(FAMILIES)):
        example = make_example(sv.EVAL_SPLIT, index)
        assert example.family == "direction"
        colour = example.question.split()[4]
        first, last = (np.argwhere(_colour_mask(np.asarray(f), colour)).mean(0)
                       for f in (example.frames()[0], example.frames()[-1]))
        dy, dx = last - first
        seen = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
        assert seen == example.answer


def _frame_contents(clip: sv.Clip) -> list[frozenset]:
    return sorted((frozenset((t.shape, t.colour) for t in clip.tracks if t.path[f] is not None)
                   for f in range(FRAMES)), key=sorted)


def test_no_single_frame_answers_a_question():
    """Reversing a clip keeps its frames' contents and flips the temporal answers; a moving clip
    shows the same objects in every frame; a counting clip shows fewer shapes per frame than the
    answer."""
    flipped = {"left": "right", "right": "left", "up": "down", "down": "up", "first": "last", "last": "first"}
    for index in range(36):
        example = make_example(sv.EVAL_SPLIT, index)
        clip, family = example.clip, example.family
        if family in ("direction", "half", "appear", "disappear"):
            backwards = clip.reversed()
            assert _frame_contents(backwards) == _frame_contents(clip)
            if family in ("direction", "half"):
                reversed_answer = sv.ask(family, backwards, random.Random(0))
                if family == "half":  # the question names one object; ask about that one
                    reversed_answer = next(sv.ask(family, backwards, random.Random(seed)) for seed in range(50)
                                           if sv.ask(family, backwards, random.Random(seed))[0] == example.question)
                assert reversed_answer == (example.question, flipped[example.answer])
            else:
                other = "disappear" if family == "appear" else "appear"
                assert sv.ask(family, backwards, random.Random(0)) is None
                assert sv.ask(other, backwards, random.Random(0))[1] == example.answer
        elif family == "moving":
            assert len(set(_frame_contents(clip))) == 1
        else:
            per_frame = [len({s for s, _ in content}) for content in _frame_contents(clip)]
            assert max(per_frame) == 1 < COUNT_WORDS.index(example.answer)


def test_exact_match_scoring_per_family(eval_samples):
    task = ShapesVideoTask()
    records = [{"meta": s.meta, "scores": task.score(s, s.target.capitalize() + "." if i % 2 else "nope")}
               for i, s in enumerate(eval_samples[:12])]
    metrics = task.aggregate(records)
    assert metrics["accuracy"] == pytest.approx(50.0)
    assert set(metrics) == {"accuracy", *(f"accuracy/{f}" for f in FAMILIES)}
    assert metrics["accuracy/moving"] == 100.0 and metrics["accuracy/direction"] == 0.0
