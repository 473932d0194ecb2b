"""Video-LLaVA (``VideoLlavaForConditionalGeneration``: CLIP-shaped video and image towers, one MLP
projector, Llama decoder), for videos and images.

A video of F frames is encoded frame by frame by the video tower (the selected layer,
``vision_feature_layer``); like the stock model, each frame keeps its CLS token, so the LLM sees
F × (1 + h·w) tokens in frame order, ``[CLS_0, patches_0, CLS_1, patches_1, ...]`` (8 × 257 = 2056
for the 224 px checkpoint). The frame axis of the contract (spec wave 2 §20 E8) counts the
**patch** tokens only: ``ModelInfo.frames = F``, ``grid`` is one frame's (h, w) (16×16),
``n_visual = F·h·w`` (2048), frame-major, ``origin = t·h·w + y·w + x``. The per-frame CLS tokens are
layout tokens, like LLaVA-NeXT's newlines: never shown to a compressor, never counted in the
budget, always kept, each just before the surviving patches of its frame. This is the layout of
ApET's Video-LLaVA variant (spec §2.8: per frame ``[CLS, kept tokens]``), whose 87.5% compression
is 256 of 2048 patch tokens.

An image goes through the image tower with the CLS token dropped (``vision_feature_select_strategy
="default"``), h·w tokens, as in LLaVA-1.5.

Stages: ``vision_out`` (the selected layer, before the projector, per-frame features frame-major;
the projector then runs on the kept tokens only), ``projector`` and ``llm``.
The next-block signals (``cls_attention_next``, ``keys_next``, spec wave 2 §20 E2) come, per frame,
from the tower's block after the selected one run on that frame's selected features (its LayerNorm
and q/k projections only): each frame's CLS row over its own patches, frame-major like the rest.

Preprocessing: every frame goes through the checkpoint's image processor (resize the shorter side to
224 bicubic, centre crop 224, CLIP normalisation), the steps ``VideoLlavaVideoProcessor`` applies,
so no torchvision is needed. The frames themselves are sampled by the task
(:mod:`tokenbench.video`; Video-LLaVA's evaluation takes 8, uniformly).

Protocols: ``llava`` is Video-LLaVA's evaluation conversation (``llava_v1``: the system prompt,
then ``"USER: <video>\\n<question> ASSISTANT:"``); ``hf`` is the model card's prompt without the
system prompt. Under both the video placeholder expands to all frames' tokens contiguously, as the
HF processor does (Video-LLaVA's own code writes one ``<image>`` per frame separated by spaces).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from tokenbench.adapters.base import AdapterError, Prompt, TokenTrace
from tokenbench.adapters.llava import VICUNA_V1_SYSTEM, _clip_keys, llava_architecture, next_block_signals
from tokenbench.adapters.loading import load_checkpoint
from tokenbench.adapters.placement import execution_device
from tokenbench.adapters.prefill import LLM_SITE_SIGNALS, TokenSequence
from tokenbench.adapters.probe import head_mean_probs, head_mean_received
from tokenbench.adapters.qwen2_vl import load_processor
from tokenbench.adapters.sites import Applied, VisualBlock, block_lines, interleave, run_site
from tokenbench.adapters.staged import Encoded, Plan, StagedAdapter
from tokenbench.compressor import DECODE_SIGNALS, NEXT_BLOCK_SIGNALS, ModelInfo, Site, Stage, TokenCompressor


@dataclass
class VideoEncoded(Encoded):
    """An encoded batch of videos (or images): ``is_video`` selects the tower and the CLS layout;
    ``frame_cls`` [B, F, D] is each frame's LLM-space CLS token, set while the towers run."""

    is_video: bool = False
    frame_cls: torch.Tensor | None = None


class VideoLlavaAdapter(StagedAdapter):
    name = "video_llava"
    model_types = ("video_llava",)
    stages = frozenset({Stage.VISION_OUT, Stage.PROJECTOR, Stage.LLM, Stage.DECODE})
    description = "Video-LLaVA: CLIP-shaped video/image towers (8 frames × 16×16 at 224 px), MLP projector, Llama"
    protocols = ("llava", "hf")
    default_protocol = "llava"
    accepts_video = True
    served_signals: ClassVar[dict[Stage, frozenset[str]]] = {
        Stage.VISION_OUT: frozenset({"cls_attention", "attention_received", "keys", "text"}) | NEXT_BLOCK_SIGNALS,
        Stage.PROJECTOR: frozenset({"text"}),
        Stage.LLM: LLM_SITE_SIGNALS,
        Stage.DECODE: DECODE_SIGNALS,
    }

    def __init__(self, model: torch.nn.Module, processor: Any) -> None:
        super().__init__(model, processor)
        config = model.config
        if not isinstance(config.vision_feature_layer, int):
            raise AdapterError("Video-LLaVA checkpoints with several vision feature layers are not supported")
        if config.vision_feature_select_strategy != "default":
            raise AdapterError("only vision_feature_select_strategy='default' is supported")
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        self.patch_grid = (side, side)
        self.vision_blocks = config.vision_feature_layer % (vision.num_hidden_layers + 1)
        tokenizer = processor.tokenizer
        tokenizer.padding_side = "left"
        self.image_token = tokenizer.convert_ids_to_tokens(config.image_token_id)
        self.video_token = tokenizer.convert_ids_to_tokens(config.video_token_id)

    @classmethod
    def load(cls, path: str | Path, *, dtype: torch.dtype = torch.float32, attn: str = "sdpa",
             device: str | torch.device = "cpu") -> VideoLlavaAdapter:
        model = load_checkpoint(path, cls.model_types, dtype, attn, device)
        return cls(model, load_processor(path))

    def info(self, n_visual: int | None = None, grid: tuple[int, int] | None = None,
             frames: int = 1) -> ModelInfo:
        grid = grid or self.patch_grid
        arch = llava_architecture(self.model.config, self.vision_blocks, grid[0] * grid[1] + 1)  # + CLS
        return ModelInfo(self.name, self.stages, grid, n_visual or frames * grid[0] * grid[1], arch,
                         self.served_signals, frames=frames)

    def _info_of(self, encoded: Encoded) -> ModelInfo:
        return self.info(encoded.n_visual, grid=encoded.grid, frames=encoded.frames)

    def _batch_key(self, prompt: Prompt) -> Any:
        return ("video", len(prompt.video)) if prompt.video is not None else ("image",)

    def _encode(self, prompts: Sequence[Prompt]) -> VideoEncoded:
        videos = [p.video for p in prompts]
        is_video = videos[0] is not None
        if any((v is not None) != is_video for v in videos):
            raise AdapterError("a batch mixes videos and images; run them in separate batches")
        frames = len(videos[0]) if is_video else 1
        if is_video and (frames == 0 or any(len(v) != frames for v in videos)):
            raise AdapterError(f"every video of a batch needs the same number of frames (> 0), got "
                               f"{[len(v) for v in videos]}")
        h, w = self.patch_grid
        placeholder = (self.video_token * (frames * (h * w + 1)) if is_video
                       else self.image_token * (h * w))
        texts = [self._conversation(placeholder, p.text) for p in prompts]
        batch = self.processor.tokenizer(texts, padding=True, return_tensors="pt")
        pictures = [frame for v in videos for frame in v] if is_video else [p.image for p in prompts]
        processed = self.processor.image_processor(images=pictures, return_tensors="pt")
        pixels = processed.get("pixel_values", processed.get("pixel_values_images"))  # the latter: legacy name
        device = self.device
        key = "pixel_values_videos" if is_video else "pixel_values"
        if is_video:
            pixels = pixels.view(len(prompts), frames, *pixels.shape[1:])
        config = self.model.config
        return VideoEncoded(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                            {key: pixels.to(device, self.dtype)},
                            config.video_token_id if is_video else config.image_token_id, self.patch_grid,
                            span_count=frames * (h * w + 1) if is_video else None, frames=frames,
                            is_video=is_video)

    def _conversation(self, placeholder: str, question: str) -> str:
        turn = f"USER: {placeholder}\n{question} ASSISTANT:"
        return f"{VICUNA_V1_SYSTEM} {turn}" if self.protocol == "llava" else turn

    def _visual_tokens(self, encoded: Encoded, plan: Plan, sequence: TokenSequence,
                       traces: list[TokenTrace]) -> VisualBlock:
        assert isinstance(encoded, VideoEncoded)
        model = self.model.model
        tower = model.video_tower if encoded.is_video else model.image_tower
        compressor = plan.compressor
        needs = compressor.needs if compressor else frozenset()
        pixels = encoded.image_inputs["pixel_values_videos" if encoded.is_video else "pixel_values"]
        batch, frames = sequence.hidden.shape[0], encoded.frames
        pixels = pixels.flatten(0, 1) if encoded.is_video else pixels  # [B·F, C, H, W], frame-major per video
        hidden = tower.pre_layrnorm(tower.embeddings(pixels))
        eager = tower.config._attn_implementation == "eager"
        for trace in traces:
            trace.vision_frames = frames
        block_input = hidden
        for block in tower.encoder.layers[:self.vision_blocks]:
            for trace in traces:
                trace.vision.append(hidden.shape[1])
                trace.eager_attention_calls += int(eager)
            block_input = hidden
            hidden = block(hidden, None)

        def by_video(per_frame: torch.Tensor) -> torch.Tensor:  # [B·F, P, ...] -> [B, F·P, ...]
            return per_frame.reshape(batch, frames * per_frame.shape[1], *per_frame.shape[2:])

        patches = VisualBlock.fresh(by_video(hidden[:, 1:]))
        grid = encoded.grid
        keep = plan.at(Stage.VISION_OUT)
        if keep:
            signals: dict[str, torch.Tensor] = {}
            last = tower.encoder.layers[self.vision_blocks - 1]
            if "cls_attention" in needs:
                signals["cls_attention"] = by_video(_frame_cls_attention(last, block_input))
                for trace in traces:
                    trace.probe_rows += frames
            if "attention_received" in needs:
                signals["attention_received"] = by_video(_frame_received_attention(last, block_input))
                for trace in traces:
                    trace.probe_rows += block_input.shape[0] // batch * block_input.shape[1]
            if "keys" in needs:
                signals["keys"] = by_video(_clip_keys(last, block_input)[:, 1:])
            if needs & NEXT_BLOCK_SIGNALS:  # each frame's CLS over its own patches in the next block
                following = next_block_signals(tower.encoder.layers[self.vision_blocks], hidden, compressor)
                signals |= {name: by_video(value) for name, value in following.items()}
                for trace in traces:
                    trace.probe_rows += frames * int("cls_attention_next" in following)
            if "text" in needs:
                signals["text"] = sequence.text_after_image()
            patches = run_site(compressor, Site(Stage.VISION_OUT), keep[0], patches, grid, plan.generator,
                               frames=frames, generators=plan.generators, **signals).block
        projector = model.multi_modal_projector
        patches.tokens = projector(patches.tokens)
        if encoded.is_video:
            encoded.frame_cls = projector(hidden[:, 0]).view(batch, frames, -1)
            for trace in traces:  # the projector also runs on each frame's CLS token
                trace.projector_tokens = patches.tokens.shape[1] + frames
        keep = plan.at(Stage.PROJECTOR)
        if keep:
            signals = {"text": sequence.text_after_image()} if "text" in needs else {}
            patches = run_site(compressor, Site(Stage.PROJECTOR), keep[0], patches, grid, plan.generator,
                               frames=frames, generators=plan.generators, **signals).block
        return patches

    def unserved_signal_reason(self, compressor: TokenCompressor,
                               plan: Sequence[tuple[Site, int]]) -> str | None:
        next_block = compressor.needs & NEXT_BLOCK_SIGNALS
        if next_block and self.vision_blocks >= len(self.model.model.video_tower.encoder.layers):
            return (f"method '{compressor.name}' needs {', '.join(sorted(next_block))}, which the {self.name} "
                    "adapter cannot serve for this checkpoint: its selected vision layer is the last CLIP "
                    "block, so no block follows it")
        return super().unserved_signal_reason(compressor, plan)

    def _span(self, encoded: Encoded, block: VisualBlock) -> Applied:
        """For a video, each frame's CLS token goes back just before the surviving patches of its
        frame (layout line t−1 of the frame-t patches' line t); appended tokens follow them all, or
        stay in the frame ``Reduction.extra_after`` puts them in; a ``prefix`` precedes them all."""
        if not isinstance(encoded, VideoEncoded) or not encoded.is_video:
            return super()._span(encoded, block)
        h, w = encoded.grid
        per_frame = h * w
        origin = block.origin
        found = origin >= 0
        frame = origin.clamp(min=0) // per_frame
        line = block_lines(origin, frame)
        source = torch.where(found, frame * (per_frame + 1) + 1 + origin.clamp(min=0) % per_frame, -1)
        cls = encoded.frame_cls
        b, frames = cls.shape[:2]
        index = torch.arange(frames, device=origin.device).expand(b, frames)
        return interleave(Applied(block, source, 0), line, source, cls.to(block.tokens), index - 1,
                          index * (per_frame + 1))


def _frame_received_attention(block: torch.nn.Module, block_input: torch.Tensor) -> torch.Tensor:
    """``[B·F, h·w]``: per frame, the attention each patch receives in the block that produced the
    selected layer, averaged over heads and all of the frame's queries (its CLS included), streamed
    over query chunks (the ``attention_received`` signal; each frame is encoded on its own)."""
    attn = block.self_attn
    normed = block.layer_norm1(block_input.to(execution_device(block)))
    n, t, _ = normed.shape
    queries = attn.q_proj(normed).view(n, t, attn.num_heads, attn.head_dim).transpose(1, 2)
    keys = attn.k_proj(normed).view(n, t, attn.num_heads, attn.head_dim).transpose(1, 2)
    return head_mean_received(queries, keys, attn.scale)[:, 1:].to(block_input.device)


def _frame_cls_attention(block: torch.nn.Module, block_input: torch.Tensor) -> torch.Tensor:
    """``[B·F, h·w]``: per frame, the head-mean attention of its CLS query over its own patches in
    the block that produced the selected layer."""
    attn = block.self_attn
    normed = block.layer_norm1(block_input.to(execution_device(block)))  # a device map may place it elsewhere
    n, t, _ = normed.shape
    queries = attn.q_proj(normed[:, :1]).view(n, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
    keys = attn.k_proj(normed).view(n, t, attn.num_heads, attn.head_dim).transpose(1, 2)
    return head_mean_probs(queries, keys, attn.scale)[:, 0, 1:].to(block_input.device)
