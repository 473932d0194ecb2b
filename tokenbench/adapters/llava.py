"""LLaVA-1.5 (``LlavaForConditionalGeneration``: CLIP vision tower, MLP projector, Llama decoder).

Stages: ``vision`` (between CLIP encoder blocks, with ToMe's proportional attention as a
log-size bias on the keys), ``vision_out`` (the selected CLIP layer, CLS dropped, before the
projector; the projector then runs on the kept tokens only), ``projector`` and ``llm``.
The CLIP encoder runs as an explicit loop over its stock blocks up to the selected feature layer;
the blocks after it cannot influence LLaVA's output and are skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from tokenbench.adapters.base import AdapterError, Prompt, TokenTrace
from tokenbench.adapters.loading import load_checkpoint
from tokenbench.adapters.prefill import TokenSequence
from tokenbench.adapters.probe import head_mean_keys, head_mean_probs
from tokenbench.adapters.sites import VisualBlock, run_site
from tokenbench.adapters.staged import Encoded, Plan, StagedAdapter
from tokenbench.compressor import Architecture, ModelInfo, Site, Stage


class LlavaAdapter(StagedAdapter):
    name = "llava"
    model_types = ("llava",)
    stages = frozenset({Stage.VISION, Stage.VISION_OUT, Stage.PROJECTOR, Stage.LLM})
    description = "LLaVA-1.5: CLIP ViT-L/336 (24×24 patches), MLP projector, Llama decoder"

    def __init__(self, model: torch.nn.Module, processor: object) -> None:
        super().__init__(model, processor)
        config = model.config
        if not isinstance(config.vision_feature_layer, int):
            raise AdapterError("LLaVA checkpoints with several vision feature layers are not supported")
        if config.vision_feature_select_strategy != "default":
            raise AdapterError("only vision_feature_select_strategy='default' (CLS dropped, LLaVA-1.5) is "
                               "supported")
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        self.patch_grid = (side, side)
        total = vision.num_hidden_layers
        self.vision_blocks = config.vision_feature_layer % (total + 1)  # blocks up to the selected layer
        processor.tokenizer.padding_side = "left"

    @classmethod
    def load(cls, path: str | Path, *, dtype: torch.dtype = torch.float32, attn: str = "sdpa",
             device: str | torch.device = "cpu") -> LlavaAdapter:
        from transformers import AutoProcessor

        model = load_checkpoint(path, cls.model_types, dtype, attn, device)
        return cls(model, AutoProcessor.from_pretrained(path))

    def info(self, n_visual: int | None = None, grid: tuple[int, int] | None = None) -> ModelInfo:
        config = self.model.config
        text, vision = config.text_config, config.vision_config
        grid = grid or self.patch_grid
        arch = Architecture(
            llm_layers=text.num_hidden_layers, llm_hidden=text.hidden_size,
            llm_intermediate=text.intermediate_size, llm_heads=text.num_attention_heads,
            llm_kv_heads=text.num_key_value_heads, vocab_size=text.vocab_size,
            vision_layers=self.vision_blocks, vision_hidden=vision.hidden_size,
            vision_intermediate=vision.intermediate_size, vision_tokens=grid[0] * grid[1] + 1,
            projector_in=vision.hidden_size, projector_hidden=text.hidden_size, gated_mlp=True,
            patch_in=vision.num_channels * vision.patch_size ** 2)
        return ModelInfo(self.name, self.stages, grid, n_visual or grid[0] * grid[1], arch)

    def _encode(self, prompts: Sequence[Prompt]) -> Encoded:
        processor = self.processor
        texts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p.text}]}],
            add_generation_prompt=True, tokenize=False) for p in prompts]
        batch = processor(images=[p.image for p in prompts], text=texts, padding=True, return_tensors="pt")
        device = self.device
        return Encoded(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                       {"pixel_values": batch["pixel_values"].to(device, self.dtype)},
                       self.model.config.image_token_id, self.patch_grid)

    def _visual_tokens(self, encoded: Encoded, plan: Plan, sequence: TokenSequence,
                       traces: list[TokenTrace]) -> VisualBlock:
        tower = self.model.model.vision_tower
        compressor = plan.compressor
        needs = compressor.needs if compressor else frozenset()
        hidden = tower.pre_layrnorm(tower.embeddings(encoded.image_inputs["pixel_values"]))
        patches = VisualBlock.fresh(hidden[:, 1:])
        vision_sites = plan.at(Stage.VISION)
        bad = [layer for layer in vision_sites if not 0 <= layer < self.vision_blocks]
        if bad:
            raise AdapterError(f"vision site at block {bad[0]} is outside 0..{self.vision_blocks - 1}")
        eager = tower.config._attn_implementation == "eager"
        bias = None
        block_input = hidden
        for index, block in enumerate(tower.encoder.layers[:self.vision_blocks]):
            if index in vision_sites:
                keys_of = tower.encoder.layers[max(index - 1, 0)]
                signals = {"keys": _clip_keys(keys_of, block_input)[:, 1:]} if "keys" in needs else {}
                patches.tokens = hidden[:, 1:]
                applied = run_site(compressor, Site(Stage.VISION, index), vision_sites[index], patches,
                                   self.patch_grid, plan.generator, generators=plan.generators, **signals)
                patches = applied.block
                hidden = torch.cat([hidden[:, :1], patches.tokens], dim=1)
                if compressor.proportional_attention:
                    bias = _size_bias(patches.sizes, hidden.dtype)
            for trace in traces:
                trace.vision.append(hidden.shape[1])
                trace.eager_attention_calls += int(eager)
            block_input = hidden
            hidden = block(hidden, bias)
        patches.tokens = hidden[:, 1:]
        keep = plan.at(Stage.VISION_OUT)
        if keep:
            signals = {}
            if "cls_attention" in needs:
                signals["cls_attention"] = self._cls_attention(block_input, bias)
                for trace in traces:
                    trace.probe_rows += 1
            if "keys" in needs:
                signals["keys"] = _clip_keys(tower.encoder.layers[self.vision_blocks - 1], block_input)[:, 1:]
            if "text" in needs:
                signals["text"] = sequence.text_after_image()
            patches = run_site(compressor, Site(Stage.VISION_OUT), keep[0], patches, self.patch_grid,
                               plan.generator, generators=plan.generators, **signals).block
        patches.tokens = self.model.model.multi_modal_projector(patches.tokens)
        keep = plan.at(Stage.PROJECTOR)
        if keep:
            signals = {"text": sequence.text_after_image()} if "text" in needs else {}
            patches = run_site(compressor, Site(Stage.PROJECTOR), keep[0], patches, self.patch_grid,
                               plan.generator, generators=plan.generators, **signals).block
        return patches

    def _cls_attention(self, block_input: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Head-mean attention of the CLS query in the block that produced the selected layer."""
        block = self.model.model.vision_tower.encoder.layers[self.vision_blocks - 1]
        attn = block.self_attn
        normed = block.layer_norm1(block_input)
        b, t, _ = normed.shape
        queries = attn.q_proj(normed[:, :1]).view(b, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
        keys = attn.k_proj(normed).view(b, t, attn.num_heads, attn.head_dim).transpose(1, 2)
        probs = head_mean_probs(queries, keys, attn.scale, bias=None if bias is None else bias[:, 0])
        return probs[:, 0, 1:]


def _clip_keys(block: torch.nn.Module, block_input: torch.Tensor) -> torch.Tensor:
    attn = block.self_attn
    return head_mean_keys(attn.k_proj, block.layer_norm1(block_input), attn.head_dim)


def _size_bias(sizes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ToMe's proportional attention: ``log(size)`` added to every query's logit for each key."""
    with_cls = torch.cat([torch.ones_like(sizes[:, :1]), sizes], dim=1)
    return with_cls.log().to(dtype)[:, None, None, :]
