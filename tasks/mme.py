"""MME scoring: per-subtask accuracy and accuracy+, perception and cognition totals.

Every MME image comes with two yes/no questions (one true, one false). Per subtask,
``acc`` = percent of questions answered right and ``acc+`` = percent of images with *both*
questions right; the subtask score is acc + acc+ (0..200). Perception sums the 10 perception
subtasks (0..2000), cognition the 4 cognition subtasks (0..800).

``total`` = perception + cognition is what token-compression tables print as "MME" (LLaVA-1.5-7B:
~1862 = ~1510 perception + ~350 cognition), so it is the primary metric.

Answers are read as the official MME tool does: lower-cased, periods removed; "yes"/"no" exactly,
otherwise whichever of "yes"/"no" appears in the first four characters, otherwise "other" (wrong).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
              "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def read_yes_no(prediction: str) -> str:
    """"yes", "no" or "other", by the official MME rule."""
    text = prediction.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def mme_metrics(records: Iterable[tuple[str, str, bool]]) -> dict[str, float]:
    """Metrics from (subtask, image id, correct) triples.

    acc+ counts an image when every question of it that was answered is right (both, on full runs).
    A category outside the 14 subtasks raises ``ValueError`` naming it."""
    questions: dict[str, list[bool]] = defaultdict(list)
    images: dict[str, dict[str, bool]] = defaultdict(dict)
    for category, image, correct in records:
        if category not in PERCEPTION and category not in COGNITION:
            raise ValueError(f"MME category '{category}' is not one of the 14 subtasks "
                             f"({', '.join(PERCEPTION + COGNITION)})")
        questions[category].append(correct)
        images[category][image] = images[category].get(image, True) and correct
    result: dict[str, float] = {}
    for category, answers in questions.items():
        acc = 100.0 * sum(answers) / len(answers)
        acc_plus = 100.0 * sum(images[category].values()) / len(images[category])
        result.update({f"{category}_acc": acc, f"{category}_acc_plus": acc_plus, category: acc + acc_plus})
    result["perception"] = sum(result.get(c, 0.0) for c in PERCEPTION)
    result["cognition"] = sum(result.get(c, 0.0) for c in COGNITION)
    result["total"] = result["perception"] + result["cognition"]
    return result
