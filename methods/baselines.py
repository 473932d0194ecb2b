"""Plain baselines: ``none`` keeps every token; ``random`` keeps a seeded uniform subset.

``random`` acts once, before the LLM (``vision_out`` where the adapter offers it, else
``projector``), so its kept count equals the budget at every decoder layer.
"""

from __future__ import annotations

import torch

import tokenbench
from tokenbench import Infeasible, ModelInfo, Reduction, Site, SiteInput, Stage, TokenCompressor


def pre_llm_site(info: ModelInfo) -> Site:
    """The earliest single pre-LLM site the adapter offers: ``vision_out``, else ``projector``."""
    for stage in (Stage.VISION_OUT, Stage.PROJECTOR):
        if stage in info.stages:
            return Site(stage)
    raise Infeasible(f"the {info.family} adapter offers neither vision_out nor projector stages")


def single_site_plan(n_visual: int, budget: float, info: ModelInfo) -> list[tuple[Site, int]]:
    """Keep ``round(budget)`` tokens at the earliest pre-LLM site (no plan when that keeps all)."""
    keep = round(budget)
    if keep < 1:
        raise Infeasible(f"budget {budget:g} keeps no visual token")
    if keep >= n_visual:
        return []
    return [(pre_llm_site(info), keep)]


class NoCompression(TokenCompressor):
    """Keeps every visual token: the uncompressed reference."""

    name = "none"
    stages = (Stage.VISION_OUT,)
    paper = "uncompressed baseline"

    def schedule(self, n_visual: int, budget: float, info: ModelInfo) -> list[tuple[Site, int]]:
        if budget < n_visual - 0.5:
            raise Infeasible(f"'none' keeps all {n_visual} visual tokens; it runs without a budget")
        return []

    def reduce(self, x: SiteInput) -> Reduction:
        return Reduction.keep_all(x)


class RandomKeep(TokenCompressor):
    """Keeps ``budget`` visual tokens drawn uniformly without replacement (seeded per sample)."""

    name = "random"
    stages = (Stage.VISION_OUT, Stage.PROJECTOR)
    paper = "random-drop baseline"
    stochastic = True
    draws_per_row = True

    def schedule(self, n_visual: int, budget: float, info: ModelInfo) -> list[tuple[Site, int]]:
        return single_site_plan(n_visual, budget, info)

    def reduce(self, x: SiteInput) -> Reduction:
        n = x.visual.shape[1]
        keep = min(x.keep, n)
        noise = torch.stack([torch.rand(n, generator=g, device="cpu") for g in x.row_generators()])
        chosen = noise.topk(keep, dim=1).indices.sort(dim=1).values
        return Reduction(chosen.to(x.visual.device))


@tokenbench.hookimpl
def register_compressors(register):
    register(NoCompression)
    register(RandomKeep)
