"""POPE scoring: yes/no reading and the per-split accuracy, precision, recall, F1 and yes-ratio.

The reading follows the official POPE / LLaVA-1.5 evaluation (on the stripped generation, as
LLaVA saves it): keep the first sentence, drop commas, and answer "no" when one of its words is
"No", "no" or "not", otherwise "yes". Positive class = "yes". The yes-ratio is the share of
*predicted* yes (the official definition; ~50% for an unbiased model, as every split is balanced).

Scores are percentages. Token-compression tables (LLaVA-1.5: 85.9) report the F1 averaged over
the three COCO splits random / popular / adversarial, which is the primary metric ``f1``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

SPLITS = ("random", "popular", "adversarial")
NEGATIVE_WORDS = frozenset({"No", "no", "not"})


def read_yes_no(prediction: str) -> str:
    """The official POPE reading of a free-form answer: "yes" or "no"."""
    first_sentence = prediction.strip().split(".")[0]
    words = first_sentence.replace(",", "").split(" ")
    return "no" if NEGATIVE_WORDS.intersection(words) else "yes"


def binary_metrics(pairs: Iterable[tuple[str, str]]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and yes-ratio (percent) of (prediction, answer) pairs."""
    pairs = list(pairs)
    tp = sum(p == "yes" and a == "yes" for p, a in pairs)
    fp = sum(p == "yes" and a == "no" for p, a in pairs)
    tn = sum(p == "no" and a == "no" for p, a in pairs)
    fn = sum(p == "no" and a == "yes" for p, a in pairs)
    total = len(pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": 100.0 * (tp + tn) / total if total else 0.0,
            "precision": 100.0 * precision, "recall": 100.0 * recall, "f1": 100.0 * f1,
            "yes_ratio": 100.0 * (tp + fp) / total if total else 0.0}


def pope_metrics(records: Iterable[tuple[str, str, str]]) -> dict[str, float]:
    """Per-split metrics (``random_f1``, ...) and their means over the splits present (``f1``, ...)
    from (split, prediction, answer) triples."""
    by_split: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for split, prediction, answer in records:
        by_split[split].append((prediction, answer))
    per_split = {split: binary_metrics(pairs) for split, pairs in by_split.items()}
    result = {f"{split}_{name}": value
              for split, metrics in per_split.items() for name, value in metrics.items()}
    for name in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        result[name] = _mean(m[name] for m in per_split.values())
    return result


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0

