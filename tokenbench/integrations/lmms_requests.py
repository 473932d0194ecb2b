"""What an lmms-eval generation request means for a tokenbench adapter, shared by both directions
of the bridge so that they build the same prompt and decode the same way.

tokenbench decodes greedily with one image per prompt; lmms-eval's ``generation_kwargs`` give the
length (``max_new_tokens``) and the stop strings (``until``) the answer is cut at.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

DEFAULT_MAX_NEW_TOKENS = 128  # lmms-eval's simple models use this when a task names no length
SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "num_beams")


class RequestError(ValueError):
    """A request tokenbench cannot serve as asked; the message says why."""


@dataclass(frozen=True)
class Decoding:
    """Greedy decoding for ``max_new_tokens`` tokens, the text cut at the first of ``until``."""

    max_new_tokens: int
    until: tuple[str, ...] = ()

    @classmethod
    def from_generation_kwargs(cls, kwargs: Mapping[str, Any] | None) -> Decoding:
        kwargs = dict(kwargs or {})
        # do_sample decides where the task gives it (transformers ignores temperature without it)
        do_sample = kwargs["do_sample"] if "do_sample" in kwargs else float(kwargs.get("temperature") or 0) > 0
        sampled = bool(do_sample) or int(kwargs.get("num_beams") or 1) > 1
        if sampled:
            asked = {k: kwargs[k] for k in SAMPLING_KEYS if k in kwargs}
            raise RequestError(f"tokenbench decodes greedily; the task asks for sampling or beam search {asked}")
        until = kwargs.get("until") or ()
        until = (until,) if isinstance(until, str) else tuple(s for s in until if s)
        return cls(int(kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS), until)

    def cut(self, text: str) -> str:
        """``text`` up to the first stop string (lmms-eval's models cut their answers the same way)."""
        for stop in self.until:
            text = text.split(stop, 1)[0]
        return text


def single_image(visuals: Any) -> Image.Image | None:
    """The one image of a document's ``doc_to_visual`` (a list, possibly nested once), or None for a
    text-only document; several images or a video are refused (tokenbench adapters take one image)."""
    items = visuals if isinstance(visuals, Sequence) and not isinstance(visuals, str) else \
        ([] if visuals is None else [visuals])
    if len(items) == 1 and isinstance(items[0], list):
        items = items[0]
    if not items:
        return None
    if len(items) > 1:
        raise RequestError(f"the document has {len(items)} visuals; tokenbench adapters take one image")
    if not isinstance(items[0], Image.Image):
        raise RequestError(f"the document's visual is a {type(items[0]).__name__}, not an image "
                           f"(tokenbench adapters take one image)")
    return items[0].convert("RGB")
