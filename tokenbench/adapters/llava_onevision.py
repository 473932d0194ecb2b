"""LLaVA-OneVision, images (``LlavaOnevisionForConditionalGeneration``: SigLIP, MLP projector, Qwen2).

An image is tiled like LLaVA-NeXT's (base crop plus sub-crops from ``image_grid_pinpoints``, the
sub-crop grid unpadded, one ``image_newline`` per row), but the projector runs before the packing
and ``anyres_max_9`` bilinearly pools the sub-crop grid down to about nine crops' worth of tokens
when it is larger (:mod:`tokenbench.adapters.anyres`). SigLIP has no CLS token.

Stages: ``projector`` (the packed LLM-space visual tokens, newlines excluded) and ``llm``. A
``vision_out`` stage is not offered: after pooling an LLM token mixes several encoder patches, so
encoder-side pruning has no one-to-one place to go. Crops seen by compressors: the base image
(crop 0) and the pooled sub-crop grid (crop 1), as their rows and columns in the packed layout.

Processor: ``LlavaOnevisionProcessor`` needs a video processor (torchvision); where it cannot be
built, the tokenizer and image processor are used directly and the ``<image>`` placeholder is
expanded to the token count of the model's own packing, which is what the processor computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from tokenbench.adapters.anyres import AnyresImages, AnyresLayout, anyres_layout
from tokenbench.adapters.base import AdapterError, Prompt, TokenTrace
from tokenbench.adapters.llava import llava_architecture
from tokenbench.adapters.loading import load_checkpoint
from tokenbench.adapters.prefill import LLM_SITE_SIGNALS, TokenSequence
from tokenbench.adapters.qwen2_vl import load_processor
from tokenbench.adapters.sites import VisualBlock, run_site
from tokenbench.adapters.staged import Encoded, Plan, StagedAdapter
from tokenbench.compressor import DECODE_SIGNALS, ModelInfo, Site, Stage


class LlavaOnevisionAdapter(AnyresImages, StagedAdapter):
    name = "llava_onevision"
    model_types = ("llava_onevision",)
    stages = frozenset({Stage.PROJECTOR, Stage.LLM, Stage.DECODE})
    served_signals: ClassVar[dict[Stage, frozenset[str]]] = {Stage.PROJECTOR: frozenset({"text"}), Stage.LLM: LLM_SITE_SIGNALS,
                                                             Stage.DECODE: DECODE_SIGNALS}
    description = "LLaVA-OneVision (images): SigLIP anyres crops pooled to anyres_max_9, newline per row, Qwen2"

    def __init__(self, model: torch.nn.Module, processor: Any) -> None:
        super().__init__(model, processor)
        config = model.config
        if not isinstance(config.vision_feature_layer, int):
            raise AdapterError("LLaVA-OneVision checkpoints with several vision feature layers are not supported")
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        self.patch_grid = (side, side)
        self.vision_blocks = vision.num_hidden_layers  # the stock tower runs every block
        self.image_token = getattr(processor.tokenizer, "image_token", None) or "<image>"
        processor.tokenizer.padding_side = "left"

    @classmethod
    def load(cls, path: str | Path, *, dtype: torch.dtype = torch.float32, attn: str = "sdpa",
             device: str | torch.device = "cpu") -> LlavaOnevisionAdapter:
        model = load_checkpoint(path, cls.model_types, dtype, attn, device)
        return cls(model, load_processor(path))

    def info(self, n_visual: int | None = None, grid: tuple[int, int] | None = None,
             crops: tuple[tuple[int, int], ...] = ()) -> ModelInfo:
        grid = grid or self.patch_grid
        arch = llava_architecture(self.model.config, self.vision_blocks, grid[0] * grid[1])  # SigLIP: no CLS
        return ModelInfo(self.name, self.stages, grid, n_visual or grid[0] * grid[1], arch, self.served_signals,
                         crops=crops)

    def _layout(self, image_size: tuple[int, int]) -> AnyresLayout:
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        config = self.model.config
        crops = image_size_to_num_patches(image_size, config.image_grid_pinpoints, config.vision_config.image_size)

        def pack(features: torch.Tensor, size: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
            packed, _ = self.model.model.pack_image_features([features], size[None], image_newline=newline,
                                                             vision_aspect_ratio=config.vision_aspect_ratio)
            return packed[0]

        return anyres_layout(pack, crops, self.patch_grid[0], torch.tensor(image_size))

    def _encode(self, prompts: Sequence[Prompt]) -> Encoded:
        processor = self.processor
        images = processor.image_processor(images=[p.image for p in prompts], return_tensors="pt")
        layout = self._batch_layout(images["image_sizes"])
        texts = []
        for prompt in prompts:
            text = processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt.text}]}],
                add_generation_prompt=True, tokenize=False)
            texts.append(text.replace(self.image_token, self.image_token * layout.n_span, 1))
        batch = processor.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        return self._encoded(batch, images, layout)

    def _visual_tokens(self, encoded: Encoded, plan: Plan, sequence: TokenSequence,
                       traces: list[TokenTrace]) -> VisualBlock:
        config = self.model.config
        inputs = encoded.image_inputs
        layout = self._layout_of(encoded)
        features = self.model.model.get_image_features(
            inputs["pixel_values"], inputs["image_sizes"], vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            vision_aspect_ratio=config.vision_aspect_ratio).pooler_output
        packed = torch.stack(list(features)).to(self.dtype)
        crops = inputs["pixel_values"].shape[1]
        patches = self.patch_grid[0] * self.patch_grid[1]
        eager = config.vision_config._attn_implementation == "eager"
        for trace in traces:
            trace.vision.extend([patches] * (crops * self.vision_blocks))  # attention runs per crop
            trace.eager_attention_calls += self.vision_blocks * int(eager)
            trace.projector_tokens = crops * patches  # the stock projector runs before unpadding
        block = VisualBlock.fresh(packed[:, layout.visual_span.to(packed.device)])
        keep = plan.at(Stage.PROJECTOR)
        if keep:
            compressor = plan.compressor
            signals = {"text": sequence.text_after_image()} if "text" in compressor.needs else {}
            block = run_site(compressor, Site(Stage.PROJECTOR), keep[0], block, encoded.grid, plan.generator,
                             encoded.crops, generators=plan.generators, **signals).block
        return block
