"""Multiple-choice questions: the LLaVA-1.5 prompt and reading the chosen letter back.

Each benchmark's official rule (the default, ``--scoring official``):

- ScienceQA-IMG, :func:`read_scienceqa` (LLaVA's ``eval_science_qa``): the answer is exactly a
  letter A-E, or starts with a letter followed by ". ", or holds "The answer is X" plus one more
  character exactly once; anything else fails.
- SEED-Bench, :func:`read_exact_letter` (LLaVA's SEED conversion): the answer is exactly the letter.
- MMBench, :func:`read_mmbench` (the official tool's ``can_infer``, without its ChatGPT fallback):
  exactly one of A-E as a word (alone, or in one of the forms "A.", "A,", "A:", "A)", "A).", "(A)",
  "(A).", ":A", ":A,", ":A.", ":A)", ":A)."), else exactly one option's text inside the answer.
  A word "A" in an answer of more than three words is taken as the article in the first test.

An answer that names two options, or none, scores 0 under all three.

:func:`extract_choice` (``--scoring lenient``, tokenbench's earlier reading) also accepts "B) a cat",
"The answer is B", "(B)" anywhere, and an option's text said alone or uniquely contained.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping

LETTERS = "ABCDEFGHIJ"
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."

_LEADING_LETTER = re.compile(r"^[(\[]?\s*([A-J])\s*(?:[)\].:,]|$|\s)")
_FORMATTED_A = re.compile(r"^(?:[(\[]\s*A\s*[)\]]|A\s*[.:)]|A$)")
_ANSWER_IS = re.compile(r"\b(?i:answer|option|choice)\s*(?:is|:)?\s*:?\s*[(\[]?([A-J])(?![\w'])")
_BRACKETED = re.compile(r"[(\[]([A-J])[)\]]")
_SCIENCEQA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")
_MMBENCH_FORMS = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."),
                  (":", ""), (":", ","), (":", "."), (":", ")"), (":", ")."))


def options_block(options: Mapping[str, str]) -> str:
    """``A. first`` lines, one per option, in letter order."""
    return "\n".join(f"{letter}. {text}" for letter, text in options.items())


def choice_prompt(question: str, options: Mapping[str, str], context: str | None = None) -> str:
    """The LLaVA-1.5 multiple-choice prompt: optional context line, question, options, instruction."""
    head = f"{context}\n{question}" if context else question
    return f"{head}\n{options_block(options)}\n{CHOICE_INSTRUCTION}"


def _plain(text: str) -> str:
    return " ".join(text.lower().translate(str.maketrans("", "", string.punctuation)).split())


def extract_choice(prediction: str, options: Mapping[str, str]) -> str | None:
    """The option letter the prediction picks, or None when it picks none or is ambiguous."""
    text = prediction.strip()
    if not text:
        return None
    if len(text.rstrip(".")) == 1 and text[0].upper() in options:  # "b", "b."
        return text[0].upper()
    named = _option_text_named(text, options)
    lead = _LEADING_LETTER.match(text)
    if lead and lead.group(1) in options:
        # A bare leading "A" may be the article ("A cat."): then the option text decides.
        article = lead.group(1) == "A" and not _FORMATTED_A.match(text)
        if not (article and named not in (None, "A")):
            return lead.group(1)
    for pattern in (_ANSWER_IS, _BRACKETED):
        found = {letter for letter in pattern.findall(text) if letter in options}
        if len(found) == 1:
            return found.pop()
    return named


def _option_text_named(text: str, options: Mapping[str, str]) -> str | None:
    """The option whose text the prediction is (or, failing that, uniquely contains)."""
    said = _plain(text)
    if not said:
        return None
    plain = {letter: _plain(str(option)) for letter, option in options.items()}
    exact = [letter for letter, option in plain.items() if option and option == said]
    if len(exact) == 1:
        return exact[0]
    contained = [letter for letter, option in plain.items()
                 if option and re.search(rf"(?<!\w){re.escape(option)}(?!\w)", said)]
    # Prefer the longest match when one option's text contains another's ("red" vs "dark red").
    contained = [c for c in contained if not any(c != o and plain[c] in plain[o] for o in contained)]
    return contained[0] if len(contained) == 1 else None


def read_scienceqa(prediction: str, options: Mapping[str, str]) -> str | None:
    """LLaVA's ScienceQA rule; None when it fails or names no option of this question."""
    letters = ("A", "B", "C", "D", "E")
    if prediction in letters:
        letter = prediction
    elif len(prediction) >= 3 and prediction[0] in letters and prediction[1:3] == ". ":
        letter = prediction[0]
    else:
        found = _SCIENCEQA_ANSWER_IS.findall(prediction)
        letter = found[0] if len(found) == 1 else ""
    return letter if letter and letter in options else None


def read_exact_letter(prediction: str, options: Mapping[str, str]) -> str | None:
    """SEED-Bench's rule: the (stripped) answer is the letter itself."""
    return prediction if prediction in options else None


def read_mmbench(prediction: str, options: Mapping[str, str]) -> str | None:
    """MMBench's matching (see the module docstring); None when no single option is inferred."""
    words = [w.strip() for w in prediction.split()]
    candidates = "ABCDE"
    if sum(c in words for c in candidates) == 1 and not ("A" in words and len(words) > 3):
        return next(c for c in candidates if c in words)
    for prefix, suffix in _MMBENCH_FORMS:
        named = [c for c in candidates if f"{prefix}{c}{suffix}" in words]
        if len(named) == 1:
            return named[0]
    said = prediction.lower()
    named = [letter for letter, text in options.items()
             if letter in "ABCD" and str(text).lower() in said]
    return named[0] if len(named) == 1 else None
