"""PruMerge+ (Shang et al., arXiv 2403.15388, ICCV 2025): CLS-attention outliers plus spatial samples,
with the pruned tokens merged into the kept ones.

On the selected CLIP layer's patch features X (``vision_out``), with the CLS attention row a and the
patch keys K of the CLIP block **after** the selected one, run on X (spec ``methods-wave2.md`` §19,
contract extension E2; the reference takes them from hooks on block 23 of 24):

1. a = softmax(q_CLS·Kᵀ/√width) over the heads' **concatenated** q and k (a single-head
   approximation of the block's attention, ``heads=concat``), CLS column dropped;
2. ``mode=adaptive`` (the reference): the share ρ of entries of a above Q3 + 1.5·IQR (quantiles with
   linear interpolation, over the whole batch) gives t = ⌊N·ρ⌋ top-attention tokens, in descending
   attention, then the uniform samples ``range(0, N − 1, ⌊⌊1/ρ⌋/3⌋)`` not already kept (the reference
   writes N − 1 as 575). The count depends on the image, not on the budget;
   ``mode=budget`` (a deviation, close to the reference's non-adaptive branch): ``keep`` tokens, of
   which t = round(``topk_share``·keep) top-attention ones and keep − t samples spread evenly over the
   remaining tokens in raster order (``topk_share`` 0.25 is the adaptive mix at its typical count:
   about 32 outliers and 90 samples of 576);
3. merge: each kept token i becomes x_i + Σ_j a_j·x_j over its ``neighbours`` (32) most
   key-cosine-similar tokens among all other tokens, kept or not; the weights are not normalised
   (the reference comments the division out);
4. one extra token Σ_j a_j·x_j over the pruned tokens is appended.

Budget: ``mode=budget`` keeps round(B) − 1 tokens plus the extra token, so B tokens enter the LLM
(``extra_token=false``: round(B), no extra token). ``mode=adaptive`` cannot promise a count: its
plan keeps up to N (``adaptive_count``), the run records what it realised, over or under the
budget, and it runs one image at a time. ``prumerge-plus-adaptive`` is this method with
``mode=adaptive``, so its results are labelled as such. FlashAttention class ``probe`` (one CLS
query row of the next block). LLaVA and Video-LLaVA: the Qwen encoders have no CLS token.

Videos (Video-LLaVA) are read as one image of F·h·w frame-major tokens: the adapter computes each
frame's CLS row over its own patches (each sums to just under 1, so the rows are comparable), and
the method then ranks, counts and samples over all frames at once. The top tokens may crowd into a
few frames; the IQR count (``adaptive``) is taken over every frame's entries together; the samples
are a stride over the flat frame-major order, not a per-frame grid; the 32 key-nearest neighbours
may come from other frames; and the extra token sums the attention of all frames' pruned tokens,
a weight of up to about F where an image's is below 1. No per-frame variant is implemented.

Reference quirks (42Shawn/LLaVA-PruMerge @097c041) and what is done here:

- The IQR count is taken over the whole batch flattened, and uniform samples are dropped when any
  image of the batch keeps them; kept (the adapter runs ``mode=adaptive`` one image at a time, so
  every image gets its own count).
- No outlier (flat attention) gives ρ = 0 and a division by zero; here ρ = 1/N (t = 1) then, and at
  least one top token is kept when N·ρ < 1 (possible only over a batch).
- ⌊⌊1/ρ⌋/3⌋ is 0 when ρ > 1/3 (an arange of step 0 raises); here the step is at least 1.
- Fewer than 33 tokens make the top-32 neighbour search fail; here ``neighbours`` ≤ N − 1.
- Output order: the reference feeds the LLM the top-k tokens by descending attention, then the
  samples, then the extra token. Here the kept tokens keep raster order (the contract's order) and
  the extra token follows; ``order=reference`` reproduces the reference's order (all tokens are then
  returned as appended tokens, which keeps their order but loses their grid origin).
- ``heads=mean`` uses the true head-mean attention and head-mean keys instead of the single-head
  approximation (a deviation, off by default).
- ``attention_block=selected`` (a deviation, off by default) takes the head-mean CLS attention and
  keys of the selected block itself (the ``cls_attention`` and ``keys`` signals), for encoders whose
  block after the selected one is untrained or absent. The embedded default ``tiny-llava-shapes`` is
  such a model: LLaVA never uses its last CLIP block, so training left it at its initialisation and
  the reference's signals there are those of random weights.
- Python loops over tokens and batch rows are vectorised; ties among equally similar neighbours may
  pick other members of the tie (their weighted sum differs only if their features do).

Degenerate inputs: ``keep >= N`` keeps every token unmerged; ``keep == 1`` keeps the top token
(merged) plus the extra token; identical tokens are handled (ties by lowest index); NaN or infinite
input raises ``ValueError``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from tokenbench.methods.divprune import check_finite

import tokenbench
from tokenbench import Infeasible, ModelInfo, Reduction, Site, SiteInput, Stage, TokenCompressor

Mode = Literal["budget", "adaptive"]


def outlier_share(attention: torch.Tensor) -> float:
    """The share ρ of ``attention`` [B, N] entries above Q3 + 1.5·IQR, over the whole batch
    (quantiles by linear interpolation, in float64 like NumPy's percentile)."""
    flat = attention.double().flatten()
    q1, q3 = torch.quantile(flat, torch.tensor([0.25, 0.75], dtype=flat.dtype, device=flat.device)).tolist()
    return int((flat > q3 + 1.5 * (q3 - q1)).sum()) / flat.numel()


def adaptive_selection(attention: torch.Tensor) -> torch.Tensor:
    """The reference's adaptive picks [B, K] in its order: the ⌊N·ρ⌋ top-attention tokens (descending),
    then the uniform samples ``range(0, N − 1, ⌊⌊1/ρ⌋/3⌋)`` that none of the batch's top tokens took."""
    n = attention.shape[1]
    ratio = outlier_share(attention) or 1 / n
    top = attention.float().topk(max(int(n * ratio), 1), dim=1).indices
    samples = torch.arange(0, n - 1, max(int(int(1 / ratio) / 3), 1), device=attention.device)
    taken = torch.zeros(n, dtype=torch.bool, device=attention.device)
    taken[top.flatten()] = True
    samples = samples[~taken[samples]]
    return torch.cat([top, samples.expand(attention.shape[0], -1)], dim=1)


def budget_selection(attention: torch.Tensor, keep: int, topk_share: float) -> torch.Tensor:
    """``mode=budget`` picks [B, keep]: t top-attention tokens (descending attention), then keep − t
    tokens spread evenly over the other tokens in raster order."""
    n = attention.shape[1]
    top_count = min(max(round(topk_share * keep), 1), keep)
    ranked = attention.float().argsort(dim=1, descending=True, stable=True)
    top = ranked[:, :top_count]
    rest_count = keep - top_count
    if rest_count == 0:
        return top
    others = ranked[:, top_count:].sort(dim=1).values  # the other n − t tokens, raster order
    spacing = (n - top_count) / rest_count
    slots = (torch.arange(rest_count, device=attention.device) * spacing).long()
    return torch.cat([top, others[:, slots]], dim=1)


def merge_into_kept(x: torch.Tensor, attention: torch.Tensor, keys: torch.Tensor, kept: torch.Tensor,
                    neighbours: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged kept tokens [B, K, D] (x_i + Σ a_j·x_j over the ``neighbours`` tokens j ≠ i with the most
    similar keys) and the extra token [B, 1, D] (Σ a_j·x_j over the tokens not in ``kept``), fp32."""
    batch, n, _ = x.shape
    x32, weights = x.float(), attention.float()
    unit = F.normalize(keys.float(), dim=2)
    kept_unit = unit.gather(1, kept.unsqueeze(-1).expand(-1, -1, unit.shape[2]))
    similarity = kept_unit @ unit.transpose(1, 2)  # [B, K, N]
    similarity.scatter_(2, kept.unsqueeze(-1), -float("inf"))  # a token is not its own neighbour
    count = min(neighbours, n - 1)
    if count > 0:
        nearest = similarity.topk(count, dim=2).indices  # [B, K, count]
        mixing = torch.zeros_like(similarity).scatter_(
            2, nearest, weights.unsqueeze(1).expand(-1, kept.shape[1], -1).gather(2, nearest))
        merged = x32.gather(1, kept.unsqueeze(-1).expand(-1, -1, x.shape[2])) + mixing @ x32
    else:
        merged = x32.gather(1, kept.unsqueeze(-1).expand(-1, -1, x.shape[2]))
    pruned = torch.ones(batch, n, dtype=torch.bool, device=x.device).scatter_(1, kept, False)
    extra = (weights * pruned).unsqueeze(1) @ x32
    return merged, extra


class PruMergePlus(TokenCompressor):
    """Keep CLS-attention outliers plus spatial samples, merge the rest into them, add one summary token."""

    name = "prumerge-plus"
    stages = (Stage.VISION_OUT,)
    needs = frozenset({"cls_attention_next", "keys_next"})
    positions = "contiguous"
    paper = "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models (PruMerge+, ICCV 2025)"
    source = "https://github.com/42Shawn/LLaVA-PruMerge (re-implemented from the spec, not copied)"

    class Options(TokenCompressor.Options):
        mode: Mode = Field("budget", description="budget: meet the budget; adaptive: the reference's IQR count")
        topk_share: float = Field(0.25, gt=0, le=1, description="mode=budget: share of kept tokens chosen by "
                                                                  "attention (the rest are spatial samples)")
        neighbours: int = Field(32, ge=0, description="tokens merged into each kept token (by key similarity)")
        extra_token: bool = Field(True, description="append the attention-weighted sum of the pruned tokens")
        heads: Literal["concat", "mean"] = Field(
            "concat", description="concat: single-head attention over concatenated heads (reference); mean")
        order: Literal["spatial", "reference"] = Field(
            "spatial", description="token order into the LLM: raster, or the reference's (attention first)")
        attention_block: Literal["next", "selected"] = Field(
            "next", description="CLS attention and keys of the block after the selected one (reference) or of "
                                "the selected block (head mean; cls_attention and keys signals)")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.next_block_heads = self.options.heads
        self.adaptive_count = self.options.mode == "adaptive"
        if self.options.attention_block == "selected":
            self.needs = frozenset({"cls_attention", "keys"})

    def schedule(self, n_visual: int, budget: float, info: ModelInfo) -> list[tuple[Site, int]]:
        if Stage.VISION_OUT not in info.stages:
            raise Infeasible(f"{self.name} needs the vision encoder's CLS attention at its output (vision_out); "
                             f"the {info.family} adapter offers no vision_out stage")
        total = round(budget)
        if total >= n_visual:
            return []
        if self.adaptive_count:
            return [(Site(Stage.VISION_OUT), n_visual)]
        keep = total - int(self.options.extra_token)
        if keep < 1:
            raise Infeasible(f"{self.name}: budget {budget:g} leaves no kept token beside the appended extra "
                             "token; use extra_token=false or a larger budget")
        return [(Site(Stage.VISION_OUT), keep)]

    def reduce(self, x: SiteInput) -> Reduction:
        visual = check_finite(self.name, x.visual)
        n = visual.shape[1]
        if x.keep >= n and not self.adaptive_count:
            return Reduction.keep_all(x)
        attention, keys = (x.cls_attention_next, x.keys_next) if self.options.attention_block == "next" \
            else (x.cls_attention, x.keys)
        if attention is None or keys is None:
            raise ValueError(f"{self.name} needs the {' and '.join(sorted(self.needs))} signals; the adapter did "
                             "not provide them")
        attention = check_finite(self.name, attention.unsqueeze(-1)).squeeze(-1)
        if self.adaptive_count:
            chosen = adaptive_selection(attention)[:, :max(min(x.keep, n), 1)]
        else:
            chosen = budget_selection(attention, max(min(x.keep, n), 1), self.options.topk_share)
        merged, extra = merge_into_kept(visual, attention, keys, chosen, self.options.neighbours)
        with_extra = self.options.extra_token and chosen.shape[1] < n
        if self.options.order == "reference":
            tokens = torch.cat([merged, extra], dim=1) if with_extra else merged
            return Reduction(chosen[:, :0], extra=tokens.to(visual.dtype))
        keep, order = chosen.sort(dim=1)
        values = merged.gather(1, order.unsqueeze(-1).expand(-1, -1, merged.shape[2]))
        return Reduction(keep, values.to(visual.dtype), extra.to(visual.dtype) if with_extra else None)


class PruMergePlusAdaptive(PruMergePlus):
    """PruMerge+ with the reference's adaptive (IQR) token count, which ignores the budget."""

    name = "prumerge-plus-adaptive"
    paper = "PruMerge+ with its adaptive token count (reference default; realised tokens ignore the budget)"

    class Options(PruMergePlus.Options):
        mode: Mode = Field("adaptive", description="adaptive: the reference's IQR count; budget: meet the budget")


@tokenbench.hookimpl
def register_compressors(register):
    register(PruMergePlus)
    register(PruMergePlusAdaptive)
