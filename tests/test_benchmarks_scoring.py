"""The benchmark scorers against hand-computed values, including the official edge cases."""

from __future__ import annotations

import pytest
from tokenbench.tasks.choice import (
    choice_prompt,
    extract_choice,
    read_exact_letter,
    read_mmbench,
    read_scienceqa,
)
from tokenbench.tasks.mme import mme_metrics
from tokenbench.tasks.mme import read_yes_no as read_mme
from tokenbench.tasks.pope import binary_metrics, pope_metrics
from tokenbench.tasks.pope import read_yes_no as read_pope
from tokenbench.tasks.vqa_scoring import (
    OFFICIAL_CONTRACTIONS,
    gqa_match,
    most_common_answer,
    normalize_answer,
    normalize_lenient,
    normalize_vqav2,
    vqa_accuracy,
)


@pytest.mark.parametrize("raw, normal", [
    ("Yes", "yes"),
    ("The dog.", "dog"),                  # article and final period dropped
    ("an apple", "apple"),
    ("a-b", "b"),                         # hyphen between letters becomes a space, then "a" is an article
    ("two", "2"),                         # number words become digits
    ("None", "0"),
    ("ten dogs", "10 dogs"),
    ("3.5", "3.5"),                       # a period before a digit stays
    ("1,000", "1000"),                    # digit-comma-digit: punctuation deleted, not spaced
    ("red, white", "red white"),
    ("yes!", "yes"),
    ("(left)", "left"),
    ("dont", "don't"),                    # contractions regain their apostrophes
    ("isnt", "isn't"),
    ("couldnt've", "couldn't've"),
    ("well", "well"),                     # ...but ordinary words are not contractions
    ("man's hat", "man 's hat"),
    ("What?", "what"),
    ("  stop\tsign \n", "stop sign"),
    ("Unanswerable", "unanswerable"),
])
def test_vqa_normalisation(raw: str, normal: str) -> None:
    assert normalize_answer(raw) == normal


def test_vqa_accuracy_averages_leave_one_out_subsets() -> None:
    # 3 of 10 annotators said "2": leaving out one of them gives 2/3, any other 3/3=1.
    assert vqa_accuracy("2", ["2"] * 3 + ["3"] * 7) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    # 2 matches: (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    assert vqa_accuracy("two", ["2", "2"] + ["3"] * 8) == pytest.approx(0.6)
    # 1 match: (1 * 0 + 9 * 1/3) / 10 = 0.3
    assert vqa_accuracy("Two.", ["2"] + ["3"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("2", ["2"] * 4 + ["3"] * 6) == 1.0
    assert vqa_accuracy("4", ["2"] * 10) == 0.0
    assert vqa_accuracy("anything", []) == 0.0


def test_vqa_accuracy_normalises_both_sides() -> None:
    answers = ["the red one", "red one", "Red one", "red  one", "blue"]
    # 4 of 5 agree after normalisation: each leave-one-out subset has >= 3 matches.
    assert vqa_accuracy("A red one.", answers) == 1.0


def test_unanswerable_is_an_ordinary_answer() -> None:
    answers = ["unanswerable"] * 6 + ["Unanswerable"] * 2 + ["a bottle"] * 2
    assert vqa_accuracy("Unanswerable", answers) == 1.0
    assert vqa_accuracy("bottle", answers) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert normalize_answer(most_common_answer(answers)) == "unanswerable"


def test_most_common_answer_is_scored_perfectly() -> None:
    answers = ["two", "2", "2", "3", "three"]
    assert normalize_answer(most_common_answer(answers)) == "2"
    # 3 of 5 agree: leaving out one of the three gives 2/3, leaving out another 1 -> (3*2/3 + 2)/5.
    assert vqa_accuracy(most_common_answer(answers), answers) == pytest.approx(0.8)
    assert vqa_accuracy(most_common_answer(answers + ["2"]), answers + ["2"]) == 1.0


def test_gqa_exact_match_after_normalisation() -> None:
    assert gqa_match("Yes.", "yes")
    assert gqa_match("  Left ", "left")
    assert not gqa_match("the left", "left")   # GQA does not drop articles
    assert not gqa_match("no", "yes")


OPTIONS = {"A": "dog", "B": "cat", "C": "dark red", "D": "red"}


@pytest.mark.parametrize("prediction, letter", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("B) cat", "B"), ("B: cat", "B"), ("b", "B"),
    ("The answer is B", "B"), ("The answer is (C).", "C"), ("Answer: D", "D"),
    ("cat", "B"), ("Cat.", "B"),            # the option text itself
    ("dark red", "C"), ("red", "D"),         # the longer option wins when one contains the other
    ("A", "A"), ("A.", "A"), ("(A) dog", "A"),
    ("A cat", "B"),                           # "A" as an article: the option text decides
    ("A dog.", "A"),
    ("", None), ("zebra", None), ("It is red or cat", None),
    ("E", None),                              # not among the options
])
def test_choice_extraction(prediction: str, letter: str | None) -> None:
    assert extract_choice(prediction, OPTIONS) == letter


def test_choice_prompt_is_llava_format() -> None:
    prompt = choice_prompt("What is it?", {"A": "dog", "B": "cat"}, context="Context: a farm")
    assert prompt == ("Context: a farm\nWhat is it?\nA. dog\nB. cat\n"
                      "Answer with the option's letter from the given choices directly.")


@pytest.mark.parametrize("prediction, read", [
    ("Yes", "yes"), ("No", "no"), ("no", "no"), ("Yes, there is a dog.", "yes"),
    ("There is not a dog in the image.", "no"), ("No, there is none.", "no"),
    ("Yes. No dog though.", "yes"),          # only the first sentence counts
    ("Nope", "yes"),                          # official rule: only the words No / no / not say no
    ("No\n", "no"),
    ("", "yes"),
])
def test_pope_reading(prediction: str, read: str) -> None:
    assert read_pope(prediction) == read


def test_pope_metrics_by_hand() -> None:
    # tp=2, fp=1, fn=1, tn=1 -> acc 60, precision 2/3, recall 2/3, F1 2/3, predicted yes 3/5.
    pairs = [("yes", "yes"), ("yes", "no"), ("no", "yes"), ("no", "no"), ("yes", "yes")]
    metrics = binary_metrics(pairs)
    assert metrics == pytest.approx({"accuracy": 60.0, "precision": 200 / 3, "recall": 200 / 3,
                                     "f1": 200 / 3, "yes_ratio": 60.0})
    # A model that always says "no": precision and recall 0 -> F1 0, yes-ratio 0.
    assert binary_metrics([("no", "yes"), ("no", "no")]) == pytest.approx(
        {"accuracy": 50.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0})


def test_pope_metrics_per_split_and_mean() -> None:
    records = [("random", "yes", "yes"), ("random", "no", "no"),                 # perfect: F1 100
               ("adversarial", "yes", "yes"), ("adversarial", "yes", "no")]     # P 1/2, R 1 -> F1 2/3
    metrics = pope_metrics(records)
    assert metrics["random_f1"] == pytest.approx(100.0)
    assert metrics["adversarial_f1"] == pytest.approx(200 / 3)
    assert metrics["adversarial_yes_ratio"] == pytest.approx(100.0)
    assert metrics["f1"] == pytest.approx((100.0 + 200 / 3) / 2)
    assert metrics["accuracy"] == pytest.approx((100.0 + 50.0) / 2)
    assert "popular_f1" not in metrics


@pytest.mark.parametrize("prediction, read", [
    ("Yes", "yes"), ("no.", "no"), ("Yes, it is.", "yes"), ("No, it is not", "no"),
    ("Not sure", "no"),       # "no" within the first four characters, as the official tool reads it
    ("It is yes", "other"), ("", "other"),
])
def test_mme_reading(prediction: str, read: str) -> None:
    assert read_mme(prediction) == read


def test_mme_acc_plus_needs_both_questions_of_an_image() -> None:
    records = [
        # existence: image 1 both right, image 2 one right -> acc 75, acc+ 50, score 125
        ("existence", "e1", True), ("existence", "e1", True),
        ("existence", "e2", True), ("existence", "e2", False),
        # OCR: both images half right -> acc 50, acc+ 0, score 50
        ("OCR", "o1", True), ("OCR", "o1", False), ("OCR", "o2", False), ("OCR", "o2", True),
        # code_reasoning (cognition): perfect -> 200
        ("code_reasoning", "c1", True), ("code_reasoning", "c1", True),
    ]
    metrics = mme_metrics(records)
    assert metrics["existence_acc"] == pytest.approx(75.0)
    assert metrics["existence_acc_plus"] == pytest.approx(50.0)
    assert metrics["existence"] == pytest.approx(125.0)
    assert metrics["OCR"] == pytest.approx(50.0)
    assert metrics["perception"] == pytest.approx(175.0)
    assert metrics["cognition"] == pytest.approx(200.0)
    assert metrics["total"] == pytest.approx(375.0)


# --- the official rules (default) against tokenbench's lenient reading -----------------------------

FOUR = {"A": "dog", "B": "cat", "C": "bicycle", "D": "red"}


@pytest.mark.parametrize("prediction, official, lenient", [
    ("B", "B", "B"), ("B. cat", "B", "B"), ("The answer is C.", "C", "C"),
    ("B.", None, "B"),                       # LLaVA's rule wants "B" alone or "B. " + text
    ("(B)", None, "B"), ("The answer is C", None, "C"),   # the pattern needs one more character
    ("A or B", None, "A"), ("A, B", None, "A"), ("B or C", None, "B"),   # two options named
    ("A cat is shown.", None, "B"), ("Bicycle", None, "C"), ("E", None, None), ("b", None, "B"),
])
def test_scienceqa_reads_by_llava_rule(prediction: str, official: str | None, lenient: str | None) -> None:
    assert read_scienceqa(prediction, FOUR) == official
    assert extract_choice(prediction, FOUR) == lenient


@pytest.mark.parametrize("prediction, official", [
    ("B", "B"), ("B.", None), ("(B)", None), ("b", None), ("B) cat", None), ("cat", None), ("E", None),
])
def test_seedbench_reads_the_exact_letter(prediction: str, official: str | None) -> None:
    assert read_exact_letter(prediction, FOUR) == official


@pytest.mark.parametrize("prediction, official", [  # agrees with lmms-eval's MMBench can_infer
    ("B", "B"), ("B.", "B"), ("(C)", "C"), ("The answer is D", "D"), ("Answer: (B).", "B"),
    ("A or B", None), ("B or C", None),        # two letters, no option text
    ("A, B", "B"),                             # only "B" is a bare word: the official tool picks it
    ("A cat is shown.", "B"),                  # "A" taken as an article; "cat" is option B's text
    ("A bird is shown.", None),                # ... and no option's text: nothing
    ("Bicycle", "C"), ("a dog and a cat", None), ("E", "E"),
])
def test_mmbench_reads_by_the_official_can_infer(prediction: str, official: str | None) -> None:
    assert read_mmbench(prediction, FOUR) == official


@pytest.mark.parametrize("prediction, answers, vqav2, evalai, lenient", [
    ("red,white", ["red white"] * 4 + ["red"] * 6, 1.0, 0.0, 0.0),
    ("let 's go", ["let's go"] * 4 + ["go"] * 6, 0.0, 1.0, 1.0),
    ("Two", ["2"] * 10, 1.0, 1.0, 1.0),
    ("couldntve", ["couldn't've"] * 10, 0.0, 0.0, 1.0),   # not in the official contraction table
    ("yallll", ["y'all'll"] * 10, 0.0, 0.0, 1.0),
    ("dont", ["don't"] * 10, 1.0, 1.0, 1.0),
    ("x" + "." * 40, ["x"] * 10, 0.0, 0.0, 1.0),          # at most 32 periods are removed
])
def test_vqa_normalisations(prediction: str, answers: list[str], vqav2: float, evalai: float,
                            lenient: float) -> None:
    assert vqa_accuracy(prediction, answers, normalize_vqav2) == pytest.approx(vqav2)
    assert vqa_accuracy(prediction, answers) == pytest.approx(evalai)
    assert vqa_accuracy(prediction, answers, normalize_lenient) == pytest.approx(lenient)


def test_the_official_contraction_table_keeps_its_quirks() -> None:
    assert len(OFFICIAL_CONTRACTIONS) == 120
    assert OFFICIAL_CONTRACTIONS["somebody'd"] == "somebodyd" and "couldntve" not in OFFICIAL_CONTRACTIONS
    assert normalize_answer("Im") == "im"                  # the key is capitalised, the word lower-cased
    assert normalize_answer("x" + "." * 40) == "x" + "." * 8


def test_mme_refuses_an_unknown_category() -> None:
    with pytest.raises(ValueError, match="MME category 'Existence'"):
        mme_metrics([("existence", "a", True), ("Existence", "b", True)])
