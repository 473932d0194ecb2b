"""Open-ended answer scoring: the VQA accuracy (VQAv2, TextVQA, VizWiz) and GQA exact match.

Two answer normalisations, each the official one of its benchmarks:

- ``normalize_answer``: the EvalAI answer processor that LLaVA-1.5 (``m4c_evaluator``) and lmms-eval
  run on TextVQA and VizWiz predictions and ground truths alike: lower-case; drop ``,`` and ``?``;
  split off ``'s``; punctuation is deleted (when it touches a space, or the text has a
  digit-comma-digit) or else replaced by a space; periods not followed by a digit are deleted, at
  most 32 of them (the reference passes ``re.UNICODE``, which is 32, as ``re.sub``'s count); number
  words zero..ten become digits; the articles a/an/the are dropped; the words of the official
  contraction table get their apostrophes back ("dont" -> "don't"), that table exactly.
- ``normalize_vqav2``: the steps of VQAv2's own ``vqaEval.py``, in its order: newlines and tabs to
  spaces, strip; punctuation as above but without the EvalAI pre-pass (so "red,white" becomes "red
  white" and "let 's" stays two words); periods (at most 32); then lower-case, digits, articles
  and contractions. lmms-eval applies these steps to every answer; the VQAv2 server skips them when
  the ten human answers are identical.

``vqa_accuracy`` is the VQA metric: min(#annotators who gave the answer / 3, 1), averaged over
the ten leave-one-annotator-out subsets of the ten human answers.

``normalize_lenient`` is tokenbench's earlier processor (``--scoring lenient``): EvalAI's, with
every apostrophe-less spelling of the contractions and no limit on periods.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Callable, Sequence

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
               ",", "?", "!")
PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
VQAEVAL_COMMA = re.compile(r"(\d)(,)(\d)")
EVALAI_COMMA = re.compile(r"(?<=\d)(,)+(?=\d)")
PERIOD_LIMIT = 32  # re.UNICODE passed as re.sub's count in both reference processors

# The official table (vqaEval.py and EvalAI's processor share it), as "spelling=canonical" pairs.
# Its oddities are kept: "somebody'd" maps to "somebodyd", and the capitalised keys ("Im") never
# match because words are lower-cased first.
_OFFICIAL_TABLE = """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
howd=how'd howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd
itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't
mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at
'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've
shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd
somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's
someoned=someone'd someoned've=someone'd've someone'dve=someone'd've someonell=someone'll
someones=someone's somethingd=something'd somethingd've=something'd've
something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd
theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas
wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll
whatre=what're whats=what's whatve=what've whens=when's whered=where'd wheres=where's
whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
you'dve=you'd've youll=you'll youre=you're youve=you've
"""
OFFICIAL_CONTRACTIONS = dict(pair.split("=") for pair in _OFFICIAL_TABLE.split())

# The lenient table: canonical spellings, every variant with some apostrophes missing mapping back
# to them, except variants that are ordinary words ("well", "were", "its", ...).
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


LENIENT_CONTRACTIONS = _contraction_variants()


def _strip_punctuation(text: str, comma: re.Pattern[str], period_limit: int | None) -> str:
    delete_all = comma.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if delete_all or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=period_limit or 0)


def _digits_articles(text: str, contractions: dict[str, str]) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(contractions.get(w, w) for w in words if w not in ARTICLES)


def _evalai_pre_pass(text: str) -> str:
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """The EvalAI answer processor (TextVQA, VizWiz; see the module docstring)."""
    text = _strip_punctuation(_evalai_pre_pass(text), EVALAI_COMMA, PERIOD_LIMIT)
    return _digits_articles(text, OFFICIAL_CONTRACTIONS)


def normalize_vqav2(text: str) -> str:
    """VQAv2's ``vqaEval`` steps (see the module docstring)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_strip_punctuation(text, VQAEVAL_COMMA, PERIOD_LIMIT), OFFICIAL_CONTRACTIONS)


def normalize_lenient(text: str) -> str:
    """tokenbench's earlier processor: EvalAI's with the wider contraction table, periods unlimited."""
    text = _strip_punctuation(_evalai_pre_pass(text), EVALAI_COMMA, None)
    return _digits_articles(text, LENIENT_CONTRACTIONS)


def vqa_accuracy(prediction: str, answers: Sequence[str],
                 normalize: Callable[[str], str] = normalize_answer) -> float:
    """VQA accuracy of one prediction against the human answers (0..1), both sides normalised."""
    if not answers:
        return 0.0
    predicted = normalize(prediction)
    agrees = [normalize(a) == predicted for a in answers]
    # Leaving out annotator i removes one match exactly when annotator i gave the predicted answer.
    per_subset = [min(1.0, (sum(agrees) - agree) / 3) for agree in agrees]
    return sum(per_subset) / len(per_subset)


def most_common_answer(answers: Sequence[str], normalize: Callable[[str], str] = normalize_answer) -> str:
    """The answer most annotators gave (after normalisation): a perfect prediction."""
    counts = Counter(normalize(a) for a in answers)
    best = max(counts.values())
    return next(a for a in answers if counts[normalize(a)] == best)


def normalize_gqa(text: str) -> str:
    """GQA's comparison form, as in LLaVA-1.5's GQA conversion: trimmed, lower-case, no final period."""
    return text.strip().rstrip(".").strip().lower()


def gqa_match(prediction: str, answer: str) -> bool:
    return normalize_gqa(prediction) == normalize_gqa(answer)
