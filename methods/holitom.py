"""HoliTom (NeurIPS 2025, arXiv 2505.21334): holistic token merging for video, the outer (pre-LLM) part.

Spec ``methods-wave2.md`` §17.3. For a video of F frames of n = h·w tokens, frame-major:

1. sim[f, i] = cosine of token i in frames f and f+1 (same grid position).
2. A window of frames [s, e] is worth (number of positions i whose similarity stays above ``tau``
   over every consecutive pair of the window) × (e − s): the tokens saved by collapsing its static
   positions to one token each.
3. Dynamic programming over the frames (windows of 2 .. ``max_window`` frames; a larger value must
   beat the best so far strictly, shorter windows first) splits the video into segments that save
   the most, R in total.
4. The retain ratio is corrected for the collapse: ρ' = min(keep / (F·n − R), 1).
5. In each segment, a static position becomes one token, the mean over the segment's frames; the
   other ("dynamic") positions stay per frame. Single-frame segments are all dynamic.
6. Each frame's dynamic tokens keep their share: the ``dominant`` part is the top tokens by received
   attention (``attention_received``); with ``contextual`` > 0 the rest of the share are density-peak
   cluster centres of the remaining dynamic tokens, merged as in step 7.
7. A segment's static tokens are clustered by DPC-kNN into their share: distance = Euclidean/√D,
   density = exp(−mean squared distance to the k nearest, k = min(``k_neighbors``, clusters)),
   δ = distance to the nearest denser token (the largest distance if none), centres = the top
   density·δ. Every other token joins its nearest centre, and a centre becomes
   ``beta``·centre + (1 − ``beta``)·mean(members) (``no_beta``: the mean of centre and members).

Layout (tokenbench contract): every surviving token is a kept index with its merged value. A static
cluster sits at its centre's grid position in the segment's **first frame** (where the reference's
LLaVA-Video assembly puts it; the position is static, so no dynamic token of that frame is there).
Tokens are in frame-major, spatial order; newline tokens are the adapter's business.

Budget (spec §17.6): one site keeps ``round(budget)`` tokens of all frames (ρ = budget / (F·n)); the
site is ``projector`` where the adapter serves ``attention_received`` there (the reference works on
post-projector, pooled features), else ``vision_out``. When the static collapse leaves fewer tokens
than the budget (ρ' = 1), every remaining token is kept, so the realised count is below the plan:
a data-dependent count (``adaptive_count``: adapters run one video at a time).

Inner-LLM merge (§17.4, ``inner_merge=true``; off by default, as in the reference without
``HOLITOM_k``): before decoder layer k (``inner_layer`` 18 of 28 as in the scripts, scaled to the
model's depth) the visual tokens the last prompt token attends to most in layer k−1 survive
(``inner_ratio`` r = 0.5 drops half), keeping their original position ids. Every dropped token u picks
its most cosine-similar survivor t (similarities taken once, before any merge), and the survivors
absorb their sources in index order, x_t ← (x_t + x_u)/2 each time, so a target with sources
u_1 < … < u_m becomes x_t/2^m + Σ_i x_{u_i}/2^(m−i+1) (computed at once here). Budget: the outer
count V1 and the inner one V2 = round(V1·(1 − r)) satisfy (k·V1 + (L − k)·V2)/L = budget
(ρ = budget / (0.821·N) on Qwen2-7B). Class ``probe`` either way (one attention row).

Deviations from the reference (cokeshao/HoliTom @e9b2972, ``holitom/llava_arch.py``):

- Fixed: the contextual branch (``D`` > 0, here ``contextual``) crashes in the reference (quirk 1:
  it masks the 2-D position tensor with a 3-D mask); here it runs as the spec describes.
- Shares: the reference keeps ceil(n_d·ρ') dynamic tokens per frame and round(n_s·ρ') static
  clusters per segment, which overshoots the budget by up to one token per frame. Here the budget is
  spread over those groups by largest remainders (ties: earlier groups; a segment's static group
  before its frames), so the count is exact; the contextual part of a frame's share is
  share − round(share·(1 − contextual)), as the reference splits its ceil.
- DPC density noise (quirk 3): the reference adds U(0, 1e-6) from the unseeded global RNG to break
  density ties. Here ties are broken by index: of two equal densities the lower index counts as
  denser, which is what the noise does with probability one half, but reproducibly.
- Ties elsewhere (received attention, scores, nearest centre) go to the lower index.
- Order: the LLaVA-OV assembly lists static tokens before each segment's dynamic ones; the contract
  keeps tokens in original order (the LLaVA-Video assembly's order).
- Inner merge: the reference ranks and merges batch element 0 only, with the video span of the first
  sample, and merges in the model dtype one source at a time; here each row uses its own attention
  and span, and the closed form runs in fp32 before the cast back. It keeps the plan's count V2
  (equal to the reference's round(V·(1 − r)) unless the outer stage kept fewer than V1).
- Images (one frame): the reference leaves images untouched. Here an image is one single-frame
  segment, so HoliTom reduces to a top-k on received attention (a FasterVLM-like extension, not a
  reproduction).

Degenerate inputs: ``keep >= N`` is a no-op; ``keep = 1`` keeps one token (a static cluster or the
most-attended token, whichever group's remainder is largest); identical frames form one segment
whose positions are all static; NaN or infinite input raises ``ValueError``. Rows of a batch whose
static collapse leaves them different counts raise ``ValueError`` (adapters run one video at a time).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field
from tokenbench.methods.baselines import pre_llm_site

import tokenbench
from tokenbench import Infeasible, ModelInfo, Reduction, Site, SiteInput, Stage, TokenCompressor


def consecutive_similarity(video: torch.Tensor) -> torch.Tensor:
    """Cosine of each grid position in frames f and f+1: [F, n, D] -> [F-1, n] (fp32)."""
    return F.cosine_similarity(video[:-1].float(), video[1:].float(), dim=2)


def window_savings(similarity: torch.Tensor, tau: float) -> torch.Tensor:
    """[F, F] int64: for e > s, the positions static over frames s..e (similarity > ``tau`` for every
    consecutive pair) times (e − s), the tokens collapsing the window saves; 0 elsewhere."""
    frames = similarity.shape[0] + 1
    above = (similarity > tau).long()
    savings = torch.zeros(frames, frames, dtype=torch.long)
    for start in range(frames - 1):
        static = above[start:].cumprod(dim=0).sum(dim=1).cpu()  # window start..start+1+j
        savings[start, start + 1:] = static * torch.arange(1, frames - start)
    return savings


def segment_frames(savings: torch.Tensor, max_window: int) -> tuple[list[tuple[int, int]], int]:
    """Disjoint segments (start, end) covering every frame that maximise the saved tokens, and that
    total (the dynamic programme of spec §17.3 step 3)."""
    table = savings.tolist()
    frames = len(table)
    best, start_of = [0] * frames, [0] * frames
    for i in range(frames):
        value, start = (best[i - 1] if i else 0), i
        for size in range(2, min(i + 1, max_window) + 1):
            j = i - size
            candidate = (best[j] if j >= 0 else 0) + table[j + 1][i]
            if candidate > value:
                value, start = candidate, j + 1
        best[i], start_of[i] = value, start
    segments, i = [], frames - 1
    while i >= 0:
        segments.append((start_of[i], i))
        i = start_of[i] - 1
    return segments[::-1], best[-1]


def share_counts(sizes: list[int], keep: int, total: int) -> list[int]:
    """Split ``keep`` over groups of ``sizes`` (summing to ``total``) in proportion, largest
    remainders first (ties: earlier groups); exact in integers."""
    if keep >= total:
        return list(sizes)
    floors = [size * keep // total for size in sizes]
    remainders = [size * keep % total for size in sizes]
    order = sorted(range(len(sizes)), key=lambda g: -remainders[g])
    for g in order[: keep - sum(floors)]:
        floors[g] += 1
    return floors


def dpc_centres(tokens: torch.Tensor, clusters: int, k_neighbors: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak centres of ``tokens`` [m, D] (ascending indices) and the distance matrix [m, m]."""
    m, dims = tokens.shape
    distance = torch.cdist(tokens, tokens) / dims ** 0.5
    k = min(k_neighbors, clusters)
    nearest = distance.topk(k, dim=1, largest=False).values
    density = (-nearest.square().mean(dim=1)).exp()
    index = torch.arange(m, device=tokens.device)
    denser = (density.unsqueeze(0) > density.unsqueeze(1)) | (
        (density.unsqueeze(0) == density.unsqueeze(1)) & (index.unsqueeze(0) < index.unsqueeze(1)))
    delta = torch.where(denser, distance, distance.max()).amin(dim=1)
    score = delta * density
    centres = score.argsort(descending=True, stable=True)[:clusters].sort().values
    return centres, distance


def cluster_merge(tokens: torch.Tensor, clusters: int, k_neighbors: int, beta: float,
                  no_beta: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN clustering of ``tokens`` [m, D] (fp32) into ``clusters`` merged tokens: (centre indices
    ascending, merged values [clusters, D])."""
    centres, distance = dpc_centres(tokens, clusters, k_neighbors)
    members = torch.ones(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    members[centres] = False
    owner = distance[members][:, centres].argmin(dim=1)
    count = torch.zeros(clusters, device=tokens.device).index_add_(0, owner, torch.ones_like(owner, dtype=torch.float))
    total = torch.zeros(clusters, tokens.shape[1], device=tokens.device).index_add_(0, owner, tokens[members])
    centre_rows = tokens[centres]
    if no_beta:
        merged = (centre_rows + total) / (1 + count).unsqueeze(1)
    else:
        mean = total / count.clamp_min(1).unsqueeze(1)
        merged = torch.where(count.unsqueeze(1) > 0, beta * centre_rows + (1 - beta) * mean, centre_rows)
    return centres, merged


@dataclass
class _Group:
    """Tokens that share one slice of the budget: a segment's static positions or one frame's dynamic ones."""

    frame: int  # the frame the group's tokens are placed in
    positions: torch.Tensor  # grid positions (within the frame)
    static_of: tuple[int, int] | None = None  # the segment, for a static group


class HoliTom(TokenCompressor):
    """HoliTom's outer part: collapse static positions of temporal segments, then keep each frame's
    most-attended dynamic tokens and cluster the static ones."""

    name = "holitom"
    stages = (Stage.PROJECTOR, Stage.VISION_OUT)
    needs = frozenset({"attention_received"})
    adaptive_count = True
    paper = "HoliTom: Holistic Token Merging for Fast Video Large Language Models (NeurIPS 2025)"
    source = "https://github.com/cokeshao/HoliTom (re-implemented from the spec, not copied)"

    class Options(TokenCompressor.Options):
        tau: float = Field(0.8, description="similarity above which a position is static between frames (T)")
        beta: float = Field(0.6, ge=0, le=1, description="weight of a cluster centre in its merged token")
        no_beta: bool = Field(False, description="merge a cluster as the plain mean of centre and members")
        contextual: float = Field(0.0, ge=0, le=1, description="share of each frame's dynamic tokens "
                                                               "that are DPC clusters (D; reference 0)")
        k_neighbors: int = Field(7, ge=1, description="neighbours of the DPC-kNN density (K)")
        max_window: int = Field(1024, ge=2, description="longest temporal segment, in frames")
        inner_merge: bool = Field(False, description="also merge inside the LLM (HOLITOM_k / HOLITOM_r)")
        inner_layer: int = Field(18, ge=1, description="first decoder layer after the inner merge, of a "
                                                       "28-layer LLM (scaled to the model's depth)")
        inner_ratio: float = Field(0.5, ge=0, lt=1, description="share of the visual tokens the inner "
                                                                "merge drops (HOLITOM_r)")

    def __init__(self, **options) -> None:
        super().__init__(**options)
        if self.options.inner_merge:
            self.needs = self.needs | {"attention"}
            self.stages = (*self.stages, Stage.LLM)

    def schedule(self, n_visual: int, budget: float, info: ModelInfo) -> list[tuple[Site, int]]:
        keep = round(budget)
        if keep >= n_visual:
            return []
        if keep < 1:
            raise Infeasible(f"holitom: budget {budget:g} keeps no visual token")
        per_frame = info.grid[0] * info.grid[1]
        if info.frames > 1 and per_frame * info.frames != n_visual:
            raise Infeasible(f"holitom needs {info.frames} full frames of {per_frame} tokens, but the "
                             f"{info.family} adapter reports {n_visual} visual tokens")
        if self.options.inner_merge:
            return self._two_stage_plan(n_visual, budget, info)
        return [(self._outer_site(info), keep)]

    def site_needs(self, site: Site) -> frozenset[str]:
        return frozenset({"attention"} if site.stage is Stage.LLM else {"attention_received"})

    def _outer_site(self, info: ModelInfo) -> Site:
        if Stage.PROJECTOR in info.stages and info.serves("attention_received", Stage.PROJECTOR):
            return Site(Stage.PROJECTOR)
        if Stage.VISION_OUT in info.stages and info.serves("attention_received", Stage.VISION_OUT):
            return Site(Stage.VISION_OUT)
        return pre_llm_site(info)  # the signal check then names what is missing

    def _two_stage_plan(self, n_visual: int, budget: float, info: ModelInfo) -> list[tuple[Site, int]]:
        if Stage.LLM not in info.stages:
            raise Infeasible(f"holitom: the {info.family} adapter offers no llm stage for the inner merge; "
                             "run with inner_merge=false")
        layers, layer, kept = info.llm_layers, info.scale_layer(self.options.inner_layer, of=28), 1 - self.options.inner_ratio
        outer = round(budget * layers / (layer + (layers - layer) * kept))
        if outer >= n_visual:
            raise Infeasible(f"holitom: with the inner merge at layer {layer}, a budget of {budget:g} needs "
                             f"more than all {n_visual} tokens before it; run with inner_merge=false")
        inner = max(1, round(outer * kept))
        return [(self._outer_site(info), outer), (Site(Stage.LLM, layer), inner)]

    def reduce(self, x: SiteInput) -> Reduction:
        batch, n, _ = x.visual.shape
        if x.keep >= n:
            return Reduction.keep_all(x)
        if x.site.stage is Stage.LLM:
            return self._inner_merge(x)
        if x.attention_received is None:
            raise ValueError("holitom needs the attention_received signal (received attention of the "
                             "vision encoder's selected block)")
        if not torch.isfinite(x.visual.float()).all():
            raise ValueError("holitom: input contains NaN or infinite values; check the model upstream")
        frames = x.frames
        if frames > 1:
            full = torch.arange(frames * x.grid[0] * x.grid[1], device=x.origin.device)
            if n != full.numel() or not torch.equal(x.origin, full.expand_as(x.origin)):
                raise ValueError(f"holitom needs every token of a video's frames in frame-major order "
                                 f"(frames={frames}, grid {x.grid}, {n} tokens); run it as the first reduction")
        rows = [self._reduce_video(x.visual[b], x.attention_received[b], frames, x.keep) for b in range(batch)]
        counts = {keep.numel() for keep, _ in rows}
        if len(counts) > 1:
            raise ValueError(f"holitom: the videos of this batch keep different counts {sorted(counts)} "
                             "(static collapse left some below the budget); run one video at a time")
        keep = torch.stack([k for k, _ in rows])
        values = torch.stack([v for _, v in rows]).to(x.visual.dtype)
        return Reduction(keep, values)

    def _reduce_video(self, visual: torch.Tensor, attention: torch.Tensor, frames: int,
                      keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(kept indices ascending, their values) for one video [F·n, D]."""
        opts = self.options
        per_frame = visual.shape[0] // frames
        video = visual.float().view(frames, per_frame, -1)
        received = attention.float().view(frames, per_frame)
        similarity = consecutive_similarity(video)
        segments, saved = segment_frames(window_savings(similarity, opts.tau), opts.max_window)
        groups: list[_Group] = []
        everywhere = torch.arange(per_frame, device=visual.device)
        for start, end in segments:
            static = (similarity[start:end] > opts.tau).all(dim=0) if end > start else None
            if static is not None and static.any():
                groups.append(_Group(start, everywhere[static], static_of=(start, end)))
            dynamic = everywhere if static is None else everywhere[~static]
            groups.extend(_Group(t, dynamic) for t in range(start, end + 1))
        shares = share_counts([g.positions.numel() for g in groups], keep, frames * per_frame - saved)
        indices, values = [], []
        for group, share in zip(groups, shares):
            if share == 0:
                continue
            if group.static_of is not None:
                start, end = group.static_of
                tokens = video[start:end + 1, group.positions].mean(dim=0)
                centres, merged = cluster_merge(tokens, share, opts.k_neighbors, opts.beta, opts.no_beta)
                picked, value = group.positions[centres], merged
            else:
                picked, value = self._dynamic(video[group.frame, group.positions],
                                              received[group.frame, group.positions], group.positions, share)
            indices.append(group.frame * per_frame + picked)
            values.append(value)
        index = torch.cat(indices)
        order = index.argsort()
        return index[order], torch.cat(values)[order]

    def _inner_merge(self, x: SiteInput) -> Reduction:
        """§17.4: keep the most-attended tokens; halve each dropped token into its nearest survivor."""
        if x.attention is None:
            raise ValueError("holitom's inner merge needs the attention signal (last prompt token's row)")
        hidden = x.visual.float()
        if not torch.isfinite(hidden).all():
            raise ValueError("holitom: input contains NaN or infinite values; check the model upstream")
        dims = hidden.shape[2]
        ranked = x.attention.float().mean(dim=1).argsort(dim=1, descending=True, stable=True)
        targets = ranked[:, :x.keep].sort(dim=1).values
        sources = ranked[:, x.keep:].sort(dim=1).values  # merged in index order
        target_rows, source_rows = (hidden.gather(1, i.unsqueeze(2).expand(-1, -1, dims)) for i in (targets, sources))
        similarity = F.normalize(source_rows, dim=2) @ F.normalize(target_rows, dim=2).transpose(1, 2)
        owner = similarity.argmax(dim=2)  # [B, U], first target on ties
        # m_t sources per target; the i-th of them (1-based, index order) weighs 2^-(m_t - i + 1)
        one_hot = F.one_hot(owner, x.keep).float()  # [B, U, K]
        later = one_hot.flip(1).cumsum(dim=1).flip(1)  # sources of the same target at or after u
        weight = torch.exp2(-(later * one_hot).sum(dim=2))  # [B, U]
        count = one_hot.sum(dim=1)  # [B, K]
        merged = target_rows * torch.exp2(-count).unsqueeze(2) + one_hot.mul(weight.unsqueeze(2)).transpose(1, 2) @ source_rows
        return Reduction(targets, merged.to(x.visual.dtype))

    def _dynamic(self, tokens: torch.Tensor, received: torch.Tensor, positions: torch.Tensor,
                 share: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One frame's dynamic tokens: the dominant ones by received attention, plus contextual clusters."""
        dominant = round(share * (1 - self.options.contextual))
        ranked = received.argsort(descending=True, stable=True)
        top = ranked[:dominant].sort().values
        picked, value = positions[top], tokens[top]
        contextual = share - dominant
        if contextual:
            rest = ranked[dominant:].sort().values
            opts = self.options
            centres, merged = cluster_merge(tokens[rest], contextual, opts.k_neighbors, opts.beta, opts.no_beta)
            picked, value = torch.cat([picked, positions[rest[centres]]]), torch.cat([value, merged])
        return picked, value


@tokenbench.hookimpl
def register_compressors(register):
    register(HoliTom)
