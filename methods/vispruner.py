"""VisPruner (Zhang et al., ICCV 2025, arXiv 2412.01818 v2): a few *important* tokens by [CLS]
attention, then *diverse* tokens from the rest by repeatedly discarding the most duplicated ones,
before the projector (spec ``methods-wave2.md`` §15).

The algorithm, per image, for T = budget kept tokens and ``important_ratio`` r:

1. T_imp = ⌊T·r⌋ important, T_div = T − T_imp diverse;
2. rank all tokens by head-mean CLS attention, descending: important = the first T_imp; the
   residual list ρ = the rest, in that descending order;
3. with row-normalised features X̂, while |ρ| > T_div: split ρ by alternating list position
   (A = even positions, B = odd), give each a ∈ A its best cosine match in B, drop the
   ``min(removal_step, |ρ| − T_div, |A|)`` members of A with the highest best match, and continue
   with ρ = [surviving A by descending best match] ‖ B;
4. keep important ∪ ρ, in ascending raster order.

tokenbench mapping: one ``vision_out`` site (``projector`` on adapters without it) keeping
``round(budget)`` tokens; the layer-averaged count is the budget exactly. Deduplication uses the
site's features (CLIP features at ``vision_out``; the merged LLM-space tokens at Qwen2-VL's
``projector``). Encoders without a CLS token score by ``attention_received`` (the attention each
token receives, averaged over heads and all queries of the last ViT block: the reference's SigLIP
variant, §15.4); ``importance=auto`` picks it where no CLS row is served. FlashAttention class
``probe`` either way.

Defaults: ``important_ratio`` 0.5 (the loader default and LightCompress); the README's 64-token
example uses 0.75 (48 + 16). Which ratio produced each published cell is not stated.

Bugs of the reference code (Theia-4869/VisPruner @aefa01a) fixed here, and deviations:

- An odd |ρ| crashes the reference (its index tensors for the two halves differ in length). Here
  A takes the larger half (⌈|ρ|/2⌉ even positions) and B the rest. Every published setting has an
  even |ρ| in every round, where both agree.
- A round never drops more than |A| tokens (the reference's slice silently drops all of A then).
- Ties go to the lower index / earlier list position (stable sorts); the reference's unstable
  ``argsort`` order on ties is unspecified. Scores and similarities are fp32, fp64 for fp64
  input (reference: fp16); rounding can swap near-equal survivors and so change later rounds.
- The projector runs on the kept tokens only (the reference projects all, then selects): same
  result. LLaVA-NeXT (per-crop keeps, dropped newlines) is out of scope.

Degenerate inputs: ``keep >= N`` keeps everything; ``keep == 1`` keeps one diverse token
(T_imp = ⌊0.5⌋ = 0); identical tokens keep the lowest-ranked indices; NaN or infinite scores or
features raise ``ValueError``. ``important_ratio=1`` equals ``fastervlm``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from tokenbench.methods.fastervlm import (
    Importance,
    ImportanceRanked,
    importance_scores,
    rank_by_score,
)

import tokenbench
from tokenbench import Reduction, SiteInput, TokenCompressor

GRAM_LIMIT = 1 << 24  # similarity entries computed up front (64 MiB in fp32), else per round


def remove_duplicates(features: torch.Tensor, residual: torch.Tensor, target: int, step: int = 8) -> torch.Tensor:
    """Shrink ``residual`` [B, R] (indices into ``features`` [B, N, D], in list order) to ``target``
    tokens by VisPruner's alternating bipartite removal; returns the survivors in list order.

    The cosine similarities of the residual tokens are computed once (``GRAM_LIMIT`` entries at most,
    else per round) and each round reads its A×B block from them."""
    unit = F.normalize(features.to(torch.promote_types(features.dtype, torch.float32)), dim=2)
    batch, size = residual.shape
    gram = None
    if batch * size * size <= GRAM_LIMIT:
        rows = _rows(unit, residual)
        gram = rows @ rows.transpose(1, 2)  # [B, R, R], indexed by position in the first residual list
        residual = torch.stack([residual, torch.arange(size, device=residual.device).expand(batch, size)])
    else:
        residual = residual.unsqueeze(0)
    while True:  # residual [1|2, B, R]: the indices and, with the Gram matrix, their Gram positions
        size = residual.shape[2]
        drop = min(step, size - target, math.ceil(size / 2))
        if target <= 0 or drop <= 0:
            return residual[0, :, :max(target, 0)]
        a, b = residual[:, :, 0::2], residual[:, :, 1::2]
        if gram is None:
            similarity = _rows(unit, a[0]) @ _rows(unit, b[0]).transpose(1, 2)
        else:
            similarity = gram.gather(1, a[1].unsqueeze(-1).expand(-1, -1, gram.shape[2])).gather(
                2, b[1].unsqueeze(1).expand(-1, a.shape[2], -1))
        order = similarity.amax(dim=2).argsort(dim=1, descending=True, stable=True)[:, drop:]
        residual = torch.cat([a.gather(2, order.expand(a.shape[0], -1, -1)), b], dim=2)


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[2]))


class VisPruner(ImportanceRanked):
    """Important tokens by CLS attention plus diverse tokens by repeated duplicate removal."""

    name = "vispruner"
    paper = "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in VLMs (ICCV 2025)"
    source = "https://github.com/Theia-4869/VisPruner (re-implemented from the spec, not copied)"

    class Options(TokenCompressor.Options):
        important_ratio: float = Field(0.5, ge=0, le=1, description="share of the budget kept by CLS attention")
        removal_step: int = Field(8, ge=1, description="tokens dropped per duplicate-removal round")
        importance: Importance = Field("auto", description="token score: cls, received or auto (see fastervlm)")

    def reduce(self, x: SiteInput) -> Reduction:
        scores = importance_scores(self.name, x)
        n = scores.shape[1]
        if x.keep >= n:
            return Reduction.keep_all(x)
        keep = max(x.keep, 1)
        important = int(keep * self.options.important_ratio)
        ranked = rank_by_score(scores)
        diverse = remove_duplicates(x.visual, ranked[:, important:], keep - important, self.options.removal_step)
        return Reduction(torch.cat([ranked[:, :important], diverse], dim=1).sort(dim=1).values)


@tokenbench.hookimpl
def register_compressors(register):
    register(VisPruner)
