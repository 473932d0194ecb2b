"""Qwen2-VL and Qwen2.5-VL (dynamic resolution, 2×2 PatchMerger, M-RoPE decoder).

Stages: ``projector`` (the merged visual tokens the PatchMerger emits, in LLM space) and ``llm``.
The vision tower runs as the stock ``get_image_features``; a ``vision`` stage is not offered
because its windowed attention over packed ``cu_seqlens`` makes mid-encoder pruning a rewrite of
the encoder rather than a loop over its blocks.

Positions: the 3-D M-RoPE ids and ``rope_deltas`` come from the model's own ``get_rope_index`` on
the full (uncompressed) prompt; every surviving token keeps its original 3-D id, whatever the
method's ``positions`` policy, and decoding continues at ``max id + 1`` exactly as the stock
``rope_deltas`` arithmetic does for the uncompressed prompt.

Video (``Prompt.video``, spec wave 2 §20 E8): the frames go through the stock ``get_video_features``
with ``video_grid_thw``; Qwen merges 2 frames per temporal step, so ``ModelInfo.frames`` is the
temporal grid t (an odd frame count repeats the last frame, as the video processor does), ``grid``
is one step's merged (h, w) and the visual tokens are frame-major. Kept tokens keep their 3-D
(t, h, w) M-RoPE ids. Where the checkpoint's processor has a video processor (it needs torchvision)
it preprocesses the frames; otherwise each frame goes through the image processor (its resize rule,
not the video processor's pixel limits) and pairs of frames are stacked into temporal patches in the
video processor's layout.
"""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from tokenbench.adapters.base import AdapterError, Prompt, TokenTrace
from tokenbench.adapters.loading import load_checkpoint
from tokenbench.adapters.prefill import LLM_SITE_SIGNALS, TokenSequence
from tokenbench.adapters.probe import head_mean_received
from tokenbench.adapters.sites import VisualBlock, run_site
from tokenbench.adapters.staged import Encoded, Plan, StagedAdapter
from tokenbench.compressor import (
    CLIP_SIGNALS,
    DECODE_SIGNALS,
    NEXT_BLOCK_SIGNALS,
    Architecture,
    ModelInfo,
    Site,
    Stage,
    TokenCompressor,
)


@dataclass
class ProcessorParts:
    """Tokenizer plus image processor, for environments where ``Qwen2VLProcessor`` cannot be built
    (it insists on a video processor, which needs torchvision). ``video_size``: the frame size limits
    of the checkpoint's own video processor, which resizes frames by other limits than images."""

    tokenizer: Any
    image_processor: Any
    video_size: dict[str, int] | None = None

    def apply_chat_template(self, messages: list[dict], **kwargs: Any) -> str:
        return self.tokenizer.apply_chat_template(messages, **kwargs)


def load_processor(path: str | Path) -> Any:
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(path)
    except ImportError:
        return ProcessorParts(AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path),
                              video_size_limits(path))


def video_size_limits(path: str | Path) -> dict[str, int] | None:
    """``{"shortest_edge": min pixels, "longest_edge": max pixels}`` from the checkpoint's
    ``video_preprocessor_config.json``, or None where it has none (the stock video processor then
    takes the image processor's limits, as the fallback does)."""
    from transformers.utils import cached_file

    found = cached_file(str(path), "video_preprocessor_config.json", _raise_exceptions_for_missing_entries=False,
                        _raise_exceptions_for_connection_errors=False)
    if not found:
        return None
    config = json.loads(Path(found).read_text())
    size = config.get("size") or {}
    low = size.get("shortest_edge", config.get("min_pixels"))
    high = size.get("longest_edge", config.get("max_pixels"))
    return {"shortest_edge": int(low), "longest_edge": int(high)} if low and high else None


class Qwen2VLAdapter(StagedAdapter):
    name = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    stages = frozenset({Stage.PROJECTOR, Stage.LLM, Stage.DECODE})
    description = "Qwen2-VL / Qwen2.5-VL: dynamic-resolution ViT, 2×2 patch merger, M-RoPE decoder"
    fixed_position_policy = "original"
    accepts_video = True
    video_frames = 32  # lmms-eval's qwen2_vl max_num_frames
    #: The signals each stage serves (``ModelInfo.signals``). The encoder has no CLS token, so no
    #: ``cls_attention`` / ``cls_token``; ``attention_received`` comes from the last ViT block.
    served_signals: ClassVar[dict[Stage, frozenset[str]]] = {
        Stage.PROJECTOR: frozenset({"attention_received", "text"}),
        Stage.LLM: LLM_SITE_SIGNALS,
        Stage.DECODE: DECODE_SIGNALS,
    }

    def __init__(self, model: torch.nn.Module, processor: Any) -> None:
        super().__init__(model, processor)
        processor.tokenizer.padding_side = "left"
        self.merge = model.config.vision_config.spatial_merge_size
        tokenizer = processor.tokenizer
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"

    @classmethod
    def load(cls, path: str | Path, *, dtype: torch.dtype = torch.float32, attn: str = "sdpa",
             device: str | torch.device = "cpu") -> Qwen2VLAdapter:
        model = load_checkpoint(path, cls.model_types, dtype, attn, device)
        return cls(model, load_processor(path))

    def info(self, n_visual: int | None = None, grid: tuple[int, int] | None = None,
             frames: int = 1) -> ModelInfo:
        config = self.model.config
        text, vision = config.text_config, config.vision_config
        if grid is None:
            side = max(round((n_visual or 256) ** 0.5), 1)
            grid = (side, (n_visual or side * side) // side)
        patches = grid[0] * grid[1] * self.merge ** 2
        # Qwen2-VL names the encoder width embed_dim, Qwen2.5-VL hidden_size. The merger maps
        # width·merge² → width·merge² → the LLM width (its output, counted via llm_hidden).
        width = getattr(vision, "embed_dim", None) or vision.hidden_size
        merged = width * self.merge ** 2
        mlp = getattr(vision, "intermediate_size", None) or int(width * vision.mlp_ratio)
        arch = Architecture(
            llm_layers=text.num_hidden_layers, llm_hidden=text.hidden_size,
            llm_intermediate=text.intermediate_size, llm_heads=text.num_attention_heads,
            llm_kv_heads=text.num_key_value_heads, vocab_size=text.vocab_size,
            vision_layers=vision.depth, vision_hidden=width, vision_intermediate=mlp,
            vision_tokens=patches, projector_in=merged, projector_hidden=merged,
            gated_mlp=True, patch_in=vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2,
            patches_per_token=self.merge ** 2)
        return ModelInfo(self.name, self.stages, grid, n_visual or grid[0] * grid[1], arch, self.served_signals,
                         frames=frames)

    def _info_of(self, encoded: Encoded) -> ModelInfo:
        return self.info(encoded.n_visual, grid=encoded.grid, frames=encoded.frames)

    def unserved_signal_reason(self, compressor: TokenCompressor,
                               plan: Sequence[tuple[Site, int]]) -> str | None:
        """The Qwen vision encoder has no CLS token (no next-block CLS row) and no CLIP text tower
        (its joint space is not CLIP's: CDPruner's authors have not published a Qwen recipe)."""
        unserved = compressor.needs & (NEXT_BLOCK_SIGNALS | CLIP_SIGNALS)
        if plan and unserved:
            return (f"method '{compressor.name}' needs {', '.join(sorted(unserved))}, which the {self.name} "
                    "adapter cannot serve: its vision encoder has no CLS token and no CLIP text tower")
        return super().unserved_signal_reason(compressor, plan)

    def _batch_key(self, prompt: Prompt) -> Any:
        if prompt.video is not None:
            return ("video", len(prompt.video), prompt.video[0].size)
        return prompt.image.size if prompt.image is not None else None

    def _encode(self, prompts: Sequence[Prompt]) -> Encoded:
        if any(p.video is not None for p in prompts):
            return self._encode_videos(prompts)
        processor = self.processor
        images = processor.image_processor(images=[p.image for p in prompts], return_tensors="pt")
        grid_thw = images["image_grid_thw"]
        counts = (grid_thw.prod(dim=-1) // self.merge ** 2).tolist()
        if len(set(counts)) != 1:
            raise AdapterError("a batch must hold images of one size; generate() groups them for you")
        image_id = self.model.config.image_token_id
        grid_thw = grid_thw.to(self.device)
        ids, mask, positions = self._tokenize(prompts, "image", self.image_token, counts[0], image_id, grid_thw)
        t, h, w = grid_thw[0].tolist()
        return Encoded(ids, mask, {"pixel_values": images["pixel_values"].to(self.device, self.dtype),
                                   "image_grid_thw": grid_thw}, image_id,
                       (t * h // self.merge, w // self.merge), positions=positions)

    def _encode_videos(self, prompts: Sequence[Prompt]) -> Encoded:
        if any(p.video is None or len(p.video) != len(prompts[0].video) for p in prompts):
            raise AdapterError("a batch must hold videos of one frame count (no images); generate() groups them")
        processor = self.processor
        pixels, grid_thw = zip(*(self._video_pixels(p.video) for p in prompts))
        grid_thw = torch.cat(grid_thw)
        if len({tuple(g) for g in grid_thw.tolist()}) != 1:
            raise AdapterError("a batch must hold videos of one frame size; generate() groups them for you")
        count = int(grid_thw[0].prod()) // self.merge ** 2
        video_token = getattr(processor.tokenizer, "video_token", None) or "<|video_pad|>"
        video_id = self.model.config.video_token_id
        grid_thw = grid_thw.to(self.device)
        ids, mask, positions = self._tokenize(prompts, "video", video_token, count, video_id, grid_thw)
        t, h, w = grid_thw[0].tolist()
        return Encoded(ids, mask, {"pixel_values_videos": torch.cat(pixels).to(self.device, self.dtype),
                                   "video_grid_thw": grid_thw}, video_id,
                       (h // self.merge, w // self.merge), positions=positions, frames=t)

    def _tokenize(self, prompts: Sequence[Prompt], kind: str, token: str, count: int, token_id: int,
                  grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The prompts in the chat template with one ``kind`` ("image" or "video") placeholder
        expanded to ``count`` ``token``s, left-padded: input ids, attention mask and the model's own
        M-RoPE position ids for the ``grid_thw`` of that image or video."""
        processor = self.processor
        texts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": p.text}]}],
            add_generation_prompt=True, tokenize=False).replace(token, token * count, 1) for p in prompts]
        batch = processor.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        token_type = (1 if kind == "image" else 2) * (ids == token_id).int()  # get_rope_index's modality ids
        positions, _ = self.model.model.get_rope_index(
            ids, mm_token_type_ids=token_type, attention_mask=mask, **{f"{kind}_grid_thw": grid_thw})
        return ids, mask, positions

    def _video_pixels(self, frames: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """One video's ``pixel_values_videos`` [t·h·w, C·2·p·p] and ``video_grid_thw`` [1, 3]."""
        video_processor = getattr(self.processor, "video_processor", None)
        if video_processor is not None:
            out = video_processor(videos=[list(frames)], return_tensors="pt")
            return out["pixel_values_videos"], out["video_grid_thw"]
        limits = getattr(self.processor, "video_size", None)  # the video processor's, where they differ
        images = self.processor.image_processor(images=list(frames), return_tensors="pt",
                                                **({"size": limits} if limits else {}))
        grid = images["image_grid_thw"]
        if len({tuple(g) for g in grid.tolist()}) != 1:
            raise AdapterError("every frame of a video needs the same size")
        config = self.model.config.vision_config
        step, patch = config.temporal_patch_size, config.patch_size
        n = int(grid[0, 1] * grid[0, 2])
        # the image processor repeats each frame over the temporal patch; keep one copy per frame
        single = images["pixel_values"].view(len(frames), n, -1, step, patch, patch)[:, :, :, 0]
        if pad := -len(frames) % step:
            single = torch.cat([single, single[-1:].expand(pad, *single.shape[1:])])
        t = single.shape[0] // step
        # temporal patch k holds frames step·k ... step·k+step−1 along its T axis: (C, T, ph, pw)
        paired = single.view(t, step, n, -1, patch, patch).permute(0, 2, 3, 1, 4, 5)
        return paired.reshape(t * n, -1), torch.tensor([[t, int(grid[0, 1]), int(grid[0, 2])]])

    def _visual_tokens(self, encoded: Encoded, plan: Plan, sequence: TokenSequence,
                       traces: list[TokenTrace]) -> VisualBlock:
        inputs = encoded.image_inputs
        compressor = plan.compressor
        keep = plan.at(Stage.PROJECTOR)
        needs = compressor.needs if compressor is not None and keep else frozenset()
        visual = self.model.model.visual
        captured: dict[str, Any] = {}
        hook = None
        if "attention_received" in needs:  # the last block's inputs, to recompute its attention
            hook = visual.blocks[-1].register_forward_pre_hook(
                lambda module, args, kwargs: captured.update(args=args, kwargs=kwargs), with_kwargs=True)
        video = "pixel_values_videos" in inputs
        grid_thw = inputs["video_grid_thw" if video else "image_grid_thw"]
        try:
            if video:
                features = self.model.model.get_video_features(inputs["pixel_values_videos"], grid_thw)
            else:
                features = self.model.model.get_image_features(inputs["pixel_values"], grid_thw)
        finally:
            if hook is not None:
                hook.remove()
        merged = torch.stack(list(features.pooler_output)).to(self.dtype)
        tokens = merged.shape[1] * self.merge ** 2 // encoded.frames  # per temporal step: attention stays in it
        depth = self.model.config.vision_config.depth
        eager = self.model.config.vision_config._attn_implementation == "eager"
        for trace in traces:
            trace.vision_frames = encoded.frames
            trace.vision.extend([tokens] * depth)
            trace.eager_attention_calls += depth * int(eager)
        block = VisualBlock.fresh(merged)
        if keep:
            signals = {"text": sequence.text_after_image()} if "text" in needs else {}
            if "attention_received" in needs:
                signals["attention_received"] = self._received_attention(captured, grid_thw, merged.shape[:2])
                for trace in traces:
                    trace.probe_rows += tokens * encoded.frames
            block = run_site(compressor, Site(Stage.PROJECTOR), keep[0], block, encoded.grid, plan.generator,
                             frames=encoded.frames, generators=plan.generators, **signals).block
        return block

    def _received_attention(self, captured: dict[str, Any], grid_thw: torch.Tensor,
                            shape: tuple[int, int]) -> torch.Tensor:
        """Attention each merged token receives in the last ViT block: the block's softmax attention
        (within its ``cu_seqlens`` segments: whole images, or windows in a windowed block), summed
        over queries and divided by the image's patch count, averaged over heads and summed over the
        merge² patches of each merged token (so a full-attention block's signal sums to 1 per image);
        streamed over query chunks. ``shape`` = (B, N)."""
        visual = self.model.model.visual
        block = visual.blocks[-1]
        attn = block.attn
        kwargs = captured["kwargs"]
        hidden = captured["args"][0] if captured["args"] else kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        normed = block.norm1(hidden)
        length = normed.shape[0]
        queries, keys, _ = attn.qkv(normed).reshape(length, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
        queries, keys = rotary(queries, keys, cos, sin)
        bounds = kwargs["cu_seqlens"].tolist()
        received = torch.zeros(length, dtype=torch.float32, device=normed.device)
        for start, end in itertools.pairwise(bounds):  # one segment per image (or window)
            q = queries[start:end].transpose(0, 1)[None]
            k = keys[start:end].transpose(0, 1)[None]
            received[start:end] = head_mean_received(q, k, attn.scaling)[0] * (end - start)
        unit = self.merge ** 2
        pooled = received.view(-1, unit).sum(dim=1)
        if hasattr(visual, "fullatt_block_indexes"):  # Qwen2.5-VL: blocks run in window order
            from transformers.vision_utils import get_vision_window_index

            window_index, _ = get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                                      window_size=visual.window_size,
                                                      patch_size=visual.patch_size)
            pooled = pooled[torch.argsort(window_index.to(pooled.device))]
        batch, n = shape
        return pooled.view(batch, n) / (n * unit)
