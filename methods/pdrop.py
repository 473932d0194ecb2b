"""PyramidDrop (Xing et al., CVPR 2025, arXiv 2410.17247): drop visual tokens in stages inside the
LLM, ranked by the attention of the last instruction token.

Reproduces Cooperx521/PyramidDrop (``llava/model/modeling_llama_pdrop.py``) as described in
``spec/methods-wave2.md`` §13:

1. The decoder is split at the layers of ``layer_list`` (default 8, 16, 24 of 32, scaled to the
   model's depth). Before boundary layer ``l_s`` runs, the visual tokens alive are ranked by the
   head-mean softmax attention that the **last prompt token** pays them, computed with layer
   ``l_s``'s own input norm, q and k projections and rotary on the hidden states entering it
   (``attention_source = "next"``: the attention layer ``l_s`` is about to compute, not layer
   ``l_s - 1``'s). Only that one query row is computed beside the fused kernel (class ``probe``).
2. The top ``int(N·λ^s)`` tokens survive stage ``s`` (s = 1, 2, 3), in their original order, and the
   sequence is renumbered ``0..L'-1`` (``positions = "contiguous"``); decoding continues from each
   layer's own cache length, as the reference's per-boundary position shift does.

Budget (layer-averaged visual tokens): with the default ``schedule="budget"``, λ is solved by
bisection on the truncated stage counts so that the layer average meets the budget (within a
token). The first stage always runs on all N tokens, so a list cannot reach budgets below
N·l₁/L; then the maintainer's remedy (issue #29) is used: ``layer_list`` [2, 8, 16] of 32. For
LLaVA-1.5 (N = 576, L = 32) this gives 192 → [8, 16, 24], λ ≈ 0.253 (576/145/36/9); 128 →
[2, 8, 16], λ ≈ 0.42; 64 → [2, 8, 16], λ ≈ 0.19 (§13.3). ``layer_list`` fixes the list (the budget
is then Infeasible below its floor); ``lam`` fixes λ too, with no solving.
``schedule="reference"`` runs the published setting as is, [8, 16, 24] with λ = 0.5 (576/288/144/72,
a layer average of 270 on LLaVA-1.5 whatever the budget asked): it is **over budget** at every budget
below 270/576 of the tokens, which the realised token count of the run shows.

Options: ``attention_source`` ``next`` (reference) or ``previous`` (layer ``l_s - 1``'s attention, read
from its KV cache like FastV; cheaper, not the reference).

Deviations from the reference code: every batch element is ranked by its own attention row (the
reference runs batch 1, right-padded); no truncation to ``tokenizer_model_max_length``; the image span
is whatever the adapter reports; λ and the list come from the budget unless given.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

import tokenbench
from tokenbench import Infeasible, ModelInfo, Reduction, Site, SiteInput, Stage, TokenCompressor
from tokenbench.compressor import layer_averaged_tokens

REFERENCE_LAYERS = (8, 16, 24)
REFERENCE_LAMBDA = 0.5
EARLY_LAYERS = (2, 8, 16)  # the maintainer's list for budgets the reference list cannot reach


def boundary_sites(info: ModelInfo, layer_list: tuple[int, ...]) -> list[Site]:
    """``layer_list`` (layers of a 32-layer LLM) scaled to ``info``'s depth, strictly increasing."""
    sites: list[Site] = []
    for layer in layer_list:
        scaled = info.scale_layer(layer)
        if sites and scaled <= sites[-1].layer:
            scaled = sites[-1].layer + 1
        if scaled > info.llm_layers - 1:
            break
        sites.append(Site(Stage.LLM, scaled))
    return sites


def stage_plan(n_visual: int, sites: list[Site], lam: float) -> list[tuple[Site, int]]:
    """Stage ``s`` keeps ``int(N·λ^s)`` tokens (at least one); stages that drop nothing are left out."""
    plan, alive = [], n_visual
    for stage, site in enumerate(sites, start=1):
        keep = max(1, int(n_visual * lam ** stage))
        if keep < alive:
            plan.append((site, keep))
            alive = keep
    return plan


def solve_lambda(n_visual: int, budget: float, sites: list[Site], llm_layers: int) -> list[tuple[Site, int]]:
    """The plan whose layer average is closest to ``budget``, λ found by bisection (the average is
    non-decreasing in λ); :class:`Infeasible` when even λ → 0 stays more than a token above it."""
    def average(lam: float) -> float:
        return layer_averaged_tokens(n_visual, stage_plan(n_visual, sites, lam), llm_layers)

    floor = average(0.0)
    if floor - budget > 1:
        raise Infeasible(f"PyramidDrop keeps all {n_visual} tokens before layer {sites[0].layer}, so its "
                         f"layer average cannot go below {floor:.1f} (asked {budget:g}); use an earlier "
                         f"layer_list such as [2, 8, 16] (the maintainer's remedy, issue #29)")
    low, high = 0.0, 1.0  # average(low) < budget <= average(high)
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (low, mid) if average(mid) >= budget else (mid, high)
    lam = min((low, high), key=lambda x: abs(average(x) - budget))
    return stage_plan(n_visual, sites, lam)


class PyramidDrop(TokenCompressor):
    """Multi-stage drop by the last instruction token's attention, λ solved from the budget."""

    name = "pdrop"
    stages = (Stage.LLM,)
    needs = frozenset({"attention"})
    attention_queries = "last"
    attention_source = "next"
    positions = "contiguous"
    paper = "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy " \
            "Reduction (CVPR 2025)"
    source = "https://github.com/Cooperx521/PyramidDrop"

    class Options(TokenCompressor.Options):
        schedule: Literal["budget", "reference"] = Field(
            "budget", description="λ (and the list) solved from the budget, or [8,16,24] with λ=0.5 as published")
        layer_list: list[int] | None = Field(
            None, description="stage boundaries on a 32-layer LLM (scaled); default [8,16,24], else [2,8,16]")
        lam: float | None = Field(None, gt=0, lt=1, description="keep ratio per stage; default: solved")
        attention_source: Literal["next", "previous"] = "next"

        @field_validator("layer_list")
        @classmethod
        def _increasing(cls, layers: list[int] | None) -> list[int] | None:
            if layers is not None and (not layers or sorted(set(layers)) != layers or layers[0] < 1):
                raise ValueError(f"layer_list must be increasing layers >= 1, got {layers}")
            return layers

        @model_validator(mode="after")
        def _reference_is_fixed(self) -> PyramidDrop.Options:
            if self.schedule == "reference" and (self.layer_list is not None or self.lam is not None):
                raise ValueError("schedule=reference fixes layer_list [8, 16, 24] and lam 0.5; drop those options")
            return self

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.attention_source = self.options.attention_source

    def schedule(self, n_visual: int, budget: float, info: ModelInfo) -> list[tuple[Site, int]]:
        if Stage.LLM not in info.stages:
            raise Infeasible(f"the {info.family} adapter offers no llm stage, which PyramidDrop needs")
        if self.options.schedule == "reference":
            return stage_plan(n_visual, boundary_sites(info, REFERENCE_LAYERS), REFERENCE_LAMBDA)
        if budget >= n_visual:
            return []
        layer_list = tuple(self.options.layer_list or REFERENCE_LAYERS)
        sites = boundary_sites(info, layer_list)
        if self.options.lam is not None:
            return stage_plan(n_visual, sites, self.options.lam)
        try:
            return solve_lambda(n_visual, budget, sites, info.llm_layers)
        except Infeasible:
            if self.options.layer_list is not None:
                raise
            return solve_lambda(n_visual, budget, boundary_sites(info, EARLY_LAYERS), info.llm_layers)

    def reduce(self, x: SiteInput) -> Reduction:
        if x.attention is None:
            raise ValueError("PyramidDrop needs the attention signal; the adapter did not provide it")
        scores = x.attention.float().mean(dim=1)  # [B, N]: the one (last-token) query row
        keep = min(x.keep, scores.shape[1])
        return Reduction(scores.topk(keep, dim=1).indices.sort(dim=1).values)


@tokenbench.hookimpl
def register_compressors(register):
    register(PyramidDrop)
