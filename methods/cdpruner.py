"""CDPruner (Zhang et al., NeurIPS 2025, arXiv 2506.10967): conditional DPP over relevance × diversity.

Keeps the subset of projected visual tokens that maximises the determinant of a kernel that
multiplies their pairwise similarity by their relevance to the instruction (spec
``methods-wave2.md`` §16):

1. S = cos(X, X) of the projected (LLM-space) visual tokens X, fp32;
2. relevance r_i = mean over the instruction's CLIP text embeddings t_m of −cos(E_i, t_m), where E
   are the tokens in CLIP's joint space (``clip_visual``: CLIP's post-LN and ``visual_projection``
   of the selected-layer patch features) and t the ``clip_text`` rows. The cosine is **negated**
   as in the reference (CLIP patch tokens align "the other way"; the authors' visualiser does the
   same). Then min–max: r ← (r − min + 1e-6) / (max − min);
3. kernel L = diag(r)·S·diag(r);
4. greedy MAP inference with an incremental Cholesky factor: d² = diag(L); each step picks
   j = argmax d², then e = (L_j − Σ_t c_t[j]·c_t) / √d²_j, d² −= e², and j is never picked again;
5. the picks survive in raster order; positions are renumbered (LLaVA regenerates them).

Signals: ``clip_visual`` and ``clip_text`` (spec E7), served by an adapter from the CLIP checkpoint
given as ``clip_checkpoint`` (for LLaVA-1.5 a local copy of ``openai/clip-vit-large-patch14-336``).
A checkpoint without a CLIP text tower makes the method ``Infeasible`` with the reason. No
attention: FlashAttention class ``native`` (the CLIP text tower is a separate small model).
Budget: one pre-LLM site, so T = round(B) (the reference's ``visual_token_num``).

``cdpruner-llm`` is the same method with the fallback relevance of spec §16.4, a deviation for
models without an aligned CLIP text tower (Qwen2-VL, the embedded default): r_i = −cos(X_i, mean of
the ``text`` input embeddings of the prompt after the image), with the same min–max. Its results
are CDPruner with **fallback relevance**, not the published method.

Reference quirks (Theia-4869/CDPruner @9541616) and what is done here:

- The min–max runs over the whole batch (scalar min and max), so an image's picks depend on its
  batch neighbours (and LLaVA-NeXT crops are coupled). Here each image is normalised on its own;
  ``normalize=batch`` restores the batch-wide min–max.
- When every relevance is equal the min–max divides by zero (NaN kernel); here r = 1 then.
- d² can reach 0 (duplicate tokens, more picks than the rank of S) and the reference takes √0 or
  √negative (inf / NaN, ill-defined argmax). Here, once the largest remaining d² is at most 1e-6 of
  the image's largest diagonal entry, the determinant cannot grow, and the remaining picks are the
  most relevant unpicked tokens (lowest index on ties).
- ``negate=false`` uses +cos instead of the reference's −cos (a deviation, for the fallback above
  where the reference's reason to negate, CLIP patch tokens, does not apply).
- The instruction is the prompt with LLaVA's short-answer line removed by string replacement
  (``instruction_suffix``, the reference's loader); "" embeds the whole prompt.
- The reference computes the CLIP patch post-LN in fp16; the adapter computes it in fp32.
- The reference's CUDA streams (it cannot run on CPU) are not needed.

Degenerate inputs: ``keep >= N`` keeps every token; ``keep == 1`` keeps argmax r²; identical tokens
give a rank-1 kernel (first pick by d², the rest by relevance); NaN or infinite input raises
``ValueError``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import DirectoryPath, Field
from tokenbench.methods.divprune import ProjectorPruner, check_finite

import tokenbench
from tokenbench import SiteInput, TokenCompressor

SHORT_ANSWER_LINE = "\nAnswer the question using a single word or phrase."
STALL = 1e-6  # a pivot below this share of the image's largest diagonal entry adds nothing


def minmax_relevance(scores: torch.Tensor, per_image: bool = True) -> torch.Tensor:
    """The reference's (r − min + 1e-6) / (max − min), per image [B, N] or over the whole batch;
    1 everywhere where all scores are equal."""
    dims = (1,) if per_image else (0, 1)
    low, high = scores.amin(dim=dims, keepdim=True), scores.amax(dim=dims, keepdim=True)
    spread = high - low
    normalised = (scores - low + 1e-6) / torch.where(spread > 0, spread, torch.ones_like(spread))
    return torch.where(spread > 0, normalised, torch.ones_like(scores))


def clip_relevance(clip_visual: torch.Tensor, clip_text: torch.Tensor) -> torch.Tensor:
    """Mean over the M text rows of −cos(patch, text): [B, N, Dc] × [B, M, Dc] → [B, N]."""
    return -(F.normalize(clip_visual.float(), dim=2) @ F.normalize(clip_text.float(), dim=2).transpose(1, 2)).mean(2)


def llm_text_relevance(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Fallback: −cos(token, mean text embedding): [B, N, D] × [B, T, D] → [B, N]."""
    return -F.cosine_similarity(visual.float(), text.float().mean(dim=1, keepdim=True), dim=2)


def conditional_kernel(visual: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """L = diag(r)·cos(X, X)·diag(r), fp32 [B, N, N]."""
    unit = F.normalize(visual.float(), dim=2)
    return relevance.unsqueeze(2) * (unit @ unit.transpose(1, 2)) * relevance.unsqueeze(1)


def dpp_greedy(kernel: torch.Tensor, keep: int, fallback: torch.Tensor) -> torch.Tensor:
    """Greedy MAP of a DPP with kernel [B, N, N] (fast incremental Cholesky): [B, keep] picks in
    selection order. When no pivot is left (see the module docstring) the picks follow ``fallback``
    [B, N], highest first."""
    batch, n, _ = kernel.shape
    rows = torch.arange(batch, device=kernel.device)
    factors = torch.zeros(batch, keep, n, device=kernel.device)
    gains = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    floor = (gains.amax(dim=1) * STALL).clamp_min(torch.finfo(torch.float32).tiny)
    picked = torch.zeros(batch, n, dtype=torch.bool, device=kernel.device)
    picks = torch.empty(batch, keep, dtype=torch.long, device=kernel.device)
    fallback = fallback.float()
    for i in range(keep):
        best = gains.argmax(dim=1)
        pivot = gains[rows, best]
        stalled = ~(pivot > floor)
        if bool(stalled.any()):
            best = torch.where(stalled, fallback.masked_fill(picked, -float("inf")).argmax(dim=1), best)
        picks[:, i] = best
        projected = torch.einsum("bt,btn->bn", factors[rows, :i, best], factors[:, :i])
        update = (kernel[rows, best] - projected) / pivot.clamp_min(floor).sqrt().unsqueeze(1)
        update = torch.where(stalled.unsqueeze(1), torch.zeros_like(update), update)
        factors[:, i] = update
        gains = gains - update.square()
        picked[rows, best] = True
        gains = gains.masked_fill(picked, -float("inf"))
    return picks


class CDPruner(ProjectorPruner):
    """Keep the tokens that maximise a DPP determinant of instruction relevance × visual diversity."""

    name = "cdpruner"
    needs = frozenset({"clip_visual", "clip_text"})
    paper = "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs " \
            "(CDPruner, NeurIPS 2025)"
    source = "https://github.com/Theia-4869/CDPruner (re-implemented from the spec, not copied)"

    class Options(TokenCompressor.Options):
        clip_checkpoint: DirectoryPath | None = Field(
            None, description="local full CLIP checkpoint the VLM's vision tower comes from (relevance=clip)")
        relevance: Literal["clip", "llm_text"] = Field(
            "clip", description="clip (reference) or llm_text (fallback: LLM-space text input embeddings)")
        normalize: Literal["image", "batch"] = Field(
            "image", description="min-max relevance per image, or over the batch as the reference")
        instruction_suffix: str = Field(
            SHORT_ANSWER_LINE, description="removed from the prompt before CLIP encodes it (reference)")
        negate: bool = Field(True, description="relevance = −cos as the reference (false: +cos, a deviation)")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        path = self.options.clip_checkpoint
        self.clip_checkpoint = None if path is None else str(path)
        self.needs = frozenset({"clip_visual", "clip_text"}) if self.options.relevance == "clip" \
            else frozenset({"text"})

    def clip_instruction(self, prompt: str) -> str:
        suffix = self.options.instruction_suffix
        return prompt.replace(suffix, "") if suffix else prompt

    def select(self, x: SiteInput, visual: torch.Tensor, keep: int) -> torch.Tensor:
        raw = self._raw_relevance(x) if self.options.negate else -self._raw_relevance(x)
        relevance = minmax_relevance(raw, per_image=self.options.normalize == "image")
        kernel = conditional_kernel(visual, relevance)
        return dpp_greedy(kernel, keep, relevance)

    def _raw_relevance(self, x: SiteInput) -> torch.Tensor:
        if self.options.relevance == "clip":
            if x.clip_visual is None or x.clip_text is None:
                raise ValueError(f"{self.name} needs the clip_visual and clip_text signals; the adapter did not "
                                 "provide them")
            return clip_relevance(check_finite(self.name, x.clip_visual), x.clip_text)
        if x.text is None:
            raise ValueError(f"{self.name} with relevance=llm_text needs the text signal")
        return llm_text_relevance(x.visual, x.text)


class CDPrunerLLMText(CDPruner):
    """CDPruner with the fallback relevance (LLM-space text embeddings), for models without CLIP text."""

    name = "cdpruner-llm"
    paper = "CDPruner with fallback relevance (spec §16.4; not the published method)"

    class Options(CDPruner.Options):
        relevance: Literal["clip", "llm_text"] = Field(
            "llm_text", description="llm_text (this variant's fallback) or clip (the reference)")


@tokenbench.hookimpl
def register_compressors(register):
    register(CDPruner)
    register(CDPrunerLLMText)
