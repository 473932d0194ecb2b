"""A straightforward LLaVA prefill for the in-LLM method tests: the stock decoder layers called one by
one on a single prompt with no cache, pruned in place by a policy written in the test.

``prefill_in_place(adapter, prompt, prune)`` embeds the prompt the stock way (image features scattered
into the placeholder embeddings), then before each layer calls ``prune(layer, state)``, which may
return a new :class:`LoopState`. Attention rows and keys are recomputed here from each layer's own
weights with plain tensor code, independent of the adapter's probe.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


@dataclass
class LoopState:
    """The sequence entering a layer: hidden [1, S, D], positions [1, S], the visual span, origins."""

    hidden: torch.Tensor
    positions: torch.Tensor
    start: int  # index of the first visual token
    origin: list[int]  # original grid index of each visual token (-1: appended)
    inputs: torch.Tensor  # [1, S0, D] the decoder's input embeddings (layer-0 states)
    start0: int  # the first visual token in ``inputs``
    n0: int  # visual tokens in ``inputs``

    @property
    def n(self) -> int:
        return len(self.origin)

    @property
    def text_rows(self) -> list[int]:
        return list(range(self.start + self.n, self.hidden.shape[1]))

    def keep_visual(self, kept: list[int], extra: torch.Tensor | None = None,
                    contiguous: bool = False) -> LoopState:
        """Keep visual tokens ``kept`` (indices into the span, ascending), append ``extra`` [E, D]."""
        h, p, s = self.hidden[0], self.positions[0], self.start
        visual = h[s:s + self.n][kept]
        vis_pos = p[s:s + self.n][kept]
        origin = [self.origin[i] for i in kept]
        if extra is not None and extra.shape[0]:
            visual = torch.cat([visual, extra.to(h)])
            vis_pos = torch.cat([vis_pos, p[s + self.n - 1].expand(extra.shape[0])])
            origin += [-1] * extra.shape[0]
        hidden = torch.cat([h[:s], visual, h[s + self.n:]])[None]
        positions = torch.cat([p[:s], vis_pos, p[s + self.n:]])[None]
        if contiguous:
            positions = torch.arange(hidden.shape[1])[None]
        return replace(self, hidden=hidden, positions=positions, origin=origin)


def llava_inputs(adapter, prompt) -> tuple[torch.Tensor, int, int]:
    """Stock LLaVA input embeddings [1, S, D] for one prompt, the visual span's start and length."""
    enc = adapter._encode([prompt])
    model = adapter.model.model
    ids = enc.input_ids
    embeds = model.get_input_embeddings()(ids)
    features = model.get_image_features(pixel_values=enc.image_inputs["pixel_values"],
                                        vision_feature_layer=adapter.model.config.vision_feature_layer,
                                        vision_feature_select_strategy="default")
    features = features.pooler_output if hasattr(features, "pooler_output") else features
    features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features
    image = ids[0] == enc.image_token_id
    embeds = embeds.clone()
    embeds[0, image] = features.reshape(-1, embeds.shape[-1]).to(embeds)
    start = int(image.int().argmax())
    return embeds, start, int(image.sum())


def layer_keys(layer, hidden: torch.Tensor, positions: torch.Tensor, rotary_emb) -> torch.Tensor:
    """A decoder layer's keys after the rotary embedding, [1, Hk, S, d], from its input ``hidden``."""
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden)
    keys = attn.k_proj(normed).view(1, hidden.shape[1], -1, attn.head_dim).transpose(1, 2)
    cos, sin = rotary_emb(hidden, positions)
    return apply_rotary_pos_emb(keys, keys, cos, sin)[0]


def attention_rows(layer, hidden: torch.Tensor, positions: torch.Tensor, rows: list[int],
                   rotary_emb) -> torch.Tensor:
    """Head-mean causal softmax attention [len(rows), S] of ``layer`` for query ``rows``."""
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden)
    s = hidden.shape[1]
    queries = attn.q_proj(normed).view(1, s, -1, attn.head_dim).transpose(1, 2)
    cos, sin = rotary_emb(hidden, positions)
    queries = apply_rotary_pos_emb(queries, queries, cos, sin)[0][:, :, rows]
    keys = layer_keys(layer, hidden, positions, rotary_emb)
    keys = keys.repeat_interleave(queries.shape[1] // keys.shape[1], dim=1)
    logits = queries @ keys.transpose(-1, -2) / math.sqrt(attn.head_dim)
    future = torch.arange(s)[None, :] > torch.tensor(rows)[:, None]
    logits = logits.masked_fill(future, float("-inf"))
    return logits.float().softmax(dim=-1).mean(dim=1)[0]


def prefill_in_place(adapter, prompt, prune: Callable[[int, LoopState, LoopState | None], LoopState | None],
                     ) -> tuple[torch.Tensor, list[LoopState]]:
    """Logits [V] at the last prompt token, and the state entering each layer.

    ``prune(layer, state, before)`` gets the state entering ``layer`` and the one that entered the
    layer before (``None`` at layer 0)."""
    lm = adapter.model.model.language_model
    embeds, start, n = llava_inputs(adapter, prompt)
    state = LoopState(embeds, torch.arange(embeds.shape[1])[None], start, list(range(n)), embeds, start, n)
    states: list[LoopState] = []
    with torch.no_grad():
        for index, layer in enumerate(lm.layers):
            state = prune(index, state, states[-1] if states else None) or state
            states.append(state)
            cos_sin = lm.rotary_emb(state.hidden, state.positions)
            hidden = layer(state.hidden, attention_mask=None, position_embeddings=cos_sin, position_ids=None)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            state = replace(state, hidden=hidden)
        logits = adapter.model.lm_head(lm.norm(state.hidden))[0, -1]
    return logits, states
