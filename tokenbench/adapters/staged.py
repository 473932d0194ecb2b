"""The generation flow shared by adapters that own their prefill.

``encode`` (family) → vision encoder and pre-LLM sites (family) → splice the surviving visual
tokens into the prompt → :class:`~tokenbench.adapters.prefill.StagedPrefill` → greedy decode.
A family adapter implements :meth:`StagedAdapter._encode`, :meth:`StagedAdapter._visual_tokens`
and :meth:`StagedAdapter._decoder`.
"""

from __future__ import annotations

import hashlib
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from tokenbench.adapters.base import AdapterError, Generation, Prompt, TokenTrace, VLMAdapter
from tokenbench.adapters.decode import DecodeStage
from tokenbench.adapters.loading import rotary_of
from tokenbench.adapters.prefill import (
    Decoder,
    StagedPrefill,
    TokenSequence,
    contiguous_positions,
    greedy_decode,
    splice,
)
from tokenbench.adapters.sites import Applied, CropLayout, VisualBlock
from tokenbench.budget import Budget
from tokenbench.compressor import Infeasible, Site, Stage, TokenCompressor
from tokenbench.measure import Timer


@dataclass
class Encoded:
    """A tokenised, left-padded batch with its image inputs."""

    input_ids: torch.Tensor  # [B, S]
    attention_mask: torch.Tensor  # [B, S]
    image_inputs: dict[str, torch.Tensor]
    image_token_id: int
    grid: tuple[int, int]  # visual-token grid of the (equal-sized) images
    positions: torch.Tensor | None = None  # family-computed position ids (M-RoPE), else derived
    texts: list[str] | None = None  # the prompts' user text (``clip_text`` signal), set by ``run``
    # Multi-crop images (LLaVA-NeXT): visual tokens per image when not grid[0]·grid[1], placeholder
    # tokens per image (visual plus newline tokens), and where each visual token lies in the crops.
    visual_count: int | None = None
    span_count: int | None = None
    crops: CropLayout | None = None
    frames: int = 1  # frames of a video (frame-major tokens, ``grid`` is one frame's), 1 for an image

    @property
    def n_visual(self) -> int:
        return self.visual_count or self.frames * self.grid[0] * self.grid[1]

    @property
    def n_span(self) -> int:
        """Placeholder tokens per image: the visual tokens plus any layout (newline) tokens."""
        return self.span_count or self.n_visual


@dataclass
class Plan:
    """A compressor's schedule split by stage."""

    compressor: TokenCompressor | None
    sites: list[tuple[Site, int]] = field(default_factory=list)
    generator: torch.Generator | None = None
    generators: list[torch.Generator] | None = None  # one per row, for stochastic methods (see sample_seed)

    def at(self, stage: Stage) -> dict[int, int]:
        return {site.layer: keep for site, keep in self.sites if site.stage is stage}


@dataclass
class Run:
    """One batch's generations plus what tests inspect: tokens, per-step logits, layer positions."""

    generations: list[Generation]
    tokens: torch.Tensor  # [B, T]
    logits: torch.Tensor  # [B, T, V]
    layer_positions: list[torch.Tensor]  # position ids fed to each decoder layer in prefill


def sample_seed(seed: int, key: str) -> int:
    """The seed of one sample's generator: a hash of the run seed and the sample's key, so its draws
    depend on neither its batch position, nor the batch size, nor whether the run was resumed."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # below 2**63


class PhaseTimer:
    """Milliseconds per phase name, summed over calls; each call is timed by :class:`Timer`."""

    def __init__(self, device: torch.device) -> None:
        self.timer = Timer(device)
        self.ms: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        with self.timer.measure():
            yield
        self.ms[name] = self.ms.get(name, 0.0) + self.timer.elapsed_ms


class StagedAdapter(VLMAdapter):
    """A :class:`VLMAdapter` whose prefill is the staged loop; families fill in three hooks."""

    #: Position policy forced by the family (Qwen2-VL keeps M-RoPE ids), else the method's choice.
    fixed_position_policy: ClassVar[str | None] = None
    #: Whether the family takes video prompts (``Prompt.video``); the others refuse them.
    accepts_video: ClassVar[bool] = False

    def batchable(self, compressor: TokenCompressor | None) -> bool:
        """Batches need one query row per sample: ``text`` signals and ``text``/``all`` attention
        rows differ in length between left-padded rows, so those methods run one sample at a time;
        so do ``stochastic`` ones unless they draw each row from its own generator (``draws_per_row``)."""
        if compressor is None:
            return True
        if (compressor.stochastic and not compressor.draws_per_row) or "text" in compressor.needs:
            return False
        if compressor.adaptive_count or "clip_text" in compressor.needs:
            return False  # per-image token counts / instruction segments differ between rows
        return not ("attention" in compressor.needs and compressor.attention_queries != "last")

    def generate(self, prompts: Sequence[Prompt], *, compressor: TokenCompressor | None = None,
                 budget: Budget | None = None, max_new_tokens: int = 8, seed: int = 0) -> list[Generation]:
        out: dict[int, Generation] = {}
        for indices in self._group_indices(prompts, compressor):
            group = [prompts[i] for i in indices]
            generations = self.run(group, compressor=compressor, budget=budget, max_new_tokens=max_new_tokens,
                                   seed=seed).generations
            out.update(zip(indices, generations))
        return [out[i] for i in range(len(prompts))]  # in the order of the prompts, whatever the groups

    def _group_indices(self, prompts: Sequence[Prompt], compressor: TokenCompressor | None) -> list[list[int]]:
        if not self.batchable(compressor):
            return [[i] for i in range(len(prompts))]
        groups: dict[Any, list[int]] = {}
        for index, prompt in enumerate(prompts):
            groups.setdefault(self._batch_key(prompt), []).append(index)
        return list(groups.values())

    def _batch_key(self, prompt: Prompt) -> Any:
        """Prompts with equal keys give equal visual-token counts and may share a batch."""
        return None

    def run(self, prompts: Sequence[Prompt], *, compressor: TokenCompressor | None = None,
            budget: Budget | None = None, max_new_tokens: int = 8, seed: int = 0) -> Run:
        """Generate for one batch (equal visual-token counts) and keep the internals tests check."""
        if any(p.image is None and p.video is None for p in prompts):
            raise AdapterError("every prompt needs an image or a video; text-only prompts are not supported")
        if not self.accepts_video and any(p.video is not None for p in prompts):
            raise AdapterError(f"the {self.name} adapter takes images only, not video; use a video model "
                               "(e.g. video_llava)")
        keys = [p.draw_key() for p in prompts] if compressor is not None and compressor.stochastic else None
        encoded = self._encode(prompts)
        encoded.texts = [p.text for p in prompts]
        return self.run_encoded(encoded, compressor=compressor, budget=budget,
                                max_new_tokens=max_new_tokens, seed=seed, keys=keys)

    def run_encoded(self, encoded: Encoded, *, compressor: TokenCompressor | None = None,
                    budget: Budget | None = None, max_new_tokens: int = 8, seed: int = 0,
                    keys: Sequence[str] | None = None) -> Run:
        """:meth:`run` on an already encoded batch (tests extend prompts with generated ids).
        ``keys``: one per row, seeding that row's generator with ``seed`` (else one shared generator)."""
        plan = self._plan(encoded, compressor, budget, seed, keys)
        traces = [TokenTrace(n_visual=encoded.n_visual, plan=[(str(s.stage), s.layer, k) for s, k in plan.sites],
                             prompt_tokens=int(n)) for n in encoded.attention_mask.sum(dim=1).tolist()]
        policy = self.fixed_position_policy or (compressor.positions if compressor else "original")
        timer = PhaseTimer(self.device)
        decoder = self._decoder()
        with torch.inference_mode():
            sequence = self._placeholder_sequence(encoded, decoder)
            with timer.phase("vision"):
                block = self._visual_tokens(encoded, plan, sequence, traces).to(sequence.hidden.device)
            with timer.phase("prefill"):
                sequence = splice(sequence, self._span(encoded, block), policy)
                prefill = StagedPrefill(decoder, compressor, plan.at(Stage.LLM), encoded.grid, plan.generator,
                                        traces, policy, encoded.crops, encoded.frames,
                                        generators=plan.generators).run(sequence)
            with timer.phase("decode"):
                stage = DecodeStage.from_plan(compressor, plan.sites, len(decoder.layers), prefill.visual_index,
                                              prefill.visual_origin, encoded.grid, encoded.frames, traces)
                tokens, logits = greedy_decode(decoder, prefill, max_new_tokens, self._eos_ids(), stage)
        return Run(self._generations(tokens, traces, timer.ms), tokens, logits, prefill.layer_positions)

    def _plan(self, encoded: Encoded, compressor: TokenCompressor | None, budget: Budget | None,
              seed: int, keys: Sequence[str] | None = None) -> Plan:
        if compressor is None or budget is None:
            return Plan(None)
        n = encoded.n_visual
        info = self._info_of(encoded)
        sites = list(compressor.schedule(n, budget.target(n), info))
        unsupported = sorted({str(site.stage) for site, _ in sites} - {str(s) for s in self.stages})
        if unsupported:
            raise AdapterError(f"method '{compressor.name}' scheduled stage(s) {', '.join(unsupported)}, which "
                               f"the {self.name} adapter does not offer; it offers "
                               f"{', '.join(sorted(str(s) for s in self.stages))}")
        reason = self.unserved_signal_reason(compressor, sites)
        if reason:
            raise Infeasible(reason)
        if keys is None:
            return Plan(compressor, sites, torch.Generator().manual_seed(seed))
        generators = [torch.Generator().manual_seed(sample_seed(seed, key)) for key in keys]
        return Plan(compressor, sites, generators[0] if len(generators) == 1 else None, generators)

    def info_for(self, prompt: Prompt) -> Any:
        """The :class:`ModelInfo` of one prompt's image or video, as its plan will see it."""
        return self._info_of(self._encode([prompt]))

    def _info_of(self, encoded: Encoded) -> Any:
        """The :class:`ModelInfo` of an encoded batch's image(s)."""
        return self.info(encoded.n_visual, grid=encoded.grid)

    def _span(self, encoded: Encoded, block: VisualBlock) -> Applied:
        """The LLM-space visual span that replaces the placeholders, from the surviving visual tokens
        (families with layout tokens, like LLaVA-NeXT's newlines, add them here)."""
        return Applied(block, block.origin, 0)

    def _placeholder_sequence(self, encoded: Encoded, decoder: Decoder) -> TokenSequence:
        """The prompt as LLM input embeddings; the visual span still holds placeholder embeddings."""
        ids, mask = encoded.input_ids, encoded.attention_mask.bool()
        is_image = ids == encoded.image_token_id
        counts = is_image.sum(dim=1)
        if not bool((counts == encoded.n_span).all()):
            raise AdapterError(f"each prompt must hold exactly one image of {encoded.n_span} tokens, "
                               f"got {counts.tolist()} image tokens per prompt")
        start = is_image.int().argmax(dim=1)
        positions = encoded.positions if encoded.positions is not None else contiguous_positions(mask)
        hidden = decoder.embed(ids)
        block = VisualBlock.fresh(hidden.gather(1, (start[:, None] + torch.arange(
            encoded.n_span, device=ids.device)).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])))
        return TokenSequence(hidden, positions, mask, start, block, text_embeds=hidden)

    def _generations(self, tokens: torch.Tensor, traces: list[TokenTrace],
                     timings: dict[str, float]) -> list[Generation]:
        eos = self._eos_ids()
        out = []
        for row, trace in zip(tokens.tolist(), traces):
            length = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            trace.generated_tokens = length
            del trace.decode_visual[max(length - 1, 0):]  # decode steps after this row's EOS are not its own
            text = self.processor.tokenizer.decode(row[:length], skip_special_tokens=True).strip()
            out.append(Generation(text, trace, dict(timings)))
        return out

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.processor.tokenizer.eos_token_id
        if eos is None:
            return set()
        return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}

    @abstractmethod
    def info(self, n_visual: int | None = None, grid: tuple[int, int] | None = None) -> Any:
        ...

    @abstractmethod
    def _encode(self, prompts: Sequence[Prompt]) -> Encoded:
        """Apply the chat template, tokenise with left padding, preprocess the images."""

    @abstractmethod
    def _visual_tokens(self, encoded: Encoded, plan: Plan, sequence: TokenSequence,
                       traces: list[TokenTrace]) -> VisualBlock:
        """Run the vision encoder and the pre-LLM sites; return LLM-space visual tokens."""

    def _decoder(self) -> Decoder:
        """The stock language-model modules (both families keep them at ``model.language_model``)."""
        lm = self.model.model.language_model
        return Decoder(lm.embed_tokens, lm.layers, lm.norm, self.model.lm_head, lm.rotary_emb,
                       rotary_of(lm.layers[0]), self.model.config.text_config._attn_implementation)
