"""VisionZip (Yang et al., CVPR 2025, arXiv 2412.04467): dominant tokens by [CLS] attention plus a
few contextual tokens merged by key similarity, before the projector (spec ``methods-wave2.md`` §10).

The algorithm, per image, with ``d`` dominant and ``c`` contextual slots (d + c = budget):

1. score every patch by the head-mean CLS attention of the selected vision block;
2. dominant = the top patches by score, kept in ascending raster order;
3. the remaining patches R, in ascending index order, with L2-normalised metric rows (the block's
   head-mean keys; the features where the adapter serves no keys);
4. targets = the patches at positions ``j·max(1, ⌊|R|/c⌋)``, j < c, *of R* (not of the grid);
5. every other patch of R goes to its most cosine-similar target (first target on ties);
6. contextual token j = target j + the **mean** of its members (the reference adds the target to
   the mean; with no members it is the target alone);
7. output [dominant ‖ contextual]: the contextual tokens are ``Reduction.extra``.

CLS (``cls``): the reference spends one dominant slot on the vision encoder's CLS token and puts
it first (d−1 patches). ``cls=first`` reproduces that (the ``cls_token`` signal, placed by
``Reduction.prefix``); it needs an encoder with a CLS token. The default ``cls=drop`` spends that
slot on one more dominant patch (d patches), since the LLM was never trained on the CLS token;
this deviation changes results.

Budget: one pre-LLM site (``vision_out``, else ``projector``) whose ``keep`` counts every output
token: dominant patches, the CLS prefix and the appended contextual tokens, so the layer-averaged
count is the budget exactly. c = ``contextual`` if given, else round(``contextual_ratio``·budget),
at most budget−1: the published splits 54+10 / 108+20 / 162+30 for 64 / 128 / 192 are
round(5B/32) (``contextual_ratio`` = 5/32). The reference function's default 191+30 is not a
published budget.

Encoders without a CLS token (Qwen2-VL): ``importance=auto`` scores by ``attention_received``
(VisPruner's recipe, §15.4), and ``metric=auto`` merges by the projected features because no keys
are served at the ``projector`` stage; FlashAttention class ``probe`` either way.

Deviations from the reference code (dvlab-research/VisionZip @3151f6d):

- fp32 scores and merge (the reference runs fp16): rounding only; ties go to the lower index.
- Head-mean CLS attention instead of the head sum: the same ranking.
- Every vision block runs with the model's kernel (the reference patches all 24 CLIP blocks to
  eager with ``output_attentions=True`` although it reads one row of block 22).
- c > |R| cannot happen: the plan keeps fewer tokens than the image has, and c ≤ budget − 1.
- LLaVA-NeXT (per-crop splits, dropped newlines) and VisionZip‡ (fine-tuned projector) are out of
  scope.

Degenerate inputs: ``keep >= N`` keeps everything (no CLS, no merge); ``keep == 1`` keeps the top
patch (``cls=first``: the CLS token alone); identical tokens keep the lowest indices and merge into
the first target; NaN or infinite scores or features raise ``ValueError``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from tokenbench.methods.baselines import pre_llm_site, single_site_plan
from tokenbench.methods.fastervlm import (
    Importance,
    importance_scores,
    importance_signal,
    rank_by_score,
    signal_for_option,
)

import tokenbench
from tokenbench import Infeasible, ModelInfo, Reduction, Site, SiteInput, Stage, TokenCompressor

CONTEXTUAL_RATIO = 5 / 32


def contextual_count(keep: int, ratio: float = CONTEXTUAL_RATIO, fixed: int | None = None,
                     cls_first: bool = False) -> int:
    """Contextual tokens for ``keep`` output slots, leaving at least one dominant patch."""
    wanted = fixed if fixed is not None else round(ratio * keep)
    return max(0, min(wanted, keep - int(cls_first) - 1))


def contextual_tokens(features: torch.Tensor, metric: torch.Tensor, rest: torch.Tensor,
                      count: int) -> torch.Tensor:
    """VisionZip's contextual tokens [B, c, D] (fp32) from the remaining tokens ``rest`` [B, R]
    (ascending): targets every ⌊R/c⌋-th of them, the others merged into their most cosine-similar
    target by metric, each contextual token = target + mean(members)."""
    b, r = rest.shape
    step = max(1, r // count)
    positions = torch.arange(count, device=rest.device) * step
    is_target = torch.zeros(r, dtype=torch.bool, device=rest.device)
    is_target[positions] = True
    targets, members = rest[:, positions], rest[:, ~is_target]
    unit = F.normalize(_rows(metric.float(), rest), dim=2)
    similarity = unit[:, ~is_target] @ unit[:, positions].transpose(1, 2)  # [B, R - c, c]
    owner = similarity.argmax(dim=2)  # first target on ties
    feats = features.float()
    member_rows = _rows(feats, members)
    totals = feats.new_zeros(b, count, feats.shape[2]).scatter_add_(
        1, owner.unsqueeze(-1).expand(-1, -1, feats.shape[2]), member_rows)
    counts = feats.new_zeros(b, count).scatter_add_(1, owner, torch.ones_like(owner, dtype=feats.dtype))
    return _rows(feats, targets) + totals / counts.clamp_min(1).unsqueeze(-1)


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[2]))


class VisionZip(TokenCompressor):
    """Dominant tokens by CLS attention plus contextual tokens merged by key similarity."""

    name = "visionzip"
    stages = (Stage.VISION_OUT, Stage.PROJECTOR)
    needs = frozenset({"cls_attention", "keys"})
    positions = "contiguous"
    paper = "VisionZip: Longer is Better but Not Necessary in Vision Language Models (CVPR 2025)"
    source = "https://github.com/dvlab-research/VisionZip (re-implemented from the spec, not copied)"

    class Options(TokenCompressor.Options):
        contextual_ratio: float = Field(CONTEXTUAL_RATIO, ge=0, le=1,
                                        description="contextual tokens per budget token (5/32: 54+10 at 64)")
        contextual: int | None = Field(None, ge=0, description="fixed contextual count (overrides the ratio)")
        cls: Literal["drop", "first"] = Field(
            "drop", description="first: the CLS token leads the visual tokens, as the reference; drop: that "
                                "slot goes to one more dominant patch")
        importance: Importance = Field("auto", description="token score: cls, received or auto (see fastervlm)")
        metric: Literal["auto", "keys", "visual"] = Field(
            "auto", description="merge similarity: the block's keys (reference), the features, or keys where "
                                "served")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.needs = self._needs(signal_for_option(self.options.importance), self.options.metric != "visual")

    def _needs(self, importance: str, keys: bool) -> frozenset[str]:
        return frozenset({importance} | ({"keys"} if keys else set())
                         | ({"cls_token"} if self.options.cls == "first" else set()))

    def schedule(self, n_visual: int, budget: float, info: ModelInfo) -> list[tuple[Site, int]]:
        plan = single_site_plan(n_visual, budget, info)
        stage = pre_llm_site(info).stage
        importance = importance_signal(self.name, self.options.importance, info, stage)
        if self.options.cls == "first" and not info.serves("cls_token", stage):
            raise Infeasible(f"visionzip: cls=first needs cls_token, which the {info.family} adapter does not "
                             f"serve at {stage} (its encoder has no CLS token there); use cls=drop")
        keys = self.options.metric == "keys" or (self.options.metric == "auto" and info.serves("keys", stage))
        if self.options.metric == "keys" and not info.serves("keys", stage):
            raise Infeasible(f"visionzip: metric=keys needs keys, which the {info.family} adapter does not "
                             f"serve at {stage}; use metric=auto")
        self.needs = self._needs(importance, keys)
        return plan

    def reduce(self, x: SiteInput) -> Reduction:
        scores = importance_scores(self.name, x)
        b, n, _ = x.visual.shape
        if x.keep >= n:
            return Reduction.keep_all(x)
        first = self.options.cls == "first"
        if first and x.cls_token is None:
            raise ValueError("visionzip: cls=first needs the cls_token signal; the adapter did not provide it")
        keep = max(x.keep, 1)
        count = contextual_count(keep, self.options.contextual_ratio, self.options.contextual, first)
        dominant = keep - count - int(first)
        ranked = rank_by_score(scores)
        kept = ranked[:, :dominant].sort(dim=1).values
        prefix = x.cls_token.to(x.visual.dtype) if first else None
        if count == 0:
            return Reduction(kept, prefix=prefix)
        is_dominant = torch.zeros(b, n, dtype=torch.long, device=x.visual.device).scatter_(1, kept, 1)
        rest = is_dominant.sort(dim=1, stable=True).indices[:, :n - dominant]  # ascending non-dominant
        metric = x.visual if self.options.metric == "visual" or x.keys is None else x.keys
        extra = contextual_tokens(x.visual, metric, rest, count).to(x.visual.dtype)
        return Reduction(kept, extra=extra, prefix=prefix)


@tokenbench.hookimpl
def register_compressors(register):
    register(VisionZip)
