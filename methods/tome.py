"""ToMe (Bolya et al., ICLR 2023): bipartite soft matching merges similar tokens inside the vision
encoder, so fewer visual tokens reach the LLM.

``tome`` reproduces ``tome/merge.py`` + ``tome/patch/timm.py`` of facebookresearch/ToMe on the
vision encoder of a VLM: before each encoder block l = 1..V-1 (V = blocks up to the selected
feature layer) the tokens are split alternately into sets A and B, every A
token finds its most similar B token by cosine similarity of the previous block's head-mean keys,
and the r most similar A tokens are merged into their B partners by a size-weighted average; sizes
are carried across blocks and the adapter applies **proportional attention** (log(size) added to
the key logits). r per block is chosen so that the count reaching the selected layer is the budget
(the LLM then processes exactly the budget at every layer): the removals are spread evenly over the
blocks (ToMe's constant r, rounded up in early blocks), never more than half the tokens of a block,
and front-loaded where later blocks could not remove the rest. No attention weights are needed
(FlashAttention class ``native``).

The alternation runs over the encoder's whole sequence, as ToMe's does: when the encoder has a
class token (CLIP: ``ModelInfo.arch.vision_tokens`` = patches + 1) it sits at position 0, in set A,
and is never merged, so patch p (0-based among the patches) is in A when p is odd and in B when p
is even. The adapter hands the method the patches only; ``schedule`` records from ``ModelInfo``
whether a class token precedes them and ``reduce`` counts its position. Option
``partition=patches`` alternates over the patches alone instead (A = even patches, tokenbench's
earlier split), which pairs different neighbours: its merge groups overlap ToMe's with Jaccard
0.66, 0.42 and 0.13 at r = 50, 144 and 288 on 577 random keys (0.96, 0.67 and 0.08 measured on
LLaVA-1.5's CLIP keys).

``tome-pre`` is the one-shot variant for adapters without a ``vision`` stage: at ``vision_out``
(else ``projector``) it repeats bipartite matching on the features themselves (no keys) until the
budget is reached, each round merging at most half of the tokens, with size-weighted averaging.

Deviations from the reference code:

- Merging runs between blocks (after block l-1's MLP, with block l-1's keys); ToMe merges between
  the attention and the MLP of the same block. The MLP of a block therefore runs on the unmerged
  tokens, and there are V-1 merge points where ToMe has V (22 instead of 23 on LLaVA-1.5), the
  selected layer's output itself not being merged.
- Output order: the contract keeps survivors at their original positions, so the unmerged A tokens
  and the B tokens stay in spatial (raster) order; ToMe emits [unmerged A, B]. Since a/b parity is
  taken from the current order, later blocks pair different neighbours than ToMe would.
- The class token, when the encoder has one, is handled by the adapter and never merged (ToMe
  protects it with a -inf score, which also caps r at (T - 1) // 2; same effect), but its position
  still counts in the A/B alternation (above).
- The r schedule is computed from the budget rather than given as a constant r.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from tokenbench.methods.baselines import single_site_plan

import tokenbench
from tokenbench import Infeasible, ModelInfo, Reduction, Site, SiteInput, Stage, TokenCompressor


def bipartite_merge(x: torch.Tensor, metric: torch.Tensor, sizes: torch.Tensor, r: int,
                    offset: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge the ``r`` A tokens most similar to a B token into it.

    The alternation starts ``offset`` positions before ``x`` (1: a class token precedes the tokens,
    as in ToMe's sequence): token i is in A when i + offset is even, else in B.
    ``x`` [B, N, D] features, ``metric`` [B, N, C] similarity features, ``sizes`` [B, N]. Returns
    ``(keep, values, sizes)``: sorted surviving indices [B, N - r], their size-weighted merged
    features and their summed sizes.
    """
    b, n, d = x.shape
    a_idx = torch.arange(offset % 2, n, 2, device=x.device)
    b_idx = torch.arange(1 - offset % 2, n, 2, device=x.device)
    r = min(r, len(a_idx), len(b_idx))
    if r <= 0:
        return (torch.arange(n, device=x.device).expand(b, n).clone(), x, sizes)
    unit = F.normalize(metric.float(), dim=-1)
    scores = unit[:, a_idx] @ unit[:, b_idx].transpose(1, 2)  # [B, |A|, |B|]
    best_score, best_b = scores.max(dim=-1)
    order = best_score.argsort(dim=-1, descending=True, stable=True)
    src, unmerged = order[:, :r], order[:, r:]
    dst = best_b.gather(1, src)

    weights = sizes.float()
    weighted = x.float() * weights[..., None]
    sum_b = weighted[:, b_idx].scatter_add(1, dst[..., None].expand(b, r, d),
                                           weighted[:, a_idx].gather(1, src[..., None].expand(b, r, d)))
    size_b = weights[:, b_idx].scatter_add(1, dst, weights[:, a_idx].gather(1, src))

    merged = x.float().clone()
    merged[:, b_idx] = sum_b / size_b[..., None]
    merged_sizes = weights.clone()
    merged_sizes[:, b_idx] = size_b
    keep = torch.cat([a_idx[unmerged], b_idx.expand(b, -1)], dim=1).sort(dim=1).values
    values = merged.gather(1, keep[..., None].expand(-1, -1, d)).to(x.dtype)
    return keep, values, merged_sizes.gather(1, keep).to(sizes.dtype)


def merge_schedule(n_tokens: int, target: int, blocks: int) -> list[int]:
    """Tokens removed before each of ``blocks`` merge points so that ``n_tokens`` becomes ``target``.

    Spread evenly, at most half of the current tokens per block, and front-loaded where the later
    blocks, each at most halving, could not remove the rest. Raises :class:`Infeasible`."""
    reachable = n_tokens
    for _ in range(blocks):
        reachable -= reachable // 2
    if target < reachable:
        raise Infeasible(f"{blocks} merge steps of at most 50% each reduce {n_tokens} tokens to "
                         f"{reachable} at best, above the budget {target}")
    plan, n = [], n_tokens
    for step in range(blocks):
        remaining = blocks - step
        even = math.ceil((n - target) / remaining)
        needed = n - target * 2 ** (remaining - 1)  # the later blocks can at most halve each
        r = min(n // 2, max(even, needed, 0))
        plan.append(r)
        n -= r
    return plan


class ToMe(TokenCompressor):
    """Bipartite soft matching inside the vision encoder, with size tracking."""

    name = "tome"
    stages = (Stage.VISION,)
    needs = frozenset({"keys"})
    positions = "original"
    proportional_attention = True
    paper = "Token Merging: Your ViT But Faster (ICLR 2023)"
    source = "https://github.com/facebookresearch/ToMe"

    class Options(TokenCompressor.Options):
        partition: Literal["reference", "patches"] = Field(
            "reference", description="reference: A/B alternation counts the class token's position "
                                     "(ToMe); patches: alternate over the patches alone (A = even patches)")

    def __init__(self, **options) -> None:
        super().__init__(**options)
        # Whether a class token precedes the patches in the encoder; schedule() reads it from the
        # model. CLIP (LLaVA) has one.
        self.class_token = True

    def schedule(self, n_visual: int, budget: float, info: ModelInfo) -> list[tuple[Site, int]]:
        if Stage.VISION not in info.stages:
            raise Infeasible(f"the {info.family} adapter offers no vision stage; use tome-pre")
        if info.arch.vision_tokens - n_visual not in (0, 1):  # 0, or 1 for a class token
            raise Infeasible(f"the vision encoder's {info.arch.vision_tokens} tokens are not one "
                             f"per LLM visual token ({n_visual}); in-encoder ToMe needs that: "
                             f"use tome-pre")
        self.class_token = info.arch.vision_tokens == n_visual + 1
        target = round(budget)
        if target < 1:
            raise Infeasible(f"budget {budget:g} keeps no visual token")
        if target >= n_visual:
            return []
        blocks = info.vision_layers - 1
        if blocks < 1:
            raise Infeasible("the vision encoder has a single block: nothing to merge between")
        plan, n = [], n_visual
        for layer, r in enumerate(merge_schedule(n_visual, target, blocks), start=1):
            if r:
                n -= r
                plan.append((Site(Stage.VISION, layer), n))
        return plan

    def reduce(self, x: SiteInput) -> Reduction:
        if x.keys is None:
            raise ValueError("ToMe needs the keys signal; the adapter did not provide it")
        n = x.visual.shape[1]
        r = n - min(x.keep, n)
        if r > n // 2:
            raise ValueError(f"ToMe merges at most half of the {n} tokens at a block; the plan asks "
                             f"to keep {x.keep} (plans from ToMe.schedule never do)")
        sizes = x.sizes if x.sizes is not None else torch.ones(x.visual.shape[:2], device=x.visual.device)
        offset = int(self.class_token and self.options.partition == "reference")
        keep, values, sizes = bipartite_merge(x.visual, x.keys, sizes, r, offset)
        return Reduction(keep, values=values, sizes=sizes)


def repeated_merge(x: torch.Tensor, sizes: torch.Tensor,
                   target: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bipartite-merge ``x`` on its own features, at most half per round, until ``target`` remain."""
    b, n, _ = x.shape
    keep = torch.arange(n, device=x.device).expand(b, n)
    values = x
    while values.shape[1] > target:
        r = min(values.shape[1] // 2, values.shape[1] - target)
        step, values, sizes = bipartite_merge(values, values, sizes, r)
        keep = keep.gather(1, step)
    return keep, values, sizes


class ToMePre(TokenCompressor):
    """One-shot ToMe on the encoder output (or projector output) for adapters without a vision stage."""

    name = "tome-pre"
    stages = (Stage.VISION_OUT, Stage.PROJECTOR)
    positions = "original"
    paper = "Token Merging: Your ViT But Faster (ICLR 2023), one-shot pre-LLM variant"
    source = "https://github.com/facebookresearch/ToMe"

    def schedule(self, n_visual: int, budget: float, info: ModelInfo) -> list[tuple[Site, int]]:
        return single_site_plan(n_visual, budget, info)

    def reduce(self, x: SiteInput) -> Reduction:
        sizes = x.sizes if x.sizes is not None else torch.ones(x.visual.shape[:2], device=x.visual.device)
        keep, values, sizes = repeated_merge(x.visual, sizes, min(x.keep, x.visual.shape[1]))
        return Reduction(keep, values=values, sizes=sizes)


@tokenbench.hookimpl
def register_compressors(register):
    register(ToMe)
    register(ToMePre)
