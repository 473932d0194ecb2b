"""FastV (Chen et al., ECCV 2024, arXiv 2403.06764): drop the visual tokens that receive the least
attention after decoder layer K.

Reproduces the reference code path (pkunlp-icler/FastV, ``modeling_llama.py`` inplace variant): the
head-mean attention probabilities that layer K-1 assigns from the **last prompt token** to each
visual token rank the tokens; the top ``keep`` survive for layers K..L-1, in their original order,
with their **original position ids** (gaps kept). Layers 0..K-1 see every token.

Defaults: K = 2 of 32 layers, scaled to the model's depth (``ModelInfo.scale_layer``); scores from
the last prompt token (FlashAttention class ``probe``: the adapter recomputes one attention row
beside the fused kernel).

Options:

- ``k_layer`` (2): K on a 32-layer reference LLM.
- ``score``: ``last_token`` (reference code) or ``all_queries``, the paper's φ_i = mean over every
  query row of the attention received by token i; that needs the full map (class ``eager``).
- ``budget_mode``: ``layer_average`` (default, tokenbench's budget unit): the count kept after K is
  (budget·L − K·N)/(L − K), rounded, so the layer-averaged visual count is the budget within half a
  token; ``after_k``: keep = budget after K, the convention most published tables used (layers < K
  still process N tokens, so the layer average is above the budget; results label which ran).

Deviations from the reference code: the kept set is computed once in prefill and the KV cache is
reused while decoding (the reference inplace variant re-prunes every step without a cache; the
llava-hf KV-cache variant does what we do); every batch element is ranked by its own attention
row (the reference ranks batch element 0 only); the image span is whatever the adapter reports
(no hard-coded system-prompt length).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

import tokenbench
from tokenbench import Infeasible, ModelInfo, Reduction, Site, SiteInput, Stage, TokenCompressor


def fastv_keep_after_k(n_visual: int, budget: float, llm_layers: int, k_layer: int) -> int:
    """Visual tokens to keep after layer K so that the layer average over all layers is ``budget``."""
    after = llm_layers - k_layer
    keep = max(1, round((budget * llm_layers - k_layer * n_visual) / after))
    floor = (k_layer * n_visual + after) / llm_layers  # the average when one token survives
    if keep == 1 and floor - budget > 1:
        raise Infeasible(f"FastV keeps all {n_visual} tokens in layers 0..{k_layer - 1}, so the "
                         f"layer-averaged budget cannot go below {floor:.1f} (asked {budget:g}); "
                         f"use budget_mode=after_k or a smaller k_layer")
    return min(keep, n_visual)


class FastV(TokenCompressor):
    """Keep the visual tokens that the last prompt token attends to most, after layer K."""

    name = "fastv"
    stages = (Stage.LLM,)
    needs = frozenset({"attention"})
    attention_queries = "last"
    positions = "original"
    paper = "FastV: An Image is Worth 1/2 Tokens After Layer 2 (ECCV 2024)"
    source = "https://github.com/pkunlp-icler/FastV"

    class Options(TokenCompressor.Options):
        k_layer: int = Field(2, ge=1, le=31, description="prune after this many layers of 32 (scaled)")
        score: Literal["last_token", "all_queries"] = "last_token"
        budget_mode: Literal["layer_average", "after_k"] = "layer_average"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.options.score == "all_queries":
            self.attention_queries = "all"

    def schedule(self, n_visual: int, budget: float, info: ModelInfo) -> list[tuple[Site, int]]:
        if Stage.LLM not in info.stages:
            raise Infeasible(f"the {info.family} adapter offers no llm stage, which FastV needs")
        k_layer = info.scale_layer(self.options.k_layer)
        if self.options.budget_mode == "after_k":
            keep = round(budget)
            if keep < 1:
                raise Infeasible(f"budget {budget:g} keeps no visual token")
            keep = min(keep, n_visual)
        else:
            keep = fastv_keep_after_k(n_visual, budget, info.llm_layers, k_layer)
        if keep >= n_visual:
            return []
        return [(Site(Stage.LLM, k_layer), keep)]

    def reduce(self, x: SiteInput) -> Reduction:
        if x.attention is None:
            raise ValueError("FastV needs the attention signal; the adapter did not provide it")
        scores = x.attention.float().mean(dim=1)  # [B, N]: mean over the requested query rows
        keep = min(x.keep, scores.shape[1])
        chosen = scores.topk(keep, dim=1).indices.sort(dim=1).values
        return Reduction(chosen)


@tokenbench.hookimpl
def register_compressors(register):
    register(FastV)
