"""LLaVA-OneVision, images and videos (``LlavaOnevisionForConditionalGeneration``: SigLIP, MLP
projector, Qwen2).

An image is tiled like LLaVA-NeXT's (base crop plus sub-crops from ``image_grid_pinpoints``, the
sub-crop grid unpadded, one ``image_newline`` per row), but the projector runs before the packing
and ``anyres_max_9`` bilinearly pools the sub-crop grid down to about nine crops' worth of tokens
when it is larger (:mod:`tokenbench.adapters.anyres`). SigLIP has no CLS token.

Stages: ``projector`` (the packed LLM-space visual tokens, newlines excluded) and ``llm``. A
``vision_out`` stage is not offered: after pooling an LLM token mixes several encoder patches, so
encoder-side pruning has no one-to-one place to go. Crops seen by compressors: the base image
(crop 0) and the pooled sub-crop grid (crop 1), as their rows and columns in the packed layout.

Video (``Prompt.video``, spec wave 2 §20 E8) goes through the stock ``get_video_features`` on
``pixel_values_videos`` [B, F, C, H, W]: per frame the tower's selected layer, the projector, then the
model's own 2×2 bilinear ``apply_pooling`` (27×27 → 14×14 at 384 px), frames flattened frame-major,
and one ``image_newline`` after the whole video: F·h·w + 1 placeholder tokens. ``ModelInfo.frames`` is
F and ``grid`` one frame's pooled (h, w). The newline is layout, never shown to a compressor nor
counted: it stays last in the span, after the surviving tokens and any a method appends (a ``prefix``
leads the span). Frames go through the processor's video processor where it can be built (it needs
torchvision); otherwise each frame is the image processor's base crop (the frame resized to the
encoder's size without tiling, as the video processor resizes it, but with PIL's bicubic).

Signals at ``projector``: ``text`` and ``attention_received``: the attention each patch receives in
the block that produced the selected layer (head mean, mean over every query of its crop or frame),
pooled to the visual tokens the way the features are (the model's own packing and ``anyres_max_9``
pooling for an image, ``apply_pooling`` per frame for a video), as HoliTom's reference pools it.

Processor: ``LlavaOnevisionProcessor`` needs a video processor (torchvision); where it cannot be
built, the tokenizer and image processor are used directly and the ``<image>`` / ``<video>``
placeholder is expanded to the token count of the model's own packing, which is what the processor
computes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from tokenbench.adapters.anyres import AnyresImages, AnyresLayout, anyres_layout
from tokenbench.adapters.base import AdapterError, Prompt, TokenTrace
from tokenbench.adapters.llava import llava_architecture
from tokenbench.adapters.loading import load_checkpoint
from tokenbench.adapters.placement import execution_device
from tokenbench.adapters.prefill import LLM_SITE_SIGNALS, TokenSequence
from tokenbench.adapters.probe import head_mean_received
from tokenbench.adapters.qwen2_vl import load_processor
from tokenbench.adapters.sites import (
    AFTER_ALL_LINES,
    Applied,
    VisualBlock,
    block_lines,
    interleave,
    run_site,
)
from tokenbench.adapters.staged import Encoded, Plan, StagedAdapter
from tokenbench.compressor import DECODE_SIGNALS, ModelInfo, Site, Stage


class LlavaOnevisionAdapter(AnyresImages, StagedAdapter):
    name = "llava_onevision"
    model_types = ("llava_onevision",)
    stages = frozenset({Stage.PROJECTOR, Stage.LLM, Stage.DECODE})
    accepts_video = True
    video_frames = 32  # lmms-eval's llava_onevision max_frames_num
    served_signals: ClassVar[dict[Stage, frozenset[str]]] = {
        Stage.PROJECTOR: frozenset({"text", "attention_received"}), Stage.LLM: LLM_SITE_SIGNALS,
        Stage.DECODE: DECODE_SIGNALS}
    description = ("LLaVA-OneVision: SigLIP anyres crops pooled to anyres_max_9, newline per row; videos "
                   "2×2-pooled per frame, one newline; Qwen2")

    def __init__(self, model: torch.nn.Module, processor: Any) -> None:
        super().__init__(model, processor)
        config = model.config
        if not isinstance(config.vision_feature_layer, int):
            raise AdapterError("LLaVA-OneVision checkpoints with several vision feature layers are not supported")
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        self.patch_grid = (side, side)
        self.frame_grid = (math.ceil(side / 2), math.ceil(side / 2))  # after apply_pooling's 2×2 bilinear
        self.vision_blocks = vision.num_hidden_layers  # the stock tower runs every block
        self.selected_block = config.vision_feature_layer % (vision.num_hidden_layers + 1)  # blocks up to it
        tokenizer = processor.tokenizer
        self.image_token = getattr(tokenizer, "image_token", None) or "<image>"
        self.video_token = tokenizer.convert_ids_to_tokens(config.video_token_id)
        tokenizer.padding_side = "left"

    @classmethod
    def load(cls, path: str | Path, *, dtype: torch.dtype = torch.float32, attn: str = "sdpa",
             device: str | torch.device = "cpu") -> LlavaOnevisionAdapter:
        model = load_checkpoint(path, cls.model_types, dtype, attn, device)
        return cls(model, load_processor(path))

    def info(self, n_visual: int | None = None, grid: tuple[int, int] | None = None,
             crops: tuple[tuple[int, int], ...] = (), frames: int = 1) -> ModelInfo:
        grid = grid or self.patch_grid
        patches = self.patch_grid[0] * self.patch_grid[1]  # SigLIP: no CLS
        arch = llava_architecture(self.model.config, self.vision_blocks, patches)
        return ModelInfo(self.name, self.stages, grid, n_visual or frames * grid[0] * grid[1], arch,
                         self.served_signals, crops=crops, frames=frames)

    def _info_of(self, encoded: Encoded) -> ModelInfo:
        if _is_video(encoded):
            return self.info(encoded.n_visual, grid=encoded.grid, frames=encoded.frames)
        return super()._info_of(encoded)

    def _batch_key(self, prompt: Prompt) -> Any:
        if prompt.video is not None:
            return ("video", len(prompt.video))  # every frame is resized to the encoder's size
        return super()._batch_key(prompt)

    def _pack(self, features: torch.Tensor, size: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
        """The model's own packing of one image's crop features [C, P, K] into its span [n_span, K]."""
        packed, _ = self.model.model.pack_image_features([features], size[None], image_newline=newline,
                                                         vision_aspect_ratio=self.model.config.vision_aspect_ratio)
        return packed[0]

    def _layout(self, image_size: tuple[int, int]) -> AnyresLayout:
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        config = self.model.config
        crops = image_size_to_num_patches(image_size, config.image_grid_pinpoints, config.vision_config.image_size)
        return anyres_layout(self._pack, crops, self.patch_grid[0], torch.tensor(image_size))

    def _encode(self, prompts: Sequence[Prompt]) -> Encoded:
        if any(p.video is not None for p in prompts):
            return self._encode_videos(prompts)
        processor = self.processor
        images = processor.image_processor(images=[p.image for p in prompts], return_tensors="pt")
        layout = self._batch_layout(images["image_sizes"])
        batch = self._tokenize(prompts, "image", self.image_token, layout.n_span)
        return self._encoded(batch, images, layout)

    def _tokenize(self, prompts: Sequence[Prompt], kind: str, token: str, count: int) -> Any:
        """The prompts in the chat template with one ``kind`` placeholder expanded to ``count`` ``token``s."""
        processor = self.processor
        texts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": p.text}]}],
            add_generation_prompt=True, tokenize=False).replace(token, token * count, 1) for p in prompts]
        return processor.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)

    def _encode_videos(self, prompts: Sequence[Prompt]) -> Encoded:
        frames = len(prompts[0].video or ())
        if frames == 0 or any(p.video is None or len(p.video) != frames for p in prompts):
            raise AdapterError("a batch must hold videos of one frame count (> 0) and no images; generate() "
                               "groups them for you")
        if self.model.config.vision_feature_select_strategy != "full":
            raise AdapterError("LLaVA-OneVision video needs vision_feature_select_strategy='full' (SigLIP has no "
                               "CLS token to drop; the stock video path pools the full patch grid)")
        pixels = torch.stack([self._video_pixels(p.video) for p in prompts])
        h, w = self.frame_grid
        count = frames * h * w + 1  # + the newline after the whole video
        batch = self._tokenize(prompts, "video", self.video_token, count)
        device = self.device
        return Encoded(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                       {"pixel_values_videos": pixels.to(device, self.dtype)}, self.model.config.video_token_id,
                       self.frame_grid, span_count=count, frames=frames)

    def _video_pixels(self, frames: Sequence[Any]) -> torch.Tensor:
        """One video's ``pixel_values_videos`` [F, C, H, W]."""
        video_processor = getattr(self.processor, "video_processor", None)
        if video_processor is not None:
            return video_processor(videos=[list(frames)], return_tensors="pt")["pixel_values_videos"][0]
        image_processor = self.processor.image_processor
        size = self.model.config.vision_config.image_size
        # one pinpoint of the encoder's size: crop 0 is the frame resized to it, crop 1 a copy
        out = image_processor(images=list(frames), image_grid_pinpoints=[[size, size]], return_tensors="pt")
        return out["pixel_values"][:, 0]

    def _visual_tokens(self, encoded: Encoded, plan: Plan, sequence: TokenSequence,
                       traces: list[TokenTrace]) -> VisualBlock:
        keep = plan.at(Stage.PROJECTOR)
        compressor = plan.compressor
        needs = compressor.needs if compressor is not None and keep else frozenset()
        captured: dict[str, torch.Tensor] = {}
        hook = None
        if "attention_received" in needs:  # the selected block's input, to recompute its attention
            if self.selected_block == 0:
                raise AdapterError("attention_received needs a vision block before the selected layer; this "
                                   "checkpoint selects the patch embeddings")
            layers = self.model.model.vision_tower.encoder.layers
            hook = layers[self.selected_block - 1].register_forward_pre_hook(
                lambda module, args, kwargs: captured.update(input=args[0] if args else kwargs["hidden_states"]),
                with_kwargs=True)
        try:
            if _is_video(encoded):
                block, received = self._video_tokens(encoded, traces, captured)
            else:
                block, received = self._image_tokens(encoded, traces, captured)
        finally:
            if hook is not None:
                hook.remove()
        if keep:
            signals = {"text": sequence.text_after_image()} if "text" in needs else {}
            if received is not None:
                signals["attention_received"] = received
                crops_or_frames, patches = captured["input"].shape[:2]
                for trace in traces:  # every query row of every crop or frame
                    trace.probe_rows += crops_or_frames // len(traces) * patches
            block = run_site(compressor, Site(Stage.PROJECTOR), keep[0], block, encoded.grid, plan.generator,
                             encoded.crops, frames=encoded.frames, generators=plan.generators, **signals).block
        return block

    def _image_tokens(self, encoded: Encoded, traces: list[TokenTrace],
                      captured: dict[str, torch.Tensor]) -> tuple[VisualBlock, torch.Tensor | None]:
        config = self.model.config
        inputs = encoded.image_inputs
        layout = self._layout_of(encoded)
        features = self.model.model.get_image_features(
            inputs["pixel_values"], inputs["image_sizes"], vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            vision_aspect_ratio=config.vision_aspect_ratio).pooler_output
        packed = torch.stack(list(features)).to(self.dtype)
        b, crops = inputs["pixel_values"].shape[:2]
        patches = self.patch_grid[0] * self.patch_grid[1]
        eager = config.vision_config._attn_implementation == "eager"
        for trace in traces:
            trace.vision.extend([patches] * (crops * self.vision_blocks))  # attention runs per crop
            trace.eager_attention_calls += self.vision_blocks * int(eager)
            trace.projector_tokens = crops * patches  # the stock projector runs before unpadding
        span = layout.visual_span.to(packed.device)
        received = None
        if "input" in captured:
            per_crop = self._received(captured["input"]).view(b, crops, -1, 1)
            size, zero = inputs["image_sizes"][0], per_crop.new_zeros(1)
            received = torch.stack([self._pack(row, size, zero)[span.to(row.device), 0] for row in per_crop])
        return VisualBlock.fresh(packed[:, span]), received

    def _video_tokens(self, encoded: Encoded, traces: list[TokenTrace],
                      captured: dict[str, torch.Tensor]) -> tuple[VisualBlock, torch.Tensor | None]:
        config = self.model.config
        model = self.model.model
        pixels = encoded.image_inputs["pixel_values_videos"]
        b, frames = pixels.shape[:2]
        out = model.get_video_features(pixels, vision_feature_layer=config.vision_feature_layer,
                                       vision_feature_select_strategy=config.vision_feature_select_strategy)
        tokens = out.pooler_output[:, :-1].to(self.dtype)  # the last one is the video's newline
        patches = self.patch_grid[0] * self.patch_grid[1]
        eager = config.vision_config._attn_implementation == "eager"
        for trace in traces:
            trace.vision_frames = frames
            trace.vision.extend([patches] * self.vision_blocks)
            trace.eager_attention_calls += self.vision_blocks * int(eager)
            trace.projector_tokens = frames * patches  # the projector runs before the pooling
        received = None
        if "input" in captured:
            per_frame = self._received(captured["input"])[..., None]  # [B·F, P, 1]
            received = model.apply_pooling(per_frame).reshape(b, -1)  # pooled like the features
        return VisualBlock.fresh(tokens), received

    def _received(self, block_input: torch.Tensor) -> torch.Tensor:
        """``[N, P]``: per crop or frame, the attention each patch receives in the block that produced
        the selected layer, averaged over heads and every query row (streamed over query chunks)."""
        block = self.model.model.vision_tower.encoder.layers[self.selected_block - 1]
        attn = block.self_attn
        normed = block.layer_norm1(block_input.to(execution_device(block)))
        n, t, _ = normed.shape
        queries = attn.q_proj(normed).view(n, t, attn.num_heads, attn.head_dim).transpose(1, 2)
        keys = attn.k_proj(normed).view(n, t, attn.num_heads, attn.head_dim).transpose(1, 2)
        return head_mean_received(queries, keys, attn.scale).to(block_input.device)

    def _span(self, encoded: Encoded, block: VisualBlock) -> Applied:
        """For a video, the span is the surviving tokens (frame-major, a ``prefix`` first, appended
        tokens after them or at their ``extra_after`` place) and the video's one newline last, where the
        stock model puts it."""
        if not _is_video(encoded):
            return super()._span(encoded, block)
        origin = block.origin
        b = origin.shape[0]
        found = origin >= 0
        line = block_lines(origin, torch.zeros_like(origin))
        source = torch.where(found, origin, -1)
        newline = self.model.model.image_newline.to(block.tokens)[None, None].expand(b, 1, -1)
        after = torch.full((b, 1), AFTER_ALL_LINES, dtype=torch.long, device=origin.device)
        return interleave(Applied(block, source, 0), line, source, newline, after,
                          torch.full_like(after, encoded.n_visual))


def _is_video(encoded: Encoded) -> bool:
    return "pixel_values_videos" in encoded.image_inputs
