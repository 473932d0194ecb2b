"""FasterVLM ("[CLS] attention is all you need for training-free visual token pruning", arXiv
2412.01818 v1): keep the patches the vision encoder's [CLS] query attends to most, before the
projector (spec ``methods-wave2.md`` §14).

The algorithm, per image:

1. score every patch by the head-mean attention of the CLS query in the selected vision block
   (LLaVA-1.5: CLIP block 22, the block whose output is the LLaVA feature layer);
2. keep the top ``budget`` patches, in ascending raster order.

tokenbench mapping: one ``vision_out`` site (``projector`` on adapters without it) keeping
``round(budget)`` tokens, so the layer-averaged count is the budget exactly. The signal is
``cls_attention`` (class ``probe``: one attention row beside the fused kernel). Encoders without a
CLS token (Qwen2-VL / Qwen2.5-VL) use ``attention_received`` instead: the attention each token
receives, averaged over heads and all queries of the last ViT block, per merged 2×2 token
(VisPruner's recipe for SigLIP, §15.4), streamed over query chunks, also ``probe``.
``importance=auto`` (default) picks the CLS row where the adapter serves it, else received attention.

Deviations from the reference code (Theia-4869/FasterVLM @f5d5f12), none of which changes the
kept set except on exact ties:

- Scores are fp32 head means (the reference casts them to fp16), and ties go to the lower index
  (a stable sort); the reference's ``topk`` order on ties is unspecified.
- The projector runs on the kept tokens only (the reference projects all 576, then selects); the
  result is the same.
- Every ViT block runs with the model's kernel; the reference runs all of them eager with
  ``output_attentions=True`` although it reads one row of one block.
- LLaVA-NeXT (per-crop keeps, dropped newlines) is out of scope.

Degenerate inputs: ``keep >= N`` keeps everything; ``keep == 1`` keeps the top patch; identical
tokens (equal scores) keep the lowest indices; NaN or infinite scores or features raise
``ValueError``.

The helpers :func:`importance_signal`, :func:`importance_scores` and :func:`rank_by_score` are
shared with ``visionzip`` and ``vispruner``, and the base class :class:`ImportanceRanked` with
``vispruner``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from tokenbench.methods.baselines import pre_llm_site, single_site_plan

import tokenbench
from tokenbench import Infeasible, ModelInfo, Reduction, Site, SiteInput, Stage, TokenCompressor

Importance = Literal["auto", "cls", "received"]
IMPORTANCE_SIGNALS = {"cls": "cls_attention", "received": "attention_received"}


def importance_signal(name: str, choice: Importance, info: ModelInfo, stage: Stage) -> str:
    """The signal that scores token importance at ``stage``: the CLS row (``cls``), received
    attention (``received``) or, for ``auto``, the CLS row where the adapter serves it, else
    received attention; :class:`Infeasible` naming the signal and the adapter when it serves neither."""
    if choice != "auto":
        signal = IMPORTANCE_SIGNALS[choice]
        if not info.serves(signal, stage):
            raise Infeasible(f"{name}: importance={choice} needs {signal}, which the {info.family} adapter "
                             f"does not serve at {stage}" + ("; use importance=auto" if choice == "cls" else ""))
        return signal
    for signal in ("cls_attention", "attention_received"):
        if info.serves(signal, stage):
            return signal
    raise Infeasible(f"{name}: the {info.family} adapter serves neither cls_attention nor attention_received "
                     f"at {stage}; the method ranks tokens by one of them")


def signal_for_option(choice: Importance) -> str:
    """The signal ``needs`` holds before ``schedule`` resolves ``auto`` (the CLS row)."""
    return IMPORTANCE_SIGNALS.get(choice, "cls_attention")


def importance_scores(name: str, x: SiteInput) -> torch.Tensor:
    """[B, N] importance (fp32, or fp64 for fp64 input) from whichever of ``cls_attention`` / ``attention_received`` the
    site holds; ``ValueError`` if neither is there or the scores or features are not finite."""
    scores = x.cls_attention if x.cls_attention is not None else x.attention_received
    if scores is None:
        raise ValueError(f"{name} needs cls_attention or attention_received; the adapter provided neither")
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # fp32, fp64 for fp64 input
    if tuple(scores.shape) != tuple(x.visual.shape[:2]):
        raise ValueError(f"{name}: importance scores {tuple(scores.shape)} do not match the visual tokens "
                         f"{tuple(x.visual.shape[:2])}")
    if not torch.isfinite(scores).all() or not torch.isfinite(x.visual.float()).all():
        raise ValueError(f"{name}: the importance scores or visual features contain NaN or infinite values; "
                         "check the model upstream (fp16 overflow? run it in bf16 or fp32)")
    return scores


def rank_by_score(scores: torch.Tensor) -> torch.Tensor:
    """[B, N] indices by descending score; ties keep the lower index first."""
    return scores.argsort(dim=1, descending=True, stable=True)


class ImportanceRanked(TokenCompressor):
    """Base of the methods that rank tokens by :func:`importance_signal` at one pre-LLM site
    (``fastervlm``, ``vispruner``): ``needs`` holds the signal that the ``importance`` option
    picks, resolved against the adapter in ``schedule``. Subclasses declare ``importance`` in their
    ``Options`` and implement ``reduce``."""

    stages = (Stage.VISION_OUT, Stage.PROJECTOR)
    needs = frozenset({"cls_attention"})
    positions = "contiguous"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.needs = frozenset({signal_for_option(self.options.importance)})

    def schedule(self, n_visual: int, budget: float, info: ModelInfo) -> list[tuple[Site, int]]:
        plan = single_site_plan(n_visual, budget, info)
        self.needs = frozenset({importance_signal(self.name, self.options.importance, info,
                                                  pre_llm_site(info).stage)})
        return plan


class FasterVLM(ImportanceRanked):
    """Keep the top patches by the vision encoder's CLS attention (received attention without CLS)."""

    name = "fastervlm"
    paper = "[CLS] Attention is All You Need for Training-Free Visual Token Pruning (arXiv 2412.01818 v1)"
    source = "https://github.com/Theia-4869/FasterVLM (re-implemented from the spec, not copied)"

    class Options(TokenCompressor.Options):
        importance: Importance = Field(
            "auto", description="token score: cls (CLS attention row), received (attention received, for "
                                "encoders without CLS), auto (cls where served, else received)")

    def reduce(self, x: SiteInput) -> Reduction:
        scores = importance_scores(self.name, x)
        n = scores.shape[1]
        if x.keep >= n:
            return Reduction.keep_all(x)
        return Reduction(rank_by_score(scores)[:, :max(x.keep, 1)].sort(dim=1).values)


@tokenbench.hookimpl
def register_compressors(register):
    register(FasterVLM)
