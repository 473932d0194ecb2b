"""Open-ended answer scoring: the VQA accuracy (VQAv2, TextVQA, VizWiz) and GQA exact match.

``normalize_answer`` follows the rules of the official VQA evaluation as applied by the EvalAI
answer processor that LLaVA-1.5 and lmms-eval run on predictions and ground truths alike:
lower-case; drop ``,`` and ``?``; split off ``'s``; punctuation is deleted (when it touches a space,
or the text has a digit-comma-digit) or else replaced by a space; periods not followed by a digit
are deleted; number words zero..ten become digits; the articles a/an/the are dropped;
apostrophe-less contractions get their apostrophes back ("dont" -> "don't").

``vqa_accuracy`` is the VQA metric: min(#annotators who gave the answer / 3, 1), averaged over
the ten leave-one-annotator-out subsets of the ten human answers. (The VQAv2 server normalises the
human answers only when they disagree; normalising them always, as TextVQA's evaluator does, can
only differ when all the answers are identical but not in normal form, which is rare.)
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Sequence

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
               ",", "?", "!")
DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})

# Canonical spellings; every variant with some apostrophes missing maps back to them. Variants that
# are ordinary words ("well", "were", "its", ...) are left alone, as in the official table.
_CONTRACTIONS = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't",
    "hadn't", "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's",
    "isn't", "it'd", "it'd've", "it'll", "let's", "ma'am", "mightn't", "mightn't've", "might've",
    "mustn't", "must've", "needn't", "not've", "o'clock", "oughtn't", "shan't", "she'd've", "she's",
    "should've", "shouldn't", "shouldn't've", "somebody'd", "somebody'd've", "somebody'll",
    "somebody's", "someone'd", "someone'd've", "someone'll", "someone's", "something'd",
    "something'd've", "something'll", "something's", "that's", "there'd", "there'd've", "there're",
    "there's", "they'd", "they'd've", "they'll", "they're", "they've", "'twas", "wasn't", "we'd've",
    "we're", "we've", "weren't", "what'll", "what're", "what's", "what've", "when's", "where'd",
    "where's", "where've", "who'd", "who'd've", "who'll", "who's", "who've", "why'll", "why're",
    "why's", "won't", "would've", "wouldn't", "wouldn't've", "y'all", "y'all'll", "y'all'd've", "you'd",
    "you'd've", "you'll", "you're", "you've",
)
_ORDINARY_WORDS = frozenset({"well", "were", "hell", "shell", "ill", "id", "its", "wed", "shed", "whore"})


def _contraction_variants() -> dict[str, str]:
    table = {}
    for canonical in _CONTRACTIONS:
        parts = canonical.split("'")
        for joins in itertools.product(("'", ""), repeat=len(parts) - 1):
            variant = parts[0] + "".join(j + p for j, p in zip(joins, parts[1:]))
            if variant != canonical and variant not in _ORDINARY_WORDS:
                table[variant] = canonical
    return table


CONTRACTIONS = _contraction_variants()


def _strip_punctuation(text: str) -> str:
    delete_all = DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if delete_all or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def normalize_answer(text: str) -> str:
    """The official VQA answer normalisation (see the module docstring)."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _strip_punctuation(text)
    words = [NUMBER_WORDS.get(w, w) for w in text.split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the human answers (0..1)."""
    if not answers:
        return 0.0
    predicted = normalize_answer(prediction)
    agrees = [normalize_answer(a) == predicted for a in answers]
    # Leaving out annotator i removes one match exactly when annotator i gave the predicted answer.
    per_subset = [min(1.0, (sum(agrees) - agree) / 3) for agree in agrees]
    return sum(per_subset) / len(per_subset)


def most_common_answer(answers: Sequence[str]) -> str:
    """The answer most annotators gave (after normalisation): a perfect prediction."""
    counts = Counter(normalize_answer(a) for a in answers)
    best = max(counts.values())
    return next(a for a in answers if counts[normalize_answer(a)] == best)


def normalize_gqa(text: str) -> str:
    """GQA's comparison form, as in LLaVA-1.5's GQA conversion: trimmed, lower-case, no final period."""
    return text.strip().rstrip(".").strip().lower()


def gqa_match(prediction: str, answer: str) -> bool:
    return normalize_gqa(prediction) == normalize_gqa(answer)
