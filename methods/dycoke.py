"""DyCoke (CVPR 2025, arXiv 2411.15024): token temporal merging (TTM) across frame groups, then
dynamic KV-cache pruning at decode time.

Spec ``methods-wave2.md`` §18. A video's frames form groups of four, t = 4g .. 4g+3. Frame 4g is
kept whole. Every other frame keeps only its tokens least similar (cosine at the same grid
position) to a reference frame, and drops the rest as redundant with it:

- frame 4g+1 and frame 4g+3 against the frame just before them (the reference's stage 1, pairs
  (f, f+1) for even f);
- frame 4g+2 against frame 4g (stage 2, groups of four).

Similarities are taken on the input features, so frame 4g+3 compares with frame 4g+2 as it entered,
as in the reference. Nothing is averaged: "merging" is dropping tokens a kept frame already shows.

Budget (spec §18.5): one ``projector`` site (``vision_out`` where there is none) keeps ``round(budget)``
tokens. Whole frames cost h·w tokens each; the rest of the budget is shared over the pruned frames
as equally as possible (largest remainders, earlier frames first), so the plan's count is met
exactly. The reference's merge ratio k relates as keep = (whole + pruned·(1−k))·h·w, i.e.
k = 1 − (4f − 1)/3 for a kept fraction f at frames a multiple of 4. A kept fraction below the whole
frames' share (25% at frames a multiple of 4) is ``Infeasible``.

Deviations from the reference (KD-TAO/DyCoke @dd74634, ``dycole_ttm``), each a bug or quirk there:

- Per-frame counts: the reference keeps int((1−k)·h·w) tokens of every pruned frame; here the
  budget's count is spread over the pruned frames (they differ by at most one token).
- Off-by-one (quirk 1): the reference's stage 2 skips the last group of four, so its frame 4g+2 stays
  whole (9 whole frames of 32 instead of 8). ``last_group="reference"`` reproduces it; the default
  prunes every group.
- Odd frame counts (quirk 2): the reference drops the last frame of an odd count entirely and crashes
  at four frames or fewer; here every frame follows the group rule (a trailing frame 4g is whole).
- Order: the reference lists a pruned frame's tokens in ascending-similarity order; the contract keeps
  tokens in their original (frame-major, spatial) order.
- Exactly tied similarities keep the lower grid position (the reference's ``topk`` order on ties is
  unspecified). Identical frames are not exact ties: cosines of equal vectors differ by rounding.
- Hard-coded 196 tokens per frame and the visual start 14 (quirk 4): here the grid and frames come
  from the adapter (``SiteInput.grid``, ``SiteInput.frames``).

Dynamic KV pruning (spec §18.3), a ``decode`` site ``Site(DECODE, l)`` (contract extension E10), on by
default as in the paper (``decode=false``: TTM only). At every decode step, with ``a`` the head-mean
attention of the step's query at layer ``l - 1`` over the V visual entries of the cache:

1. at the first step of a generation, or when cos(a, a_prev) < ``decode_similarity`` (0.9), the view is
   the top int(V·(1 − p)) visual entries by ``a``; otherwise the previous step's view is kept;
2. ``a`` becomes ``a_prev`` for the next step, whether or not the view changed (as in the reference);
3. layers ``l..`` attend the text plus the view's visual entries; layers below ``l`` attend all.

Defaults: l = 3 of a 28-layer LLM (LLaVA-OV-7B's Qwen2), scaled to the model's depth (3 of 32 stays 3;
a 4-layer toy gets 1), p = ``decode_prune`` = 0.7 (the paper's table and README; the lmms-eval script
uses 0.8). The budget counts TTM only (prefill convention); the decode view is reported apart as
decode-time KV retention (``decode_kv_retention``, about 1 − p of the visual entries TTM left). The
decode stage runs at every budget, also when TTM keeps every token. Published DyCoke numbers that
include it ("retained 14.25 %" = TTM fraction × (1 − p)) count the decode-time view, not prefill work.

Decode-stage deviations: at a step whose attention did not shift, the reference code does not keep
the previous view as the paper and the spec describe: it resets its index list before layer l at every
step and only sets it again on a shift, so such steps attend the **whole** cache (KD-TAO/DyCoke
@dd74634, ``modeling_qwen2.py``: ``kv_cache = None`` for layers below l, ``update_cache`` only when the
cosine is below 0.9). tokenbench keeps the previous view by default, as the paper's retention figures
assume; ``decode_steady=all`` attends every visual entry at such steps, as the reference code does (one
sample at a time, since the rows' views then differ in length; the retention reported counts those
steps whole). On the steps where the reference re-selects, the views are equal (checked against its
code on random rows).
The reference keeps its state (``a_prev``) on a config object shared by every
sample and never resets it (quirk 3), so a sample's first step compares with the previous sample's
last row; here the state starts empty at every generation (the adapter passes ``None``). The
reference reads batch row 0's attention for every row; here each row has its own view. The view is
kept in ascending cache order (the reference's top-k order is unsorted; attention does not depend on
key order). Its start-14 visual span and 196 tokens per frame (quirk 4) come from the adapter here;
the visual entries are the patch tokens (a Video-LLaVA frame's CLS token and LLaVA-NeXT/OV newlines
are layout, always attended). Like the reference, the cache keeps every entry (quirk 5): attention
FLOPs at decode go down, KV memory does not.

Degenerate inputs: an image (one frame) has no frame to merge with, so any budget below all its
tokens is ``Infeasible``; ``keep >= N`` is a no-op; a keep below the whole frames' tokens raises
``ValueError`` (``schedule`` never plans one); NaN or infinite input raises ``ValueError``. The
method needs the full frame-major grid (it acts first, before the LLM).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from tokenbench.methods.baselines import pre_llm_site

import tokenbench
from tokenbench import (
    DecodeInput,
    DecodeView,
    Infeasible,
    ModelInfo,
    Reduction,
    Site,
    SiteInput,
    Stage,
    TokenCompressor,
)

LastGroup = Literal["pruned", "reference"]
DecodeSteady = Literal["previous", "all"]


def reference_frames(frames: int, last_group: LastGroup = "pruned") -> list[int]:
    """For each frame, the frame its tokens are compared with, or -1 for a frame kept whole."""
    last_start = 4 * ((frames - 1) // 4)  # the start of the last group of four
    refs = []
    for t in range(frames):
        role = t % 4
        if role == 0:
            refs.append(-1)
        elif role == 2:
            skipped = last_group == "reference" and t - 2 == last_start and frames % 4 == 0
            refs.append(-1 if skipped else t - 2)
        else:
            refs.append(t - 1)
    return refs


def pruned_frame_keeps(frames: int, per_frame: int, keep: int, last_group: LastGroup = "pruned") -> list[int]:
    """Tokens each frame keeps: all ``per_frame`` of a whole frame; the rest of ``keep`` spread over the
    pruned frames (earlier frames take the remainder). Raises ``ValueError`` below the whole frames."""
    refs = reference_frames(frames, last_group)
    pruned = [t for t, ref in enumerate(refs) if ref >= 0]
    whole = (frames - len(pruned)) * per_frame
    spare = keep - whole
    if spare < 0:
        raise ValueError(f"dycoke: keep={keep} is below the {whole} tokens of the frames kept whole")
    if not pruned:
        return [per_frame] * frames
    base, extra = divmod(min(spare, len(pruned) * per_frame), len(pruned))
    counts = [per_frame] * frames
    for rank, t in enumerate(pruned):
        counts[t] = base + (1 if rank < extra else 0)
    return counts


def dycoke_ttm(x: torch.Tensor, frames: int, keep: int, last_group: LastGroup = "pruned") -> torch.Tensor:
    """Kept token indices [B, keep'] (ascending) of ``x`` [B, frames·n, D], laid out frame-major."""
    batch, total, dims = x.shape
    if total % frames:
        raise ValueError(f"dycoke: {total} tokens do not split into {frames} equal frames")
    per_frame = total // frames
    video = x.float().view(batch, frames, per_frame, dims)
    if not torch.isfinite(video).all():
        raise ValueError("dycoke: input contains NaN or infinite values; check the model upstream")
    refs = reference_frames(frames, last_group)
    counts = pruned_frame_keeps(frames, per_frame, keep, last_group)
    pruned = [t for t, ref in enumerate(refs) if ref >= 0]
    mask = torch.ones(batch, frames, per_frame, dtype=torch.bool, device=x.device)
    if pruned:
        source = video[:, pruned]
        reference = video[:, [refs[t] for t in pruned]]
        similarity = F.cosine_similarity(source, reference, dim=3)  # [B, P, n]
        rank = similarity.argsort(dim=2, stable=True).argsort(dim=2)  # 0 = least similar
        limit = torch.tensor([counts[t] for t in pruned], device=x.device).view(1, -1, 1)
        mask[:, pruned] = rank < limit
    return mask.view(batch, total).nonzero()[:, 1].view(batch, -1)


def dynamic_kv_view(attention: torch.Tensor, keep: int, state: tuple[torch.Tensor, torch.Tensor] | None,
                    similarity: float = 0.9, steady: DecodeSteady = "previous"
                    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One decode step of DyCoke's KV pruning (§18.3) for ``attention`` [B, V]: the kept visual
    entries (ascending) and the state for the next step (this step's rows, the last chosen view).
    At a step without a shift the view is the ``previous`` one, or ``all`` V entries (the reference
    code; only for one row, since the rows' views would differ in length)."""
    attention = attention.float()
    top = attention.topk(min(keep, attention.shape[1]), dim=1).indices.sort(dim=1).values
    if state is None:
        return top, (attention, top)
    previous, kept = state
    shifted = F.cosine_similarity(attention, previous, dim=1) < similarity
    if steady == "all":
        if attention.shape[0] != 1:
            raise ValueError("dycoke decode_steady=all decodes one sample at a time")
        if not bool(shifted[0]):
            return torch.arange(attention.shape[1], device=attention.device)[None], (attention, kept)
        return top, (attention, top)
    view = torch.where(shifted[:, None], top, kept)
    return view, (attention, view)


class DyCoke(TokenCompressor):
    """DyCoke's temporal token merging: per group of four frames, the later frames keep only the
    tokens that differ from a kept reference frame; then, at decode, the layers from ``decode_layer``
    on attend only the visual KV entries the current token attends most."""

    name = "dycoke"
    stages = (Stage.PROJECTOR, Stage.VISION_OUT, Stage.DECODE)
    needs = frozenset()
    paper = "DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models (CVPR 2025)"
    source = "https://github.com/KD-TAO/DyCoke (re-implemented from the spec, not copied)"

    class Options(TokenCompressor.Options):
        last_group: LastGroup = Field(
            "pruned", description="reference: leave frame 4g+2 of the last group whole, as the code's "
                                  "off-by-one does")
        decode: bool = Field(True, description="dynamic KV pruning at decode time (false: TTM only)")
        decode_layer: int = Field(3, ge=1, description="l: the first layer that attends the pruned view, "
                                                       "of a 28-layer LLM (scaled to the model's depth)")
        decode_prune: float = Field(0.7, ge=0.0, lt=1.0, description="p: share of the visual KV entries "
                                                                     "left out of the view")
        decode_similarity: float = Field(0.9, description="re-select the view when the cosine between "
                                                          "this step's and the last step's attention is below")
        decode_steady: DecodeSteady = Field(
            "previous", description="view at a step without a shift: the previous one (paper, spec) or all "
                                    "visual entries (the reference code; one sample at a time)")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.options.decode:
            self.needs = frozenset({"decode_attention"})
        # the reference's full-cache steps make the view's length differ between rows
        self.adaptive_count = self.options.decode and self.options.decode_steady == "all"

    def schedule(self, n_visual: int, budget: float, info: ModelInfo) -> list[tuple[Site, int]]:
        plan = self._ttm_plan(n_visual, budget, info)
        if self.options.decode:
            if Stage.DECODE not in info.stages:
                raise Infeasible(f"dycoke's decode stage (dynamic KV pruning) needs a decode site, which the "
                                 f"{info.family} adapter does not offer; pass decode=false for TTM only")
            kept = plan[0][1] if plan else n_visual
            site = Site(Stage.DECODE, info.scale_layer(self.options.decode_layer, of=28))
            plan.append((site, kept if self.options.decode_steady == "all" else self._view_size(kept)))
        return plan

    def decode_view(self, x: DecodeInput, state: Any) -> DecodeView:
        view, state = dynamic_kv_view(x.attention, min(x.keep, self._view_size(x.n_visual)), state,
                                      self.options.decode_similarity, self.options.decode_steady)
        return DecodeView(view, state)

    def _view_size(self, visual: int) -> int:
        """int(V·(1 − p)) of V visual entries, at least one."""
        return max(1, int(visual * (1 - self.options.decode_prune)))

    def _ttm_plan(self, n_visual: int, budget: float, info: ModelInfo) -> list[tuple[Site, int]]:
        keep = round(budget)
        if keep >= n_visual:
            return []
        if info.frames < 2:
            raise Infeasible("dycoke merges tokens across the frames of a video; an image (one frame) has "
                             "no frame to merge with, so it can only run with every token")
        per_frame = info.grid[0] * info.grid[1]
        if per_frame * info.frames != n_visual:
            raise Infeasible(f"dycoke needs {info.frames} full frames of {per_frame} tokens, but the "
                             f"{info.family} adapter reports {n_visual} visual tokens")
        refs = reference_frames(info.frames, self.options.last_group)
        whole = refs.count(-1) * per_frame
        if keep < whole:
            raise Infeasible(f"dycoke keeps {refs.count(-1)} of {info.frames} frames whole, so its budget "
                             f"cannot go below {whole} tokens ({100 * whole / n_visual:.1f}% of "
                             f"{n_visual}; asked {budget:g})")
        site = Site(Stage.PROJECTOR) if Stage.PROJECTOR in info.stages else pre_llm_site(info)
        return [(site, keep)]

    def reduce(self, x: SiteInput) -> Reduction:
        n = x.visual.shape[1]
        if x.keep >= n:
            return Reduction.keep_all(x)
        full = torch.arange(x.frames * x.grid[0] * x.grid[1], device=x.origin.device)
        if x.frames < 2 or n != full.numel() or not torch.equal(x.origin, full.expand_as(x.origin)):
            raise ValueError(f"dycoke needs every token of a video's frames in frame-major order (frames="
                             f"{x.frames}, grid {x.grid}, {n} tokens); run it as the first reduction")
        return Reduction(dycoke_ttm(x.visual, x.frames, x.keep, self.options.last_group))


@tokenbench.hookimpl
def register_compressors(register):
    register(DyCoke)
