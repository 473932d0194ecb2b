"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``: anyres CLIP crops, MLP projector, Llama/Mistral).

An image becomes a base crop plus sub-crops tiled from ``image_grid_pinpoints``; the model unpads
the combined sub-crop grid to the image's aspect ratio and ends each of its rows with an
``image_newline`` token (:mod:`tokenbench.adapters.anyres`). Newline tokens are layout, not visual
tokens: compressors never see them, budgets do not count them, and they are put back after the
surviving tokens of their row at every site. Each visual token's crop and place in it reach
compressors as ``SiteInput.crop_origin`` (spec wave 2 §20 E9).

Stages: ``vision_out`` (the selected CLIP layer of every crop, CLS dropped, already unpadded: only
the tokens that reach the LLM, in the LLM's order), ``projector`` and ``llm``. The ``vision`` stage
is not offered: pruning inside the encoder would leave crops with token sets the stock unpadding and
packing cannot place. Signals at ``vision_out``: ``keys`` and ``cls_attention`` (each crop's own CLS
row, so it sums to one within a crop), ``text``.

Images of different sizes can have different crop counts and layouts, so ``generate`` batches
images of one size together (``_batch_key``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from tokenbench.adapters.anyres import AnyresImages, AnyresLayout, anyres_layout
from tokenbench.adapters.base import Prompt, TokenTrace
from tokenbench.adapters.llava import LlavaAdapter, _clip_keys
from tokenbench.adapters.prefill import LLM_SITE_SIGNALS, TokenSequence
from tokenbench.adapters.sites import VisualBlock, run_site
from tokenbench.adapters.staged import Encoded, Plan
from tokenbench.compressor import DECODE_SIGNALS, ModelInfo, Site, Stage


class LlavaNextAdapter(AnyresImages, LlavaAdapter):
    name = "llava_next"
    model_types = ("llava_next",)
    stages = frozenset({Stage.VISION_OUT, Stage.PROJECTOR, Stage.LLM, Stage.DECODE})
    served_signals: ClassVar[dict[Stage, frozenset[str]]] = {
        Stage.VISION_OUT: frozenset({"cls_attention", "keys", "text"}),
        Stage.PROJECTOR: frozenset({"text"}),
        Stage.LLM: LLM_SITE_SIGNALS,
        Stage.DECODE: DECODE_SIGNALS,
    }
    description = "LLaVA-NeXT: anyres CLIP crops (base + up to 4 sub-crops, unpadded, newline per row)"

    def info(self, n_visual: int | None = None, grid: tuple[int, int] | None = None,
             crops: tuple[tuple[int, int], ...] = ()) -> ModelInfo:
        base = super().info(n_visual, grid)
        return ModelInfo(self.name, self.stages, base.grid, base.n_visual, base.arch, self.served_signals,
                         crops=crops)

    def _layout(self, image_size: tuple[int, int]) -> AnyresLayout:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        config = self.model.config
        crops = image_size_to_num_patches(image_size, config.image_grid_pinpoints, config.vision_config.image_size)

        def pack(features: torch.Tensor, size: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
            packed, _ = self.model.model.pack_image_features([features], size[None], "default", newline)
            return packed[0]

        return anyres_layout(pack, crops, self.patch_grid[0], torch.tensor(image_size))

    def _encode(self, prompts: Sequence[Prompt]) -> Encoded:
        processor = self.processor
        texts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p.text}]}],
            add_generation_prompt=True, tokenize=False) for p in prompts]
        batch = processor(images=[p.image for p in prompts], text=texts, padding=True, return_tensors="pt")
        return self._encoded(batch, batch, self._batch_layout(batch["image_sizes"]))

    def _visual_tokens(self, encoded: Encoded, plan: Plan, sequence: TokenSequence,
                       traces: list[TokenTrace]) -> VisualBlock:
        tower = self.model.model.vision_tower
        compressor = plan.compressor
        needs = compressor.needs if compressor else frozenset()
        layout = self._layout_of(encoded)
        pixels = encoded.image_inputs["pixel_values"]
        b, crops = pixels.shape[:2]  # one image size per batch, so no crop padding
        pixels = pixels.flatten(0, 1)
        hidden = tower.pre_layrnorm(tower.embeddings(pixels))
        eager = tower.config._attn_implementation == "eager"
        block_input = hidden
        for block in tower.encoder.layers[:self.vision_blocks]:
            for trace in traces:
                trace.vision.extend([hidden.shape[1]] * crops)  # attention runs per crop
                trace.eager_attention_calls += int(eager)
            block_input = hidden
            hidden = block(hidden, None)
        source = layout.visual_source.to(hidden.device)

        def per_token(x: torch.Tensor) -> torch.Tensor:
            """Per-crop patch rows [B·C, P, ·] -> the image's visual tokens [B, Nv, ·]."""
            return x.reshape(b, -1, *x.shape[2:])[:, source]

        patches = VisualBlock.fresh(per_token(hidden[:, 1:]))
        keep = plan.at(Stage.VISION_OUT)
        if keep:
            signals = {}
            if "cls_attention" in needs:
                signals["cls_attention"] = per_token(self._cls_attention(block_input, None)[..., None])[..., 0]
                for trace in traces:
                    trace.probe_rows += crops
            if "keys" in needs:
                last = tower.encoder.layers[self.vision_blocks - 1]
                signals["keys"] = per_token(_clip_keys(last, block_input)[:, 1:])
            if "text" in needs:
                signals["text"] = sequence.text_after_image()
            patches = run_site(compressor, Site(Stage.VISION_OUT), keep[0], patches, encoded.grid,
                               plan.generator, encoded.crops, generators=plan.generators, **signals).block
        patches.tokens = self.model.model.multi_modal_projector(patches.tokens)
        keep = plan.at(Stage.PROJECTOR)
        if keep:
            signals = {"text": sequence.text_after_image()} if "text" in needs else {}
            patches = run_site(compressor, Site(Stage.PROJECTOR), keep[0], patches, encoded.grid,
                               plan.generator, encoded.crops, generators=plan.generators, **signals).block
        return patches
