"""LLaVA-1.5 (``LlavaForConditionalGeneration``: CLIP vision tower, MLP projector, Llama decoder).

Stages: ``vision`` (between CLIP encoder blocks, with ToMe's proportional attention as a
log-size bias on the keys), ``vision_out`` (the selected CLIP layer, CLS dropped, before the
projector; the projector then runs on the kept tokens only), ``projector`` and ``llm``.
The CLIP encoder runs as an explicit loop over its stock blocks up to the selected feature layer;
the blocks after it cannot influence LLaVA's output and are skipped (a method that asks for the
next block's CLS attention or keys gets that block's LayerNorm and q/k projections only). The
``clip_*`` signals come from an auxiliary CLIP checkpoint (``clip_space.py``).

Protocols (``protocol``): ``hf`` applies the checkpoint's chat template and its image processor
(which centre-crops a non-square image); ``llava`` is LLaVA-1.5's own evaluation
(``image_aspect_ratio: pad``, ``conv_mode vicuna_v1``): each image is padded to a square with the
image processor's mean colour (``int(255 * mean)`` per channel, the image centred) before the same
processor resizes it, and the prompt is the ``vicuna_v1`` conversation, system prompt first:
``"<system> USER: <image>\n<question> ASSISTANT:"``. The per-benchmark suffixes ("Answer the
question using a single word or phrase.", ...) are part of the tasks' prompts under both.
The text is tokenised by the checkpoint's tokenizer in one piece, where LLaVA's code tokenises the
pieces around ``<image>`` separately.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from tokenbench.adapters.base import AdapterError, Prompt, TokenTrace
from tokenbench.adapters.clip_space import ClipSpace
from tokenbench.adapters.loading import load_checkpoint
from tokenbench.adapters.placement import execution_device
from tokenbench.adapters.prefill import LLM_SITE_SIGNALS, TokenSequence
from tokenbench.adapters.probe import head_mean_keys, head_mean_probs, head_mean_received
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

#: The system prompt of LLaVA-1.5's ``vicuna_v1`` conversation.
VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def llava_architecture(config: Any, vision_layers: int, vision_tokens: int) -> Architecture:
    """The :class:`Architecture` of a LLaVA-family ``config``: its ``vision_config`` encoder running
    ``vision_layers`` blocks on ``vision_tokens`` tokens per pass, an MLP projector into the
    ``text_config`` decoder (gated MLPs)."""
    text, vision = config.text_config, config.vision_config
    return Architecture(
        llm_layers=text.num_hidden_layers, llm_hidden=text.hidden_size,
        llm_intermediate=text.intermediate_size, llm_heads=text.num_attention_heads,
        llm_kv_heads=text.num_key_value_heads, vocab_size=text.vocab_size,
        vision_layers=vision_layers, vision_hidden=vision.hidden_size,
        vision_intermediate=vision.intermediate_size, vision_tokens=vision_tokens,
        projector_in=vision.hidden_size, projector_hidden=text.hidden_size, gated_mlp=True,
        patch_in=vision.num_channels * vision.patch_size ** 2)


class LlavaAdapter(StagedAdapter):
    name = "llava"
    model_types = ("llava",)
    stages = frozenset({Stage.VISION, Stage.VISION_OUT, Stage.PROJECTOR, Stage.LLM, Stage.DECODE})
    description = "LLaVA-1.5: CLIP ViT-L/336 (24×24 patches), MLP projector, Llama decoder"
    protocols = ("llava", "hf")
    default_protocol = "llava"
    #: The signals each stage serves (``ModelInfo.signals``); ``schedule`` and the harness refuse
    #: a method that needs another one there.
    served_signals: ClassVar[dict[Stage, frozenset[str]]] = {
        Stage.VISION: frozenset({"keys"}),
        Stage.VISION_OUT: frozenset({"cls_attention", "cls_token", "attention_received", "keys", "text"})
        | NEXT_BLOCK_SIGNALS | CLIP_SIGNALS,
        Stage.PROJECTOR: frozenset({"text"}) | CLIP_SIGNALS,
        Stage.LLM: LLM_SITE_SIGNALS,
        Stage.DECODE: DECODE_SIGNALS,
    }

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
        self._clip_spaces: dict[str, ClipSpace] = {}

    @classmethod
    def load(cls, path: str | Path, *, dtype: torch.dtype = torch.float32, attn: str = "sdpa",
             device: str | torch.device = "cpu") -> LlavaAdapter:
        from transformers import AutoProcessor

        model = load_checkpoint(path, cls.model_types, dtype, attn, device)
        return cls(model, AutoProcessor.from_pretrained(path))

    def info(self, n_visual: int | None = None, grid: tuple[int, int] | None = None) -> ModelInfo:
        grid = grid or self.patch_grid
        arch = llava_architecture(self.model.config, self.vision_blocks, grid[0] * grid[1] + 1)  # + CLS
        return ModelInfo(self.name, self.stages, grid, n_visual or grid[0] * grid[1], arch, self.served_signals)

    def _encode(self, prompts: Sequence[Prompt]) -> Encoded:
        processor = self.processor
        if self.protocol == "llava":
            fill = tuple(int(255 * m) for m in processor.image_processor.image_mean)
            images = [pad_to_square(p.image, fill) for p in prompts]
            texts = [vicuna_v1_prompt(p.text, processor.image_token) for p in prompts]
        else:
            images = [p.image for p in prompts]
            texts = [processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p.text}]}],
                add_generation_prompt=True, tokenize=False) for p in prompts]
        batch = processor(images=images, text=texts, padding=True, return_tensors="pt")
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
            hidden = block(hidden, bias).to(block_input.device)  # a device map may place blocks elsewhere
        patches.tokens = hidden[:, 1:]
        keep = plan.at(Stage.VISION_OUT)
        if keep:
            signals = {}
            if "cls_attention" in needs:
                signals["cls_attention"] = self._cls_attention(block_input, bias)
                for trace in traces:
                    trace.probe_rows += 1
            if "attention_received" in needs:
                signals["attention_received"] = self._received_attention(block_input, bias)
                for trace in traces:
                    trace.probe_rows += block_input.shape[1]
            if "cls_token" in needs:
                signals["cls_token"] = hidden[:, :1]
            if "keys" in needs:
                signals["keys"] = _clip_keys(tower.encoder.layers[self.vision_blocks - 1], block_input)[:, 1:]
            if "text" in needs:
                signals["text"] = sequence.text_after_image()
            if needs & NEXT_BLOCK_SIGNALS:
                signals |= self._next_block_signals(hidden, bias, compressor, traces)
            signals |= self._clip_signals(patches.tokens, encoded, compressor)
            patches = run_site(compressor, Site(Stage.VISION_OUT), keep[0], patches, self.patch_grid,
                               plan.generator, generators=plan.generators, **signals).block
        features = patches.tokens
        patches.tokens = self.model.model.multi_modal_projector(features)
        keep = plan.at(Stage.PROJECTOR)
        if keep:
            signals = {"text": sequence.text_after_image()} if "text" in needs else {}
            signals |= self._clip_signals(features, encoded, compressor)
            patches = run_site(compressor, Site(Stage.PROJECTOR), keep[0], patches, self.patch_grid,
                               plan.generator, generators=plan.generators, **signals).block
        return patches

    def _cls_attention(self, block_input: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Head-mean attention of the CLS query in the block that produced the selected layer."""
        block = self.model.model.vision_tower.encoder.layers[self.vision_blocks - 1]
        attn = block.self_attn
        normed = block.layer_norm1(block_input.to(execution_device(block)))
        b, t, _ = normed.shape
        queries = attn.q_proj(normed[:, :1]).view(b, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
        keys = attn.k_proj(normed).view(b, t, attn.num_heads, attn.head_dim).transpose(1, 2)
        bias = None if bias is None else bias[:, 0].to(normed.device)
        return head_mean_probs(queries, keys, attn.scale, bias=bias)[:, 0, 1:].to(block_input.device)

    def _received_attention(self, block_input: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Attention each patch receives in the block that produced the selected layer, averaged
        over heads and all queries (CLS included), streamed over query chunks."""
        block = self.model.model.vision_tower.encoder.layers[self.vision_blocks - 1]
        attn = block.self_attn
        normed = block.layer_norm1(block_input.to(execution_device(block)))
        b, t, _ = normed.shape
        queries = attn.q_proj(normed).view(b, t, attn.num_heads, attn.head_dim).transpose(1, 2)
        keys = attn.k_proj(normed).view(b, t, attn.num_heads, attn.head_dim).transpose(1, 2)
        bias = None if bias is None else bias[:, 0].to(normed.device)
        return head_mean_received(queries, keys, attn.scale, bias=bias)[:, 1:].to(block_input.device)

    def unserved_signal_reason(self, compressor: TokenCompressor,
                               plan: Sequence[tuple[Site, int]]) -> str | None:
        next_block, clip = compressor.needs & NEXT_BLOCK_SIGNALS, compressor.needs & CLIP_SIGNALS
        for site, _ in plan:
            if next_block:
                if site.stage is not Stage.VISION_OUT:
                    return self._refusal(compressor, next_block, f"at {site.stage} sites; they exist at "
                                         "vision_out only")
                if self.vision_blocks >= len(self.model.model.vision_tower.encoder.layers):
                    return self._refusal(compressor, next_block, "for this checkpoint: its selected vision "
                                         "layer is the last CLIP block, so no block follows it")
            if clip:
                if site.stage not in (Stage.VISION_OUT, Stage.PROJECTOR):
                    return self._refusal(compressor, clip, f"at {site.stage} sites; they exist at vision_out "
                                         "and projector only")
                try:
                    self._clip_space(compressor)
                except AdapterError as exc:
                    return self._refusal(compressor, clip, f"here: {exc}")
        return super().unserved_signal_reason(compressor, plan)

    def _refusal(self, compressor: TokenCompressor, signals: frozenset[str], why: str) -> str:
        return (f"method '{compressor.name}' needs {', '.join(sorted(signals))}, which the {self.name} "
                f"adapter cannot serve {why}")

    def _next_block_signals(self, selected: torch.Tensor, bias: torch.Tensor | None,
                            compressor: TokenCompressor, traces: list[TokenTrace]) -> dict[str, torch.Tensor]:
        """E2: the CLS row and the patch keys of the CLIP block after the selected one."""
        block = self.model.model.vision_tower.encoder.layers[self.vision_blocks]
        out = next_block_signals(block, selected, compressor, bias)
        if "cls_attention_next" in out:
            for trace in traces:
                trace.probe_rows += 1
        return out

    def _clip_signals(self, features: torch.Tensor, encoded: Any,
                      compressor: TokenCompressor | None) -> dict[str, torch.Tensor]:
        """E7: ``clip_visual`` of the alive tokens' vision features and ``clip_text`` of the prompts."""
        if compressor is None or not compressor.needs & CLIP_SIGNALS:
            return {}
        space = self._clip_space(compressor)
        out = {"clip_visual": space.visual(features)} if "clip_visual" in compressor.needs else {}
        if "clip_text" in compressor.needs:
            if encoded.texts is None:
                raise AdapterError("clip_text needs the prompts' text; call run() or generate()")
            out["clip_text"] = space.text([compressor.clip_instruction(t) for t in encoded.texts])
        return out

    def _clip_space(self, compressor: TokenCompressor) -> ClipSpace:
        path = compressor.clip_checkpoint
        if path is None:
            raise AdapterError(f"no CLIP checkpoint was given; pass -o {compressor.name}.clip_checkpoint=DIR "
                               "(a local full CLIP model, the one this VLM's vision tower comes from)")
        if path not in self._clip_spaces:
            space = ClipSpace.load(path, self.device)
            width = self.model.config.vision_config.hidden_size
            if space.vision_width != width:
                raise AdapterError(f"the CLIP checkpoint '{path}' has vision width {space.vision_width}, "
                                   f"this model's vision tower {width}: it is not the tower's CLIP model")
            self._clip_spaces[path] = space
        return self._clip_spaces[path]


def vicuna_v1_prompt(question: str, image_token: str = "<image>") -> str:
    """LLaVA-1.5's ``vicuna_v1`` conversation for one image and one question, up to the answer."""
    return f"{VICUNA_V1_SYSTEM} USER: {image_token}\n{question} ASSISTANT:"


def pad_to_square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """LLaVA's ``expand2square``: the image centred on a square of colour ``fill`` (side = longer side)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), fill)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def _clip_keys(block: torch.nn.Module, block_input: torch.Tensor) -> torch.Tensor:
    attn = block.self_attn
    normed = block.layer_norm1(block_input.to(execution_device(block)))
    return head_mean_keys(attn.k_proj, normed, attn.head_dim).to(block_input.device)


def next_block_signals(block: torch.nn.Module, selected: torch.Tensor, compressor: TokenCompressor,
                       bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """E2: ``cls_attention_next`` [B, N] (only if ``compressor`` needs it) and ``keys_next`` [B, N, Dk] of
    the CLIP ``block`` after the selected one, run on the selected features ``selected`` [B, 1 + N, D]
    (CLS first; its LayerNorm and q/k projections only, the block's output is not needed). Heads
    combine as ``compressor.next_block_heads`` says; ``bias`` is ToMe's log-size bias on the keys."""
    attn = block.self_attn
    normed = block.layer_norm1(selected.to(execution_device(block)))
    bias = None if bias is None else bias.to(normed.device)
    b, t, width = normed.shape
    keys = attn.k_proj(normed)
    out: dict[str, torch.Tensor] = {}
    if compressor.next_block_heads == "concat":
        if "cls_attention_next" in compressor.needs:
            scores = (attn.q_proj(normed[:, :1]).float() @ keys.float().transpose(1, 2)) * width ** -0.5
            if bias is not None:
                scores = scores + bias[:, 0].float()
            out["cls_attention_next"] = scores.softmax(dim=-1)[:, 0, 1:]
        out["keys_next"] = keys[:, 1:]
    else:
        if "cls_attention_next" in compressor.needs:
            queries = attn.q_proj(normed[:, :1]).view(b, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
            split = keys.view(b, t, attn.num_heads, attn.head_dim).transpose(1, 2)
            probs = head_mean_probs(queries, split, attn.scale, bias=None if bias is None else bias[:, 0])
            out["cls_attention_next"] = probs[:, 0, 1:]
        out["keys_next"] = keys[:, 1:].view(b, t - 1, attn.num_heads, attn.head_dim).mean(dim=2)
    return {name: value.to(selected.device) for name, value in out.items()}


def _size_bias(sizes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ToMe's proportional attention: ``log(size)`` added to every query's logit for each key."""
    with_cls = torch.cat([torch.ones_like(sizes[:, :1]), sizes], dim=1)
    return with_cls.log().to(dtype)[:, None, None, :]
