"""DART (Wen et al., EMNLP 2025, arXiv 2502.11494): prune visual tokens by duplication, not importance.

Reproduces ZichenWen1/DART (``llava/model/language_model/modeling_llama_self.py``, read at upstream
commit 5a19452) as described in ``spec/methods-wave2.md`` §12. Before decoder layer K (2 of 32,
scaled), on the hidden states that layers 0..K-1 produced:

1. **Pivots**: the ``pivot_image`` (4) visual tokens and the ``pivot_text`` (4) text tokens after the
   image whose keys in layer K-1 have the largest L1 norm (keys after the rotary embedding, heads
   concatenated, as the KV cache holds them: signal ``key_l1``).
2. **Similarity space**: the hidden states entering layer K passed through the model's **final** norm
   (signal ``final_norm``), compared by cosine.
3. For each pivot in turn, the remaining candidate visual tokens (every visual token but the image
   pivots) with the **lowest** cosine to it are picked and leave the candidate pool.
4. Kept = image pivots ∪ picks, in their original order, with their **original position ids**
   (``positions = "original"``). Text pivots only pick; they are never dropped or kept by DART.

No attention weights are needed: the FlashAttention class is ``native``.

Budget (``budget_mode``):

- ``layer_average`` (default, tokenbench's unit, like ``fastv``): the count kept after K is
  k = (B·L − K·N)/(L − K), rounded, so the layer average meets the budget within half a token. The
  k − ``pivot_image`` picks are shared by the pivots: each gets ⌊picks/P⌋, and the first picks mod P
  pivots in rank order one more (a deviation: the reference gives every pivot the same quota).
  Infeasible when k < ``pivot_image`` + P (fewer than one pick per pivot), P = number of pivots.
- ``after_k`` (the reference's convention): quota t = ⌊B/P⌋ per pivot, so 4 + 8t tokens survive layer
  K (196 / 132 / 68 for "192" / "128" / "64" on LLaVA-1.5); layers < K still see all N tokens, so the
  layer average is above the budget (the run's realised token count shows it).

Deviations from the reference code: pivots are processed in **rank order** (image pivots by norm,
then text pivots by norm) instead of Python-set iteration order, which depends on the token indices'
hash layout and carries no meaning (spec §12.5-1; the set order is not offered); each batch element
gets its own pivots and picks (the reference asserts batch 1), with text rows of different lengths
masked; the image span is whatever the adapter reports; with fewer text tokens than ``pivot_text``,
every text token is a pivot; on grouped-query models the L1 norm runs over the cached (shared) key
heads, which ranks the tokens as the repeated heads would.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

import tokenbench
from tokenbench import Infeasible, ModelInfo, Reduction, Site, SiteInput, Stage, TokenCompressor


def dart_keep_after_k(n_visual: int, budget: float, llm_layers: int, k_layer: int, pivot_image: int,
                      pivots: int) -> int:
    """Tokens kept after layer K so that the layer average over all layers is ``budget``."""
    after = llm_layers - k_layer
    keep = round((budget * llm_layers - k_layer * n_visual) / after)
    lowest = pivot_image + pivots
    if keep < lowest:
        floor = (k_layer * n_visual + after * lowest) / llm_layers
        raise Infeasible(f"DART keeps all {n_visual} tokens in layers 0..{k_layer - 1} and at least "
                         f"{lowest} after (its {pivot_image} image pivots plus one pick per pivot), so the "
                         f"layer average cannot go below {floor:.1f} (asked {budget:g}); use fewer pivots "
                         f"(pivot_image, pivot_text) or budget_mode=after_k")
    return min(keep, n_visual)


def pivot_quotas(picks: int, valid_pivots: torch.Tensor) -> torch.Tensor:
    """``[B, P]`` picks per pivot slot: ⌊picks/P_b⌋ each, one more for the first picks mod P_b valid
    slots in rank order, 0 for invalid slots (``valid_pivots`` [B, P] bool, valid slots first)."""
    count = valid_pivots.sum(dim=1, keepdim=True).clamp(min=1)
    rank = torch.arange(valid_pivots.shape[1], device=valid_pivots.device)[None]
    quota = picks // count + (rank < picks % count).long()
    return torch.where(valid_pivots, quota, torch.zeros_like(quota))


def cosine_rows(pivot: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` cosine similarity of ``pivot`` [B, D] with each of ``tokens`` [B, N, D]."""
    pivot = torch.nn.functional.normalize(pivot.float(), dim=-1)
    return (torch.nn.functional.normalize(tokens.float(), dim=-1) @ pivot[..., None]).squeeze(-1)


class DART(TokenCompressor):
    """Keep the visual tokens least similar to a few high-key-norm pivots, after layer K."""

    name = "dart"
    stages = (Stage.LLM,)
    needs = frozenset({"key_l1", "final_norm"})
    positions = "original"
    paper = "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More " \
            "(EMNLP 2025)"
    source = "https://github.com/ZichenWen1/DART"

    class Options(TokenCompressor.Options):
        k_layer: int = Field(2, ge=1, le=31, description="prune before this layer of 32 (scaled)")
        pivot_image: int = Field(4, ge=1, description="image pivots (largest key L1 norm), always kept")
        pivot_text: int = Field(4, ge=0, description="text pivots (largest key L1 norm after the image)")
        budget_mode: Literal["layer_average", "after_k"] = "layer_average"

    @property
    def pivots(self) -> int:
        return self.options.pivot_image + self.options.pivot_text

    def schedule(self, n_visual: int, budget: float, info: ModelInfo) -> list[tuple[Site, int]]:
        if Stage.LLM not in info.stages:
            raise Infeasible(f"the {info.family} adapter offers no llm stage, which DART needs")
        k_layer = info.scale_layer(self.options.k_layer)
        if self.options.budget_mode == "after_k":
            per_pivot = int(budget // self.pivots)
            if per_pivot < 1:
                raise Infeasible(f"budget {budget:g} gives no pick to each of the {self.pivots} pivots")
            keep = min(self.options.pivot_image + self.pivots * per_pivot, n_visual)
        else:
            keep = dart_keep_after_k(n_visual, budget, info.llm_layers, k_layer, self.options.pivot_image,
                                     self.pivots)
        if keep >= n_visual:
            return []
        return [(Site(Stage.LLM, k_layer), keep)]

    def reduce(self, x: SiteInput) -> Reduction:
        for field in ("key_l1", "text_key_l1", "normed_visual", "normed_text"):
            if getattr(x, field) is None:
                raise ValueError(f"DART needs the {field} signal; the adapter did not provide it")
        b, n, _ = x.visual.shape
        device = x.visual.device
        keep = min(x.keep, n)
        if keep >= n:
            return Reduction.keep_all(x)
        image_pivots = min(self.options.pivot_image, keep)
        image_rank = x.key_l1.float().topk(image_pivots, dim=1).indices  # [B, Pi], by norm
        text_norms = x.text_key_l1.float()
        if x.text_valid is not None:
            text_norms = text_norms.masked_fill(~x.text_valid, float("-inf"))
        text_pivots = min(self.options.pivot_text, text_norms.shape[1])
        text_top = text_norms.topk(text_pivots, dim=1)  # [B, Pt]; padding ranks last
        d = x.normed_visual.shape[-1]
        pivot_states = torch.cat([
            x.normed_visual.gather(1, image_rank[..., None].expand(-1, -1, d)),
            x.normed_text.gather(1, text_top.indices[..., None].expand(-1, -1, d))], dim=1)
        valid = torch.cat([torch.ones_like(image_rank, dtype=torch.bool), text_top.values > float("-inf")],
                          dim=1)
        quotas = pivot_quotas(keep - image_pivots, valid)  # [B, P]
        kept = torch.zeros(b, n, dtype=torch.bool, device=device).scatter_(1, image_rank, True)
        taken = kept.clone()  # no longer a candidate
        for slot in range(pivot_states.shape[1]):  # a handful of pivots, each picks a batch of tokens
            most = int(quotas[:, slot].max())
            if most == 0:
                continue
            similarity = cosine_rows(pivot_states[:, slot], x.normed_visual).masked_fill(taken, float("inf"))
            picked = similarity.topk(most, dim=1, largest=False).indices  # lowest cosine first
            wanted = torch.arange(most, device=device)[None] < quotas[:, slot, None]
            kept.scatter_(1, picked, wanted | kept.gather(1, picked))
            taken = taken | kept
        order = torch.arange(n, device=device).expand(b, n)
        return Reduction(order[kept].view(b, keep))


@tokenbench.hookimpl
def register_compressors(register):
    register(DART)
