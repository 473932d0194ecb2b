"""Attention probes computed beside the fused attention kernel.

A method that asks for ``attention`` gets a few query rows of a layer's softmax attention. The
layer itself runs with whatever kernel the model was loaded with (SDPA, FlashAttention); the probe
recomputes only the selected query rows from that layer's normed input and reuses the layer's keys,
so the cost is ``Q × N`` scores instead of ``N × N``, and nothing switches to eager attention.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

RotaryFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def head_mean_probs(queries: torch.Tensor, keys: torch.Tensor, scale: float,
                    allowed: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention ``[B, Q, S]`` averaged over heads.

    ``queries`` [B, H, Q, d], ``keys`` [B, Hk, S, d] (grouped-query keys are repeated to H heads),
    ``allowed`` [B, Q, S] bool (False = masked), ``bias`` [B, 1|Q, S] additive logits.
    Computed in float32 so the probe does not depend on the model dtype's rounding.
    """
    heads, kv_heads = queries.shape[1], keys.shape[1]
    if kv_heads != heads:
        keys = keys.repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.matmul(queries.float(), keys.float().transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.float().unsqueeze(1)
    if allowed is not None:
        scores = scores.masked_fill(~allowed.unsqueeze(1), torch.finfo(scores.dtype).min)
    return scores.softmax(dim=-1).mean(dim=1)


def decoder_attention_rows(attn: torch.nn.Module, normed_rows: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor,
                           rotary: RotaryFn) -> torch.Tensor:
    """Head-mean attention of a decoder layer for selected query rows.

    ``normed_rows`` [B, Q, D] is the layer's ``input_layernorm`` output at the query rows, ``cos`` /
    ``sin`` [B, Q, d] their rotary tables, ``keys`` [B, Hk, S, d] the layer's rotated keys (its
    KV-cache entry), ``allowed`` [B, Q, S] the causal-and-padding mask of those rows.
    """
    b, q, _ = normed_rows.shape
    queries = attn.q_proj(normed_rows).view(b, q, -1, attn.head_dim).transpose(1, 2)
    queries, _ = rotary(queries, queries, cos, sin)
    return head_mean_probs(queries, keys, attn.scaling, allowed)


def head_mean_keys(k_proj: torch.nn.Module, normed: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Head-mean attention keys ``[B, N, d]`` (before any rotary embedding) of ``normed`` [B, N, D]."""
    b, n, _ = normed.shape
    return k_proj(normed).view(b, n, -1, head_dim).mean(dim=2)


def head_mean_received(queries: torch.Tensor, keys: torch.Tensor, scale: float, bias: torch.Tensor | None = None,
                       max_scores: int = 1 << 24) -> torch.Tensor:
    """Attention each key receives, averaged over heads and over every query row: ``[B, S]``.

    ``queries`` [B, H, Q, d], ``keys`` [B, H, S, d], ``bias`` [B, 1, S] additive logits. The
    softmax rows are computed ``max_scores // (B·H·S)`` queries at a time and summed column-wise,
    so at most that many scores exist at once (never the full ``Q × S`` map); float32.
    """
    b, h, q, _ = queries.shape
    s = keys.shape[2]
    keys = keys.float().transpose(-1, -2)
    chunk = max(1, max_scores // max(b * h * s, 1))
    received = queries.new_zeros(b, h, s, dtype=torch.float32)
    for start in range(0, q, chunk):
        scores = torch.matmul(queries[:, :, start:start + chunk].float(), keys) * scale
        if bias is not None:
            scores = scores + bias.float().unsqueeze(1)
        received += scores.softmax(dim=-1).sum(dim=2)
    return received.mean(dim=1) / q
