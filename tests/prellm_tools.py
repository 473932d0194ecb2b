"""Shared inputs for the pre-LLM CLS-attention methods' tests (visionzip, fastervlm, vispruner):
LLaVA-1.5-shaped (576 CLIP patches of 1024 dims, 24×24, CLS attention, 64-d keys, a CLS token) and
Qwen2-VL-shaped (432 merged tokens of 1536 dims, 18×24, received attention, no keys) site inputs."""

from __future__ import annotations

import dataclasses

import torch

from tokenbench import Site, SiteInput, Stage
from tokenbench.adapters.llava import LlavaAdapter
from tokenbench.adapters.qwen2_vl import Qwen2VLAdapter
from tokenbench.testing import LLAVA_15, QWEN2_VL

LLAVA_SERVED = dataclasses.replace(LLAVA_15, signals=LlavaAdapter.served_signals)
QWEN_SERVED = dataclasses.replace(QWEN2_VL, signals=Qwen2VLAdapter.served_signals)


def llava_input(batch: int, keep: int, seed: int = 0, dims: int = 1024) -> SiteInput:
    g = torch.Generator().manual_seed(seed)
    n = 576
    return SiteInput(visual=torch.randn(batch, n, dims, generator=g), origin=torch.arange(n).expand(batch, n),
                     grid=(24, 24), keep=keep, site=Site(Stage.VISION_OUT), sizes=torch.ones(batch, n),
                     cls_attention=torch.randn(batch, n, generator=g).softmax(dim=1),
                     keys=torch.randn(batch, n, 64, generator=g),
                     cls_token=torch.randn(batch, 1, dims, generator=g))


def qwen_input(batch: int, keep: int, seed: int = 0, dims: int = 1536) -> SiteInput:
    g = torch.Generator().manual_seed(seed)
    n = 432
    return SiteInput(visual=torch.randn(batch, n, dims, generator=g), origin=torch.arange(n).expand(batch, n),
                     grid=(18, 24), keep=keep, site=Site(Stage.PROJECTOR), sizes=torch.ones(batch, n),
                     attention_received=torch.randn(batch, n, generator=g).softmax(dim=1))


def scores_of(x: SiteInput) -> torch.Tensor:
    return x.cls_attention if x.cls_attention is not None else x.attention_received


def ranked(score: list[float]) -> list[int]:
    """Indices by descending score, lower index first on ties (the spec's order)."""
    return sorted(range(len(score)), key=lambda i: (-score[i], i))
