"""The compressor contract: a token-compression method is a policy over tensors.

A :class:`TokenCompressor` never sees the model, its masks, caches or position ids. The adapter
of a VLM family calls :meth:`TokenCompressor.schedule` once per image to learn where the method
acts (:class:`Site`) and how many visual tokens survive each site, and then calls
:meth:`TokenCompressor.reduce` at each site with a :class:`SiteInput` that holds the visual tokens
and only the extra signals the method declared in ``needs``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict

SIGNALS = frozenset({"attention", "keys", "text", "cls_attention", "cls_token", "attention_received"})
#: Signals that read a vision encoder's attention: a CLS row, or received attention streamed over
#: query chunks beside the fused kernel (never a full map), or the next block's CLS row (E2); each
#: makes a method ``probe``.
VISION_ATTENTION_SIGNALS = frozenset({"cls_attention", "attention_received", "cls_attention_next"})
# Signals of the LLM's hidden states and KV cache at ``llm`` sites (spec wave 2, E4/E5): see SiteInput.
LLM_STATE_SIGNALS = frozenset({"key_l1", "final_norm", "input_states"})
SIGNALS = SIGNALS | LLM_STATE_SIGNALS
# The SiteInput fields a need fills, where they differ from the need's own name.
SIGNAL_FIELDS: dict[str, tuple[str, ...]] = {"key_l1": ("key_l1", "text_key_l1"),
                                             "final_norm": ("normed_visual", "normed_text"),
                                             "input_states": ("input_visual", "input_text")}
# E2 (spec methods-wave2 §20): signals of the vision block *after* the selected one, computed on the
# selected features (PruMerge+). ``TokenCompressor.next_block_heads`` says how their heads combine.
NEXT_BLOCK_SIGNALS = frozenset({"cls_attention_next", "keys_next"})
# E7: the CLIP joint embedding space, from an auxiliary CLIP checkpoint (CDPruner).
CLIP_SIGNALS = frozenset({"clip_visual", "clip_text"})
SIGNALS = SIGNALS | NEXT_BLOCK_SIGNALS | CLIP_SIGNALS
# E10: the signal of ``decode`` sites: a one-row attention probe per decode step (see DecodeInput).
DECODE_SIGNALS = frozenset({"decode_attention"})
SIGNALS = SIGNALS | DECODE_SIGNALS
NextBlockHeads = Literal["mean", "concat"]
AttentionQueries = Literal["last", "text", "all"]
AttentionSource = Literal["previous", "next"]
PositionPolicy = Literal["original", "contiguous"]
FlashAttentionClass = Literal["native", "probe", "eager"]


class Stage(str, Enum):
    """Where in the VLM a reduction runs."""

    VISION = "vision"  # between vision-encoder blocks (ToMe)
    VISION_OUT = "vision_out"  # on the vision encoder's selected output, before the projector
    PROJECTOR = "projector"  # on the projector's output: visual tokens in LLM space
    LLM = "llm"  # between LLM decoder layers during prefill
    # at every decode step, before LLM layer L: which cached visual KV entries layers >= L attend
    # (spec wave 2 §20 E10; TokenCompressor.decode_view). Outside the prefill budget convention.
    DECODE = "decode"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, order=True)
class Site:
    """A stage plus the block index the reduction runs before.

    For ``llm`` the layer is the first decoder layer that sees the reduced sequence (FastV's K);
    for ``vision`` it is the first encoder block that sees it; for ``vision_out`` and ``projector``
    it is 0. For ``decode`` it is the first decoder layer that attends the decode view (at least 1:
    the view is chosen from layer ``layer - 1``'s attention).
    """

    stage: Stage
    layer: int = 0


class Infeasible(Exception):
    """Raised by :meth:`TokenCompressor.schedule` when the budget cannot be met; the message says why."""


@dataclass(frozen=True)
class Architecture:
    """The shapes FLOPs and memory accounting need, read from the model config by the adapter."""

    llm_layers: int
    llm_hidden: int
    llm_intermediate: int
    llm_heads: int
    llm_kv_heads: int
    vocab_size: int
    vision_layers: int  # encoder blocks that run up to the selected feature layer
    vision_hidden: int
    vision_intermediate: int
    vision_tokens: int  # tokens inside the vision encoder (patches, plus CLS where there is one)
    projector_in: int
    projector_hidden: int
    gated_mlp: bool = True  # SwiGLU-style third matrix in the LLM MLP
    patch_in: int = 0  # input values per vision patch (channels × patch area × frames); 0: not counted
    patches_per_token: int = 1  # vision patches per visual token entering the LLM (Qwen2-VL: merge² = 4)


@dataclass(frozen=True)
class ModelInfo:
    """What ``schedule`` may know about the model: never the modules themselves."""

    family: str
    stages: frozenset[Stage]
    grid: tuple[int, int]  # visual-token grid (h, w) of this image at the compression stages
    n_visual: int  # visual tokens of this image entering the LLM without compression
    arch: Architecture
    # The signals the adapter serves at each stage; None when the adapter does not say (then a
    # missing signal is only found when a site runs). See :func:`check_signals`.
    signals: Mapping[Stage, frozenset[str]] | None = field(default=None, compare=False, hash=False)
    # Multi-crop (anyres) images, spec wave 2 §20 E9: the (h, w) token grid of every crop, crop 0
    # first (LLaVA-NeXT: the base image, then each sub-crop's part that survives unpadding), and
    # ``grid`` is the base crop's. Empty for single-grid families. Newline tokens are layout, not
    # visual tokens, and are not counted.
    crops: tuple[tuple[int, int], ...] = ()
    # Video, spec wave 2 §20 E8: the number of frames (temporal positions) of the visual input, 1 for
    # an image. Layout is frame-major: ``grid`` is one frame's (h, w) and ``n_visual`` counts every
    # frame's tokens (frames · h · w), so a budget ratio is over all of them.
    frames: int = 1

    @property
    def llm_layers(self) -> int:
        return self.arch.llm_layers

    @property
    def vision_layers(self) -> int:
        return self.arch.vision_layers

    def scale_layer(self, layer: int, of: int = 32) -> int:
        """Map "layer ``layer`` of a ``of``-layer LLM" onto this model's depth (at least 1)."""
        scaled = round(layer * self.llm_layers / of)
        return min(max(scaled, 1), self.llm_layers - 1)

    def serves(self, signal: str, stage: Stage) -> bool:
        """Whether the adapter serves ``signal`` at ``stage`` (True when it does not say)."""
        return self.signals is None or signal in self.signals.get(stage, frozenset())


@dataclass
class SiteInput:
    """What a compressor sees at one site. Signals not declared in ``needs`` are ``None``.

    - ``visual`` [B, N, D]: the visual tokens alive at this site.
    - ``origin`` [B, N]: each token's index in the original (uncompressed) visual-token grid.
    - ``grid``: (h, w) of that original grid; ``keep``: how many tokens must survive (from the plan).
    - ``sizes`` [B, N]: how many original tokens each token stands for (1 unless merged earlier).
    - ``attention`` [B, Q, N]: head-mean softmax attention from the requested queries (see
      ``TokenCompressor.attention_queries``) to the visual tokens, normalised over the whole sequence.
    - ``keys`` [B, N, Dk]: head-mean attention keys of the block the site runs before.
    - ``text`` [B, T, Dt]: the text tokens that follow the image, in LLM space: their input embeddings
      at pre-LLM stages, their hidden states entering the site's layer at ``llm`` sites.
    - ``cls_attention`` [B, N]: head-mean attention of the vision encoder's CLS query at the selected layer.
    - ``cls_token`` [B, 1, D]: the vision encoder's CLS output at the selected layer (``vision_out``
      only; encoders without a CLS token, e.g. Qwen2-VL, cannot serve it). Place it in the visual
      span with ``Reduction.prefix``.
    - ``attention_received`` [B, N]: attention each visual token receives in the selected vision
      block, averaged over heads and over every query row (all tokens, CLS included where there is
      one), pooled like the features (Qwen2-VL: summed over each merged 2×2 group). The signal for
      encoders without a CLS token; adapters stream it over query chunks, never a full map.
    - ``cls_attention_next`` [B, N]: the CLS query's attention to the patches in the vision block *after*
      the selected one, run on the selected features (softmax over CLS + patches): the head mean, or
      with ``next_block_heads="concat"`` one softmax over the heads' concatenated q·k (scale 1/√width).
    - ``keys_next`` [B, N, Dk]: that block's keys of the patches: head-mean, or all heads concatenated
      (``next_block_heads="concat"``, Dk = the encoder width).
    - ``clip_visual`` [B, N, Dc]: the visual tokens in a CLIP joint space: the auxiliary CLIP model's
      ``visual_projection(post_layernorm(·))`` of their vision-encoder features (fp32).
    - ``clip_text`` [B, M, Dc]: the CLIP text embeddings (projected pooled output) of the instruction
      (``TokenCompressor.clip_instruction`` of the prompt), one row per ``max_position_embeddings``
      tokens (usually M = 1).
    - ``generator``: seeded by the harness; use it for any randomness. With ``generators`` set and
      more than one row it is None: draw row ``b`` from ``generators[b]`` (see :meth:`row_generators`).
    - ``generators``: one generator per row, each seeded from the run seed and that row's sample
      (``Prompt.key``), so a row's draws depend neither on its batch position nor on the batch size.

    Signals at ``llm`` sites only, each requested through ``needs`` (the layer they come from is the
    one ``TokenCompressor.attention_source`` names, like ``attention`` and ``keys``):

    - ``key_l1`` [B, N] and ``text_key_l1`` [B, T] (need ``key_l1``): L1 norms of the attention keys
      of the visual tokens and of the text after the image, heads concatenated, after the rotary
      embedding, as the layer's KV cache holds them (DART's pivots).
    - ``normed_visual`` [B, N, D] and ``normed_text`` [B, T, D] (need ``final_norm``): the hidden states
      entering the site (``visual`` and the text rows of ``text``) passed through the model's **final**
      norm, the one before the LM head (DART's similarity space).
    - ``input_visual`` [B, N0, D] and ``input_text`` [B, T, D] (need ``input_states``): the LLM's input
      embeddings (layer-0 states) of every visual token that entered the decoder, before any ``llm``
      site reduced them, and of the text after the image (SparseVLM's reference raters).
    - ``text_valid`` [B, T] bool: set when the rows of a batch have text of different lengths. Text
      rows are right-aligned (the text ends every prompt), so a shorter row's first entries are not
      its text and are False here. ``None`` means every entry is real (always so at batch 1).
    - ``crops``: (h, w) grid of every crop of a multi-crop image (``ModelInfo.crops``), else empty.
    - ``crop_origin`` [B, N, 3]: (crop, y, x) of each token's origin in the crops (-1 for appended
      tokens); ``None`` for single-grid families. Methods that rank per crop group tokens by crop.
    - ``frames``: frames of a video (``ModelInfo.frames``), 1 for an image. Tokens are frame-major and
      ``grid`` is one frame's (h, w), so ``origin`` = t·h·w + y·w + x: frame t = origin // (h·w).
    """

    visual: torch.Tensor
    origin: torch.Tensor
    grid: tuple[int, int]
    keep: int
    site: Site
    generator: torch.Generator | None = None
    sizes: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    text: torch.Tensor | None = None
    cls_attention: torch.Tensor | None = None
    cls_token: torch.Tensor | None = None
    attention_received: torch.Tensor | None = None
    key_l1: torch.Tensor | None = None
    text_key_l1: torch.Tensor | None = None
    normed_visual: torch.Tensor | None = None
    normed_text: torch.Tensor | None = None
    input_visual: torch.Tensor | None = None
    input_text: torch.Tensor | None = None
    text_valid: torch.Tensor | None = None
    cls_attention_next: torch.Tensor | None = None
    keys_next: torch.Tensor | None = None
    clip_visual: torch.Tensor | None = None
    clip_text: torch.Tensor | None = None
    crops: tuple[tuple[int, int], ...] = ()
    crop_origin: torch.Tensor | None = None
    frames: int = 1
    generators: list[torch.Generator] | None = None

    def row_generators(self) -> list[torch.Generator | None]:
        """One generator per row of ``visual``: ``generators`` when the harness set them, else
        ``generator`` for every row (rows then draw one after another from the same stream)."""
        if self.generators is not None:
            return list(self.generators)
        return [self.generator] * self.visual.shape[0]


@dataclass
class Reduction:
    """The result of one reduction.

    - ``keep`` [B, K]: sorted, unique indices into ``SiteInput.visual``; K <= ``SiteInput.keep``.
    - ``values`` [B, K, D]: optional merged features for the kept tokens (default: the originals).
    - ``extra`` [B, E, D]: optional new tokens appended after the kept ones (e.g. recycled clusters).
    - ``sizes`` [B, K]: optional token sizes after merging (ToMe's size tracking).
    - ``prefix`` [B, P, D]: optional new tokens placed *before* the kept ones (e.g. VisionZip's CLS
      token), origin -1; only at pre-LLM sites (``vision_out``, ``projector``), where they pass
      through the projector with the kept tokens. They count toward the plan's ``keep``.
    - ``extra_after`` [B, E]: optional place of each ``extra`` token, as an index into
      ``SiteInput.visual``: the token goes right after that token's place in the sequence (after
      it if it is kept), before every kept token with a larger index; extras with the same place
      keep their order. Default: all extras after the last kept token. A per-frame method puts a
      frame's new tokens after that frame's last token, so they stay inside their frame (and, with
      ``positions="original"``, take the position id of the token they follow).
    """

    keep: torch.Tensor
    values: torch.Tensor | None = None
    extra: torch.Tensor | None = None
    sizes: torch.Tensor | None = None
    prefix: torch.Tensor | None = None
    extra_after: torch.Tensor | None = None

    @classmethod
    def keep_all(cls, x: SiteInput) -> Reduction:
        """The reduction that keeps every token of ``x`` as it is."""
        b, n, _ = x.visual.shape
        return cls(torch.arange(n, device=x.visual.device).expand(b, n).clone())

    def check(self, x: SiteInput) -> None:
        """Raise ``ValueError`` if this reduction breaks the contract for input ``x``."""
        b, n, d = x.visual.shape
        keep = self.keep
        if keep.dim() != 2 or keep.shape[0] != b:
            raise ValueError(f"keep must be [B, K] with B={b}, got {tuple(keep.shape)}")
        if keep.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"keep must hold integer indices, got {keep.dtype}")
        k = keep.shape[1]
        p = self.prefix.shape[1] if self.prefix is not None and self.prefix.dim() == 3 else 0
        if k + p > max(x.keep, 0) and k + p > 0 and x.keep < n:
            raise ValueError(f"kept {k} tokens" + (f" plus {p} prefix tokens" if p else "")
                             + f" but the plan allows {x.keep}")
        if k and (keep.min() < 0 or keep.max() >= n):
            raise ValueError(f"keep indices must lie in [0, {n})")
        if k > 1 and not bool((keep[:, 1:] > keep[:, :-1]).all()):
            raise ValueError("keep indices must be sorted ascending and unique")
        if self.values is not None and tuple(self.values.shape) != (b, k, d):
            raise ValueError(f"values must be [{b}, {k}, {d}], got {tuple(self.values.shape)}")
        if self.extra is not None and (self.extra.dim() != 3 or self.extra.shape[0] != b
                                       or self.extra.shape[2] != d):
            raise ValueError(f"extra must be [{b}, E, {d}], got {tuple(self.extra.shape)}")
        if self.extra_after is not None:
            e = self.extra.shape[1] if self.extra is not None else 0
            if tuple(self.extra_after.shape) != (b, e):
                raise ValueError(f"extra_after must be [{b}, {e}] (one place per extra token), "
                                 f"got {tuple(self.extra_after.shape)}")
            if self.extra_after.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"extra_after must hold integer indices, got {self.extra_after.dtype}")
            if e and (self.extra_after.min() < 0 or self.extra_after.max() >= n):
                raise ValueError(f"extra_after indices must lie in [0, {n})")
        if self.sizes is not None and tuple(self.sizes.shape) != (b, k):
            raise ValueError(f"sizes must be [{b}, {k}], got {tuple(self.sizes.shape)}")
        if self.prefix is not None:
            if self.prefix.dim() != 3 or self.prefix.shape[0] != b or self.prefix.shape[2] != d:
                raise ValueError(f"prefix must be [{b}, P, {d}], got {tuple(self.prefix.shape)}")
            if x.site.stage not in (Stage.VISION_OUT, Stage.PROJECTOR):
                raise ValueError(f"prefix tokens are only allowed at vision_out and projector sites, "
                                 f"not {x.site.stage}")


@dataclass
class DecodeInput:
    """What a method sees at a ``decode`` site ``Site(DECODE, L)``, once per decode step (spec wave 2
    §20 E10): every forward pass after the first generated token, whose logits come from the prefill.

    - ``attention`` [B, V]: head-mean softmax attention of the token being decoded (the step's one
      query row) at layer ``L - 1`` over that layer's V cached visual entries, normalised over its
      whole cache (a one-row probe beside the fused kernel, like ``SiteInput.attention``), float32;
      computed only for methods that declare ``decode_attention`` (else ``None``). Layout tokens (a
      video frame's CLS, LLaVA-NeXT's newlines) and text are not visual entries.
    - ``origin`` [B, V]: each visual entry's index in the original visual-token grid.
    - ``grid``, ``frames``: as in :class:`SiteInput`.
    - ``keep``: the most visual entries the view may hold (the plan's ``keep`` for this site).
    - ``step``: 0 at the first decode step of a generation.
    """

    attention: torch.Tensor | None
    origin: torch.Tensor
    grid: tuple[int, int]
    keep: int
    site: Site
    step: int
    frames: int = 1

    @property
    def n_visual(self) -> int:
        return self.origin.shape[1]


@dataclass
class DecodeView:
    """The answer at a ``decode`` site: ``keep`` [B, K], sorted unique indices into the V visual
    entries of :class:`DecodeInput` that layers >= L attend at this step (K <= ``DecodeInput.keep``,
    the same K for every row), and ``state``, any value the method wants back at the next step of
    the same generation (tensors, batched like the rows)."""

    keep: torch.Tensor
    state: Any = None

    def check(self, x: DecodeInput) -> None:
        """Raise ``ValueError`` if this view breaks the contract for input ``x``."""
        b, v = x.origin.shape
        keep = self.keep
        if keep.dim() != 2 or keep.shape[0] != b or keep.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"decode view keep must be integer [B, K] with B={b}, got {keep.dtype} "
                             f"{tuple(keep.shape)}")
        if keep.shape[1] > max(x.keep, 0):
            raise ValueError(f"decode view keeps {keep.shape[1]} visual entries but the plan allows {x.keep}")
        if keep.numel() and (keep.min() < 0 or keep.max() >= v):
            raise ValueError(f"decode view indices must lie in [0, {v})")
        if keep.shape[1] > 1 and not bool((keep[:, 1:] > keep[:, :-1]).all()):
            raise ValueError("decode view indices must be sorted ascending and unique")


class TokenCompressor:
    """Base class of every compression method. Subclass it and register the class.

    Class attributes: ``name`` (CLI name), ``stages`` (where it can act, for listings), ``needs``
    (subset of :data:`SIGNALS`), ``attention_queries`` (which query rows ``attention`` holds:
    ``last`` prompt token, all ``text`` tokens after the image, or ``all`` tokens, which needs the
    full attention map), ``positions`` (whether surviving LLM tokens keep their ``original``
    position ids or are renumbered ``contiguous``), ``stochastic`` (``reduce`` uses the generator),
    ``paper``, ``source``, ``attention_source`` (at an ``llm`` site before layer ``l``: ``previous``
    reads ``attention``, ``keys`` and ``key_l1`` from layer ``l-1``, FastV's convention; ``next``
    recomputes them with layer ``l``'s own input norm and projections on the hidden states entering
    it, before it runs, PyramidDrop's convention). Options are the nested
    pydantic model ``Options``; unknown keys are rejected. An instance may refine ``needs`` or
    ``attention_queries`` from its options in ``__init__``, or ``needs`` from what the adapter
    serves (``ModelInfo.signals``) in ``schedule``: adapters read ``needs`` after ``schedule``.
    """

    name: ClassVar[str] = ""
    stages: ClassVar[tuple[Stage, ...]] = ()
    needs: frozenset[str] = frozenset()
    attention_queries: AttentionQueries = "last"
    attention_source: AttentionSource = "previous"
    positions: PositionPolicy = "original"
    proportional_attention: bool = False  # ToMe: bias vision attention by log(size)
    # Whether reduce draws from SiteInput.generator. Adapters then run the method one sample at a
    # time, so a sample's draw depends on the seed and the sample alone, not on its batch neighbours
    # or on resume.
    stochastic: bool = False
    # E2: how ``cls_attention_next`` / ``keys_next`` combine heads: ``mean`` or ``concat`` (PruMerge+).
    next_block_heads: NextBlockHeads = "mean"
    # E7: directory of the CLIP checkpoint (a full ``CLIPModel``: both towers and projections) the
    # adapter loads to compute ``clip_visual`` / ``clip_text``; it must be the CLIP model the VLM's
    # vision tower comes from. ``None``: the adapter refuses those signals (Infeasible, with the fix).
    clip_checkpoint: str | None = None
    # ``reduce`` keeps a data-dependent number of tokens, at most the plan's ``keep``, and does not aim
    # at the budget (PruMerge+'s adaptive count): the plan may exceed the budget and the realised
    # tokens the harness records are the result; or ``decode_view`` returns views whose length is
    # data-dependent (DyCoke's reference decode). Adapters run such methods one sample at a time.
    adaptive_count: bool = False
    # Whether a stochastic reduce draws row b only from SiteInput.row_generators()[b]. Such methods
    # run batched: each row's generator is seeded from (run seed, sample), whatever the batch.
    draws_per_row: bool = False
    paper: ClassVar[str] = ""
    source: ClassVar[str] = ""

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def __init__(self, **options: Any) -> None:
        self.options = self.Options(**options)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        opts = cls.__dict__.get("Options")
        if opts is not None and opts.model_config.get("extra") != "forbid":
            opts.model_config["extra"] = "forbid"
            opts.model_rebuild(force=True)

    @property
    def flash_attention(self) -> FlashAttentionClass:
        """FlashAttention class derived from ``needs`` (the harness verifies it by running)."""
        return flash_attention_class(self.needs, self.attention_queries)

    def schedule(self, n_visual: int, budget: float, info: ModelInfo) -> list[tuple[Site, int]]:
        """Return ``[(site, keep), ...]`` in execution order so that the layer-averaged visual token
        count over the LLM's layers is ``budget``; raise :class:`Infeasible` if it cannot be met."""
        raise NotImplementedError

    def reduce(self, x: SiteInput) -> Reduction:
        """Choose (and optionally merge) the tokens that survive this site."""
        raise NotImplementedError

    def decode_view(self, x: DecodeInput, state: Any) -> DecodeView:
        """At a ``decode`` site of the plan, once per decode step: which cached visual entries layers
        >= ``x.site.layer`` attend at this step (the cache itself keeps every entry; layers below the
        site attend all of them). ``state`` is ``None`` at the first step of every generation (the
        adapter never carries it from one batch or sample to the next) and then whatever the previous
        step's :class:`DecodeView` returned. Only methods that plan a ``decode`` site implement it; they
        declare ``decode_attention`` in ``needs`` (the one-row probe makes them ``probe`` class)."""
        raise NotImplementedError(f"method '{self.name}' plans a decode site but does not implement decode_view")

    def site_needs(self, site: Site) -> frozenset[str]:
        """The signals this method reads at ``site`` (default: all of ``needs``, split so that the
        :data:`DECODE_SIGNALS` belong to ``decode`` sites only). A method whose stages read different
        signals (HoliTom: received attention before the LLM, an attention row inside it) narrows this,
        so that :func:`check_signals` asks each site only for its own."""
        if site.stage is Stage.DECODE:
            return self.needs & DECODE_SIGNALS
        return self.needs - DECODE_SIGNALS

    def clip_instruction(self, prompt: str) -> str:
        """The part of the user's prompt that ``clip_text`` embeds (default: all of it)."""
        return prompt

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "options": self.options.model_dump(mode="json")}


def flash_attention_class(needs: frozenset[str], queries: AttentionQueries = "last") -> FlashAttentionClass:
    """``native`` without attention signals; ``eager`` for full LLM maps (``attention`` from ``all``
    queries); else ``probe``: LLM rows, the vision CLS row, or received attention streamed over
    query chunks beside the fused kernel (:data:`VISION_ATTENTION_SIGNALS`), or one row per decode
    step (:data:`DECODE_SIGNALS`)."""
    if "attention" not in needs and not (VISION_ATTENTION_SIGNALS | DECODE_SIGNALS) & set(needs):
        return "native"
    if "attention" in needs and queries == "all":
        return "eager"
    return "probe"


def check_signals(name: str, needs: Iterable[str], plan: list[tuple[Site, int]], info: ModelInfo,
                  site_needs: Callable[[Site], Iterable[str]] | None = None) -> None:
    """Raise :class:`Infeasible` naming the signal and the adapter when a planned site needs a signal
    the adapter does not serve there (``ModelInfo.signals``), before any site runs. ``site_needs``
    (``TokenCompressor.site_needs``) narrows ``needs`` per site."""
    needs = frozenset(needs)
    for site, _ in plan:
        wanted = needs if site_needs is None else frozenset(site_needs(site))
        missing = sorted(s for s in wanted if not info.serves(s, site.stage))
        if missing:
            served = ", ".join(sorted(info.signals.get(site.stage, ()))) or "none"  # type: ignore[union-attr]
            raise Infeasible(f"method '{name}' needs {', '.join(missing)} at {site.stage}, which the "
                             f"{info.family} adapter does not serve there (it serves: {served})")


def layer_averaged_tokens(n_visual: int, plan: list[tuple[Site, int]], llm_layers: int,
                          extra: dict[Site, int] | None = None) -> float:
    """Layer-averaged visual tokens the LLM decoder processes under ``plan`` (the budget convention).

    Pre-LLM sites set the count entering the LLM; an ``llm`` site at layer ``l`` changes the count
    for layers ``l..L-1``. ``extra`` adds appended tokens (e.g. recycled clusters) per site.
    ``decode`` sites do not count: they act after the prefill (reported as decode-time KV retention).
    """
    extra = extra or {}
    per_layer = [float(n_visual)] * llm_layers
    for site, keep in plan:
        if site.stage is Stage.DECODE:
            continue
        count = min(keep, n_visual) + extra.get(site, 0)
        start = site.layer if site.stage is Stage.LLM else 0
        for layer in range(start, llm_layers):
            per_layer[layer] = count
    return sum(per_layer) / llm_layers
