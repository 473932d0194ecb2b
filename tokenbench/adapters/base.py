"""The adapter contract: the only code that knows a VLM family's internals.

An adapter wraps a stock ``transformers`` model and its processor. It owns the prefill (so it can
run a compressor at any :class:`~tokenbench.compressor.Site`), records a :class:`TokenTrace` per
sample, and then lets greedy decoding continue on the shortened KV cache.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from tokenbench.adapters.placement import input_device
from tokenbench.budget import Budget
from tokenbench.compressor import Infeasible, ModelInfo, Site, Stage, TokenCompressor, check_signals


@dataclass
class Prompt:
    """One generation request: an image (or a video's sampled frames, ``video``) and the user's text
    (the adapter applies the chat template)."""

    image: Image.Image | None
    text: str
    video: Sequence[Image.Image] | None = None  # decoded frames, in time order (spec wave 2 §20 E8)
    key: str | None = None  # seeds the sample's random draws (the harness passes the sample id)

    def draw_key(self) -> str:
        """What seeds this prompt's random draws with the run seed: ``key``, else a digest of the text
        and the image (or frame) pixels (so the draws follow the content, not the batch position)."""
        if self.key is not None:
            return self.key
        digest = hashlib.sha256(self.text.encode())
        for image in [self.image, *(self.video or ())]:
            if image is not None:
                digest.update(f"{image.mode}{image.size}".encode())
                digest.update(image.tobytes())
        return "content:" + digest.hexdigest()


@dataclass
class TokenTrace:
    """Tokens alive at every vision block and LLM layer for one sample.

    - ``n_visual``: visual tokens of the image entering the LLM without compression.
    - ``vision``: tokens entering each vision-encoder block that runs (len = vision layers).
    - ``llm_visual`` / ``llm_total``: visual / all tokens entering each decoder layer in prefill.
    - ``plan``: the compressor's schedule, as ``[(stage, layer, keep), ...]``.
    - ``probe_rows``: attention query rows computed beside the fused kernel (probe cost).
    - ``eager_attention_calls``: attention calls that materialised a full map (0 for native/probe).
    - ``probe_key_tokens``: tokens whose keys a probe projected itself (``attention_source="next"``,
      or a site before layer 0) instead of reading them from the KV cache.
    - ``prompt_tokens`` / ``generated_tokens``: text lengths for FLOPs and decode accounting.
    - ``projector_tokens``: set where the projector runs on more tokens than reach the LLM
      uncompressed (LLaVA-OneVision projects every crop patch before unpadding and pooling).
    - ``vision_frames``: pictures each vision block of ``vision`` runs on, one after another (a
      video's frames, encoded frame by frame); ``vision`` counts one frame's tokens.
    - ``decode_layer``: the layer of a ``decode`` site (spec wave 2 E10), else None;
      ``decode_cached_visual``: the visual entries in the KV cache of layers >= ``decode_layer``;
      ``decode_visual``: how many of them those layers attended at each decode step of this sample.
    """

    n_visual: int
    vision: list[int] = field(default_factory=list)
    llm_visual: list[int] = field(default_factory=list)
    llm_total: list[int] = field(default_factory=list)
    plan: list[tuple[str, int, int]] = field(default_factory=list)
    probe_rows: int = 0
    eager_attention_calls: int = 0
    probe_key_tokens: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    projector_tokens: int | None = None  # tokens the projector ran on, where it runs before any site can act
    vision_frames: int = 1
    decode_layer: int | None = None
    decode_cached_visual: int = 0
    decode_visual: list[int] = field(default_factory=list)

    @property
    def realised_tokens(self) -> float:
        """Layer-averaged visual tokens actually processed by the decoder (the budget's unit)."""
        return sum(self.llm_visual) / len(self.llm_visual) if self.llm_visual else float(self.n_visual)

    @property
    def decode_kv_retention(self) -> float | None:
        """Mean share of the cached visual KV entries that layers >= ``decode_layer`` attended per
        decode step (None without a decode site or without decode steps)."""
        if not self.decode_visual or not self.decode_cached_visual:
            return None
        return sum(self.decode_visual) / (len(self.decode_visual) * self.decode_cached_visual)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__} | {
            "realised_tokens": self.realised_tokens, "decode_kv_retention": self.decode_kv_retention}


@dataclass
class Generation:
    """The answer to one :class:`Prompt` with its trace and phase timings (milliseconds)."""

    text: str
    trace: TokenTrace
    timings_ms: dict[str, float] = field(default_factory=dict)  # vision, prefill, decode (total)


class AdapterError(Exception):
    """A user-facing adapter failure (unsupported model, stage or option); message says the fix."""


class VLMAdapter(ABC):
    """Base class of adapters. One subclass per VLM family, keyed on HF ``config.model_type``."""

    name: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    stages: ClassVar[frozenset[Stage]] = frozenset()
    description: ClassVar[str] = ""
    #: Evaluation protocols (prompt template and image preprocessing) the adapter offers: ``hf`` is the
    #: checkpoint's processor and chat template; a family may add its paper's own (LLaVA: ``llava``).
    protocols: ClassVar[tuple[str, ...]] = ("hf",)
    #: The protocol ``tokenbench run`` uses for a checkpoint of this family when ``--protocol`` is not
    #: given (embedded models always use ``hf``, the protocol they were trained with).
    default_protocol: ClassVar[str] = "hf"
    #: Frames a video benchmark samples per video for this family when ``--frames`` is not given: the
    #: count its reference evaluation uses (lmms-eval's defaults; Video-LLaVA's own evaluation takes 8).
    video_frames: ClassVar[int] = 8

    def __init__(self, model: torch.nn.Module, processor: Any) -> None:
        self.model = model.eval()
        self.processor = processor
        self.protocol = "hf"

    @classmethod
    @abstractmethod
    def load(cls, path: str | Path, *, dtype: torch.dtype = torch.float32, attn: str = "sdpa",
             device: str | torch.device = "cpu") -> VLMAdapter:
        """Load a checkpoint (hub id or local dir) with ``from_pretrained`` and ``AutoProcessor``."""

    @abstractmethod
    def info(self, n_visual: int | None = None) -> ModelInfo:
        """Model facts for ``schedule``; ``n_visual`` overrides the default per-image token count."""

    def info_for(self, prompt: Prompt) -> ModelInfo:
        """Model facts for one prompt's image or video (its token count, grid, crops, frames); by
        default those of the model's default image."""
        return self.info()

    @abstractmethod
    def generate(self, prompts: Sequence[Prompt], *, compressor: TokenCompressor | None = None,
                 budget: Budget | None = None, max_new_tokens: int = 8,
                 seed: int = 0) -> list[Generation]:
        """Greedy generation for a batch, compressing with ``compressor`` at ``budget``."""

    def batchable(self, compressor: TokenCompressor | None) -> bool:
        """Whether ``generate`` runs this compressor on batches > 1 (else the harness sends one)."""
        return True

    def unserved_signal_reason(self, compressor: TokenCompressor,
                               plan: Sequence[tuple[Site, int]]) -> str | None:
        """Why this adapter cannot serve a signal that ``compressor`` needs at a site of ``plan``
        (the harness and ``generate`` then treat the plan as ``Infeasible`` with this reason), or
        ``None``. Here: the stage-level check against ``ModelInfo.signals``; families extend it with
        what depends on the checkpoint (a next vision block, an auxiliary CLIP model)."""
        try:
            check_signals(compressor.name, compressor.needs, list(plan), self.info(),
                          site_needs=compressor.site_needs)
        except Infeasible as exc:
            return str(exc)
        return None

    @property
    def device(self) -> torch.device:
        """Where inputs go (the input embedding's device when a device map spreads the model)."""
        return input_device(self.model)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype
