"""The synthetic ``shapes`` task: deterministic, balanced, correctly labelled, scored by exact match."""

from __future__ import annotations

import numpy as np
import pytest
from tokenbench.tasks import shapes
from tokenbench.tasks.shapes import FAMILIES, ShapesTask, make_example

from tokenbench.plugins import load_registry


@pytest.fixture(scope="module")
def eval_samples():
    return list(ShapesTask().samples(120))


def test_registered_as_shapes():
    assert load_registry().task("shapes") is ShapesTask


def test_samples_are_deterministic_and_limited(eval_samples):
    again = list(ShapesTask().samples(12))
    assert [(s.id, s.prompt, s.target) for s in again] == [(s.id, s.prompt, s.target) for s in eval_samples[:12]]
    assert np.array_equal(np.asarray(again[5].load_image()), np.asarray(eval_samples[5].load_image()))
    assert len({s.id for s in eval_samples}) == 120
    assert len(list(ShapesTask().samples(None))) == shapes.EVAL_SIZE


def test_small_limits_cover_every_family(eval_samples):
    assert {s.meta["family"] for s in eval_samples[:6]} == set(FAMILIES)


def test_images_are_336_rgb_on_a_non_uniform_background(eval_samples):
    image = np.asarray(eval_samples[0].load_image())
    assert image.shape == (336, 336, 3)
    corners = image[:28, :28].reshape(-1, 3), image[-28:, -28:].reshape(-1, 3)
    assert image.std() > 3 and not np.array_equal(corners[0], corners[1])


def test_existence_is_balanced_with_adversarial_negatives(eval_samples):
    existence = [s for s in eval_samples if s.meta["family"] == "existence"]
    assert sum(s.target == "yes" for s in existence) == sum(s.target == "no" for s in existence)
    for index in range(0, 120, 6):
        example = make_example(shapes.EVAL_SPLIT, index)
        asked = tuple(example.question.removeprefix("is there a ").removesuffix("?").split())
        present = {(o.colour, o.shape) for o in example.scene.objects}
        assert (asked in present) == (example.answer == "yes")
        if example.answer == "no":
            assert any(asked[0] == c or asked[1] == s for c, s in present)


def test_answers_match_the_scene():
    for index in range(60):
        example = make_example(5, index)
        objects, question = example.scene.objects, example.question
        if example.family == "counting":
            shape = next(s for s in shapes.SHAPES if shapes.PLURALS[s] in question)
            assert example.answer == shapes.COUNT_WORDS[sum(o.shape == shape for o in objects)]
        elif example.family == "colour":
            (target,) = [o for o in objects if f" {o.shape}?" in question]
            assert example.answer == target.colour
        elif example.family == "shape":
            (target,) = [o for o in objects if f" {o.colour} " in question]
            assert example.answer == target.shape
        elif example.family == "relation":
            words = question.rstrip("?").split()
            a, b = (next(o for o in objects if o.shape == w) for w in (words[2], words[-1]))
            assert example.answer == ("left" if a.cx < b.cx else "right")
        elif example.family == "reading":
            assert example.answer == example.scene.letter.char.lower()


def test_object_mask_marks_every_object_and_the_letter():
    example = make_example(0, 1)
    mask = shapes.object_mask(example.scene)
    assert set(np.unique(mask)) == set(range(len(example.scene.objects) + 2))
    image = np.asarray(example.image()).astype(int)
    letter = mask == len(example.scene.objects) + 1
    assert image[letter].mean() < 80  # the letter is drawn dark


def test_training_splits_differ_from_the_evaluation_split():
    held_out = {make_example(0, i).scene.background_seed for i in range(30)}
    assert held_out.isdisjoint({make_example(2, i).scene.background_seed for i in range(300)})


def test_score_is_exact_match_on_the_first_word(eval_samples):
    task, sample = ShapesTask(), eval_samples[2]
    assert task.score(sample, f"{sample.target.capitalize()}.")["correct"] == 1.0
    assert task.score(sample, "banana")["correct"] == 0.0
    assert task.score(sample, "")["correct"] == 0.0


def test_aggregate_reports_overall_and_per_family_percentages(eval_samples):
    task = ShapesTask()
    records = [{"sample_id": s.id, "prediction": s.target if s.meta["family"] == "reading" else "x",
                "scores": task.score(s, s.target if s.meta["family"] == "reading" else "x"),
                "meta": s.meta} for s in eval_samples[:12]]
    result = task.aggregate(records)
    assert result["accuracy"] == pytest.approx(100 / 6)
    assert result["accuracy/reading"] == 100.0 and result["accuracy/counting"] == 0.0
    assert set(result) == {"accuracy", *(f"accuracy/{f}" for f in FAMILIES)}
