"""Efficiency-only models: an HF ``config.json`` instantiated with random weights (no checkpoint).

Timings, memory and FLOPs depend on the model's shapes, not its weights, so ``tokenbench run
--model-config llava-1.5-7b`` (a shipped config, or any config.json path) can time LLaVA-1.5-7B-shaped prefill without
downloading 14 GB. The weights are created directly on the target device in ``--dtype`` (the config's
``torch_dtype`` is ignored: it names the checkpoint's storage dtype, and no checkpoint is read). The
processor is built offline: the family's stock image processor with the config's image size and a
small word-level tokenizer (from :mod:`tokenbench.tiny_models`) whose image placeholder ids are
written back into the config, so prompts expand to exactly as many visual tokens as the real model's.
Answers are meaningless (random weights), so this mode never scores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tokenbench.adapters.base import VLMAdapter
from tokenbench.adapters.loading import check_attention
from tokenbench.config import ConfigError
from tokenbench.models import ModelRef
from tokenbench.plugins import Registry
from tokenbench.tiny_models import (
    LLAVA_IMAGE_TOKEN,
    ONEVISION_VIDEO_TOKEN,
    QWEN_SPECIAL,
    VIDEO_LLAVA_VIDEO_TOKEN,
    llava_next_processor,
    llava_processor,
    llava_tokenizer,
    onevision_tokenizer,
    qwen_tokenizer,
    video_llava_processor,
)

SUPPORTED = ("llava", "qwen2_vl", "llava_next", "llava_onevision", "video_llava")


SHIPPED = Path(__file__).resolve().parent / "configs"


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.json"))


def config_path(text: str | Path) -> Path:
    """``--model-config``: a config.json path, or the name of a shipped config (``llava-1.5-7b``)."""
    path = Path(text)
    if not path.is_file() and (SHIPPED / f"{text}.json").is_file():
        return SHIPPED / f"{text}.json"
    return path


def read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"--model-config '{path}' does not exist; give an HF config.json or a shipped "
                          f"config: {', '.join(shipped_configs())}")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--model-config '{path}' is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or config.get("model_type") not in SUPPORTED:
        found = config.get("model_type") if isinstance(config, dict) else None
        raise ConfigError(f"--model-config '{path}' has model_type {found!r}; supported: {', '.join(SUPPORTED)}")
    return config


def config_model_ref(path: str | Path, registry: Registry) -> ModelRef:
    """A :class:`ModelRef` for ``--model-config`` (checked before anything loads)."""
    path = config_path(path)
    config = read_config(path)
    try:
        registry.adapter_for(config["model_type"])
    except LookupError:
        raise ConfigError(f"no adapter handles model_type '{config['model_type']}' of '{path}'") from None
    name = config.get("_name_or_path") or path.stem
    return ModelRef(f"{Path(str(name)).name} (random weights)", str(path), config["model_type"])


def random_weight_adapter(path: Path, registry: Registry, *, dtype: torch.dtype, attn: str,
                          device: torch.device) -> VLMAdapter:
    from transformers import AutoConfig, AutoModelForImageTextToText

    check_attention(attn)
    raw = read_config(path)
    processor, token_ids = _processor(raw)
    config = AutoConfig.for_model(**_without_dtype({k: v for k, v in raw.items() if k != "_name_or_path"}))
    for key, value in token_ids.items():
        setattr(config, key, value)
    config._attn_implementation = attn
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = AutoModelForImageTextToText.from_config(config, attn_implementation=attn, dtype=dtype)
    finally:
        torch.set_default_dtype(previous)
    wrong = {str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != dtype}
    if wrong:
        raise ConfigError(f"--model-config '{path}' built weights in {', '.join(sorted(wrong))}, not --dtype {dtype}")
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return registry.adapter_for(raw["model_type"])(model.eval(), processor)


def _without_dtype(config: dict[str, Any]) -> dict[str, Any]:
    """The config without its ``torch_dtype``/``dtype`` keys (nested ones too): the checkpoint's dtype
    must not override ``--dtype`` when the weights are random."""
    return {key: _without_dtype(value) if isinstance(value, dict) else value
            for key, value in config.items() if key not in ("torch_dtype", "dtype")}


def _processor(raw: dict[str, Any]) -> tuple[Any, dict[str, int]]:
    if raw["model_type"] == "llava_next":
        vision = raw["vision_config"]
        tokenizer = llava_tokenizer()
        processor = llava_next_processor(tokenizer, vision.get("image_size", 336), vision.get("patch_size", 14),
                                         raw.get("image_grid_pinpoints"))
        return processor, {"image_token_id": tokenizer.convert_tokens_to_ids(LLAVA_IMAGE_TOKEN),
                           "pad_token_id": tokenizer.pad_token_id}
    if raw["model_type"] == "llava_onevision":
        from transformers import LlavaOnevisionImageProcessorPil

        from tokenbench.adapters.qwen2_vl import ProcessorParts

        tokenizer = onevision_tokenizer()
        size = raw["vision_config"].get("image_size", 384)
        image_processor = LlavaOnevisionImageProcessorPil(size={"height": size, "width": size},
                                                          image_grid_pinpoints=raw.get("image_grid_pinpoints"))
        return ProcessorParts(tokenizer, image_processor), {
            "image_token_id": tokenizer.convert_tokens_to_ids(LLAVA_IMAGE_TOKEN),
            "video_token_id": tokenizer.convert_tokens_to_ids(ONEVISION_VIDEO_TOKEN),
            "pad_token_id": tokenizer.pad_token_id}
    if raw["model_type"] == "video_llava":
        vision = raw["vision_config"]
        processor = video_llava_processor(vision.get("image_size", 224))
        tokenizer = processor.tokenizer
        return processor, {"image_token_id": tokenizer.convert_tokens_to_ids(LLAVA_IMAGE_TOKEN),
                           "video_token_id": tokenizer.convert_tokens_to_ids(VIDEO_LLAVA_VIDEO_TOKEN),
                           "pad_token_id": tokenizer.pad_token_id}
    if raw["model_type"] == "llava":
        vision = raw["vision_config"]
        tokenizer = llava_tokenizer()
        processor = llava_processor(tokenizer, vision.get("image_size", 336), vision.get("patch_size", 14),
                                    select_strategy=raw.get("vision_feature_select_strategy", "default"))
        return processor, {"image_token_id": tokenizer.convert_tokens_to_ids(LLAVA_IMAGE_TOKEN),
                           "pad_token_id": tokenizer.pad_token_id}
    from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor

    tokenizer = qwen_tokenizer()
    try:
        processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil(), tokenizer=tokenizer,
                                     chat_template=tokenizer.chat_template)
    except (ImportError, AttributeError):  # it insists on a video processor, which needs torchvision
        from tokenbench.adapters.qwen2_vl import ProcessorParts

        processor = ProcessorParts(tokenizer, Qwen2VLImageProcessorPil())
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    return processor, {"image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
                       "vision_start_token_id": ids["<|vision_start|>"],
                       "vision_end_token_id": ids["<|vision_end|>"], "pad_token_id": tokenizer.pad_token_id}
