"""DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175): keep the most diverse visual tokens.

Pruning as a max–min diversity problem on the projected (LLM-space) visual tokens X, greedily
(spec ``methods-wave2.md`` §11):

1. Δ = 1 − cos(X, X), the pairwise cosine distance (N×N);
2. the first pick is the most isolated token: the largest nearest-neighbour distance (the second
   smallest entry of its column of Δ; the smallest is its own 0);
3. each further pick is the token whose distance to its nearest already-picked token is largest;
4. the m = ``keep`` picks survive, in their original (raster) order; positions are renumbered
   (the reference's LLM regenerates position ids 0..L'−1).

No attention and no text: FlashAttention class ``native``. Budget: one pre-LLM site, so the layer
average is m; tokenbench's budget B gives m = round(B) (the reference's ``SUBSET_RATIO`` r gives
round(r·N): 0.098 → 56 of 576, its default).

Reference quirks (vbdi/divprune @799e2d9) fixed here:

- Only batch element 0 is scored and its picks are applied to the whole batch; here every image is
  ranked on its own tokens (identical at batch 1, where the reference is evaluated).
- The image span is found at a hard-coded system-prompt length of 35; here the adapter says where.
- Picked tokens are not excluded: in fp16 a picked token's self-distance is not exactly 0, so with
  near-duplicate tokens an index can be picked twice (fewer distinct tokens survive). Here a picked
  token is never picked again; the contract forbids duplicate indices, so this is not an option.
- Δ is computed in the model dtype (fp16) in the reference; here in fp32. ``distance_dtype=input``
  computes it in the input's dtype, as the reference does.

Ties go to the lower index (``argmax`` returns the first maximum). A zero vector has cosine 0 to
everything (the reference divides by its zero norm). Degenerate inputs: ``keep >= N`` keeps every
token; ``keep == 1`` keeps the most isolated token; identical tokens are all at distance 0 and are
picked in index order; NaN or infinite input raises ``ValueError``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

import tokenbench
from tokenbench import Infeasible, ModelInfo, Reduction, Site, SiteInput, Stage, TokenCompressor


def cosine_distance(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``1 − cos`` between every pair of tokens of each image of ``x`` [B, N, D] → [B, N, N]."""
    x = x.to(dtype)
    norms = x.norm(dim=2, keepdim=True)
    unit = x / torch.where(norms > 0, norms, torch.ones_like(norms))
    return 1.0 - unit @ unit.transpose(1, 2)


def divprune_select(x: torch.Tensor, keep: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """DivPrune's greedy max–min picks for each image of ``x`` [B, N, D]: [B, keep] indices in
    selection order (``keep`` ≤ N, N ≥ 2)."""
    distance = cosine_distance(x, dtype).float()
    batch, n, _ = distance.shape
    rows = torch.arange(batch, device=x.device)
    picks = torch.empty(batch, keep, dtype=torch.long, device=x.device)
    isolation = distance.topk(2, dim=1, largest=False).values[:, 1, :]  # nearest other token, per column
    current = isolation.argmax(dim=1)
    nearest = torch.full((batch, n), float("inf"), device=x.device)
    picked = torch.zeros(batch, n, dtype=torch.bool, device=x.device)
    for i in range(keep):
        picks[:, i] = current
        picked[rows, current] = True
        nearest = torch.minimum(nearest, distance[rows, current])
        current = nearest.masked_fill(picked, -float("inf")).argmax(dim=1)
    return picks


class ProjectorPruner(TokenCompressor):
    """Base of the methods that keep ``round(budget)`` of the projected visual tokens, the ones
    ``select`` picks (``divprune``, ``cdpruner``): the plan, the input check and the keep-all case."""

    stages = (Stage.PROJECTOR,)
    positions = "contiguous"

    def schedule(self, n_visual: int, budget: float, info: ModelInfo) -> list[tuple[Site, int]]:
        return projector_plan(self.name, n_visual, budget, info)

    def reduce(self, x: SiteInput) -> Reduction:
        visual = check_finite(self.name, x.visual)
        n = visual.shape[1]
        if x.keep >= n:
            return Reduction.keep_all(x)
        return Reduction(self.select(x, visual, max(x.keep, 1)).sort(dim=1).values)

    def select(self, x: SiteInput, visual: torch.Tensor, keep: int) -> torch.Tensor:
        """[B, keep] indices of the tokens to keep, in any order (``visual`` is ``x.visual``, finite,
        with more than ``keep`` tokens)."""
        raise NotImplementedError


class DivPrune(ProjectorPruner):
    """Keep the ``budget`` projected visual tokens that are most diverse (greedy max–min cosine distance)."""

    name = "divprune"
    needs = frozenset()
    paper = "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models (CVPR 2025)"
    source = "https://github.com/vbdi/divprune (re-implemented from the spec, not copied)"

    class Options(TokenCompressor.Options):
        distance_dtype: Literal["float32", "input"] = Field(
            "float32", description="dtype of the cosine distances; input = the model dtype, as the reference")

    def select(self, x: SiteInput, visual: torch.Tensor, keep: int) -> torch.Tensor:
        dtype = visual.dtype if self.options.distance_dtype == "input" else torch.float32
        return divprune_select(visual, keep, dtype)


def projector_plan(name: str, n_visual: int, budget: float, info: ModelInfo) -> list[tuple[Site, int]]:
    """Keep ``round(budget)`` tokens at the ``projector`` site (no plan when that keeps them all)."""
    if Stage.PROJECTOR not in info.stages:
        raise Infeasible(f"{name} acts on the projector's output; the {info.family} adapter offers no "
                         "projector stage")
    keep = round(budget)
    if keep < 1:
        raise Infeasible(f"{name}: budget {budget:g} keeps no visual token")
    return [] if keep >= n_visual else [(Site(Stage.PROJECTOR), keep)]


def check_finite(name: str, visual: torch.Tensor) -> torch.Tensor:
    """``visual`` itself; ``ValueError`` naming ``name`` if it holds NaN or infinite values."""
    if visual.dim() != 3 or not visual.is_floating_point():
        raise ValueError(f"{name}: visual tokens must be a floating-point [B, N, D] tensor, got "
                         f"{visual.dtype} {tuple(visual.shape)}")
    if not torch.isfinite(visual).all():
        kind = "NaN" if torch.isnan(visual).any() else "infinite"
        raise ValueError(f"{name}: input contains {kind} values, so tokens cannot be compared. Check the model "
                         "upstream (fp16 overflow? run it in bf16 or fp32)")
    return visual


@tokenbench.hookimpl
def register_compressors(register):
    register(DivPrune)
