"""SparseVLM (Zhang et al., ICML 2025, arXiv 2410.04417): text-guided visual-token pruning inside
the LLM, with token recycling.

Reproduces Gumpest/SparseVLMs (v1.5 = ``USE_VERSION=1_0`` of the main branch; v1 = the initial
commit) as described in ``spec/methods.md`` §4:

1. **Raters** (§4.1): M = H_v H_tᵀ over the visual tokens and the text tokens after the image,
   softmax over the text axis, r = mean over the visual rows; the raters are the text tokens with
   r_i > mean(r) (strict, as the code).
2. **Scores** (§4.2): at a pruning layer, the head-mean attention of that layer from the rater rows
   to the visual tokens, averaged over the raters. The adapter computes only the text-query rows
   (``attention_queries = "text"``), so the FlashAttention class is ``probe``.
3. **Keep** the top tokens (§4.3). ``version="v1.5"`` (default): pruning after layers 2, 6, 15 of
   32; ``version="v1"``: after 2, 6, 15, 19 with the rank-adaptive count
   min(⌊rank(P)·λ + b⌋, N - 1) (P = rater→visual attention), skipping a layer where P has full rank.
4. **Recycling** (§4.4): of the deleted tokens, the top ⌊0.3·n_del⌋+1 by score are clustered by
   density-peak kNN clustering into ⌊n_rec/10⌋+1 clusters; each cluster's mean is appended after
   the kept tokens (``Reduction.extra``) and counts as a visual token from then on.
5. Survivors are renumbered contiguously (``positions = "contiguous"``), as v1/v1.5 do.

Site convention: the reference prunes the **output** of layers 2, 6, 15 (0-based), so layers 3, 7,
16 are the first to see the reduced sequence: ``Site(llm, 3)``, ``Site(llm, 7)``, ``Site(llm, 16)``
on 32 layers; on other depths each pruning layer p maps to ``scale_layer(p) + 1``, bumped to keep
the sites strictly increasing, and stages that would fall past the last layer are dropped. The
attention the adapter hands over is that of the layer just before the site, i.e. of the pruning
layer itself, as in the reference.

Budget (tokenbench's unit: layer-averaged visual tokens incl. recycled ones): the published v1.5
schedules (N = 576: 64 → [66, 30, 17], 96 → [238, 48, 26], 128 → [303, 110, 36],
192 → [300, 200, 110]) give the *shape*: for a budget fraction b/N the per-stage keep fractions are
interpolated linearly between the published ones (and towards [N, N, N] at b = N and [0, 0, 0] at
b = 0), scaled by one factor until the layer average incl. recycled tokens meets the budget, and
the last stage's count is then solved exactly, so the realised average is within half a token of
the budget; below the reachable minimum the schedule is :class:`Infeasible`. ``schedule="reference"``
instead runs the published keeps (scaled by N/576) at those four budgets: that reproduces the
papers' configuration, whose realised layer average is *above* the nominal budget (≈ 206.5 for
"192" on 32 layers, because the reference counts layer 2 as pruned and ignores recycled tokens).
``version="v1"`` is data-dependent and ignores the budget: give ``rank_lambda`` and ``rank_bias``
(published presets: "192" → 13.5, 0; "128" → 9, 6; "64" → 0.8, 0); a stateless compressor cannot
pick them from the budget at reduce time. Read the realised count from the token trace.

Raters (option ``raters``): the reference computes them once, before layer 0, from the LLM input
embeddings of all visual tokens and of the text after the image. ``raters="input"`` (default)
reproduces that: every site receives those layer-0 states (signal ``input_states``) and rates with
them, so each site gets the reference's one rater set whatever was pruned or recycled before.
``raters="site"`` recomputes the raters at each site from the hidden states entering it: the
surviving (and recycled) visual tokens and the text after the image (signal ``text``), both from the
same layer: a different rule, which on the tiny LLaVA at the published "192" schedule keeps other
tokens than the reference for every one of 12 images, where the default matches all 12.

Deviations from the reference code:

- Density ties in the clustering are broken by candidate order (higher score first) instead of
  adding random noise (1e-6), so the method is deterministic; the k nearest neighbours of the
  density include the token itself, as in the reference's kNN.
- Batches: every sample is pruned with its own raters and scores; v1's rank-adaptive count is the
  largest over the batch (the reference runs batch 1).
- v2.0 ("SparseVLM+", attention-gravity correction, head selection) is not implemented.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field

import tokenbench
from tokenbench import (
    Infeasible,
    ModelInfo,
    Reduction,
    Site,
    SiteInput,
    Stage,
    TokenCompressor,
    layer_averaged_tokens,
)

REFERENCE_TOKENS = 576
V15_PRUNE_LAYERS = (2, 6, 15)
V1_PRUNE_LAYERS = (2, 6, 15, 19)
V15_SCHEDULES = {64: (66, 30, 17), 96: (238, 48, 26), 128: (303, 110, 36), 192: (300, 200, 110)}
V1_PRESETS = {64: (0.8, 0.0), 128: (9.0, 6.0), 192: (13.5, 0.0)}  # budget -> (lambda, b)
RECYCLE_RATIO = 0.3  # tau: share of deleted tokens recycled
CLUSTER_RATIO = 0.1  # theta: clusters per recycled token


def recycled_clusters(n_deleted: int) -> int:
    """Cluster tokens appended when ``n_deleted`` tokens are pruned (0 when none are)."""
    if n_deleted <= 0:
        return 0
    return math.floor(CLUSTER_RATIO * recycled_candidates(n_deleted)) + 1


def recycled_candidates(n_deleted: int) -> int:
    """Deleted tokens that are recycled into clusters: the top ⌊0.3·n_del⌋ + 1 by score."""
    return math.floor(RECYCLE_RATIO * n_deleted) + 1


def prune_sites(info: ModelInfo, prune_layers: tuple[int, ...]) -> list[Site]:
    """The first layer after each (scaled) pruning layer; strictly increasing, within the LLM."""
    sites: list[Site] = []
    for layer in prune_layers:
        first = min(info.scale_layer(layer) + 1, info.llm_layers - 1)
        if sites and first <= sites[-1].layer:
            first = sites[-1].layer + 1
        if first > info.llm_layers - 1:
            break
        sites.append(Site(Stage.LLM, first))
    return sites


def recycling_plan(n_visual: int, sites: list[Site], keeps: list[int],
                   recycle: bool) -> tuple[list[tuple[Site, int]], dict[Site, int]]:
    """The plan for per-site ``keeps`` (sites that delete nothing dropped) and the recycled tokens
    each site appends; those count as visual tokens at the next site."""
    plan, extra, alive = [], {}, n_visual
    for site, keep in zip(sites, keeps):
        keep = max(1, keep)
        if keep >= alive:
            continue
        added = recycled_clusters(alive - keep) if recycle else 0
        plan.append((site, keep))
        extra[site] = added
        alive = keep + added
    return plan, extra


def simulate(n_visual: int, sites: list[Site], keeps: list[int], llm_layers: int,
             recycle: bool) -> tuple[float, list[tuple[Site, int]], dict[Site, int]]:
    """Layer average (incl. recycled tokens), the plan and its extra tokens for per-site ``keeps``."""
    plan, extra = recycling_plan(n_visual, sites, keeps, recycle)
    return layer_averaged_tokens(n_visual, plan, llm_layers, extra), plan, extra


def schedule_shape(fraction: float, stages: int) -> list[float]:
    """Per-stage keep fractions of N for a budget fraction, interpolated from the v1.5 schedules."""
    anchors = [(0.0, (0.0, 0.0, 0.0))]
    anchors += [(b / REFERENCE_TOKENS, tuple(k / REFERENCE_TOKENS for k in ks))
                for b, ks in sorted(V15_SCHEDULES.items())]
    anchors.append((1.0, (1.0, 1.0, 1.0)))
    fraction = min(max(fraction, 0.0), 1.0)
    below = max(i for i, (f, _) in enumerate(anchors[:-1]) if f <= fraction)
    (f0, k0), (f1, k1) = anchors[below], anchors[below + 1]
    t = (fraction - f0) / (f1 - f0)
    return [a + t * (b - a) for a, b in zip(k0, k1)][:stages]


def budget_schedule(n_visual: int, budget: float, sites: list[Site], llm_layers: int,
                    recycle: bool) -> tuple[list[tuple[Site, int]], dict[Site, int]]:
    """Per-site keeps following the v1.5 shape whose layer average meets ``budget`` (±0.5)."""
    shape = schedule_shape(budget / n_visual, len(sites))

    def keeps_for(scale: float) -> list[int]:
        return [min(n_visual, max(1, round(scale * s * n_visual))) for s in shape]

    def average(keeps: list[int]) -> float:
        return simulate(n_visual, sites, keeps, llm_layers, recycle)[0]

    low, high = 0.0, 1.0 / max(min(shape), 1e-3)
    for _ in range(50):  # smallest scale whose average reaches the budget
        mid = (low + high) / 2
        low, high = (low, mid) if average(keeps_for(mid)) >= budget else (mid, high)
    keeps = keeps_for(high)
    best = min(range(1, n_visual + 1), key=lambda k: abs(average(keeps[:-1] + [k]) - budget))
    keeps[-1] = best
    realised, plan, extra = simulate(n_visual, sites, keeps, llm_layers, recycle)
    if abs(realised - budget) > 1:
        lowest = simulate(n_visual, sites, [1] * len(sites), llm_layers, recycle)[0]
        if budget < lowest:
            raise Infeasible(f"SparseVLM keeps all {n_visual} tokens before layer {sites[0].layer}, "
                             f"so its layer average cannot go below {lowest:.1f} (asked {budget:g})")
        raise Infeasible(f"no SparseVLM schedule reaches the budget {budget:g} within 1 token "
                         f"(closest {realised:.2f})")
    return plan, extra


def density_peak_clusters(features: torch.Tensor, clusters: int) -> torch.Tensor:
    """Density-peak kNN clustering of ``features`` [B, R, D] into ``clusters`` member means [B, C, D].

    Candidates come in descending score order; density ties go to the earlier one."""
    b, r, d = features.shape
    feats = features.float()
    dist = torch.cdist(feats, feats) / math.sqrt(d)
    nearest = dist.topk(min(clusters, r), dim=-1, largest=False).values
    density = torch.exp(-(nearest ** 2).mean(dim=-1))  # [B, R]
    order = torch.arange(r, device=feats.device)
    denser = (density[:, None, :] > density[:, :, None]) | (
        (density[:, None, :] == density[:, :, None]) & (order[None, :] < order[:, None])[None])
    far = dist.flatten(1).max(dim=1).values[:, None, None].expand(b, r, r)
    delta = torch.where(denser, dist, far).min(dim=-1).values
    centres = (density * delta).topk(clusters, dim=-1).indices  # [B, C]
    to_centre = dist.gather(2, centres[:, None, :].expand(b, r, clusters))
    assignment = to_centre.argmin(dim=-1)
    assignment.scatter_(1, centres, torch.arange(clusters, device=feats.device).expand(b, -1))
    sums = feats.new_zeros(b, clusters, d).scatter_add(1, assignment[..., None].expand(b, r, d), feats)
    counts = feats.new_zeros(b, clusters).scatter_add(1, assignment, torch.ones_like(feats[..., 0]))
    return (sums / counts[..., None]).to(features.dtype)


def text_raters(visual: torch.Tensor, text: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean [B, T]: text tokens whose mean visual→text softmax relevance is above the mean
    (over each row's real text tokens, ``valid`` [B, T], when rows differ in length)."""
    logits = visual.float() @ text.float().transpose(1, 2)
    if valid is None:
        valid = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
    relevance = torch.softmax(logits.masked_fill(~valid[:, None], float("-inf")), dim=-1).mean(dim=1)
    mean = relevance.sum(dim=-1, keepdim=True) / valid.sum(dim=-1, keepdim=True)
    raters = (relevance > mean) & valid
    return torch.where(raters.any(dim=-1, keepdim=True), raters, valid)


class SparseVLM(TokenCompressor):
    """Text-rater attention scores, multi-stage in-LLM pruning, recycled cluster tokens."""

    name = "sparsevlm"
    stages = (Stage.LLM,)
    needs = frozenset({"attention", "input_states"})
    attention_queries = "text"
    positions = "contiguous"
    paper = "SparseVLM: Visual Token Sparsification for Efficient VLM Inference (ICML 2025)"
    source = "https://github.com/Gumpest/SparseVLMs"

    class Options(TokenCompressor.Options):
        version: Literal["v1.5", "v1"] = "v1.5"
        schedule: Literal["budget", "reference"] = Field(
            "budget", description="v1.5 only: budget-matched keeps, or the published keeps as is")
        recycle: bool = True
        rank_lambda: float | None = Field(None, description="v1 only: λ (presets 192: 13.5, 128: 9, 64: 0.8)")
        rank_bias: float | None = Field(None, description="v1 only: b (presets 192: 0, 128: 6, 64: 0)")
        raters: Literal["input", "site"] = Field(
            "input", description="text raters from the LLM input embeddings (reference) or per site")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.options.raters == "site":
            self.needs = frozenset({"attention", "text"})

    def schedule(self, n_visual: int, budget: float, info: ModelInfo) -> list[tuple[Site, int]]:
        if Stage.LLM not in info.stages:
            raise Infeasible(f"the {info.family} adapter offers no llm stage, which SparseVLM needs")
        if budget >= n_visual:
            return []
        if self.options.version == "v1":
            if self.options.rank_lambda is None or self.options.rank_bias is None:
                presets = ", ".join(f"{b}: rank_lambda={lam:g} rank_bias={bias:g}"
                                    for b, (lam, bias) in sorted(V1_PRESETS.items()))
                raise Infeasible(f"SparseVLM v1 keeps a data-dependent count; set rank_lambda and "
                                 f"rank_bias (published presets {presets})")
            return [(site, n_visual - 1) for site in prune_sites(info, V1_PRUNE_LAYERS)]
        sites = prune_sites(info, V15_PRUNE_LAYERS)
        if self.options.schedule == "reference":
            return self._reference_plan(n_visual, budget, sites)
        return budget_schedule(n_visual, budget, sites, info.llm_layers, self.options.recycle)[0]

    def planned_extra(self, n_visual: int, plan: list[tuple[Site, int]]) -> dict[Site, int]:
        """Recycled tokens each site of a v1.5 ``plan`` appends (for the layer-averaged count)."""
        if not self.options.recycle:
            return {}
        return recycling_plan(n_visual, [s for s, _ in plan], [k for _, k in plan], True)[1]

    @staticmethod
    def _reference_plan(n_visual: int, budget: float, sites: list[Site]) -> list[tuple[Site, int]]:
        nominal = round(budget * REFERENCE_TOKENS / n_visual)
        if nominal not in V15_SCHEDULES:
            raise Infeasible(f"schedule=reference exists for budgets {sorted(V15_SCHEDULES)} of "
                             f"576 tokens (asked {budget:g} of {n_visual}); use schedule=budget")
        keeps = [max(1, round(k * n_visual / REFERENCE_TOKENS)) for k in V15_SCHEDULES[nominal]]
        return list(zip(sites, keeps))

    def reduce(self, x: SiteInput) -> Reduction:
        if self.options.raters == "input":
            rated, text = x.input_visual, x.input_text
        else:
            rated, text = x.visual, x.text
        if x.attention is None or rated is None or text is None:
            raise ValueError(f"SparseVLM needs the {' and '.join(sorted(self.needs))} signals; the adapter "
                             "did not provide them")
        n = x.visual.shape[1]
        if text.shape[1] == 0:
            raise ValueError("SparseVLM rates visual tokens by the text after the image; the prompt "
                             "has none, so put the question after the image")
        raters = text_raters(rated, text, x.text_valid).float()  # [B, T], 1 for raters
        rater_attention = x.attention.float() * raters[..., None]  # P, other rows zeroed
        scores = rater_attention.sum(dim=1) / raters.sum(dim=1, keepdim=True)  # [B, N]
        keep = min(x.keep, n)
        if self.options.version == "v1":
            keep = min(keep, self._adaptive_keep(rater_attention, n))
        if keep >= n:
            return Reduction.keep_all(x)
        chosen = scores.topk(keep, dim=1).indices
        extra = self._recycle(x.visual, scores, chosen) if self.options.recycle else None
        return Reduction(chosen.sort(dim=1).values, extra=extra)

    def _adaptive_keep(self, rater_attention: torch.Tensor, n: int) -> int:
        """v1: min(⌊rank(P)·λ + b⌋, N - 1), or N (no pruning) where P has full rank."""
        rank = int(torch.linalg.matrix_rank(rater_attention).max())
        if rank >= n:
            return n
        count = math.floor(rank * self.options.rank_lambda + self.options.rank_bias)
        return min(max(count, 1), n - 1)

    @staticmethod
    def _recycle(visual: torch.Tensor, scores: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor | None:
        b, n, d = visual.shape
        deleted = n - chosen.shape[1]
        candidates = recycled_candidates(deleted)
        masked = scores.scatter(1, chosen, float("-inf"))
        picked = masked.topk(candidates, dim=1).indices  # descending score
        feats = visual.gather(1, picked[..., None].expand(b, candidates, d))
        return density_peak_clusters(feats, recycled_clusters(deleted))


@tokenbench.hookimpl
def register_compressors(register):
    register(SparseVLM)
