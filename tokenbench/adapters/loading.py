"""Loading a stock ``transformers`` VLM checkpoint and finding its stock rotary function."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tokenbench.adapters.base import AdapterError
from tokenbench.adapters.prefill import ATTENTION_IMPLEMENTATIONS


def load_checkpoint(path: str | Path, model_types: tuple[str, ...], dtype: torch.dtype, attn: str,
                    device: str | torch.device) -> torch.nn.Module:
    """``from_pretrained`` a VLM checkpoint after checking its ``model_type`` and ``attn``."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    if attn not in ATTENTION_IMPLEMENTATIONS:
        raise AdapterError(f"--attn {attn!r} is not supported; use one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in model_types:
        raise AdapterError(f"checkpoint {path} is a '{config.model_type}' model; this adapter handles "
                           f"{', '.join(model_types)}")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    return model.to(device).eval()


def rotary_of(layer: torch.nn.Module):
    """The stock ``apply_rotary_pos_emb`` of the module that defines ``layer``'s attention."""
    return sys.modules[type(layer.self_attn).__module__].apply_rotary_pos_emb
