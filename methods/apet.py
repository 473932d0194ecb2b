"""ApET: Approximation-Error guided Token compression (CVPR 2026, arXiv 2602.19870).

The algorithm, per image (spec ``methods.md`` §2):

1. pick ``basis`` tokens S by farthest-point sampling (FPS) over the visual tokens X;
2. reconstruct every token from S by ridge least squares, w_i = argmin ||x_i - Sᵀw||² + λ||w||²,
   and score it by the L2 norm of its residual: what the basis cannot explain is unique;
3. keep the ``keep`` tokens with the largest residual; the ``basis`` lowest-scoring of them become
   *basis slots* that carry the basis tokens (``basis_mode``);
4. fold every dropped token into its most cosine-similar remaining high-error token (the *targets*)
   by an unweighted mean, the target itself counted with weight ``merge_scaling``.

The LLaVA reference runs it twice: on the CLIP features before the projector (stage 1) and on the
hidden states after decoder layer 16 of 32 (stage 2), with 1.5x the budget before the stage-2 layer
and 0.5x after it, so the layer-averaged count equals the budget (288/96 for 192).

The pure tensor functions :func:`farthest_point_sampling`, :func:`approximation_error` and
:func:`apet_compress` work without the harness; :class:`ApET` is the registered ``apet`` method.

Deviations from the reference code (MaQianKun0/ApET @70cc01b), each a bug or quirk there:

- FPS start: the reference draws it from the unseeded global RNG, so runs are not reproducible.
  Here ``fps_start="random"`` draws each image's start from its own generator, which the harness
  seeds from (run seed, sample id), so batches give the draws of single samples; ``first`` and
  ``max_norm`` are deterministic alternatives.
- FPS distances: the reference computes them in the model dtype; fp16 squared distances overflow to
  inf on large hidden states and then look like "unvisited" points. Here they are fp32.
- FPS precision: beyond overflow, low-precision distances change the picks themselves: on
  576x1024 images the reference's fp16 FPS picks a different basis in about 33% of images, bf16 in
  about 83%. fp32 here picks the same basis as the reference computed in fp32.
- Hard-coded ``.half()`` (LLaVA) / ``.bfloat16()`` (Qwen) casts: here FPS, the ridge solve and the
  merge run in fp32 and the results are cast back to the input dtype. The LLaVA vision stage merges
  in fp16 (cosine and sums in half precision). That is not rounding only: its fp16 cosine picks
  a different merge target for about 0.3% of the dropped tokens, which moves about 1% of the kept
  tokens by O(1) (a source lands in another target's mean). No option reproduces it; with the casts
  taken out (fp32) the kept sets are the same and the values agree within 5e-7.
- Merge weight: here every stage computes (s·x_t + Σx_u)/(s + c) for a target x_t with c sources
  and ``merge_scaling`` s. The reference's vision and video stages compute (x_t + Σx_u)/(s + c), the
  target itself unscaled, and only its LLM stage scales it; the two agree at the default s = 1.
- Overflow: images with activations beyond 2^±40 are divided by a power of two first, which is
  exact in floating point (results are bit-identical wherever the unscaled computation is finite)
  and keeps huge activations (bf16 up to 3e38) from overflowing the fp32 Gram matrix and distances.
- Basis slot order: the reference fills the slots in ascending position order at the vision stage
  but in descending-error order at the LLM stage. Here both stages use ascending positions;
  ``basis_slots="reference"`` restores the LLM-stage order (it changes results: basis tokens land
  at other positions).
- Ties are broken towards the lower index (stable sort, first argmax), and FPS never picks a token
  twice; the reference's ``torch.topk`` order on ties is unspecified. Ties arise between identical
  tokens and also between different tokens with equal scores (equal residual norms, equal cosine to
  two targets, equal FPS distances), so where they occur the two may keep different tokens.
- The LLaVA reference runs the projector on all 576 tokens and then selects; that is the adapter's
  concern (it projects only the kept tokens), with no effect on results.
- Video reference (``basis_mode="append"``): it returns the merged tokens in descending-error order;
  the contract keeps surviving tokens in spatial order, so that order is not reproduced. The
  Video-LLaVA reference also keeps each frame's CLS token next to its 32 compressed tokens (33 per
  frame); adapters here hand the method the patch tokens only, so a frame gets 32. Its basis tokens
  follow their own frame's tokens, as here (``Reduction.extra_after``: a frame's basis tokens go
  after its last token, before the next frame's CLS token).
- LLaVA-NeXT reference: it budgets each 576-token crop (the base image and every high-resolution
  crop) on its own at the vision stage, and at the LLM stage re-prunes only the first crop's tokens.
  Here one plan covers the image's whole visual sequence at both stages, so the kept sets differ.

Video (``ModelInfo.frames`` > 1, spec §2.8): with ``video="reference"`` (the default) a video runs
the Video-LLaVA variant whatever ``basis_mode`` and ``stage2`` say: one stage, after the projector
(where the adapter offers it, else ``vision_out``), every frame compressed on its own with its own
FPS basis, ``basis_mode="append"``, the budget split evenly over the frames (largest remainders).
At 12.5% of Video-LLaVA's 8 × 256 tokens that is the reference's 22 merged + 10 basis tokens per
frame. ``video="image"`` runs the image behaviour (the options as given) on all F·h·w tokens at once.
Images (one frame) are unaffected by ``video``.

Degenerate inputs: ``keep >= N`` is a no-op; ``keep <= basis`` shrinks the basis to ``keep - 1``
so that at least one kept token receives merges (``keep == 1`` keeps the largest-norm token as the
mean of all tokens); NaN or infinite input raises ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field
from tokenbench.methods.baselines import pre_llm_site, single_site_plan

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

BasisMode = Literal["replace", "blend", "append"]
FpsStart = Literal["random", "first", "max_norm"]
SlotOrder = Literal["ascending", "error"]
# one generator for the batch, or one per image (row b's draw then depends on generator b only)
Generators = torch.Generator | Sequence[torch.Generator | None] | None

_FP32_TINY = torch.finfo(torch.float32).tiny


class ApetOutput(NamedTuple):
    """Result of :func:`apet_compress`.

    - ``keep`` [B, K]: indices of the surviving tokens in ascending original order.
    - ``values`` [B, K, D]: their features after merging / basis insertion, in the input dtype.
    - ``extra`` [B, k, D]: the basis tokens appended after them (``basis_mode="append"`` with k >= 1),
      else None.
    - ``extra_after`` [B, k]: where each ``extra`` token goes (``Reduction.extra_after``); None: after
      all kept tokens.
    """

    keep: torch.Tensor
    values: torch.Tensor
    extra: torch.Tensor | None
    extra_after: torch.Tensor | None = None


def farthest_point_sampling(x: torch.Tensor, k: int, start: FpsStart | torch.Tensor = "random",
                            generator: Generators = None) -> torch.Tensor:
    """Pick ``k`` mutually distant tokens of each image of ``x`` [B, N, D]; return [B, k] indices
    in selection order.

    The first pick is ``start``: ``"random"`` (drawn from ``generator``, or the global RNG when it
    is None; a list of generators draws image b's start from the b-th), ``"first"`` (index 0),
    ``"max_norm"`` (the largest-norm token) or a [B] index tensor.
    Each further pick is the token whose squared Euclidean distance to its nearest picked token is
    largest (fp32, first index on ties); a token is never picked twice, so ``k <= N`` is required.
    """
    _check_shape(x)
    if not 0 <= k <= x.shape[1]:
        raise ValueError(f"farthest_point_sampling: k={k} must lie in [0, {x.shape[1]}] (the token count)")
    scaled, _ = _unit_scaled(x)
    return _fps_on_scaled(scaled, k, _start_indices(scaled, start, generator))


def approximation_error(x: torch.Tensor, basis: torch.Tensor, ridge: float = 1e-5) -> torch.Tensor:
    """L2 norm of each token's residual after ridge least-squares reconstruction from ``basis``.

    ``x`` [B, N, D], ``basis`` [B, k, D] -> fp32 [B, N]: ||x_i - Sᵀw_i|| with
    (S Sᵀ + ridge·I) w_i = S x_i, solved as one k×k system per image (``torch.linalg.solve``, no
    explicit inverse), in fp32 whatever the input dtype. Errors beyond the fp32 range read inf.
    """
    _check_shape(x)
    _check_shape(basis, "basis")
    if basis.shape[0] != x.shape[0] or basis.shape[2] != x.shape[2]:
        raise ValueError(f"approximation_error: basis {tuple(basis.shape)} does not match x {tuple(x.shape)}")
    scaled, scale = _unit_scaled(torch.cat([x, basis], dim=1))
    scaled_x, scaled_basis = scaled.split([x.shape[1], basis.shape[1]], dim=1)
    return _residual_norms(scaled_x, scaled_basis, _scaled_ridge(ridge, scale)) * scale.view(-1, 1)


def apet_compress(x: torch.Tensor, keep: int, basis: int = 10, *, ridge: float = 1e-5,
                  merge_scaling: float = 1.0, basis_mode: BasisMode = "replace",
                  start: FpsStart | torch.Tensor = "random", generator: Generators = None,
                  slot_order: SlotOrder = "ascending") -> ApetOutput:
    """Compress each image of ``x`` [B, N, D] to ``keep`` tokens with ApET.

    ``basis_mode`` decides what the ``basis`` lowest-error kept positions (the slots) hold:
    ``replace`` the basis tokens themselves (LLaVA reference), ``blend`` 0.5·basis + 0.5·own
    features (Qwen2.5-VL reference), ``append``: no slots; all ``keep - basis`` kept tokens are merge
    targets and the basis tokens are returned as ``extra`` (Video-LLaVA reference). In every mode
    ``keep`` counts all output tokens, appended ones included. ``slot_order``: basis j goes to the
    j-th slot in ``ascending`` position order, or in descending-``error`` order (the reference's
    LLM stage). ``keep >= N`` returns the input unchanged; ``keep <= basis`` uses ``keep - 1`` basis
    tokens. See the module docstring for the algorithm and the choices made.
    """
    _check_shape(x)
    scaled, scale = _unit_scaled(x)  # raises on NaN / inf
    batch, n, _ = x.shape
    if keep < 1:
        raise ValueError(f"apet: keep={keep} must be at least 1")
    if keep >= n:
        return ApetOutput(torch.arange(n, device=x.device).repeat(batch, 1), x, None)
    n_basis = min(basis, keep - 1)
    n_targets = keep - n_basis

    picks = _fps_on_scaled(scaled, n_basis, _start_indices(scaled, start, generator))
    basis_rows = _gather_rows(scaled, picks)
    errors = _residual_norms(scaled, basis_rows, _scaled_ridge(ridge, scale))
    by_error = errors.argsort(dim=1, descending=True, stable=True)

    targets = by_error[:, :n_targets]
    sources = by_error[:, n_targets:] if basis_mode == "append" else by_error[:, keep:]
    merged = _merge_into_targets(scaled, targets, sources, merge_scaling)
    if basis_mode == "append":
        positions, values = targets, merged
        extra = _gather_rows(x, picks) if n_basis else None
    else:
        slots = by_error[:, n_targets:keep]
        if slot_order == "ascending":
            slots = slots.sort(dim=1).values
        slot_values = basis_rows
        if basis_mode == "blend":
            slot_values = 0.5 * basis_rows + 0.5 * _gather_rows(scaled, slots)
        positions = torch.cat([targets, slots], dim=1)
        values, extra = torch.cat([merged, slot_values], dim=1), None

    positions, order = positions.sort(dim=1)
    values = (_gather_rows(values, order) * scale).to(x.dtype)
    return ApetOutput(positions, values, extra)


def split_budget(n_visual: int, budget: float, llm_layers: int, stage2_layer: int) -> tuple[int, int]:
    """Visual tokens (V1, V2) before and from ``stage2_layer`` on, so that the layer average is
    ``budget`` and V1 = 3·V2 as in the reference (1.5x / 0.5x the budget when ``stage2_layer`` is
    the middle layer, e.g. 288/96 for 192 on 32 layers).

    With l = ``stage2_layer`` of L layers: (l·V1 + (L-l)·V2) / L = budget and V1 = 3·V2 give
    V2 = budget·L / (2l + L). V2 is rounded and V1 solved from the average, so the realised average
    is within half a token of the budget. When V1 would exceed ``n_visual``, stage 1 keeps all
    tokens and V2 absorbs the rest; when the 3:1 split cannot be rounded (shallow stage-2 layer,
    tiny budget) both stages keep round(budget).
    """
    total = budget * llm_layers
    v2 = max(1, round(total / (2 * stage2_layer + llm_layers)))
    v1 = round((total - (llm_layers - stage2_layer) * v2) / stage2_layer)
    if v1 > n_visual:
        v1 = n_visual
        v2 = round((total - stage2_layer * n_visual) / (llm_layers - stage2_layer))
    if v1 < v2:
        v1 = v2 = round(budget)
    return v1, v2


class ApET(TokenCompressor):
    """ApET: keep the tokens a few farthest-point basis tokens reconstruct worst; merge the rest.

    Two stages by default (the LLaVA reference): before the LLM (``vision_out`` where the adapter
    offers it, else ``projector``) and on the LLM hidden states from ``stage2_layer`` on. The plan's
    ``keep`` at a site counts every token alive after it, appended basis tokens included. Merges are
    unweighted means as in the reference, so ``SiteInput.sizes`` is not used and no sizes are returned.

    Reproducing the reference variants:

    - LLaVA-1.5 / LLaVA-NeXT (``scripts/llava1_*``): the defaults; add ``basis_slots=reference`` for
      the code's LLM-stage slot order. Budgets 192/128/64 give 288/96, 192/64, 96/32.
    - Qwen2.5-VL (its LLM stage is disabled in the code): ``stage2=false basis_mode=blend
      positions=original`` at budget ``30%``; the code keeps floor(0.3·N), the plan keeps round(0.3·N).
    - Video-LLaVA: ``stage2=false basis_mode=append`` at 32 tokens per frame (22 merged + 10 basis).

    Videos (``frames`` > 1): see the module docstring; ``video=reference`` is the Video-LLaVA variant
    (per-frame basis, appended basis tokens, one stage after the projector).

    Multi-crop images (LLaVA-NeXT, spec §2.6): with ``crops=each`` (the default) every crop is
    compressed on its own, its keep the crop's share of the site's keep (largest remainders, at
    least one token per crop), with its own basis; ``crops=whole`` treats the image as one set. Both
    stages cover every crop (the reference's LLM stage re-prunes only the first V tokens of the
    span, the base crop: a quirk, not reproduced).
    """

    name = "apet"
    stages = (Stage.VISION_OUT, Stage.PROJECTOR, Stage.LLM)
    needs = frozenset()
    positions = "contiguous"
    paper = "ApET: Approximation-Error guided Token compression (CVPR 2026, arXiv 2602.19870)"
    source = "https://github.com/MaQianKun0/ApET (re-implemented from the spec, not copied)"

    class Options(TokenCompressor.Options):
        basis: int = Field(10, ge=1, description="basis tokens picked by farthest-point sampling")
        ridge: float = Field(1e-5, gt=0, description="ridge λ of the least-squares reconstruction")
        merge_scaling: float = Field(1.0, gt=0, description="weight of a target in its merge mean")
        basis_mode: BasisMode = Field("replace", description="replace (LLaVA), blend (Qwen), append (video)")
        fps_start: FpsStart = Field("random", description="first FPS pick; random uses the seeded generator")
        stage2: bool = Field(True, description="also compress the LLM hidden states (second stage)")
        stage2_layer: int | None = Field(
            None, ge=1, description="first decoder layer that sees the stage-2 sequence; default 16 of 32, "
                                    "scaled to the model's depth")
        basis_slots: Literal["ascending", "reference"] = Field(
            "ascending", description="reference: descending-error slot order at the LLM stage, as the code")
        positions: Literal["contiguous", "original"] = Field(
            "contiguous", description="LLM position ids after pruning: renumbered (LLaVA) or original (Qwen)")
        crops: Literal["each", "whole"] = Field(
            "each", description="multi-crop images: compress each crop on its own (LLaVA-NeXT reference) "
                                "or the whole image at once")
        video: Literal["reference", "image"] = Field(
            "reference", description="videos: the Video-LLaVA variant (per-frame basis, basis_mode=append, "
                                     "one stage after the projector) or the image behaviour on all frames")

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.positions = self.options.positions
        self.stochastic = self.draws_per_row = self.options.fps_start == "random"

    def schedule(self, n_visual: int, budget: float, info: ModelInfo) -> list[tuple[Site, int]]:
        if budget >= n_visual:
            return []
        if budget < 1:
            raise Infeasible(f"apet: budget {budget:g} keeps less than one visual token per layer")
        if self._video_reference(info.frames):
            return video_plan(n_visual, budget, info)
        if not self.options.stage2:
            return single_site_plan(n_visual, budget, info)
        layer = self._stage2_layer(info)
        v1, v2 = split_budget(n_visual, budget, info.llm_layers, layer)
        plan = []
        if v1 < n_visual:
            plan.append((pre_llm_site(info), v1))
        if v2 < v1:
            plan.append((Site(Stage.LLM, layer), v2))
        realised = layer_averaged_tokens(n_visual, plan, info.llm_layers)
        if abs(realised - budget) > 1:
            raise Infeasible(f"apet: the two-stage plan {v1}/{v2} averages {realised:.1f} visual tokens, "
                             f"not {budget:g}; try stage2=false")
        return plan

    def reduce(self, x: SiteInput) -> Reduction:
        if self._video_reference(x.frames):
            out = self._per_frame(x)
        elif self.options.crops == "each" and x.crop_origin is not None and len(x.crops) > 1:
            out = self._per_crop(x)
        else:
            out = self._compress(x.visual, x.keep, x)
        if out.keep.shape[1] == x.visual.shape[1]:
            return Reduction(out.keep)
        return Reduction(out.keep, out.values, out.extra, extra_after=out.extra_after)

    def _video_reference(self, frames: int) -> bool:
        return frames > 1 and self.options.video == "reference"

    def _compress(self, visual: torch.Tensor, keep: int, x: SiteInput,
                  basis_mode: BasisMode | None = None) -> ApetOutput:
        opts = self.options
        at_llm = x.site.stage is Stage.LLM
        return apet_compress(
            visual, keep, opts.basis, ridge=opts.ridge, merge_scaling=opts.merge_scaling,
            basis_mode=basis_mode or opts.basis_mode, start=opts.fps_start, generator=x.row_generators(),
            slot_order="error" if opts.basis_slots == "reference" and at_llm else "ascending")

    def _per_crop(self, x: SiteInput) -> ApetOutput:
        """ApET on each crop's tokens (crops on equal footing across the batch's rows)."""
        crop = x.crop_origin[..., 0]
        crop = torch.where(crop < 0, len(x.crops), crop)  # appended tokens form a group of their own
        return self._per_group(x, crop, len(x.crops), "crop")

    def _per_frame(self, x: SiteInput) -> ApetOutput:
        """The Video-LLaVA variant: ApET on each frame's tokens, basis tokens appended."""
        frame = torch.div(x.origin, x.grid[0] * x.grid[1], rounding_mode="floor")
        frame = torch.where(x.origin < 0, x.frames, frame)  # appended tokens form a group of their own
        return self._per_group(x, frame, x.frames, "frame", basis_mode="append")

    def _per_group(self, x: SiteInput, group: torch.Tensor, n_groups: int, what: str,
                   basis_mode: BasisMode | None = None) -> ApetOutput:
        """ApET on each group's tokens (``group`` [B, N] in [0, n_groups]; the budget split over the
        groups in proportion to their sizes), groups laid out alike in every row of the batch."""
        order = group.argsort(dim=1, stable=True)
        counts = torch.bincount(group[0], minlength=n_groups + 1)
        by_group = group.gather(1, order)
        if not torch.equal(by_group, by_group[:1].expand_as(by_group)):
            raise ValueError(f"apet: the rows of a batch hold different {what} layouts")
        grouped = _gather_rows(x.visual, order)
        keeps = crop_keeps(counts.tolist(), x.keep)
        positions, values, extras, places, offset = [], [], [], [], 0
        for count, keep in zip(counts.tolist(), keeps):
            if count and keep:
                members = order[:, offset:offset + count]
                out = self._compress(grouped[:, offset:offset + count], keep, x, basis_mode)
                positions.append(members.gather(1, out.keep))
                values.append(out.values)
                if out.extra is not None:  # a group's new tokens follow its last token
                    extras.append(out.extra)
                    places.append(members.max(dim=1, keepdim=True).values.expand(-1, out.extra.shape[1]))
            offset += count
        position, sort = torch.cat(positions, dim=1).sort(dim=1)
        value = _gather_rows(torch.cat(values, dim=1), sort)
        if not extras:
            return ApetOutput(position, value, None)
        return ApetOutput(position, value, torch.cat(extras, dim=1), torch.cat(places, dim=1))

    def _stage2_layer(self, info: ModelInfo) -> int:
        if Stage.LLM not in info.stages:
            raise Infeasible(f"apet: the {info.family} adapter offers no llm stage; "
                             "run apet with stage2=false for the single-stage variant")
        layer = self.options.stage2_layer or info.scale_layer(16)
        if not 1 <= layer < info.llm_layers:
            raise Infeasible(f"apet: stage2_layer={layer} must lie in [1, {info.llm_layers - 1}] "
                             f"for a {info.llm_layers}-layer LLM")
        return layer


def video_plan(n_visual: int, budget: float, info: ModelInfo) -> list[tuple[Site, int]]:
    """The Video-LLaVA reference's single stage: ``round(budget)`` tokens after the projector (where
    the adapter offers it, else the earliest pre-LLM site), appended basis tokens included."""
    keep = round(budget)
    if keep >= n_visual:
        return []
    site = Site(Stage.PROJECTOR) if Stage.PROJECTOR in info.stages else pre_llm_site(info)
    return [(site, keep)]


def crop_keeps(counts: list[int], keep: int) -> list[int]:
    """Split ``keep`` over groups of ``counts`` tokens in proportion (largest remainders), giving
    every non-empty group at least one token while ``keep`` allows."""
    total = sum(counts)
    if keep >= total:
        return list(counts)
    shares = [keep * c / total for c in counts]
    keeps = [min(c, max(int(s), 1 if c else 0)) for c, s in zip(counts, shares)]
    by_remainder = sorted(range(len(counts)), key=lambda i: shares[i] - int(shares[i]), reverse=True)
    while sum(keeps) < keep:
        grew = False
        for i in by_remainder:
            if sum(keeps) < keep and keeps[i] < counts[i]:
                keeps[i] += 1
                grew = True
        if not grew:
            break
    while sum(keeps) > keep:  # the one-per-group floor overshot: take from the largest groups
        largest = max(range(len(keeps)), key=lambda i: keeps[i])
        keeps[largest] -= 1
    return keeps


def _check_shape(x: torch.Tensor, what: str = "x") -> None:
    if x.dim() != 3 or not x.is_floating_point():
        raise ValueError(f"apet: {what} must be a floating-point [B, N, D] tensor, got "
                         f"{x.dtype} {tuple(x.shape)}")


def _unit_scaled(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``x`` divided by a per-image power of two, and that scale [B, 1, 1].

    Images whose max|x| lies outside [2^-40, 2^40] are scaled to put it in [1, 2); the others keep
    scale 1 (no fp32 step can overflow or underflow for them). Dividing by a power of two is exact,
    so results are bit-identical to the unscaled computation wherever that one is finite, while huge
    activations (bf16 up to 3e38) no longer overflow the Gram matrix and the squared distances.
    """
    x32 = x.float()
    peak = x32.abs().amax(dim=(1, 2), keepdim=True)  # NaN and inf propagate into the peak
    if not torch.isfinite(peak).all():
        kind = "NaN" if torch.isnan(peak).any() else "infinite"
        raise ValueError(f"apet: input contains {kind} values; ApET cannot rank tokens by reconstruction "
                         "error. Check the model upstream (fp16 overflow? run it in bf16 or fp32)")
    exponent = torch.frexp(peak).exponent - 1
    exponent = torch.where(exponent.abs() <= 40, 0, exponent)  # all-zero images: exponent -1 -> 0
    if not exponent.any():
        return x32, torch.ones_like(peak)
    scale = torch.ldexp(torch.ones_like(peak), exponent)
    return x32 / scale, scale


def _scaled_ridge(ridge: float, scale: torch.Tensor) -> torch.Tensor:
    """The ridge of the scaled problem: λ/scale² gives exactly the unscaled solution."""
    return (ridge / scale / scale).view(-1, 1, 1).clamp_min(_FP32_TINY)


def _start_indices(x: torch.Tensor, start: FpsStart | torch.Tensor, generator: Generators) -> torch.Tensor:
    batch, n, _ = x.shape
    if isinstance(start, torch.Tensor):
        return start.to(device=x.device, dtype=torch.long).reshape(batch)
    if start == "first":
        return torch.zeros(batch, dtype=torch.long, device=x.device)
    if start == "max_norm":
        return x.norm(dim=2).argmax(dim=1)
    if start == "random" and isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(f"apet: {len(generator)} generators for {batch} images; give one per image")
        return torch.cat([_random_start(n, 1, g) for g in generator]).to(x.device)
    if start == "random":
        return _random_start(n, batch, generator).to(x.device)
    raise ValueError(f"apet: unknown FPS start {start!r}; use random, first, max_norm or an index tensor")


def _random_start(n: int, count: int, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else "cpu"
    return torch.randint(0, n, (count,), generator=generator, device=device)


def _fps_on_scaled(x: torch.Tensor, k: int, first: torch.Tensor) -> torch.Tensor:
    batch, n, _ = x.shape
    rows = torch.arange(batch, device=x.device)
    picks = torch.empty(batch, k, dtype=torch.long, device=x.device)
    nearest = torch.full((batch, n), float("inf"), device=x.device)
    difference = torch.empty_like(x)  # reused: a fresh [B, N, D] temporary per pick costs ~40%
    current = first
    for i in range(k):
        picks[:, i] = current
        torch.sub(x, x[rows, current].unsqueeze(1), out=difference)
        distance = difference.square_().sum(dim=2)
        nearest = torch.minimum(nearest, distance)
        nearest[rows.unsqueeze(1), picks[:, : i + 1]] = -1.0  # never pick a token twice
        current = nearest.argmax(dim=1)
    return picks


def _residual_norms(x: torch.Tensor, basis: torch.Tensor, ridge: torch.Tensor) -> torch.Tensor:
    if basis.shape[1] == 0:
        return x.norm(dim=2)
    eye = torch.eye(basis.shape[1], device=x.device)
    gram = basis @ basis.transpose(1, 2) + ridge * eye
    coefficients = torch.linalg.solve(gram, basis @ x.transpose(1, 2))  # [B, k, N]
    return torch.baddbmm(x, coefficients.transpose(1, 2), basis, alpha=-1).norm(dim=2)


def _merge_into_targets(x: torch.Tensor, targets: torch.Tensor, sources: torch.Tensor,
                        scaling: float) -> torch.Tensor:
    """Each target becomes (scaling·x_t + Σ x_u) / (scaling + c_t) over the c_t sources u whose most
    cosine-similar target it is (first target on ties)."""
    (batch, n_targets), dims = targets.shape, x.shape[2]
    target_rows, source_rows = _gather_rows(x, targets), _gather_rows(x, sources)
    similarity = F.normalize(source_rows, dim=2) @ F.normalize(target_rows, dim=2).transpose(1, 2)
    owner = similarity.argmax(dim=2)  # [B, U] index into the targets of the same image
    owner_flat = (owner + n_targets * torch.arange(batch, device=x.device).unsqueeze(1)).reshape(-1)
    total = (scaling * target_rows).reshape(batch * n_targets, dims).index_add(
        0, owner_flat, source_rows.reshape(owner_flat.shape[0], dims))
    count = torch.full((batch * n_targets,), float(scaling), device=x.device).index_add(
        0, owner_flat, torch.ones(owner_flat.shape, device=x.device))
    return (total / count.unsqueeze(1)).view(batch, n_targets, dims)


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b, j]] for every b, j: [B, N, D] x [B, K] -> [B, K, D]."""
    batch, n, dims = x.shape
    flat = index + n * torch.arange(batch, device=index.device).unsqueeze(1)
    return x.reshape(batch * n, dims)[flat.reshape(-1)].view(batch, index.shape[1], dims)


@tokenbench.hookimpl
def register_compressors(register):
    register(ApET)
