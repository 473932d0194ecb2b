"""Multiple-choice questions: the LLaVA-1.5 prompt and reading the chosen letter back.

Models answer "B", "B.", "(B)", "B) a cat", "The answer is B", or the option text itself;
:func:`extract_choice` accepts all of them, and nothing that names two different options.
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
