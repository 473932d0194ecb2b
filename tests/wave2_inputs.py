"""Inputs shaped like the references' for the wave-2 pre-LLM methods (DivPrune, CDPruner, PruMerge+).

Tokens are clustered, as real visual tokens are (flat regions, repeated textures): random cluster
centres plus a shared component and per-token noise, so that diversity and similarity matter.
"""

from __future__ import annotations

import torch

# (tokens, grid, feature width): LLaVA-1.5-7B after the projector / at the CLIP output, Qwen2-VL-2B
LLAVA_PROJECTED = (576, (24, 24), 4096)
LLAVA_CLIP = (576, (24, 24), 1024)
QWEN_PROJECTED = (432, (18, 24), 1536)


def clustered_tokens(batch: int, n: int, width: int, seed: int, clusters: int = 24) -> torch.Tensor:
    """[batch, n, width] fp32 tokens: shared direction + one of ``clusters`` centres + noise."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(batch, 1, width, generator=g)
    centres = torch.randn(batch, clusters, width, generator=g)
    assign = torch.randint(0, clusters, (batch, n), generator=g)
    picked = centres.gather(1, assign.unsqueeze(-1).expand(-1, -1, width))
    return shared + picked + 0.6 * torch.randn(batch, n, width, generator=g)


def cls_row(batch: int, n: int, seed: int) -> torch.Tensor:
    """A peaked CLS attention row [batch, n] (softmax over CLS + n patches, CLS column dropped)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, n + 1, generator=g)
    spikes = torch.rand(batch, n + 1, generator=g) < 0.05
    return (logits + 6 * spikes).softmax(dim=-1)[:, 1:]
