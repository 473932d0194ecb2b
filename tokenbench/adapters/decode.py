"""The decode stage (spec wave 2 §20 E10): at every decode step a method chooses which cached visual
KV entries the decoder layers from its site on attend (DyCoke's dynamic KV pruning).

A plan entry ``(Site(DECODE, L), keep)`` makes the greedy decode do, at each step after the first
generated token (whose logits come from the prefill):

1. layers ``0..L-1`` run as usual, over their whole cache;
2. before layer ``L``: the one-row probe of layer ``L-1``, the head-mean softmax attention of the
   step's query over that layer's cache (its keys read from the cache, its query recomputed from the
   layer's normed input, see ``probe.py``), restricted to the visual entries, goes to
   :meth:`~tokenbench.compressor.TokenCompressor.decode_view` with the state the method returned at
   the previous step; ``None`` at the first step of every generation, so no state crosses from one
   batch or sample to the next (the reference keeps it on a shared config and leaks it, §18.6
   quirk 3);
3. layers ``L..`` attend a per-step view of their cache: every text and layout entry (a frame's CLS,
   LLaVA-NeXT's newlines) plus the kept visual entries, **gathered** from the cache, which itself keeps
   every entry and grows (as in the reference, §18.3 step 3).

The gather goes through :class:`CacheView`, which stands in for the cache in those layers' calls:
the layer writes its new key and value into the real cache and attends the gathered copy, so the
attention kernel (SDPA, eager or FlashAttention) runs over the view only; the method is ``probe``
class (one query row per step beside the fused kernel, counted in ``TokenTrace.probe_rows``).
The visual entries must be the same in layers ``L-1..``: an ``llm`` site at layer ``L`` or later is
refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tokenbench.adapters.base import AdapterError, TokenTrace
from tokenbench.adapters.placement import execution_device
from tokenbench.adapters.probe import decoder_attention_rows
from tokenbench.compressor import DecodeInput, DecodeView, Site, Stage, TokenCompressor


class CacheView:
    """A decoder layer's view of the KV cache at one decode step: ``update`` stores the new entries in
    the real cache as usual and returns only the entries at ``index`` [B, S'] (sequence positions of
    the cache after the update). Anything else is the real cache's."""

    def __init__(self, cache: Any, index: torch.Tensor) -> None:
        self.cache = cache
        self.index = index

    def update(self, keys: torch.Tensor, values: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        keys, values = self.cache.update(keys, values, *args, **kwargs)
        index = self.index.to(keys.device)[:, None, :, None]
        return (keys.gather(2, index.expand(-1, keys.shape[1], -1, keys.shape[3])),
                values.gather(2, index.expand(-1, values.shape[1], -1, values.shape[3])))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cache, name)


@dataclass
class DecodeStage:
    """One generation's decode site: the method, where its visual entries lie in the cache, and the
    state it carries from step to step (fresh for every batch the adapter runs)."""

    compressor: TokenCompressor
    site: Site
    keep: int
    visual_index: torch.Tensor  # [B, V] cache position of each visual entry in layers >= L-1
    origin: torch.Tensor  # [B, V] their index in the original visual-token grid
    grid: tuple[int, int]
    frames: int
    traces: list[TokenTrace]
    state: Any = field(default=None, repr=False)

    @property
    def layer(self) -> int:
        return self.site.layer

    @classmethod
    def from_plan(cls, compressor: TokenCompressor | None, sites: list[tuple[Site, int]], layer_count: int,
                  visual_index: torch.Tensor, origin: torch.Tensor, grid: tuple[int, int], frames: int,
                  traces: list[TokenTrace]) -> DecodeStage | None:
        """The stage for ``sites``' ``decode`` entry, or None when the plan has none."""
        decode = [(site, keep) for site, keep in sites if site.stage is Stage.DECODE]
        if not decode or compressor is None:
            return None
        if len(decode) > 1:
            raise AdapterError(f"method '{compressor.name}' plans {len(decode)} decode sites; one at most")
        site, keep = decode[0]
        if not 1 <= site.layer < layer_count:
            raise AdapterError(f"decode site at layer {site.layer} must lie in 1..{layer_count - 1} (the view is "
                               f"chosen from layer {site.layer - 1}'s attention)")
        late = [s.layer for s, _ in sites if s.stage is Stage.LLM and s.layer >= site.layer]
        if late:
            raise AdapterError(f"an llm site at layer {late[0]} changes the visual entries after the decode "
                               f"site at layer {site.layer}; put llm sites before it")
        for trace in traces:
            trace.decode_layer, trace.decode_cached_visual = site.layer, int(visual_index.shape[1])
        return cls(compressor, site, keep, visual_index, origin, grid, frames, traces)

    def attend(self, step: int, layer: torch.nn.Module, hidden: torch.Tensor,
               cos_sin: tuple[torch.Tensor, torch.Tensor], keys: torch.Tensor, valid: torch.Tensor | None,
               rotary: Any) -> torch.Tensor:
        """``[B, S']`` cache positions layers >= L attend at this step, from layer L-1 (``layer``),
        the hidden state ``hidden`` [B, 1, D] that entered it, its rotary tables, its cached keys
        [B, Hk, S, d] (this step's included) and its padding ``valid`` [B, S] (None: no padding).
        The probe runs only for a method that declares ``decode_attention``."""
        device = execution_device(layer)
        batch, length = keys.shape[0], keys.shape[2]
        visual_index = self.visual_index.to(device)
        attention = None
        if "decode_attention" in self.compressor.site_needs(self.site):
            normed = layer.input_layernorm(hidden.to(device))
            allowed = (torch.ones(batch, 1, length, dtype=torch.bool, device=device) if valid is None
                       else valid.to(device)[:, None])
            cos, sin = (t.to(device) for t in cos_sin)
            probs = decoder_attention_rows(layer.self_attn, normed, cos, sin, keys.to(device), allowed, rotary)
            attention = probs[:, 0].gather(1, visual_index)
            for trace in self.traces:
                trace.probe_rows += 1
        x = DecodeInput(attention, self.origin, self.grid, self.keep, self.site, step, self.frames)
        view = self.compressor.decode_view(x, self.state)
        if not isinstance(view, DecodeView):
            raise TypeError(f"method '{self.compressor.name}': decode_view must return a DecodeView")
        view.check(x)
        self.state = view.state
        for trace in self.traces:
            trace.decode_visual.append(int(view.keep.shape[1]))
        chosen = torch.zeros_like(visual_index, dtype=torch.bool).scatter_(1, view.keep.to(device), True)
        attended = torch.ones(batch, length, dtype=torch.bool, device=device).scatter_(1, visual_index, chosen)
        return attended.nonzero()[:, 1].view(batch, -1)
