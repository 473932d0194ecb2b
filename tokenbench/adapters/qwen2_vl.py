"""Qwen2-VL and Qwen2.5-VL (dynamic resolution, 2×2 PatchMerger, M-RoPE decoder).

Stages: ``projector`` (the merged visual tokens the PatchMerger emits, in LLM space) and ``llm``.
The vision tower runs as the stock ``get_image_features``; a ``vision`` stage is not offered
because its windowed attention over packed ``cu_seqlens`` makes mid-encoder pruning a rewrite of
the encoder rather than a loop over its blocks.

Positions: the 3-D M-RoPE ids and ``rope_deltas`` come from the model's own ``get_rope_index`` on
the full (uncompressed) prompt; every surviving token keeps its original 3-D id, whatever the
method's ``positions`` policy, and decoding continues at ``max id + 1`` exactly as the stock
``rope_deltas`` arithmetic does for the uncompressed prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokenbench.adapters.base import AdapterError, Prompt, TokenTrace
from tokenbench.adapters.loading import load_checkpoint
from tokenbench.adapters.prefill import TokenSequence
from tokenbench.adapters.sites import VisualBlock, run_site
from tokenbench.adapters.staged import Encoded, Plan, StagedAdapter
from tokenbench.compressor import Architecture, ModelInfo, Site, Stage


@dataclass
class ProcessorParts:
    """Tokenizer plus image processor, for environments where ``Qwen2VLProcessor`` cannot be built
    (it insists on a video processor, which needs torchvision)."""

    tokenizer: Any
    image_processor: Any

    def apply_chat_template(self, messages: list[dict], **kwargs: Any) -> str:
        return self.tokenizer.apply_chat_template(messages, **kwargs)


def load_processor(path: str | Path) -> Any:
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(path)
    except ImportError:
        return ProcessorParts(AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path))


class Qwen2VLAdapter(StagedAdapter):
    name = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    stages = frozenset({Stage.PROJECTOR, Stage.LLM})
    description = "Qwen2-VL / Qwen2.5-VL: dynamic-resolution ViT, 2×2 patch merger, M-RoPE decoder"
    fixed_position_policy = "original"

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

    def info(self, n_visual: int | None = None, grid: tuple[int, int] | None = None) -> ModelInfo:
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
        return ModelInfo(self.name, self.stages, grid, n_visual or grid[0] * grid[1], arch)

    def _batch_key(self, prompt: Prompt) -> Any:
        return prompt.image.size if prompt.image is not None else None

    def _encode(self, prompts: Sequence[Prompt]) -> Encoded:
        processor = self.processor
        images = processor.image_processor(images=[p.image for p in prompts], return_tensors="pt")
        grid_thw = images["image_grid_thw"]
        counts = (grid_thw.prod(dim=-1) // self.merge ** 2).tolist()
        if len(set(counts)) != 1:
            raise AdapterError("a batch must hold images of one size; generate() groups them for you")
        texts = []
        for prompt, count in zip(prompts, counts):
            text = processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt.text}]}],
                add_generation_prompt=True, tokenize=False)
            texts.append(text.replace(self.image_token, self.image_token * count, 1))
        batch = processor.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        device = self.device
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        image_id = self.model.config.image_token_id
        grid_thw = grid_thw.to(device)
        positions, _ = self.model.model.get_rope_index(
            ids, mm_token_type_ids=(ids == image_id).int(), image_grid_thw=grid_thw, attention_mask=mask)
        t, h, w = grid_thw[0].tolist()
        return Encoded(ids, mask, {"pixel_values": images["pixel_values"].to(device, self.dtype),
                                   "image_grid_thw": grid_thw}, image_id,
                       (t * h // self.merge, w // self.merge), positions=positions)

    def _visual_tokens(self, encoded: Encoded, plan: Plan, sequence: TokenSequence,
                       traces: list[TokenTrace]) -> VisualBlock:
        inputs = encoded.image_inputs
        features = self.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        merged = torch.stack(list(features.pooler_output)).to(self.dtype)
        tokens = merged.shape[1] * self.merge ** 2
        depth = self.model.config.vision_config.depth
        eager = self.model.config.vision_config._attn_implementation == "eager"
        for trace in traces:
            trace.vision.extend([tokens] * depth)
            trace.eager_attention_calls += depth * int(eager)
        block = VisualBlock.fresh(merged)
        keep = plan.at(Stage.PROJECTOR)
        if keep:
            compressor = plan.compressor
            signals = {"text": sequence.text_after_image()} if "text" in compressor.needs else {}
            block = run_site(compressor, Site(Stage.PROJECTOR), keep[0], block, encoded.grid, plan.generator,
                             generators=plan.generators, **signals).block
        return block
