"""Tiny random-weight VLMs built from configs, saved in HF format, for tests and offline runs.

Nothing here downloads anything: tokenizers are word-level vocabularies built with the
``tokenizers`` library and wrapped in ``PreTrainedTokenizerFast``; models are stock ``transformers``
classes instantiated from small configs. Each factory writes a directory that loads with
``from_pretrained`` + ``AutoProcessor.from_pretrained`` exactly like a real checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

def simple_chat_template(image_token: str = "<image>") -> str:
    """A plain ``ROLE: text`` chat template; ``{"type": "image"}`` content items render as
    ``image_token`` (the processor then expands it to one placeholder per visual token)."""
    return (
        "{% for message in messages %}"
        "{{ message['role'] | upper }}: "
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for item in message['content'] %}"
        "{% if item['type'] == 'image' %}" + image_token + " {% endif %}"
        "{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
        "{% endfor %}{% endif %} "
        "{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )


DEFAULT_WORDS = tuple(
    "a an the is are of in on to and or what which how many color shape red green blue yellow "
    "black white circle square triangle star left right top bottom one two three four five yes no "
    "image picture describe there this that user assistant : ? . ,".split())


def word_level_tokenizer(words: Sequence[str], special_tokens: Sequence[str] = ("<unk>", "<pad>", "<s>", "</s>"),
                         chat_template: str | None = None, *, unk_token: str = "<unk>",
                         pad_token: str = "<pad>", bos_token: str | None = "<s>",
                         eos_token: str | None = "</s>",
                         extra_attributes: dict[str, str] | None = None) -> PreTrainedTokenizerFast:
    """A lower-casing, whitespace-and-punctuation word-level tokenizer over ``words``.

    Special tokens come first in the vocabulary (ids 0..), then ``words`` in order (duplicates
    dropped). Every special token is registered as an added special token, so strings like
    ``<image>`` always encode to one id. Decoding joins words with spaces. ``extra_attributes`` sets
    named special tokens the processors look up (e.g. ``{"image_token": "<image>"}``).
    """
    specials = list(dict.fromkeys([unk_token, pad_token, *(t for t in (bos_token, eos_token) if t),
                                   *special_tokens]))
    vocab: dict[str, int] = {}
    for token in [*specials, *(w.lower() for w in words)]:
        vocab.setdefault(token, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk_token))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                  pre_tokenizers.Punctuation("isolated")])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    core.add_special_tokens(specials)
    extra = dict(extra_attributes or {})
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token=unk_token, pad_token=pad_token, bos_token=bos_token,
        eos_token=eos_token, additional_special_tokens=[t for t in specials if t not in
                                                        (unk_token, pad_token, bos_token, eos_token)],
        extra_special_tokens=extra or None, padding_side="left")
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer
