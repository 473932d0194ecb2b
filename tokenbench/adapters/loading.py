"""Loading a stock ``transformers`` VLM checkpoint and finding its stock rotary function."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from tokenbench.adapters.base import AdapterError
from tokenbench.adapters.placement import Placement
from tokenbench.adapters.prefill import ATTENTION_IMPLEMENTATIONS


def check_attention(attn: str) -> None:
    """Raise ``AdapterError`` for an attention implementation this machine cannot run."""
    if attn not in ATTENTION_IMPLEMENTATIONS:
        raise AdapterError(f"--attn {attn!r} is not supported; use one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")
    if attn == "flash_attention_2" and (importlib.util.find_spec("flash_attn") is None
                                        or not torch.cuda.is_available()):
        raise AdapterError("--attn flash_attention_2 needs the flash-attn package (pip install "
                           "'tokenbench[flash]') and a CUDA device; use --attn sdpa")


def load_checkpoint(path: str | Path, model_types: tuple[str, ...], dtype: torch.dtype, attn: str,
                    device: str | torch.device | Placement) -> torch.nn.Module:
    """``from_pretrained`` a VLM checkpoint after checking its ``model_type`` and ``attn``; a
    :class:`Placement` spreads it over devices with accelerate's big-model loading."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    check_attention(attn)
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in model_types:
        raise AdapterError(f"checkpoint {path} is a '{config.model_type}' model; this adapter handles "
                           f"{', '.join(model_types)}")
    if isinstance(device, Placement):
        return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=attn,
                                                           **device.from_pretrained_kwargs()).eval()
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    return model.to(device).eval()


def rotary_of(layer: torch.nn.Module):
    """The stock ``apply_rotary_pos_emb`` of the module that defines ``layer``'s attention."""
    return sys.modules[type(layer.self_attn).__module__].apply_rotary_pos_emb
