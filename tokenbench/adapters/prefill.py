"""The staged prefill and the greedy decode that continues on its shortened KV cache.

One explicit loop over the stock decoder layer modules: embeddings go in, and before every layer
that starts an ``llm`` site the loop gathers the signals the method asked for, reduces the visual
span and splices the sequence (hidden states, position ids, padding mask) before calling the
layer. Layers keep their own KV-cache entries, so after an ``llm``-stage reduction the cache of
early layers is longer than that of later ones; decoding builds one mask and one set of rotary
tables per layer from that layer's own cache and position bookkeeping.

Position ids: ``[B, S]`` (RoPE) or ``[3, B, S]`` (M-RoPE). A surviving token keeps the position id
it had (policy ``original``) or the sequence is renumbered ``0..L'-1`` (policy ``contiguous``).
Tokens a method appends (``Reduction.extra``) take the position id of the last slot of the visual
span they replace, so the text after the image keeps its own positions; one placed between
surviving tokens (``Reduction.extra_after``) takes the position id of the token before it. A decode step at layer
``l`` uses ``1 + the largest position that layer saw`` plus the step: with ``original`` that is
the uncompressed next position (Qwen2-VL's ``rope_deltas`` arithmetic), with ``contiguous`` the
layer's own cache length (FastV's shifted decode positions).

Signals at a site before layer ``l``, with the default ``attention_source="previous"``:
``attention`` rows come from layer ``l-1`` (its keys are read from its KV-cache entry, its queries
recomputed for the selected rows only, see ``probe.py``); ``keys`` are layer ``l-1``'s head-mean
keys before the rotary embedding (rotation would make similarity depend on position); ``key_l1``
are the L1 norms of layer ``l-1``'s cached keys (after the rotary embedding, heads concatenated).
With ``attention_source="next"``, and for a site before layer 0, the same signals come from layer
``l``'s own input norm and projections of the hidden states entering it (its keys recomputed over
the whole sequence, as PyramidDrop scores). ``text`` holds the hidden states of the text after the
image entering layer ``l`` (the output of layer ``l-1``; the input embeddings at ``l = 0``);
``final_norm`` hands those rows and the visual ones through the model's final norm;
``input_states`` hands the decoder's input embeddings of the text and of every visual token that
entered the decoder. At batch > 1 the text rows are right-aligned with a ``text_valid`` mask.

Masks: with SDPA and no padding no mask is built at all (``is_causal``), so the fused kernels
(flash included) stay eligible; otherwise a boolean ``[B, 1, Q, K]`` mask for SDPA, an additive
float mask for eager, and the 2-D padding mask for ``flash_attention_2``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache

import torch
from torch import nn

from tokenbench.adapters.base import AdapterError, TokenTrace
from tokenbench.adapters.decode import CacheView, DecodeStage
from tokenbench.adapters.placement import execution_device
from tokenbench.adapters.probe import RotaryFn, decoder_attention_rows, head_mean_keys
from tokenbench.adapters.sites import (
    Applied,
    CropLayout,
    VisualBlock,
    anchored_source,
    newline_positions,
    run_site,
    visual_positions,
    with_newlines,
)
from tokenbench.compressor import LLM_STATE_SIGNALS, Site, Stage, TokenCompressor

ATTENTION_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "eager")
#: The signals the staged prefill serves at every ``llm`` site, whatever the family.
LLM_SITE_SIGNALS = frozenset({"attention", "keys", "text"}) | LLM_STATE_SIGNALS


@dataclass
class Decoder:
    """The stock modules of one family's language model that the loop drives."""

    embed: nn.Module
    layers: Sequence[nn.Module]
    norm: nn.Module
    lm_head: nn.Module
    rotary_emb: nn.Module  # rotary_emb(x, position_ids) -> (cos, sin)
    rotary: RotaryFn  # the family's apply_rotary_pos_emb(q, k, cos, sin)
    attn_impl: str


@dataclass
class TokenSequence:
    """A left-padded batch of prompts with one visual span per row.

    The visual span of row ``b`` is ``[visual_start[b], visual_start[b] + n_span)``; every row has
    the same ``n_span`` (reductions keep the same count per row), so rows stay aligned. The span
    holds ``n_visual`` visual tokens and ``n_newlines`` layout tokens (LLaVA-NeXT's
    ``image_newline``, marked in ``block``), which stay in the sequence but are never reduced.
    """

    hidden: torch.Tensor  # [B, S, D]
    positions: torch.Tensor  # [B, S] or [3, B, S]
    valid: torch.Tensor  # [B, S] bool, False on left padding
    visual_start: torch.Tensor  # [B] long
    block: VisualBlock  # origin / sizes of the visual span (tokens = current features)
    text_embeds: torch.Tensor | None = None  # [B, S, D] input embeddings, aligned (text signal)
    n_newlines: int = 0  # layout tokens inside the span

    @property
    def n_visual(self) -> int:
        return self.n_span - self.n_newlines

    @property
    def n_span(self) -> int:
        return self.block.origin.shape[1]

    def visual_index(self) -> torch.Tensor:
        """``[B, N]`` sequence index of each visual token (newline tokens skipped)."""
        if self.n_newlines:
            return self.visual_start[:, None] + visual_positions(self.block)
        return self.visual_start[:, None] + torch.arange(self.n_visual, device=self.hidden.device)

    def text_index(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[B, T]`` sequence index of the text after the image, right-aligned over the batch (the
        text ends every row), and ``[B, T]`` which entries are each row's text (``None``: all are)."""
        s = self.hidden.shape[1]
        text_start = self.visual_start + self.n_span
        length = s - int(text_start.min())
        index = torch.arange(s - length, s, device=self.hidden.device).expand(self.hidden.shape[0], -1)
        valid = index >= text_start[:, None]
        return index, None if bool(valid.all()) else valid

    def span_index(self) -> torch.Tensor:
        """``[B, n_span]`` sequence index of every token of the visual span."""
        return self.visual_start[:, None] + torch.arange(self.n_span, device=self.hidden.device)

    def text_after_image(self) -> torch.Tensor:
        """Input embeddings of the text that follows the image (one row; see ``batchable``)."""
        if self.hidden.shape[0] != 1 or self.text_embeds is None:
            raise AdapterError("text signals need batch size 1; the harness batches such methods by one")
        start = int(self.visual_start[0]) + self.n_span
        return self.text_embeds[:, start:]


def splice(seq: TokenSequence, applied: Applied, policy: str) -> TokenSequence:
    """Replace the visual span by ``applied.block`` (``applied.source`` maps new to old tokens)."""
    hidden, device = seq.hidden, seq.hidden.device
    s = hidden.shape[1]
    n, k = seq.n_span, applied.block.tokens.shape[1]
    new_len = s - n + k
    j = torch.arange(new_len, device=device)[None]
    start = seq.visual_start[:, None]
    in_visual = (j >= start) & (j < start + k)
    relative = (j - start).clamp(0, max(k - 1, 0))
    text_source = torch.where(j < start, j, j - k + n).clamp(0, s - 1)
    old_visual = anchored_source(applied.source, applied.block.origin).gather(1, relative) if k else relative
    visual_source = start + torch.where(old_visual >= 0, old_visual, n - 1)
    source = torch.where(in_visual, visual_source, text_source)  # [B, S'] index into the old sequence
    text_hidden = hidden.gather(1, text_source.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    if k:
        visual = applied.block.tokens.to(hidden.dtype)
        visual_hidden = visual.gather(1, relative.unsqueeze(-1).expand(-1, -1, visual.shape[-1]))
        new_hidden = torch.where(in_visual.unsqueeze(-1), visual_hidden, text_hidden)
    else:
        new_hidden = text_hidden
    valid = torch.where(in_visual, True, seq.valid.gather(1, text_source))
    if policy == "contiguous":
        positions = contiguous_positions(valid)
        if seq.positions.dim() == 3:
            positions = positions.expand(3, -1, -1)
    elif seq.positions.dim() == 3:
        positions = seq.positions.gather(2, source.expand(3, -1, -1))
    else:
        positions = seq.positions.gather(1, source)
    text_embeds = None
    if seq.text_embeds is not None:  # the text never moves relative to the sequence's end
        text_embeds = seq.text_embeds.gather(1, text_source.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    n_newlines = 0 if applied.block.line is None else newline_positions(applied.block).shape[1]
    return TokenSequence(new_hidden, positions, valid, seq.visual_start, applied.block, text_embeds, n_newlines)


def contiguous_positions(valid: torch.Tensor) -> torch.Tensor:
    """``0..L-1`` over the valid tokens of each row, 0 on padding (as HF ``generate`` does)."""
    return (valid.long().cumsum(-1) - 1).masked_fill(~valid, 0)


def prefill_mask(impl: str, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """Causal-and-padding mask for a prefill over ``valid`` [B, S] in the form ``impl`` expects."""
    if impl == "flash_attention_2":
        return None if bool(valid.all()) else valid.long()
    if impl == "sdpa" and bool(valid.all()):
        return None  # SDPA's is_causal path: no mask, fused kernels stay eligible
    s = valid.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=valid.device).tril()
    allowed = (causal[None] & valid[:, None, :]) | torch.eye(s, dtype=torch.bool, device=valid.device)
    return _as_impl(impl, allowed[:, None], dtype)


def decode_mask(impl: str, kv_valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Padding mask for one new query over a layer's cache ``kv_valid`` [B, K] (which has padding;
    a cache without any needs no mask)."""
    if impl == "flash_attention_2":
        return kv_valid.long()
    return _as_impl(impl, kv_valid[:, None, None, :], dtype)


def _as_impl(impl: str, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if impl == "eager":  # eager attention adds the mask to the logits
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    return allowed


@dataclass
class PrefillResult:
    """What decoding needs from the prefill, plus what tests inspect."""

    cache: object
    logits: torch.Tensor  # [B, V] at the last prompt token
    next_position: list[torch.Tensor]  # per layer, [B]: first decode position
    kv_valid: list[torch.Tensor]  # per layer, [B, K_l]
    layer_positions: list[torch.Tensor] = field(default_factory=list)  # positions fed to each layer
    # the visual tokens of the last layer's sequence: [B, V] sequence index and origin (decode stage)
    visual_index: torch.Tensor | None = None
    visual_origin: torch.Tensor | None = None


class StagedPrefill:
    """Runs the decoder layers over a :class:`TokenSequence`, reducing at ``llm`` sites."""

    def __init__(self, decoder: Decoder, compressor: TokenCompressor | None, llm_sites: dict[int, int],
                 grid: tuple[int, int], generator: torch.Generator | None, traces: list[TokenTrace],
                 position_policy: str, crops: CropLayout | None = None, frames: int = 1, *,
                 generators: list[torch.Generator] | None = None) -> None:
        self.decoder = decoder
        self.compressor = compressor
        self.sites = llm_sites
        self.grid = grid
        self.generator = generator
        self.generators = generators
        self.traces = traces
        self.policy = position_policy
        self.crops = crops
        self.frames = frames
        needs = compressor.needs if compressor is not None else frozenset()
        self.wants_probe = bool({"attention", "keys"} & set(needs)) and compressor.attention_source == "previous"
        self.input_visual: torch.Tensor | None = None  # the visual tokens entering layer 0

    def run(self, seq: TokenSequence) -> PrefillResult:
        from transformers import DynamicCache

        dec = self.decoder
        cache = DynamicCache()
        layer_count = len(dec.layers)
        bad = [layer for layer in self.sites if not 0 <= layer < layer_count]
        if bad:
            raise AdapterError(f"llm site at layer {bad[0]} is outside the decoder's 0..{layer_count - 1}")
        next_position, kv_valid, layer_positions = [], [], []
        cos_sin = dec.rotary_emb(seq.hidden, seq.positions)
        mask = prefill_mask(dec.attn_impl, seq.valid, seq.hidden.dtype)
        previous: tuple[int, torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.input_visual = _rows(seq.hidden, seq.visual_index())
        for index, layer in enumerate(dec.layers):
            if index in self.sites:
                seq = self._reduce(seq, index, self.sites[index], previous, cache, cos_sin)
                cos_sin = dec.rotary_emb(seq.hidden, seq.positions)
                mask = prefill_mask(dec.attn_impl, seq.valid, seq.hidden.dtype)
            self._record(seq)
            if self.wants_probe and index + 1 in self.sites:
                previous = (index, seq.hidden, cos_sin)
            layer_positions.append(seq.positions)
            seq.hidden = layer(seq.hidden, attention_mask=mask, position_embeddings=cos_sin,
                               **{cache_argument(type(layer)): cache}, use_cache=True, position_ids=None)
            next_position.append(_largest_position(seq) + 1)
            kv_valid.append(seq.valid)
        logits = dec.lm_head(dec.norm(seq.hidden[:, -1:]))[:, -1]
        visual_index = seq.visual_index()
        origin = seq.block.origin.gather(1, visual_index - seq.visual_start[:, None])
        return PrefillResult(cache, logits, next_position, kv_valid, layer_positions, visual_index, origin)

    def _record(self, seq: TokenSequence) -> None:
        totals = seq.valid.sum(dim=1).tolist()
        for trace, total in zip(self.traces, totals):
            trace.llm_visual.append(seq.n_visual)
            trace.llm_total.append(int(total))
            if self.decoder.attn_impl == "eager":
                trace.eager_attention_calls += 1

    def _reduce(self, seq: TokenSequence, index: int, keep: int,
                previous: tuple[int, torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None,
                cache: object, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> TokenSequence:
        assert self.compressor is not None
        needs = set(self.compressor.needs)
        signals: dict[str, torch.Tensor | None] = {}
        home = seq.valid.device  # under a device map the hidden states arrive from the last layer's device
        seq.hidden = seq.hidden.to(home)
        if {"attention", "keys", "key_l1"} & needs:
            signals.update(self._layer_signals(seq, index, previous, cache, cos_sin))
        visual_rows = seq.visual_index()
        if {"text", "final_norm", "input_states", "key_l1"} & needs:
            text_index, signals["text_valid"] = seq.text_index()
            if "key_l1" in needs:  # one norm per sequence token, split into visual and text rows
                every_token = signals.pop("key_l1")
                signals["key_l1"] = every_token.gather(1, visual_rows)
                signals["text_key_l1"] = every_token.gather(1, text_index)
            text = _rows(seq.hidden, text_index)
            if "text" in needs:
                signals["text"] = text
            if "final_norm" in needs:
                signals["normed_visual"] = self.decoder.norm(_rows(seq.hidden, visual_rows)).to(home)
                signals["normed_text"] = self.decoder.norm(text).to(home)
            if "input_states" in needs:
                if seq.text_embeds is None:
                    raise AdapterError("input_states needs the decoder's input embeddings of the text")
                signals["input_visual"] = self.input_visual
                signals["input_text"] = _rows(seq.text_embeds, text_index)
        site = Site(Stage.LLM, index)
        visual_at = visual_rows - seq.visual_start[:, None]
        block = VisualBlock(_rows(seq.hidden, visual_rows), seq.block.origin.gather(1, visual_at),
                            seq.block.sizes.gather(1, visual_at))
        applied = run_site(self.compressor, site, keep, block, self.grid, self.generator, self.crops,
                           frames=self.frames, generators=self.generators, **signals)
        if seq.n_newlines:
            span = VisualBlock(_rows(seq.hidden, seq.span_index()), seq.block.origin, seq.block.sizes,
                               seq.block.line)
            applied = with_newlines(applied, span, visual_at)
        return splice(seq, applied, self.policy)

    def _layer_signals(self, seq: TokenSequence, index: int,
                       previous: tuple[int, torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None,
                       cache: object, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``attention``, ``keys`` and key L1 norms of the layer ``attention_source`` names."""
        assert self.compressor is not None
        needs = self.compressor.needs
        if self.compressor.attention_source == "next" or index == 0:
            # layer ``index`` itself, on the hidden states entering it (a site before layer 0 has no
            # layer before it): its keys are recomputed over the whole sequence
            probe_layer, hidden_in, probe_cos_sin, keys = index, seq.hidden, cos_sin, None
        else:
            probe_layer, keys = index - 1, cache.layers[index - 1].keys
            hidden_in, probe_cos_sin = previous[1:] if previous is not None else (None, None)
        layer = self.decoder.layers[probe_layer]
        attn = layer.self_attn
        home, device = seq.valid.device, execution_device(layer)  # the probe runs where the layer's weights are
        if probe_cos_sin is not None:
            probe_cos_sin = (probe_cos_sin[0].to(device), probe_cos_sin[1].to(device))
        normed = layer.input_layernorm(hidden_in.to(device)) if hidden_in is not None else None
        signals: dict[str, torch.Tensor] = {}
        if "keys" in needs:
            visual_rows = _rows(normed, seq.visual_index().to(device))
            signals["keys"] = head_mean_keys(attn.k_proj, visual_rows, attn.head_dim).to(home)
        if keys is None:
            keys = _rotated_keys(attn, normed, probe_cos_sin, self.decoder.rotary)
            for trace, tokens in zip(self.traces, seq.valid.sum(dim=1).tolist()):
                trace.probe_key_tokens += int(tokens)
        if "attention" in needs:
            signals["attention"] = self._attention(seq, attn, normed, probe_cos_sin, keys).to(home)
        if "key_l1" in needs:  # [B, S], every token: the caller splits visual and text rows
            signals["key_l1"] = keys.float().abs().sum(dim=(1, 3)).to(home)
        return signals

    def _attention(self, seq: TokenSequence, attn: nn.Module, normed: torch.Tensor,
                   cos_sin: tuple[torch.Tensor, torch.Tensor], keys: torch.Tensor) -> torch.Tensor:
        assert self.compressor is not None
        device = normed.device
        rows = query_rows(seq, self.compressor.attention_queries).to(device)
        cos, sin = (_rows(t, rows) for t in cos_sin)
        s = seq.hidden.shape[1]
        allowed = (torch.arange(s, device=device)[None, None] <= rows[..., None]) & seq.valid.to(device)[:, None]
        probs = decoder_attention_rows(attn, _rows(normed, rows), cos, sin, keys, allowed, self.decoder.rotary)
        for trace in self.traces:
            if self.compressor.attention_queries == "all":
                trace.eager_attention_calls += 1  # a full map: the eager class, counted as such
            else:
                trace.probe_rows += rows.shape[1]
        return probs.gather(2, seq.visual_index().to(device)[:, None].expand(-1, rows.shape[1], -1))


def query_rows(seq: TokenSequence, queries: str) -> torch.Tensor:
    """``[B, Q]`` sequence indices of the attention query rows a method asked for."""
    b, s = seq.valid.shape
    device = seq.hidden.device
    if queries == "last":
        return torch.full((b, 1), s - 1, device=device)
    if queries == "all":
        return torch.arange(s, device=device).expand(b, s)
    if b != 1:
        raise AdapterError("attention_queries='text' needs batch size 1; the harness batches it by one")
    start = int(seq.visual_start[0]) + seq.n_span
    return torch.arange(start, s, device=device)[None]


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b]]`` for ``x`` [B, S, ...] and ``index`` [B, Q]."""
    expanded = index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return x.gather(1, expanded)


def _rotated_keys(attn: nn.Module, normed: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                  rotary: RotaryFn) -> torch.Tensor:
    b, s, _ = normed.shape
    keys = attn.k_proj(normed).view(b, s, -1, attn.head_dim).transpose(1, 2)
    keys, _ = rotary(keys, keys, *cos_sin)
    return keys


@cache
def cache_argument(layer_class: type) -> str:
    """The name under which this transformers version's decoder layer takes the KV cache: ``cache``
    since 5.24 (where ``past_key_values`` still works but warns it is deprecated), else
    ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(layer_class.forward).parameters else "past_key_values"


def _largest_position(seq: TokenSequence) -> torch.Tensor:
    positions = seq.positions if seq.positions.dim() == 2 else seq.positions.max(dim=0).values
    return positions.masked_fill(~seq.valid, -1).max(dim=1).values


def greedy_decode(decoder: Decoder, prefill: PrefillResult, max_new_tokens: int,
                  eos_ids: set[int], stage: DecodeStage | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens ``[B, T]`` and their logits ``[B, T, V]``; stops once every row hit EOS. With a
    decode ``stage`` (see ``decode.py``), layers from its site on attend the method's view of their
    cache at each step."""
    logits = prefill.logits
    tokens = logits.argmax(-1)
    out_tokens, out_logits = [tokens], [logits]
    kv_valid = list(prefill.kv_valid)
    # decoded tokens are always valid, so whether a layer's cache holds padding is fixed after the
    # prefill: one host sync per layer here instead of one per layer per step
    padded = [not bool(valid.all()) for valid in kv_valid]
    multimodal = prefill.layer_positions[0].dim() == 3
    finished = _is_eos(tokens, eos_ids)
    groups = [_group(prefill.next_position, index) for index in range(len(decoder.layers))]
    for step in range(max_new_tokens - 1):
        if bool(finished.all()):
            break
        hidden = decoder.embed(tokens[:, None])
        tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        attended: torch.Tensor | None = None  # [B, S'] cache entries the layers from the decode site attend
        probe_input = hidden  # the hidden state entering the layer below the decode site
        for index, layer in enumerate(decoder.layers):
            position = (prefill.next_position[index] + step)[:, None]
            if multimodal:
                position = position[None].expand(3, -1, -1)
            key = groups[index]
            if key not in tables:
                tables[key] = decoder.rotary_emb(hidden, position)
            if stage is not None and index == stage.layer:
                below = index - 1
                attended = stage.attend(step, decoder.layers[below], probe_input, tables[groups[below]],
                                        prefill.cache.layers[below].keys, kv_valid[below] if padded[below] else None,
                                        decoder.rotary)
            mask = None
            if padded[index]:
                kv_valid[index] = torch.cat([kv_valid[index], torch.ones_like(kv_valid[index][:, :1])], dim=1)
                valid = kv_valid[index] if attended is None else kv_valid[index].gather(
                    1, attended.to(kv_valid[index].device))  # a device map may put layers apart
                mask = decode_mask(decoder.attn_impl, valid, hidden.dtype)
            cache = prefill.cache if attended is None else CacheView(prefill.cache, attended)
            if stage is not None and index == stage.layer - 1:
                probe_input = hidden
            hidden = layer(hidden, attention_mask=mask, position_embeddings=tables[key],
                           **{cache_argument(type(layer)): cache}, use_cache=True, position_ids=None)
        logits = decoder.lm_head(decoder.norm(hidden))[:, -1]
        tokens = logits.argmax(-1)
        out_tokens.append(tokens)
        out_logits.append(logits)
        finished = finished | _is_eos(tokens, eos_ids)
    return torch.stack(out_tokens, dim=1), torch.stack(out_logits, dim=1)


def _group(next_position: list[torch.Tensor], index: int) -> int:
    """The first layer whose decode positions equal layer ``index``'s (shares rotary tables)."""
    for earlier in range(index):
        if torch.equal(next_position[earlier], next_position[index]):
            return earlier
    return index


def _is_eos(tokens: torch.Tensor, eos_ids: set[int]) -> torch.Tensor:
    if not eos_ids:
        return torch.zeros_like(tokens, dtype=torch.bool)
    return torch.isin(tokens, torch.tensor(sorted(eos_ids), device=tokens.device))
